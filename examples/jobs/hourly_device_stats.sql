-- name: hourly_device_stats
-- description: per device and hour, five minutes past the hour once late data had ten minutes
-- schedule: 5 * * * *
-- window: 1h
-- lateness: 10m
SELECT
  device_id,
  $window_start AS hour,
  count(*) AS readings,
  avg(temperature) AS avg_temperature,
  max(temperature) AS max_temperature,
  avg(humidity) AS avg_humidity,
  min(battery) AS min_battery,
  sum(CASE WHEN status <> 'OK' THEN 1 ELSE 0 END) AS not_ok_readings
FROM telemetry
WHERE ts >= $window_start AND ts < $window_end
GROUP BY device_id
