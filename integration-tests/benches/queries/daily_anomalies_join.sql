-- name: daily_anomalies_join
-- description: benchmark only, the same 20 readings with each device's statistics as an aggregate joined back to the rows
-- window: 1d
WITH stats AS (
  SELECT device_id, avg(temperature) AS mean, nullif(stddev_pop(temperature), 0) AS sd
  FROM telemetry
  GROUP BY device_id
),
scored AS (
  SELECT t.device_id, t.ts, t.temperature, (t.temperature - s.mean) / s.sd AS z
  FROM telemetry t
  JOIN stats s ON t.device_id = s.device_id
  WHERE t.temperature IS NOT NULL
)
SELECT device_id, ts, temperature, z
FROM scored
-- As in daily_anomalies_window.sql: the same rows in both engines whatever their defaults.
ORDER BY abs(z) DESC NULLS LAST, device_id, ts
LIMIT 20
