#!/usr/bin/env bash
# One call on a lent GPU machine (torch, transformers present; no network): install tokenlean
# without dependencies, then run the GPU latency bench, results under $OUT. Under 5 minutes.
set -euo pipefail
OUT=${OUT:-runs/gpu}
python -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v "is ignored" || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
timeout 270 python benchmarks/gpu_latency.py --out "$OUT" 2>&1 | tee "$OUT/log.txt"
