#!/usr/bin/env bash
# Landmark attention's quality at the training length and at the model's own context (issue 11, item 5),
# one `tokenlean bench` run on smollm2-135m, baseline interleaved:
#
#   bash benchmarks/landmark_quality.sh               # ~15-25 minutes on 2 CPU cores
#   bash benchmarks/landmark_quality.sh --overwrite   # extra arguments go to `tokenlean bench`
#   WINDOWS_8K=1 UNTRAINED=0 bash benchmarks/landmark_quality.sh   # one 8k window, no untrained variant (~12 min)
#
# Variants: the unpatched smollm2-135m (baseline); `landmark` with the untrained landmark (its row the mean
# embedding row, LoRA-free: what landmarks cost before any training); `landmark:delta=smollm2-135m-landmark`
# (the delta trained by `tokenlean train-landmark`, applied while patched); `landmark:delta=...,landmarks=false`
# (the same delta's LoRA terms with plain attention and no landmarks: the fine-tune's own effect on this
# text, which the trained model's perplexity mixes with the landmarks' cost). Tasks: perplexity on the
# held-out essays (the ten no training command learns from) at 512 text tokens (the training length;
# 16 windows) and at 8,064 (8,192 slots with landmarks: smollm2's context; 2 windows, all the held-out
# text allows). Landmark perplexity counts the text's own tokens only (landmarks are stripped).
# Quality only (--no-latency): on the CPU the landmark variants run the PyTorch reference, whose
# speed says nothing about the fused kernel.
#
# Output: benchmarks/results/landmark_quality_smollm2/ (report.md, report.html, report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
OUT=${OUT:-benchmarks/results/landmark_quality_smollm2}
DELTA=${DELTA:-smollm2-135m-landmark}
set -x
methods=(--method "landmark:delta=$DELTA" --method "landmark:delta=$DELTA,landmarks=false")
[ "${UNTRAINED:-1}" = 1 ] && methods=(--method landmark "${methods[@]}")
"$PYTHON" -m tokenlean bench --model smollm2-135m --threads "${THREADS:-2}" --no-latency "${methods[@]}" \
  --task "perplexity:context_tokens=512,n_windows=16,documents=heldout" \
  --task "perplexity:context_tokens=8064,n_windows=${WINDOWS_8K:-2},documents=heldout" \
  --out "$OUT" "$@"
