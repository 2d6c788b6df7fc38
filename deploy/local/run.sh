#!/usr/bin/env bash
# Runs the pipeline locally, end to end, as far as it is built: the Kafka-protocol broker, the
# ingest service and the compactor, sample readings from a few devices (one batch of them bad),
# what landed in Kafka, and the Parquet files the compactor committed under ./data.
# Services are built in debug mode; state and logs go under ./.local.
set -euo pipefail
cd "$(dirname "$0")/../.."

readonly ingest_address="127.0.0.1:${SLUICE_INGEST_PORT:-8080}"
readonly broker_port="${SLUICE_BROKER_PORT:-9092}"
readonly bin_dir="${CARGO_TARGET_DIR:-target}/debug"
mkdir -p .local
touch .local/run-start
ingest_pid=""
compactor_pid=""

cleanup() {
  for pid in "$ingest_pid" "$compactor_pid"; do
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
  "$bin_dir/sluice-compactor" --config deploy/config/compactor.toml > .local/compactor.log 2>&1 &
compactor_pid=$!
sleep 1
kill -0 "$compactor_pid" 2>/dev/null || { echo "run.sh: compactor exited; see .local/compactor.log:" >&2; tail -n 20 .local/compactor.log >&2; exit 1; }
echo "running (log: .local/compactor.log)"

step "Sending sample readings from 4 devices"
run_id="$(date +%s)"
now_ms="$(($(date +%s%N) / 1000000))"
readings=""
for device in 1 2 3 4; do
  for seq in 1 2 3 4 5; do
    ts=$((now_ms - (5 - seq) * 60000))
    temperature="$((18 + device)).$((seq * 7 % 10))"
    readings+="{\"device_id\":\"demo-$run_id-$device\",\"ts\":$ts,\"seq\":$seq,\"site\":\"farm-$(( (device + 1) / 2 ))\",\"temperature\":$temperature,\"humidity\":$((40 + seq)).5,\"battery\":0.9$device}"$'\n'
  done
done
printf 'POST /v1/streams/telemetry/records (20 readings, NDJSON): '
curl -sS -w ' HTTP %{http_code}\n' -H 'content-type: application/x-ndjson' --data-binary "$readings" \
  "http://$ingest_address/v1/streams/telemetry/records"
printf 'POST a batch with a bad reading (refused whole, nothing written): '
curl -sS -w ' HTTP %{http_code}\n' -H 'content-type: application/json' \
  --data "[{\"device_id\":\"demo-$run_id-1\",\"ts\":$now_ms,\"seq\":6},{\"device_id\":\"demo-$run_id-9\",\"ts\":\"yesterday\",\"seq\":1}]" \
  "http://$ingest_address/v1/streams/telemetry/records"

step "What landed in Kafka (topic sluice.telemetry, decoded with schemas/telemetry.avsc)"
"$bin_dir/sluice" --bootstrap-servers "127.0.0.1:$broker_port" tail telemetry --limit 100000 --idle-timeout-ms 1500 \
  | grep "demo-$run_id-" | head -n 8
echo "... (8 of this run's readings shown)"
landed="$("$bin_dir/sluice" --bootstrap-servers "127.0.0.1:$broker_port" tail telemetry --limit 100000 --idle-timeout-ms 1500 2>/dev/null | grep -c "demo-$run_id-" || true)"
echo "This run's readings in Kafka: $landed (expected 20)"

step "Parquet committed by the compactor (./data, Hive layout by event time)"
data_files() { find data/telemetry -name '*.parquet' -newer .local/run-start 2>/dev/null | wc -l; }
for _ in $(seq 1 60); do
  [[ "$(data_files)" -gt 0 ]] && break
  sleep 1
done
sleep 6
find data/telemetry -name '*.parquet' -newer .local/run-start | sort | head -n 10
echo "Files written this run: $(data_files); commit records: $(find data/_sluice/commits -name '*.json' | wc -l) in all"

step "Done"
cat <<EOT
The broker keeps running (memory storage): deploy/local/broker.sh status | stop
Next:
  target/debug/sluice tail telemetry --limit 5          # read the stream
  ls data/telemetry/                                    # the lake: dt=YYYY-MM-DD/hour=HH/*.parquet
  target/debug/sluice-ingest --config deploy/config/ingest.toml   # run ingest yourself
  curl -H 'content-type: application/json' -d '{"device_id":"d1","ts":"$(date -u +%Y-%m-%dT%H:%M:%SZ)","seq":1}' http://$ingest_address/v1/streams/telemetry/records
EOT
[[ "$landed" == "20" && "$(data_files)" -gt 0 ]]
