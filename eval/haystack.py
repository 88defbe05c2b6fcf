"""Haystacks: held-out essays, needle sentences and passkeys hidden in them.

Shared by the harness's compression tasks (``needle``), the offline lm-eval task pack
(needle-in-a-haystack, passkey retrieval) and the long-context measurements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenlean.errors import EvalError

__all__ = [
    "NEEDLE_TEMPLATE",
    "PASSKEY_QUESTION",
    "Needle",
    "Passkey",
    "heldout_essays",
    "insert_needle",
    "make_needles",
    "make_passkey",
    "sentence_starts",
    "truncate_to_tokens",
]


NEEDLE_TEMPLATE = "The special magic number for {city} is {number}."
_CITIES = (
    "Lisbon",
    "Nairobi",
    "Oslo",
    "Hanoi",
    "Montevideo",
    "Tbilisi",
    "Winnipeg",
    "Kyoto",
    "Valparaiso",
    "Tallinn",
    "Marrakesh",
    "Adelaide",
    "Bergen",
    "Cusco",
    "Dakar",
    "Gdansk",
    "Izmir",
    "Jaipur",
    "Ljubljana",
    "Quito",
)


@dataclass(frozen=True)
class Needle:
    """A needle sentence and the key fact that must survive (the number)."""

    sentence: str
    key: str
    city: str


def make_needles(n: int, seed: int = 0) -> list[Needle]:
    """``n`` needles with distinct cities (cycled) and random 7-digit numbers."""
    rng = np.random.default_rng(seed)
    needles = []
    for i in range(n):
        city = _CITIES[i % len(_CITIES)]
        number = str(int(rng.integers(1_000_000, 10_000_000)))
        needles.append(Needle(NEEDLE_TEMPLATE.format(city=city, number=number), number, city))
    return needles


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*")


def sentence_starts(text: str) -> list[int]:
    starts = {0, len(text)}
    starts.update(m.end() for m in _SENTENCE_END.finditer(text))
    return sorted(starts)


def insert_needle(haystack: str, needle: str, depth: float) -> tuple[str, tuple[int, int]]:
    """Insert ``needle`` at the sentence start nearest to ``depth`` (0 = start, 1 = end) of ``haystack``.

    Returns
    -------
    (str, (int, int))
        The new text and the needle's character span in it.
    """
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"needle depth must be in [0, 1], got {depth}")
    starts = sentence_starts(haystack)
    want = depth * len(haystack)
    at = min(starts, key=lambda s: (abs(s - want), s))
    before, after = haystack[:at], haystack[at:]
    if before and not before[-1].isspace():
        before += " "
    sep = "" if not after or after[0].isspace() else " "
    text = before + needle + sep + after
    return text, (len(before), len(before) + len(needle))


def truncate_to_tokens(text: str, counter: Any, max_tokens: int) -> str:
    """The longest prefix of ``text`` that ends at a sentence end and has at most ``max_tokens`` tokens.

    ``counter`` has ``.count(text) -> int`` (see ``compressors/prompt/counting.py``). A text
    already within the budget is returned whole (stripped).
    """
    text = text.strip()
    if counter.count(text) <= max_tokens:
        return text
    ends = [s for s in sentence_starts(text) if s > 0]
    lo, hi, best = 0, len(ends) - 1, ""
    while lo <= hi:  # token counts grow with the prefix length
        mid = (lo + hi) // 2
        candidate = text[: ends[mid]].rstrip()
        if counter.count(candidate) <= max_tokens:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return best


def heldout_essays(count: int = 10) -> list[tuple[str, str]]:
    """The last ``count`` Paul Graham essays (sorted file order), as ``(name, text)``.

    The default compressor is trained on the other essays; these are its held-out texts.
    """
    from tokenlean import data

    docs = data.load_documents("paul-graham-essays")
    if not 0 < count <= len(docs):
        raise EvalError(f"held-out essay count must be in 1..{len(docs)}, got {count}")
    first = len(docs) - count
    return [(f"essay{first + i:02d}", doc) for i, doc in enumerate(docs[first:])]


# --------------------------------------------------------------------------------------------
# passkey retrieval (Mohtashami & Jaggi 2023, the landmark-attention paper's test)
# --------------------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
#: What follows the haystack; the model's continuation should start with the key.
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Passkey:
    """A passkey prompt: ``prompt`` (intro, filler with the key line at ``depth``, question) and ``key``."""

    prompt: str
    key: str
    depth: float
    tokens: int


def make_passkey(n_tokens: int, depth: float, seed: int, count: Any) -> Passkey:
    """A random 5-digit pass key hidden at ``depth`` of a filler haystack of about ``n_tokens`` tokens.

    Parameters
    ----------
    n_tokens : int
        Target length of the whole prompt in the tokens of ``count`` (the filler is repeated
        until the prompt is as long as possible without exceeding it; at least one repetition).
    depth : float
        Where the key line goes among the filler repetitions, 0 = first, 1 = last.
    seed : int
        Seeds the key (``numpy.random.default_rng(seed)``), so a (seed, length, depth) triple
        always gives the same prompt.
    count : callable
        ``count(text) -> int``, the token counter (a tokenizer's length, or a
        ``compressors.prompt.counting`` counter's ``count``).

    Returns
    -------
    Passkey
    """
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"passkey depth must be in [0, 1], got {depth}")
    if n_tokens < 1:
        raise EvalError(f"passkey length must be a positive number of tokens, got {n_tokens}")
    key = str(int(np.random.default_rng(seed).integers(10_000, 100_000)))
    line = PASSKEY_LINE.format(key=key)

    def build(repeats: int) -> str:
        at = round(depth * repeats)
        fill = [PASSKEY_FILLER] * repeats
        return " ".join([PASSKEY_INTRO, *fill[:at], line, *fill[at:], PASSKEY_QUESTION])

    fixed = count(build(0))
    per = max(1, count(build(8)) - fixed) / 8  # tokens per filler repetition
    repeats = max(1, int((n_tokens - fixed) / per))
    while repeats > 1 and count(build(repeats)) > n_tokens:
        repeats -= max(1, int((count(build(repeats)) - n_tokens) / per))
    while count(build(repeats + 1)) <= n_tokens:
        repeats += 1
    prompt = build(repeats)
    return Passkey(prompt=prompt, key=key, depth=depth, tokens=count(prompt))
