#!/usr/bin/env bash
# Runs the pipeline locally, end to end: the Kafka-protocol broker, the ingest service, the
# compactor and the executor on a lake under ./data; the device simulator (`sluice simulate`)
# sending yesterday's and today's readings of 32 devices at 4 sites with a few faults, then live
# readings; one more site's devices sending through an edge gateway (sluice-edge), which keeps
# their readings on disk and forwards them to ingest; every job in examples/jobs/ submitted through sluice.jobs; the first complete
# windows run; and a report of what was sent, refused, written and computed. Services are built
# in debug mode; logs go under ./.local. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/../.."

readonly ingest_address="127.0.0.1:${SLUICE_INGEST_PORT:-8080}"
readonly edge_address="127.0.0.1:${SLUICE_EDGE_PORT:-8090}"
readonly broker_port="${SLUICE_BROKER_PORT:-9092}"
# A Mosquitto of this run's own, beside any system one on 1883.
readonly mqtt_port="${SLUICE_MQTT_PORT:-1884}"
readonly bin_dir="${CARGO_TARGET_DIR:-target}/debug"
mkdir -p .local
touch .local/run-start
ingest_pid=""
edge_pid=""
compactor_pid=""
executor_pid=""
simulator_pid=""
mosquitto_pid=""

cleanup() {
  for pid in "$simulator_pid" "$executor_pid" "$edge_pid" "$ingest_pid" "$compactor_pid" "$mosquitto_pid"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
trap 'echo; echo "run.sh: interrupted"; exit 130' INT TERM

step() { printf '\n==> %s\n' "$*"; }

for tool in cargo curl python3; do
  command -v "$tool" >/dev/null || { echo "run.sh: '$tool' is needed; install it first" >&2; exit 1; }
done
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if port_in_use "${ingest_address#*:}"; then
  echo "run.sh: $ingest_address is already in use; stop what runs there or set SLUICE_INGEST_PORT" >&2
  exit 1
fi
if port_in_use "${edge_address#*:}"; then
  echo "run.sh: $edge_address (the edge gateway) is already in use; stop what runs there or set SLUICE_EDGE_PORT" >&2
  exit 1
fi
if port_in_use "$mqtt_port"; then
  echo "run.sh: 127.0.0.1:$mqtt_port (this run's MQTT broker) is already in use; stop what runs there or set SLUICE_MQTT_PORT" >&2
  exit 1
fi
for port in 8081 8082; do
  if port_in_use "$port"; then
    echo "run.sh: 127.0.0.1:$port (compactor and executor health endpoints) is already in use; is another run.sh running?" >&2
    exit 1
  fi
done

step "Installing prerequisites (only what is missing)"
deploy/local/prerequisites.sh

step "Starting the Kafka-protocol broker on 127.0.0.1:$broker_port"
if ! deploy/local/broker.sh status --port "$broker_port" >/dev/null 2>&1 && [[ -d data ]]; then
  # The local broker keeps topics in memory: a new one starts from offset 0, so a lake whose
  # committed positions point past that belongs to the old broker and is set aside.
  previous="$PWD/.local/data-$(date +%Y%m%d-%H%M%S)"
  mv data "$previous"
  echo "a new broker starts empty: the previous lake moved to $previous"
fi
deploy/local/broker.sh start --port "$broker_port"

step "Building the services (debug; the first build takes several minutes)"
cargo build --locked --bins --workspace

step "Starting Mosquitto (MQTT) on 127.0.0.1:$mqtt_port"
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
# Mosquitto drops QoS 1 messages for a subscriber past max_queued_messages (default 1000): the
# history below arrives faster than a debug build of ingest takes it.
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' "$mqtt_port" \
  > .local/mosquitto.conf
"$mosquitto_bin" -c .local/mosquitto.conf > .local/mosquitto.log 2>&1 &
mosquitto_pid=$!
for _ in $(seq 1 50); do port_in_use "$mqtt_port" && break; sleep 0.1; done
port_in_use "$mqtt_port" || { echo "run.sh: mosquitto did not start; see .local/mosquitto.log" >&2; exit 1; }
echo "running (log: .local/mosquitto.log)"

step "Starting sluice-ingest on http://$ingest_address, MQTT bridge on sluice/<stream>/<device>"
SLUICE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$broker_port" SLUICE_HTTP__LISTEN_ADDRESS="$ingest_address" \
  SLUICE_MQTT__ENABLED=true SLUICE_MQTT__PORT="$mqtt_port" SLUICE_MQTT__CLIENT_ID="sluice-ingest-local-$$" \
  "$bin_dir/sluice-ingest" --config deploy/config/ingest.toml > .local/ingest.log 2>&1 &
ingest_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$ingest_address/readyz" >/dev/null 2>&1 && break
  kill -0 "$ingest_pid" 2>/dev/null || { echo "run.sh: ingest exited; see .local/ingest.log:" >&2; tail -n 20 .local/ingest.log >&2; exit 1; }
  sleep 0.2
done
curl -fsS "http://$ingest_address/readyz" >/dev/null || { echo "run.sh: ingest not ready after 20 s; see .local/ingest.log" >&2; exit 1; }
for _ in $(seq 1 50); do grep -q "subscribed to MQTT topics" .local/ingest.log && break; sleep 0.2; done
grep -q "subscribed to MQTT topics" .local/ingest.log || { echo "run.sh: ingest's MQTT bridge did not subscribe in 10 s; see .local/ingest.log" >&2; exit 1; }
echo "ready (log: .local/ingest.log)"

step "Starting sluice-edge on http://$edge_address: the gateway of one more site, forwarding to ingest"
# A new spool each run: a new broker starts empty, and a new spool is a new sequence of positions.
rm -rf .local/edge-spool
SLUICE_HTTP__LISTEN_ADDRESS="$edge_address" SLUICE_SPOOL__DIRECTORY=.local/edge-spool \
  SLUICE_FORWARD__URL="http://$ingest_address" SLUICE_FORWARD__EDGE_ID=demo-gateway \
  "$bin_dir/sluice-edge" --config deploy/config/edge.toml > .local/edge.log 2>&1 &
edge_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$edge_address/readyz" >/dev/null 2>&1 && break
  kill -0 "$edge_pid" 2>/dev/null || { echo "run.sh: the edge gateway exited; see .local/edge.log:" >&2; tail -n 20 .local/edge.log >&2; exit 1; }
  sleep 0.2
done
curl -fsS "http://$edge_address/readyz" >/dev/null || { echo "run.sh: the edge gateway not ready after 20 s; see .local/edge.log" >&2; exit 1; }
echo "ready (spool: .local/edge-spool, log: .local/edge.log)"

step "Starting sluice-compactor (lake in ./data, files every 5 s for this demo)"
SLUICE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$broker_port" SLUICE_FLUSH__MAX_AGE_MS=5000 \
  SLUICE_WATERMARK__INTERVAL_MS=1000 SLUICE_WATERMARK__ALLOWED_LATENESS_MS=2000 \
  "$bin_dir/sluice-compactor" --config deploy/config/compactor.toml > .local/compactor.log 2>&1 &
compactor_pid=$!
sleep 1
kill -0 "$compactor_pid" 2>/dev/null || { echo "run.sh: compactor exited; see .local/compactor.log:" >&2; tail -n 20 .local/compactor.log >&2; exit 1; }
echo "running (log: .local/compactor.log)"

step "Starting sluice-executor (jobs from sluice.jobs, results under ./data/results)"
SLUICE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$broker_port" SLUICE_EXECUTOR__TICK_INTERVAL_MS=1000 \
  SLUICE_EXECUTOR__INSTANCE_ID=local-executor \
  "$bin_dir/sluice-executor" --config deploy/config/executor.toml > .local/executor.log 2>&1 &
executor_pid=$!
sleep 1
kill -0 "$executor_pid" 2>/dev/null || { echo "run.sh: executor exited; see .local/executor.log:" >&2; tail -n 20 .local/executor.log >&2; exit 1; }
echo "running (log: .local/executor.log)"

sluice() { "$bin_dir/sluice" --config deploy/config/executor.toml --bootstrap-servers "127.0.0.1:$broker_port" "$@"; }

step "Submitting the jobs in examples/jobs/ through sluice.jobs"
for job in examples/jobs/*.sql; do
  sluice jobs submit "$job" --wait 60
done

now_s="$(date +%s)"
today_s=$((now_s / 86400 * 86400))
# The daily job needs a complete UTC day whose lateness (30 minutes) has passed.
if (( now_s - today_s < 3600 )); then day_s=$((today_s - 2 * 86400)); else day_s=$((today_s - 86400)); fi
history_s=$((now_s - day_s))
step "Simulating 32 devices at 4 sites (8 over MQTT, the rest over HTTP): readings from $(date -u -d "@$day_s" +%Y-%m-%dT%H:%MZ) until now, one a minute each"
echo "faults: 1% invalid, 2% late by 5 minutes, 5% out of order, 1% sent twice, device clocks off by up to 2 s"
"$bin_dir/sluice" simulate --ingest-url "http://$ingest_address" --mqtt "127.0.0.1:$mqtt_port" --mqtt-share 0.25 \
  --devices 32 --sites 4 --rate 0.016667 \
  --history "${history_s}s" --invalid 0.01 --late 0.02 --late-by 5m --out-of-order 0.05 --duplicates 0.01 \
  --clock-skew 2s --anomalies 0.002 --seed "$now_s" --device-prefix "demo" --log .local/simulated.ndjson \
  | tee .local/simulator-report.txt
echo "(every reading sent, with its faults and ingest's answer: .local/simulated.ndjson)"

step "A fifth site's 4 devices send the last hour through the edge gateway (http://$edge_address)"
"$bin_dir/sluice" simulate --ingest-url "http://$edge_address" --devices 4 --sites 1 --rate 0.016667 \
  --history 1h --seed "$((now_s + 2))" --device-prefix "gateway" | tee .local/edge-simulator-report.txt

step "Live readings: every device every 5 s, in the background (log: .local/simulator-live.log)"
"$bin_dir/sluice" simulate --ingest-url "http://$ingest_address" --mqtt "127.0.0.1:$mqtt_port" --mqtt-share 0.25 \
  --devices 32 --sites 4 --rate 0.2 \
  --duration 2h --seed "$((now_s + 1))" --device-prefix "demo" > .local/simulator-live.log 2>&1 &
simulator_pid=$!

step "Parquet committed by the compactor (./data/telemetry: a Delta table, Hive layout by event time)"
data_files() { find data/telemetry -path '*/_delta_log' -prune -o -name '*.parquet' -newer .local/run-start -print 2>/dev/null | wc -l; }
for _ in $(seq 1 60); do
  [[ "$(data_files)" -gt 0 ]] && break
  sleep 1
done
if [[ "$(data_files)" -eq 0 ]]; then
  echo "run.sh: no Parquet file after 60 s; see .local/compactor.log. If the compactor never got its partitions," >&2
  echo "the broker's consumer group may be stuck after an interrupted run: deploy/local/broker.sh stop, then run again." >&2
  exit 1
fi
sleep 6
echo "files written this run: $(data_files) in $(find data/telemetry -mindepth 2 -maxdepth 2 -type d -name 'hour=*' | wc -l) hourly partitions, for example:"
find data/telemetry -path '*/_delta_log' -prune -o -name '*.parquet' -newer .local/run-start -print | sort | tail -n 3
echo "Delta log of data/telemetry: $(find data/telemetry/_delta_log -name '*.json' | wc -l) commits, $(find data/telemetry/_delta_log -name '*.checkpoint.parquet' | wc -l) checkpoints"

step "Waiting for the first live window of device_minute_stats (complete about a minute after submission)"
for _ in $(seq 1 180); do
  sluice jobs show device_minute_stats 2>/dev/null | grep -Eq '[1-9][0-9]* succeeded' && break
  sleep 1
done
sluice jobs show device_minute_stats | sed -n '1,12p'

hour_s=$((now_s / 3600 * 3600))
step "Running the hourly and daily jobs over the simulated history (backfills)"
sluice jobs backfill hourly_device_stats --from "$(date -u -d "@$((hour_s - 7200))" +%Y-%m-%dT%H:00:00Z)" \
  --to "$(date -u -d "@$((hour_s - 3600))" +%Y-%m-%dT%H:00:00Z)" --timeout 180
sluice jobs backfill temperature_anomalies --from "$(date -u -d "@$((hour_s - 7200))" +%Y-%m-%dT%H:00:00Z)" \
  --to "$(date -u -d "@$((hour_s - 3600))" +%Y-%m-%dT%H:00:00Z)" --timeout 180
sluice jobs backfill daily_site_percentiles --from "$(date -u -d "@$day_s" +%Y-%m-%dT00:00:00Z)" \
  --to "$(date -u -d "@$((day_s + 86400))" +%Y-%m-%dT00:00:00Z)" --timeout 300

step "Report"
cat .local/simulator-report.txt
# The gateway forwards at its own pace; its readings are in the lake once it has forwarded them.
gateway_rows() { sluice query "SELECT count(*) AS n FROM telemetry WHERE device_id LIKE 'gateway%'" 2>/dev/null | grep -Eo '[0-9]+' | tail -n 1; }
for _ in $(seq 1 60); do
  [[ "$(gateway_rows || echo 0)" -ge 200 ]] && break
  sleep 1
done
echo "  readings of the gateway's site in the lake (sent through sluice-edge, forwarded to ingest): $(gateway_rows || echo 0)"
dead_letters="$(sluice tail telemetry --dead-letters --limit 1000000 --idle-timeout-ms 1500 2>/dev/null | wc -l)"
echo "  records in the dead-letter topic sluice.telemetry.dlq (invalid MQTT readings, every run on this broker): $dead_letters"
for job in device_minute_stats hourly_device_stats temperature_anomalies daily_site_percentiles; do
  echo
  echo "--- $job: first rows of its newest result (data/results/$job/)"
  sluice jobs results "$job" --windows 1 --limit 10
done
echo
sluice jobs runs device_minute_stats --limit 3
echo
echo "--- the same tables through Python deltalake (delta-rs), as any outside engine reads them (docs/querying.md)"
PYTHONPATH="$(deploy/local/delta-readers.sh path)" python3 - <<'PY'
from deltalake import DeltaTable
for uri in ["data/telemetry", "data/results/hourly_device_stats"]:
    table = DeltaTable(uri)
    rows = table.to_pyarrow_dataset().count_rows()
    print(f"  {uri}: Delta version {table.version()}, {len(table.file_uris())} files, {rows} rows, partitioned by {table.metadata().partition_columns}")
PY

step "Done"
cat <<EOT
Data: ./data/telemetry (a Delta table, partitioned by dt and hour), ./data/results/<job>/ (a Delta table
per job), ./data/_sluice (run records). Read them with any Delta engine: docs/querying.md.
The services and the live simulator stop with this script; the broker keeps running (memory
storage, so topics and jobs survive until it stops): deploy/local/broker.sh status | stop
Next, in another terminal:
  target/debug/sluice query "SELECT site, count(*) AS readings, round(avg(temperature), 1) AS avg_temp FROM telemetry GROUP BY site ORDER BY site"
  target/debug/sluice jobs list                         # jobs and their status
  target/debug/sluice jobs runs device_minute_stats     # run history (sluice.job-runs)
  target/debug/sluice tail telemetry --dead-letters     # readings refused over MQTT
  target/debug/sluice simulate --help                   # more devices, MQTT, faults
  cat docs/jobs.md                                      # write your own job
EOT
