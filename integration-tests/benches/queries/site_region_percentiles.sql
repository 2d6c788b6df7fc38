-- name: site_region_percentiles
-- description: benchmark only, the day's temperature per region (from the device registry) and site
-- window: 1d
SELECT
  d.region,
  coalesce(t.site, 'unknown') AS site,
  count(*) AS readings,
  median(t.temperature) AS p50_temperature,
  approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY t.temperature) AS p95_temperature
FROM telemetry t
JOIN devices d ON t.device_id = d.device_id
GROUP BY d.region, coalesce(t.site, 'unknown')
ORDER BY region, site
