"""Long context on a GPU: decode latency and memory against context length, random weights, real configs.

Issue 13's memory/latency curves: full attention (the unpatched model) against the evicting
``sink_window`` (4 sinks + 1,020 recent tokens) and ``block_retrieval`` (64 sinks + the top 4
blocks of 64 per key/value head + a 512-token window, chunked prefill), through the harness's
``long`` workload (prefill, the median of ``new_tokens`` greedy decode steps, the KV cache held,
CUDA peak memory) at 4k-64k tokens. Latency and memory do not depend on weight values, so each model
is built from its published configuration (``gpu_latency.CONFIGS``: SmolLM2-135M, Qwen2.5-0.5B) with
random bf16 weights; its rotary tables are sized for the longest context. The text is the Paul
Graham essays read through SmolLM2's tokenizer (the one carried to the device), whose ids are valid
in both vocabularies. One harness report per model under ``--out``.

    python benchmarks/long_context_gpu.py --tokenizer .gpu_assets/tokenizer --out "$OUT/long"   # CUDA, < 5 min
    python benchmarks/long_context_gpu.py --tokenizer DIR --device cpu --quick --out /tmp/long-smoke

A model whose turn starts after ``--budget`` seconds is skipped (and said so), so the call ends in time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_latency import CONFIGS, build  # noqa: E402

METHODS = ["sink_window:sink_tokens=4,window=1020", "block_retrieval"]
QUICK_METHODS = [
    "sink_window:sink_tokens=4,window=60",
    "block_retrieval:block_size=16,sink_tokens=16,window=32,chunk_size=32,top_k=2",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"], choices=list(CONFIGS)
    )
    parser.add_argument("--lengths", default="4096+8192+16384+32768+65536")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which no new model starts")
    parser.add_argument("--quick", action="store_true", help="tiny lengths and layers, for a CPU smoke test")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from tokenlean.eval import BenchConfig, run_bench
    from tokenlean.eval.long_context import parse_lengths

    lengths = parse_lengths(args.lengths if not args.quick else "128+256", "--lengths")
    methods = QUICK_METHODS if args.quick else METHODS
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary: dict[str, object] = {"lengths": list(lengths), "methods": methods, "models": {}}
    for name in args.models:
        if time.time() - started > args.budget:
            print(f"{name}: skipped, {args.budget:g} s budget spent", flush=True)
            summary["models"][name] = "skipped (time budget)"  # type: ignore[index]
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            continue
        overrides = {
            "max_position_embeddings": max(lengths[-1] + 64, CONFIGS[name]["max_position_embeddings"])
        }
        if args.quick:
            overrides |= {"num_hidden_layers": 2}
        model = build(name, device, dtype, **overrides)
        config = BenchConfig(
            model=f"{name} (random weights, real config)",
            methods=methods,
            tasks=[],
            workload=f"long:lengths={'+'.join(map(str, lengths))},new_tokens={args.new_tokens}",
            repeats=args.repeats,
            warmup=0,
            device=str(device),
        )
        t0 = time.time()
        record = run_bench(
            config, out / name, model=model, tokenizer=tokenizer, overwrite=True, progress=False
        )
        summary["models"][name] = {  # type: ignore[index]
            "seconds": round(time.time() - t0, 1),
            "report": str(out / name / "report.md"),
            "speedup": record.get("speedup"),
        }
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")  # per model
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
