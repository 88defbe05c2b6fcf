"""Token Prepending's cost on a GPU: encoding time with and without TP, same prompt, one run.

Models are built with random weights from the published configurations (timing does not depend
on weight values) and read text through a real tokenizer carried to the machine (SmolLM2's; the
vocabulary is sized to it, which only changes the embedding table, and the LM head never runs).
For each model and batch size the harness (``measure_encode_latency``) times PromptEOL without
TP (baseline) and PromptEOL + TP, interleaved, and writes a report per case. It also checks on
the device that removing the patch restores the encoder's outputs bitwise, and how close
batched and one-by-one embeddings are in the model's dtype.

    python benchmarks/gpu_tp_overhead.py --tokenizer DIR --out "$OUT"        # CUDA, < 2 minutes
    python benchmarks/gpu_tp_overhead.py --tokenizer DIR --device cpu --quick --out /tmp/tp-smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_latency import CONFIGS, add_run_arguments, build  # noqa: E402

from tokenlean.attention import SentenceEncoder, TokenPrepending  # noqa: E402
from tokenlean.eval.bench import bench_sentences, make_record, make_variants, measure_encode_latency  # noqa: E402


def consistency(model, tokenizer, method: TokenPrepending, sentences: list[str]) -> dict:
    plain = SentenceEncoder(model, tokenizer, token_prepending=False)
    before = plain.encode(sentences, batch_size=16)
    with_tp = SentenceEncoder(model, tokenizer, token_prepending=method)
    batched = with_tp.encode(sentences, batch_size=16)
    single = torch.stack([with_tp.encode([s])[0] for s in sentences])
    after = plain.encode(sentences, batch_size=16)
    return {
        "restored_bitwise": bool(torch.equal(before, after)),
        "tp_changed_embeddings": not bool(torch.allclose(before, batched)),
        "batched_vs_single_min_cosine": float((batched * single).sum(-1).min()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True, help="folder with a fast tokenizer (tokenizer.json)")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b", "llama-2-7b"],
                        choices=list(CONFIGS))  # fmt: skip
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--sentences", type=int, default=256, help="sentences per encode for batch sizes >= 32"
    )
    parser.add_argument("--small-sentences", type=int, default=64, help="sentences per encode below batch 32")
    add_run_arguments(parser, repeats=10)
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_sizes, args.sentences, args.repeats, args.warmup = (
            ["smollm2-135m"], [8], 16, 2, 1,
        )  # fmt: skip

    from transformers import AutoTokenizer

    from tokenlean._io import atomic_write_json, atomic_write_text
    from tokenlean.eval.report import render_markdown, write_report

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cases": {},
    }
    sentences = bench_sentences("paul-graham-essays", args.sentences)
    for name in args.models:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        model = build(name, device, dtype, vocab_size=len(tokenizer) + 1)
        method = TokenPrepending(start_layer=1, exit_layer=7)
        method.prepare(model, tokenizer)
        summary["cases"][f"{name}/consistency"] = consistency(model, tokenizer, method, sentences[:16])
        variants = make_variants([method])
        for batch in args.batch_sizes:
            n = len(sentences) if batch >= 32 else min(len(sentences), args.small_sentences)
            latency, speedup = measure_encode_latency(
                model, tokenizer, sentences[:n], variants, prompt="prompteol", batch_size=batch,
                repeats=args.repeats, warmup=args.warmup, progress=False,
            )  # fmt: skip
            config = {"workload": "encode", "encode_prompt": "prompteol", "encode_sentences": n,
                      "batch_size": batch, "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype,
                      "weights": "random (real config)", "tokenizer": "smollm2-135m"}  # fmt: skip
            record = make_record(name, model, config, variants, latency, speedup, {})
            folder = out / f"{name}-bs{batch}"
            try:
                write_report(record, folder)
            except ImportError:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_json(folder / "report.json", record)
                atomic_write_text(folder / "report.md", render_markdown(record))
            ratio = speedup["token_prepending"]["encode"]
            base = latency["baseline"]["encode_s"]["median"]
            tp = latency["token_prepending"]["encode_s"]["median"]
            summary["cases"][f"{name}/bs{batch}"] = {
                "sentences": n, "baseline_encode_s": base, "tp_encode_s": tp,
                "overhead_x_median": 1 / ratio["median"], "overhead_x_p25_p75": [1 / ratio["p75"], 1 / ratio["p25"]],
            }  # fmt: skip
            print(name, f"bs{batch}", json.dumps(summary["cases"][f"{name}/bs{batch}"]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary["elapsed_s"] = round(time.time() - started, 1)
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
