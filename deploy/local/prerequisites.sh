#!/usr/bin/env bash
# Installs what building and testing Sluice needs when it is missing: Debian packages (as root),
# the local Tansu broker and cargo-nextest. Safe to run again: it only installs what is absent.
set -euo pipefail
cd "$(dirname "$0")/../.."

apt_packages=()
command -v gcc >/dev/null || apt_packages+=(gcc)
command -v make >/dev/null || apt_packages+=(make)
command -v pkg-config >/dev/null || apt_packages+=(pkg-config)
[[ -e /usr/include/zlib.h ]] || apt_packages+=(zlib1g-dev)
# librdkafka's TLS and SASL_SSL (rdkafka feature `ssl`) link the system OpenSSL.
[[ -e /usr/include/openssl/ssl.h ]] || apt_packages+=(libssl-dev)
[[ -x /usr/sbin/mosquitto || -x /usr/bin/mosquitto ]] || apt_packages+=(mosquitto)
command -v python3 >/dev/null || apt_packages+=(python3)
command -v curl >/dev/null || apt_packages+=(curl)
python3 -m pip --version >/dev/null 2>&1 || apt_packages+=(python3-pip)
# Azurite, the Azure Blob Storage emulator the Azure tests run against, is an npm package.
command -v npm >/dev/null || apt_packages+=(nodejs npm)
if [[ ${#apt_packages[@]} -gt 0 ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "prerequisites.sh: missing Debian packages: ${apt_packages[*]}; install them (sudo apt-get install ${apt_packages[*]})" >&2
    exit 1
  fi
  echo "prerequisites.sh: installing ${apt_packages[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

deploy/local/broker.sh install
deploy/local/s3-server.sh install
deploy/local/azurite.sh install
deploy/local/k8s-tools.sh install
deploy/local/promtool.sh install
# The outside Delta readers (deltalake, Polars, DuckDB) the tests check the lake with.
deploy/local/delta-readers.sh install

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "prerequisites.sh: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
