"""Run lm-evaluation-harness tasks on a loaded model for every variant, offline, on one or more processes.

The bridge hands an already-loaded Hugging Face model to `lm-eval
<https://github.com/EleutherAI/lm-evaluation-harness>`_ (``pip install "tokenlean[lmeval]"``),
runs every :class:`~tokenlean.eval.variants.Variant` (the unpatched baseline, tokenlean patches,
prompt compressors) and converts the scores into the ``quality`` section of a tokenlean report.

Tasks
-----
lm-eval's built-in tasks download their data from the Hugging Face hub. The bridge ships its own
offline tasks (:mod:`tokenlean.eval.task_pack`, written on demand by :func:`local_task_dir`):
``tokenlean_pg_essays``, ``tokenlean_pg_cloze``, ``tokenlean_bbh_<task>`` (tag
``tokenlean_bbh``), ``tokenlean_needle``, ``tokenlean_passkey_<n>k`` (tag
``tokenlean_passkey``); the tag ``tokenlean`` runs them all. Other names are looked up in
``include_path`` and then among lm-eval's built-in tasks; the run is offline, so a task whose
data is not in the ``datasets`` cache fails at once with one line saying so.

Variants
--------
``baseline`` runs the model as it is; a ``patch`` variant runs inside ``variant.applied(model)``
(the patch is removed afterwards, also on an error). A ``compressor`` variant leaves the model
alone and compresses each request's context before the model sees it
(:class:`~tokenlean.eval.variants.CompressorPool`). What is compressed (the *compress rule*,
:func:`compressible_segments`):

(a) if the request's document has a ``demos`` field (a list of strings) whose strings all
    appear, in order, verbatim in the request's context, those demonstrations are compressed,
    as a list of separate contexts (LLMLingua-2 compresses BBH's demonstrations this way);
    otherwise, if it has a ``context`` field (a string) that appears verbatim in the request's
    context, that string is compressed. Everything else (task description, question, answer
    stem) stays verbatim. The pack's BBH tasks have ``demos``; needle, passkey and cloze
    documents have ``context``.
(b) otherwise, for a few-shot task (``num_fewshot > 0``), the few-shot demonstrations are
    compressed: the request context minus the task description in front and minus the
    document's own ``doc_to_text`` at the end, split at the task's ``fewshot_delimiter`` into
    one context per demonstration (the delimiters stay).
(c) otherwise the request is left unchanged, and so are ``loglikelihood_rolling`` requests.

Compressions are cached by their input (BBH's demonstrations are the same for every question
of a task: they are compressed once per variant). For every variant and task the results carry
two extra metrics: ``context_tokens``, the mean length of the contexts the model saw in the
model's tokenizer's tokens (before lm-eval truncates a context that is longer than the model's
maximum length), and ``tokens_saved``, the share of tokens saved against the uncompressed
(baseline) contexts of the same documents (0 for the baseline and patches).

Resume
------
With ``log_path``, each finished variant's results are appended to a JSON-lines file (one
fsynced line per variant, :class:`tokenlean._io.JsonlLog`); a rerun with the same model, tasks
and limits skips the variants found there and merges their results back.

Data parallel
-------------
Launched with several processes, every process loads the model and calls :func:`evaluate` the
same way; the process group is set up with ``accelerate.PartialState`` (gloo on CPU, NCCL on
GPUs; on GPUs each process must hold its model on its own device, e.g. ``cuda:LOCAL_RANK``).
lm-eval splits each task's documents across the ranks, and the per-document scores (and the
token statistics) are gathered on rank 0, which returns the results and alone writes the log;
the other ranks return None. With ``batch_size=1`` the scores do not depend on the number of
processes. Launch with::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no script.py          # also on a machine without GPUs (gloo)
    torchrun --nproc_per_node 2 script.py      # the same

(accelerate 1.15's ``--cpu`` flag selects its one-process launcher unless it is given an MPI
hostfile, so ``accelerate launch --cpu --num_processes 2`` runs a single process; to force gloo
on a machine with GPUs, set ``ACCELERATE_USE_CPU=1`` and use ``--multi_gpu``.)

If a process dies, the survivors' next collective operation fails ("connection closed by
peer"), the launcher (torchrun's agent, which accelerate uses) stops the others within seconds
and exits non-zero. A process that hangs makes the others fail after the process-group
timeout, :data:`DIST_TIMEOUT_S` seconds (30 minutes; ``TOKENLEAN_DIST_TIMEOUT_S`` overrides
it; lm-eval's own HFLM would wait 52 weeks). A rerun resumes from the log.

Example::

    import tokenlean
    from tokenlean.eval.lm_eval_bridge import evaluate, quality_section
    from tokenlean.eval.variants import make_variants

    model, tokenizer = tokenlean.zoo.load("smollm2-135m")
    variants = make_variants(["sink_window:window=64"], ["default"], [0.5])
    results = evaluate(model, tokenizer, ["tokenlean_bbh_navigate"], variants=variants, limit=50)
    results["default@0.5"]["tokenlean_bbh_navigate"]        # {"acc": ..., "tokens_saved": 0.48, ...}
    record["quality"].update(quality_section(results))      # "lm-eval:tokenlean_bbh_navigate": {...}
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import tokenlean
from tokenlean._io import JsonlLog
from tokenlean.errors import EvalError, PatchError
from tokenlean.methods import Method

from .task_pack import LOCAL_TAG, LOCAL_TASKS, TAGS, local_task_dir
from .variants import CompressorPool, Variant, make_variants

__all__ = [
    "DIST_TIMEOUT_S",
    "LOCAL_TAG",
    "LOCAL_TASKS",
    "LMEvalResults",
    "TOKEN_METRICS",
    "compressible_segments",
    "distributed_rank",
    "evaluate",
    "init_distributed",
    "local_task_dir",
    "quality_section",
]

logger = logging.getLogger(__name__)

#: Task names starting with this prefix are never looked up among lm-eval's built-in tasks.
_RESERVED_PREFIX = "tokenlean_"
_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
#: Process-group timeout in seconds (``TOKENLEAN_DIST_TIMEOUT_S`` overrides it).
DIST_TIMEOUT_S = 1800
_LOG_FORMAT = 1

#: Extra metrics the bridge adds per variant and task.
TOKEN_METRICS = ("context_tokens", "tokens_saved")

# primary metric candidates by lm-eval output type, first present wins
_PRIMARY_BY_OUTPUT_TYPE = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "loglikelihood": ("acc", "perplexity"),
    "generate_until": ("acc", "exact_match"),
}
_NOT_METRICS = {"alias", "sample_len"}  # entries of lm-eval's per-task results that are not scores
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ter"}


class LMEvalResults(dict):
    """What :func:`evaluate` returns: ``{variant: {task: {metric: value}}}``, in variant order.

    A plain ``dict`` with one extra attribute, :attr:`tasks`: per-task information that
    :func:`quality_section` uses (it is not part of the mapping, so it is lost in a JSON round
    trip; pass it to :func:`quality_section` as ``tasks_meta`` then).

    Attributes
    ----------
    tasks : dict
        ``{task: {"primary": str, "higher_is_better": bool, "n_examples": int | None,
        "config": dict}}``.
    """

    tasks: dict[str, dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = {}


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless launched with several processes.

    Reads the initialised ``torch.distributed`` process group, else the ``RANK``/``WORLD_SIZE``
    variables that ``accelerate launch`` and ``torchrun`` set. Starts nothing.
    """
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)


def _dist_timeout_s() -> float:
    value = os.environ.get("TOKENLEAN_DIST_TIMEOUT_S")
    try:
        return float(value) if value else float(DIST_TIMEOUT_S)
    except ValueError:
        raise EvalError(f"TOKENLEAN_DIST_TIMEOUT_S must be a number of seconds, got {value!r}") from None


def init_distributed() -> tuple[int, int]:
    """Set up the process group when launched with several processes; ``(rank, world_size)``.

    Idempotent, and a no-op (``(0, 1)``) in a single process. Uses ``accelerate.PartialState``
    with a :data:`DIST_TIMEOUT_S` timeout: gloo when ``ACCELERATE_USE_CPU`` is set or there is
    no GPU, else accelerate's choice (NCCL). Call it, rather than a bare ``PartialState()``,
    before any collective operation of your own: on a machine without GPUs a bare
    ``PartialState()`` under ``--multi_gpu`` sets up no process group (then this function sets
    one up itself, from the launcher's environment).
    """
    rank, world = distributed_rank()
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        # gloo on CPU: asked for (``--cpu``, ``ACCELERATE_USE_CPU``) or no GPU (``--multi_gpu`` on a CPU machine)
        cpu = _truthy(os.environ.get("ACCELERATE_USE_CPU")) or not torch.cuda.is_available()
        timeout = timedelta(seconds=_dist_timeout_s())
        PartialState(cpu=cpu, timeout=timeout)
        if not dist.is_initialized():  # a PartialState made earlier in this process without one
            dist.init_process_group(backend="gloo" if cpu else "nccl", timeout=timeout)
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        # a process that exits with a live gloo group may abort in its teardown ("terminate called
        # without an active exception"), failing a launch that succeeded: close the group at exit
        atexit.register(_destroy_process_group)
        _EXIT_HOOK = True
    return dist.get_rank(), dist.get_world_size()


_EXIT_HOOK = False


def _destroy_process_group() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def _broadcast(obj: Any, world: int) -> Any:
    """``obj`` of rank 0, on every rank."""
    if world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank0_first(rank: int, world: int, fn: Any) -> Any:
    """Run ``fn()`` on rank 0, then on the others (shared files and caches are built once).

    A failure on rank 0 is raised on every rank instead of leaving the others waiting.
    """
    if world <= 1:
        return fn()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the others heard of it
            error = exc
    message = _broadcast(None if error is None else f"{type(error).__name__}: {error}", world)
    if rank == 0:
        if error is not None:
            raise error
        return result
    if message is not None:
        raise EvalError(f"rank 0 failed while preparing the lm-eval run: {message}")
    return fn()


# ---------------------------------------------------------------------------------------------
# The compress rule
# ---------------------------------------------------------------------------------------------


def compressible_segments(context: str, doc: Any, task: Any = None) -> list[tuple[str, bool]] | None:
    """Split a request context into ``(text, compress)`` segments by the compress rule (module docs).

    Parameters
    ----------
    context : str
        The request's context string, as lm-eval built it.
    doc : mapping
        The request's document.
    task : lm_eval.api.task.Task, optional
        Its task (needed for rule (b), few-shot demonstrations).

    Returns
    -------
    list of (str, bool) or None
        Segments that concatenate to ``context``; those marked True are compressed (together, as
        a list of contexts). None when nothing is to be compressed.
    """
    if not isinstance(context, str) or not context:
        return None
    if isinstance(doc, Mapping):
        demos = doc.get("demos")
        if isinstance(demos, (list, tuple)) and demos and all(isinstance(d, str) for d in demos):
            segments = _locate(context, [d for d in demos if d.strip()])
            if segments is not None:
                return segments
        part = doc.get("context")
        if isinstance(part, str) and part.strip() and part in context:
            at = context.find(part)
            return [(context[:at], False), (part, True), (context[at + len(part) :], False)]
    if task is not None:
        return _fewshot_segments(context, doc, task)
    return None


def _locate(context: str, parts: Sequence[str]) -> list[tuple[str, bool]] | None:
    """``parts`` found in order in ``context`` as compressible segments, the gaps verbatim."""
    if not parts:
        return None
    segments: list[tuple[str, bool]] = []
    pos = 0
    for part in parts:
        at = context.find(part, pos)
        if at < 0:
            return None
        segments += [(context[pos:at], False), (part, True)]
        pos = at + len(part)
    segments.append((context[pos:], False))
    return segments


def _fewshot_segments(context: str, doc: Any, task: Any) -> list[tuple[str, bool]] | None:
    config = getattr(task, "config", None)
    if (
        config is None
        or not (getattr(config, "num_fewshot", 0) or 0) > 0
        or getattr(task, "multiple_input", 0)
    ):
        return None
    try:
        description = task.resolve_field(doc, config.description) or ""
        own = task.doc_to_text(doc)
    except Exception:  # a task whose fields do not render outside lm-eval's own flow
        return None
    if not isinstance(description, str) or not isinstance(own, str) or not own:
        return None
    if not context.startswith(description):
        return None
    start, end = len(description), context.rfind(own)
    if end <= start:
        return None
    fewshot = getattr(task, "fewshot_cfg", None)
    delimiter = (
        getattr(fewshot, "fewshot_delimiter", None) or getattr(config, "fewshot_delimiter", None) or "\n\n"
    )
    segments: list[tuple[str, bool]] = [(context[:start], False)]
    for i, piece in enumerate(context[start:end].split(delimiter)):
        if i:
            segments.append((delimiter, False))
        segments.append((piece, bool(piece.strip())))
    segments.append((context[end:], False))
    return segments if any(flag for _, flag in segments) else None


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    variants: Sequence[Variant] | None = None,
    methods: Sequence[Method | str] = (),
    compressors: CompressorPool | None = None,
    limit: int | float | Mapping[str, int | float | None] | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    progress: bool = True,
    log_path: str | os.PathLike[str] | None = None,
) -> LMEvalResults | None:
    """Run lm-eval ``tasks`` for every variant: baseline, patches, prompt compressors.

    One ``lm_eval.models.huggingface.HFLM`` (subclassed: it compresses the requests of
    compressor variants and takes part in data-parallel runs) wraps ``model`` for every run;
    each run is an ``lm_eval.simple_evaluate`` call on Task objects built once. The model is
    back to its original state (bitwise) when this returns, even on an error. A model loaded
    with ``device_map="auto"`` is used where it is (inputs go to its embedding's device).

    The run is offline: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set (only where unset)
    for the duration of the call and restored afterwards. Request caching, sample logging and
    result files are off: nothing is written outside the task folder, the ``datasets`` cache
    and ``log_path``. The global ``random``/``numpy``/``torch`` RNG states, which lm-eval
    reseeds, are restored after each run, as are the model's train/eval mode and the
    tokenizer's pad token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A loaded causal LM with no tokenlean patch applied.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    tasks : str or sequence of str
        lm-eval task, group or tag names, e.g. ``["tokenlean_bbh_navigate", "tokenlean_passkey_1k"]``.
    variants : sequence of Variant, optional
        What to run, in order, baseline first (:func:`~tokenlean.eval.variants.make_variants`).
        Default: built from ``methods``.
    methods : sequence of Method or str
        Shortcut for ``variants=make_variants(methods)``: the baseline, then one variant per
        method spec (``"sink_window:window=64"``). Not together with ``variants``.
    compressors : CompressorPool, optional
        Runs the compressor variants (one is created, and closed afterwards, if needed).
    limit : int, float, mapping or None
        lm-eval's ``limit``: at most this many documents per task (a float < 1 is a fraction).
        A mapping ``{task: limit}`` gives tasks different limits (tasks not in it run in full).
    batch_size : int
        lm-eval's batch size (per process).
    include_path : path-like or sequence of path-like, optional
        Extra folders of lm-eval task YAMLs, searched together with the local task folder.
    progress : bool
        Show lm-eval's per-request progress bars (its short per-task "building requests" bar
        cannot be switched off).
    log_path : path-like, optional
        JSON-lines file of finished variants: appended to (rank 0), and read back to skip them.

    Returns
    -------
    LMEvalResults or None
        On rank 0: ``{variant: {task: {metric: value}}}`` in variant order. Metric names are
        lm-eval's with the default filter suffix ``",none"`` removed (other filters stay, e.g.
        ``"exact_match,strict-match"``); standard errors are kept as ``"<metric>_stderr"`` where
        lm-eval computed one (non-numeric values such as ``"N/A"`` are dropped); every task but
        a ``loglikelihood_rolling`` one also gets ``context_tokens`` and ``tokens_saved`` (see
        the module docs). :attr:`LMEvalResults.tasks` holds per-task information for
        :func:`quality_section`. None on the other ranks of a data-parallel run.

    Raises
    ------
    ImportError
        lm-eval is not installed.
    PatchError
        The model already carries a tokenlean patch.
    MethodConfigError
        A method spec is invalid.
    ValueError
        An unknown task name (:class:`~tokenlean.errors.EvalError`, with suggestions), an empty
        task list, the same variant twice, a task whose data is on the hub while the run is
        offline; all checked before the model runs.
    """
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list or not all(isinstance(t, str) and t for t in task_list):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(task_list)) != len(task_list):
        raise ValueError(f"a task is given twice: {task_list}")
    if isinstance(limit, Mapping):
        unknown = sorted(set(limit) - set(task_list))
        if unknown:
            raise ValueError(f"limit names task(s) not in tasks: {', '.join(unknown)}")
    handles = tokenlean.active_patches(model)
    if handles:
        raise PatchError(
            f"the model already carries tokenlean patch(es) {[h.method.name for h in handles]}; "
            "evaluate() measures the unpatched baseline itself: remove them first"
        )
    variant_list = _variants(variants, methods)

    rank, world = init_distributed()
    with _offline_hub():
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise ImportError(
                'the lm-eval bridge needs lm-eval: pip install "tokenlean[lmeval]" (or "lm-eval>=0.4.5")'
            ) from exc

        extra = (
            []
            if include_path is None
            else ([include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
        )
        extra_folders = [Path(p).expanduser().absolute() for p in extra]

        def prepare() -> tuple[Any, dict[str, list[Any]], dict[str, Any]]:
            folder = local_task_dir(tasks=task_list)
            manager = _task_manager(TaskManager, [folder, *extra_folders], task_list)
            return (manager, *_load_tasks(manager, task_list))

        manager, objects, task_objects = _rank0_first(rank, world, prepare)
        runs = _limit_groups(task_list, limit)
        keys = {v.name: _run_key(model, task_list, limit, batch_size, v) for v in variant_list}
        log = JsonlLog(log_path) if log_path is not None else None
        if log is not None and rank == 0:
            log.path.parent.mkdir(parents=True, exist_ok=True)
        done = _broadcast(_finished(log, keys) if rank == 0 else None, world)

        pool = compressors
        own_pool = pool is None and any(v.kind == "compressor" and v.name not in done for v in variant_list)
        if own_pool:
            pool = CompressorPool()
        lm = _make_lm(model, tokenizer, batch_size, progress, rank, world, task_objects)
        results = LMEvalResults()
        try:
            with _restored_state(model, tokenizer):
                for variant in variant_list:
                    if variant.name in done:
                        row = done[variant.name]
                        results[variant.name] = row["results"]
                        for task, meta in row.get("tasks", {}).items():
                            results.tasks.setdefault(task, meta)
                        logger.info("lm-eval %s: resumed from %s", variant.name, log_path)
                        continue
                    try:
                        per_task, meta = _run_variant(
                            lm_eval, lm, manager, model, variant, pool, runs, objects
                        )
                    except RuntimeError as exc:
                        if world > 1 and _is_collective_error(exc):
                            raise EvalError(
                                f"rank {rank}: a collective operation of the data-parallel lm-eval run failed "
                                f"({_one_line(exc)}), most likely because another process died or hung; see "
                                "the launcher's root cause"
                                + (f"; a rerun resumes from {log_path}" if log_path is not None else "")
                            ) from exc
                        raise
                    if rank != 0:
                        continue
                    for task, m in meta.items():
                        results.tasks.setdefault(task, m)
                    results[variant.name] = per_task
                    if log is not None:
                        log.append(
                            {
                                "lm_eval_bridge": _LOG_FORMAT,
                                "key": keys[variant.name],
                                "variant": variant.name,
                                "results": per_task,
                                "tasks": meta,
                            }
                        )
                    logger.info("lm-eval %s: %s", variant.name, _summary(per_task, results.tasks))
        finally:
            if own_pool and pool is not None:
                pool.close()
    return results if rank == 0 else None


def _variants(variants: Sequence[Variant] | None, methods: Sequence[Method | str]) -> list[Variant]:
    if variants is None:
        return make_variants(methods)
    if methods:
        raise ValueError("give either variants or methods, not both")
    out = list(variants)
    if not out:
        raise ValueError("variants must not be empty")
    for v in out:
        if not isinstance(v, Variant):
            raise TypeError(
                f"variants must be tokenlean.eval.variants.Variant objects, got {type(v).__name__}"
            )
    names = [v.name for v in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EvalError(f"the same variant is given twice: {', '.join(twice)}")
    return out


def _run_variant(
    lm_eval: Any,
    lm: Any,
    manager: Any,
    model: Any,
    variant: Variant,
    pool: CompressorPool | None,
    runs: list[tuple[list[str], int | float | None]],
    objects: Mapping[str, list[Any]],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """One variant's lm-eval runs (one per distinct limit); results on rank 0, ``({}, {})`` elsewhere."""
    lm.start_variant(variant, pool)
    per_task: dict[str, dict[str, float]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for run_tasks, run_limit in runs:
        with _restored_rng(), variant.applied(model):
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=[obj for name in run_tasks for obj in objects[name]],
                task_manager=manager,
                limit=run_limit,
                batch_size=lm.batch_size,
                use_cache=None,
                cache_requests=False,
                log_samples=False,
                write_out=False,
                evaluation_tracker=None,
                bootstrap_iters=1000,
            )
        if raw is None:  # not rank 0
            continue
        for task, metrics in raw["results"].items():
            per_task[task] = _clean_metrics(metrics)
            meta[task] = _task_meta(raw, task, per_task[task], run_limit)
    tokens = lm.finish_variant()  # collective: every rank takes part
    for task, extra in (tokens or {}).items():
        if task in per_task:
            per_task[task].update(extra)
    return per_task, meta


def _run_key(model: Any, tasks: list[str], limit: Any, batch_size: int, variant: Variant) -> str:
    """What makes a logged variant reusable: model, tasks, limits, batch size, the variant itself."""
    config = getattr(model, "config", None)
    ident = {
        "model": getattr(config, "_name_or_path", None) or type(model).__name__,
        "tasks": tasks,
        "limit": dict(limit) if isinstance(limit, Mapping) else limit,
        "batch_size": batch_size,
        "variant": variant.record(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _finished(log: JsonlLog | None, keys: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Logged rows of the variants in ``keys`` (by name) whose key matches; the last row wins."""
    if log is None:
        return {}
    done: dict[str, dict[str, Any]] = {}
    for row in log.read():
        name = row.get("variant") if isinstance(row, dict) else None
        if name in keys and row.get("key") == keys[name] and isinstance(row.get("results"), dict):
            done[name] = row
    return done


def _task_manager(task_manager_cls: Any, folders: list[Path], tasks: list[str]) -> Any:
    """A TaskManager over ``folders``, or over lm-eval's built-in tasks too if a task needs them."""
    local = task_manager_cls(include_path=[str(f) for f in folders], include_defaults=False)
    missing = [t for t in tasks if t not in local.all_tasks]
    if not missing:
        return local
    known = sorted(set(local.all_tasks) | set(LOCAL_TASKS) | set(TAGS))
    available = ", ".join(known)
    reserved = [t for t in missing if t.startswith(_RESERVED_PREFIX) or t == LOCAL_TAG]
    if reserved:
        hints = [
            f"{t!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(t)
            for t in reserved
            for close in [difflib.get_close_matches(t, known, n=2)]
        ]
        raise EvalError(f"unknown lm-eval task(s) {', '.join(hints)}; local tasks: {available}")
    logger.warning(
        "lm-eval task(s) %s not in the local task folder(s) %s; indexing lm-eval's built-in tasks "
        "(~15 s; they usually download their data from the Hugging Face hub, which is set offline here)",
        ", ".join(missing),
        ", ".join(map(str, folders)),
    )
    full = task_manager_cls(include_path=[str(f) for f in folders], include_defaults=True)
    unknown = [t for t in missing if t not in full.all_tasks]
    if unknown:
        hints = [
            f"{t!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(t)
            for t in unknown
            for close in [difflib.get_close_matches(t, full.all_tasks, n=2)]
        ]
        raise EvalError(
            f"unknown lm-eval task(s) {', '.join(hints)}: neither local nor built into lm-eval; "
            f"local tasks: {available}"
        )
    return full


def _load_tasks(manager: Any, names: list[str]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Build the Task objects once: ``({requested name: [Task or Group]}, {task name: Task})``.

    A task whose data is on the hub while the run is offline fails here, with one line.
    """
    objects: dict[str, list[Any]] = {}
    task_objects: dict[str, Any] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as exc:
            if _is_offline_error(exc):
                raise EvalError(
                    f"lm-eval task {name!r} needs data from the Hugging Face hub, which is not in the local "
                    f"datasets cache, and this run is offline ({_one_line(exc)}); fetch it once online "
                    '(e.g. `HF_HUB_OFFLINE=0 python -c "import datasets; datasets.load_dataset(...)"`) '
                    "or pick a local task (tokenlean_*)"
                ) from None
            raise
        groups, leaf_tasks = loaded.get("groups") or {}, loaded.get("tasks") or {}
        objects[name] = [groups[name]] if name in groups else list(leaf_tasks.values())
        task_objects.update(leaf_tasks)
    return objects, task_objects


def _is_offline_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__} {exc}".lower()
        if isinstance(exc, ConnectionError) or "offline" in text or "localentrynotfound" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_collective_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        k in text for k in ("closed by peer", "connection reset", "timed out", "timeout", "gloo", "nccl")
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _limit_groups(
    tasks: list[str], limit: int | float | Mapping[str, int | float | None] | None
) -> list[tuple[list[str], int | float | None]]:
    """``[(tasks, limit)]``: one lm-eval run per distinct limit, tasks in the given order."""
    if not isinstance(limit, Mapping):
        return [(tasks, limit)]
    groups: dict[int | float | None, list[str]] = {}
    for task in tasks:
        groups.setdefault(limit.get(task), []).append(task)
    return [(group, lim) for lim, group in groups.items()]


# ---------------------------------------------------------------------------------------------
# The lm-eval model wrapper
# ---------------------------------------------------------------------------------------------

_LM_CLASS: Any = None


def _make_lm(
    model: Any,
    tokenizer: Any,
    batch_size: int,
    progress: bool,
    rank: int,
    world: int,
    tasks: Mapping[str, Any],
) -> Any:
    global _LM_CLASS
    if _LM_CLASS is None:
        _LM_CLASS = _define_lm_class()
    return _LM_CLASS(model, tokenizer, batch_size, progress, rank, world, tasks)


class _DropHFLMNotes(logging.Filter):
    """HFLM warns that a pre-loaded model means one process; this wrapper handles that itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "already-initialized model" not in message and "not of type `str`" not in message


def _input_device(model: Any) -> Any:
    """Where the model's inputs go: its embedding's device (the first device of a device map)."""
    import torch

    try:
        device = model.get_input_embeddings().weight.device
    except Exception:
        device = None
    if device is not None and device.type != "meta":
        return device
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        if isinstance(where, int):
            return torch.device("cuda", where)
        if isinstance(where, str) and where not in ("disk", "meta"):
            return torch.device(where)
    return model.device


def _define_lm_class() -> Any:
    import torch
    from lm_eval.models.huggingface import HFLM

    class BridgeLM(HFLM):
        """HFLM on a loaded model that compresses requests and joins a data-parallel run."""

        def __init__(self, model, tokenizer, batch_size, progress, rank, world, tasks):
            hflm_logger = logging.getLogger("lm_eval.models.huggingface")
            notes = _DropHFLMNotes()
            hflm_logger.addFilter(notes)
            try:
                super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            finally:
                hflm_logger.removeFilter(notes)
            self._device = _input_device(model)
            self._rank, self._world_size = rank, world
            self._progress = progress
            self._tasks = dict(tasks)
            self._variant: Variant | None = None
            self._pool: CompressorPool | None = None
            self._compressed: dict[tuple[str, ...], Any] = {}
            self._contexts: dict[str, str] = {}
            self._lengths: dict[str, int] = {}
            self._stats: dict[tuple[str, Any, str], tuple[int, int]] = {}

        # -- distributed (HFLM only sets this up for models it loads itself) -------------------

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            import torch.distributed as dist

            flat = tensor.reshape(1) if tensor.ndim == 0 else tensor.contiguous()
            parts = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(parts, flat)
            return torch.cat(parts, dim=0)

        def barrier(self):
            if self.world_size > 1:
                import torch.distributed as dist

                dist.barrier()

        # -- variants ------------------------------------------------------------------------

        def start_variant(self, variant: Variant, pool: CompressorPool | None) -> None:
            self._variant, self._pool = variant, pool
            self._compressed, self._contexts, self._stats = {}, {}, {}

        def finish_variant(self) -> dict[str, dict[str, float]] | None:
            """Token statistics per task, merged over the ranks (on rank 0; None elsewhere)."""
            parts = self.gather_object(self._stats, dst=0) if self.world_size > 1 else [self._stats]
            self._stats = {}
            if self.rank != 0:
                return None
            merged: dict[tuple[str, Any, str], tuple[int, int]] = {}
            for part in parts:
                merged.update(part or {})
            sums: dict[str, list[int]] = {}
            for (task, _doc, _ctx), (origin, seen) in merged.items():
                acc = sums.setdefault(task, [0, 0, 0])
                acc[0] += 1
                acc[1] += origin
                acc[2] += seen
            return {
                task: {
                    "context_tokens": seen / n,
                    "tokens_saved": (1.0 - seen / origin) if origin else 0.0,
                }
                for task, (n, origin, seen) in sums.items()
            }

        # -- requests ------------------------------------------------------------------------

        def _length(self, text: str) -> int:
            n = self._lengths.get(text)
            if n is None:
                n = self._lengths[text] = len(self.tok_encode(text))
            return n

        def _context_for(self, request: Any) -> str:
            context = request.args[0]
            if not isinstance(context, str):
                return context
            seen = context
            variant = self._variant
            if variant is not None and variant.kind == "compressor" and context:
                seen = self._contexts.get(context)
                if seen is None:
                    seen = self._contexts[context] = self._compress_context(request, context)
            digest = hashlib.blake2b(context.encode("utf-8"), digest_size=12).hexdigest()
            self._stats[(request.task_name, request.doc_id, digest)] = (
                self._length(context),
                self._length(seen),
            )
            return seen

        def _compress_context(self, request: Any, context: str) -> str:
            segments = compressible_segments(context, request.doc, self._tasks.get(request.task_name))
            if segments is None:
                return context
            targets = tuple(text for text, flag in segments if flag)
            if targets not in self._compressed:
                if self._pool is None:  # pragma: no cover - evaluate() always passes one
                    raise EvalError("a compressor variant needs a CompressorPool")
                out = self._pool.compress(self._variant, list(targets))
                self._compressed[targets] = list(out.texts) if len(out.texts) == len(targets) else out.text
            compressed = self._compressed[targets]
            if isinstance(compressed, list):
                it = iter(compressed)
                return "".join(next(it) if flag else text for text, flag in segments)
            # the compressor returned one text for all targets: it replaces the span they cover
            flags = [flag for _, flag in segments]
            first, last = flags.index(True), len(flags) - 1 - flags[::-1].index(True)
            head = "".join(text for text, _ in segments[:first])
            tail = "".join(text for text, _ in segments[last + 1 :])
            return head + compressed + tail

        def _rewritten(self, requests: list[Any]) -> list[Any]:
            out = []
            for request in requests:
                context = self._context_for(request)
                if context is request.args[0]:
                    out.append(request)
                else:
                    out.append(dataclasses.replace(request, arguments=(context, *request.args[1:])))
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(
                self._rewritten(requests), disable_tqdm=disable_tqdm or not self._progress
            )

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(
                self._rewritten(requests), disable_tqdm=disable_tqdm or not self._progress
            )

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self._progress)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            return super()._loglikelihood_tokens(
                requests, disable_tqdm=disable_tqdm or not self._progress, **kwargs
            )

    return BridgeLM


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else key] = float(value)
    return out


def _task_meta(
    raw: Mapping[str, Any], task: str, metrics: Mapping[str, float], limit: int | float | None
) -> dict[str, Any]:
    config = raw.get("configs", {}).get(task, {})
    output_type = config.get("output_type")
    primary = _primary_metric(output_type, metrics, config)
    hib = raw.get("higher_is_better", {}).get(task, {}).get(primary)
    n_samples = raw.get("n-samples", {}).get(task, {})
    n_examples = n_samples.get("effective")
    return {
        "primary": primary,
        "higher_is_better": bool(hib) if isinstance(hib, bool) else primary not in _LOWER_IS_BETTER,
        "n_examples": int(n_examples) if isinstance(n_examples, int) else None,
        "config": {
            "harness": "lm-eval",
            "lm_eval_version": _lm_eval_version(),
            "task": task,
            "output_type": output_type,
            "limit": limit,
            "num_fewshot": raw.get("n-shot", {}).get(task),
            "n_documents": n_samples.get("original"),
            "task_version": raw.get("versions", {}).get(task),
        },
    }


def _primary_metric(output_type: str | None, metrics: Mapping[str, float], config: Mapping[str, Any]) -> str:
    names = [
        m for m in metrics if not m.endswith("_stderr") and "_stderr," not in m and m not in TOKEN_METRICS
    ]
    for candidate in _PRIMARY_BY_OUTPUT_TYPE.get(output_type or "", ()):
        if candidate in names:
            return candidate
    for entry in config.get("metric_list") or ():
        metric = entry.get("metric") if isinstance(entry, Mapping) else None
        for name in names:
            if isinstance(metric, str) and (name == metric or name.startswith(metric + ",")):
                return name
    return names[0] if names else "acc"


def _summary(per_task: Mapping[str, Mapping[str, float]], meta: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for task, metrics in per_task.items():
        primary = meta.get(task, {}).get("primary")
        if primary in metrics:
            text = f"{task} {primary}={metrics[primary]:.4g}"
            if "tokens_saved" in metrics:
                text += f" ({metrics['context_tokens']:.0f} tokens, {metrics['tokens_saved']:.0%} saved)"
            parts.append(text)
    return ", ".join(parts)


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing
        return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Set the Hugging Face offline switches that the environment leaves unset, then restore them.

    ``datasets`` and ``huggingface_hub`` read the variables once, at import, so their module
    constants are switched too when the modules are already imported.
    """
    import sys

    unset = [name for name in _OFFLINE_ENV if name not in os.environ]
    for name in unset:
        os.environ[name] = "1"
    targets: list[tuple[str, str, bool]] = []
    if "HF_HUB_OFFLINE" in unset:
        targets.append(("huggingface_hub.constants", "HF_HUB_OFFLINE", True))
    if "HF_DATASETS_OFFLINE" in unset:  # datasets follows HF_DATASETS_OFFLINE when it is set
        targets += [
            ("datasets.config", "HF_HUB_OFFLINE", True),
            ("datasets.config", "HF_DATASETS_OFFLINE", True),
        ]
    elif "HF_HUB_OFFLINE" in unset:
        on = _truthy(os.environ.get("HF_DATASETS_OFFLINE"))
        targets += [("datasets.config", "HF_HUB_OFFLINE", on), ("datasets.config", "HF_DATASETS_OFFLINE", on)]
    saved: list[tuple[Any, str, Any]] = []
    for module_name, attr, value in targets:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
        for name in unset:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _restored_rng() -> Iterator[None]:
    """Restore the global RNGs that ``simple_evaluate`` reseeds."""
    import numpy as np
    import torch

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _restored_state(model: Any, tokenizer: Any) -> Iterator[None]:
    """Undo what HFLM changes on the objects it is given (eval mode, pad token)."""
    training = getattr(model, "training", False)
    pad_token = getattr(tokenizer, "pad_token", None)
    try:
        yield
    finally:
        if hasattr(model, "train"):
            model.train(training)
        if getattr(tokenizer, "pad_token", None) != pad_token:
            with contextlib.suppress(Exception):
                tokenizer.pad_token = pad_token


# ---------------------------------------------------------------------------------------------
# Report section
# ---------------------------------------------------------------------------------------------


def quality_section(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    tasks_meta: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Convert :func:`evaluate`'s results into the ``quality`` section of a tokenlean report.

    Parameters
    ----------
    results : mapping
        ``{variant: {task: {metric: value}}}`` as returned by :func:`evaluate` (baseline first).
    tasks_meta : mapping, optional
        ``{task: {"primary", "higher_is_better", "n_examples", "config"}}``, overriding (key by
        key) :attr:`LMEvalResults.tasks`; needed when ``results`` is a plain dict (e.g. read
        back from JSON). Missing information is guessed: the primary metric is ``acc``, else
        ``exact_match``, else ``word_perplexity``, else the first metric; perplexities and bits
        per byte are lower is better.

    Returns
    -------
    dict
        ``{"lm-eval:<task>": {"primary", "higher_is_better", "n_examples", "config",
        "variants": {variant: {metric: value}}}}`` in task order; each variant's metrics include
        ``context_tokens`` and ``tokens_saved`` beside the scores where :func:`evaluate` measured
        them. A non-finite value (an infinite perplexity) becomes ``None``, as JSON has no such
        numbers.
    """
    meta: dict[str, dict[str, Any]] = {t: dict(m) for t, m in getattr(results, "tasks", {}).items()}
    for task, extra in (tasks_meta or {}).items():
        meta.setdefault(task, {}).update(extra)
    tasks: list[str] = []
    for per_task in results.values():
        tasks += [t for t in per_task if t not in tasks]
    section: dict[str, dict[str, Any]] = {}
    for task in tasks:
        info = meta.get(task, {})
        metric_names = [m for v in results.values() for m in v.get(task, {})]
        primary = info.get("primary") or _guess_primary(metric_names)
        hib = info.get("higher_is_better")
        section[f"lm-eval:{task}"] = {
            "primary": primary,
            "higher_is_better": hib if isinstance(hib, bool) else primary not in _LOWER_IS_BETTER,
            "n_examples": info.get("n_examples"),
            "config": dict(info.get("config") or {"harness": "lm-eval", "task": task}),
            "variants": {
                variant: {m: _json_number(v) for m, v in per_task[task].items()}
                for variant, per_task in results.items()
                if task in per_task
            },
        }
    return section


def _guess_primary(metric_names: Sequence[str]) -> str:
    names = [m for m in metric_names if not m.endswith("_stderr") and m not in TOKEN_METRICS]
    for candidate in ("acc", "exact_match", "word_perplexity"):
        if candidate in names:
            return candidate
    return names[0] if names else "acc"


def _json_number(value: Any) -> float | None:
    """Metric values as finite floats, ``None`` for NaN/inf (JSON has no such numbers)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
