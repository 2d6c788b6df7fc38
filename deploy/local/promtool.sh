#!/usr/bin/env bash
# promtool, for checking the alert rules and the dashboards' queries in CI (no Prometheus server
# runs). Taken from Debian's prometheus package without installing it, so that no Prometheus
# service is started on the machine.
#
#   deploy/local/promtool.sh install|path
#
# `path` prints the promtool binary's path.
set -euo pipefail

tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
target="$tools_dir/promtool-debian"

install() {
  [[ -x "$target/usr/bin/promtool" ]] && return 0
  command -v apt-get >/dev/null || { echo "promtool.sh: needs apt-get (Debian) to fetch the prometheus package" >&2; exit 1; }
  echo "promtool.sh: fetching promtool from Debian's prometheus package into $target (once)" >&2
  local download
  download="$(mktemp -d)"
  if ! (cd "$download" && apt-get download -qq prometheus 2>/dev/null); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "promtool.sh: 'apt-get download prometheus' failed; run 'sudo apt-get update' and try again" >&2
      exit 1
    fi
    apt-get update -qq
    (cd "$download" && apt-get download -qq prometheus)
  fi
  rm -rf "$target"
  mkdir -p "$target"
  dpkg-deb -x "$download"/prometheus_*.deb "$target"
  rm -rf "$download" "$target/usr/bin/prometheus" "$target/usr/share"
  "$target/usr/bin/promtool" --version >/dev/null
}

case "${1:-}" in
  install) install ;;
  path) install; echo "$target/usr/bin/promtool" ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
