"""DivPrune: max-min diverse subset of the projected visual tokens, before the decoder.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(CVPR 2025): greedy max-min (k-center) selection under cosine distance on the projector's
outputs. Selection is :func:`~tokenlean.compressors.visual.select_diverse` with
``criterion="k_center"`` and its default first pick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokenlean.methods import param, register_method

from ._core import ImageTokens, Kept, VisualPruning
from .selection import select_diverse

__all__ = ["DivPrune"]


@register_method("divprune")
@dataclass
class DivPrune(VisualPruning):
    """DivPrune: keep a max-min diverse subset of each image's visual tokens before the decoder."""

    retain_ratio: float = param(0.1, "share of each image's visual tokens kept, in (0, 1]")
    retain_tokens: int | None = param(None, "visual tokens kept per image (overrides retain_ratio)")
    positions: Literal["original", "contiguous"] = param(
        "original", "position ids of kept tokens: their original ones, or re-indexed 0, 1, 2, ..."
    )

    def validate(self) -> None:
        self._check_fraction("retain_ratio")
        if self.retain_tokens is not None and self.retain_tokens < 1:
            self._fail("retain_tokens", self.retain_tokens, ">= 1 or None")

    def budget(self, n: int) -> int:
        return self._k(n, self.retain_ratio, self.retain_tokens)

    def select_many(self, images: list[ImageTokens], k: int) -> list[Kept]:
        """One batched selection for images with the same token count."""
        index = select_diverse(torch.stack([image.features for image in images]), k, criterion="k_center")
        return [Kept(image.features[row], row) for image, row in zip(images, index)]

    def select(self, image: ImageTokens, k: int) -> Kept:
        index = select_diverse(image.features, k, criterion="k_center")
        return Kept(image.features[index], index)
