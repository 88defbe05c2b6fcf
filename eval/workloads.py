"""Workloads: what the harness times, each variant in turn, interleaved.

A workload is registered by name with :func:`register_workload` and built from a spec
(``"generate"``, ``"compress:words=21000"``) plus the bench settings it reads. It declares its
metrics (unit and direction), which of them become speedups, the speedup the headline shows,
and which variant kinds it can time; :meth:`Workload.measure` times one run of one variant
(the runner applies a patch variant's patch around it). The runner rotates the order of the
variants every round and pairs each round's ratios against the reference variant (the
baseline, unless the workload names another, e.g. the peer a compressor is compared with).

Built in:

* ``generate``: prefill, time to first token, decode throughput, end-to-end and peak memory of
  greedy generation from a prompt cut from the bench text. A compressor variant compresses the
  prompt's text first: its ``compress_s`` counts in TTFT and e2e, and the model sees its
  shorter prompt (``prompt_tokens``).
* ``encode``: sentence embeddings with a :class:`~tokenlean.attention.SentenceEncoder` (Token
  Prepending and friends).
* ``compress``: prompt compressors on one long text: total time, time inside the encoder and
  the work around it, achieved rate; speedups against the reference compressor at the same rate
  (a peer when one is given), and the share of word decisions each variant shares with the others.
"""

from __future__ import annotations

import abc
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from tokenlean.errors import EvalError, did_you_mean
from tokenlean.methods import split_spec

from .context import BenchContext
from .latency import (
    ENCODE_METRICS,
    ENCODE_SPEEDUPS,
    LATENCY_METRICS,
    SPEEDUP_METRICS,
    measure_encode,
    measure_generation,
)
from .tasks import _option_value, text_token_ids
from .variants import Variant

__all__ = ["Workload", "get_workload", "register_workload", "workload_names"]

_WORKLOADS: dict[str, type[Workload]] = {}


class Workload(abc.ABC):
    """Base class of workloads.

    Class attributes
    ----------------
    name : str
    metrics : dict
        ``{metric: (unit, higher_is_better)}`` that :meth:`measure` returns.
    speedups : dict
        ``{speedup key: metric}``: the ratios computed against the reference per round.
    primary : str
        The speedup key the report's headline shows ("speed ×").
    kinds : tuple of str
        The variant kinds the workload times; other variants are not timed.
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[dict[str, tuple[str, bool]]] = {}
    speedups: ClassVar[dict[str, str]] = {}
    primary: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("baseline", "patch", "compressor")
    note: ClassVar[str] = ""
    #: whether the workload runs the bench's language model (``--model none`` runs those that do not)
    needs_model: ClassVar[bool] = True

    def __init__(self, bench: BenchContext) -> None:
        self.bench = bench

    def options(self) -> dict[str, Any]:
        """The settings that define the workload's inputs (stored in the record)."""
        return {}

    def timed(self, variants: Sequence[Variant]) -> list[Variant]:
        """The variants this workload times (by kind)."""
        return [v for v in variants if v.kind in self.kinds]

    def reference(self, variant: Variant, variants: Sequence[Variant]) -> str | None:
        """The variant whose time ``variant``'s speedups are relative to (None: none)."""
        return variants[0].name if variant.name != variants[0].name else None

    @abc.abstractmethod
    def measure(self, variant: Variant) -> dict[str, float]:
        """One timed run of ``variant`` (its patch applied by the caller): ``{metric: value}``."""

    def extra(self, variants: Sequence[Variant]) -> dict[str, Any]:
        """Figures beside the timings (e.g. output agreement), computed once after the rounds."""
        return {}


def register_workload(name: str) -> Callable[[type[Workload]], type[Workload]]:
    """Register a :class:`Workload` subclass under ``name``."""

    def decorator(cls: type[Workload]) -> type[Workload]:
        cls.name = name
        _WORKLOADS[name] = cls
        return cls

    return decorator


def workload_names() -> list[str]:
    return sorted(_WORKLOADS)


def parse_workload_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,..."`` -> ``(name, options)``; unknown names get close names suggested."""
    try:
        name, items = split_spec(spec)
    except ValueError as exc:
        raise EvalError(f"bad workload option {exc}") from None
    if name not in _WORKLOADS:
        raise EvalError(
            f"unknown workload {name!r}.{did_you_mean(name, _WORKLOADS)} Workloads: {', '.join(workload_names())}"
        )
    cls = _WORKLOADS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "bench")]
    options = {key: _option_value(raw) for key, raw in items}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise EvalError(
            f"workload {name!r} has no option(s) {', '.join(unknown)}; options: {', '.join(accepted)}"
        )
    return name, options


def get_workload_class(name: str) -> type[Workload]:
    """The workload class registered as ``name``."""
    return _WORKLOADS[parse_workload_spec(name)[0]]


def get_workload(spec: str, bench: BenchContext, **defaults: Any) -> Workload:
    """Build a workload from its spec; ``defaults`` (bench settings) fill options the spec leaves out."""
    name, options = parse_workload_spec(spec)
    cls = _WORKLOADS[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    try:
        return cls(bench, **{**kwargs, **options})
    except TypeError as exc:
        raise EvalError(f"bad options for workload {spec!r}: {exc}") from None


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

_GENERATE_METRICS = {**LATENCY_METRICS, "compress_s": ("s", False), "prompt_tokens": ("tokens", False)}


@register_workload("generate")
class GenerateWorkload(Workload):
    """Greedy generation of ``new_tokens`` tokens after a ``prompt_tokens``-token prompt (``batch_size`` rows)."""

    metrics = _GENERATE_METRICS
    speedups = SPEEDUP_METRICS
    primary = "e2e"
    note = (
        "A compressor variant's prompt is the same text compressed first: TTFT and e2e include the "
        "compression, prefill does not; prompt tokens = what the model was fed."
    )

    def __init__(
        self,
        bench: BenchContext,
        prompt_tokens: int = 512,
        new_tokens: int = 32,
        batch_size: int = 1,
        text: str = "paul-graham-essays",
    ) -> None:
        super().__init__(bench)
        for key, value in (
            ("prompt_tokens", prompt_tokens),
            ("new_tokens", new_tokens),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"generate workload: {key} must be a positive integer, got {value!r}")
        self.prompt_tokens, self.new_tokens, self.batch_size, self.text = (
            prompt_tokens,
            new_tokens,
            batch_size,
            text,
        )
        needed = prompt_tokens * batch_size
        ids = text_token_ids(bench.tokenizer, text)
        if ids.numel() < needed:
            raise EvalError(f"{text!r} has {ids.numel()} tokens, fewer than the {needed} the prompts need")
        self.prompts = ids[:needed].view(batch_size, prompt_tokens).to(bench.device)
        self._texts: list[str] | None = None
        self._counts: dict[str, tuple[int, int]] = {}

    def options(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "batch_size": self.batch_size,
            "text": self.text,
        }

    def _prompt_texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self.bench.tokenizer.decode(row) for row in self.prompts]
        return self._texts

    def _compressed_prompts(self, variant: Variant) -> tuple[torch.Tensor, float]:
        """The rows as ``variant`` compresses them, cut to the shortest row; and the compress time."""
        rows, seconds, origin, kept = [], 0.0, 0, 0
        for text in self._prompt_texts():
            compressed = self.bench.compress(variant, text)
            seconds += compressed.seconds
            origin, kept = origin + compressed.origin_tokens, kept + compressed.compressed_tokens
            ids = self.bench.tokenizer(
                compressed.text, add_special_tokens=False, return_tensors="pt"
            ).input_ids[0]
            rows.append(ids)
        self._counts[variant.name] = (origin, kept)
        shortest = max(1, min(len(r) for r in rows))
        return torch.stack([r[:shortest] for r in rows]).to(self.bench.device), seconds

    def measure(self, variant: Variant) -> dict[str, float]:
        prompts, compress_s = self.prompts, 0.0
        if variant.kind == "compressor":
            prompts, compress_s = self._compressed_prompts(variant)
        sample = measure_generation(self.bench.model, prompts, self.new_tokens).as_dict()
        sample["ttft_s"] += compress_s
        sample["e2e_s"] += compress_s
        sample["compress_s"] = compress_s
        sample["prompt_tokens"] = float(prompts.shape[1])
        if variant.kind == "compressor":  # the call's cl100k counts, for the run's tokens-saved figures
            sample["origin_tokens"], sample["compressed_tokens"] = self._counts[variant.name]
        return sample


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------


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
    raise EvalError(f"{text!r} has only {len(sentences)} sentences of 5 to 40 words, fewer than {n}")


@register_workload("encode")
class EncodeWorkload(Workload):
    """Sentence embeddings of ``sentences`` sentences with a SentenceEncoder following each variant's patch."""

    metrics = ENCODE_METRICS
    speedups = ENCODE_SPEEDUPS
    primary = "encode"
    kinds = ("baseline", "patch")

    def __init__(
        self,
        bench: BenchContext,
        prompt: str = "prompteol",
        sentences: int = 128,
        batch_size: int = 32,
        text: str = "paul-graham-essays",
    ) -> None:
        from tokenlean.attention import SentenceEncoder

        super().__init__(bench)
        if isinstance(sentences, bool) or not isinstance(sentences, int) or sentences < 1:
            raise EvalError(f"encode workload: sentences must be a positive integer, got {sentences!r}")
        self.prompt = None if str(prompt).lower() == "none" else prompt
        self.batch_size, self.text = batch_size, text
        self.sentences = bench_sentences(text, sentences)
        # the encoder follows each variant's patch: Token Prepending is timed against the same prompt
        self.encoder = SentenceEncoder(
            bench.model, bench.tokenizer, prompt=self.prompt, token_prepending="auto"
        )

    def options(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "sentences": len(self.sentences), "batch_size": self.batch_size}

    def measure(self, variant: Variant) -> dict[str, float]:
        return measure_encode(self.encoder, self.sentences, self.batch_size)


# --------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------


def text_of_words(text: str, n_words: int) -> str:
    """The first ``n_words`` space-separated words of the local text ``text`` (repeated if shorter)."""
    from tokenlean.data import load_text

    words = load_text(text).split(" ")
    while len(words) < n_words:
        words = words + words
    return " ".join(words[:n_words])


def _kept_mask(original: str, compressed: Any) -> np.ndarray:
    from .prompt_tasks import kept_char_mask

    return kept_char_mask(original, compressed.text, compressed.words, compressed.labels)


def _word_decisions(original: str, compressed: Any) -> np.ndarray:
    """Keep/drop per word of ``original`` (words = runs of word characters and punctuation)."""
    from .prompt_tasks import spans_kept, word_spans

    return spans_kept(_kept_mask(original, compressed), word_spans(original))


@register_workload("compress")
class CompressWorkload(Workload):
    """Prompt compressors on the first ``words`` words of the bench text, at each variant's rate.

    Speedups are against the reference compressor at the same rate: the spec given as
    ``reference``, else the first peer (llmlingua), else the first compressor.
    """

    metrics = {
        "compress_s": ("s", False),
        "encoder_s": ("s", False),
        "around_encoder_s": ("s", False),
        "achieved_rate": ("", False),
        "peak_memory_mb": ("MB", False),
    }
    speedups = {
        "compress": "compress_s",
        "encoder": "encoder_s",
        "around_encoder": "around_encoder_s",
        "peak_memory": "peak_memory_mb",
    }
    primary = "compress"
    kinds = ("compressor",)
    needs_model = False
    note = (
        "compress = the whole compress call; encoder = inside the classifier's forward; around the "
        "encoder = the rest (tokenising, chunking, word merging, selection, detokenising). Ratios are "
        "reference/variant at the same rate."
    )

    def __init__(
        self,
        bench: BenchContext,
        words: int = 21000,
        text: str = "paul-graham-essays",
        reference: str | None = None,
    ) -> None:
        super().__init__(bench)
        if isinstance(words, bool) or not isinstance(words, int) or words < 1:
            raise EvalError(f"compress workload: words must be a positive integer, got {words!r}")
        self.words, self.text, self.reference_spec = words, text, reference
        self.input = text_of_words(text, words)

    def options(self) -> dict[str, Any]:
        return {"words": self.words, "text": self.text, "reference": self.reference_spec}

    def _reference_spec(self, variants: Sequence[Variant]) -> str | None:
        compressors = [v for v in variants if v.kind == "compressor"]
        if not compressors:
            return None
        if self.reference_spec is not None:
            specs = {v.compressor for v in compressors}
            from .variants import _canonical_spec, get_compressor_factory, parse_compressor_spec

            name, opts = parse_compressor_spec(self.reference_spec)
            spec = _canonical_spec(name, opts, get_compressor_factory(name).positional)
            if spec not in specs:
                raise EvalError(f"reference compressor {self.reference_spec!r} is not among {sorted(specs)}")
            return spec
        peers = [v for v in compressors if v.peer]
        return (peers or compressors)[0].compressor

    def reference(self, variant: Variant, variants: Sequence[Variant]) -> str | None:
        spec = self._reference_spec(variants)
        if spec is None or variant.compressor == spec:
            return None
        match = [v for v in variants if v.compressor == spec and v.rate == variant.rate]
        return match[0].name if match else None

    def measure(self, variant: Variant) -> dict[str, float]:
        from .latency import _peak_memory_mb, _reset_peak_memory

        compressor = self.bench.compressors.get(variant)
        if hasattr(compressor, "clear_cache"):
            compressor.clear_cache()  # cold token-count caches: every round does the full work
        device = torch.device("cpu")
        _reset_peak_memory(device)
        result = self.bench.compress(variant, self.input)
        encoder = result.encoder_s if result.encoder_s is not None else float("nan")
        return {
            "origin_tokens": result.origin_tokens,
            "compressed_tokens": result.compressed_tokens,
            "compress_s": result.seconds,
            "encoder_s": encoder,
            "around_encoder_s": result.seconds - encoder,
            "achieved_rate": result.rate,
            "peak_memory_mb": _peak_memory_mb(device),
        }

    def extra(self, variants: Sequence[Variant]) -> dict[str, Any]:
        """Per rate: the share of word decisions each pair of variants agree on, and identical outputs."""
        timed = self.timed(variants)
        outputs = {v.name: self.bench.compress(v, self.input) for v in timed}
        decisions = {name: _word_decisions(self.input, out) for name, out in outputs.items()}
        agreement: dict[str, dict[str, float]] = {}
        identical: dict[str, dict[str, bool]] = {}
        for a in timed:
            for b in timed:
                if a.name == b.name or a.rate != b.rate:
                    continue
                agreement.setdefault(a.name, {})[b.name] = float(
                    np.mean(decisions[a.name] == decisions[b.name])
                )
                identical.setdefault(a.name, {})[b.name] = outputs[a.name].text == outputs[b.name].text
        return {
            "reference": self._reference_spec(variants),
            "input_tokens": outputs[timed[0].name].origin_tokens if timed else 0,
            "input_words": self.words,
            "word_agreement": agreement,
            "identical_output": identical,
        }


# --------------------------------------------------------------------------------------------
# the compress workload's own section
# --------------------------------------------------------------------------------------------


def _register_sections() -> None:
    from .report import Table, register_section, variant_label

    @register_section("workload:compress")
    def compress_agreement(record: Any, key: str, workload: Any) -> list:
        extra = workload.get("extra") or {}
        agreement = extra.get("word_agreement") or {}
        identical = extra.get("identical_output") or {}
        rows, seen = [], set()
        for a, others in agreement.items():
            for b, share in others.items():
                if (b, a) in seen:  # the figures are symmetric: each pair once
                    continue
                seen.add((a, b))
                same = identical.get(a, {}).get(b)
                rows.append(
                    [
                        variant_label(record, a),
                        variant_label(record, b),
                        f"{100 * share:.2f}%",
                        "yes" if same else "no",
                    ]
                )
        if not rows:
            return []
        note = (
            f"Input: the first {extra.get('input_words')} words of the bench text "
            f"({extra.get('input_tokens')} cl100k tokens). Word decisions: keep/drop of every word and "
            "punctuation mark of the input, read from each compressor's own word labels; pairs at the same rate."
        )
        return [
            Table(["variant", "compared with", "same word decisions", "identical output"], rows, 2, note=note)
        ]


_register_sections()

from . import vision as _vision  # noqa: E402,F401  (registers the vision workload)
