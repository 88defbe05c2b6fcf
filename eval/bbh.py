"""BIG-Bench Hard as the harness and the offline lm-eval task pack use it.

The demonstrations are the 3-shot chain-of-thought prompts of BBH (Suzgun et al. 2022), as
lm-eval ships them (``tasks/bbh/cot_fewshot``); the test questions are BIG-bench's own examples
of each task (from the ``bigbench`` 1.0.0 sdist, see :func:`tokenlean.data.load_bbh`), formatted
the way BBH formats them (``Options: (A) ...``), minus the ones used as demonstrations.
:class:`ChoiceScorer` scores the answer labels by log-likelihood with a causal LM, reusing the
prompt prefix's KV cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenlean.errors import EvalError

__all__ = [
    "ANSWER_STEM",
    "BBH_TASK_FORMATS",
    "CONTENT_FREE_QUESTION",
    "BBHItem",
    "ChoiceScorer",
    "bbh_cot_prompt",
    "bbh_items",
    "bbh_prefix",
    "format_bbh_example",
]


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
    EvalError
        For a task without a BBH format here, or an example that does not parse.
    """
    if task not in BBH_TASK_FORMATS:
        raise EvalError(f"no BBH format for task {task!r}; supported: {', '.join(sorted(BBH_TASK_FORMATS))}")
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
            raise EvalError(f"snarks example does not parse: {text[:80]!r}")
        options, conts = _lettered([m.group(1), m.group(2)])
        return f"Which statement is sarcastic?\n{options}", conts, ["(a)", "(b)"].index(choices[target])
    if task == "hyperbaton":
        m = re.fullmatch(
            r'Which sentence has the correct adjective order:\s*a\s*"\s*(.*?)\s*"\s*b\s*"\s*(.*?)\s*"\s*\?',
            text,
        )
        if m is None:
            raise EvalError(f"hyperbaton example does not parse: {text[:80]!r}")
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
        raise EvalError(
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
        raise EvalError(f"cannot read the BBH prompt of {task!r} from {path}: {exc}") from exc
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
        raise EvalError(f"{task} has {len(eligible)} usable examples, asked for {n}")
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
        from tokenlean.patching import cache_keyword, takes_logits_to_keep

        self.model = model.eval()
        self.tokenizer = tokenizer
        self._cache_kw = cache_keyword(model.forward)
        self._logits_to_keep = takes_logits_to_keep(model.forward)
        self._cache: Any = None
        self._length = 0
        self._prefix_mark: Any = None  # where score() rewinds to (eval.latency.cache_mark)

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

    def _rewind(self, mark: Any) -> None:
        from tokenlean.eval.latency import cache_rewind

        self._cache = cache_rewind(self._cache, mark)

    @contextlib.contextmanager
    def prefix(self, text: str) -> Iterator[ChoiceScorer]:
        """Run ``text`` (with the tokenizer's special tokens, e.g. BOS) and keep its cache."""
        import torch

        ids = self._ids(text, special=True)
        if not ids:
            raise EvalError("the prompt prefix is empty")
        from tokenlean.eval.latency import cache_mark

        with torch.inference_mode():
            self._cache = None
            self._forward(ids, keep=1)
        self._length = len(ids)
        self._prefix_mark = cache_mark(self._cache, self._length)
        try:
            yield self
        finally:
            self._cache = None
            self._length = 0
            self._prefix_mark = None

    def score(self, question: str, continuations: Sequence[str]) -> np.ndarray:
        """Summed log-probabilities of each continuation after ``prefix + question``.

        Continuation tokens shared by all choices are run once; when every remaining tail is a
        single token, one forward pass scores all choices.
        """
        import torch

        if self._cache is None:
            raise EvalError("ChoiceScorer.score must run inside `with scorer.prefix(...)`")
        conts = [self._ids(c) for c in continuations]
        if any(not c for c in conts):
            raise EvalError(f"a continuation tokenizes to nothing: {continuations!r}")
        common = 0
        while all(len(c) > common + 1 for c in conts) and len({c[common] for c in conts}) == 1:
            common += 1
        q_ids = self._ids(question)
        if not q_ids:
            raise EvalError("the question is empty")
        q_ids += conts[0][:common]
        from tokenlean.eval.latency import cache_mark

        with torch.inference_mode():
            logp = self._forward(q_ids, keep=common + 1)  # row k predicts q_ids[-common + k]
            shared = sum(float(logp[k, conts[0][k]]) for k in range(common))
            last = logp[-1]
            question_mark = None
            scores = []
            for cont in conts:
                tail = cont[common:]
                total = shared + float(last[tail[0]])
                if len(tail) > 1:
                    if question_mark is None:  # taken once, and only when a tail needs it
                        question_mark = cache_mark(self._cache, self._length + len(q_ids))
                    more = self._forward(tail[:-1])
                    total += float(sum(more[j, tail[j + 1]] for j in range(len(tail) - 1)))
                    self._rewind(question_mark)
                scores.append(total)
            self._rewind(self._prefix_mark)
        return np.asarray(scores, dtype=float)
