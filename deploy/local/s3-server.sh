#!/usr/bin/env bash
# S3-compatible server for tests on 127.0.0.1: moto (PyPI, pinned). It honours conditional
# writes (If-None-Match), which every Delta log commit relies on (a put-if-absent of the next
# `_delta_log/NNN.json`); Garage does not.
#
#   deploy/local/s3-server.sh install|path
#
# `path` prints the directory to put on PYTHONPATH; run the server with
#   PYTHONPATH=$(deploy/local/s3-server.sh path) python3 -m moto.server -H 127.0.0.1 -p PORT
set -euo pipefail

readonly MOTO_REQUIREMENT="moto[server]==5.2.5"
tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
target="$tools_dir/moto-5.2.5"

install() {
  [[ -f "$target/.installed" ]] && return 0
  command -v python3 >/dev/null || { echo "s3-server.sh: python3 is needed" >&2; exit 1; }
  echo "s3-server.sh: installing $MOTO_REQUIREMENT into $target (about 20 s, once)" >&2
  rm -rf "$target"
  python3 -m pip install --quiet --disable-pip-version-check --target "$target" "$MOTO_REQUIREMENT" >&2 2>/dev/null \
    || python3 -m pip install --disable-pip-version-check --target "$target" "$MOTO_REQUIREMENT" >&2
  touch "$target/.installed"
}

case "${1:-}" in
  install) install ;;
  path) install; echo "$target" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
