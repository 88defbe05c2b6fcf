"""Word rules: which classifier tokens start a new word, as vocabulary-wide lookup tables.

LLMLingua-2 merges classifier tokens into words before it thresholds, with one of two rules
(``llmlingua.utils.is_begin_of_new_word``):

* ``"wordpiece"`` (mBERT, TinyBERT, MobileBERT, MiniLM): a token starts a word unless it
  begins with ``##``; the ``##`` is stripped from continuation tokens.
* ``"sentencepiece"`` (XLM-R): a token starts a word if it begins with ``▁`` or is one
  punctuation character; ``▁`` is stripped from continuation tokens.

A force token always starts a word. llmlingua evaluates these rules token by token in Python;
here every per-token fact is computed once per vocabulary, so a text's tokens are classified
with one array lookup.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenlean.errors import TokenleanError

__all__ = ["RULES", "WordRule", "WordRuleError", "VocabTables", "detect_rule"]

RULES = ("wordpiece", "sentencepiece")

_DIGIT = re.compile(r"\d")
_PUNCTUATION = frozenset(string.punctuation)

# Substrings llmlingua looks for in the model name (prompt_compressor / utils), per rule.
_NAME_HINTS = {
    "wordpiece": ("bert-base-multilingual-cased", "tinybert", "mobilebert"),
    "sentencepiece": ("xlm-roberta-large", "slingua", "securitylingua"),
}


class WordRuleError(TokenleanError, ValueError):
    """No word rule fits the classifier's tokenizer."""


WordRule = str


def detect_rule(tokenizer: Any, name: str = "") -> WordRule:
    """Pick the word rule for a tokenizer: from llmlingua's model-name hints, else from its vocabulary."""
    lowered = name.lower()
    for rule, hints in _NAME_HINTS.items():
        if any(hint in lowered for hint in hints):
            return rule
    vocab = tokenizer.get_vocab()
    sample = list(vocab)[:20000]
    n_hash = sum(token.startswith("##") for token in sample)
    n_space = sum(token.startswith("▁") for token in sample)
    if n_hash > 0.05 * len(sample) and n_hash >= n_space:
        return "wordpiece"
    if n_space > 0.05 * len(sample):
        return "sentencepiece"
    raise WordRuleError(
        f"cannot tell how {type(tokenizer).__name__} marks word boundaries (neither WordPiece '##' "
        "continuations nor SentencePiece '▁' word starts); pass word_rule='wordpiece' or 'sentencepiece'"
    )


def _pure(token: str, rule: WordRule) -> str:
    # llmlingua strips with lstrip, i.e. every leading '#' (or '▁'), not just one prefix.
    return token.lstrip("#") if rule == "wordpiece" else token.lstrip("▁")


@dataclass
class VocabTables:
    """Per-id facts of a tokenizer's vocabulary under one word rule.

    Attributes
    ----------
    tokens : numpy object array
        Token string of every id.
    begins : bool array
        The token starts a word by the rule alone (force tokens aside).
    pure : numpy object array
        The token without its word marker (what a continuation token adds to its word).
    digit : bool array
        The token contains a decimal digit (``force_reserve_digit``).
    special : bool array
        The token string is one of the tokenizer's special tokens (skipped, as llmlingua does).
    """

    rule: WordRule
    tokens: np.ndarray
    begins: np.ndarray
    pure: np.ndarray
    digit: np.ndarray
    special: np.ndarray
    by_pure: dict[str, list[int]] = field(default_factory=dict)
    by_token: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer: Any, rule: WordRule, special_tokens: Iterable[str]) -> VocabTables:
        if rule not in RULES:
            raise WordRuleError(f"word_rule must be one of {RULES}, got {rule!r}")
        size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
        tokens = np.array(
            [t if t is not None else "" for t in tokenizer.convert_ids_to_tokens(list(range(size)))],
            dtype=object,
        )
        pure = np.array([_pure(t, rule) for t in tokens], dtype=object)
        if rule == "wordpiece":
            begins = np.array([not t.startswith("##") for t in tokens], dtype=bool)
        else:
            begins = np.array([t.startswith("▁") or t in _PUNCTUATION for t in tokens], dtype=bool)
        digit = np.array([bool(_DIGIT.search(t)) for t in tokens], dtype=bool)
        specials = set(special_tokens)
        special = np.array([t in specials for t in tokens], dtype=bool)
        by_pure: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(pure):
            by_pure[p].append(i)
        by_token = {t: i for i, t in enumerate(tokens)}
        return cls(rule, tokens, begins, pure, digit, special, dict(by_pure), by_token)

    def ids_with_pure(self, strings: Iterable[str]) -> np.ndarray:
        """Ids whose stripped token is one of ``strings``."""
        out: list[int] = []
        for s in strings:
            out.extend(self.by_pure.get(s, ()))
        return np.array(sorted(set(out)), dtype=np.int64)

    def ids_with_token(self, strings: Iterable[str]) -> np.ndarray:
        """Ids whose token string is exactly one of ``strings``."""
        return np.array(sorted({self.by_token[s] for s in strings if s in self.by_token}), dtype=np.int64)
