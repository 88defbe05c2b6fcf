"""FastV: drop the visual tokens the last prompt token attends to least, inside the decoder.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024): after layer ``K``
(default 2), keep the ``retain_ratio`` share of each sample's visual tokens that received the
most attention from the last prompt token in layer ``K - 1`` (head-averaged); FastV's ``R`` is
``1 - retain_ratio``. The attention row is recomputed from that layer's queries and keys, so the
model keeps SDPA (no ``output_attentions``). Kept tokens keep their positions and rotary
embeddings; layers ``>= K`` and their KV cache see only them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenlean.methods import param, register_method

from ._core import DecoderDrop, VisualPruning

__all__ = ["FastV"]


@register_method("fastv")
@dataclass
class FastV(VisualPruning):
    """FastV: drop the visual tokens the last prompt token attends to least, from layer K on."""

    retain_ratio: float = param(
        0.5, "share of each sample's visual tokens kept from layer K on (FastV's R = 1 - this)"
    )
    layer: int = param(2, "K: the first decoder layer without the dropped tokens (scores from layer K - 1)")

    def validate(self) -> None:
        self._check_fraction("retain_ratio")
        if self.layer < 1:
            self._fail("layer", self.layer, ">= 1")

    def decoder_drop(self, num_layers: int) -> DecoderDrop:
        return DecoderDrop(self.layer, self._decide)

    def _decide(self, rows_fn: Any, visual: torch.Tensor, real: torch.Tensor, extra: dict) -> torch.Tensor:
        seq = visual.shape[1]
        order = torch.arange(seq, device=visual.device)
        last = torch.where(real, order, -1).amax(1, keepdim=True)  # (b, 1) the last prompt token
        probs = rows_fn(last, last >= 0)  # (b, heads, 1, S)
        score = probs.mean(1)[:, 0].masked_fill(~visual, float("-inf"))
        n_visual = visual.sum(1)
        keep_count = (n_visual.float() * self.retain_ratio).round().long().clamp(min=1)
        keep_count = torch.minimum(keep_count, n_visual)
        rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
        return visual & (rank < keep_count[:, None])
