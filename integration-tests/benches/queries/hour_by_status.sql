-- name: hour_by_status
-- description: benchmark only, one hour's readings and mean humidity by status (a scan and a tiny group by)
-- window: 1h
SELECT status, count(*) AS readings, avg(humidity) AS avg_humidity
FROM telemetry
GROUP BY status
ORDER BY status
