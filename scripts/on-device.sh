#!/usr/bin/env bash
# Runs a Python module of this checkout on the lent GPU machine, e.g.
#   bash scripts/on-device.sh dusa_cli bench cls -o "$OUT/cls.json"
#   bash scripts/on-device.sh pytest -q tests/test_dusa.py
# That machine has torch, timm, transformers, typer and rich but no package index: the rest comes
# as the wheels `make gpu-wheels` writes to .whl/ here, carried with the call (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/dusa-site  # kept while the machine stays warm
if [ ! -d "$site" ]; then
    [ -d .whl ] || { echo "error: no .whl/ here: run 'make gpu-wheels' and carry .whl" >&2; exit 2; }
    rm -rf "$site.tmp"  # what an install cut off left: pip would keep its stale copies
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site.tmp" .whl/*.whl
    mv "$site.tmp" "$site"
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
exec python3 -m "$@"
