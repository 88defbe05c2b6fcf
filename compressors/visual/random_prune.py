"""Random visual token pruning: a seeded uniform subset of each image's tokens (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokenlean.methods import param, register_method

from ._core import ImageTokens, Kept, VisualPruning

__all__ = ["RandomPrune"]


@register_method("random_prune")
@dataclass
class RandomPrune(VisualPruning):
    """Random pruning: keep a seeded uniform subset of each image's visual tokens (baseline)."""

    retain_ratio: float = param(0.1, "share of each image's visual tokens kept, in (0, 1]")
    retain_tokens: int | None = param(None, "visual tokens kept per image (overrides retain_ratio)")
    positions: Literal["original", "contiguous"] = param(
        "original", "position ids of kept tokens: their original ones, or re-indexed 0, 1, 2, ..."
    )
    seed: int = param(
        0,
        "seed; every image draws from a fresh generator with it, so a sample's choice does not depend on its batch",
    )

    def validate(self) -> None:
        self._check_fraction("retain_ratio")
        if self.retain_tokens is not None and self.retain_tokens < 1:
            self._fail("retain_tokens", self.retain_tokens, ">= 1 or None")

    def budget(self, n: int) -> int:
        return self._k(n, self.retain_ratio, self.retain_tokens)

    def select(self, image: ImageTokens, k: int) -> Kept:
        generator = torch.Generator().manual_seed(self.seed)
        index = torch.randperm(image.n, generator=generator)[:k].sort().values.to(image.features.device)
        return Kept(image.features[index], index)
