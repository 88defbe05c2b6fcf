"""Run lm-evaluation-harness tasks on a loaded (optionally tokenlean-patched) model, offline.

The bridge hands an already-loaded Hugging Face model to `lm-eval
<https://github.com/EleutherAI/lm-evaluation-harness>`_ (``pip install "tokenlean[lmeval]"``),
runs the unpatched baseline and then every method with its patch applied around the run, all in
one process, and converts the scores into the ``quality`` section of a tokenlean report.

lm-eval's built-in tasks download their data from the Hugging Face hub. The bridge ships its own
offline tasks, written as an lm-eval include folder by :func:`local_task_dir` from the locally
cached Paul Graham essays (:func:`tokenlean.data.load_text`):

* ``tokenlean_pg_essays``: ``loglikelihood_rolling`` perplexity, one document per essay
  (``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``, as lm-eval's ``wikitext``).
* ``tokenlean_pg_cloze``: ``multiple_choice``; the context is two consecutive sentences of an
  essay, the choices are the sentence that really follows and three sentences of similar length
  from other essays (``acc``, ``acc_norm``; chance is 25 %).

Both carry the tag ``tokenlean``, so ``tasks=["tokenlean"]`` runs them all.

Example::

    import tokenlean
    from tokenlean.eval.lm_eval_bridge import evaluate, quality_section

    model, tokenizer = tokenlean.zoo.load("smollm2-135m")
    results = evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=["sink_window:window=64"], limit=50)
    results["baseline"]["tokenlean_pg_cloze"]["acc"]        # e.g. 0.6
    record["quality"].update(quality_section(results))      # "lm-eval:tokenlean_pg_cloze": {...}
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenlean
from tokenlean._io import atomic_write_text
from tokenlean.errors import PatchError
from tokenlean.methods import Method

from .bench import make_variants

__all__ = [
    "LOCAL_TASKS",
    "LMEvalResults",
    "evaluate",
    "local_task_dir",
    "quality_section",
]

logger = logging.getLogger(__name__)

#: Offline tasks written by :func:`local_task_dir`.
LOCAL_TASKS: tuple[str, ...] = ("tokenlean_pg_essays", "tokenlean_pg_cloze")
#: Tag grouping the offline tasks (``tasks=["tokenlean"]`` runs them all).
LOCAL_TAG = "tokenlean"
#: Task names starting with this prefix are never looked up among lm-eval's built-in tasks.
_RESERVED_PREFIX = "tokenlean_"

_TEXT = "paul-graham-essays"
_RECIPE_VERSION = 1  # bump when the generated data or YAML change meaning
_CLOZE_EXAMPLES = 200
_CLOZE_SEED = 1234
_CLOZE_CONTEXT_SENTENCES = 2
_CLOZE_DISTRACTORS = 3
_CLOZE_MIN_CHARS, _CLOZE_MAX_CHARS, _CLOZE_MIN_WORDS = 40, 240, 6

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")

# primary metric candidates by lm-eval output type, first present wins
_PRIMARY_BY_OUTPUT_TYPE = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "loglikelihood": ("acc", "perplexity"),
}
_NOT_METRICS = {"alias", "sample_len"}  # entries of lm-eval's per-task results that are not scores
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ter"}


class LMEvalResults(dict):
    """What :func:`evaluate` returns: ``{variant: {task: {metric: value}}}``, baseline first.

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
# Offline task folder
# ---------------------------------------------------------------------------------------------


def local_task_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Write the offline lm-eval tasks and their data into ``root`` and return it.

    The folder is an lm-eval include folder (``TaskManager(include_path=...)``)::

        <root>/tokenlean_pg_essays.yaml
        <root>/tokenlean_pg_cloze.yaml
        <root>/data/pg_essays.jsonl     # {"id", "text"}: one essay per line
        <root>/data/pg_cloze.jsonl      # {"id", "essay", "context", "choices", "gold"}

    The YAMLs load their data with ``dataset_path: json`` from the absolute paths of the JSONL
    files (lm-eval hands ``data_files`` to ``datasets.load_dataset`` unchanged, so a relative
    path would be read from the current folder). Every file is written atomically and only
    when its content changes, so calling this again is cheap and leaves the folder (and the
    ``datasets`` cache built from it) untouched. Everything is derived deterministically from
    :func:`tokenlean.data.load_text` (``"paul-graham-essays"``, fetched on first use).

    Parameters
    ----------
    root : path-like, optional
        Target folder, created if needed. Default: ``tokenlean.zoo.cache_dir() / "lm_eval_tasks"``.

    Returns
    -------
    Path
        The absolute folder path.
    """
    from tokenlean import zoo

    root = Path(root).expanduser() if root is not None else zoo.cache_dir() / "lm_eval_tasks"
    root = root.absolute()
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    essays = _essays()
    essay_docs = [{"id": name, "text": text} for name, text in essays]
    cloze_docs = _cloze_docs(essays)
    essays_file = data_dir / "pg_essays.jsonl"
    cloze_file = data_dir / "pg_cloze.jsonl"
    _write_if_changed(essays_file, _jsonl(essay_docs))
    _write_if_changed(cloze_file, _jsonl(cloze_docs))

    common = {"tag": [LOCAL_TAG], "dataset_path": "json"}
    essays_yaml = {
        "task": "tokenlean_pg_essays",
        **common,
        "dataset_kwargs": {"data_files": {"test": str(essays_file)}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": float(_RECIPE_VERSION)},
    }
    cloze_yaml = {
        "task": "tokenlean_pg_cloze",
        **common,
        "dataset_kwargs": {"data_files": {"test": str(cloze_file)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
        ],
        "metadata": {"version": float(_RECIPE_VERSION)},
    }
    header = {
        "tokenlean_pg_essays": (
            f"Perplexity on {len(essay_docs)} Paul Graham essays, one document per essay."
        ),
        "tokenlean_pg_cloze": (
            f"Next-sentence cloze: {len(cloze_docs)} examples, {_CLOZE_CONTEXT_SENTENCES} sentences of "
            f"context, the true next sentence + {_CLOZE_DISTRACTORS} length-matched sentences from "
            f"other essays (seed {_CLOZE_SEED}); chance accuracy {1 / (1 + _CLOZE_DISTRACTORS):.2f}."
        ),
    }
    for config in (essays_yaml, cloze_yaml):
        _write_if_changed(root / f"{config['task']}.yaml", _yaml(config, header[config["task"]]))
    return root


def _essays() -> list[tuple[str, str]]:
    """``[(name, text)]`` of the essays, in :func:`tokenlean.data.load_text`'s (sorted) order."""
    from tokenlean import data, zoo

    joined = data.load_text(_TEXT)  # fetches and validates the cache folder
    folder = data.fetch_text(_TEXT)
    manifest = json.loads((folder / zoo.MANIFEST_NAME).read_text(encoding="utf-8"))
    paths = sorted(f["path"] for f in manifest["files"] if f["path"].endswith(".txt"))
    texts = [(folder / rel).read_text(encoding="utf-8") for rel in paths]
    if "\n\n".join(texts) != joined:  # pragma: no cover - guards against a changed data module
        raise RuntimeError(f"the {_TEXT!r} files do not add up to tokenlean.data.load_text({_TEXT!r})")
    return [(Path(rel).stem, text.strip()) for rel, text in zip(paths, texts) if text.strip()]


def _sentences(text: str) -> list[str]:
    """Split a scraped essay into sentences (paragraph breaks were lost in the scrape)."""
    text = re.sub(rf"^\s*(?:{_MONTHS}) \d{{4}}", "", text)  # leading date, glued to the first word
    text = re.sub(r"\[\d+\]", " ", text)  # footnote markers
    text = re.sub(r"([a-z0-9)][.?!][\"'”’)]?)([A-Z\"“])", r"\1 \2", text)  # "end.Next" -> "end. Next"
    text = re.sub(r"\s+", " ", text).strip()
    parts = re.split(r"(?<=[.?!])\s+(?=[\"“(]?[A-Z])|(?<=[.?!][\"”)])\s+(?=[A-Z])", text)
    return [p.strip() for p in parts if p.strip()]


def _is_candidate(sentence: str) -> bool:
    return (
        _CLOZE_MIN_CHARS <= len(sentence) <= _CLOZE_MAX_CHARS
        and len(sentence.split()) >= _CLOZE_MIN_WORDS
        and sentence[-1] in '.?!"”)'
        and not re.search(r"https?:|www\.|\[|\]", sentence)
    )


def _cloze_docs(essays: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The cloze examples, in a seeded random order (so any prefix is a random sample)."""
    rng = random.Random(_CLOZE_SEED)
    by_essay = {name: _sentences(text) for name, text in essays}
    pool = [(name, s) for name, sents in by_essay.items() for s in sents if _is_candidate(s)]
    pool.sort(key=lambda item: len(item[1]))
    lengths = [len(s) for _, s in pool]
    targets = [
        (name, i)
        for name, sents in by_essay.items()
        for i in range(_CLOZE_CONTEXT_SENTENCES, len(sents))
        if _is_candidate(sents[i])
        and all(len(c.split()) >= 3 for c in sents[i - _CLOZE_CONTEXT_SENTENCES : i])
    ]
    docs = []
    for name, i in rng.sample(targets, min(_CLOZE_EXAMPLES, len(targets))):
        sents = by_essay[name]
        answer = sents[i]
        choices = [answer, *_distractors(rng, pool, lengths, name, answer)]
        order = list(range(len(choices)))
        rng.shuffle(order)
        docs.append(
            {
                "id": f"{name}:{i}",
                "essay": name,
                "context": " ".join(sents[i - _CLOZE_CONTEXT_SENTENCES : i]),
                "choices": [choices[j] for j in order],
                "gold": order.index(0),
            }
        )
    return docs


def _distractors(
    rng: random.Random, pool: list[tuple[str, str]], lengths: list[int], essay: str, answer: str
) -> list[str]:
    """Sentences from other essays whose length is closest to the answer's (ties broken at random)."""
    import bisect

    center = bisect.bisect_left(lengths, len(answer))
    for width in (10, 20, 40, 80, len(pool)):
        lo, hi = max(0, center - width), min(len(pool), center + width)
        options = sorted({s for name, s in pool[lo:hi] if name != essay and s != answer})
        if len(options) >= _CLOZE_DISTRACTORS:
            return rng.sample(options, _CLOZE_DISTRACTORS)
    raise RuntimeError("not enough sentences for cloze distractors")  # pragma: no cover


def _jsonl(docs: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


def _yaml(config: Mapping[str, Any], description: str) -> str:
    import yaml

    body = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, width=100)
    return (
        f"# {description}\n"
        f"# Generated by tokenlean.eval.lm_eval_bridge.local_task_dir (recipe {_RECIPE_VERSION}); "
        "edits are overwritten.\n" + body
    )


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    methods: Sequence[Method | str] = (),
    limit: int | float | Mapping[str, int | float | None] | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    progress: bool = True,
) -> LMEvalResults:
    """Run lm-eval ``tasks`` on the unpatched model, then with each method's patch applied.

    One ``lm_eval.models.huggingface.HFLM`` wraps ``model`` for every run; each run is an
    ``lm_eval.simple_evaluate`` call, the methods' runs inside ``with tokenlean.patch(model,
    method):``, so the model is back to its original state (bitwise) when this returns, even
    on an error. Tasks are looked up in :func:`local_task_dir` (plus ``include_path``); a task
    not found there is looked up among lm-eval's built-in tasks (indexing them takes ~15 s and
    they usually download data from the Hugging Face hub).

    The run is offline: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set (only where unset)
    for the duration of the call and restored afterwards. Request caching, sample logging and
    result files are off: nothing is written outside the task folder and the ``datasets`` cache.
    The global ``random``/``numpy``/``torch`` RNG states, which lm-eval reseeds, are restored
    after each run, as are the model's train/eval mode and the tokenizer's pad token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A loaded causal LM with no tokenlean patch applied.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    tasks : str or sequence of str
        lm-eval task, group or tag names, e.g. ``["tokenlean_pg_cloze", "tokenlean_pg_essays"]``.
    methods : sequence of Method or str
        Method objects or specs (``"sink_window:window=64"``). A variant is named after its
        method, or after its spec when two methods share a name.
    limit : int, float, mapping or None
        lm-eval's ``limit``: at most this many documents per task (a float < 1 is a fraction).
        A mapping ``{task: limit}`` gives tasks different limits (tasks not in it run in full).
    batch_size : int
        lm-eval's batch size.
    include_path : path-like or sequence of path-like, optional
        Extra folders of lm-eval task YAMLs, searched together with the local task folder.
    progress : bool
        Show lm-eval's per-request progress bars (its short per-task "building requests" bar
        cannot be switched off).

    Returns
    -------
    LMEvalResults
        ``{variant: {task: {metric: value}}}`` with ``"baseline"`` first, then one entry per
        method. Metric names are lm-eval's with the default filter suffix ``",none"`` removed
        (other filters stay, e.g. ``"exact_match,strict-match"``); standard errors are kept as
        ``"<metric>_stderr"`` where lm-eval computed one (non-numeric values such as ``"N/A"``
        are dropped). :attr:`LMEvalResults.tasks` holds per-task information for
        :func:`quality_section`.

    Raises
    ------
    ImportError
        lm-eval is not installed.
    PatchError
        The model already carries a tokenlean patch.
    MethodConfigError
        A method spec is invalid.
    ValueError
        An unknown task name, an empty task list or the same method configuration twice; all
        checked before the model runs.
    """
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list or not all(isinstance(t, str) and t for t in task_list):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
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
    variants = [(v.name, v.method) for v in make_variants(methods)]

    with _offline_hub():
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise ImportError(
                'the lm-eval bridge needs lm-eval: pip install "tokenlean[lmeval]" (or "lm-eval>=0.4.5")'
            ) from exc

        folders = [local_task_dir()]
        if include_path is not None:
            extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
            folders += [Path(p).expanduser().absolute() for p in extra]
        manager = _task_manager(TaskManager, folders, task_list)
        runs = _limit_groups(task_list, limit)

        lm = _make_lm(model, tokenizer, batch_size, progress)
        results = LMEvalResults()
        with _restored_state(model, tokenizer):
            for name, method in variants:
                per_task: dict[str, dict[str, float]] = {}
                for run_tasks, run_limit in runs:
                    with _restored_rng(), _maybe_patch(model, method):
                        raw = lm_eval.simple_evaluate(
                            model=lm,
                            tasks=run_tasks,
                            task_manager=manager,
                            limit=run_limit,
                            batch_size=batch_size,
                            use_cache=None,
                            cache_requests=False,
                            log_samples=False,
                            write_out=False,
                            evaluation_tracker=None,
                            bootstrap_iters=1000,
                        )
                    for task, metrics in raw["results"].items():
                        per_task[task] = _clean_metrics(metrics)
                        if task not in results.tasks:
                            results.tasks[task] = _task_meta(raw, task, per_task[task], run_limit)
                results[name] = per_task
                logger.info("lm-eval %s: %s", name, _summary(per_task, results.tasks))
    return results


def _task_manager(task_manager_cls: Any, folders: list[Path], tasks: list[str]) -> Any:
    """A TaskManager over ``folders``, or over lm-eval's built-in tasks too if a task needs them."""
    local = task_manager_cls(include_path=[str(f) for f in folders], include_defaults=False)
    missing = [t for t in tasks if t not in local.all_tasks]
    if not missing:
        return local
    available = ", ".join(local.all_tasks)
    reserved = [t for t in missing if t.startswith(_RESERVED_PREFIX) or t == LOCAL_TAG]
    if reserved:
        hints = [
            f"{t!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(t)
            for t in reserved
            for close in [difflib.get_close_matches(t, local.all_tasks, n=2)]
        ]
        raise ValueError(f"unknown lm-eval task(s) {', '.join(hints)}; local tasks: {available}")
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
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(hints)}: neither local nor built into lm-eval; "
            f"local tasks: {available}"
        )
    return full


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


def _make_lm(model: Any, tokenizer: Any, batch_size: int, progress: bool) -> Any:
    """An HFLM around the loaded model whose request progress bars follow ``progress``."""
    from lm_eval.models.huggingface import HFLM

    class _BridgeLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            return super()._loglikelihood_tokens(
                requests, disable_tqdm=disable_tqdm or not progress, **kwargs
            )

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    return _BridgeLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


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
    names = [m for m in metrics if not m.endswith("_stderr") and "_stderr," not in m]
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
            parts.append(f"{task} {primary}={metrics[primary]:.4g}")
    return ", ".join(parts)


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing
        return None


@contextlib.contextmanager
def _maybe_patch(model: Any, method: Method | None) -> Iterator[None]:
    if method is None:
        yield
    else:
        with tokenlean.patch(model, method):
            yield


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Set the Hugging Face offline switches that the environment leaves unset, then restore them.

    ``datasets`` and ``huggingface_hub`` read the variables once, at import, so their module
    constants are switched too when the modules are already imported.
    """
    unset = [name for name in _OFFLINE_ENV if name not in os.environ]
    for name in unset:
        os.environ[name] = "1"
    saved: list[tuple[Any, str, Any]] = []
    if "HF_HUB_OFFLINE" in unset:
        import sys

        targets = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")]
        if "HF_DATASETS_OFFLINE" in unset:
            targets.append(("datasets.config", "HF_DATASETS_OFFLINE"))
        for module_name, attr in targets:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
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
        ``word_perplexity``, else the first metric; perplexities and bits per byte are lower
        is better.

    Returns
    -------
    dict
        ``{"lm-eval:<task>": {"primary", "higher_is_better", "n_examples", "config",
        "variants": {variant: {metric: value}}}}`` in task order; a non-finite value (an
        infinite perplexity) becomes ``None``, as JSON has no such numbers.
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
    names = [m for m in metric_names if not m.endswith("_stderr")]
    for candidate in ("acc", "word_perplexity"):
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
