#!/usr/bin/env bash
# One call on a lent GPU machine (torch + transformers present, no network, maybe no setuptools):
# lay the package out under a temporary folder (the same mapping as pyproject's package-dir), then
# run the GPU latency bench, results under $OUT. Finishes in under 5 minutes.
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
pkg=$(mktemp -d)/tokenlean
cp -r src/tokenlean "$pkg"
for sub in compressors attention eval; do cp -r "$sub" "$pkg/$sub"; done
export PYTHONPATH="$(dirname "$pkg")${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
timeout 270 python benchmarks/gpu_latency.py --out "$OUT" 2>&1 | tee "$OUT/log.txt"
