-- name: daily_anomalies_window
-- description: benchmark only, the day's 20 readings furthest from their device's mean, with window functions over the day's rows
-- window: 1d
WITH scored AS (
  SELECT
    device_id,
    ts,
    temperature,
    (temperature - avg(temperature) OVER (PARTITION BY device_id))
      / nullif(stddev_pop(temperature) OVER (PARTITION BY device_id), 0) AS z
  FROM telemetry
  WHERE temperature IS NOT NULL
)
SELECT device_id, ts, temperature, z
FROM scored
-- NULLS LAST and the tie-breakers are spelled out: descending, DataFusion puts NULLs first and
-- DuckDB last, and a tie at the 20th row would let the engines keep different rows.
ORDER BY abs(z) DESC NULLS LAST, device_id, ts
LIMIT 20
