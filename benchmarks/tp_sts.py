"""Token Prepending on real human similarity judgements: Spearman with and without TP.

For each model and prompt, one ``tokenlean bench`` run measures the prompt without TP (the
baseline) and with TP at a sweep of exit layers, on Lee document pairs and WordSim-353 word
pairs (``sts_lee``, ``sts_wordsim353``). A second run per model measures the prompt-free
baselines (mean pooling, last token, echo). The exit layer is chosen on the dev half of each
data set's pairs and reported on the held-out test half.

    python benchmarks/tp_sts.py --out runs/tp_sts                      # smollm2-135m, qwen2.5-0.5b
    python benchmarks/tp_sts.py --models smollm2-135m --prompts prompteol --out runs/tp_quick

Writes ``<out>/<model>/<prompt>/`` bench folders (resumable) and ``<out>/summary.json``,
``summary.md`` and ``exit_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tokenlean import get_adapter, zoo
from tokenlean._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from tokenlean.eval import BenchConfig, run_bench

DATASETS = ("lee", "wordsim353")
PROMPTS = ("prompteol", "pretended_cot", "knowledge")
BASELINES = {  # name -> task options (no prompt, or the echo prompt)
    "mean pooling": "prompt=none,pooling=mean",
    "last token, no prompt": "prompt=none,pooling=last",
    "echo (mean of 2nd copy)": "prompt=echo,pooling=mean",
}


def exit_layers(num_layers: int) -> list[int]:
    """The exit layers swept: the first few layers densely, then a third, half and all of the depth."""
    points = {2, 3, 4, 6, 8, round(num_layers / 3), round(num_layers / 2), num_layers}
    return sorted(p for p in points if 1 < p <= num_layers)


def run_model(
    name: str, prompts: list[str], out: Path, layer: int, exits: list[int] | None
) -> dict[str, Any]:
    model, tokenizer = zoo.load(name)
    depth = get_adapter(model).num_layers(model)
    exits = exits or exit_layers(depth)
    result: dict[str, Any] = {"num_layers": depth, "exit_layers": exits, "prompts": {}, "baselines": {}}

    tasks = [f"sts_{d}:{opts},layer={layer}" for opts in BASELINES.values() for d in DATASETS]
    record = run_bench(
        BenchConfig(model=name, tasks=tasks, latency=False),
        out / name / "baselines",
        model=model,
        tokenizer=tokenizer,
        progress=False,
    )
    for label, opts in BASELINES.items():
        result["baselines"][label] = {
            d: record["quality"][f"sts_{d}:{opts},layer={layer}"]["variants"]["baseline"] for d in DATASETS
        }

    for prompt in prompts:
        tasks = [f"sts_{d}:prompt={prompt},layer={layer}" for d in DATASETS]
        methods = [f"token_prepending:start_layer=1,exit_layer={e}" for e in exits]
        record = run_bench(
            BenchConfig(model=name, tasks=tasks, methods=methods, latency=False),
            out / name / prompt,
            model=model,
            tokenizer=tokenizer,
            progress=False,
        )
        per_dataset = {}
        for d, task in zip(DATASETS, tasks, strict=True):
            variants = record["quality"][task]["variants"]
            sweep = {e: variants[m] for e, m in zip(exits, _variant_names(record), strict=True)}
            best = max(exits, key=lambda e: sweep[e]["spearman_dev"])
            per_dataset[d] = {
                "without_tp": variants["baseline"],
                "sweep": {str(e): s for e, s in sweep.items()},
                "best_exit_on_dev": best,
                "with_tp_at_best": sweep[best],
                "test_delta": sweep[best]["spearman_test"] - variants["baseline"]["spearman_test"],
            }
        result["prompts"][prompt] = per_dataset
        print(f"{name} {prompt}: " + ", ".join(
            f"{d} test {v['without_tp']['spearman_test']:.2f} -> {v['with_tp_at_best']['spearman_test']:.2f} "
            f"(exit {v['best_exit_on_dev']})" for d, v in per_dataset.items()
        ), file=sys.stderr)  # fmt: skip
    return result


def _variant_names(record: dict[str, Any]) -> list[str]:
    return [v["name"] for v in record["variants"][1:]]


def render(summary: dict[str, Any]) -> str:
    lines = [
        "# Token Prepending: Spearman ×100 on human similarity judgements",
        "",
        f"Machine: {summary['machine']}. Readout layer {summary['layer']}, last-token pooling, "
        "TP from layer 1. Pairs are split 50/50 (seed 0) into dev and test; the exit layer is "
        "chosen on dev, and the **test** Spearman is reported.",
        "",
        "## With and without TP (test half)",
        "",
        "| model | prompt | data | without TP | with TP | Δ | exit (of layers) |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for model, res in summary["models"].items():
        for prompt, per in res["prompts"].items():
            for d, v in per.items():
                lines.append(
                    f"| {model} | {prompt} | {d} | {v['without_tp']['spearman_test']:.2f} | "
                    f"{v['with_tp_at_best']['spearman_test']:.2f} | {v['test_delta']:+.2f} | "
                    f"{v['best_exit_on_dev']} ({res['num_layers']}) |"
                )
    lines += ["", "## Baselines without a prompt (all pairs / test half)", ""]
    lines += ["| model | baseline | " + " | ".join(DATASETS) + " |", "|---|---|" + "--:|" * len(DATASETS)]
    for model, res in summary["models"].items():
        for label, per in res["baselines"].items():
            cells = " | ".join(f"{per[d]['spearman']:.2f} / {per[d]['spearman_test']:.2f}" for d in DATASETS)
            lines.append(f"| {model} | {label} | {cells} |")
    lines += ["", "## Exit-layer sweep (all pairs; exit 'none' = without TP)", ""]
    for model, res in summary["models"].items():
        exits = res["exit_layers"]
        lines += [
            f"### {model} ({res['num_layers']} layers)",
            "",
            "| prompt | data | none | " + " | ".join(map(str, exits)) + " |",
            "|---|---|" + "--:|" * (len(exits) + 1),
        ]
        for prompt, per in res["prompts"].items():
            for d, v in per.items():
                cells = " | ".join(f"{v['sweep'][str(e)]['spearman']:.2f}" for e in exits)
                lines.append(f"| {prompt} | {d} | {v['without_tp']['spearman']:.2f} | {cells} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any]) -> bytes | None:
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(summary["models"])
    fig, axes = plt.subplots(len(DATASETS), len(models), figsize=(5 * len(models), 3.6 * len(DATASETS)),
                             squeeze=False)  # fmt: skip
    for col, model in enumerate(models):
        res = summary["models"][model]
        for row, d in enumerate(DATASETS):
            ax = axes[row][col]
            for prompt, per in res["prompts"].items():
                v = per[d]
                line = ax.plot(res["exit_layers"], [v["sweep"][str(e)]["spearman"] for e in res["exit_layers"]],
                               marker="o", label=f"{prompt} + TP")  # fmt: skip
                ax.axhline(v["without_tp"]["spearman"], color=line[0].get_color(), ls="--", lw=1)
            ax.set_title(f"{model}: {d}")
            ax.set_xlabel("TP exit layer (dashed: without TP)")
            ax.set_ylabel("Spearman ×100 (all pairs)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=PROMPTS)
    parser.add_argument("--layer", type=int, default=-2, help="readout layer (default -2)")
    parser.add_argument(
        "--exits", type=int, nargs="+", default=None, help="exit layers to sweep (default: see exit_layers)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from tokenlean.eval.bench import machine_info

    info = machine_info()
    summary: dict[str, Any] = {
        "machine": f"{info['cpu']} ({info['cpu_count']} cores), gpu {info['gpu']}, torch {info['torch']}, "
        f"transformers {info['transformers']}",
        "layer": args.layer,
        "models": {},
    }
    previous = args.out / "summary.json"
    if previous.exists():  # a later run for other models adds to the summary
        earlier = json.loads(previous.read_text())
        if earlier.get("layer") == args.layer:
            summary["models"] = {k: v for k, v in earlier["models"].items() if k not in args.models}
    for name in args.models:
        summary["models"][name] = run_model(name, args.prompts, args.out, args.layer, args.exits)
        atomic_write_json(args.out / "summary.json", summary)  # partial results survive a crash
    atomic_write_text(args.out / "summary.md", render(summary))
    png = plot(summary)
    if png is not None:
        atomic_write_bytes(args.out / "exit_sweep.png", png)
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
