"""Keep/drop word labels for training a compressor: from a teacher's scores, or from text pairs.

* :func:`teacher_labels` keeps the top ``rate`` fraction of words by score in every chunk of
  about one encoder window (LLMLingua-1-style distillation).
* :func:`align_compressed` labels the words of an original text from a compressed version of it
  (LLMLingua-2's recipe: GPT-4 compresses, then each compressed word is matched in order to the
  original), so users can train on their own domain data.
* :func:`load_labelled_jsonl` reads ``{"original": ..., "compressed": ...}`` lines (llmlingua's
  ``"prompt"`` / ``"compressed_prompt"`` keys are accepted too).

Words follow the student's convention (the default compressor's): with a WordPiece tokenizer a
word is a token not starting with ``##`` plus the ``##`` tokens after it; its character span is
from the start of its first token to the end of its last (:func:`word_spans`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenlean.errors import TokenleanError

__all__ = [
    "DEFAULT_CHUNK_CHARS",
    "LabelError",
    "LabelledDataError",
    "TextWords",
    "align_compressed",
    "chunk_ids",
    "group_f1",
    "load_labelled_jsonl",
    "student_tokenizer",
    "teacher_labels",
    "text_words",
    "top_fraction",
    "word_spans",
]

#: Characters per labelling chunk: about one 510-token encoder window of English prose
#: (minilm-l6's WordPiece averages ~4.5 characters per token on the Paul Graham essays).
DEFAULT_CHUNK_CHARS = 2300

#: How far ahead (in original words) a compressed word is looked for (LLMLingua-2's label_word.py
#: uses a window of 150 by default, 400 in its data collection script).
DEFAULT_ALIGN_WINDOW = 150


class LabelError(TokenleanError, ValueError):
    """Bad arguments for labelling."""


class LabelledDataError(LabelError):
    """A labelled-data file cannot be read (missing, not UTF-8, bad JSON, missing keys...)."""


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def student_tokenizer(name: str = "minilm-l6") -> Any:
    """The fast tokenizer of a zoo encoder (fetched on first use) or of a local folder."""
    from tokenlean import zoo

    if Path(name).is_dir():
        return _load_tokenizer(str(Path(name).resolve()))
    entry = zoo.get_entry(name)
    if not entry.is_cached:
        zoo.fetch(name)
    return _load_tokenizer(str(entry.path))


@dataclass
class TextWords:
    """A text tokenised by the student, with its words.

    Attributes
    ----------
    ids : int64 array
        Token ids (no special tokens).
    offsets : int64 array (n_tokens, 2)
        Character span of each token.
    word_of_token : int64 array
        Index of the word each token belongs to.
    spans : int64 array (n_words, 2)
        Character span of each word.
    """

    ids: np.ndarray
    offsets: np.ndarray
    word_of_token: np.ndarray
    spans: np.ndarray

    def words(self, text: str) -> list[str]:
        """The words as substrings of ``text``."""
        return [text[s:e] for s, e in self.spans.tolist()]


def text_words(tokenizer: Any, text: str) -> TextWords:
    """Tokenise ``text`` with a fast WordPiece tokenizer and group its tokens into words."""
    if not isinstance(text, str):
        raise LabelError(f"text must be str, got {type(text).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise LabelError("word spans need a fast tokenizer (character offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(ids) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return TextWords(ids, offsets, empty, empty.reshape(0, 2))
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    begins = np.fromiter((not t.startswith("##") for t in tokens), dtype=bool, count=len(tokens))
    begins[0] = True
    word_of_token = np.cumsum(begins) - 1
    first = np.flatnonzero(begins)
    last = np.append(first[1:] - 1, len(ids) - 1)
    spans = np.stack([offsets[first, 0], offsets[last, 1]], axis=1)
    return TextWords(ids, offsets, word_of_token.astype(np.int64), spans)


def word_spans(text: str, tokenizer: Any = None) -> np.ndarray:
    """Character spans ``(n_words, 2)`` of the student's words of ``text`` (minilm-l6's by default)."""
    return text_words(tokenizer if tokenizer is not None else student_tokenizer(), text).spans


def chunk_ids(word_spans: Any, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> np.ndarray:
    """Chunk index of each word: a new chunk starts at the first word starting ``chunk_chars``
    or more characters after the current chunk's first word."""
    spans = np.asarray(word_spans, dtype=np.int64).reshape(-1, 2)
    if int(chunk_chars) < 1:
        raise LabelError(f"chunk_chars must be >= 1, got {chunk_chars}")
    out = np.zeros(len(spans), dtype=np.int64)
    if len(spans) == 0:
        return out
    starts = spans[:, 0]
    chunk, begin = 0, starts[0]
    # One pass over chunk boundaries (searchsorted), not over words.
    i = 0
    while True:
        j = int(np.searchsorted(starts, begin + chunk_chars, side="left"))
        j = max(j, i + 1)
        out[i:j] = chunk
        if j >= len(starts):
            return out
        chunk, i, begin = chunk + 1, j, starts[j]


def _check_rate(rate: float) -> float:
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise LabelError(f"rate must be a number in (0, 1], got {rate!r}") from None
    if not 0.0 < value <= 1.0:
        raise LabelError(f"rate must be in (0, 1] (the fraction of words kept), got {rate}")
    return value


def top_fraction(scores: Any, groups: Any, keep_counts: Any) -> np.ndarray:
    """1 for the ``keep_counts[g]`` highest-scoring items of each group ``g`` (ties: earlier first)."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    labels = np.zeros(len(scores), dtype=np.int64)
    if len(scores) == 0:
        return labels
    # Sort by group, then by descending score, then by position (lexsort: last key is primary).
    order = np.lexsort((np.arange(len(scores)), -scores, groups))
    sorted_groups = groups[order]
    group_start = np.searchsorted(sorted_groups, sorted_groups, side="left")
    rank = np.arange(len(order)) - group_start
    labels[order] = (rank < np.asarray(keep_counts)[sorted_groups]).astype(np.int64)
    return labels


def teacher_labels(
    text: str,
    word_spans: Any,
    scores: Any,
    rate: float = 0.5,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> np.ndarray:
    """Keep the top ``rate`` fraction of words by teacher score in every chunk of the text.

    Parameters
    ----------
    text : str
        The text the spans index (used to check them).
    word_spans : array-like of (start, end)
        Character spans of the words, in text order.
    scores : array-like of float
        One score per word (e.g. self-information; higher = more worth keeping).
    rate : float
        Fraction of words kept, in (0, 1]; per chunk ``round(rate * n_words)`` words, at least one.
    chunk_chars : int
        Chunk length in characters (default about one 512-token encoder window), so that the
        labels are local: every part of a long text keeps its share.

    Returns
    -------
    numpy.ndarray
        ``int64`` 0/1 label per word (1 = keep).
    """
    if not isinstance(text, str):
        raise LabelError(f"text must be str, got {type(text).__name__}")
    rate = _check_rate(rate)
    spans = np.asarray(word_spans, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(spans) != len(scores):
        raise LabelError(f"{len(spans)} words but {len(scores)} scores")
    if len(spans) and ((spans[:, 0] < 0).any() or (spans[:, 1] > len(text)).any()):
        raise LabelError("word_spans fall outside the text")
    if np.isnan(scores).any():
        raise LabelError("scores contain NaN")
    if len(spans) == 0:
        return np.zeros(0, dtype=np.int64)
    groups = chunk_ids(spans, chunk_chars)
    sizes = np.bincount(groups)
    keep = np.maximum(1, np.rint(rate * sizes)).astype(np.int64)
    return top_fraction(scores, groups, keep)


def _normalise(word: str) -> str:
    return word.lower()


def _word_keys(tokenizer: Any, text: str) -> tuple[list[str], TextWords]:
    tw = text_words(tokenizer, text)
    if len(tw.ids) == 0:
        return [], tw
    tokens = tokenizer.convert_ids_to_tokens(tw.ids.tolist())
    pieces = [t[2:] if t.startswith("##") else t for t in tokens]
    keys = [""] * len(tw.spans)
    for piece, w in zip(pieces, tw.word_of_token.tolist()):
        keys[w] += piece
    return [_normalise(k) for k in keys], tw


def align_compressed(
    original: str,
    compressed: str,
    tokenizer: Any = None,
    window: int = DEFAULT_ALIGN_WINDOW,
) -> list[int]:
    """Label each word of ``original`` 1 if it survives in ``compressed``, else 0.

    Greedy in-order matching (as LLMLingua-2's ``label_word.py``): a pointer walks the original
    words; each compressed word is looked for among the next ``window`` original words, and the
    first match is labelled 1 and moves the pointer past it. A compressed word with no match
    (rephrased, reordered) is skipped. Words are compared as the student tokenizer sees them
    (WordPiece pieces joined; minilm-l6 lowercases and strips accents).

    Parameters
    ----------
    original, compressed : str
        The text and its compressed version.
    tokenizer : optional
        Fast WordPiece tokenizer defining the words (minilm-l6's by default).
    window : int
        Search window in original words (default 150).

    Returns
    -------
    list of int
        One 0/1 label per original word (see :func:`word_spans`).
    """
    if not isinstance(original, str) or not isinstance(compressed, str):
        raise LabelError(
            f"original and compressed must be str, got {type(original).__name__} and {type(compressed).__name__}"
        )
    if int(window) < 1:
        raise LabelError(f"window must be >= 1, got {window}")
    tok = tokenizer if tokenizer is not None else student_tokenizer()
    orig_keys, _ = _word_keys(tok, original)
    comp_keys, _ = _word_keys(tok, compressed)
    labels = [0] * len(orig_keys)
    # Positions of each key in the original, to find the next match without scanning word by word.
    positions: dict[str, list[int]] = {}
    for i, k in enumerate(orig_keys):
        positions.setdefault(k, []).append(i)
    import bisect

    pointer = 0
    for key in comp_keys:
        where = positions.get(key)
        if not where:
            continue
        j = bisect.bisect_left(where, pointer)
        if j < len(where) and where[j] < pointer + int(window):
            labels[where[j]] = 1
            pointer = where[j] + 1
    return labels


_ORIGINAL_KEYS = ("original", "prompt", "origin")
_COMPRESSED_KEYS = ("compressed", "compressed_prompt")


def load_labelled_jsonl(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read ``(original, compressed)`` pairs from a JSON-lines file.

    Each non-blank line is an object with ``"original"`` and ``"compressed"`` strings
    (llmlingua's ``"prompt"`` / ``"compressed_prompt"`` are accepted too).

    Raises
    ------
    LabelledDataError
        If the file is missing, not UTF-8, holds no pairs, or a line is not such an object
        (the message names the line).
    """
    p = Path(path)
    if not p.is_file():
        raise LabelledDataError(f"labelled data file {str(p)!r} does not exist")
    try:
        content = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelledDataError(f"{p} is not valid UTF-8 (byte {exc.start}): {exc.reason}") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LabelledDataError(f"{p}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise LabelledDataError(f"{p}:{number}: expected a JSON object, got {type(obj).__name__}")
        orig_key = next((k for k in _ORIGINAL_KEYS if k in obj), None)
        comp_key = next((k for k in _COMPRESSED_KEYS if k in obj), None)
        if orig_key is None or comp_key is None:
            raise LabelledDataError(
                f"{p}:{number}: needs keys 'original' and 'compressed' (or 'prompt' and "
                f"'compressed_prompt'), found {sorted(obj)}"
            )
        original, compressed = obj[orig_key], obj[comp_key]
        if not isinstance(original, str) or not isinstance(compressed, str):
            raise LabelledDataError(f"{p}:{number}: {orig_key!r} and {comp_key!r} must be strings")
        if not original.strip():
            raise LabelledDataError(f"{p}:{number}: {orig_key!r} is empty")
        pairs.append((original, compressed))
    if not pairs:
        raise LabelledDataError(f"{p} holds no labelled pairs")
    return pairs


def group_f1(reference: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray) -> float:
    """F1 of the keep class (label 1) of ``predicted`` against ``reference``; 1.0 if both keep nothing."""
    ref = np.asarray(reference, dtype=bool)
    pred = np.asarray(predicted, dtype=bool)
    tp = int((ref & pred).sum())
    denom = int(ref.sum() + pred.sum())
    return 1.0 if denom == 0 else 2.0 * tp / denom
