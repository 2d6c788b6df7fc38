-- name: device_minute_stats
-- description: readings, temperature and battery per device for every minute (the local demo's job)
-- window: 1m
-- lateness: 0s
SELECT
  device_id,
  count(*) AS readings,
  round(avg(temperature), 2) AS avg_temperature,
  round(min(battery), 1) AS min_battery
FROM telemetry
WHERE ts >= $window_start AND ts < $window_end
GROUP BY device_id
ORDER BY device_id
