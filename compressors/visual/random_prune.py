"""Random visual token pruning: a seeded uniform subset of each image's tokens (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.methods import param, register_method

from ._core import ImageTokens, Kept, StageOnePruning

__all__ = ["RandomPrune"]


@register_method("random_prune")
@dataclass
class RandomPrune(StageOnePruning):
    """Random pruning: keep a seeded uniform subset of each image's visual tokens (baseline)."""

    seed: int = param(
        0,
        "seed; every image draws from a fresh generator with it, so a sample's choice does not depend on its batch",
    )

    def select(self, image: ImageTokens, k: int) -> Kept:
        generator = torch.Generator().manual_seed(self.seed)
        index = torch.randperm(image.n, generator=generator)[:k].sort().values.to(image.features.device)
        return Kept(image.features[index], index)
