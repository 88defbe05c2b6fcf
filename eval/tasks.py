"""Quality tasks: a task yields examples and scores each variant on them.

A task is registered by name with ``@register_task``. The bench runner calls
:meth:`Task.examples` once, then, for every example and every variant the task measures
(:attr:`Task.kinds`), :meth:`Task.run` with the variant's patch applied to the model (model
tasks implement :meth:`Task.score`; text tasks compress their inputs through
``bench.compress(variant, text)``). :meth:`Task.reference` runs once per example on the
unpatched model when :attr:`Task.needs_reference`. Every (example, variant) row is appended
to the run's ``samples.jsonl`` as it is made, so a run resumes where it stopped. At the end
:meth:`Task.aggregate` summarises each variant's rows, :meth:`Task.compare` pairs each
variant's rows with the baseline's, and :meth:`Task.extra` adds task-level figures; the report
renders them with the generic table, or with the section registered under :attr:`Task.section`
(:func:`tokenlean.eval.report.register_section`).

Built in here:

* ``perplexity``: token-level perplexity of a causal LM on windows of a long local text.
* ``fidelity``: how closely the patched model follows the unpatched one on the same windows:
  top-1 next-token agreement and mean KL(unpatched || patched) per token.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenlean.errors import did_you_mean
from tokenlean.methods import split_spec

__all__ = ["Example", "FidelityTask", "PerplexityTask", "Task", "get_task", "register_task", "task_names"]

_TASKS: dict[str, Callable[..., Task]] = {}


@dataclass(frozen=True)
class Example:
    """One unit of evaluation: a stable ``id`` (used to resume runs) and its ``data``."""

    id: str
    data: Any


class Task(abc.ABC):
    """Base class of quality tasks.

    Class attributes
    ----------------
    name, primary, higher_is_better
        The task's name, its primary metric (an :meth:`aggregate` key) and that metric's direction.
    needs_reference
        Whether :meth:`reference` runs on the unpatched model before the variants.
    kinds
        The variant kinds (``baseline``, ``patch``, ``compressor``) the task measures; other
        variants get no row. Model tasks (perplexity...) measure patches; text tasks (needle...)
        measure compressors; a task where both matter (BBH) measures both.
    order
        ``"example"``: every variant runs an example before the next example starts (the
        reference is computed once per example); ``"variant"``: each variant runs all its
        examples in turn (for tasks that reuse per-variant state, such as a prompt's KV cache).
    section
        The report section that renders the task (:func:`tokenlean.eval.report.register_section`);
        empty for the generic table.
    needs_model
        Whether the task runs the bench's language model (a run with ``--model none`` only
        takes tasks that do not, such as needle retention of prompt compressors).
    """

    name: str = ""
    primary: str = ""
    higher_is_better: bool = True
    needs_reference: bool = False
    kinds: tuple[str, ...] = ("baseline", "patch")
    order: str = "example"
    section: str = ""
    needs_model: bool = True

    @abc.abstractmethod
    def examples(self, tokenizer: Any) -> list[Example]:
        """The task's examples, in a fixed order with stable ids."""

    def reference(self, model: torch.nn.Module, example: Example) -> Any:
        """Output of the unpatched model that :meth:`score` compares against."""
        return None

    def measures(self, variant: Any, example: Example) -> bool:
        """Whether ``variant`` runs ``example`` (default: always; e.g. ``passkey:baseline_max=...``
        leaves the longest prompts to the patches). A variant's rows are those of the examples it runs."""
        return True

    def score(self, model: torch.nn.Module, example: Example, reference: Any) -> dict[str, float]:
        """Metrics of ``model`` (patched or not) on one example: what model tasks implement."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor run()")

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        """Metrics of one variant on one example (one JSON-able row of ``samples.jsonl``).

        Parameters
        ----------
        bench : tokenlean.eval.context.BenchContext
            The run: ``bench.model`` carries ``variant``'s patch while this runs;
            ``bench.compress(variant, text)`` gives the text as ``variant`` hands it to the model.
        variant : tokenlean.eval.variants.Variant
        example : Example
        reference : Any
            :meth:`reference`'s output for this example (None unless :attr:`needs_reference`).

        The default calls :meth:`score` on ``bench.model``. A row may carry
        ``origin_tokens``/``compressed_tokens``/``compress_s`` for one compress call; the runner
        pools those into the report's "tokens saved" figures.
        """
        return self.score(bench.model, example, reference)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Combine per-example rows; default: the mean of every metric."""
        keys = rows[0].keys() if rows else ()
        return {k: float(sum(r[k] for r in rows) / len(rows)) for k in keys}

    def compare(self, rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
        """Paired figures of a variant against the baseline on the same examples (default: none)."""
        return {}

    def extra(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Task-level figures for the task's report section, from every variant's rows (default: none)."""
        return {}

    def config(self) -> dict[str, Any]:
        """Settings that define the task's examples (stored in the run so resumes match)."""
        return {}


def register_task(name: str):
    """Register a task factory (a class or a function returning a :class:`Task`) under ``name``."""

    def decorator(factory):
        _TASKS[name] = factory
        return factory

    return decorator


#: Modules whose import registers the built-in tasks (beyond the two defined here).
BUILTIN_TASK_MODULES = (
    "tokenlean.eval.sts",
    "tokenlean.eval.prompt_tasks",
    "tokenlean.eval.fact_tasks",
    "tokenlean.eval.vision",
    "tokenlean.eval.vqa",
)


def _load_builtin_tasks() -> None:
    import importlib

    for module in BUILTIN_TASK_MODULES:
        importlib.import_module(module)


def task_names() -> list[str]:
    """Names of the registered tasks."""
    _load_builtin_tasks()
    return sorted(_TASKS)


def get_task(spec: str, **defaults: Any) -> Task:
    """Instantiate a task from ``"name"`` or ``"name:k=v,k2=v2"``.

    Options in the spec are converted to int or float where they parse as one (``none`` gives
    ``None``) and override ``defaults``; defaults the task does not take (e.g. the window
    options the bench passes to every task) are dropped. A task built with options in its spec
    is named by the whole spec, so one run can hold the same task with different options.
    Unknown names get close names suggested.
    """
    try:
        name, items = split_spec(spec)
    except ValueError as exc:
        raise ValueError(f"bad task option {exc}") from None
    _load_builtin_tasks()
    if name not in _TASKS:
        raise ValueError(
            f"unknown task {name!r}.{did_you_mean(name, _TASKS)} Tasks: {', '.join(task_names())}"
        )
    factory = _TASKS[name]
    options = {key: _option_value(raw) for key, raw in items}
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise ValueError(
            f"task {spec!r} has no option(s) {', '.join(unknown)}; options: {', '.join(accepted)}"
        )
    try:
        task = factory(**{**kwargs, **options})
    except TypeError as exc:
        raise ValueError(f"bad options for task {spec!r}: {exc}") from None
    if options:
        task.name = spec
    return task


def _option_value(raw: str) -> Any:
    """A task option's value: ``None`` for ``none``, else an int or float where it parses as one."""
    if raw.lower() == "none":
        return None
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            continue
    return raw


HELD_OUT_DOCUMENTS = 10


def text_token_ids(tokenizer: Any, text: str, documents: str = "all") -> torch.Tensor:
    """``(n_tokens,)`` ids of the local text ``text`` (see :func:`tokenlean.data.load_text`), no special tokens.

    ``documents="heldout"`` takes only its last ten documents (for the essays: the ones no
    tokenlean training command learns from: ``train-compressor``'s and ``train-landmark``'s held-out set).
    """
    from tokenlean.data import load_documents, load_text

    if documents == "all":
        body = load_text(text)
    elif documents == "heldout":
        body = "\n\n".join(load_documents(text)[-HELD_OUT_DOCUMENTS:])
    else:
        raise ValueError(f"documents must be 'all' or 'heldout', got {documents!r}")
    return tokenizer(body, return_tensors="pt", add_special_tokens=False).input_ids[0]


class _TextWindows(Task):
    """Shared by the LM tasks: ``n_windows`` non-overlapping windows of ``context_tokens`` tokens."""

    def __init__(
        self,
        text: str = "paul-graham-essays",
        context_tokens: int = 1024,
        n_windows: int = 8,
        documents: str = "all",
    ) -> None:
        if documents not in ("all", "heldout"):
            raise ValueError(f"documents must be 'all' or 'heldout', got {documents!r}")
        if context_tokens < 2:
            raise ValueError(f"context_tokens must be >= 2, got {context_tokens}")
        if n_windows < 1:
            raise ValueError(f"n_windows must be >= 1, got {n_windows}")
        self.text = text
        self.context_tokens = context_tokens
        self.n_windows = n_windows
        self.documents = documents

    def config(self) -> dict[str, Any]:
        config = {"text": self.text, "context_tokens": self.context_tokens, "n_windows": self.n_windows}
        if self.documents != "all":  # keeps the configs (and resumable runs) of earlier reports as they were
            config["documents"] = self.documents
        return config

    def examples(self, tokenizer: Any) -> list[Example]:
        ids = text_token_ids(tokenizer, self.text, self.documents)
        available = ids.numel() // self.context_tokens
        if available < self.n_windows:
            raise ValueError(
                f"{self.text!r} has {ids.numel()} tokens: only {available} windows of {self.context_tokens}"
            )
        return [
            Example(
                id=f"window-{i}",
                data=ids[i * self.context_tokens : (i + 1) * self.context_tokens].clone(),
            )
            for i in range(self.n_windows)
        ]

    @staticmethod
    def _log_probs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
        """``(context_tokens - 1, vocab)`` float32 log-probabilities of each next token."""
        device = next(model.parameters()).device
        with torch.inference_mode():
            logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1]
        return F.log_softmax(logits.float(), dim=-1)


@register_task("perplexity")
class PerplexityTask(_TextWindows):
    """Perplexity on windows of a long local text (lower is better)."""

    name = "perplexity"
    primary = "perplexity"
    higher_is_better = False

    def score(self, model: torch.nn.Module, example: Example, reference: Any) -> dict[str, float]:
        log_probs = self._log_probs(model, example.data)
        targets = example.data[1:].to(log_probs.device)
        nll = -log_probs.gather(-1, targets[:, None]).sum().item()
        return {"nll_sum": nll, "tokens": float(targets.numel())}

    def aggregate(self, rows: list[dict[str, float]]) -> dict[str, float]:
        nll = sum(r["nll_sum"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens}


@register_task("fidelity")
class FidelityTask(_TextWindows):
    """Agreement with the unpatched model: top-1 next-token agreement and KL divergence."""

    name = "fidelity"
    primary = "top1_agreement"
    higher_is_better = True
    needs_reference = True

    def reference(self, model: torch.nn.Module, example: Example) -> torch.Tensor:
        return self._log_probs(model, example.data)

    def score(self, model: torch.nn.Module, example: Example, reference: torch.Tensor) -> dict[str, float]:
        log_probs = self._log_probs(model, example.data)
        agreement = (log_probs.argmax(-1) == reference.argmax(-1)).float().mean().item()
        kl = F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1).mean().item()
        return {"top1_agreement": agreement, "kl_divergence": max(kl, 0.0)}
