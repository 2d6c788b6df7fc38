-- name: daily_site_percentiles
-- description: temperature distribution per site and UTC day
-- window: 1d
-- lateness: 30m
-- retries: 2
SELECT
  coalesce(site, 'unknown') AS site,
  count(DISTINCT device_id) AS devices,
  count(*) AS readings,
  median(temperature) AS p50_temperature,
  approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY temperature) AS p95_temperature,
  approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY temperature) AS p99_temperature
FROM telemetry
GROUP BY coalesce(site, 'unknown')
ORDER BY site
