#!/usr/bin/env bash
# The visual-pruning quality report on easyvqa-llava (issue 12, items 3-6), one `tokenlean bench` run:
#
#   bash benchmarks/visual_quality.sh                  # ~15-20 minutes on 2 CPU cores (n = 2000)
#   bash benchmarks/visual_quality.sh --overwrite      # extra arguments go to `tokenlean bench`
#   MODEL=/tmp/tiny-llava N=32 OUT=/tmp/vq bash benchmarks/visual_quality.sh   # dry run, tiny model
#
# Every variant of the table, the unpruned baseline first (it is the 100 % row of every method that
# cannot differ from it there; see below): retain 100 / 50 / 25 / 10 / 5 % for ToDRE
# (criterion max_sum and k_center, stage 2 on and off), FastV, DivPrune, random and pooling; measured on
#
# * vqa: N easy-vqa test questions (a seeded random subset; 16 per left-padded batch), exact match of
#   the greedy answer, by question type, Wilson intervals, visual tokens the decoder saw; the accuracy
#   against retained visual tokens plot;
# * vlm_attention_share: the question's attention share on visual tokens per decoder layer, unpatched
#   model, 64 test prompts; whether ToDRE's stage 2 fires at tau = 0.10;
# * vlm_kept_patches: the patches each method keeps at 10 % on 4 test pictures (a figure);
# * the vision workload (baseline interleaved): CPU prefill, TTFT and decode of one image + question,
#   8 new tokens, 10 timed rounds per variant.
#
# Output: benchmarks/results/visual_quality_easyvqa/ (report.md, report.html, report.json, PNGs).
# An interrupted run resumes from its samples.jsonl when started again with the same settings.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-easyvqa-llava}
N=${N:-2000}
OUT=${OUT:-benchmarks/results/visual_quality_easyvqa}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

# At retain 100 % only ToDRE with stage 2 can differ from the baseline: every other variant keeps every
# token and is bitwise the unpatched model there (tests/test_visual_pruning.py), so the baseline row
# stands for them.
methods=(
  --method "todre:retain_ratio=1.0,criterion=max_sum,stage2=true"
  --method "todre:retain_ratio=1.0,criterion=k_center,stage2=true"
)
for r in 0.5 0.25 0.1 0.05; do
  methods+=(
    --method "todre:retain_ratio=$r,criterion=max_sum,stage2=true"
    --method "todre:retain_ratio=$r,criterion=max_sum,stage2=false"
    --method "todre:retain_ratio=$r,criterion=k_center,stage2=true"
    --method "todre:retain_ratio=$r,criterion=k_center,stage2=false"
    --method "fastv:retain_ratio=$r"
    --method "divprune:retain_ratio=$r"
    --method "random_prune:retain_ratio=$r"
    --method "pool_prune:retain_ratio=$r"
  )
done

set -x
"$PYTHON" -m tokenlean bench --model "$MODEL" --workload vision --new-tokens 8 --repeats 10 --warmup 1 \
  --threads "$THREADS" "${methods[@]}" \
  --task "vqa:n=$N" --task vlm_attention_share --task vlm_kept_patches \
  --out "$OUT" "$@"
