#!/usr/bin/env bash
# Outside readers of the lake's Delta tables (PyPI, pinned) for integration-tests/readers/read_delta.py:
# deltalake, Polars and DuckDB with its delta and httpfs extensions from wheels (DuckDB's own
# INSTALL downloads from the internet, so the extensions are loaded by path instead).
#
#   deploy/local/delta-readers.sh install|path
#
# `path` prints the directory to put on PYTHONPATH.
set -euo pipefail

# The install takes about 20 s on this 2-core machine (timed: 21 s with an empty pip cache, 20 s
# with a warm one: copying 650 MB into the target is most of it).
readonly REQUIREMENTS=(
  "deltalake==1.6.6"
  # pl.read_delta lists a table's files through deltalake, then reads them with Polars' own reader.
  "polars==2.1.0"
  "pyarrow==26.0.1"
  # The newest DuckDB that has a delta extension on PyPI (duckdb 1.5.6 and 2.0.1 are out, the
  # extension wheels stop at 1.5.5). The query benchmark against DuckDB runs this same install.
  "duckdb==1.5.5"
  # Each carries one .duckdb_extension file built for duckdb 1.5.5: keep the three versions equal.
  "duckdb-extension-delta==1.5.5"
  "duckdb-extension-httpfs==1.5.5"
  # AES-GCM for the KMS client with which PyArrow reads Sluice's encrypted columns (the column
  # encryption test).
  "cryptography==48.0.0"
)
tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
target="$tools_dir/delta-readers-deltalake1.6.6-polars2.1.0-pyarrow26.0.1-duckdb1.5.5-cryptography48.0.0"

install() {
  [[ -f "$target/.installed" ]] && return 0
  command -v python3 >/dev/null || { echo "delta-readers.sh: python3 is needed" >&2; exit 1; }
  echo "delta-readers.sh: installing ${REQUIREMENTS[*]} into $target (about 20 s, once)" >&2
  rm -rf "$target"
  python3 -m pip install --quiet --disable-pip-version-check --target "$target" "${REQUIREMENTS[@]}" >&2 2>/dev/null \
    || python3 -m pip install --disable-pip-version-check --target "$target" "${REQUIREMENTS[@]}" >&2
  touch "$target/.installed"
}

case "${1:-}" in
  install) install ;;
  path) install; echo "$target" ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
