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
grep -qx "/.gpu_assets/" .git/info/exclude 2>/dev/null || echo "/.gpu_assets/" >> .git/info/exclude
du -sh .gpu_assets
