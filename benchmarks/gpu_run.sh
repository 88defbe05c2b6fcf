#!/usr/bin/env bash
# One call on a lent GPU machine (torch + transformers present, no network, maybe no setuptools):
# lay the package out under a temporary folder (the same mapping as pyproject's package-dir), then
# run the GPU benches; results under $OUT (one tarball plus the summaries). Under 8 minutes.
#
# Needs .gpu_assets/ (ignored, carried): tokenizer/ (SmolLM2's tokenizer files) and
# home/data/paul-graham-essays/ (a copy of the tokenlean data cache), made by
#   benchmarks/gpu_assets.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
work=$(mktemp -d)
pkg=$work/tokenlean
cp -r src/tokenlean "$pkg"
for sub in compressors attention eval; do cp -r "$sub" "$pkg/$sub"; done
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
export TOKENLEAN_HOME="$PWD/.gpu_assets/home"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
timeout 200 python benchmarks/gpu_tp_overhead.py --tokenizer .gpu_assets/tokenizer --out "$work/tp_overhead" 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/tp_overhead_log.txt"
cp "$work/tp_overhead/summary.json" "$OUT/tp_overhead_summary.json" 2>/dev/null
timeout 270 python benchmarks/gpu_latency.py --out "$work/latency" 2>&1 | tee "$OUT/latency_log.txt"
cp "$work/latency/summary.json" "$OUT/latency_summary.json" 2>/dev/null
tar czf "$OUT/gpu_results.tgz" -C "$work" tp_overhead latency 2>/dev/null
ls -la "$OUT"
