"""The one runner: every variant measured side by side, in one process, interleaved.

``run_bench`` loads (or takes) a model and builds the variants — the unpatched baseline, model
patches (:class:`~tokenlean.methods.Method`) and prompt compressors at their rates (see
:mod:`tokenlean.eval.variants`), then

1. **quality**: every task (:mod:`tokenlean.eval.tasks`) runs its examples on every variant it
   measures, appending one JSON line per (example, variant) to ``samples.jsonl``;
2. **lm-eval**: lm-evaluation-harness tasks for every variant (:mod:`tokenlean.eval.lm_eval_bridge`),
   one line per finished variant in ``lm_eval.jsonl``; data-parallel under ``accelerate launch``;
3. **latency**: the workload (:mod:`tokenlean.eval.workloads`) times every variant it can: a
   warm-up per variant, then ``repeats`` rounds in which every variant runs once, the order
   rotating each round so that drift on a noisy machine hits all alike; ratios are paired per
   round against the reference variant; one line per measurement in ``latency.jsonl``;
4. writes one record (``tokenlean.report/2``) and the report (``report.json``, ``report.md``,
   PNG plots, ``report.html``) through :mod:`tokenlean.eval.report`.

Every line is flushed and fsynced as it is written, so a run interrupted at example 900 of
1000 resumes from what it wrote (a torn last line is discarded); ``run.json`` pins the run's
settings so that a resume with different settings is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tokenlean._io import JsonlLog, atomic_write_json, ensure_writable_dir
from tokenlean.errors import EvalError, OutputDirError
from tokenlean.patching import active_patches

from .context import BenchContext
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
from .tasks import Task, get_task
from .variants import CompressorPool, Variant, make_variants
from .workloads import Workload, bench_sentences, get_workload, get_workload_class, parse_workload_spec

__all__ = [
    "BenchConfig",
    "Variant",
    "bench_sentences",
    "interleaved_rounds",
    "make_record",
    "make_variants",
    "measure_encode_latency",
    "measure_latency",
    "run_bench",
]

RUN_SCHEMA = "tokenlean.run/1"
REPORT_SCHEMA = "tokenlean.report/2"
#: Tasks run when none are given: by the kinds of variants in the run.
DEFAULT_PATCH_TASKS = ("perplexity", "fidelity")
DEFAULT_COMPRESSOR_TASKS = ("needle",)
#: ... and for a vision-language model measured on the vision workload (text tasks need a tokenizer).
DEFAULT_VISION_TASKS = ("vlm_fidelity",)
#: ``BenchConfig.model`` for a run without a language model (compressors on text tasks only).
NO_MODEL = "none"


@dataclass
class BenchConfig:
    """Settings of one bench run (all of them are stored in ``run.json`` and the report).

    Parameters
    ----------
    model
        Zoo name, hub id or local path (or a label when a loaded model is passed to ``run_bench``);
        ``"none"`` for no language model: prompt compressors on text tasks (needle, teacher) and
        the ``compress`` workload only.
    methods
        Model patches, ``"name"`` or ``"name:k=v,..."``; the unpatched baseline is always first.
    compressors, rates
        Prompt compressors (``"default"``, ``"random"``, ``"selective_context"``,
        ``"llmlingua:<folder>"``...; see :mod:`tokenlean.eval.variants`), each measured at every
        rate (fraction of tokens kept; default 0.5). A rate without a compressor is an error.
    tasks
        Quality tasks, ``"name"`` or ``"name:k=v,..."`` (``perplexity``, ``fidelity``, ``sts_lee``,
        ``needle``, ``bbh``, ``teacher``, ``vlm_fidelity``...); ``None`` picks by the variants
        (perplexity and fidelity for patches, needle for compressors) or, with the ``vision``
        workload, ``vlm_fidelity``; empty for latency only.
    latency
        Whether to time the workload.
    workload
        What latency times, ``"name"`` or ``"name:k=v,..."``: ``generate`` (prefill + greedy
        decoding of a prompt cut from ``text``), ``encode`` (sentence embeddings of
        ``encode_sentences`` sentences with ``encode_prompt``) or ``compress`` (the compressors on
        one long text, ``compress:words=21000,reference=llmlingua:<folder>``) or ``vision``
        (image + question prompts of a vision-language model: prefill, TTFT, decode and the
        visual tokens the decoder saw).
    prompt_tokens, new_tokens, batch_size
        Shape of the timed generation: prompt length, generated tokens, sequences per batch
        (sentences per batch for ``encode``).
    encode_prompt, encode_sentences
        Prompt (``"none"`` for the bare sentence) and number of sentences of the encode workload.
    repeats, warmup
        Timed rounds per variant and untimed warm-up runs per variant.
    context_tokens, n_windows, text
        Quality windows: tokens per window, number of windows, local text they come from.
    dtype, device, device_map
        Model dtype (``float32``, ``bfloat16``...) and device (``cpu``, ``cuda``); or
        ``device_map="auto"`` to let accelerate place a model too big for one device.
    seed
        Seed set before loading and measuring.
    lm_eval_tasks, lm_eval_limit
        lm-evaluation-harness tasks run for every variant (e.g. ``tokenlean_bbh_date_understanding``,
        ``tokenlean_passkey_1k``; needs ``tokenlean[lmeval]``), and documents per task.
    """

    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=list)
    compressors: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    tasks: list[str] | None = None
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
    device_map: str | None = None
    seed: int = 0
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    encode_prompt: str = "prompteol"
    encode_sentences: int = 128

    def __post_init__(self) -> None:
        self.methods, self.compressors = list(self.methods), list(self.compressors)
        self.rates = [float(r) if isinstance(r, int) and not isinstance(r, bool) else r for r in self.rates]
        parse_workload_spec(self.workload)  # an unknown workload or option fails here
        for name in ("prompt_tokens", "new_tokens", "batch_size", "repeats", "context_tokens", "n_windows",
                     "encode_sentences"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"BenchConfig.warmup must be an integer >= 0, got {self.warmup!r}")
        if self.lm_eval_limit is not None and (
            isinstance(self.lm_eval_limit, bool)
            or not isinstance(self.lm_eval_limit, int)
            or self.lm_eval_limit < 1
        ):
            raise ValueError(
                f"BenchConfig.lm_eval_limit must be a positive integer or None, got {self.lm_eval_limit!r}"
            )
        if self.device_map not in (None, "auto"):
            raise ValueError(f"BenchConfig.device_map must be None or 'auto', got {self.device_map!r}")
        if self.device_map is not None and self.device is not None:
            raise ValueError("give either device or device_map='auto', not both")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"BenchConfig.device: {exc}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"BenchConfig.device is {self.device!r} but no CUDA device is available here"
                )
        if self.tasks is None:
            tasks: list[str] = []
            if parse_workload_spec(self.workload)[0] == "vision":
                tasks += DEFAULT_VISION_TASKS
            elif self.methods or not self.compressors:
                tasks += DEFAULT_PATCH_TASKS
            if self.compressors:
                tasks += DEFAULT_COMPRESSOR_TASKS
            self.tasks = tasks
        self.tasks = list(self.tasks)
        if not self.latency and not self.tasks and not self.lm_eval_tasks:
            raise ValueError("nothing to measure: latency is off and no task is given")

    def variants(self) -> list[Variant]:
        """The run's variants, baseline first (checked: bad specs and rates raise here)."""
        return make_variants(self.methods, self.compressors, self.rates)


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
        Folder for ``run.json``, ``samples.jsonl``, ``latency.jsonl``, ``lm_eval.jsonl`` and the
        report files. If it holds an unfinished run with the same settings, the run resumes.
    model, tokenizer
        An already loaded model and tokenizer (otherwise ``config.model`` is loaded from the zoo).
    overwrite
        Discard results of a previous run with different settings in ``out_dir``.
    progress
        Show progress bars.

    Under ``accelerate launch`` with several processes only lm-eval tasks may run (they are
    split data-parallel); process 0 writes the folder and returns the record, the others
    return ``{}``.
    """
    from .report import write_report  # matplotlib only when a report is written

    variants = config.variants()  # validate every spec before touching the disk
    tasks = [get_task(name, text=config.text, context_tokens=config.context_tokens, n_windows=config.n_windows)
             for name in config.tasks]  # fmt: skip
    rank, world = _distributed_rank(config)
    if world > 1 and (config.tasks or config.latency):
        raise EvalError(
            "with several processes (accelerate launch) only lm-eval tasks run, split across them: "
            "use `tokenlean eval` (or --no-latency and only --lm-eval-task)"
        )
    without_model = model is None and config.model == NO_MODEL
    if without_model:
        _check_runs_without_model(config, variants, tasks)
    torch.manual_seed(config.seed)
    # load before touching the disk: a bad model name, dtype or device leaves nothing behind
    if model is None and not without_model:
        from tokenlean import zoo

        device = config.device
        if world > 1 and device is None and config.device_map is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"  # one GPU per process
        model, tokenizer = zoo.load(
            config.model, dtype=config.dtype, device=device, device_map=config.device_map
        )
    elif model is not None and tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    if model is not None and active_patches(model):
        raise ValueError(
            "the model passed to run_bench already carries patches; the baseline must be unpatched"
        )
    if model is not None:
        model.eval()
    for variant in variants:  # tokenizer-side setup (e.g. a placeholder token) before any patch
        for method in variant.methods:
            method.prepare(model, tokenizer)
    out = Path(out_dir)
    failure: BaseException | None = None
    if rank == 0:
        try:
            out = ensure_writable_dir(out_dir)
            _claim_run_dir(out, config, overwrite)
        except (OutputDirError, OSError) as exc:
            failure = exc
    # every process learns whether process 0 could claim the folder (none waits for a dead peer)
    message = _broadcast(None if failure is None else str(failure), world)
    if failure is not None:
        raise failure
    if message is not None:
        raise OutputDirError(message)

    pool = CompressorPool(shared_models={} if model is None else {config.model: (model, tokenizer)})
    bench = BenchContext(model, tokenizer, config.model, pool, seed=config.seed, text=config.text)
    samples = JsonlLog(out / "samples.jsonl")
    quality = _run_quality(bench, tasks, variants, samples, progress)
    if config.lm_eval_tasks:
        section = _run_lm_eval(bench, config, variants, out / "lm_eval.jsonl", progress)
        if rank != 0:
            return {}
        quality.update(section)
    latency: dict[str, Any] = {}
    speedup: dict[str, Any] = {}
    workload_info: dict[str, Any] = {"name": parse_workload_spec(config.workload)[0]}
    latency_rows: list[dict[str, Any]] = []
    if config.latency:
        workload = get_workload(config.workload, bench, **_workload_defaults(config))
        latency, speedup, latency_rows = run_workload(
            workload, variants, config.repeats, config.warmup, JsonlLog(out / "latency.jsonl"), progress
        )
        workload_info = _workload_record(workload, variants)
    calls = [(r["variant"], r["metrics"]) for r in samples.read()]
    calls += [(r["variant"], r) for r in latency_rows if r["repeat"] == 0]
    tokens = _token_stats(variants, calls)
    record = make_record(
        config.model,
        model,
        dataclasses.asdict(config),
        variants,
        latency,
        speedup,
        quality,
        workload=workload_info,
        tokens=tokens,
    )
    record["machine"]["processes"] = world
    pool.close()
    write_report(record, out)
    return record


def _check_runs_without_model(config: BenchConfig, variants: list[Variant], tasks: list[Task]) -> None:
    """A ``--model none`` run measures prompt compressors on text only: refuse what needs a model."""
    why = []
    if any(v.kind == "patch" for v in variants):
        why.append("model patches (--method)")
    why += [f"the {t.name} task" for t in tasks if t.needs_model]
    if config.lm_eval_tasks:
        why.append("lm-eval tasks")
    if config.latency:
        name, _ = parse_workload_spec(config.workload)
        if get_workload_class(name).needs_model:
            why.append(f"the {name} workload (use --workload compress, or --no-latency)")
    if why:
        raise EvalError(
            f"--model {NO_MODEL} runs prompt compressors on text only; {', '.join(why)} need a model"
        )


def _workload_defaults(config: BenchConfig) -> dict[str, Any]:
    """Bench settings a workload may read when its spec does not set them."""
    return {
        "prompt_tokens": config.prompt_tokens,
        "new_tokens": config.new_tokens,
        "batch_size": config.batch_size,
        "text": config.text,
        "prompt": config.encode_prompt,
        "sentences": config.encode_sentences,
    }


def _workload_record(workload: Workload, variants: list[Variant]) -> dict[str, Any]:
    refs = {v.name: workload.reference(v, variants) for v in workload.timed(variants)}
    references = {r for r in refs.values() if r is not None}
    return {
        "name": workload.name,
        "options": workload.options(),
        "metrics": {k: list(v) for k, v in workload.metrics.items()},
        "speedups": dict(workload.speedups),
        "primary": workload.primary,
        "reference": next(iter(references)) if len(references) == 1 else variants[0].name,
        "references": refs,
        "note": workload.note,
        "extra": workload.extra(variants),
    }


def make_record(
    model_name: str,
    model: torch.nn.Module,
    config: dict[str, Any],
    variants: list[Variant],
    latency: dict[str, Any],
    speedup: dict[str, Any],
    quality: dict[str, Any],
    *,
    workload: dict[str, Any] | None = None,
    tokens: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a ``tokenlean.report/2`` record (see :mod:`tokenlean.eval.report`)."""
    record = {
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
        "tokens": tokens or {},
    }
    if workload is not None:
        record["workload"] = workload
    return record


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
            defaults = dataclasses.asdict(BenchConfig(tasks=existing["config"].get("tasks", [])))
            existing["config"] = {**defaults, **existing["config"]}
        if existing == wanted:
            atomic_write_json(run_file, wanted)  # resume (recording any setting added since)
            return
        if not overwrite:
            raise OutputDirError(
                f"{out} holds results of a different run (see its run.json); "
                "choose another --out folder or pass --overwrite to discard them"
            )
    for stale in ("samples.jsonl", "latency.jsonl", "lm_eval.jsonl", "lm_eval.json"):
        (out / stale).unlink(missing_ok=True)
    atomic_write_json(run_file, wanted)


# --------------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------------


def _run_quality(
    bench: BenchContext, tasks: list[Task], variants: list[Variant], log: JsonlLog, progress: bool
) -> dict[str, Any]:
    done = {(r["task"], r["example"], r["variant"]): r["metrics"] for r in log.read()}
    results: dict[str, Any] = {}
    for task in tasks:
        examples = task.examples(bench.tokenizer)
        measured = [v for v in variants if v.kind in task.kinds]
        if not measured:
            continue

        def record_row(example, variant, reference, task=task) -> None:
            metrics = task.run(bench, variant, example, reference)
            log.append(
                {"task": task.name, "example": example.id, "variant": variant.name, "metrics": metrics}
            )
            done[(task.name, example.id, variant.name)] = metrics

        total = len(examples) * len(measured)
        with tqdm(total=total, desc=f"quality: {task.name}", disable=not progress) as bar:
            if task.order == "variant":  # one patch application around all of a variant's examples
                for variant in measured:
                    pending = [
                        e
                        for e in examples
                        if (task.name, e.id, variant.name) not in done and task.measures(variant, e)
                    ]
                    bar.update(len(examples) - len(pending))
                    if not pending:
                        continue
                    with variant.applied(bench.model):
                        for example in pending:
                            record_row(example, variant, None)
                            bar.update(1)
            else:
                for example in examples:
                    pending = [
                        v
                        for v in measured
                        if (task.name, example.id, v.name) not in done and task.measures(v, example)
                    ]
                    bar.update(len(measured) - len(pending))
                    if not pending:
                        continue
                    reference = task.reference(bench.model, example) if task.needs_reference else None
                    for variant in pending:
                        with variant.applied(bench.model):
                            record_row(example, variant, reference)
                        bar.update(1)
        rows = {
            v.name: [done[(task.name, e.id, v.name)] for e in examples if task.measures(v, e)]
            for v in measured
        }
        baseline = rows.get(variants[0].name)
        results[task.name] = {
            "primary": task.primary,
            "higher_is_better": task.higher_is_better,
            "n_examples": len(examples),
            "config": task.config(),
            "section": task.section,
            "kinds": list(task.kinds),
            "variants": {name: task.aggregate(r) for name, r in rows.items()},
            "compare": {
                name: task.compare(r, baseline)
                for name, r in rows.items()
                if baseline is not None and name != variants[0].name
            },
            "extra": task.extra(rows),
        }
    return results


# --------------------------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------------------------


def _distributed_rank(config: BenchConfig) -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch``/torchrun; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, 1
    from .lm_eval_bridge import init_distributed

    return init_distributed()


def _broadcast(value: Any, world: int) -> Any:
    """``value`` of process 0, on every process (itself when there is one process)."""
    if world <= 1:
        return value
    import torch.distributed as dist

    from .lm_eval_bridge import init_distributed

    init_distributed()  # the process group the launcher prepared (gloo on a CPU machine)
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_lm_eval(
    bench: BenchContext, config: BenchConfig, variants: list[Variant], log: Path, progress: bool
):
    """lm-eval tasks for every variant; finished variants are kept in ``log`` so a resume skips them."""
    from .lm_eval_bridge import evaluate, quality_section

    results = evaluate(
        bench.model,
        bench.tokenizer,
        config.lm_eval_tasks,
        variants=variants,
        compressors=bench.compressors,
        limit=config.lm_eval_limit,
        progress=progress,
        log_path=log,
    )
    return {} if results is None else quality_section(results)


# --------------------------------------------------------------------------------------------
# latency: interleaved rounds
# --------------------------------------------------------------------------------------------


def run_workload(
    workload: Workload,
    variants: list[Variant],
    repeats: int,
    warmup: int,
    log: JsonlLog | None,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Time ``workload`` on the variants it times; returns ``(latency, speedup, samples)`` sections."""
    timed = workload.timed(variants)
    if not timed:
        raise EvalError(
            f"the {workload.name} workload times {', '.join(workload.kinds)} variants, and this run has none"
        )
    bench = workload.bench

    def measure(variant: Variant) -> dict[str, float]:
        with variant.applied(bench.model):
            return workload.measure(variant)

    references = {v.name: workload.reference(v, variants) for v in timed}
    return interleaved_rounds(
        timed,
        measure,
        workload.metrics,
        workload.speedups,
        repeats,
        warmup,
        log,
        progress,
        reference_of=lambda v: references[v.name],
    )


def interleaved_rounds(
    variants: Sequence[Variant],
    measure: Callable[[Variant], dict[str, float]],
    metrics: dict[str, tuple[str, bool]],
    speedups: dict[str, str],
    repeats: int,
    warmup: int,
    log: JsonlLog | None,
    progress: bool,
    reference_of: Callable[[Variant], str | None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``repeats`` rounds of ``measure(variant)`` over all variants (rotating order) after a warm-up.

    Returns ``(latency, speedup, samples)``: per-variant summaries of every metric, per-variant
    summaries of the paired per-round ratios against ``reference_of(variant)`` (default: the
    first variant; None: no ratios), and the raw samples (``{"variant", ...metrics}``).
    """
    variants = list(variants)
    if reference_of is None:
        first = variants[0].name

        def reference_of(v: Variant) -> str | None:
            return first if v.name != first else None

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
        v.name: {
            m: summarize([done[(r, v.name)][m] for r in rounds]) for m in metrics if m in done[(0, v.name)]
        }
        for v in variants
    }
    speedup: dict[str, Any] = {}
    for v in variants:
        ref = reference_of(v)
        if ref is None:
            continue
        speedup[v.name] = {}
        for name, metric in speedups.items():
            ratios = paired_ratios(
                [done[(r, ref)][metric] for r in rounds],
                [done[(r, v.name)][metric] for r in rounds],
                higher_is_better=metrics[metric][1],
            )
            stats = summarize(ratios)
            speedup[v.name][name] = {k: stats[k] for k in ("median", "p25", "p75", "n")}
    samples = [{"variant": v.name, "repeat": r, **done[(r, v.name)]} for r in rounds for v in variants]
    return latency, speedup, samples


def _rotated(variants: list[Variant], shift: int) -> list[Variant]:
    shift %= len(variants)
    return variants[shift:] + variants[:shift]


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
    """Time every variant's generation on ``prompts`` (token ids), interleaved; ``(latency, speedup)``.

    For scripts that build their own prompts (random tokens on a random-weight model); the
    runner's ``generate`` workload does the same from text. ``variants`` are patches (baseline
    first, see :func:`make_variants`).
    """

    def measure(variant: Variant) -> dict[str, float]:
        with variant.applied(model):
            return measure_generation(model, prompts, new_tokens).as_dict()

    log = JsonlLog(Path(log_path)) if log_path is not None else None
    latency, speedup, _ = interleaved_rounds(
        variants, measure, LATENCY_METRICS, SPEEDUP_METRICS, repeats, warmup, log, progress
    )
    return latency, speedup


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
    so a Token Prepending variant is timed against the same prompt without it. Each variant's
    method must already be prepared (:meth:`Method.prepare`). Returns ``(latency, speedup)``.
    """
    from tokenlean.attention import SentenceEncoder

    encoder = SentenceEncoder(model, tokenizer, prompt=prompt, token_prepending="auto")

    def measure(variant: Variant) -> dict[str, float]:
        with variant.applied(model):
            return measure_encode(encoder, sentences, batch_size)

    log = JsonlLog(Path(log_path)) if log_path is not None else None
    latency, speedup, _ = interleaved_rounds(
        variants, measure, ENCODE_METRICS, ENCODE_SPEEDUPS, repeats, warmup, log, progress
    )
    return latency, speedup


# --------------------------------------------------------------------------------------------
# tokens saved
# --------------------------------------------------------------------------------------------


def _token_stats(variants: list[Variant], calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per compressor variant: its compress calls of the run pooled, as the report's "tokens" section.

    ``calls`` are ``(variant name, row)`` pairs: task rows of ``samples.jsonl`` and the first
    round of the workload's samples; a row counts as one call when it carries
    ``origin_tokens`` and ``compressed_tokens`` (and optionally ``compress_s``).
    """
    out: dict[str, Any] = {}
    for variant in variants:
        if variant.kind != "compressor":
            continue
        rows = [
            r
            for name, r in calls
            if name == variant.name and "origin_tokens" in r and "compressed_tokens" in r
        ]
        if not rows:
            continue
        origin = [int(r["origin_tokens"]) for r in rows]
        kept = [int(r["compressed_tokens"]) for r in rows]
        achieved = [k / o for k, o in zip(kept, origin) if o > 0]
        long = [k / o for k, o in zip(kept, origin) if o >= 200]
        rate = float(variant.rate or 1.0)
        out[variant.name] = {
            "requested": rate,
            "calls": len(rows),
            "origin_tokens": sum(origin),
            "compressed_tokens": sum(kept),
            "saved": 1.0 - sum(kept) / sum(origin) if sum(origin) else None,
            "achieved_mean": sum(achieved) / len(achieved) if achieved else None,
            "achieved_min": min(achieved) if achieved else None,
            "achieved_max": max(achieved) if achieved else None,
            "mean_abs_error_pp": 100 * sum(abs(a - rate) for a in achieved) / len(achieved)
            if achieved
            else None,
            "within_2pp": sum(abs(a - rate) <= 0.02 + 1e-9 for a in long) / len(long) if long else None,
            "calls_200plus": len(long),
            "compress_s": float(sum(float(r.get("compress_s", 0.0)) for r in rows)),
        }
    return out


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


def _model_info(name: str, model: torch.nn.Module | None) -> dict[str, Any]:
    if model is None:
        return {"name": name, "class": None, "note": "no language model: prompt compressors on text only"}
    first = next(model.parameters())
    info = {
        "name": name,
        "class": type(model).__name__,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        info["device_map"] = ", ".join(sorted({str(d) for d in device_map.values()}))
    return info
