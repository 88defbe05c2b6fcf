"""Quality of prompt compressors: few-shot accuracy, needle retention, agreement with the teacher.

Three measurements, each at several rates (fraction of tokens kept, cl100k), for any object with
``.compress(text_or_list, rate=...) -> CompressionResult``:

* **BBH few-shot accuracy.** The 3-shot chain-of-thought prompts of BIG-Bench Hard (Suzgun et
  al. 2022, the ``cot_fewshot`` prompts that lm-eval ships) are the demonstrations; each method
  compresses the three demonstrations (one context each); the task description and the test
  question stay verbatim. Test questions are BIG-bench's own examples of the task (from the
  ``bigbench`` package, see :func:`tokenlean.data.load_bbh`), formatted as BBH formats them
  (``Options: (A) ...``), minus the few that are demonstrations. A zoo causal LM reads
  ``description + demonstrations + "Q: <question>\\nA: So the answer is"`` and picks the answer
  label (``" (A"``, ``" Yes"``, ...) with the highest log-likelihood: no reasoning is generated,
  the demonstrations teach the task and the answer format. By default the label scores are
  calibrated (Zhao et al. 2021): the scores of a content-free question (``"Q: N/A"``) under the
  same prompt are subtracted, because small readers otherwise answer one label whatever the
  question. Reported against the uncompressed demonstrations and against no demonstrations at
  all, with Wilson intervals, a paired bootstrap interval of the change, the agreement with the
  uncompressed prompt's answers and the KL divergence of the answer distributions from it.
* **Needle retention.** A needle sentence ("The special magic number for <city> is <7 digits>.")
  is inserted at several depths into held-out Paul Graham essays; the key fact survives when the
  number is still in the compressed text, intact.
* **Agreement with the teacher.** Word-level precision/recall/F1 of the words a method keeps
  against the keep labels of the distillation teacher (self-information under a zoo LM, see
  ``compressors/prompt/labels.py``) at the same rate, on held-out essays. Methods segment text
  into words differently, so both sides are mapped to characters and scored on the teacher's
  words.

Every ``compress`` call also records the achieved rate (compressed / original cl100k tokens),
the "rate honoured" figure.

:func:`run_quality` runs all of it into a folder (resumable: finished units are appended to
``units.jsonl`` and skipped on a rerun, which may add methods, rates or tasks) and writes ``report.json``,
``report.md``, ``report.html`` and the plots ``quality_vs_rate.png`` and ``rate_honoured.png``,
all atomically and only once everything is rendered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import hashlib
import html
import inspect
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tokenlean._io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir
from tokenlean.errors import TokenleanError

__all__ = [
    "BBHItem",
    "ChoiceScorer",
    "QualityConfig",
    "QualityError",
    "SCHEMA",
    "add_quality_arguments",
    "bbh_cot_prompt",
    "bbh_items",
    "binary_f1",
    "bootstrap_ci",
    "format_bbh_example",
    "heldout_essays",
    "insert_needle",
    "kept_char_mask",
    "make_needles",
    "needle_retention",
    "paired_bootstrap_diff",
    "plot_quality_vs_rate",
    "plot_rate_honoured",
    "render_html",
    "render_markdown",
    "run_quality",
    "run_quality_command",
    "spans_kept",
    "teacher_word_scores",
    "truncate_to_tokens",
    "wilson_interval",
    "word_spans",
    "write_quality_report",
]

SCHEMA = "tokenlean.prompt_quality/1"
UNITS_NAME = "units.jsonl"
RUN_NAME = "run.json"
JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
QUALITY_PLOT_NAME = "quality_vs_rate.png"
RATE_PLOT_NAME = "rate_honoured.png"

DEFAULT_RATES = (0.5, 0.33, 0.2)
DEFAULT_METHODS = ("default", "random", "selective_context")
DEFAULT_TASKS = ("date_understanding", "logical_deduction_three_objects", "disambiguation_qa", "navigate")
METRICS = ("bbh", "needle", "teacher")

_DASH = "—"


class QualityError(TokenleanError, ValueError):
    """Bad settings for the quality run, or a run folder that belongs to other settings."""


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95 % for ``z = 1.96``).

    Returns ``(nan, nan)`` for ``n == 0``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise QualityError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (the mean by default) over the rows of ``values``.

    ``values`` may be 2-D (rows resampled together, e.g. per-document counts); ``stat`` then
    receives the resampled array. Returns ``(nan, nan)`` for no rows.
    """
    arr = np.asarray(values, dtype=float)
    if arr.shape[0] == 0:
        return float("nan"), float("nan")
    stat = stat or (lambda a: float(np.mean(a)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    stats = np.array([stat(arr[i]) for i in idx], dtype=float)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items, with a percentile bootstrap interval.

    Returns ``(mean, low, high)``.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape:
        raise QualityError(f"paired samples differ in shape: {a_arr.shape} vs {b_arr.shape}")
    diff = a_arr - b_arr
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    return float(diff.mean()), low, high


def binary_f1(pred: Sequence[bool] | np.ndarray, gold: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of ``pred`` against ``gold`` with "keep" (True) the positive class.

    Returns a dict with ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``, ``n``; an
    undefined ratio (no positives) is NaN.
    """
    p, g = np.asarray(pred, dtype=bool), np.asarray(gold, dtype=bool)
    if p.shape != g.shape:
        raise QualityError(f"pred and gold differ in length: {p.shape} vs {g.shape}")
    tp, fp, fn = int(np.sum(p & g)), int(np.sum(p & ~g)), int(np.sum(~p & g))
    return {**_prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "n": int(p.size)}


def _prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------------------------
# which characters of the original text a compressor kept
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SPACE_RE = re.compile(r"\s*")


def word_spans(text: str) -> np.ndarray:
    """Character spans ``(start, end)`` of the words (runs of word characters) and punctuation marks."""
    spans = [m.span() for m in _TOKEN_RE.finditer(text)]
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _locate_words(text: str, words: Sequence[str], slack: int = 16) -> np.ndarray | None:
    """Spans of ``words`` found in order in ``text`` (case-insensitive); None when one is not found.

    Each word must start within ``slack`` characters (after whitespace) of the previous word's
    end, so a word is never matched far ahead of where it belongs.
    """
    lower = text.lower()
    if len(lower) != len(text):  # a few characters change length when lower-cased
        return None
    spans = np.zeros((len(words), 2), dtype=np.int64)
    pos = 0
    for i, word in enumerate(words):
        w = word.strip().lower()
        if not w:
            spans[i] = (pos, pos)
            continue
        ahead = _SPACE_RE.match(lower, pos).end()  # whitespace before the word does not count
        start = lower.find(w, pos, ahead + len(w) + slack)
        if start < 0:
            return None
        spans[i] = (start, start + len(w))
        pos = start + len(w)
    return spans


def _aligned_mask(original: str, compressed: str) -> np.ndarray:
    """Kept-character mask from aligning the compressed text's tokens onto the original's."""
    mask = np.zeros(len(original), dtype=bool)
    orig = [(m.group().lower(), m.span()) for m in _TOKEN_RE.finditer(original)]
    comp = [m.group().lower() for m in _TOKEN_RE.finditer(compressed)]
    matcher = difflib.SequenceMatcher(None, [t for t, _ in orig], comp, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            start, end = orig[block.a + k][1]
            mask[start:end] = True
    return mask


def kept_char_mask(
    original: str,
    compressed: str,
    words: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    """Boolean mask over the characters of ``original``: True where the compressor kept them.

    With the compressor's ``words`` and keep ``labels`` (a :class:`CompressionResult`'s), the
    words are located in order in ``original`` and the kept ones marked. When that fails (no
    labels, or words that are not verbatim substrings, e.g. lower-cased by an uncased tokenizer
    *and* accent-stripped) the compressed text is aligned token by token onto the original
    (``difflib``; exact for compressors that only delete).

    Parameters
    ----------
    original : str
        The text given to the compressor.
    compressed : str
        The compressed text.
    words, labels : sequence, optional
        Per-word decisions (1 = kept), same length.

    Returns
    -------
    numpy.ndarray of bool, shape ``(len(original),)``
    """
    if words is not None and labels is not None and len(words) == len(labels) and len(words) > 0:
        spans = _locate_words(original, words)
        if spans is not None:
            mask = np.zeros(len(original), dtype=bool)
            for (start, end), keep in zip(spans, labels):
                if keep:
                    mask[start:end] = True
            return mask
    return _aligned_mask(original, compressed)


def spans_kept(mask: np.ndarray, spans: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """For each span, whether at least ``threshold`` of its characters are kept in ``mask``."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if spans.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    kept = csum[spans[:, 1]] - csum[spans[:, 0]]
    length = np.maximum(spans[:, 1] - spans[:, 0], 1)
    return kept / length >= threshold


# --------------------------------------------------------------------------------------------
# needles
# --------------------------------------------------------------------------------------------

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


def _sentence_starts(text: str) -> list[int]:
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
        raise QualityError(f"needle depth must be in [0, 1], got {depth}")
    starts = _sentence_starts(haystack)
    want = depth * len(haystack)
    at = min(starts, key=lambda s: (abs(s - want), s))
    before, after = haystack[:at], haystack[at:]
    if before and not before[-1].isspace():
        before += " "
    sep = "" if not after or after[0].isspace() else " "
    text = before + needle + sep + after
    return text, (len(before), len(before) + len(needle))


def needle_retention(
    original: str, needle_span: tuple[int, int], needle: Needle, compressed: str, mask: np.ndarray
) -> dict[str, float]:
    """Whether the needle's key fact survived, and how many of its words did.

    Parameters
    ----------
    original : str
        The haystack with the needle.
    needle_span : (int, int)
        The needle's characters in ``original``.
    needle : Needle
    compressed : str
        The compressed text.
    mask : numpy.ndarray of bool
        :func:`kept_char_mask` of the compression.

    Returns
    -------
    dict
        ``key_kept`` (1.0 when the number appears intact, not inside a longer digit run),
        ``city_kept`` (the city name appears), ``word_recall`` (fraction of the needle's words
        kept, from ``mask``).
    """
    key_kept = re.search(rf"(?<!\d){re.escape(needle.key)}(?!\d)", compressed) is not None
    city_kept = re.search(rf"\b{re.escape(needle.city)}\b", compressed) is not None
    start, end = needle_span
    spans = word_spans(original[start:end]) + start
    recall = float(spans_kept(mask, spans).mean()) if spans.size else float("nan")
    return {"key_kept": float(key_kept), "city_kept": float(city_kept), "word_recall": recall}


def truncate_to_tokens(text: str, counter: Any, max_tokens: int) -> str:
    """The longest prefix of ``text`` that ends at a sentence end and has at most ``max_tokens`` tokens.

    ``counter`` has ``.count(text) -> int`` (see ``compressors/prompt/counting.py``). A text
    already within the budget is returned whole (stripped).
    """
    text = text.strip()
    if counter.count(text) <= max_tokens:
        return text
    ends = [s for s in _sentence_starts(text) if s > 0]
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
        raise QualityError(f"held-out essay count must be in 1..{len(docs)}, got {count}")
    first = len(docs) - count
    return [(f"essay{first + i:02d}", doc) for i, doc in enumerate(docs[first:])]


# --------------------------------------------------------------------------------------------
# BBH: prompts, questions and log-likelihood scoring
# --------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_STEM = "So the answer is"
#: The question whose answer-label scores calibrate the reader (Zhao et al., 2021, "Calibrate
#: Before Use"): same prompt, no content, so they measure the prompt's bias toward each label.
CONTENT_FREE_QUESTION = f"Q: N/A\nA: {ANSWER_STEM}"

# Tasks whose BIG-bench choices list the correct answer first: shuffled (seeded) as BBH did.
_SHUFFLED = {"date_understanding", "temporal_sequences"}
_LOGICAL_PREFIX = (
    "The following paragraphs each describe a set of {n} objects arranged in a fixed order. "
    "The statements are logically consistent within each paragraph. "
)
_YES_NO = {"True": "Yes", "False": "No", "Yes": "Yes", "No": "No"}


@dataclass(frozen=True)
class BBHItem:
    """One BBH test question, ready for log-likelihood scoring.

    Attributes
    ----------
    task : str
    index : int
        Position of the example in the BIG-bench task file.
    question : str
        ``"Q: <BBH-formatted input>\\nA: So the answer is"``.
    continuations : tuple of str
        The answer labels scored after the question, e.g. ``(" (A", " (B")`` (up to the option
        letter: the closing parenthesis decides nothing) or ``(" Yes", " No")``.
    target : int
        Index of the correct continuation.
    """

    task: str
    index: int
    question: str
    continuations: tuple[str, ...]
    target: int


def _lettered(choices: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    lines = "\n".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(choices))
    # The label is scored up to its letter: " (A" ; the closing parenthesis decides nothing.
    return f"Options:\n{lines}", tuple(f" ({_LETTERS[i]}" for i in range(len(choices)))


def format_bbh_example(task: str, example: Any, rng: np.random.Generator) -> tuple[str, tuple[str, ...], int]:
    """Format a BIG-bench example the way BIG-Bench Hard presents it.

    Parameters
    ----------
    task : str
        A name from :data:`BBH_TASK_FORMATS`.
    example : tokenlean.data.ChoiceExample
    rng : numpy.random.Generator
        Shuffles the options of tasks whose source lists the answer first.

    Returns
    -------
    (str, tuple of str, int)
        The question text (what follows ``"Q: "``), the answer continuations and the correct
        continuation's index.

    Raises
    ------
    QualityError
        For a task without a BBH format here, or an example that does not parse.
    """
    if task not in BBH_TASK_FORMATS:
        raise QualityError(
            f"no BBH format for task {task!r}; supported: {', '.join(sorted(BBH_TASK_FORMATS))}"
        )
    choices, target, text = list(example.choices), example.target, example.input.strip()
    if task in _SHUFFLED:
        order = rng.permutation(len(choices))
        choices = [choices[i] for i in order]
        target = int(np.flatnonzero(order == target)[0])
    if task == "logical_deduction_three_objects":
        options, conts = _lettered([c.rstrip(".") for c in choices])
        return f"{_LOGICAL_PREFIX.format(n='three')}{text}\n{options}", conts, target
    if task == "disambiguation_qa":
        options, conts = _lettered(choices)
        head = (
            "In the following sentences, explain the antecedent of the pronoun (which thing the pronoun "
            "refers to), or state that it is ambiguous."
        )
        return f"{head}\nSentence: {text}\n{options}", conts, target
    if task == "movie_recommendation":
        options, conts = _lettered(choices)
        return f"Find a movie similar to {text}\n{options}", conts, target
    if task in ("date_understanding", "temporal_sequences"):
        options, conts = _lettered(choices)
        return f"{text}\n{options}", conts, target
    if task == "snarks":
        m = re.fullmatch(r"Which statement is sarcastic\?\s*\(a\)\s*(.*?)\s*\(b\)\s*(.*)", text, flags=re.S)
        if m is None:
            raise QualityError(f"snarks example does not parse: {text[:80]!r}")
        options, conts = _lettered([m.group(1), m.group(2)])
        return f"Which statement is sarcastic?\n{options}", conts, ["(a)", "(b)"].index(choices[target])
    if task == "hyperbaton":
        m = re.fullmatch(
            r'Which sentence has the correct adjective order:\s*a\s*"\s*(.*?)\s*"\s*b\s*"\s*(.*?)\s*"\s*\?',
            text,
        )
        if m is None:
            raise QualityError(f"hyperbaton example does not parse: {text[:80]!r}")
        options, conts = _lettered([m.group(1), m.group(2)])
        return (
            f"Which sentence has the correct adjective order:\n{options}",
            conts,
            ["a", "b"].index(choices[target]),
        )
    if task in ("navigate", "causal_judgement"):
        labels = [_YES_NO[c] for c in choices]
        head = (
            f"If you follow these instructions, do you return to the starting point? {text}"
            if task == "navigate"
            else f"How would a typical person answer each of the following questions about causation?\n{text}"
        )
        return f"{head}\nOptions:\n- Yes\n- No", tuple(f" {lab}" for lab in labels), target
    # sports_understanding
    labels = ["yes" if c == "plausible" else "no" for c in choices]
    sentence = text if text.endswith((".", "!", "?")) else text + "."
    return f'Is the following sentence plausible? "{sentence}"', tuple(f" {lab}" for lab in labels), target


#: BBH tasks this module can format (their BIG-bench source must be in :func:`tokenlean.data.load_bbh`).
BBH_TASK_FORMATS = (
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "hyperbaton",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "navigate",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
)


def _lm_eval_bbh_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise QualityError(
            "the BBH chain-of-thought prompts are read from lm-eval's task files; "
            "install it with `pip install 'tokenlean[lmeval]'`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tasks" / "bbh" / "cot_fewshot"


def bbh_cot_prompt(task: str) -> tuple[str, list[str]]:
    """The BBH 3-shot chain-of-thought prompt of ``task``, as lm-eval 0.4 ships it.

    Returns
    -------
    (str, list of str)
        The task description (ending in a blank line) and the three demonstrations, each
        ``"Q: <input>\\nA: Let's think step by step.\\n<reasoning> So the answer is (X)."``.
    """
    import yaml

    path = _lm_eval_bbh_dir() / f"{task}.yaml"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        samples = spec["fewshot_config"]["samples"]
        description = str(spec.get("description", ""))
        template = str(spec["doc_to_text"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise QualityError(f"cannot read the BBH prompt of {task!r} from {path}: {exc}") from exc
    demos = [template.replace("{{input}}", s["input"]) + s["target"] for s in samples]
    return description, demos


def bbh_items(task: str, n: int, seed: int = 0) -> list[BBHItem]:
    """``n`` test questions of ``task`` drawn (seeded, without replacement) from its BIG-bench examples.

    Examples that appear in the task's demonstrations are left out.
    """
    from tokenlean import data

    source = data.load_bbh(task)
    _, demos = bbh_cot_prompt(task)
    demo_text = "\n".join(demos)
    eligible = [i for i, ex in enumerate(source.examples) if ex.input.strip() not in demo_text]
    if n > len(eligible):
        raise QualityError(f"{task} has {len(eligible)} usable examples, asked for {n}")
    seed_bytes = hashlib.sha256(f"{seed}:{task}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(seed_bytes[:8], "little"))
    chosen = sorted(rng.choice(eligible, size=n, replace=False).tolist())
    items = []
    for i in chosen:
        text, conts, target = format_bbh_example(task, source.examples[i], rng)
        items.append(BBHItem(task, i, f"Q: {text}\nA: {ANSWER_STEM}", conts, target))
    return items


def bbh_prefix(description: str, demos: Sequence[str]) -> str:
    """The part of the prompt before the test question: description, then demonstrations."""
    body = "\n\n".join(d for d in demos if d.strip())
    return description + (body + "\n\n" if body else "")


class ChoiceScorer:
    """Log-likelihood multiple choice with a causal LM, reusing the prompt prefix's KV cache.

    ``with scorer.prefix(text):`` runs the prefix once; :meth:`score` then scores a question and
    its continuations on top of it.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : its tokenizer
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from tokenlean.eval.latency import _cache_argument_name

        self.model = model.eval()
        self.tokenizer = tokenizer
        self._cache_kw = _cache_argument_name(model)
        try:
            self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._logits_to_keep = False
        self._cache: Any = None
        self._length = 0

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _forward(self, ids: list[int], keep: int = 0) -> Any:
        """Run ``ids`` on the cache; log-probabilities of the last ``keep`` positions (0: all)."""
        import torch

        from tokenlean.eval.latency import _cache_of

        device = next(self.model.parameters()).device
        kwargs = {self._cache_kw: self._cache} if self._cache is not None else {}
        if keep and self._logits_to_keep:  # skip the LM head on positions nobody reads
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True, **kwargs)
        self._cache = _cache_of(out)
        logits = out.logits[0, -keep:] if keep else out.logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _crop(self, length: int) -> None:
        current = self._cache.get_seq_length()
        if current > length:
            self._cache.crop(length - current)

    @contextlib.contextmanager
    def prefix(self, text: str) -> Iterator[ChoiceScorer]:
        """Run ``text`` (with the tokenizer's special tokens, e.g. BOS) and keep its cache."""
        import torch

        ids = self._ids(text, special=True)
        if not ids:
            raise QualityError("the prompt prefix is empty")
        with torch.inference_mode():
            self._cache = None
            self._forward(ids, keep=1)
        self._length = len(ids)
        try:
            yield self
        finally:
            self._cache = None
            self._length = 0

    def score(self, question: str, continuations: Sequence[str]) -> np.ndarray:
        """Summed log-probabilities of each continuation after ``prefix + question``.

        Continuation tokens shared by all choices are run once; when every remaining tail is a
        single token, one forward pass scores all choices.
        """
        import torch

        if self._cache is None:
            raise QualityError("ChoiceScorer.score must run inside `with scorer.prefix(...)`")
        conts = [self._ids(c) for c in continuations]
        if any(not c for c in conts):
            raise QualityError(f"a continuation tokenizes to nothing: {continuations!r}")
        common = 0
        while all(len(c) > common + 1 for c in conts) and len({c[common] for c in conts}) == 1:
            common += 1
        q_ids = self._ids(question)
        if not q_ids:
            raise QualityError("the question is empty")
        q_ids += conts[0][:common]
        with torch.inference_mode():
            logp = self._forward(q_ids, keep=common + 1)  # row k predicts q_ids[-common + k]
            shared = sum(float(logp[k, conts[0][k]]) for k in range(common))
            last = logp[-1]
            base = self._length + len(q_ids)
            scores = []
            for cont in conts:
                tail = cont[common:]
                total = shared + float(last[tail[0]])
                if len(tail) > 1:
                    more = self._forward(tail[:-1])
                    total += float(sum(more[j, tail[j + 1]] for j in range(len(tail) - 1)))
                    self._crop(base)
                scores.append(total)
            self._crop(self._length)
        return np.asarray(scores, dtype=float)


# --------------------------------------------------------------------------------------------
# compressors and the teacher
# --------------------------------------------------------------------------------------------

METHOD_LABELS = {
    "default": "default (student)",
    "random": "random drop",
    "selective_context": "selective context",
}


def make_compressor(spec: str) -> Any:
    """Build a compressor from a method name.

    ``"default"``: ``PromptCompressor()`` (the shipped student); ``"random"``:
    ``RandomDropCompressor(seed=0)``; ``"selective_context"``:
    ``SelectiveContextCompressor(model="smollm2-135m")``; ``"model=<hub id or folder>"``:
    ``PromptCompressor(model=...)``.
    """
    if spec == "default":
        from tokenlean.compressors.prompt.compressor import PromptCompressor

        return PromptCompressor()
    if spec.startswith("model="):
        from tokenlean.compressors.prompt.compressor import PromptCompressor

        return PromptCompressor(model=spec.split("=", 1)[1])
    if spec == "random":
        from tokenlean.compressors.prompt.baselines import RandomDropCompressor

        return RandomDropCompressor(seed=0)
    if spec == "selective_context":
        from tokenlean.compressors.prompt.baselines import SelectiveContextCompressor

        return SelectiveContextCompressor(model="smollm2-135m")
    raise QualityError(
        f"unknown compression method {spec!r}; use default, random, selective_context or model=<id or folder>"
    )


def teacher_word_scores(texts: Sequence[str], teacher: str = "smollm2-135m", progress: bool = False) -> list:
    """The distillation teacher's words and scores: ``[(spans, self_information), ...]`` per text.

    Words are the student's (minilm-l6 WordPiece words, ``labels.text_words``); scores are each
    word's self-information under the zoo LM ``teacher`` (``selfinfo.word_self_information_many``),
    exactly as ``train.py`` labels its training data.
    """
    from tokenlean import zoo
    from tokenlean.compressors.prompt.labels import student_tokenizer, text_words
    from tokenlean.compressors.prompt.selfinfo import word_self_information_many

    tokenizer = student_tokenizer()
    spans = [text_words(tokenizer, t).spans for t in texts]
    lm, lm_tok = zoo.load(teacher)
    lm.eval()
    scores = word_self_information_many(list(texts), lm, lm_tok, spans, progress=progress)
    del lm
    gc.collect()
    return list(zip(spans, scores))


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class QualityConfig:
    """Settings of one quality run (they are stored with it; a rerun must use the same).

    Attributes
    ----------
    rates : tuple of float
        Requested rates (fraction of cl100k tokens kept).
    methods : tuple of str
        Method names for :func:`make_compressor`.
    tasks : tuple of str
        BBH tasks (from :data:`BBH_TASK_FORMATS`).
    n : int
        Test questions per task.
    reader : str
        Zoo causal LM that answers the BBH questions.
    needle_depths : tuple of float
        Depths at which the needle is inserted into every held-out essay.
    heldout : int
        How many held-out essays (the last ones) the needle and teacher measurements use.
    haystack_tokens : int
        Each held-out essay is cut to at most this many cl100k tokens (at a sentence end).
    metrics : tuple of str
        Which of ``"bbh"``, ``"needle"``, ``"teacher"`` to measure.
    scoring : str
        How the reader's answer is chosen: ``"calibrated"`` (label log-likelihood minus that of
        a content-free question under the same prompt, Zhao et al. 2021) or ``"raw"``. Both
        accuracies are reported; this one is primary.
    seed : int
    """

    rates: tuple[float, ...] = DEFAULT_RATES
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = DEFAULT_TASKS
    n: int = 30
    reader: str = "smollm2-135m"
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    heldout: int = 10
    haystack_tokens: int = 1000
    metrics: tuple[str, ...] = METRICS
    scoring: str = "calibrated"
    seed: int = 0

    def __post_init__(self) -> None:
        self.rates = tuple(float(r) for r in self.rates)
        self.methods = tuple(self.methods)
        self.tasks = tuple(self.tasks)
        self.needle_depths = tuple(float(d) for d in self.needle_depths)
        self.metrics = tuple(self.metrics)
        if not self.rates or any(not 0 < r <= 1 for r in self.rates):
            raise QualityError(f"rates must be in (0, 1], got {self.rates}")
        if not self.methods:
            raise QualityError("give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise QualityError(f"a method is named twice: {self.methods}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise QualityError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        bad = [t for t in self.tasks if t not in BBH_TASK_FORMATS]
        if bad:
            raise QualityError(f"no BBH format for task(s) {bad}; supported: {', '.join(BBH_TASK_FORMATS)}")
        if "bbh" in self.metrics and not self.tasks:
            raise QualityError("the bbh metric needs at least one task")
        if self.n < 1 or self.heldout < 1 or self.haystack_tokens < 50:
            raise QualityError("n and heldout must be >= 1 and haystack_tokens >= 50")
        if self.scoring not in ("calibrated", "raw"):
            raise QualityError(f"scoring must be 'calibrated' or 'raw', got {self.scoring!r}")
        if any(not 0 <= d <= 1 for d in self.needle_depths) or not self.needle_depths:
            raise QualityError(f"needle depths must be in [0, 1], got {self.needle_depths}")

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class _Units:
    """Finished units of a run, appended to a JSON-lines file (fsynced; a torn tail is dropped)."""

    def __init__(self, path: Path) -> None:
        from tokenlean.eval.bench import _JsonlLog

        self._log = _JsonlLog(path)
        self.done: dict[str, dict[str, Any]] = {row["key"]: row for row in self._log.read() if "key" in row}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def add(self, key: str, row: dict[str, Any]) -> dict[str, Any]:
        row = {"key": key, **row}
        self._log.append(row)
        self.done[key] = row
        return row


#: Settings that change what a finished unit holds. Units are keyed by method, rate, task and
#: reader, so a run can be resumed with methods, rates, tasks or metrics added (or dropped).
_UNIT_SETTINGS = ("n", "seed", "heldout", "haystack_tokens", "needle_depths")


def _claim(out: Path, config: QualityConfig, overwrite: bool) -> _Units:
    ensure_writable_dir(out)
    run_path = out / RUN_NAME
    settings = {"schema": SCHEMA, "config": config.as_dict()}
    if run_path.exists() and not overwrite:
        try:
            old = json.loads(run_path.read_text(encoding="utf-8"))
            old_config = old["config"]
            same_schema = old["schema"] == SCHEMA
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QualityError(f"{run_path} is unreadable ({exc}); use --overwrite or another --out") from exc
        changed = [k for k in _UNIT_SETTINGS if old_config.get(k) != settings["config"][k]]
        if changed or not same_schema:
            raise QualityError(
                f"{out} holds a run with other settings ({', '.join(changed) or 'schema'}); resume it with "
                "the same settings, or use --overwrite or another --out"
            )
    if overwrite:
        (out / UNITS_NAME).unlink(missing_ok=True)
    atomic_write_json(run_path, settings)
    return _Units(out / UNITS_NAME)


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _result_row(result: Any, seconds: float) -> dict[str, Any]:
    return {
        "origin_tokens": int(result.origin_tokens),
        "compressed_tokens": int(result.compressed_tokens),
        "rate": float(result.rate),
        "seconds": seconds,
    }


def _compress(compressor: Any, text: Any, rate: float) -> tuple[Any, float]:
    start = time.perf_counter()
    result = compressor.compress(text, rate=rate)
    return result, time.perf_counter() - start


@dataclass
class _Plan:
    """Inputs shared by all methods, built once."""

    demos: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    items: dict[str, list[BBHItem]] = field(default_factory=dict)
    haystacks: list[tuple[str, str]] = field(default_factory=list)  # (name, text) without needles
    needles: list[dict[str, Any]] = field(default_factory=list)  # name, depth, text, span, needle


def _build_plan(config: QualityConfig) -> _Plan:
    from tokenlean.compressors.prompt.counting import get_counter

    plan = _Plan()
    if "bbh" in config.metrics:
        for task in config.tasks:
            plan.demos[task] = bbh_cot_prompt(task)
            plan.items[task] = bbh_items(task, config.n, config.seed)
    if "needle" in config.metrics or "teacher" in config.metrics:
        counter = get_counter("cl100k")
        for name, text in heldout_essays(config.heldout):
            plan.haystacks.append((name, truncate_to_tokens(text, counter, config.haystack_tokens)))
    if "needle" in config.metrics:
        needles = make_needles(len(plan.haystacks) * len(config.needle_depths), config.seed)
        k = 0
        for name, text in plan.haystacks:
            for depth in config.needle_depths:
                full, span = insert_needle(text, needles[k].sentence, depth)
                plan.needles.append(
                    {"name": name, "depth": depth, "text": full, "span": span, "needle": needles[k]}
                )
                k += 1
    return plan


def _method_units(
    method: str, compressor: Any, config: QualityConfig, plan: _Plan, units: _Units, teacher: dict, bar: Any
) -> None:
    """Run every compression of one method (BBH demonstrations, needles, teacher documents)."""
    for rate in config.rates:
        rk = _rate_key(rate)
        for task in plan.demos if "bbh" in config.metrics else ():
            key = f"demos|{task}|{method}|{rk}"
            if units.get(key) is None:
                result, seconds = _compress(compressor, plan.demos[task][1], rate)
                texts = list(result.texts) if len(result.texts) == len(plan.demos[task][1]) else [result.text]
                units.add(key, {**_result_row(result, seconds), "source": "bbh", "texts": texts})
            bar.update(1)
        if "needle" in config.metrics:
            key = f"needle|{method}|{rk}"
            if units.get(key) is None:
                rows = []
                for case in plan.needles:
                    result, seconds = _compress(compressor, case["text"], rate)
                    mask = kept_char_mask(case["text"], result.text, result.words, result.labels)
                    scores = needle_retention(case["text"], case["span"], case["needle"], result.text, mask)
                    rows.append(
                        {
                            "name": case["name"],
                            "depth": case["depth"],
                            **scores,
                            **_result_row(result, seconds),
                        }
                    )
                    bar.update(1)
                units.add(key, {"source": "needle", "cases": rows})
            else:
                bar.update(len(plan.needles))
        if "teacher" in config.metrics:
            key = f"teacher|{method}|{rk}"
            if units.get(key) is None:
                rows = []
                for name, text in plan.haystacks:
                    spans, gold = teacher[(name, rk)]
                    result, seconds = _compress(compressor, text, rate)
                    mask = kept_char_mask(text, result.text, result.words, result.labels)
                    counts = binary_f1(spans_kept(mask, spans), gold)
                    rows.append({"name": name, **counts, **_result_row(result, seconds)})
                    bar.update(1)
                units.add(key, {"source": "teacher", "docs": rows})
            else:
                bar.update(len(plan.haystacks))


def _teacher_labels(config: QualityConfig, plan: _Plan, units: _Units, progress: bool) -> dict:
    """The teacher's ``(word spans, keep labels)`` of every held-out haystack at every rate."""
    from tokenlean.compressors.prompt.labels import teacher_labels

    key = "teacher_scores"
    row = units.get(key)
    if row is None:
        start = time.perf_counter()
        scored = teacher_word_scores([text for _, text in plan.haystacks], progress=progress)
        row = units.add(
            key,
            {
                "docs": {
                    name: {"spans": spans.tolist(), "scores": np.asarray(scores, dtype=float).tolist()}
                    for (name, _), (spans, scores) in zip(plan.haystacks, scored)
                },
                "seconds": time.perf_counter() - start,
            },
        )
    out: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for name, text in plan.haystacks:
        doc = row["docs"][name]
        spans = np.asarray(doc["spans"], dtype=np.int64).reshape(-1, 2)
        for rate in config.rates:
            keep = teacher_labels(text, spans, np.asarray(doc["scores"], dtype=float), rate=rate)
            out[(name, _rate_key(rate))] = (spans, np.asarray(keep, dtype=bool))
    return out


def _bbh_conditions(config: QualityConfig) -> list[tuple[str, str | None, float | None]]:
    """(condition name, method, rate): uncompressed, no demonstrations, then every method x rate."""
    conds: list[tuple[str, str | None, float | None]] = [
        ("uncompressed", None, None),
        ("no_demos", None, None),
    ]
    conds += [(f"{m}@{_rate_key(r)}", m, r) for m in config.methods for r in config.rates]
    return conds


def _run_reader(config: QualityConfig, plan: _Plan, units: _Units, progress: bool) -> None:
    from tqdm.auto import tqdm

    conds = _bbh_conditions(config)
    todo = [
        (task, cond)
        for task in config.tasks
        for cond in conds
        if units.get(f"bbh|{task}|{cond[0]}|{config.reader}") is None
    ]
    if not todo:
        return
    from tokenlean import zoo

    model, tokenizer = zoo.load(config.reader)
    scorer = ChoiceScorer(model, tokenizer)
    total = sum(len(plan.items[task]) for task, _ in todo)
    with tqdm(total=total, desc=f"BBH with {config.reader}", disable=not progress) as bar:
        for task, (cname, method, rate) in todo:
            description, demos = plan.demos[task]
            if method is None:
                used = demos if cname == "uncompressed" else []
            else:
                used = units.get(f"demos|{task}|{method}|{_rate_key(rate)}")["texts"]
            prefix = bbh_prefix(description, used)
            start = time.perf_counter()
            scores, content_free = [], {}
            with scorer.prefix(prefix):
                for item in plan.items[task]:
                    scores.append(scorer.score(item.question, item.continuations).tolist())
                    bar.update(1)
                for conts in {item.continuations for item in plan.items[task]}:
                    content_free[conts] = scorer.score(CONTENT_FREE_QUESTION, conts).tolist()
            units.add(
                f"bbh|{task}|{cname}|{config.reader}",
                {
                    "prefix_tokens": len(tokenizer(prefix)["input_ids"]),
                    "scores": scores,
                    "content_free": [content_free[item.continuations] for item in plan.items[task]],
                    "targets": [item.target for item in plan.items[task]],
                    "indices": [item.index for item in plan.items[task]],
                    "seconds": time.perf_counter() - start,
                },
            )
    del model, scorer
    gc.collect()


def run_quality(
    config: QualityConfig,
    out: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    compressors: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the prompt compressors of ``config`` and write the report into ``out``.

    Parameters
    ----------
    config : QualityConfig
    out : path
        Run folder. Finished units go to ``units.jsonl``; a rerun skips them (an interrupted run
        resumes, and methods, rates, tasks or metrics can be added to a finished one); a rerun
        that changes ``n``, ``seed``, ``heldout``, ``haystack_tokens`` or ``needle_depths`` is
        refused unless ``overwrite``.
    progress : bool
        tqdm progress bars on stderr.
    overwrite : bool
        Start the folder afresh.
    compressors : mapping of str to compressor, optional
        Ready compressor objects for some method names (instead of :func:`make_compressor`).

    Returns
    -------
    dict
        The record written to ``report.json`` (schema :data:`SCHEMA`).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(out)
    units = _claim(out, config, overwrite)
    plan = _build_plan(config)
    teacher = _teacher_labels(config, plan, units, progress) if "teacher" in config.metrics else {}
    per_rate = (len(plan.demos) if "bbh" in config.metrics else 0) + len(plan.needles)
    per_rate += len(plan.haystacks) if "teacher" in config.metrics else 0
    method_info: dict[str, Any] = {}
    for method in config.methods:
        pending = [k for k in _method_keys(method, config, plan) if units.get(k) is None]
        compressor = None
        if pending:
            compressor = (compressors or {}).get(method) or make_compressor(method)
        with tqdm(
            total=per_rate * len(config.rates), desc=f"compress: {method}", disable=not progress
        ) as bar:
            _method_units(method, compressor, config, plan, units, teacher, bar)
        method_info[method] = {"label": METHOD_LABELS.get(method, method), "spec": method}
        if compressor is not None:
            method_info[method]["class"] = type(compressor).__name__
        del compressor
        gc.collect()
    if "bbh" in config.metrics:
        _run_reader(config, plan, units, progress)
    record = build_record(config, plan, units, method_info, time.perf_counter() - started)
    write_quality_report(record, out)
    return record


def _method_keys(method: str, config: QualityConfig, plan: _Plan) -> list[str]:
    keys = []
    for rate in config.rates:
        rk = _rate_key(rate)
        if "bbh" in config.metrics:
            keys += [f"demos|{task}|{method}|{rk}" for task in plan.demos]
        if "needle" in config.metrics:
            keys.append(f"needle|{method}|{rk}")
        if "teacher" in config.metrics:
            keys.append(f"teacher|{method}|{rk}")
    return keys


# --------------------------------------------------------------------------------------------
# the record
# --------------------------------------------------------------------------------------------


def _acc_stats(correct: Sequence[float]) -> dict[str, Any]:
    k, n = int(round(sum(correct))), len(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "k": k, "n": n, "ci": [low, high]}


def _choice_logprobs(row: Mapping[str, Any], scoring: str) -> list[np.ndarray]:
    """Per question, the reader's log-distribution over the choices (softmax of the scores)."""
    out = []
    for i, scores in enumerate(row["scores"]):
        values = np.asarray(scores, dtype=float)
        if scoring == "calibrated":
            values = values - np.asarray(row["content_free"][i], dtype=float)
        values = values - values.max()
        out.append(values - np.log(np.exp(values).sum()))
    return out


def _kl(p_log: Sequence[np.ndarray], q_log: Sequence[np.ndarray]) -> np.ndarray:
    """KL(p || q) in nats, per question."""
    return np.asarray([float(np.sum(np.exp(p) * (p - q))) for p, q in zip(p_log, q_log)], dtype=float)


def _predictions(row: Mapping[str, Any], scoring: str) -> np.ndarray:
    """The chosen answer of every question of a BBH unit (questions may differ in choice count).

    ``"raw"``: the label with the highest log-likelihood; ``"calibrated"``: the highest after
    subtracting the label's log-likelihood for the content-free question under the same prompt.
    """
    out = []
    for i, scores in enumerate(row["scores"]):
        values = np.asarray(scores, dtype=float)
        if scoring == "calibrated":
            values = values - np.asarray(row["content_free"][i], dtype=float)
        out.append(int(np.argmax(values)))
    return np.asarray(out, dtype=np.int64)


def _bbh_section(config: QualityConfig, plan: _Plan, units: _Units) -> dict[str, Any]:
    conds = _bbh_conditions(config)
    per_cond: dict[str, dict[str, Any]] = {}
    pooled: dict[str, dict[str, list]] = {
        c: {"correct": [], "agree": [], "other": [], "kl": []} for c, _, _ in conds
    }
    other = "raw" if config.scoring == "calibrated" else "calibrated"
    for task in config.tasks:
        base = units.get(f"bbh|{task}|uncompressed|{config.reader}")
        base_pred = _predictions(base, config.scoring)
        targets = np.asarray(base["targets"])
        base_correct = (base_pred == targets).astype(float)
        base_logp = _choice_logprobs(base, config.scoring)
        for cname, method, rate in conds:
            row = units.get(f"bbh|{task}|{cname}|{config.reader}")
            pred = _predictions(row, config.scoring)
            kl = _kl(base_logp, _choice_logprobs(row, config.scoring))
            pooled[cname]["kl"] += kl.tolist()
            correct = (pred == targets).astype(float)
            agree = (pred == base_pred).astype(float)
            other_correct = (_predictions(row, other) == targets).astype(float)
            pooled[cname]["correct"] += correct.tolist()
            pooled[cname]["agree"] += agree.tolist()
            pooled[cname]["other"] += other_correct.tolist()
            diff, low, high = paired_bootstrap_diff(correct, base_correct, seed=config.seed)
            entry = per_cond.setdefault(
                cname, {"method": method, "rate": rate, "tasks": {}, "prefix_tokens": {}}
            )
            entry["tasks"][task] = {
                **_acc_stats(correct.tolist()),
                "delta": diff,
                "delta_ci": [low, high],
                "agreement": float(agree.mean()),
                "kl": float(kl.mean()),
                f"accuracy_{other}": float(other_correct.mean()),
                "predicted": np.bincount(pred, minlength=len(plan.items[task][0].continuations)).tolist(),
            }
            entry["prefix_tokens"][task] = row["prefix_tokens"]
    base_all = np.asarray(pooled["uncompressed"]["correct"])
    for cname, entry in per_cond.items():
        correct = np.asarray(pooled[cname]["correct"])
        diff, low, high = paired_bootstrap_diff(correct, base_all, seed=config.seed)
        entry["pooled"] = {
            **_acc_stats(correct.tolist()),
            "delta": diff,
            "delta_ci": [low, high],
            "agreement": float(np.mean(pooled[cname]["agree"])),
            "kl": float(np.mean(pooled[cname]["kl"])),
            "kl_ci": list(bootstrap_ci(pooled[cname]["kl"], seed=config.seed)),
            f"accuracy_{other}": float(np.mean(pooled[cname]["other"])),
        }
    chance = {
        task: float(np.mean([1 / len(item.continuations) for item in plan.items[task]]))
        for task in config.tasks
    }
    return {
        "reader": config.reader,
        "scoring": config.scoring,
        "tasks": list(config.tasks),
        "n_per_task": config.n,
        "chance": chance,
        "conditions": per_cond,
    }


def _needle_section(config: QualityConfig, units: _Units) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in config.methods:
        for rate in config.rates:
            cases = units.get(f"needle|{method}|{_rate_key(rate)}")["cases"]
            kept = [c["key_kept"] for c in cases]
            k, n = int(sum(kept)), len(kept)
            by_depth: dict[str, float] = {}
            for depth in config.needle_depths:
                sel = [c["key_kept"] for c in cases if c["depth"] == depth]
                by_depth[f"{depth:g}"] = float(np.mean(sel)) if sel else float("nan")
            recall = [c["word_recall"] for c in cases if c["word_recall"] == c["word_recall"]]
            out.setdefault(method, {})[_rate_key(rate)] = {
                "key_kept": k / n if n else float("nan"),
                "k": k,
                "n": n,
                "ci": list(wilson_interval(k, n)),
                "city_kept": float(np.mean([c["city_kept"] for c in cases])) if cases else float("nan"),
                "word_recall": float(np.mean(recall)) if recall else float("nan"),
                "word_recall_ci": list(bootstrap_ci(recall, seed=config.seed)),
                "by_depth": by_depth,
            }
    return out


def _teacher_section(config: QualityConfig, units: _Units) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def micro_f1(rows: np.ndarray) -> float:
        tp, fp, fn = rows.sum(axis=0)
        return _prf(tp, fp, fn)["f1"]

    for method in config.methods:
        for rate in config.rates:
            docs = units.get(f"teacher|{method}|{_rate_key(rate)}")["docs"]
            counts = np.asarray([[d["tp"], d["fp"], d["fn"]] for d in docs], dtype=float)
            tp, fp, fn = counts.sum(axis=0)
            out.setdefault(method, {})[_rate_key(rate)] = {
                **_prf(tp, fp, fn),
                "ci": list(bootstrap_ci(counts, stat=micro_f1, seed=config.seed)),
                "n_words": int(sum(d["n"] for d in docs)),
                "n_docs": len(docs),
            }
    return out


def _rate_section(config: QualityConfig, plan: _Plan, units: _Units) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in config.methods:
        for rate in config.rates:
            rk = _rate_key(rate)
            rows = []
            if "bbh" in config.metrics:
                rows += [units.get(f"demos|{task}|{method}|{rk}") for task in config.tasks]
            if "needle" in config.metrics:
                rows += units.get(f"needle|{method}|{rk}")["cases"]
            if "teacher" in config.metrics:
                rows += units.get(f"teacher|{method}|{rk}")["docs"]
            achieved = np.asarray([r["rate"] for r in rows], dtype=float)
            long = np.asarray([r["rate"] for r in rows if r["origin_tokens"] >= 200], dtype=float)
            out.setdefault(method, {})[rk] = {
                "requested": rate,
                "mean": float(achieved.mean()),
                "min": float(achieved.min()),
                "max": float(achieved.max()),
                "mean_abs_error_pp": float(np.mean(np.abs(achieved - rate)) * 100),
                "within_2pp": float(np.mean(np.abs(long - rate) <= 0.02 + 1e-9))
                if long.size
                else float("nan"),
                "n_calls": int(achieved.size),
                "n_calls_200plus": int(long.size),
                "seconds": float(sum(r["seconds"] for r in rows)),
                "origin_tokens": int(sum(r["origin_tokens"] for r in rows)),
            }
    return out


def _examples_section(config: QualityConfig, plan: _Plan, units: _Units) -> dict[str, Any]:
    """The first demonstration of the first task, as each method compressed it at each rate."""
    if "bbh" not in config.metrics:
        return {}
    task = config.tasks[0]
    original = plan.demos[task][1][0]
    shown: dict[str, Any] = {"task": task, "original": original, "compressed": {}}
    for method in config.methods:
        for rate in config.rates:
            texts = units.get(f"demos|{task}|{method}|{_rate_key(rate)}")["texts"]
            shown["compressed"].setdefault(method, {})[_rate_key(rate)] = texts[0]
    return shown


def _compute_seconds(units: _Units) -> float:
    """Seconds of measured work in all finished units (over every invocation of a resumed run)."""
    total = 0.0
    for row in units.done.values():
        total += float(row.get("seconds", 0.0))
        for key in ("cases", "docs"):
            if isinstance(row.get(key), list):  # per-case timings of needle and teacher units
                total += sum(float(sub.get("seconds", 0.0)) for sub in row[key])
    return total


def build_record(
    config: QualityConfig, plan: _Plan, units: _Units, methods: Mapping[str, Any], wall_s: float
) -> dict[str, Any]:
    """Assemble the report record from the finished units."""
    from tokenlean.eval.bench import machine_info

    record: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": config.as_dict(),
        "methods": dict(methods),
        "wall_s": wall_s,
        "compute_s": _compute_seconds(units),
    }
    if "bbh" in config.metrics:
        record["bbh"] = _bbh_section(config, plan, units)
    if "needle" in config.metrics:
        record["needle"] = _needle_section(config, units)
    if "teacher" in config.metrics:
        record["teacher"] = _teacher_section(config, units)
    record["rate"] = _rate_section(config, plan, units)
    record["examples"] = _examples_section(config, plan, units)
    return record


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _pct(x: Any, digits: int = 1) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return _DASH
    return f"{100 * x:.{digits}f}"


def _pct_ci(value: Any, ci: Sequence[Any] | None, digits: int = 1) -> str:
    text = _pct(value, digits)
    if text != _DASH and ci and all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci):
        text += f" [{_pct(ci[0], digits)}, {_pct(ci[1], digits)}]"
    return text


def _signed_pp(value: Any, ci: Sequence[Any] | None) -> str:
    if value is None or not math.isfinite(value):
        return _DASH
    text = f"{100 * value:+.1f}"
    if ci and all(math.isfinite(c) for c in ci):
        text += f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    return text


def _label(record: Mapping[str, Any], method: str) -> str:
    return record.get("methods", {}).get(method, {}).get("label", method)


Table = tuple[list[str], list[list[str]]]


def _summary_table(record: Mapping[str, Any]) -> Table:
    config = record["config"]
    headers = ["method", "rate", "achieved rate"]
    if "bbh" in record:
        headers += ["BBH acc % [95% CI]", "Δ vs uncompressed, pp [95% CI]", "agrees with uncompressed %"]
    if "needle" in record:
        headers += ["needle key kept % [95% CI]"]
    if "teacher" in record:
        headers += ["teacher F1 % [95% CI]"]
    rows = []
    if "bbh" in record:
        for cname in ("uncompressed", "no_demos"):
            pooled = record["bbh"]["conditions"][cname]["pooled"]
            name = "uncompressed demos" if cname == "uncompressed" else "no demonstrations"
            row = [name, "1" if cname == "uncompressed" else "0", _DASH]
            row += [
                _pct_ci(pooled["accuracy"], pooled["ci"]),
                _signed_pp(pooled["delta"], pooled["delta_ci"]),
            ]
            row += [_pct(pooled["agreement"])]
            row += [_DASH] * (("needle" in record) + ("teacher" in record))
            rows.append(row)
    for method in config["methods"]:
        for rate in config["rates"]:
            rk = _rate_key(rate)
            achieved = record["rate"][method][rk]
            row = [_label(record, method), rk, f"{achieved['mean']:.3f}"]
            if "bbh" in record:
                pooled = record["bbh"]["conditions"][f"{method}@{rk}"]["pooled"]
                row += [
                    _pct_ci(pooled["accuracy"], pooled["ci"]),
                    _signed_pp(pooled["delta"], pooled["delta_ci"]),
                ]
                row += [_pct(pooled["agreement"])]
            if "needle" in record:
                cell = record["needle"][method][rk]
                row += [_pct_ci(cell["key_kept"], cell["ci"])]
            if "teacher" in record:
                cell = record["teacher"][method][rk]
                row += [_pct_ci(cell["f1"], cell["ci"])]
            rows.append(row)
    return headers, rows


def _bbh_table(record: Mapping[str, Any]) -> Table:
    bbh = record["bbh"]
    headers = ["condition", "rate"] + [f"{t} (n={bbh['n_per_task']})" for t in bbh["tasks"]] + ["pooled"]
    rows = [
        ["chance", _DASH]
        + [_pct(bbh["chance"][t]) for t in bbh["tasks"]]
        + [_pct(float(np.mean([bbh["chance"][t] for t in bbh["tasks"]])))]
    ]
    for cname, entry in bbh["conditions"].items():
        if entry["method"] is None:
            name, rate = (
                ("uncompressed demos", "1") if cname == "uncompressed" else ("no demonstrations", "0")
            )
        else:
            name, rate = _label(record, entry["method"]), _rate_key(entry["rate"])
        cells = [_pct_ci(entry["tasks"][t]["accuracy"], entry["tasks"][t]["ci"]) for t in bbh["tasks"]]
        rows.append([name, rate, *cells, _pct_ci(entry["pooled"]["accuracy"], entry["pooled"]["ci"])])
    return headers, rows


def _bbh_agreement_table(record: Mapping[str, Any]) -> Table:
    bbh = record["bbh"]
    other = "raw" if bbh.get("scoring", "calibrated") == "calibrated" else "calibrated"
    headers = ["condition", "rate", "demo tokens (reader)", *bbh["tasks"], "pooled"]
    headers += ["KL to uncompressed answers, nats [95% CI]", f"pooled acc %, {other} scoring"]
    rows = []
    for cname, entry in bbh["conditions"].items():
        if entry["method"] is None:
            name, rate = (
                ("uncompressed demos", "1") if cname == "uncompressed" else ("no demonstrations", "0")
            )
        else:
            name, rate = _label(record, entry["method"]), _rate_key(entry["rate"])
        pooled = entry["pooled"]
        tokens = int(np.mean(list(entry["prefix_tokens"].values())))
        cells = [_pct(entry["tasks"][t]["agreement"]) for t in bbh["tasks"]]
        kl = _DASH
        if _finite_number(pooled.get("kl")):
            kl = f"{pooled['kl']:.3f}"
            if all(_finite_number(c) for c in pooled.get("kl_ci", [None])):
                kl += f" [{pooled['kl_ci'][0]:.3f}, {pooled['kl_ci'][1]:.3f}]"
        alt = _pct(pooled.get(f"accuracy_{other}"))
        rows.append([name, rate, str(tokens), *cells, _pct(pooled["agreement"]), kl, alt])
    return headers, rows


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _needle_table(record: Mapping[str, Any]) -> Table:
    depths = record["config"]["needle_depths"]
    headers = ["method", "rate", "key kept % [95% CI]", "k/n", "city kept %", "needle words kept %"]
    headers += [f"depth {d:g}" for d in depths]
    rows = []
    for method, by_rate in record["needle"].items():
        for rk, cell in by_rate.items():
            row = [
                _label(record, method),
                rk,
                _pct_ci(cell["key_kept"], cell["ci"]),
                f"{cell['k']}/{cell['n']}",
            ]
            row += [_pct(cell["city_kept"]), _pct_ci(cell["word_recall"], cell["word_recall_ci"])]
            row += [_pct(cell["by_depth"].get(f"{d:g}")) for d in depths]
            rows.append(row)
    return headers, rows


def _teacher_table(record: Mapping[str, Any]) -> Table:
    headers = ["method", "rate", "F1 % [95% CI]", "precision %", "recall %", "words", "documents"]
    rows = []
    for method, by_rate in record["teacher"].items():
        for rk, cell in by_rate.items():
            rows.append(
                [
                    _label(record, method),
                    rk,
                    _pct_ci(cell["f1"], cell["ci"]),
                    _pct(cell["precision"]),
                    _pct(cell["recall"]),
                    f"{cell['n_words']:,}",
                    str(cell["n_docs"]),
                ]
            )
    return headers, rows


def _rate_table(record: Mapping[str, Any]) -> Table:
    headers = [
        "method",
        "requested",
        "achieved mean",
        "min",
        "max",
        "mean |error| (pp)",
        "within ±2 pp (inputs ≥ 200 tokens)",
        "calls",
        "compress time (s)",
    ]
    rows = []
    for method, by_rate in record["rate"].items():
        for rk, cell in by_rate.items():
            within = _DASH if not math.isfinite(cell["within_2pp"]) else f"{100 * cell['within_2pp']:.0f}%"
            rows.append(
                [
                    _label(record, method),
                    rk,
                    f"{cell['mean']:.3f}",
                    f"{cell['min']:.3f}",
                    f"{cell['max']:.3f}",
                    f"{cell['mean_abs_error_pp']:.2f}",
                    f"{within} of {cell['n_calls_200plus']}",
                    str(cell["n_calls"]),
                    f"{cell['seconds']:.1f}",
                ]
            )
    return headers, rows


def _settings_rows(record: Mapping[str, Any]) -> list[list[str]]:
    rows = [[k, json.dumps(v)] for k, v in record["config"].items()]
    rows.append(["wall time (this invocation)", f"{record['wall_s']:.0f} s"])
    if "compute_s" in record:
        rows.append(["measured work (all invocations)", f"{record['compute_s']:.0f} s"])
    return rows


def _machine_rows(record: Mapping[str, Any]) -> list[list[str]]:
    rows = [[str(k), _DASH if v is None else str(v)] for k, v in record["machine"].items()]
    rows.append(["created", record["created"]])
    return rows


def _method_rows(record: Mapping[str, Any]) -> list[list[str]]:
    return [[m, info.get("label", m), info.get("class", _DASH)] for m, info in record["methods"].items()]


_NOTES = {
    "summary": (
        "Rates are the fraction of cl100k tokens kept. BBH accuracy is pooled over the tasks; the interval "
        "is Wilson's; Δ is the paired change against the uncompressed demonstrations (bootstrap over "
        "questions); agreement is the share of questions answered as with the uncompressed prompt. Needle: "
        "share of needles whose number survives intact (Wilson). Teacher F1: kept words against the "
        "self-information teacher's keep labels at the same rate (bootstrap over documents)."
    ),
    "bbh": (
        "BBH 3-shot chain-of-thought demonstrations (lm-eval's cot_fewshot prompts) compressed by each "
        "method, one context per demonstration; the task description and the test question are verbatim. "
        "Questions are BIG-bench's examples of each task formatted as BBH; the reader picks the answer "
        "label with the highest log-likelihood after 'A: So the answer is' (no generated reasoning); "
        "with calibrated scoring, minus the label's log-likelihood for the content-free question "
        "'Q: N/A' under the same prompt (removes the prompt's bias toward one label, which dominates "
        "small readers)."
    ),
    "agreement": (
        "Agreement: share of questions answered as with the uncompressed demonstrations. KL: mean "
        "KL(uncompressed || condition) of the reader's distribution over the answer labels (softmax "
        "of the scores used for the answer), bootstrap 95% interval over questions; 0 = same answers "
        "with the same confidence."
    ),
    "needle": (
        "One needle ('The special magic number for <city> is <7 digits>.') per held-out essay and depth; "
        "key kept = the number appears intact in the compressed text."
    ),
    "teacher": (
        "Precision/recall/F1 of the method's kept words against the teacher's keep labels, on the "
        "teacher's words (a word counts as kept when at least half its characters are), micro-averaged "
        "over the held-out essays."
    ),
    "rate": (
        "Achieved rate = compressed / original cl100k tokens over every compress call of the run "
        "(BBH demonstrations, needle haystacks, teacher documents)."
    ),
}


def _chance_caveat(record: Mapping[str, Any]) -> str:
    """A warning when the uncompressed prompt's pooled accuracy is within its 95 % interval of chance."""
    bbh = record.get("bbh")
    if not bbh:
        return ""
    pooled = bbh["conditions"]["uncompressed"]["pooled"]
    chance = float(np.mean(list(bbh["chance"].values())))
    low, high = pooled["ci"]
    if not (low <= chance <= high):
        return ""
    return (
        f"With the uncompressed demonstrations the reader scores {100 * pooled['accuracy']:.1f}% "
        f"[{100 * low:.1f}, {100 * high:.1f}], within reach of chance ({100 * chance:.1f}%): it barely "
        "uses the demonstrations, so these BBH differences between methods and rates are not evidence "
        "either way; a stronger reader is needed for this measurement."
    )


def _md_table(headers: list[str], rows: list[list[str]], text_cols: int = 2) -> str:
    from tokenlean.eval.report import _md_table as md

    return md(headers, rows, text_cols=text_cols)


def _title(record: Mapping[str, Any]) -> str:
    return f"tokenlean prompt compression quality ({record['created'][:10]})"


def render_markdown(record: Mapping[str, Any]) -> str:
    """Render a quality record as Markdown (summary, one section per metric, settings, machine)."""
    out = [f"# {_title(record)}", ""]
    out += ["## Summary", "", _md_table(*_summary_table(record)), "", f"_{_NOTES['summary']}_", ""]
    if "bbh" in record:
        scoring = record["bbh"].get("scoring", "calibrated")
        out += [
            f"## BBH accuracy (reader `{record['bbh']['reader']}`, {scoring} scoring), % [95% Wilson CI]",
            "",
        ]
        out += [_md_table(*_bbh_table(record)), "", f"_{_NOTES['bbh']}_", ""]
        caveat = _chance_caveat(record)
        if caveat:
            out += [f"**{caveat}**", ""]
        out += ["### Agreement with the uncompressed prompt's answers (%) and answer KL", ""]
        out += [_md_table(*_bbh_agreement_table(record)), "", f"_{_NOTES['agreement']}_", ""]
    if "needle" in record:
        out += ["## Needle retention", "", _md_table(*_needle_table(record)), "", f"_{_NOTES['needle']}_", ""]
    if "teacher" in record:
        out += ["## Agreement with the teacher's labels", "", _md_table(*_teacher_table(record)), ""]
        out += [f"_{_NOTES['teacher']}_", ""]
    out += ["## Rate honoured", "", _md_table(*_rate_table(record)), "", f"_{_NOTES['rate']}_", ""]
    examples = record.get("examples") or {}
    if examples:
        out += [f"## Example: the first {examples['task']} demonstration", "", "Original:", ""]
        out += ["```", examples["original"], "```", ""]
        for method, by_rate in examples["compressed"].items():
            for rk, text in by_rate.items():
                out += [f"{_label(record, method)} at rate {rk}:", "", "```", text, "```", ""]
    out += ["## Methods", "", _md_table(["method", "label", "class"], _method_rows(record), text_cols=3), ""]
    out += ["## Settings", "", _md_table(["setting", "value"], _settings_rows(record)), ""]
    out += ["## Machine and libraries", "", _md_table(["key", "value"], _machine_rows(record)), ""]
    return "\n".join(out)


def render_html(record: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """Render a quality record as one self-contained HTML page (plots inline as data URIs)."""
    import base64

    from tokenlean.eval.report import _CSS, _html_table

    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(_title(record))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(_title(record))}</h1>",
        "<h2>Summary</h2>",
        _html_table(*_summary_table(record), text_cols=2),
        f'<p class="note">{esc(_NOTES["summary"])}</p>',
    ]
    for key, data in plots.items():
        if data:
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            caption = esc(key[:-4].replace("_", " "))
            parts.append(
                f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
            )
    sections = []
    if "bbh" in record:
        sections += [
            (
                f"BBH accuracy (reader {record['bbh']['reader']}, {record['bbh'].get('scoring', 'calibrated')} "
                "scoring), % [95% CI]",
                _bbh_table(record),
                "bbh",
            ),
            (
                "Agreement with the uncompressed prompt's answers (%) and answer KL",
                _bbh_agreement_table(record),
                "agreement",
            ),
        ]
    if "needle" in record:
        sections.append(("Needle retention", _needle_table(record), "needle"))
    if "teacher" in record:
        sections.append(("Agreement with the teacher's labels", _teacher_table(record), "teacher"))
    sections.append(("Rate honoured", _rate_table(record), "rate"))
    for title, table, note in sections:
        parts += [f"<h2>{esc(title)}</h2>", _html_table(*table, text_cols=2)]
        if note:
            parts.append(f'<p class="note">{esc(_NOTES[note])}</p>')
        if note == "bbh" and _chance_caveat(record):
            parts.append(f"<p><strong>{esc(_chance_caveat(record))}</strong></p>")
    examples = record.get("examples") or {}
    if examples:
        parts += [f"<h2>Example: the first {esc(examples['task'])} demonstration</h2>", "<p>Original:</p>"]
        parts.append(f"<pre>{esc(examples['original'])}</pre>")
        for method, by_rate in examples["compressed"].items():
            for rk, text in by_rate.items():
                parts += [
                    f"<p>{esc(_label(record, method))} at rate {esc(rk)}:</p>",
                    f"<pre>{esc(text)}</pre>",
                ]
    parts += [
        "<h2>Methods</h2>",
        _html_table(["method", "label", "class"], _method_rows(record), text_cols=3),
    ]
    parts += ["<h2>Settings</h2>", _html_table(["setting", "value"], _settings_rows(record), text_cols=2)]
    parts += [
        "<h2>Machine and libraries</h2>",
        _html_table(["key", "value"], _machine_rows(record), text_cols=2),
    ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _series(record: Mapping[str, Any], metric: str, method: str) -> list[tuple[float, float, float, float]]:
    """(rate, value, low, high) points of one method for one panel."""
    points = []
    for rate in record["config"]["rates"]:
        rk = _rate_key(rate)
        if metric == "bbh":
            cell = record["bbh"]["conditions"][f"{method}@{rk}"]["pooled"]
            value, ci = cell["accuracy"], cell["ci"]
        elif metric == "needle":
            cell = record["needle"][method][rk]
            value, ci = cell["key_kept"], cell["ci"]
        else:
            cell = record["teacher"][method][rk]
            value, ci = cell["f1"], cell["ci"]
        points.append((rate, value, ci[0], ci[1]))
    return sorted(points)


def plot_quality_vs_rate(record: Mapping[str, Any]) -> bytes | None:
    """One panel per metric (BBH accuracy, needle key retention, teacher F1) against the rate.

    One line per method with 95 % interval bars; the BBH panel marks the uncompressed and the
    no-demonstration accuracies. Returns PNG bytes, or None when no metric was measured.
    """
    from tokenlean.eval.report import _new_figure, _png_bytes

    panels = [m for m in METRICS if m in record]
    if not panels:
        return None
    titles = {
        "bbh": f"BBH accuracy ({record['bbh']['reader']})" if "bbh" in record else "",
        "needle": "needle key fact kept",
        "teacher": "F1 vs teacher labels",
    }
    fig = _new_figure(4.2 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        methods = record["config"]["methods"]
        for i, method in enumerate(methods):
            pts = _series(record, metric, method)
            shift = 0.004 * (i - (len(methods) - 1) / 2)  # keep overlapping error bars apart
            xs = [p[0] + shift for p in pts]
            ys = [100 * p[1] for p in pts]
            err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=_label(record, method))
        if metric == "bbh":
            conds = record["bbh"]["conditions"]
            ax.axhline(
                100 * conds["uncompressed"]["pooled"]["accuracy"],
                color="0.3",
                ls="--",
                lw=1,
                label="uncompressed",
            )
            ax.axhline(
                100 * conds["no_demos"]["pooled"]["accuracy"], color="0.6", ls=":", lw=1, label="no demos"
            )
            chance = float(np.mean(list(record["bbh"]["chance"].values())))
            ax.axhline(100 * chance, color="0.8", ls="-.", lw=1, label="chance")
        ax.set_xlabel("requested rate (fraction of tokens kept)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.set_title(titles[metric])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _png_bytes(fig)


def plot_rate_honoured(record: Mapping[str, Any]) -> bytes | None:
    """Achieved minus requested rate per method and rate, in percentage points (mean, bars min-max).

    The shaded band is the +-2 pp the compressors promise for inputs of 200+ tokens.
    """
    from tokenlean.eval.report import _new_figure, _png_bytes

    if not record.get("rate"):
        return None
    fig = _new_figure(5.6, 4.2)
    ax = fig.add_subplot()
    ax.axhspan(-2, 2, color="0.92", zorder=0, label="±2 pp")
    ax.axhline(0, color="0.5", ls="--", lw=1)
    methods = list(record["rate"])
    for i, method in enumerate(methods):
        cells = sorted(record["rate"][method].values(), key=lambda c: c["requested"])
        shift = 0.004 * (i - (len(methods) - 1) / 2)
        xs = [c["requested"] + shift for c in cells]
        ys = [100 * (c["mean"] - c["requested"]) for c in cells]
        err = [[100 * (c["mean"] - c["min"]) for c in cells], [100 * (c["max"] - c["mean"]) for c in cells]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=_label(record, method))
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, -3), max(high, 3))
    ax.set_xlabel("requested rate (fraction of cl100k tokens kept)")
    ax.set_ylabel("achieved − requested (pp; mean, bars min–max)")
    ax.set_title("rate honoured")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def write_quality_report(record: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Render everything in memory, then write report.json/.md/.html and the plots atomically."""
    out = ensure_writable_dir(out_dir)
    plots = {QUALITY_PLOT_NAME: plot_quality_vs_rate(record), RATE_PLOT_NAME: plot_rate_honoured(record)}
    markdown = render_markdown(record)
    page = render_html(record, {k: v for k, v in plots.items() if v})
    paths: dict[str, Path] = {}
    for name, data in plots.items():
        if data:
            paths[name] = atomic_write_bytes(out / name, data)
        else:
            (out / name).unlink(missing_ok=True)
    paths["markdown"] = atomic_write_text(out / MARKDOWN_NAME, markdown)
    paths["html"] = atomic_write_text(out / HTML_NAME, page)
    paths["json"] = atomic_write_json(out / JSON_NAME, record)
    return paths


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

QUICK = {
    "rates": (0.5, 0.2),
    "tasks": ("date_understanding",),
    "n": 6,
    "needle_depths": (0.5,),
    "heldout": 2,
    "haystack_tokens": 300,
}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QualityError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_quality_arguments(parser: Any) -> None:
    """Add the quality-run options to an ``argparse`` parser."""
    parser.add_argument("--out", required=True, help="run folder (resumable; report files go here)")
    parser.add_argument(
        "--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES), help="e.g. 0.5,0.33,0.2"
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: default, random, selective_context, model=<hub id or folder>",
    )
    parser.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help=f"BBH tasks, from: {', '.join(BBH_TASK_FORMATS)}"
    )
    parser.add_argument("--n", type=int, default=QualityConfig.n, help="test questions per BBH task")
    parser.add_argument("--reader", default=QualityConfig.reader, help="zoo causal LM that answers BBH")
    parser.add_argument("--metrics", default=",".join(METRICS), help="which of bbh, needle, teacher")
    parser.add_argument(
        "--scoring",
        choices=("calibrated", "raw"),
        default=QualityConfig.scoring,
        help="BBH answer choice: label log-likelihood calibrated by a content-free question, or raw",
    )
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1]")
    parser.add_argument("--heldout", type=int, default=QualityConfig.heldout, help="held-out essays used")
    parser.add_argument("--haystack-tokens", type=int, default=QualityConfig.haystack_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is much faster on a machine shared with other jobs",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run (one task, few questions) to try it out"
    )
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: Any) -> QualityConfig:
    """Build the :class:`QualityConfig` from parsed arguments (``--quick`` shrinks the defaults)."""
    settings: dict[str, Any] = {
        "rates": _floats(args.rates),
        "methods": _names(args.methods),
        "tasks": _names(args.tasks),
        "n": args.n,
        "reader": args.reader,
        "metrics": _names(args.metrics),
        "scoring": args.scoring,
        "needle_depths": _floats(args.depths),
        "heldout": args.heldout,
        "haystack_tokens": args.haystack_tokens,
        "seed": args.seed,
    }
    if args.quick:
        settings.update(QUICK)
    return QualityConfig(**settings)


def run_quality_command(args: Any) -> int:
    """Run the quality benchmark from parsed arguments; print where the report went; return 0."""
    config = config_from_args(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise QualityError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    record = run_quality(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(render_markdown(record).split("## BBH", 1)[0].rstrip())
    print(f"\nreport written to {Path(args.out) / HTML_NAME} ({record['wall_s']:.0f} s)")
    return 0
