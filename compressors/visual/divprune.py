"""DivPrune: max-min diverse subset of the projected visual tokens, before the decoder.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(CVPR 2025): greedy max-min (k-center) selection under cosine distance on the projector's
outputs. Selection is :func:`~tokenlean.compressors.visual.select_diverse` with
``criterion="k_center"`` and its default first pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlean.methods import register_method

from ._core import ImageTokens, Kept, StageOnePruning
from .selection import select_diverse

__all__ = ["DivPrune"]


@register_method("divprune")
@dataclass
class DivPrune(StageOnePruning):
    """DivPrune: keep a max-min diverse subset of each image's visual tokens before the decoder."""

    def select_many(self, images: list[ImageTokens], k: int) -> list[Kept]:
        """One batched selection for images with the same token count."""
        index = select_diverse(torch.stack([image.features for image in images]), k, criterion="k_center")
        return [Kept(image.features[row], row) for image, row in zip(images, index)]

    def select(self, image: ImageTokens, k: int) -> Kept:
        index = select_diverse(image.features, k, criterion="k_center")
        return Kept(image.features[index], index)
