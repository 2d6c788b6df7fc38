#!/usr/bin/env bash
# Runs the pipeline locally, end to end, as far as it is built: the Kafka-protocol broker, the
# ingest service, sample readings from a few devices (one of them bad), and what landed in Kafka.
# Services are built in debug mode; state and logs go under ./.local.
set -euo pipefail
cd "$(dirname "$0")/../.."

readonly ingest_address="127.0.0.1:${SLUICE_INGEST_PORT:-8080}"
readonly broker_port="${SLUICE_BROKER_PORT:-9092}"
readonly bin_dir="${CARGO_TARGET_DIR:-target}/debug"
mkdir -p .local
ingest_pid=""

cleanup() {
  if [[ -n "$ingest_pid" ]] && kill -0 "$ingest_pid" 2>/dev/null; then
    kill "$ingest_pid" 2>/dev/null || true
    wait "$ingest_pid" 2>/dev/null || true
  fi
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

step "Done"
cat <<EOT
The broker keeps running (memory storage): deploy/local/broker.sh status | stop
Next:
  target/debug/sluice tail telemetry --limit 5          # read the stream
  target/debug/sluice-ingest --config deploy/config/ingest.toml   # run ingest yourself
  curl -H 'content-type: application/json' -d '{"device_id":"d1","ts":"$(date -u +%Y-%m-%dT%H:%M:%SZ)","seq":1}' http://$ingest_address/v1/streams/telemetry/records
EOT
[[ "$landed" == "20" ]]
