"""GPU latency bench: random-weight models built from real configurations, no network, no weights.

Latency does not depend on weight values, so models built from the published configurations
of SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B time like the real checkpoints. For each model
the unpatched baseline and each method are measured interleaved in one process (CUDA events,
synchronised), and a report (JSON, Markdown, PNG, HTML) is written per model.

Also checks, on the device, that patching and removing restores outputs bitwise.

    python benchmarks/gpu_latency.py --out "$OUT"               # on a CUDA machine, < 5 minutes
    python benchmarks/gpu_latency.py --device cpu --quick --out /tmp/gpu-smoke   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import tokenlean
from tokenlean.eval.bench import make_record, make_variants, measure_latency
from tokenlean.testing import tiny_model

# Published architecture settings (config.json of each checkpoint).
CONFIGS = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True, head_dim=64,
    ),
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}  # fmt: skip
DEFAULT_MODELS = ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"]


def build(name: str, device: torch.device, dtype: torch.dtype, **overrides) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(CONFIGS[name]) | overrides
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def check_reversible(device: torch.device) -> dict:
    """Patch/remove on the device restores logits and generate() bitwise."""
    results = {}
    for family in ("llama", "qwen2", "gemma3"):
        model = tiny_model(family).to(device)
        ids = torch.randint(3, 100, (2, 24), device=device)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
            with tokenlean.patch(model, "sink_window", sink_tokens=1, window=4):
                patched = model(input_ids=ids).logits
            after = model(input_ids=ids).logits
            gen_after = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        results[family] = {
            "bitwise_restored": bool(torch.equal(before, after) and torch.equal(gen, gen_after)),
            "patch_changed_outputs": not bool(torch.allclose(before, patched)),
        }
    return results


def add_run_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options every GPU script shares: repeats, warm-up, device, dtype, --quick."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(CONFIGS))
    parser.add_argument("--method", action="append", default=None, help="method spec (repeatable)")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    add_run_arguments(parser, repeats=5)
    args = parser.parse_args()
    if args.quick:
        args.models, args.prompt_tokens, args.new_tokens, args.repeats, args.warmup = (
            ["smollm2-135m"],
            64,
            4,
            2,
            1,
        )

    from tokenlean._io import atomic_write_json, atomic_write_text
    from tokenlean.eval.report import render_markdown, write_report

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    summary["reversible"] = check_reversible(device)
    print(json.dumps(summary["reversible"]), flush=True)

    methods = args.method or ["sink_window:sink_tokens=4,window=1024"]
    variants = make_variants(methods)
    for name in args.models:
        model = build(name, device, dtype)
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(
            0, CONFIGS[name]["vocab_size"], (args.batch_size, args.prompt_tokens), generator=generator
        )
        latency, speedup = measure_latency(
            model,
            prompts.to(device),
            variants,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
        )
        config = {k: v for k, v in vars(args).items() if k not in ("out", "models")} | {
            "weights": "random (real config)"
        }
        record = make_record(name, model, config, variants, latency, speedup, {})
        try:
            write_report(record, out / name)
        except ImportError as exc:  # a bare GPU box may lack matplotlib: keep the figures anyway
            (out / name).mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / name / "report.json", record)
            atomic_write_text(out / name / "report.md", render_markdown(record))
            print(f"plots skipped ({exc}); wrote report.json and report.md", flush=True)
        print(render_markdown(record).split("## ")[1], flush=True)
        summary[name] = {"speedup": speedup, "elapsed_s": round(time.time() - started, 1)}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ok = all(r["bitwise_restored"] and r["patch_changed_outputs"] for r in summary["reversible"].values())
    print(f"done in {time.time() - started:.0f} s; reversible on device: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
