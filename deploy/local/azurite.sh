#!/usr/bin/env bash
# Azure Blob Storage emulator for tests on 127.0.0.1: Azurite (npm, pinned). It honours
# conditional writes (If-None-Match, If-Match) and block uploads, which the lake's commits and
# multipart uploads on Azure rely on. Needs node and npm.
#
#   deploy/local/azurite.sh install|path
#
# `path` prints the azurite-blob executable; run it with (always --disableTelemetry: without it
# Azurite reaches for a cloud metadata address off the machine and ignores SIGTERM)
#   $(deploy/local/azurite.sh path) --blobHost 127.0.0.1 --blobPort PORT --location DIR \
#     --skipApiVersionCheck --disableTelemetry --silent
set -euo pipefail

readonly AZURITE_PACKAGE="azurite@3.37.0"
tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
target="$tools_dir/azurite-3.37.0"

install() {
  [[ -f "$target/.installed" ]] && return 0
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "azurite.sh: node and npm are needed (apt-get install nodejs npm)" >&2
    exit 1
  fi
  mkdir -p "$tools_dir"
  # Tests run side by side and each may ask for the path: one installs, the others wait.
  exec 9>"$target.lock"
  flock 9
  [[ -f "$target/.installed" ]] && return 0
  echo "azurite.sh: installing $AZURITE_PACKAGE into $target (about 25 s, once)" >&2
  rm -rf "$target"
  mkdir -p "$target"
  local log="$target.install.log"
  if ! npm install --prefix "$target" --no-audit --no-fund "$AZURITE_PACKAGE" >"$log" 2>&1; then
    cat "$log" >&2
    echo "azurite.sh: npm install $AZURITE_PACKAGE failed" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$target/.installed"
}

case "${1:-}" in
  install) install ;;
  path) install; echo "$target/node_modules/.bin/azurite-blob" ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
