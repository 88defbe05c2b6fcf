"""Quality of prompt compressors as harness tasks: BBH few-shot accuracy, needle retention, teacher F1.

Three tasks, each measured for the baseline and every compressor variant (``--compressor`` at
every ``--rate``; rates are fractions of cl100k tokens kept):

* ``bbh`` (also patches): **BBH few-shot accuracy.** The 3-shot chain-of-thought prompts of
  BIG-Bench Hard (Suzgun et al. 2022, the ``cot_fewshot`` prompts lm-eval ships) are the
  demonstrations. A compressor variant compresses the three demonstrations (one context each);
  the task description and the test question stay verbatim. A patch variant reads the
  uncompressed demonstrations with the patched model; the baseline reads them with the plain
  model, and also answers with no demonstrations at all. The reader is the bench's model: it
  reads ``description + demonstrations + "Q: <question>\\nA: So the answer is"`` and picks the
  answer label (``" (A"``, ``" Yes"``...) with the highest log-likelihood (no reasoning is
  generated). With ``scoring=calibrated`` (the default) the label scores of a content-free
  question (``"Q: N/A"``) under the same prompt are subtracted first (Zhao et al. 2021); both
  accuracies are kept. The prompt prefix's KV cache is reused for every question of a
  (variant, subtask). Reported with Wilson intervals, the paired change against the baseline
  (bootstrap over questions), the agreement with the baseline's answers and the KL divergence of
  the answer distributions from it.
* ``needle``: **needle retention.** A needle sentence ("The special magic number for <city> is
  <7 digits>.") is inserted at several depths into held-out Paul Graham essays; the key fact
  survives when the number is still in the compressed text, intact.
* ``teacher``: **agreement with the teacher.** Word-level precision/recall/F1 of the words a
  compressor keeps against the keep labels of the distillation teacher (self-information under a
  zoo LM, see ``compressors/prompt/labels.py``) at the variant's rate, on the held-out essays.
  Compressors segment text into words differently, so both sides are mapped to characters and
  scored on the teacher's words.

Every compress call's token counts go on one row (``origin_tokens``, ``compressed_tokens``,
``compress_s``), which the runner pools into the report's "tokens saved / rate honoured" table.

This module also registers the report sections of the three tasks and the plot
``quality_vs_rate.png`` (one panel per task, quality against the requested rate, one line per
compressor), and holds the compressed-text helpers (:func:`kept_char_mask`, :func:`word_spans`,
:func:`spans_kept`, :func:`needle_retention`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenlean.errors import EvalError

from .bbh import BBH_TASK_FORMATS, CONTENT_FREE_QUESTION, ChoiceScorer, bbh_cot_prompt, bbh_items, bbh_prefix
from .haystack import Needle, heldout_essays, insert_needle, make_needles, truncate_to_tokens
from .report import Pre, Table, Text, new_figure, png_bytes, register_plot, register_section, variant_label
from .stats import binary_f1, bootstrap_ci, paired_bootstrap_diff, prf, wilson_interval
from .tasks import Example, Task, register_task

__all__ = [
    "DEFAULT_BBH_TASKS",
    "BBHTask",
    "NeedleTask",
    "TeacherTask",
    "answer_kl",
    "choice_logprobs",
    "heldout_haystacks",
    "kept_char_mask",
    "needle_retention",
    "plot_quality_vs_rate",
    "predictions",
    "spans_kept",
    "teacher_word_scores",
    "word_spans",
]

#: The BBH subtasks measured by default (formats in :data:`tokenlean.eval.bbh.BBH_TASK_FORMATS`).
DEFAULT_BBH_TASKS = ("date_understanding", "logical_deduction_three_objects", "disambiguation_qa", "navigate")
#: Sections (= task names) this module renders, in the order of the plot's panels.
SECTIONS = ("bbh", "needle", "teacher")
QUALITY_PLOT_NAME = "quality_vs_rate.png"

_DASH = "—"


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

    With the compressor's ``words`` and keep ``labels`` (a ``CompressionResult``'s, or a
    :class:`~tokenlean.eval.variants.Compressed`'s), the words are located in order in
    ``original`` and the kept ones marked. When that fails (no labels, or words that are not
    verbatim substrings, e.g. lower-cased by an uncased tokenizer *and* accent-stripped) the
    compressed text is aligned token by token onto the original (``difflib``; exact for
    compressors that only delete).

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
    needle : tokenlean.eval.haystack.Needle
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


# --------------------------------------------------------------------------------------------
# option parsing
# --------------------------------------------------------------------------------------------


def _split_option(value: Any) -> list[Any]:
    """A list option: a sequence, one value, or a string of values separated by ``+``, ``;`` or spaces."""
    if isinstance(value, str):
        return [v for v in re.split(r"[+;\s]+", value.strip()) if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _floats(value: Any, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in _split_option(value))
    except (TypeError, ValueError):
        raise EvalError(f"{what} must be numbers separated by '+', got {value!r}") from None


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or int(value) != value
        or value < minimum
    ):
        raise EvalError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=8)
def heldout_haystacks(heldout: int, haystack_tokens: int) -> tuple[tuple[str, str], ...]:
    """The last ``heldout`` Paul Graham essays, each cut at a sentence end to ``haystack_tokens`` cl100k tokens.

    Returns ``((name, text), ...)``; the default compressor never saw these essays in training.
    """
    from tokenlean.compressors.prompt.counting import get_counter

    counter = get_counter("cl100k")
    return tuple(
        (name, truncate_to_tokens(text, counter, haystack_tokens)) for name, text in heldout_essays(heldout)
    )


def _check_haystack_options(heldout: Any, haystack_tokens: Any) -> tuple[int, int]:
    return (
        _positive_int(heldout, "heldout"),
        _positive_int(haystack_tokens, "haystack_tokens", minimum=50),
    )


# --------------------------------------------------------------------------------------------
# needle
# --------------------------------------------------------------------------------------------


@register_task("needle")
class NeedleTask(Task):
    """Needle retention: does the needle's number survive the compressor, intact?

    Options: ``heldout`` (held-out essays, default 10), ``haystack_tokens`` (each essay cut to
    at most this many cl100k tokens, default 1000), ``depths`` (needle depths in [0, 1],
    ``+``-separated, default ``0.1+0.5+0.9``), ``seed`` (needle numbers and intervals).
    One example per essay and depth.

    Row: ``essay``, ``depth``, ``key_kept``, ``city_kept``, ``word_recall`` (0/1, 0/1, fraction
    of the needle's words kept), plus the compress call's ``origin_tokens``,
    ``compressed_tokens``, ``compress_s`` for compressor variants. Aggregate: ``key_kept`` (share
    of needles whose number survived), ``k``, ``n``, ``ci_low``/``ci_high`` (95 % Wilson),
    ``city_kept``, ``word_recall`` with ``word_recall_low``/``word_recall_high`` (bootstrap),
    and ``depth/<d>`` (key kept at each depth).
    """

    name = "needle"
    needs_model = False
    primary = "key_kept"
    higher_is_better = True
    kinds = ("baseline", "compressor")
    order = "example"
    section = "needle"

    def __init__(
        self,
        heldout: int = 10,
        haystack_tokens: int = 1000,
        depths: Any = (0.1, 0.5, 0.9),
        seed: int = 0,
    ) -> None:
        self.heldout, self.haystack_tokens = _check_haystack_options(heldout, haystack_tokens)
        self.depths = _floats(depths, "needle depths")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise EvalError(f"needle depths must be in [0, 1], got {depths!r}")
        if len(set(self.depths)) != len(self.depths):
            raise EvalError(f"a needle depth is given twice: {depths!r}")
        self.seed = int(seed)

    def config(self) -> dict[str, Any]:
        return {
            "heldout": self.heldout,
            "haystack_tokens": self.haystack_tokens,
            "depths": list(self.depths),
            "seed": self.seed,
        }

    def examples(self, tokenizer: Any = None) -> list[Example]:
        haystacks = heldout_haystacks(self.heldout, self.haystack_tokens)
        needles = make_needles(len(haystacks) * len(self.depths), self.seed)
        out, k = [], 0
        for name, text in haystacks:
            for depth in self.depths:
                full, span = insert_needle(text, needles[k].sentence, depth)
                data = {"essay": name, "depth": depth, "text": full, "span": span, "needle": needles[k]}
                out.append(Example(f"{name}@{depth:g}", data))
                k += 1
        return out

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        data = example.data
        text = data["text"]
        row: dict[str, Any] = {"essay": data["essay"], "depth": data["depth"]}
        if variant.kind == "compressor":
            compressed = bench.compress(variant, text)
            out = compressed.text
            mask = kept_char_mask(text, out, compressed.words, compressed.labels)
            row.update(needle_retention(text, data["span"], data["needle"], out, mask))
            row.update(compressed.row())
        else:  # the text as given
            row.update(needle_retention(text, data["span"], data["needle"], text, np.ones(len(text), bool)))
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        kept = [float(r["key_kept"]) for r in rows]
        k, n = int(round(sum(kept))), len(kept)
        low, high = wilson_interval(k, n)
        recall = [float(r["word_recall"]) for r in rows if _finite(r.get("word_recall"))]
        r_low, r_high = bootstrap_ci(recall, seed=self.seed)
        out = {
            "key_kept": k / n,
            "k": k,
            "n": n,
            "ci_low": low,
            "ci_high": high,
            "city_kept": float(np.mean([r["city_kept"] for r in rows])),
            "word_recall": float(np.mean(recall)) if recall else float("nan"),
            "word_recall_low": r_low,
            "word_recall_high": r_high,
        }
        depths = list(self.depths) + sorted({float(r["depth"]) for r in rows} - set(self.depths))
        for depth in depths:
            sel = [float(r["key_kept"]) for r in rows if float(r["depth"]) == depth]
            out[f"depth/{depth:g}"] = float(np.mean(sel)) if sel else float("nan")
        return out


# --------------------------------------------------------------------------------------------
# BBH few-shot
# --------------------------------------------------------------------------------------------


def choice_logprobs(
    scores: Sequence[float], content_free: Sequence[float] | None, scoring: str
) -> np.ndarray:
    """The reader's log-distribution over one question's choices (softmax of the scores it answers by).

    ``"raw"``: the labels' log-likelihoods; ``"calibrated"``: minus the labels' log-likelihoods
    for the content-free question under the same prompt.
    """
    values = np.asarray(scores, dtype=float)
    if scoring == "calibrated":
        values = values - np.asarray(content_free, dtype=float)
    values = values - values.max()
    return values - np.log(np.exp(values).sum())


def predictions(rows: Sequence[Mapping[str, Any]], scoring: str) -> np.ndarray:
    """The chosen answer of each BBH row (``scores``, ``content_free``): argmax of the (calibrated) scores."""
    out = []
    for row in rows:
        values = np.asarray(row["scores"], dtype=float)
        if scoring == "calibrated":
            values = values - np.asarray(row["content_free"], dtype=float)
        out.append(int(np.argmax(values)))
    return np.asarray(out, dtype=np.int64)


def answer_kl(
    p_rows: Sequence[Mapping[str, Any]], q_rows: Sequence[Mapping[str, Any]], scoring: str
) -> np.ndarray:
    """KL(p || q) in nats between the answer distributions of paired BBH rows, per question."""
    out = []
    for p_row, q_row in zip(p_rows, q_rows):
        p = choice_logprobs(p_row["scores"], p_row.get("content_free"), scoring)
        q = choice_logprobs(q_row["scores"], q_row.get("content_free"), scoring)
        out.append(float(np.sum(np.exp(p) * (p - q))))
    return np.asarray(out, dtype=float)


def _other(scoring: str) -> str:
    return "raw" if scoring == "calibrated" else "calibrated"


@register_task("bbh")
class BBHTask(Task):
    """BIG-Bench Hard few-shot accuracy of the bench's model with (compressed) CoT demonstrations.

    Options: ``tasks`` (BBH subtasks, ``+``-separated; default the four of
    :data:`DEFAULT_BBH_TASKS`), ``n`` (test questions per subtask, default 30), ``scoring``
    (``calibrated`` or ``raw``), ``seed`` (question draw and bootstrap). One example per test
    question, ``<subtask>/<BIG-bench index>``.

    Row: ``subtask``, ``index``, ``target``, ``scores`` and ``content_free`` (label
    log-likelihoods after the question and after the content-free question); the baseline's
    rows add ``no_demos`` (the same without demonstrations). The first question of every
    subtask also carries ``prefix_tokens`` (reader tokens of description + demonstrations),
    ``demos`` (the demonstrations as the variant shows them; baseline and compressors) and, for
    compressor variants, the compress call's ``origin_tokens``, ``compressed_tokens``,
    ``compress_s``.
    """

    name = "bbh"
    primary = "accuracy"
    higher_is_better = True
    kinds = ("baseline", "patch", "compressor")
    order = "variant"
    section = "bbh"

    def __init__(
        self, tasks: Any = DEFAULT_BBH_TASKS, n: int = 30, scoring: str = "calibrated", seed: int = 0
    ):
        self.tasks = tuple(str(t) for t in _split_option(tasks))
        bad = [t for t in self.tasks if t not in BBH_TASK_FORMATS]
        if bad or not self.tasks:
            raise EvalError(
                f"no BBH format for task(s) {bad or tasks!r}; supported: {', '.join(BBH_TASK_FORMATS)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise EvalError(f"a BBH task is given twice: {tasks!r}")
        self.n = _positive_int(n, "n")
        if scoring not in ("calibrated", "raw"):
            raise EvalError(f"scoring must be 'calibrated' or 'raw', got {scoring!r}")
        self.scoring = scoring
        self.seed = int(seed)
        self._prompts: dict[str, tuple[str, list[str]]] = {}
        self._state: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "n": self.n, "scoring": self.scoring, "seed": self.seed}

    def _prompt(self, subtask: str) -> tuple[str, list[str]]:
        if subtask not in self._prompts:
            self._prompts[subtask] = bbh_cot_prompt(subtask)
        return self._prompts[subtask]

    def examples(self, tokenizer: Any = None) -> list[Example]:
        out = []
        for subtask in self.tasks:
            self._prompt(subtask)
            for i, item in enumerate(bbh_items(subtask, self.n, self.seed)):
                out.append(
                    Example(f"{subtask}/{item.index}", {"subtask": subtask, "item": item, "first": i == 0})
                )
        return out

    # -- per-(variant, subtask) state: the prompt prefix's KV cache ---------------------------

    def close(self) -> None:
        """Free the cached prompt prefix (the next question rebuilds it)."""
        if self._state is not None:
            state, self._state = self._state, None
            state["stack"].close()

    def _open(self, bench: Any, variant: Any, subtask: str) -> dict[str, Any]:
        key = (id(bench.model), variant.name, subtask)
        if self._state is not None and self._state["key"] == key:
            return self._state
        self.close()
        description, demos = self._prompt(subtask)
        compressed = None
        if variant.kind == "compressor":
            compressed = bench.compress(variant, demos)
            texts = list(compressed.texts)
            shown = texts if len(texts) == len(demos) else [compressed.text]
        else:
            shown = list(demos)
        prefixes = {"demos": bbh_prefix(description, shown)}
        if variant.kind == "baseline":
            prefixes["none"] = bbh_prefix(description, [])
        stack = contextlib.ExitStack()
        state: dict[str, Any] = {
            "key": key,
            "stack": stack,
            "shown": shown,
            "compressed": compressed,
            "conds": {},
        }
        try:
            for cond, prefix in prefixes.items():
                scorer = ChoiceScorer(bench.model, bench.tokenizer)
                stack.enter_context(scorer.prefix(prefix))
                tokens = len(bench.tokenizer(prefix)["input_ids"])
                state["conds"][cond] = {"scorer": scorer, "prefix_tokens": tokens, "content_free": {}}
        except BaseException:
            stack.close()
            raise
        self._state = state
        return state

    @staticmethod
    def _score(cond: dict[str, Any], item: Any) -> dict[str, Any]:
        scorer = cond["scorer"]
        scores = scorer.score(item.question, item.continuations)
        conts = tuple(item.continuations)
        if conts not in cond["content_free"]:  # the prompt's bias: the same for every question
            cond["content_free"][conts] = scorer.score(CONTENT_FREE_QUESTION, conts).tolist()
        return {"scores": scores.tolist(), "content_free": list(cond["content_free"][conts])}

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        subtask, item, first = example.data["subtask"], example.data["item"], example.data["first"]
        state = self._open(bench, variant, subtask)
        row: dict[str, Any] = {"subtask": subtask, "index": item.index, "target": item.target}
        conds = state["conds"]
        row.update(self._score(conds["demos"], item))
        if "none" in conds:
            row["no_demos"] = self._score(conds["none"], item)
        if first:  # once per (variant, subtask): what the prompt was, and the compress call
            row["prefix_tokens"] = conds["demos"]["prefix_tokens"]
            if "none" in conds:
                row["no_demos"]["prefix_tokens"] = conds["none"]["prefix_tokens"]
            if variant.kind != "patch":
                row["demos"] = list(state["shown"])
            if state["compressed"] is not None:
                row.update(state["compressed"].row())
        return row

    # -- summaries ------------------------------------------------------------------------------

    def _subtasks(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        seen = {r["subtask"] for r in rows}
        return [t for t in self.tasks if t in seen] + sorted(seen - set(self.tasks))

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Pooled and per-subtask accuracy under both scorings, Wilson interval, demo tokens.

        Keys: ``accuracy`` (under ``scoring``), ``k``, ``n``, ``ci_low``/``ci_high`` (95 %
        Wilson), ``accuracy_calibrated``, ``accuracy_raw``, ``demo_tokens`` (mean over the
        subtasks of the reader tokens before the question), and per subtask
        ``accuracy/<subtask>``, ``k/<subtask>``, ``n/<subtask>``, ``demo_tokens/<subtask>``.
        """
        self.close()  # every question of the variant has run by now
        if not rows:
            return {}
        targets = np.asarray([r["target"] for r in rows])
        correct = {s: predictions(rows, s) == targets for s in ("calibrated", "raw")}
        main = correct[self.scoring]
        k, n = int(main.sum()), len(rows)
        low, high = wilson_interval(k, n)
        out: dict[str, float] = {
            "accuracy": k / n,
            "k": k,
            "n": n,
            "ci_low": low,
            "ci_high": high,
            "accuracy_calibrated": float(correct["calibrated"].mean()),
            "accuracy_raw": float(correct["raw"].mean()),
        }
        tokens = []
        subtasks = np.asarray([r["subtask"] for r in rows])
        for sub in self._subtasks(rows):
            sel = subtasks == sub
            out[f"accuracy/{sub}"] = float(main[sel].mean())
            out[f"k/{sub}"] = int(main[sel].sum())
            out[f"n/{sub}"] = int(sel.sum())
            prefix = [r["prefix_tokens"] for r in rows if r["subtask"] == sub and "prefix_tokens" in r]
            if prefix:
                out[f"demo_tokens/{sub}"] = int(prefix[0])
                tokens.append(prefix[0])
        if tokens:
            out["demo_tokens"] = float(np.mean(tokens))
        return out

    @staticmethod
    def _paired(
        rows: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]]
    ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
        by_key = {(r["subtask"], r["index"]): r for r in baseline}
        pairs = [
            (r, by_key[(r["subtask"], r["index"])]) for r in rows if (r["subtask"], r["index"]) in by_key
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _paired_stats(
        self, rows: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]]
    ) -> dict[str, float]:
        targets = np.asarray([r["target"] for r in rows])
        pred, base_pred = predictions(rows, self.scoring), predictions(base, self.scoring)
        delta, d_low, d_high = paired_bootstrap_diff(
            (pred == targets).astype(float), (base_pred == targets).astype(float), seed=self.seed
        )
        kl = answer_kl(base, rows, self.scoring)
        k_low, k_high = bootstrap_ci(kl, seed=self.seed)
        return {
            "delta": delta,
            "delta_low": d_low,
            "delta_high": d_high,
            "agreement": float(np.mean(pred == base_pred)) if len(rows) else float("nan"),
            "kl": float(kl.mean()) if kl.size else float("nan"),
            "kl_low": k_low,
            "kl_high": k_high,
            "n_paired": len(rows),
        }

    def compare(self, rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
        """Paired with the baseline's answers on the same questions.

        ``delta`` (accuracy change, with ``delta_low``/``delta_high``: 95 % paired bootstrap
        over questions), ``agreement`` (share answered as the baseline did), ``kl`` (mean
        KL(baseline || variant) of the answer distributions, nats, with ``kl_low``/``kl_high``),
        ``n_paired``, and the same per subtask under ``subtasks``.
        """
        self.close()
        rows_p, base_p = self._paired(rows, baseline)
        out: dict[str, Any] = self._paired_stats(rows_p, base_p)
        out["subtasks"] = {}
        for sub in self._subtasks(rows_p):
            sel = [i for i, r in enumerate(rows_p) if r["subtask"] == sub]
            out["subtasks"][sub] = self._paired_stats([rows_p[i] for i in sel], [base_p[i] for i in sel])
        return out

    def extra(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """The no-demonstrations condition, chance, and the first demonstration as each compressor left it.

        ``no_demos``: :meth:`aggregate` and :meth:`compare` (against the baseline) of the
        baseline's answers without demonstrations; ``chance`` per subtask (mean of 1/choices)
        and ``chance_pooled`` (their mean); ``example``: ``{"subtask", "original",
        "compressed": {variant: text}}``; ``scoring``, ``tasks``, ``n_per_task``.
        """
        self.close()
        out: dict[str, Any] = {"scoring": self.scoring, "tasks": list(self.tasks), "n_per_task": self.n}
        base_name = next((name for name, rs in rows.items() if rs and "no_demos" in rs[0]), None)
        any_rows = next((rs for rs in rows.values() if rs), [])
        chance = {}
        for sub in self._subtasks(any_rows):
            chance[sub] = float(np.mean([1 / len(r["scores"]) for r in any_rows if r["subtask"] == sub]))
        out["chance"] = chance
        out["chance_pooled"] = float(np.mean(list(chance.values()))) if chance else float("nan")
        if base_name is not None:
            base = rows[base_name]
            none = []
            for r in base:
                nd = r["no_demos"]
                none.append({"subtask": r["subtask"], "index": r["index"], "target": r["target"], **nd})
            out["no_demos"] = {**self.aggregate(none), **self.compare(none, base)}
        first = self.tasks[0]
        example: dict[str, Any] = {"subtask": first, "original": None, "compressed": {}}
        for name, rs in rows.items():
            head = next((r for r in rs if r["subtask"] == first and "demos" in r), None)
            if head is None or not head["demos"]:
                continue
            if name == base_name:
                example["original"] = head["demos"][0]
            elif "origin_tokens" in head:
                example["compressed"][name] = head["demos"][0]
        if example["original"] is not None or example["compressed"]:
            out["example"] = example
        return out


# --------------------------------------------------------------------------------------------
# agreement with the teacher
# --------------------------------------------------------------------------------------------


def teacher_word_scores(texts: Sequence[str], model: Any, tokenizer: Any, progress: bool = False) -> list:
    """The distillation teacher's words and scores: ``[(spans, self_information), ...]`` per text.

    Words are the student's (minilm-l6 WordPiece words, ``labels.text_words``); scores are each
    word's self-information under the causal LM ``model`` (``selfinfo.word_self_information_many``),
    exactly as ``train.py`` labels its training data.
    """
    from tokenlean.compressors.prompt.labels import student_tokenizer, text_words
    from tokenlean.compressors.prompt.selfinfo import word_self_information_many

    student = student_tokenizer()
    spans = [text_words(student, t).spans for t in texts]
    model.eval()
    scores = word_self_information_many(list(texts), model, tokenizer, spans, progress=progress)
    return [(s, np.asarray(v, dtype=float)) for s, v in zip(spans, scores)]


@register_task("teacher")
class TeacherTask(Task):
    """Word-level F1 of a compressor's kept words against the self-information teacher's labels.

    Options: ``heldout`` (held-out essays, default 10), ``haystack_tokens`` (each cut to at
    most this many cl100k tokens, default 1000), ``teacher`` (zoo causal LM, default
    ``smollm2-135m``: the bench's model is reused when it is that model, unpatched, in
    float32), ``seed`` (bootstrap). One example per essay.

    The teacher keeps the top ``rate`` of words by self-information in every chunk
    (``labels.teacher_labels``) at the variant's rate; the baseline keeps every word (rate 1).
    Row: ``essay``, ``tp``, ``fp``, ``fn``, ``n`` (teacher words), plus the compress call's
    counts for compressor variants. Aggregate: micro ``precision``, ``recall``, ``f1`` over the
    essays, ``ci_low``/``ci_high`` (95 % bootstrap over essays), ``n_words``, ``n_docs``.
    """

    name = "teacher"
    needs_model = False
    primary = "f1"
    higher_is_better = True
    kinds = ("baseline", "compressor")
    order = "example"
    section = "teacher"

    def __init__(
        self, heldout: int = 10, haystack_tokens: int = 1000, teacher: str = "smollm2-135m", seed: int = 0
    ) -> None:
        self.heldout, self.haystack_tokens = _check_haystack_options(heldout, haystack_tokens)
        self.teacher = str(teacher)
        self.seed = int(seed)
        self._docs: tuple[tuple[str, str], ...] = ()
        self._scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._spans: dict[str, np.ndarray] = {}

    def config(self) -> dict[str, Any]:
        return {
            "heldout": self.heldout,
            "haystack_tokens": self.haystack_tokens,
            "teacher": self.teacher,
            "seed": self.seed,
        }

    def examples(self, tokenizer: Any = None) -> list[Example]:
        self._docs = heldout_haystacks(self.heldout, self.haystack_tokens)
        return [Example(name, {"essay": name, "text": text}) for name, text in self._docs]

    def _teacher_model(self, bench: Any) -> tuple[Any, Any, bool]:
        """``(model, tokenizer, loaded_here)``: the bench's model when it is the teacher, else a zoo load."""
        import torch

        from tokenlean.patching import active_patches

        def usable(model: Any) -> bool:
            return not active_patches(model) and next(model.parameters()).dtype == torch.float32

        if bench.model is not None and bench.model_name == self.teacher and usable(bench.model):
            return bench.model, bench.tokenizer, False
        shared = getattr(getattr(bench, "compressors", None), "shared_models", {}) or {}
        if self.teacher in shared and usable(shared[self.teacher][0]):
            return shared[self.teacher][0], shared[self.teacher][1], False
        from tokenlean import zoo

        device = getattr(bench, "device", None)
        model, tokenizer = zoo.load(self.teacher, device=None if device is None else str(device))
        return model, tokenizer, True

    def _teacher_scores(self, bench: Any, essay: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's word spans and scores of ``essay``: every essay scored once, on first need."""
        if essay not in self._scores:
            docs = [(name, t) for name, t in self._docs if name not in self._scores]
            if essay not in {name for name, _ in docs}:
                docs.append((essay, text))
            model, tokenizer, loaded = self._teacher_model(bench)
            try:
                scored = teacher_word_scores([t for _, t in docs], model, tokenizer)
            finally:
                if loaded:
                    del model
            for (name, _), pair in zip(docs, scored):
                self._scores[name] = pair
        return self._scores[essay]

    def _student_spans(self, essay: str, text: str) -> np.ndarray:
        if essay in self._scores:
            return self._scores[essay][0]
        if essay not in self._spans:
            from tokenlean.compressors.prompt.labels import student_tokenizer, text_words

            self._spans[essay] = text_words(student_tokenizer(), text).spans
        return self._spans[essay]

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        from tokenlean.compressors.prompt.labels import teacher_labels

        essay, text = example.data["essay"], example.data["text"]
        row: dict[str, Any] = {"essay": essay}
        if variant.kind != "compressor":  # everything kept, and the teacher at rate 1 keeps everything
            n = len(self._student_spans(essay, text))
            counts = binary_f1(np.ones(n, bool), np.ones(n, bool))
        else:
            spans, scores = self._teacher_scores(bench, essay, text)
            gold = teacher_labels(text, spans, scores, rate=variant.rate).astype(bool)
            compressed = bench.compress(variant, text)
            mask = kept_char_mask(text, compressed.text, compressed.words, compressed.labels)
            counts = binary_f1(spans_kept(mask, spans), gold)
            row.update(compressed.row())
        row.update({k: counts[k] for k in ("tp", "fp", "fn", "n")})
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        counts = np.asarray([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=float)
        tp, fp, fn = counts.sum(axis=0)

        def micro_f1(sample: np.ndarray) -> float:
            return prf(*sample.sum(axis=0))["f1"]

        low, high = bootstrap_ci(counts, stat=micro_f1, seed=self.seed)
        return {
            **prf(tp, fp, fn),
            "ci_low": low,
            "ci_high": high,
            "n_words": int(sum(r["n"] for r in rows)),
            "n_docs": len(rows),
        }


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: Any, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}" if _finite(x) else _DASH


def _pct_ci(value: Any, low: Any, high: Any, digits: int = 1) -> str:
    text = _pct(value, digits)
    if text != _DASH and _finite(low) and _finite(high):
        text += f" [{_pct(low, digits)}, {_pct(high, digits)}]"
    return text


def _signed_pp(value: Any, low: Any, high: Any) -> str:
    if not _finite(value):
        return _DASH
    text = f"{100 * value:+.1f}"
    if _finite(low) and _finite(high):
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return text


def _rate_text(rate: Any) -> str:
    return f"{rate:g}" if _finite(rate) else _DASH


def _variants(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {v["name"]: v for v in record["variants"]}


def _spec(variant: Mapping[str, Any]) -> str:
    return str(variant.get("spec") or variant["name"].rsplit("@", 1)[0])


def _spec_label(variant: Mapping[str, Any]) -> str:
    """A compressor variant's spec (without the rate), with ``(peer: <library>)`` for peers."""
    peer = variant.get("peer")
    return _spec(variant) + (f" (peer: {peer})" if peer else "")


def _measured(record: Mapping[str, Any], entry: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    """The record's variants of ``kind`` that ``entry`` measured, in record order."""
    return [v for v in record["variants"] if v.get("kind") == kind and v["name"] in entry["variants"]]


def _first_entries(record: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """The first quality entry of each of this module's sections: ``{section: (key, entry)}``."""
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for key, entry in record["quality"].items():
        section = entry.get("section")
        if section in SECTIONS and section not in out:
            out[section] = (key, entry)
    return out


_NOTES = {
    "summary": (
        "Rates are the fraction of cl100k tokens kept; achieved rate: mean over the variant's compress "
        "calls in this run. BBH accuracy is pooled over the subtasks with Wilson's interval; Δ is the "
        "paired change against the uncompressed demonstrations (bootstrap over questions); agreement is "
        "the share of questions answered as with the uncompressed prompt. Needle: share of needles whose "
        "number survives intact (Wilson). Teacher F1: kept words against the self-information teacher's "
        "keep labels at the same rate (bootstrap over documents)."
    ),
    "bbh": (
        "BBH 3-shot chain-of-thought demonstrations (lm-eval's cot_fewshot prompts) compressed by each "
        "compressor, one context per demonstration; the task description and the test question are "
        "verbatim; patch variants read the uncompressed demonstrations with the patched reader. Questions "
        "are BIG-bench's examples of each task formatted as BBH; the reader picks the answer label with "
        "the highest log-likelihood after 'A: So the answer is' (no generated reasoning); with calibrated "
        "scoring, minus the label's log-likelihood for the content-free question 'Q: N/A' under the same "
        "prompt (removes the prompt's bias toward one label, which dominates small readers). Δ: paired "
        "change against the uncompressed demonstrations, bootstrap 95% interval over questions."
    ),
    "agreement": (
        "Agreement: share of questions answered as with the uncompressed demonstrations. KL: mean "
        "KL(uncompressed || condition) of the reader's distribution over the answer labels (softmax of "
        "the scores used for the answer), bootstrap 95% interval over questions; 0 = same answers with "
        "the same confidence. Demo tokens: reader tokens of the description and demonstrations (mean "
        "over the subtasks)."
    ),
    "needle": (
        "One needle ('The special magic number for <city> is <7 digits>.') per held-out essay and depth; "
        "key kept = the number appears intact in the compressed text (95% Wilson interval); needle words "
        "kept: share of the needle's words kept (bootstrap interval). The baseline (text as given) keeps "
        "every needle."
    ),
    "teacher": (
        "Precision/recall/F1 of the compressor's kept words against the teacher's keep labels at the same "
        "rate, on the teacher's words (a word counts as kept when at least half its characters are), "
        "micro-averaged over the held-out essays; 95% bootstrap interval over essays. The baseline keeps "
        "every word (F1 100% against the teacher at rate 1)."
    ),
}


def _bbh_conditions(
    record: Mapping[str, Any], entry: Mapping[str, Any]
) -> list[tuple[str, str, str, Mapping, Mapping]]:
    """``(kind, label, rate, aggregate, compare)`` of every BBH condition, in report order.

    Kinds: ``baseline`` (uncompressed demonstrations), ``no_demos``, ``patch``, ``compressor``.
    """
    aggs, comps = entry["variants"], entry.get("compare") or {}
    extra = entry.get("extra") or {}
    base = record["variants"][0]["name"]
    out: list[tuple[str, str, str, Mapping, Mapping]] = []
    if base in aggs:
        same = {"delta": 0.0, "delta_low": 0.0, "delta_high": 0.0, "agreement": 1.0, "kl": 0.0, "kl_low": 0.0,
                "kl_high": 0.0}  # fmt: skip
        subtasks = [k.split("/", 1)[1] for k in aggs[base] if k.startswith("accuracy/")]
        identical = {**same, "subtasks": {sub: dict(same) for sub in subtasks}}
        out.append(("baseline", "uncompressed demos", "1", aggs[base], comps.get(base) or identical))
    if extra.get("no_demos"):
        out.append(("no_demos", "no demonstrations", "0", extra["no_demos"], extra["no_demos"]))
    for v in _measured(record, entry, "patch"):
        label = f"{variant_label(record, v['name'])} (patched reader, uncompressed demos)"
        out.append(("patch", label, "1", aggs[v["name"]], comps.get(v["name"]) or {}))
    for v in _measured(record, entry, "compressor"):
        rate = _rate_text(v.get("rate"))
        out.append(("compressor", _spec_label(v), rate, aggs[v["name"]], comps.get(v["name"]) or {}))
    return out


def _bbh_subtask_cell(agg: Mapping[str, Any], sub: str) -> str:
    k, n = agg.get(f"k/{sub}"), agg.get(f"n/{sub}")
    low, high = wilson_interval(int(k), int(n)) if _finite(k) and _finite(n) and n > 0 else (None, None)
    return _pct_ci(agg.get(f"accuracy/{sub}"), low, high)


def _chance_caveat(record: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """A warning when the uncompressed prompt's pooled accuracy is within its 95 % interval of chance."""
    base = entry["variants"].get(record["variants"][0]["name"])
    chance = (entry.get("extra") or {}).get("chance_pooled")
    if not base or not _finite(chance) or not (_finite(base.get("ci_low")) and _finite(base.get("ci_high"))):
        return ""
    if not base["ci_low"] <= chance <= base["ci_high"]:
        return ""
    return (
        f"With the uncompressed demonstrations the reader scores {100 * base['accuracy']:.1f}% "
        f"[{100 * base['ci_low']:.1f}, {100 * base['ci_high']:.1f}], within reach of chance "
        f"({100 * chance:.1f}%): it barely uses the demonstrations, so these BBH differences between "
        "compressors and rates are not evidence either way; a stronger reader is needed for this measurement."
    )


@register_section("bbh")
def bbh_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
    """BBH accuracy per condition and subtask, the chance caveat, agreement and KL, the example demo."""
    blocks: list = _summary_blocks(record, key)
    extra = entry.get("extra") or {}
    config = entry.get("config") or {}
    tasks = list(extra.get("tasks") or config.get("tasks") or [])
    scoring = extra.get("scoring") or config.get("scoring") or "calibrated"
    n = extra.get("n_per_task") or config.get("n")
    chance = extra.get("chance") or {}
    conditions = _bbh_conditions(record, entry)

    headers = [
        "condition",
        "rate",
        *[f"{t} (n={n})" for t in tasks],
        "pooled",
        "Δ vs uncompressed, pp [95% CI]",
    ]
    rows = [["chance", _DASH, *[_pct(chance.get(t)) for t in tasks], _pct(extra.get("chance_pooled")), _DASH]]
    for _kind, label, rate, agg, cmp in conditions:
        cells = [_bbh_subtask_cell(agg, t) for t in tasks]
        pooled = _pct_ci(agg.get("accuracy"), agg.get("ci_low"), agg.get("ci_high"))
        delta = _signed_pp(cmp.get("delta"), cmp.get("delta_low"), cmp.get("delta_high"))
        rows.append([label, rate, *cells, pooled, delta])
    title = f"BBH accuracy (reader `{record['model']['name']}`, {scoring} scoring), % [95% Wilson CI]"
    blocks.append(Table(headers, rows, text_cols=2, title=title, note=_NOTES["bbh"]))
    caveat = _chance_caveat(record, entry)
    if caveat:
        blocks.append(Text(caveat, strong=True))

    other = _other(scoring)
    headers = ["condition", "rate", "demo tokens (reader)", *tasks, "pooled"]
    headers += ["KL to uncompressed answers, nats [95% CI]", f"pooled acc %, {other} scoring"]
    rows = []
    for _kind, label, rate, agg, cmp in conditions:
        tokens = agg.get("demo_tokens")
        subs = cmp.get("subtasks") or {}
        cells = [_pct((subs.get(t) or {}).get("agreement")) for t in tasks]
        kl = _DASH
        if _finite(cmp.get("kl")):
            kl = f"{cmp['kl']:.3f}"
            if _finite(cmp.get("kl_low")) and _finite(cmp.get("kl_high")):
                kl += f" [{cmp['kl_low']:.3f}, {cmp['kl_high']:.3f}]"
        row = [
            label,
            rate,
            str(int(tokens)) if _finite(tokens) else _DASH,
            *cells,
            _pct(cmp.get("agreement")),
        ]
        rows.append(row + [kl, _pct(agg.get(f"accuracy_{other}"))])
    title = "Agreement with the uncompressed prompt's answers (%) and answer KL"
    blocks.append(Table(headers, rows, text_cols=2, title=title, note=_NOTES["agreement"]))

    example = extra.get("example") or {}
    if example.get("original") is not None or example.get("compressed"):
        blocks.append(
            Text(f"Example: the first {example.get('subtask')} demonstration, as each compressor left it.")
        )
        if example.get("original") is not None:
            blocks.append(Pre(example["original"], title="Original"))
        variants = _variants(record)
        for name, text in (example.get("compressed") or {}).items():
            v = variants.get(name)
            label = f"{_spec_label(v)} at rate {_rate_text(v.get('rate'))}" if v else name
            blocks.append(Pre(text, title=label))
    return blocks


@register_section("needle")
def needle_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
    """Needle retention per compressor and rate: key kept (Wilson), city, needle words, by depth."""
    blocks: list = _summary_blocks(record, key)
    config = entry.get("config") or {}
    depths = [float(d) for d in config.get("depths") or []]
    if not depths:  # from the aggregates
        keys = {k for agg in entry["variants"].values() for k in agg if k.startswith("depth/")}
        depths = sorted(float(k.split("/", 1)[1]) for k in keys)
    if config:
        blocks.append(
            Text(
                f"{config.get('heldout')} held-out essays cut to {config.get('haystack_tokens')} cl100k tokens; "
                f"one needle per essay and depth ({', '.join(f'{d:g}' for d in depths)}); "
                f"{entry.get('n_examples', _DASH)} needles per variant."
            )
        )
    headers = ["compressor", "rate", "key kept % [95% CI]", "k/n", "city kept %", "needle words kept %"]
    headers += [f"depth {d:g}" for d in depths]
    rows = []
    for v in _measured(record, entry, "compressor"):
        agg = entry["variants"][v["name"]]
        row = [_spec_label(v), _rate_text(v.get("rate"))]
        row += [
            _pct_ci(agg.get("key_kept"), agg.get("ci_low"), agg.get("ci_high")),
            f"{agg.get('k')}/{agg.get('n')}",
        ]
        row += [
            _pct(agg.get("city_kept")),
            _pct_ci(agg.get("word_recall"), agg.get("word_recall_low"), agg.get("word_recall_high")),
        ]
        row += [_pct(agg.get(f"depth/{d:g}")) for d in depths]
        rows.append(row)
    blocks.append(Table(headers, rows, text_cols=2, title="Needle retention", note=_NOTES["needle"]))
    return blocks


@register_section("teacher")
def teacher_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
    """F1, precision and recall of each compressor's kept words against the teacher's labels."""
    blocks: list = _summary_blocks(record, key)
    config = entry.get("config") or {}
    if config:
        blocks.append(
            Text(
                f"Teacher `{config.get('teacher')}` (self-information, minilm-l6 words) on {config.get('heldout')} "
                f"held-out essays cut to {config.get('haystack_tokens')} cl100k tokens."
            )
        )
    headers = ["compressor", "rate", "F1 % [95% CI]", "precision %", "recall %", "words", "documents"]
    rows = []
    for v in _measured(record, entry, "compressor"):
        agg = entry["variants"][v["name"]]
        words = agg.get("n_words")
        rows.append(
            [
                _spec_label(v),
                _rate_text(v.get("rate")),
                _pct_ci(agg.get("f1"), agg.get("ci_low"), agg.get("ci_high")),
                _pct(agg.get("precision")),
                _pct(agg.get("recall")),
                f"{int(words):,}" if _finite(words) else _DASH,
                str(agg.get("n_docs", _DASH)),
            ]
        )
    title = "Agreement with the teacher's labels"
    blocks.append(Table(headers, rows, text_cols=2, title=title, note=_NOTES["teacher"]))
    return blocks


def _summary_blocks(record: Mapping[str, Any], key: str) -> list:
    """The table across the prompt tasks, at the top of the first of their sections (when 2+ are present)."""
    first = _first_entries(record)
    if len(first) < 2 or next(iter(first.values()))[0] != key:
        return []
    bbh = first.get("bbh", (None, None))[1]
    needle = first.get("needle", (None, None))[1]
    teacher = first.get("teacher", (None, None))[1]
    headers = ["variant", "rate", "achieved rate"]
    if bbh:
        headers += ["BBH acc % [95% CI]", "Δ vs uncompressed, pp [95% CI]", "agrees with uncompressed %"]
    if needle:
        headers += ["needle key kept % [95% CI]"]
    if teacher:
        headers += ["teacher F1 % [95% CI]"]
    tokens = record.get("tokens") or {}
    rows = []

    def bbh_cells(agg: Mapping[str, Any], cmp: Mapping[str, Any]) -> list[str]:
        return [
            _pct_ci(agg.get("accuracy"), agg.get("ci_low"), agg.get("ci_high")),
            _signed_pp(cmp.get("delta"), cmp.get("delta_low"), cmp.get("delta_high")),
            _pct(cmp.get("agreement")),
        ]

    def cell(entry: Mapping[str, Any] | None, name: str) -> list[str]:
        if not entry:
            return []
        agg = entry["variants"].get(name)
        if not agg:
            return [_DASH]
        return [_pct_ci(agg.get(entry["primary"]), agg.get("ci_low"), agg.get("ci_high"))]

    if bbh:
        conds = _bbh_conditions(record, bbh)
        for kind, label, rate, agg, cmp in conds:
            if kind in ("baseline", "no_demos"):
                rows.append(
                    [label, rate, _DASH, *bbh_cells(agg, cmp)] + [_DASH] * (bool(needle) + bool(teacher))
                )
    for v in record["variants"]:
        if v.get("kind") != "compressor":
            continue
        name = v["name"]
        achieved = (tokens.get(name) or {}).get("achieved_mean")
        row = [_spec_label(v), _rate_text(v.get("rate")), f"{achieved:.3f}" if _finite(achieved) else _DASH]
        if bbh:
            agg = bbh["variants"].get(name)
            row += bbh_cells(agg, (bbh.get("compare") or {}).get(name) or {}) if agg else [_DASH] * 3
        row += cell(needle, name) + cell(teacher, name)
        rows.append(row)
    return [Table(headers, rows, text_cols=2, title="Prompt compression: summary", note=_NOTES["summary"])]


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


@register_plot(QUALITY_PLOT_NAME)
def plot_quality_vs_rate(record: Mapping[str, Any]) -> bytes | None:
    """One panel per prompt task (BBH accuracy, needle key kept, teacher F1) against the requested rate.

    One line per compressor spec (its variants across rates) with 95 % interval bars; the BBH
    panel marks the uncompressed and no-demonstration accuracies and chance. Returns PNG bytes,
    or None when no compressor variant was measured by these tasks.
    """
    first = _first_entries(record)
    panels = [(section, *first[section]) for section in SECTIONS if section in first]
    specs: list[str] = []
    for v in record["variants"]:
        if v.get("kind") == "compressor" and _spec(v) not in specs:
            specs.append(_spec(v))
    has_points = any(_measured(record, entry, "compressor") for _, _, entry in panels)
    if not panels or not has_points:
        return None
    titles = {
        "bbh": f"BBH accuracy ({record['model']['name']})",
        "needle": "needle key fact kept",
        "teacher": "F1 vs teacher labels",
    }
    fig = new_figure(4.2 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (section, _key, entry) in zip(axes, panels):
        groups: dict[str, list[tuple[float, float, float, float]]] = {}
        labels: dict[str, str] = {}
        for v in _measured(record, entry, "compressor"):
            agg = entry["variants"][v["name"]]
            value = agg.get(entry["primary"])
            if not (_finite(v.get("rate")) and _finite(value)):
                continue
            low = agg.get("ci_low") if _finite(agg.get("ci_low")) else value
            high = agg.get("ci_high") if _finite(agg.get("ci_high")) else value
            groups.setdefault(_spec(v), []).append((float(v["rate"]), value, low, high))
            labels[_spec(v)] = _spec_label(v)
        for spec, pts in groups.items():
            i = specs.index(spec)
            pts.sort()
            shift = 0.004 * (i - (len(specs) - 1) / 2)  # keep overlapping error bars apart
            xs = [p[0] + shift for p in pts]
            ys = [100 * p[1] for p in pts]
            err = [[100 * max(p[1] - p[2], 0) for p in pts], [100 * max(p[3] - p[1], 0) for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=labels[spec])
        if section == "bbh":
            extra = entry.get("extra") or {}
            base = entry["variants"].get(record["variants"][0]["name"]) or {}
            marks = [
                (base.get("accuracy"), "0.3", "--", "uncompressed"),
                ((extra.get("no_demos") or {}).get("accuracy"), "0.6", ":", "no demos"),
                (extra.get("chance_pooled"), "0.8", "-.", "chance"),
            ]
            for value, color, style, label in marks:
                if _finite(value):
                    ax.axhline(100 * value, color=color, ls=style, lw=1, label=label)
        ax.set_xlabel("requested rate (fraction of tokens kept)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.set_title(titles[section])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return png_bytes(fig)
