"""The bench runner: baseline and methods measured side by side, in one process, interleaved.

``run_bench`` loads (or takes) a model, then

1. **quality**: for every task example, runs the unpatched baseline and each method on it
   (patch applied and removed around each call), appending one JSON line per (example, variant)
   to ``samples.jsonl``;
2. **latency**: after a warm-up per variant, ``repeats`` rounds in which every variant generates
   once, the order rotating each round so that drift on a noisy machine hits all variants alike,
   appending one line per measurement to ``latency.jsonl``;
3. writes the report (``report.json``, ``report.md``, PNG plots, ``report.html``).

Every line is flushed and fsynced as it is written, so a run interrupted at example 900 of
1000 resumes from what it wrote (a torn last line is discarded); ``run.json`` pins the run's
settings so that a resume with different settings is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenlean._io import atomic_write_json, ensure_writable_dir
from tokenlean.errors import OutputDirError
from tokenlean.methods import Method, make_method, parse_method_spec
from tokenlean.patching import active_patches, patch

from .latency import (
    ENCODE_METRICS,
    ENCODE_SPEEDUPS,
    LATENCY_METRICS,
    SPEEDUP_METRICS,
    measure_encode,
    measure_generation,
    paired_ratios,
    summarize,
)
from .tasks import Task, get_task, text_token_ids

__all__ = [
    "BenchConfig",
    "Variant",
    "bench_sentences",
    "make_record",
    "make_variants",
    "measure_encode_latency",
    "measure_latency",
    "run_bench",
]

RUN_SCHEMA = "tokenlean.run/1"
REPORT_SCHEMA = "tokenlean.report/1"


@dataclass
class BenchConfig:
    """Settings of one bench run (all of them are stored in ``run.json`` and the report).

    Parameters
    ----------
    model
        Zoo name, hub id or local path (or a label when a loaded model is passed to ``run_bench``).
    methods
        Method specs ``"name"`` or ``"name:k=v,..."``; the unpatched baseline is always added first.
    tasks
        Quality tasks, ``"name"`` or ``"name:k=v,..."`` (``perplexity``, ``fidelity``, ``sts_lee``,
        ``sts_wordsim353``, ``sts_simlex999``); empty for latency only.
    latency
        Whether to measure latency.
    workload
        What latency times: ``"generate"`` (prefill + greedy decoding of a prompt cut from
        ``text``) or ``"encode"`` (sentence embeddings of ``encode_sentences`` sentences of
        ``text`` with a :class:`~tokenlean.attention.SentenceEncoder` using ``encode_prompt``,
        ``batch_size`` sentences per batch).
    prompt_tokens, new_tokens, batch_size
        Shape of the timed generation: prompt length, generated tokens, sequences per batch.
    encode_prompt, encode_sentences
        Prompt (``"none"`` for the bare sentence) and number of sentences of the encode workload.
    repeats, warmup
        Timed rounds per variant and untimed warm-up runs per variant.
    context_tokens, n_windows, text
        Quality windows: tokens per window, number of windows, local text they come from.
    dtype, device
        Model dtype (``float32``, ``bfloat16``...) and device (``cpu``, ``cuda``); ``None`` = defaults.
    seed
        Seed set before loading and measuring.
    lm_eval_tasks, lm_eval_limit
        lm-evaluation-harness tasks run through :mod:`tokenlean.eval.lm_eval_bridge` for every
        variant (e.g. ``tokenlean_pg_cloze``; needs ``tokenlean[lmeval]``), and examples per task.
    """

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["perplexity", "fidelity"])
    latency: bool = True
    workload: str = "generate"
    prompt_tokens: int = 512
    new_tokens: int = 32
    batch_size: int = 1
    repeats: int = 5
    warmup: int = 1
    context_tokens: int = 1024
    n_windows: int = 8
    text: str = "paul-graham-essays"
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    encode_prompt: str = "prompteol"
    encode_sentences: int = 128

    def __post_init__(self) -> None:
        if self.workload not in ("generate", "encode"):
            raise ValueError(f"BenchConfig.workload must be 'generate' or 'encode', got {self.workload!r}")
        for name in ("prompt_tokens", "new_tokens", "batch_size", "repeats", "context_tokens", "n_windows",
                     "encode_sentences"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"BenchConfig.warmup must be an integer >= 0, got {self.warmup!r}")
        if self.lm_eval_limit is not None and (
            isinstance(self.lm_eval_limit, bool) or self.lm_eval_limit < 1
        ):
            raise ValueError(
                f"BenchConfig.lm_eval_limit must be a positive integer or None, got {self.lm_eval_limit!r}"
            )
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"BenchConfig.device: {exc}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"BenchConfig.device is {self.device!r} but no CUDA device is available here"
                )
        if not self.latency and not self.tasks and not self.lm_eval_tasks:
            raise ValueError("nothing to measure: latency is off and no task is given")


@dataclass(frozen=True)
class Variant:
    """A measured configuration: the baseline (``method is None``) or one method."""

    name: str
    method: Method | None

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": None if self.method is None else self.method.name,
            "params": {} if self.method is None else self.method.params(),
        }


def make_variants(methods: Sequence[Method | str] | Method | str) -> list[Variant]:
    """Baseline first, then one variant per method or spec (named by method, or by spec when names repeat)."""
    if isinstance(methods, (str, Method)):
        methods = [methods]
    parsed = [parse_method_spec(m) if isinstance(m, str) else make_method(m) for m in methods]
    names = [m.name for m in parsed]
    variants = [Variant("baseline", None)]
    for method in parsed:
        short = method.spec(changed_only=True)
        variants.append(Variant(short if names.count(method.name) > 1 else method.name, method))
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"the same method configuration is given twice: {[m.spec() for m in parsed]}")
    return variants


class _JsonlLog:
    """Append-only JSON-lines file; every line is fsynced, a torn last line is dropped on read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows, good_end = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
        if good_end != len(data):  # interrupted mid-line: cut the torn tail
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def run_bench(
    config: BenchConfig,
    out_dir: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a bench and write its report into ``out_dir``; returns the report record.

    Parameters
    ----------
    config
        What to measure.
    out_dir
        Folder for ``run.json``, ``samples.jsonl``, ``latency.jsonl`` and the report files. If it
        holds an unfinished run with the same settings, the run resumes.
    model, tokenizer
        An already loaded model and tokenizer (otherwise ``config.model`` is loaded from the zoo).
    overwrite
        Discard results of a previous run with different settings in ``out_dir``.
    progress
        Show progress bars.
    """
    from .report import write_report  # matplotlib only when a report is written

    variants = make_variants(config.methods)  # validate every spec before touching the disk
    tasks = [get_task(name, text=config.text, context_tokens=config.context_tokens, n_windows=config.n_windows)
             for name in config.tasks]  # fmt: skip
    torch.manual_seed(config.seed)
    # load before touching the disk: a bad model name, dtype or device leaves nothing behind
    if model is None:
        from tokenlean import zoo

        model, tokenizer = zoo.load(config.model, dtype=config.dtype, device=config.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    if active_patches(model):
        raise ValueError(
            "the model passed to run_bench already carries patches; the baseline must be unpatched"
        )
    model.eval()
    for variant in variants:  # tokenizer-side setup (e.g. a placeholder token) before any patch
        if variant.method is not None:
            variant.method.prepare(model, tokenizer)
    out = ensure_writable_dir(out_dir)
    _claim_run_dir(out, config, overwrite)

    quality = _run_quality(model, tokenizer, tasks, variants, _JsonlLog(out / "samples.jsonl"), progress)
    if config.lm_eval_tasks:
        quality.update(_run_lm_eval(model, tokenizer, config, variants, out / "lm_eval.json", progress))
    latency, speedup = {}, {}
    if config.latency and config.workload == "encode":
        latency, speedup = measure_encode_latency(
            model,
            tokenizer,
            bench_sentences(config.text, config.encode_sentences),
            variants,
            prompt=None if config.encode_prompt.lower() == "none" else config.encode_prompt,
            batch_size=config.batch_size,
            repeats=config.repeats,
            warmup=config.warmup,
            log_path=out / "latency.jsonl",
            progress=progress,
        )
    elif config.latency:
        latency, speedup = measure_latency(
            model,
            _prompt_ids(tokenizer, config, next(model.parameters()).device),
            variants,
            new_tokens=config.new_tokens,
            repeats=config.repeats,
            warmup=config.warmup,
            log_path=out / "latency.jsonl",
            progress=progress,
        )

    record = make_record(config.model, model, dataclasses.asdict(config), variants, latency, speedup, quality)
    write_report(record, out)
    return record


def make_record(
    model_name: str,
    model: torch.nn.Module,
    config: dict[str, Any],
    variants: list[Variant],
    latency: dict[str, Any],
    speedup: dict[str, Any],
    quality: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a ``tokenlean.report/1`` record (see :mod:`tokenlean.eval.report`)."""
    return {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": config.get("seed"),
        "machine": machine_info(),
        "model": _model_info(model_name, model),
        "config": config,
        "variants": [v.record() for v in variants],
        "latency": latency,
        "speedup": speedup,
        "quality": quality,
    }


def _claim_run_dir(out: Path, config: BenchConfig, overwrite: bool) -> None:
    run_file = out / "run.json"
    wanted = {"schema": RUN_SCHEMA, "config": dataclasses.asdict(config)}
    if run_file.exists():
        try:
            existing = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            existing = None
        if isinstance(existing, dict) and isinstance(existing.get("config"), dict):
            # a run written before a setting existed had that setting's default
            defaults = dataclasses.asdict(BenchConfig())
            existing["config"] = {**defaults, **existing["config"]}
        if existing == wanted:
            atomic_write_json(run_file, wanted)  # resume (recording any setting added since)
            return
        if not overwrite:
            raise OutputDirError(
                f"{out} holds results of a different run (see its run.json); "
                "choose another --out folder or pass --overwrite to discard them"
            )
    for stale in ("samples.jsonl", "latency.jsonl", "lm_eval.json"):
        (out / stale).unlink(missing_ok=True)
    atomic_write_json(run_file, wanted)


def _run_quality(
    model, tokenizer, tasks: list[Task], variants: list[Variant], log: _JsonlLog, progress: bool
):
    done = {(r["task"], r["example"], r["variant"]): r["metrics"] for r in log.read()}
    results: dict[str, Any] = {}
    for task in tasks:
        examples = task.examples(tokenizer)
        bar = tqdm(total=len(examples) * len(variants), desc=f"quality: {task.name}", disable=not progress)
        for example in examples:
            pending = [v for v in variants if (task.name, example.id, v.name) not in done]
            bar.update(len(variants) - len(pending))
            if not pending:
                continue
            reference = task.reference(model, example) if task.needs_reference else None
            for variant in pending:
                metrics = _with_variant(model, variant, task.score, model, example, reference)
                log.append(
                    {"task": task.name, "example": example.id, "variant": variant.name, "metrics": metrics}
                )
                done[(task.name, example.id, variant.name)] = metrics
                bar.update(1)
        bar.close()
        ids = [e.id for e in examples]
        results[task.name] = {
            "primary": task.primary,
            "higher_is_better": task.higher_is_better,
            "n_examples": len(examples),
            "config": task.config(),
            "variants": {
                v.name: task.aggregate([done[(task.name, i, v.name)] for i in ids]) for v in variants
            },
        }
    return results


def _run_lm_eval(model, tokenizer, config: BenchConfig, variants: list[Variant], path: Path, progress: bool):
    """lm-eval tasks for every variant; the finished section is kept in ``path`` so a resume skips it."""
    if path.exists():
        return json.loads(path.read_text())
    from .lm_eval_bridge import evaluate, quality_section

    results = evaluate(
        model,
        tokenizer,
        config.lm_eval_tasks,
        methods=[v.method for v in variants[1:]],
        limit=config.lm_eval_limit,
        progress=progress,
    )
    section = quality_section(results)
    atomic_write_json(path, section)
    return section


def bench_sentences(text: str, n: int) -> list[str]:
    """The first ``n`` sentences of 5 to 40 words of the local text ``text`` (the encode workload)."""
    from tokenlean.data import load_text

    sentences = []
    for sentence in re.split(r"(?<=[.!?])\s+", load_text(text)):
        words = sentence.split()
        if 5 <= len(words) <= 40:
            sentences.append(" ".join(words))
            if len(sentences) == n:
                return sentences
    raise ValueError(f"{text!r} has only {len(sentences)} sentences of 5 to 40 words, fewer than {n}")


def _prompt_ids(tokenizer, config: BenchConfig, device: torch.device) -> torch.Tensor:
    """``(batch_size, prompt_tokens)`` prompts cut from the bench text."""
    needed = config.prompt_tokens * config.batch_size
    ids = text_token_ids(tokenizer, config.text)
    if ids.numel() < needed:
        raise ValueError(
            f"{config.text!r} has {ids.numel()} tokens, fewer than the {needed} the prompts need"
        )
    return ids[:needed].view(config.batch_size, config.prompt_tokens).to(device)


def measure_latency(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    variants: list[Variant],
    *,
    new_tokens: int,
    repeats: int,
    warmup: int,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time every variant's generation on ``prompts``, interleaved; returns ``(latency, speedup)`` sections.

    Parameters
    ----------
    model
        The unpatched model; each variant's patch is applied around its own measurements.
    prompts
        ``(batch, prompt_len)`` token ids on the model's device.
    variants
        Baseline first (see :func:`make_variants`).
    new_tokens, repeats, warmup
        Tokens generated per measurement, timed rounds, untimed warm-up runs per variant.
    log_path
        JSON-lines file of finished measurements, appended to and read back to resume.
    progress
        Show progress bars.
    """

    def measure(variant: Variant) -> dict[str, float]:
        return _with_variant(model, variant, measure_generation, model, prompts, new_tokens).as_dict()

    return _interleaved(
        variants, measure, LATENCY_METRICS, SPEEDUP_METRICS, repeats, warmup, log_path, progress
    )


def measure_encode_latency(
    model: torch.nn.Module,
    tokenizer: Any,
    sentences: list[str],
    variants: list[Variant],
    *,
    prompt: str | None = "prompteol",
    batch_size: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time every variant embedding ``sentences`` with a :class:`~tokenlean.attention.SentenceEncoder`.

    The encoder uses ``prompt`` and follows each variant's patch (``token_prepending="auto"``),
    so a Token Prepending variant is timed against the same prompt without it. Rounds are
    interleaved as in :func:`measure_latency`; metrics are :data:`~tokenlean.eval.latency.ENCODE_METRICS`.
    Each variant's method must already be prepared (:meth:`Method.prepare`).
    """
    from tokenlean.attention import SentenceEncoder

    encoder = SentenceEncoder(model, tokenizer, prompt=prompt, token_prepending="auto")

    def measure(variant: Variant) -> dict[str, float]:
        return _with_variant(model, variant, measure_encode, encoder, sentences, batch_size)

    return _interleaved(
        variants, measure, ENCODE_METRICS, ENCODE_SPEEDUPS, repeats, warmup, log_path, progress
    )


def _interleaved(
    variants: list[Variant],
    measure: Any,
    metrics: dict[str, tuple[str, bool]],
    speedups: dict[str, str],
    repeats: int,
    warmup: int,
    log_path: str | os.PathLike[str] | None,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``repeats`` rounds of ``measure(variant)`` over all variants (rotating order) after a warm-up."""
    log = _JsonlLog(Path(log_path)) if log_path is not None else None
    done = {(r["repeat"], r["variant"]): r["sample"] for r in (log.read() if log else [])}

    # each round runs every variant once, starting with a different one, so drift hits all alike
    pending = [(r, v) for r in range(repeats) for v in _rotated(variants, r) if (r, v.name) not in done]
    if pending:
        for variant in tqdm(variants * warmup, desc="latency: warm-up", disable=not progress):
            measure(variant)
        for repeat, variant in tqdm(pending, desc="latency", disable=not progress):
            sample = measure(variant)
            if log:
                log.append({"repeat": repeat, "variant": variant.name, "sample": sample})
            done[(repeat, variant.name)] = sample

    rounds = range(repeats)
    latency = {
        v.name: {m: summarize([done[(r, v.name)][m] for r in rounds]) for m in metrics} for v in variants
    }
    speedup: dict[str, Any] = {}
    for v in variants[1:]:
        speedup[v.name] = {}
        for name, metric in speedups.items():
            ratios = paired_ratios(
                [done[(r, "baseline")][metric] for r in rounds],
                [done[(r, v.name)][metric] for r in rounds],
                higher_is_better=metrics[metric][1],
            )
            stats = summarize(ratios)
            speedup[v.name][name] = {k: stats[k] for k in ("median", "p25", "p75", "n")}
    return latency, speedup


def _rotated(variants: list[Variant], shift: int) -> list[Variant]:
    shift %= len(variants)
    return variants[shift:] + variants[:shift]


def _with_variant(model, variant: Variant, fn, *args):
    """``fn(*args)`` with the variant's patch applied (nothing for the baseline)."""
    if variant.method is None:
        return fn(*args)
    with patch(model, variant.method):
        return fn(*args)


def machine_info() -> dict[str, Any]:
    """Machine and library versions for the report."""
    import numpy
    import transformers

    import tokenlean

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenlean": tokenlean.__version__,
        "numpy": numpy.__version__,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _model_info(name: str, model: torch.nn.Module) -> dict[str, Any]:
    first = next(model.parameters())
    return {
        "name": name,
        "class": type(model).__name__,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
