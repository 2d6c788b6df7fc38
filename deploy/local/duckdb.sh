#!/usr/bin/env bash
# DuckDB (PyPI, pinned) for the query benchmark's baseline: the same SQL over the same Parquet.
#
#   deploy/local/duckdb.sh install|path
#
# `path` prints the directory to put on PYTHONPATH for `import duckdb`.
set -euo pipefail

readonly DUCKDB_REQUIREMENT="duckdb==1.4.2"
# pytz: DuckDB needs it to hand TIMESTAMPTZ values to Python.
readonly PYTZ_REQUIREMENT="pytz==2025.2"
tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
target="$tools_dir/duckdb-1.4.2-pytz"

install() {
  [[ -f "$target/.installed" ]] && return 0
  command -v python3 >/dev/null || { echo "duckdb.sh: python3 is needed" >&2; exit 1; }
  echo "duckdb.sh: installing $DUCKDB_REQUIREMENT into $target (once)" >&2
  rm -rf "$target"
  python3 -m pip install --quiet --disable-pip-version-check --target "$target" "$DUCKDB_REQUIREMENT" "$PYTZ_REQUIREMENT" >&2
  touch "$target/.installed"
}

case "${1:-}" in
  install) install ;;
  path) install; echo "$target" ;;
  *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
