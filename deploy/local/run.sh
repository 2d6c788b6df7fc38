#!/usr/bin/env bash
# Runs the pipeline locally, end to end: the Kafka-protocol broker, the ingest service, the
# compactor and the executor; sample readings from 32 devices over the last five minutes (and a
# bad batch, refused); what landed in Kafka; the Parquet files committed under ./data; the
# example job examples/jobs/device_minute_stats.sql submitted through sluice.jobs, run over
# those minutes, and its results. Services are built in debug mode; logs go under ./.local.
set -euo pipefail
cd "$(dirname "$0")/../.."

readonly ingest_address="127.0.0.1:${SLUICE_INGEST_PORT:-8080}"
readonly broker_port="${SLUICE_BROKER_PORT:-9092}"
readonly bin_dir="${CARGO_TARGET_DIR:-target}/debug"
mkdir -p .local
touch .local/run-start
ingest_pid=""
compactor_pid=""
executor_pid=""

cleanup() {
  for pid in "$executor_pid" "$ingest_pid" "$compactor_pid"; do
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
if (exec 3<>"/dev/tcp/${ingest_address%:*}/${ingest_address#*:}") 2>/dev/null; then
  echo "run.sh: $ingest_address is already in use; stop what runs there or set SLUICE_INGEST_PORT" >&2
  exit 1
fi

step "Installing prerequisites (only what is missing)"
deploy/local/prerequisites.sh

step "Starting the Kafka-protocol broker on 127.0.0.1:$broker_port"
if ! deploy/local/broker.sh status --port "$broker_port" >/dev/null 2>&1 && [[ -d data/_sluice ]]; then
  # The local broker keeps topics in memory: a new one starts from offset 0, so a lake whose
  # commit records point past that belongs to the old broker and is set aside.
  previous="$PWD/.local/data-$(date +%Y%m%d-%H%M%S)"
  mv data "$previous"
  echo "a new broker starts empty: the previous lake moved to $previous"
fi
deploy/local/broker.sh start --port "$broker_port"

step "Building the services (debug; the first build takes several minutes)"
cargo build --locked --bins --workspace

step "Starting sluice-ingest on http://$ingest_address"
SLUICE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$broker_port" SLUICE_HTTP__LISTEN_ADDRESS="$ingest_address" \
  "$bin_dir/sluice-ingest" --config deploy/config/ingest.toml > .local/ingest.log 2>&1 &
ingest_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$ingest_address/readyz" >/dev/null 2>&1 && break
  kill -0 "$ingest_pid" 2>/dev/null || { echo "run.sh: ingest exited; see .local/ingest.log:" >&2; tail -n 20 .local/ingest.log >&2; exit 1; }
  sleep 0.2
done
curl -fsS "http://$ingest_address/readyz" >/dev/null || { echo "run.sh: ingest not ready after 20 s; see .local/ingest.log" >&2; exit 1; }
echo "ready (log: .local/ingest.log)"

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

step "Sending sample readings from 32 devices, one a minute over the last five minutes"
run_id="$(date +%s)"
now_ms="$(($(date +%s%N) / 1000000))"
readings=""
# 32 devices: enough keys to reach every partition, since the watermark waits for all of them.
for device in $(seq 1 32); do
  for seq in 1 2 3 4 5; do
    ts=$((now_ms - (5 - seq) * 60000))
    temperature="$((15 + device % 10)).$((seq * 7 % 10))"
    readings+="{\"device_id\":\"demo-$run_id-$device\",\"ts\":$ts,\"seq\":$seq,\"site\":\"farm-$((device % 4 + 1))\",\"temperature\":$temperature,\"humidity\":$((40 + seq)).5,\"battery\":0.9$device}"$'\n'
  done
done
printf 'POST /v1/streams/telemetry/records (160 readings, NDJSON): '
curl -sS -w ' HTTP %{http_code}\n' -H 'content-type: application/x-ndjson' --data-binary "$readings" \
  "http://$ingest_address/v1/streams/telemetry/records"
printf 'POST a batch with a bad reading (refused whole, nothing written): '
curl -sS -w ' HTTP %{http_code}\n' -H 'content-type: application/json' \
  --data "[{\"device_id\":\"demo-$run_id-1\",\"ts\":$now_ms,\"seq\":6},{\"device_id\":\"demo-$run_id-9\",\"ts\":\"yesterday\",\"seq\":1}]" \
  "http://$ingest_address/v1/streams/telemetry/records"

step "What landed in Kafka (topic sluice.telemetry, decoded with schemas/telemetry.avsc)"
"$bin_dir/sluice" --bootstrap-servers "127.0.0.1:$broker_port" tail telemetry --limit 1000000 --idle-timeout-ms 1500 \
  2>/dev/null | grep "demo-$run_id-" > .local/run-records.jsonl || true
head -n 5 .local/run-records.jsonl
landed="$(wc -l < .local/run-records.jsonl)"
echo "... This run's readings in Kafka: $landed (expected 160)"

step "Parquet committed by the compactor (./data, Hive layout by event time)"
data_files() { find data/telemetry -name '*.parquet' -newer .local/run-start 2>/dev/null | wc -l; }
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
find data/telemetry -name '*.parquet' -newer .local/run-start | sort | head -n 10
echo "Files written this run: $(data_files); commit records: $(find data/_sluice/commits -name '*.json' | wc -l) in all"

sluice() { "$bin_dir/sluice" --config deploy/config/executor.toml --bootstrap-servers "127.0.0.1:$broker_port" "$@"; }

step "Submitting examples/jobs/device_minute_stats.sql through sluice.jobs"
sed -n '1,4p' examples/jobs/device_minute_stats.sql
sluice jobs submit examples/jobs/device_minute_stats.sql --wait 60

step "Running it over this run's minutes (a backfill; later minutes run by themselves once complete)"
now_s=$((now_ms / 1000))
# Minutes from five minutes ago up to the last one that the watermark (2 s behind) has passed.
from="$(date -u -d "@$((now_s - 300))" +%Y-%m-%dT%H:%M:00Z)"
to="$(date -u -d "@$((now_s - 10))" +%Y-%m-%dT%H:%M:00Z)"
sluice jobs backfill device_minute_stats --from "$from" --to "$to" --timeout 180

step "Results of device_minute_stats (./data/results/device_minute_stats/), this run's devices"
sluice jobs results device_minute_stats --windows 2 | grep -E "window starting|device_id|^\+|demo-$run_id-(1|2|3)\b" || true
echo
sluice jobs runs device_minute_stats --limit 6

step "Done"
cat <<EOT
The broker keeps running (memory storage): deploy/local/broker.sh status | stop
Next:
  target/debug/sluice query "SELECT site, count(*) AS readings, round(avg(temperature), 1) AS avg_temp FROM telemetry GROUP BY site ORDER BY site"
  target/debug/sluice jobs list                         # jobs and their status
  target/debug/sluice jobs runs device_minute_stats     # run history (sluice.job-runs)
  target/debug/sluice tail telemetry --limit 5          # read the stream
  ls data/telemetry/ data/results/                      # the lake and the job results
  cat docs/jobs.md                                      # write your own job
EOT
[[ "$landed" == "160" && "$(data_files)" -gt 0 ]]
