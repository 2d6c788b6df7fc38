-- name: temperature_anomalies
-- description: the 20 readings of the hour furthest from their device's mean, in standard deviations
-- window: 1h
-- lateness: 10m
WITH scored AS (
  SELECT
    device_id,
    ts,
    temperature,
    (temperature - avg(temperature) OVER (PARTITION BY device_id))
      / nullif(stddev_pop(temperature) OVER (PARTITION BY device_id), 0) AS z_score
  FROM telemetry
  WHERE temperature IS NOT NULL
)
SELECT device_id, ts, temperature, round(z_score, 2) AS z_score
FROM scored
WHERE abs(z_score) >= 3
ORDER BY abs(z_score) DESC
LIMIT 20
