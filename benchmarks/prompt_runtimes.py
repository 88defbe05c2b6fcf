"""CPU runtimes for the prompt compressor's encoder, side by side: speed against PyTorch fp32 and
keep/drop agreement with it, on the shipped default classifier and on a random-head one.

    python benchmarks/prompt_runtimes.py                      # writes benchmarks/results/prompt_runtimes_cpu/
    python benchmarks/prompt_runtimes.py --rounds 9 --out DIR

For each classifier (the shipped default minilm-l6 compressor; the same MiniLM body with a seeded
random 2-label head, whose decisions sit near ties) and each candidate runtime:

* speed: every round runs every runtime (order rotated each round, one process, warm) on (a) one
  batch of 8 x 512-token windows of real text and (b) one full ``compress`` of a long prompt
  (encoder time only, from ``last_timings``); the speedup is torch-fp32 time / runtime time in
  the same round, reported as the median and min-max over rounds;
* agreement: the share of words whose keep/drop label from ``compress(text, rate=r).labels``
  equals torch fp32's, at r = 0.5 and 0.33, and the rate each run reached;
* max |P(keep) - torch fp32| over the batch's tokens.

Candidates needing a missing package are recorded as skipped. ``runtimes.json`` holds every
figure, the machine (CPU, AMX/VNNI flags, threads, versions) and the precision each OpenVINO model
really ran in; ``README.md`` is generated from it. Both are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "results" / "prompt_runtimes_cpu"
RATES = (0.5, 0.33)
GOAL_SPEEDUP, GOAL_AGREEMENT = 2.0, 0.99

DESCRIPTIONS = {
    "torch-fp32": "PyTorch eager fp32 (the reference)",
    "torch-bf16": "PyTorch eager bf16 (precision='bf16'; oneDNN uses AMX where present)",
    "openvino-fp32": "OpenVINO, fp32 weights, INFERENCE_PRECISION_HINT=f32",
    "openvino-bf16": "OpenVINO, fp32 weights, INFERENCE_PRECISION_HINT=bf16 (AMX)",
    "openvino-w8a8": "OpenVINO, int8 weights (per output channel) + dynamic int8 activations "
    "(group 32, VNNI), rest f32",
    "openvino-w8-bf16": "OpenVINO, int8 weights expanded to bf16, INFERENCE_PRECISION_HINT=bf16 (AMX)",
    "openvino-w8-fp32": "OpenVINO, int8 weights expanded to fp32 (weight-only; what a CPU without "
    "VNNI gets for compute='int8')",
    "openvino-static-int8": "OpenVINO static int8 (nncf.quantize, transformer preset, calibrated on 16 "
    "windows from another part of the corpus), rest f32",
    "ort-fp32": "ONNX Runtime fp32 (legacy exporter, eager attention, BERT optimizer: fused attention)",
    "ort-int8": "ONNX Runtime quantize_dynamic (QInt8 weights per channel, uint8 activations per "
    "tensor) on the fused graph",
    "torchao-int8": "torchao Int8DynamicActivationInt8Weight, eager (torch.compile: see notes)",
}


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    info.setdefault("cpu", platform.processor() or "unknown")
    wanted = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    info["flags"] = {f: f in flags for f in wanted}
    info["logical_cpus"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    versions = {}
    for pkg in ("torch", "transformers", "numpy", "openvino", "nncf", "onnxruntime", "onnx", "torchao"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    with contextlib.suppress(Exception):
        import openvino as ov

        info["openvino_cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    info["loadavg_start"] = os.getloadavg()
    return info


# --------------------------------------------------------------------------- classifiers


def load_classifiers() -> dict[str, Any]:
    from transformers import AutoTokenizer, BertForTokenClassification

    from tokenlean import zoo
    from tokenlean.compressors.prompt.compressor import PromptCompressor

    out = {"default": PromptCompressor("default", device="cpu")}
    src = str(zoo.get_entry("minilm-l6").path)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report about the (intentionally) new head
    try:
        model = BertForTokenClassification.from_pretrained(src, num_labels=2).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    gen = torch.Generator().manual_seed(0)  # as tests/prompt_fixtures.py: a steep seeded head
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(2, model.config.hidden_size, generator=gen) * 0.35)
        model.classifier.bias.zero_()
    out["random-head"] = PromptCompressor(model, tokenizer=AutoTokenizer.from_pretrained(src), device="cpu")
    return out


def windows(tokenizer: Any, text: str, n: int, width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = width - 2
    if len(ids) < n * body:
        raise ValueError("text too short for the batch")
    rows = [
        [tokenizer.cls_token_id, *ids[i * body : (i + 1) * body], tokenizer.sep_token_id] for i in range(n)
    ]
    arr = np.array(rows, dtype=np.int64)
    return arr, np.ones_like(arr, dtype=bool)


# --------------------------------------------------------------------------- candidates


class _OVCompiled:
    """A compiled OpenVINO body + the fp32 numpy head (for the static-int8 candidate)."""

    def __init__(self, name: str, compiled: Any, head_w: np.ndarray, head_b: float, info: dict) -> None:
        self.name, self._request, self._w, self._b, self.info = (
            name,
            compiled.create_infer_request(),
            head_w,
            head_b,
            info,
        )

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        from tokenlean.compressors.prompt.runtime import _sigmoid

        self._request.infer({0: input_ids, 1: attention_mask.astype(np.int64)})
        return _sigmoid(self._request.get_output_tensor(0).data @ self._w + np.float32(self._b))


class _ORT:
    def __init__(self, name: str, path: str, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        self.name, self.info = name, {"onnxruntime": ort.__version__, "threads": threads}
        self._session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask.astype(np.int64)}
        return self._session.run(None, feed)[0].astype(np.float32, copy=False)


class _Probs(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(input_ids=input_ids, attention_mask=attention_mask).logits, dim=-1)[
            ..., 1
        ]


@contextlib.contextmanager
def _quiet():
    """Silence what converters print on stdout/stderr and warn (not the benchmark's own output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _ort_files(model: torch.nn.Module, tmp: str) -> tuple[str, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # the BERT optimizer fuses the eager attention pattern
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    raw, fused, quant = (os.path.join(tmp, n) for n in ("raw.onnx", "fused.onnx", "int8.onnx"))
    axes = {"input_ids": {0: "b", 1: "w"}, "attention_mask": {0: "b", 1: "w"}, "p": {0: "b", 1: "w"}}
    torch.onnx.export(
        _Probs(eager).eval(), (ids, mask), raw, input_names=["input_ids", "attention_mask"],
        output_names=["p"], dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip
    cfg = model.config
    opt = optimize_model(
        raw, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size
    )
    opt.save_model_to_file(fused)
    quantize_dynamic(
        fused, quant, weight_type=QuantType.QInt8, per_channel=True, extra_options={"DefaultTensorType": 1}
    )
    return fused, quant


def _static_int8(model: torch.nn.Module, calib: list[tuple[np.ndarray, np.ndarray]], threads: int) -> Any:
    import nncf
    import openvino as ov

    from tokenlean.compressors.prompt.runtime import OpenVINORuntime, _split_head

    nncf.set_log_level(logging.ERROR)
    module, head_w, head_b = _split_head(model)
    ov_model = OpenVINORuntime._convert(ov, copy.deepcopy(module))
    data = nncf.Dataset([{"input_ids": i, "attention_mask": m.astype(np.int64)} for i, m in calib])
    quantized = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    config = {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "PERFORMANCE",
    }  # fmt: skip
    compiled = ov.Core().compile_model(quantized, "CPU", config)
    info = {"inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}
    return _OVCompiled("openvino-static-int8", compiled, head_w, head_b, info)


def build_candidates(
    model: torch.nn.Module, calib: list[tuple[np.ndarray, np.ndarray]], skip: set[str]
) -> tuple[dict[str, Any], dict[str, str], dict[str, float]]:
    """name -> runtime; name -> why skipped; name -> build seconds."""
    from tokenlean.compressors.prompt.runtime import OpenVINORuntime, TorchRuntime

    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    makers: dict[str, Callable[[], Any]] = {
        "torch-fp32": lambda: TorchRuntime(model, "fp32", cpu),
        "torch-bf16": lambda: TorchRuntime(copy.deepcopy(model), "bf16", cpu),
        "openvino-fp32": lambda: OpenVINORuntime(model, weights="fp32", compute="fp32"),
        "openvino-bf16": lambda: OpenVINORuntime(model, weights="fp32", compute="bf16"),
        "openvino-w8a8": lambda: OpenVINORuntime(model, weights="int8", compute="int8"),
        "openvino-w8-bf16": lambda: OpenVINORuntime(model, weights="int8", compute="bf16"),
        "openvino-w8-fp32": lambda: OpenVINORuntime(model, weights="int8", compute="fp32"),
        "openvino-static-int8": lambda: _static_int8(model, calib, threads),
    }
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    build_s: dict[str, float] = {}
    for name, make in makers.items():
        if name in skip:
            skipped[name] = "--skip"
            continue
        start = time.perf_counter()
        try:
            with _quiet():
                out[name] = make()
        except ImportError as exc:
            skipped[name] = f"not installed: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - a candidate that fails is reported, not fatal
            if name == "torch-fp32":
                raise
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        build_s[name] = time.perf_counter() - start
    if not {"ort-fp32", "ort-int8"} <= skip:
        start = time.perf_counter()
        try:
            tmp = tempfile.mkdtemp(prefix="tokenlean-ort-")
            with _quiet():
                fused, quant = _ort_files(model, tmp)
            for name, path in (("ort-fp32", fused), ("ort-int8", quant)):
                if name not in skip:
                    out[name] = _ORT(name, path, threads)
                    build_s[name] = time.perf_counter() - start
        except ImportError as exc:
            skipped.update({n: f"not installed: {exc}" for n in ("ort-fp32", "ort-int8") if n not in skip})
        except Exception as exc:  # noqa: BLE001
            skipped.update({n: f"failed: {type(exc).__name__}: {exc}" for n in ("ort-fp32", "ort-int8")})
    if "torchao-int8" not in skip:
        start = time.perf_counter()
        try:
            with _quiet():
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

                quantized = copy.deepcopy(model)
                quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
            rt = TorchRuntime(quantized, "fp32", cpu)
            rt.name = "torchao-int8"
            out["torchao-int8"] = rt
            build_s["torchao-int8"] = time.perf_counter() - start
        except ImportError as exc:
            skipped["torchao-int8"] = f"not installed: {exc}"
        except Exception as exc:  # noqa: BLE001
            skipped["torchao-int8"] = f"failed: {type(exc).__name__}: {exc}"
    return out, skipped, build_s


# --------------------------------------------------------------------------- measuring


def measure(
    pc: Any,
    runtimes: dict[str, Any],
    batch: tuple[np.ndarray, np.ndarray],
    long_text: str,
    agree_text: str,
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    names = list(runtimes)
    ids, mask = batch
    reference = pc.runtime

    def encoder_compress(rt: Any) -> float:
        pc.runtime = rt
        try:
            pc.compress(long_text, rate=0.33)
            return pc.last_timings["encoder_s"]
        finally:
            pc.runtime = reference

    probs = {}
    for name in names:  # warm-up: first calls build shape-specific kernels
        probs[name] = runtimes[name](ids, mask)
        encoder_compress(runtimes[name])
    t_batch: dict[str, list[float]] = {n: [] for n in names}
    t_comp: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            runtimes[name](ids, mask)
            t_batch[name].append(time.perf_counter() - start)
            t_comp[name].append(encoder_compress(runtimes[name]))
        log(f"    round {r + 1}/{rounds}: torch-fp32 batch {t_batch['torch-fp32'][-1]:.2f}s")

    labels: dict[str, dict[float, tuple[np.ndarray, float]]] = {}
    word_p: dict[str, np.ndarray] = {}
    for name in names:
        pc.runtime = runtimes[name]
        try:
            labels[name] = {}
            for rate in RATES:
                res = pc.compress(agree_text, rate=rate)
                labels[name][rate] = (np.asarray(res.labels), float(res.rate))
            word_p[name] = pc.word_probs(agree_text)[1]
        finally:
            pc.runtime = reference

    def spread(base: list[float], mine: list[float]) -> dict[str, float]:
        ratios = [b / m for b, m in zip(base, mine)]
        return {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "seconds_median": statistics.median(mine),
        }

    out = {}
    ref = labels["torch-fp32"]
    for name in names:
        out[name] = {
            "speedup_batch": spread(t_batch["torch-fp32"], t_batch[name]),
            "speedup_compress": spread(t_comp["torch-fp32"], t_comp[name]),
            "agreement": {str(r): float((labels[name][r][0] == ref[r][0]).mean()) for r in RATES},
            "rate": {str(r): labels[name][r][1] for r in RATES},
            "ranking_agreement": {
                str(r): float((_top(word_p[name], r) == _top(word_p["torch-fp32"], r)).mean()) for r in RATES
            },
            "mean_abs_dp_words": float(np.abs(word_p[name] - word_p["torch-fp32"]).mean()),
            "words": int(len(ref[RATES[0]][0])),
            "max_abs_dp": float(np.abs(probs[name] - probs["torch-fp32"])[mask].max()),
        }
    return out


def _top(p: np.ndarray, rate: float) -> np.ndarray:
    """The plain LLMLingua-2 decision: keep the round(rate * n) most probable words."""
    keep = np.zeros(len(p), dtype=bool)
    keep[np.argsort(-p, kind="stable")[: int(round(rate * len(p)))]] = True
    return keep


# --------------------------------------------------------------------------- report


def render(record: dict[str, Any]) -> str:
    m = record["machine"]
    s = record["settings"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items())
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "# CPU runtimes for the prompt compressor's encoder",
        "",
        f"Generated by `benchmarks/prompt_runtimes.py` on {record['date']} (from `runtimes.json`; "
        "do not edit by hand).",
        "",
        f"**Machine:** {m['cpu']}; {m['logical_cpus']} logical CPUs, {m['torch_threads']} threads; "
        f"{flags}. Load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}, "
        f"at end {tuple(round(x, 2) for x in record['loadavg_end'])} (a shared machine: the speedups are "
        "same-round ratios, so they hold up better than the seconds).",
        f"**Versions:** {versions}.",
        "",
        f"**Workloads:** speed = one batch of {s['batch'][0]} x {s['batch'][1]}-token windows, and the "
        f"encoder time of one full `compress` of a {s['long_prompt_words']}-word prompt (rate 0.33); "
        f"{s['rounds']} interleaved rounds in rotating order, speedup = torch-fp32 time / runtime time "
        "in the same round, median [min-max]. Agreement = share of the "
        f"{s['agreement_words']} words of another {s['agreement_chars']}-character text whose "
        "keep/drop label from `compress(text, rate=r).labels` equals torch fp32's (labels agree); "
        "ranking agree = the same for the plain decision 'keep the round(r x n) words of highest "
        "P(keep)' from `word_probs` (no force rules, no budget search: the runtime's own effect). "
        "Max abs dP = largest P(keep) difference over the batch's tokens.",
        "",
        f"**`precision='int8'` on this machine builds:** `{record['chosen']}` "
        f"(`compute='auto'`; CPU features seen: {record['chosen_info'].get('cpu')}).",
        "",
    ]
    for cls in record["classifiers"]:
        rows = record["results"][cls]
        lines += [
            f"## {cls} classifier",
            "",
            "| runtime | speedup, 8x512 batch | speedup, full compress (encoder) | labels agree @0.5 | "
            "labels agree @0.33 | ranking agree @0.5 | ranking agree @0.33 | rate @0.33 | max abs dP | runs in |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            b, c = r["speedup_batch"], r["speedup_compress"]
            mark = " **(int8 default)**" if name == record["chosen"] else ""
            prec = record["candidates"].get(name, {}).get("inference_precision", "")
            lines.append(
                f"| {name}{mark} | {b['median']:.2f}x [{b['min']:.2f}-{b['max']:.2f}] "
                f"({b['seconds_median']:.2f}s) | {c['median']:.2f}x [{c['min']:.2f}-{c['max']:.2f}] "
                f"({c['seconds_median']:.2f}s) | {100 * r['agreement']['0.5']:.2f}% | "
                f"{100 * r['agreement']['0.33']:.2f}% | {100 * r['ranking_agreement']['0.5']:.2f}% | "
                f"{100 * r['ranking_agreement']['0.33']:.2f}% | {r['rate']['0.33']:.3f} | "
                f"{r['max_abs_dp']:.4f} | {prec} |"
            )
        lines.append("")
    lines += ["## Candidates", ""]
    for name, desc in DESCRIPTIONS.items():
        cand = record["candidates"].get(name)
        if cand is None:
            why = record["skipped"].get(name, "not run")
            lines.append(f"* `{name}`: {desc}. Skipped: {why}.")
        else:
            lines.append(f"* `{name}`: {desc}. Build {cand['build_s']:.1f}s.")
    goal = record["goal"]
    passing = ", ".join(f"`{n}`" for n in record["meets_goal"]) or "none"
    lines += [
        "",
        "## Goal check",
        "",
        f"`{record['chosen']}` (what `precision='int8'` builds here): encoder "
        f"{goal['speedup_batch']:.2f}x (batch) / {goal['speedup_compress']:.2f}x (full compress) vs torch "
        f"fp32 (goal >= {GOAL_SPEEDUP}x); agreement on the default classifier "
        f"{100 * goal['agreement_default']:.2f}% of labels, {100 * goal['ranking_default']:.2f}% of the "
        f"ranking decisions (goal >= {100 * GOAL_AGREEMENT:.0f}%); on the random head "
        f"{100 * goal['agreement_random']:.2f}% / {100 * goal['ranking_random']:.2f}%; rate reached "
        f"{goal['rate']:.3f} for 0.33. Worst over rates 0.5 and 0.33.",
        "",
        f"Runtimes with both speedup medians >= {GOAL_SPEEDUP}x and ranking agreement >= "
        f"{100 * GOAL_AGREEMENT:.0f}% on the default classifier: {passing}.",
        "",
        "## Notes",
        "",
        *[f"* {n}" for n in record["notes"]],
        "",
    ]
    return "\n".join(lines)


NOTES = [
    "Labels vs ranking agreement: the compressor's budget search (`_select` in compressor.py) keeps "
    "the words that cost no tokens in context (the apostrophe of a contraction under cl100k, about 4% "
    "of this text's words) all together whenever some budget is left over, and drops them all "
    "otherwise; a tiny change in P(keep) can flip that, moving ~7% of the labels at once. Such a "
    "flip shows as labels agreement near 93% with ranking agreement above 99%.",
    "Every OpenVINO candidate sets INFERENCE_PRECISION_HINT explicitly; the 'runs in' column is the "
    "precision the compiled model reports. Left unset, OpenVINO runs fp32 models in bf16 on AMX CPUs.",
    "The OpenVINO candidates compute the 2-label head in fp32 NumPy on the encoder's last hidden "
    "state, so P(keep) has full resolution even when the encoder runs in bf16 (a bf16 head gives "
    "many exact ties in the ranking).",
    "openvino-w8a8 is the only candidate doing int8 arithmetic in every linear layer: OpenVINO's dynamic "
    "quantisation kernel uses VNNI dot products, not AMX tiles, so on an AMX CPU the bf16 tiles beat it. "
    "Without VNNI OpenVINO expands the int8 weights instead (openvino-w8-fp32's speed).",
    "What the figures depend on: with AMX, the bf16 paths (torch-bf16, openvino-bf16, openvino-w8-bf16) "
    "run on the tiles, and PyTorch's own bf16 (precision='bf16', oneDNN) is as fast as OpenVINO's; on a "
    "CPU with VNNI but no AMX, compute='auto' picks int8 activations (the openvino-w8a8 row) and bf16 "
    "is slow or emulated; on AVX2 without VNNI OpenVINO expands the int8 weights (the openvino-w8-fp32 "
    "row, about fp32 speed). The torch fp32 baseline is AVX-512 here, faster per core than on AVX2.",
    "OpenVINO 2025.1 and 2025.2 return NaN for the full rows of a batch that also holds padded rows; "
    "the runtime refuses openvino < 2025.3.",
    "torchao's int8 path under torch.compile was measured by hand, not by this script: about 1.3x "
    "after a 72 s first compile on this machine, recompiling for new batch shapes; torchao 0.18 "
    "prints C-extension load failures on import (it is run here only when importable).",
    "ONNX Runtime's dynamic quantisation uses one activation scale per tensor, hence its larger "
    "probability error.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--long-chars", type=int, default=16_000, help="length of the long prompt")
    parser.add_argument("--agree-chars", type=int, default=40_000, help="length of the agreement text")
    parser.add_argument("--skip", nargs="*", default=[], help="candidate names to leave out")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be positive")

    from tokenlean._io import atomic_write_json, atomic_write_text
    from tokenlean.compressors.prompt.runtime import OpenVINORuntime, cpu_features
    from tokenlean.data import load_text

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    corpus = load_text("paul-graham-essays")
    long_text = corpus[: args.long_chars]
    agree_text = corpus[100_000 : 100_000 + args.agree_chars]
    batch_text = corpus[200_000:300_000]
    calib_text = corpus[300_000:400_000]
    log(f"machine: {info['cpu']}, flags {info['flags']}, {info['torch_threads']} threads")
    classifiers = load_classifiers()

    record: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "batch": [8, 512],
            "long_prompt_chars": len(long_text),
            "agreement_chars": len(agree_text),
            "rates": list(RATES),
        },
        "classifiers": list(classifiers),
        "candidates": {},
        "skipped": {},
        "results": {},
        "notes": NOTES,
    }
    compute = OpenVINORuntime.resolve_compute("auto", "int8")
    record["chosen"] = OpenVINORuntime.runtime_name("int8", compute)
    record["chosen_info"] = {"compute": compute, "cpu": cpu_features()}
    skip = set(args.skip)
    for cls, pc in classifiers.items():
        log(f"{cls}: building candidates")
        batch = windows(pc.tokenizer, batch_text, 8)
        ids, _ = windows(pc.tokenizer, calib_text, 16)
        calib = [(ids[i : i + 1], np.ones((1, ids.shape[1]), bool)) for i in range(len(ids))]
        runtimes, skipped, build_s = build_candidates(pc.model, calib, skip)
        record["skipped"].update(skipped)
        for name, rt in runtimes.items():
            entry = record["candidates"].setdefault(name, {"description": DESCRIPTIONS.get(name, "")})
            entry.setdefault("build_s", build_s.get(name, 0.0))
            rt_info = getattr(rt, "info", {}) or {}
            if "inference_precision" in rt_info:
                entry["inference_precision"] = rt_info["inference_precision"]
            if "dynamic_quantization_group_size" in rt_info:
                entry["dynamic_quantization_group_size"] = rt_info["dynamic_quantization_group_size"]
        log(f"{cls}: {len(runtimes)} runtimes, {args.rounds} rounds")
        record["results"][cls] = measure(pc, runtimes, batch, long_text, agree_text, args.rounds, log)
        words = record["results"][cls]["torch-fp32"]["words"]
        record["settings"]["agreement_words"] = words
        record["settings"]["long_prompt_words"] = len(long_text.split())
        atomic_write_json(args.out / "runtimes.json", record)  # partial results survive a crash
        del runtimes

    chosen_rows = {cls: record["results"][cls].get(record["chosen"]) for cls in classifiers}
    d, rnd = chosen_rows["default"], chosen_rows["random-head"]
    record["goal"] = {
        "runtime": record["chosen"],
        "speedup_batch": d["speedup_batch"]["median"],
        "speedup_compress": d["speedup_compress"]["median"],
        "agreement_default": min(d["agreement"].values()),
        "agreement_random": min(rnd["agreement"].values()),
        "ranking_default": min(d["ranking_agreement"].values()),
        "ranking_random": min(rnd["ranking_agreement"].values()),
        "rate": d["rate"]["0.33"],
        "met": d["speedup_batch"]["median"] >= GOAL_SPEEDUP
        and d["speedup_compress"]["median"] >= GOAL_SPEEDUP
        and min(d["agreement"].values()) >= GOAL_AGREEMENT,
    }
    record["meets_goal"] = [
        name
        for name, r in record["results"]["default"].items()
        if name != "torch-fp32"
        and r["speedup_batch"]["median"] >= GOAL_SPEEDUP
        and r["speedup_compress"]["median"] >= GOAL_SPEEDUP
        and min(r["ranking_agreement"].values()) >= GOAL_AGREEMENT
    ]
    record["loadavg_end"] = os.getloadavg()
    record["elapsed_s"] = round(time.perf_counter() - began, 1)
    atomic_write_json(args.out / "runtimes.json", record)
    atomic_write_text(args.out / "README.md", render(record))
    log(f"wrote {args.out} in {record['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
