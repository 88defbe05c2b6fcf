"""Baseline prompt compressors for the quality report: random word drop and Selective Context.

Both drop whole words and honour the budget the same way as the main compressor:

* **Words** are maximal runs of non-whitespace characters (regex ``\\S+``), so punctuation stays
  attached to its word ("end." is one word). The output keeps the original characters of every
  kept word, joined by one space, or by a newline where the original gap between the two kept
  words contained one.
* **Budget** is counted in tokens of the counter (tiktoken cl100k by default): ``rate`` keeps
  about ``rate * origin_tokens`` (the achieved rate is the largest not above it, within about
  one word), ``target_tokens`` is never exceeded. Words are taken in priority order until the
  rebuilt text's token count reaches the budget (binary search over the count of the real output).
* Several contexts share one budget: words of all contexts compete in one ranking, and the
  compressed contexts are joined by ``"\\n\\n"`` as in the main compressor.

:class:`SelectiveContextCompressor` ranks words by self-information under a causal LM (Li et
al., 2023, *Compressing Context to Enhance Inference Efficiency of LLMs*), computed per context
with :func:`.selfinfo.word_self_information`; :class:`RandomDropCompressor` ranks them at random.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokenlean.errors import TokenleanError

from .counting import get_counter
from .result import CompressionResult

__all__ = [
    "BaselineInputError",
    "RandomDropCompressor",
    "SelectiveContextCompressor",
    "split_words",
]

_WORD = re.compile(r"\S+")


class BaselineInputError(TokenleanError, ValueError):
    """Bad ``compress`` arguments (rate out of range, negative budget)."""


class BaselineTypeError(TokenleanError, TypeError):
    """``compress`` was given something other than a str or a list of str."""


def split_words(text: str) -> np.ndarray:
    """Character spans ``(n, 2)`` of the whitespace-separated words of ``text``."""
    spans = [m.span() for m in _WORD.finditer(text)]
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _contexts(text_or_list: Any) -> list[str]:
    if isinstance(text_or_list, str):
        return [text_or_list]
    if isinstance(text_or_list, (bytes, bytearray)):
        raise BaselineTypeError("compress() takes str, not bytes; decode the text first")
    if isinstance(text_or_list, Sequence):
        items = list(text_or_list)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise BaselineTypeError(f"context {i} is {type(item).__name__}, not str")
        return items
    raise BaselineTypeError(f"compress() takes a str or a list of str, got {type(text_or_list).__name__}")


def _check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise BaselineTypeError(f"rate must be a number in (0, 1], got {rate!r}")
    if not 0.0 < float(rate) <= 1.0:
        raise BaselineInputError(f"rate is the fraction of tokens kept and must be in (0, 1], got {rate!r}")
    return float(rate)


def _check_target(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BaselineTypeError(f"target_tokens must be an integer >= 0, got {value!r}")
    if value < 0:
        raise BaselineInputError(f"target_tokens must be >= 0, got {value!r}")
    return int(value)


def _rebuild(text: str, spans: np.ndarray, keep: np.ndarray) -> str:
    """Kept words (by their original characters), joined by a space or, across a newline, by one."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return ""
    parts = [text[spans[idx[0], 0] : spans[idx[0], 1]]]
    for prev, cur in zip(idx[:-1].tolist(), idx[1:].tolist()):
        gap = text[spans[prev, 1] : spans[cur, 0]]
        parts.append("\n" if "\n" in gap else " ")
        parts.append(text[spans[cur, 0] : spans[cur, 1]])
    return "".join(parts)


class _WordDropCompressor:
    """Shared budget logic: subclasses give each word of each context a priority."""

    method = "word-drop"

    def __init__(self, counter: str | Any = "cl100k") -> None:
        self.counter = get_counter(counter)

    def _priorities(self, contexts: list[str], spans: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def compress(
        self, text_or_list: str | Sequence[str], rate: float | None = None, target_tokens: int | None = None
    ) -> CompressionResult:
        """Compress one text or a list of contexts.

        Parameters
        ----------
        text_or_list : str or list of str
            The prompt, or its contexts (compressed under one shared budget).
        rate : float, optional
            Fraction of tokens to keep, in (0, 1] (0.5 when neither budget is given).
        target_tokens : int, optional
            Token budget (>= 0); takes precedence over ``rate``.

        Returns
        -------
        CompressionResult
        """
        contexts = _contexts(text_or_list)
        if rate is not None:
            rate = _check_rate(rate)
        if target_tokens is not None:
            target_tokens = _check_target(target_tokens)
        if rate is None and target_tokens is None:
            rate = 0.5
        origin = self.counter.count("\n\n".join(contexts)) if contexts else 0
        spans = [split_words(c) for c in contexts]
        words = [c[s:e] for c, sp in zip(contexts, spans) for s, e in sp.tolist()]
        info: dict[str, Any] = {"method": self.method}
        if origin == 0 or not words:
            texts = ["" if not c.strip() else c for c in contexts]
            return CompressionResult(
                text="\n\n".join(texts),
                texts=texts,
                origin_tokens=origin,
                compressed_tokens=self.counter.count("\n\n".join(texts)) if texts else 0,
                words=words,
                labels=[1] * len(words),
                counter=self.counter.name,
                info=info,
            )
        budget = target_tokens if target_tokens is not None else rate * origin
        info["budget_tokens"] = budget
        priorities = self._priorities(contexts, spans)
        # One ranking over all words of all contexts: (context, word) by descending priority.
        flat = np.concatenate(priorities) if priorities else np.zeros(0)
        owner = np.concatenate([np.full(len(sp), i) for i, sp in enumerate(spans)]).astype(np.int64)
        local = np.concatenate([np.arange(len(sp)) for sp in spans]).astype(np.int64)
        order = np.lexsort((np.arange(len(flat)), -flat))

        def build(k: int) -> list[str]:
            keep = [np.zeros(len(sp), dtype=bool) for sp in spans]
            chosen = order[:k]
            for c in np.unique(owner[chosen]).tolist():
                keep[c][local[chosen[owner[chosen] == c]]] = True
            return [_rebuild(ctx, sp, kp) for ctx, sp, kp in zip(contexts, spans, keep)]

        def count(k: int) -> int:
            return self.counter.count("\n\n".join(build(k)))

        # Largest k whose real output fits the budget (the count grows with k, up to tokenizer merges).
        lo, hi = 0, len(order)
        if count(hi) <= budget:
            lo = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if count(mid) <= budget:
                    lo = mid
                else:
                    hi = mid
        while lo > 0 and count(lo) > budget:  # guard against a non-monotone count
            lo -= 1
        if (
            target_tokens is None
            and lo < len(order)
            and abs(count(lo + 1) - budget) < abs(count(lo) - budget)
        ):
            lo += 1  # a rate is a target, not a ceiling: take the closer of the two
        texts = build(lo)
        kept = np.zeros(len(flat), dtype=np.int64)
        kept[order[:lo]] = 1
        text = "\n\n".join(texts)
        return CompressionResult(
            text=text,
            texts=texts,
            origin_tokens=origin,
            compressed_tokens=self.counter.count(text),
            words=words,
            labels=kept.tolist(),
            counter=self.counter.name,
            info=info,
        )


class RandomDropCompressor(_WordDropCompressor):
    """Keep randomly chosen words up to the budget (the floor any compressor should beat).

    Parameters
    ----------
    seed : int
        Seed of the word order; every ``compress`` call restarts from it, so the same input
        gives the same output.
    counter : str or tokenizer
        Token counter for budgets (tiktoken cl100k by default).
    """

    method = "random"

    def __init__(self, seed: int = 0, counter: str | Any = "cl100k") -> None:
        super().__init__(counter)
        self.seed = int(seed)

    def _priorities(self, contexts: list[str], spans: list[np.ndarray]) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        total = sum(len(sp) for sp in spans)
        flat = rng.permutation(total).astype(np.float64)
        out, start = [], 0
        for sp in spans:
            out.append(flat[start : start + len(sp)])
            start += len(sp)
        return out


class SelectiveContextCompressor(_WordDropCompressor):
    """Keep the words with the highest self-information under a causal LM (Selective Context).

    Parameters
    ----------
    model : str or model
        A causal LM zoo name, local folder or hub id (``"smollm2-135m"`` by default), or a loaded
        ``*ForCausalLM`` (then pass ``tokenizer``).
    tokenizer : optional
        The tokenizer of a loaded model.
    counter : str or tokenizer
        Token counter for budgets (tiktoken cl100k by default).
    window : int
        LM window for long contexts (see :func:`.selfinfo.word_self_information`).
    device : optional
        Where to run the LM.
    progress : bool
        Show a tqdm bar while scoring.
    """

    method = "selective-context"

    def __init__(
        self,
        model: str | Any = "smollm2-135m",
        tokenizer: Any = None,
        counter: str | Any = "cl100k",
        window: int = 1024,
        device: Any = None,
        progress: bool = False,
    ) -> None:
        super().__init__(counter)
        if isinstance(model, str):
            from tokenlean import zoo

            self.model, self.tokenizer = zoo.load(model, device=device, download=True)
            self.model_name = model
        else:
            if tokenizer is None:
                raise BaselineTypeError("pass tokenizer= together with a loaded model")
            self.model, self.tokenizer = model, tokenizer
            self.model_name = getattr(getattr(model, "config", None), "name_or_path", type(model).__name__)
        self.model.eval()
        self.window = int(window)
        self.progress = progress

    def _priorities(self, contexts: list[str], spans: list[np.ndarray]) -> list[np.ndarray]:
        from .selfinfo import word_self_information_many

        present = [i for i, sp in enumerate(spans) if len(sp)]
        scores = word_self_information_many(
            [contexts[i] for i in present],
            self.model,
            self.tokenizer,
            [spans[i] for i in present],
            window=self.window,
            progress=self.progress,
        )
        out = [np.zeros(len(sp)) for sp in spans]
        for i, s in zip(present, scores):
            out[i] = s
        return out
