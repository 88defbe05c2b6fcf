#!/usr/bin/env bash
# Longer, quieter re-measurement of Token Prepending's GPU overhead only (see gpu_run.sh).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
work=$(mktemp -d)
pkg=$work/tokenlean
cp -r src/tokenlean "$pkg"
for sub in compressors attention eval; do cp -r "$sub" "$pkg/$sub"; done
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" TOKENLEAN_HOME="$PWD/.gpu_assets/home" TOKENIZERS_PARALLELISM=false
timeout 330 python benchmarks/gpu_tp_overhead.py --tokenizer .gpu_assets/tokenizer --out "$work/tp_overhead" \
  --repeats 20 --sentences 512 --small-sentences 32 2>&1 | grep -v "Loading weights" | tee "$OUT/tp_overhead_log.txt"
cp "$work/tp_overhead/summary.json" "$OUT/tp_overhead_summary.json" 2>/dev/null
tar czf "$OUT/tp_overhead.tgz" -C "$work" tp_overhead 2>/dev/null
