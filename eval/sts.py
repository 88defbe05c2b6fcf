"""Semantic-similarity tasks: Spearman correlation between embedding cosines and human ratings.

Registered tasks (data from :func:`tokenlean.data.load_similarity`, real human judgements):

* ``sts_lee``: Lee et al. news documents, 1,225 rated pairs;
* ``sts_wordsim353``: WordSim-353 word pairs;
* ``sts_simlex999``: SimLex-999 word pairs.

Each task embeds every distinct text once per model configuration with a
:class:`~tokenlean.attention.SentenceEncoder` that follows the patch the bench applied
(``token_prepending="auto"``), then scores each pair by cosine similarity. The pairs are split
once, with a fixed seed, into a dev and a test half, so that a hyper-parameter (e.g. Token
Prepending's exit layer) can be chosen on dev and reported on test; :meth:`aggregate` returns
Spearman ×100 on all pairs, on dev and on test.

Options (``--task "sts_lee:prompt=pretended_cot,layer=-2"``): ``prompt``, ``layer``, ``pooling``,
``batch_size``, ``dev_fraction``, ``split_seed``, ``max_length``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenlean.patching import active_patches

from .tasks import Example, Task, register_task

__all__ = ["SimilarityTask", "spearman", "split_mask"]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=float)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get average ranks).

    Returns ``nan`` when fewer than two pairs are given or either side is constant.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    if a.size < 2:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def split_mask(n: int, dev_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``(n,)`` bool, ``True`` for the dev items: a seeded random ``dev_fraction`` of ``range(n)``."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    chosen = np.random.default_rng(seed).permutation(n)[: round(n * dev_fraction)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


class SimilarityTask(Task):
    """Spearman ×100 between embedding cosines and human similarity ratings (higher is better)."""

    primary = "spearman"
    higher_is_better = True

    def __init__(
        self,
        dataset: str,
        prompt: str | None = "prompteol",
        layer: int = -2,
        pooling: str = "last",
        batch_size: int = 32,
        dev_fraction: float = 0.5,
        split_seed: int = 0,
        max_length: int = 512,
    ) -> None:
        from tokenlean.data import available_similarity_sets

        if dataset not in available_similarity_sets():
            raise ValueError(
                f"unknown similarity set {dataset!r}; sets: {', '.join(available_similarity_sets())}"
            )
        if prompt in ("none", "None", ""):
            prompt = None
        self.dataset = dataset
        self.name = f"sts_{dataset}"
        self.prompt = prompt
        self.layer = layer
        self.pooling = pooling
        self.batch_size = batch_size
        self.dev_fraction = dev_fraction
        self.split_seed = split_seed
        self.max_length = max_length
        split_mask(2, dev_fraction)  # validates dev_fraction before anything is loaded
        self._tokenizer: Any = None
        self._texts: list[str] = []
        self._cache: dict[tuple, tuple[torch.Tensor, dict[str, int]]] = {}

    def config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "prompt": self.prompt,
            "layer": self.layer,
            "pooling": self.pooling,
            "dev_fraction": self.dev_fraction,
            "split_seed": self.split_seed,
            "max_length": self.max_length,
        }

    def examples(self, tokenizer: Any) -> list[Example]:
        from tokenlean.data import load_similarity

        self._tokenizer = tokenizer
        pairs = load_similarity(self.dataset)
        dev = split_mask(len(pairs), self.dev_fraction, self.split_seed)
        self._texts = list(dict.fromkeys(text for p in pairs for text in (p.text_a, p.text_b)))
        return [
            Example(id=f"pair-{i}", data=(p.text_a, p.text_b, p.score, bool(dev[i])))
            for i, p in enumerate(pairs)
        ]

    def encoder(self, model: torch.nn.Module) -> Any:
        """The encoder this task uses on ``model`` (following whatever patch is active)."""
        from tokenlean.attention import SentenceEncoder

        if self._tokenizer is None:
            raise RuntimeError("call examples(tokenizer) before scoring")
        return SentenceEncoder(
            model,
            self._tokenizer,
            prompt=self.prompt,
            token_prepending="auto",
            layer=self.layer,
            pooling=self.pooling,
            max_length=self.max_length,
        )

    def _embeddings(self, model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, int]]:
        key = (id(model), tuple(h.method.spec() for h in active_patches(model)))
        if key not in self._cache:
            vectors = self.encoder(model).encode(self._texts, batch_size=self.batch_size, normalize=True)
            self._cache[key] = (vectors, {t: i for i, t in enumerate(self._texts)})
        return self._cache[key]

    def score(self, model: torch.nn.Module, example: Example, reference: Any) -> dict[str, float]:
        text_a, text_b, gold, is_dev = example.data
        vectors, index = self._embeddings(model)
        cosine = float(vectors[index[text_a]] @ vectors[index[text_b]])
        return {"cosine": cosine, "gold": float(gold), "dev": float(is_dev)}

    def aggregate(self, rows: list[dict[str, float]]) -> dict[str, float]:
        cosine = np.array([r["cosine"] for r in rows])
        gold = np.array([r["gold"] for r in rows])
        dev = np.array([r["dev"] for r in rows], dtype=bool)
        return {
            "spearman": 100 * spearman(cosine, gold),
            "spearman_dev": 100 * spearman(cosine[dev], gold[dev]),
            "spearman_test": 100 * spearman(cosine[~dev], gold[~dev]),
            "pairs": float(len(rows)),
        }


def _factory(dataset: str):
    def make(**options: Any) -> SimilarityTask:
        return SimilarityTask(dataset, **options)

    make.__doc__ = f"Spearman ×100 of embedding cosines against human ratings on {dataset}."
    return make


for _dataset in ("lee", "wordsim353", "simlex999"):
    register_task(f"sts_{_dataset}")(_factory(_dataset))
