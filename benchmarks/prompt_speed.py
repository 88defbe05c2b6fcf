"""Speed of tokenlean's PromptCompressor against llmlingua 0.2.2, same model, same input, one run.

For each repeat (interleaved, so drift hits both libraries alike) it times:

* ``llmlingua``: ``PromptCompressor(..., use_llmlingua2=True).compress_prompt(text, rate=...)``;
* ``tokenlean compat``: ``PromptCompressor(..., llmlingua_compat=True)`` — identical output,
  checked every repeat;
* ``tokenlean default``: the default mode (model special tokens, no padding waste, rate honoured);
* ``tokenlean int8`` (CPU) or ``bf16``/``fp16`` (GPU): the default mode at lower precision, with
  the share of word decisions equal to fp32 and the achieved rate.

Encoder time is measured inside both libraries with forward hooks on the classifier, so
"work around the encoder" = total - encoder. Token-count caches are cleared before every
tokenlean call (cold numbers). Ratios are per-repeat ``llmlingua / tokenlean``, reported as
median [min-max]. Writes ``report.json`` and ``report.md`` to ``--out`` (atomically).

The classifier: ``--model`` is a folder with a 2-label token classifier whose name contains
``bert-base-multilingual-cased`` or ``xlm-roberta-large`` (llmlingua picks its word rule from
the name); ``--build minilm`` makes one from the zoo's minilm-l6 (real weights, seeded head),
``--build mbert-base`` / ``xlmr-large`` a random-weight model of that size from its real
configuration (timings only) with minilm-l6's tokenizer.

    python benchmarks/prompt_speed.py --build minilm --words 21000 --repeats 3 --out benchmarks/results/prompt_speed_cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {
    # hidden, layers, heads, intermediate: the two published LLMLingua-2 encoders
    "mbert-base": (768, 12, 12, 3072),
    "xlmr-large": (1024, 24, 16, 4096),
}


def build_model(kind: str, root: Path, tokenizer: str | None = None) -> Path:
    if kind == "minilm":
        import prompt_fixtures

        return prompt_fixtures.build_bert_classifier(root)
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from tokenlean import zoo

    hidden, layers, heads, inter = SIZES[kind]
    tok = AutoTokenizer.from_pretrained(tokenizer or str(zoo.get_entry("minilm-l6").path))
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, num_labels=2, architectures=["BertForTokenClassification"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    out = root / f"random-{kind}-bert-base-multilingual-cased-clf"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class EncoderClock:
    """Accumulates wall time spent inside a module's forward."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.total = 0.0
        self.device = device
        self._t = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, *_):
        self._sync()
        self._t = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.total += time.perf_counter() - self._t


def text_of_words(n_words: int) -> str:
    from tokenlean.data import load_text

    words = load_text("paul-graham-essays").split(" ")
    while len(words) < n_words:
        words = words + words
    return " ".join(words[:n_words])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="folder of a 2-label token classifier (see above)")
    parser.add_argument("--build", choices=["minilm", *SIZES], default="minilm")
    parser.add_argument("--words", type=int, nargs="+", default=[21000])
    parser.add_argument("--rate", type=float, default=0.33)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --build of a random model")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from llmlingua import PromptCompressor as LLMLingua

    from tokenlean._io import atomic_write_json, atomic_write_text, ensure_writable_dir
    from tokenlean.compressors.prompt.compressor import PromptCompressor
    from tokenlean.compressors.prompt.counting import prepare_tiktoken_cache

    out = Path(args.out)
    ensure_writable_dir(out)
    work = Path(tempfile.mkdtemp(prefix="tokenlean-speed-"))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(work / "tiktoken"))
    prepare_tiktoken_cache(os.environ["TIKTOKEN_CACHE_DIR"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(args.model) if args.model else build_model(args.build, work, args.tokenizer)

    ll = LLMLingua(model_name=str(folder), device_map=device.type, use_llmlingua2=True)
    ll_clock = EncoderClock(ll.model, device)
    compat = PromptCompressor(str(folder), device=device, llmlingua_compat=True)
    default = PromptCompressor(str(folder), device=device, keep_structure=False)
    low_name = "int8" if device.type == "cpu" else "bf16"
    low = PromptCompressor(str(folder), device=device, keep_structure=False, precision=low_name)

    record = {
        "benchmark": "prompt_speed",
        "model": str(folder.name),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rate": args.rate,
        "repeats": args.repeats,
        "inputs": [],
    }
    for n_words in args.words:
        text = text_of_words(n_words)
        ll.compress_prompt(text[:2000], rate=args.rate)  # warm-up both
        compat.compress(text[:2000], rate=args.rate)
        rows: dict[str, dict[str, list[float]]] = {
            k: {"total": [], "encoder": []} for k in ("llmlingua", "compat", "default", low_name)
        }
        identical, agreement, achieved = [], [], {"llmlingua": [], "default": [], low_name: []}
        for _ in range(args.repeats):
            ll_clock.total = 0.0
            t = time.perf_counter()
            ref = ll.compress_prompt(text, rate=args.rate)
            rows["llmlingua"]["total"].append(time.perf_counter() - t)
            rows["llmlingua"]["encoder"].append(ll_clock.total)
            achieved["llmlingua"].append(ref["compressed_tokens"] / ref["origin_tokens"])
            results = {}
            for name, comp in (("compat", compat), ("default", default), (low_name, low)):
                comp.clear_cache()
                t = time.perf_counter()
                results[name] = comp.compress(text, rate=args.rate)
                rows[name]["total"].append(time.perf_counter() - t)
                rows[name]["encoder"].append(comp.last_timings["encoder_s"])
            identical.append(results["compat"].text == ref["compressed_prompt"])
            a = np.array(results["default"].labels)
            b = np.array(results[low_name].labels)
            agreement.append(float((a == b).mean()) if len(a) == len(b) else float("nan"))
            achieved["default"].append(results["default"].rate)
            achieved[low_name].append(results[low_name].rate)
        entry = {
            "words": n_words,
            "origin_tokens": ref["origin_tokens"],
            "identical_output_compat": all(identical),
            f"{low_name}_decisions_equal_to_fp32": spread(agreement),
            "achieved_rate": {k: spread(v) for k, v in achieved.items()},
            "seconds": {},
            "ratios": {},
        }
        for name, r in rows.items():
            around = [t - e for t, e in zip(r["total"], r["encoder"])]
            entry["seconds"][name] = {
                "total": spread(r["total"]),
                "encoder": spread(r["encoder"]),
                "around_encoder": spread(around),
            }
        ll_r = rows["llmlingua"]
        for name in ("compat", "default", low_name):
            r = rows[name]
            entry["ratios"][name] = {
                "total_speedup": spread([a / b for a, b in zip(ll_r["total"], r["total"])]),
                "around_encoder_speedup": spread(
                    [
                        (a - ae) / max(b - be, 1e-9)
                        for a, ae, b, be in zip(ll_r["total"], ll_r["encoder"], r["total"], r["encoder"])
                    ]
                ),
                "encoder_speedup": spread([a / b for a, b in zip(ll_r["encoder"], r["encoder"])]),
                "around_share_of_encoder": spread([(t - e) / e for t, e in zip(r["total"], r["encoder"])]),
            }
        entry["ratios"][f"{low_name}_vs_default_encoder"] = spread(
            [a / b for a, b in zip(rows["default"]["encoder"], rows[low_name]["encoder"])]
        )
        record["inputs"].append(entry)
        print(render_entry(entry, low_name), flush=True)
    atomic_write_json(out / "report.json", record)
    atomic_write_text(out / "report.md", render(record, low_name))
    print(f"report written to {out}/")
    return 0


def _s(stats: dict, unit: str = "s") -> str:
    return f"{stats['median']:.3f}{unit} [{stats['min']:.3f}-{stats['max']:.3f}]"


def _x(stats: dict) -> str:
    return f"{stats['median']:.2f}x [{stats['min']:.2f}-{stats['max']:.2f}]"


def render_entry(e: dict, low: str) -> str:
    lines = [
        f"### {e['words']} words ({e['origin_tokens']} cl100k tokens)",
        "",
        f"compat output identical to llmlingua in every repeat: **{e['identical_output_compat']}**",
        "",
        "| run | total | encoder | around the encoder | total speedup vs llmlingua | around-encoder speedup | around / encoder |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in e["seconds"].items():
        r = e["ratios"].get(name)
        lines.append(
            f"| {name} | {_s(s['total'])} | {_s(s['encoder'])} | {_s(s['around_encoder'])} | "
            + (f"{_x(r['total_speedup'])} | {_x(r['around_encoder_speedup'])} | {_x(r['around_share_of_encoder'])} |"
               if r else "1.00x | 1.00x | - |")
        )  # fmt: skip
    lines += [
        "",
        f"{low} encoder vs fp32 default encoder: {_x(e['ratios'][f'{low}_vs_default_encoder'])}; "
        f"word decisions equal to fp32: {e[f'{low}_decisions_equal_to_fp32']['median']:.4f}",
        "",
        "achieved rate (compressed/original cl100k tokens): "
        + ", ".join(f"{k} {v['median']:.3f}" for k, v in e["achieved_rate"].items()),
        "",
    ]
    return "\n".join(lines)


def render(record: dict, low: str) -> str:
    head = [
        "# Prompt compression speed: tokenlean vs llmlingua 0.2.2",
        "",
        f"Model `{record['model']}` on {record['device']} ({record['cpu_count']} CPUs), torch {record['torch']}, "
        f"rate {record['rate']}, {record['repeats']} interleaved repeats; cells are median [min-max].",
        "",
    ]
    return "\n".join(head + [render_entry(e, low) for e in record["inputs"]])


if __name__ == "__main__":
    raise SystemExit(main())
