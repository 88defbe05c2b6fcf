"""Landmark attention (Mohtashami & Jaggi, NeurIPS 2023): a landmark token per block gates the block.

* :func:`grouped_softmax_attention` / :func:`grouped_softmax_weights`: the operator in PyTorch
  (any landmark layout, padding, grouped-query attention; the reference);
* :func:`fused_landmark_attention`: the fused Triton forward and backward (a landmark closing
  every ``block_size`` tokens; O(n) memory);
* :func:`landmark_attention`: the kernel where it applies, the reference otherwise;
* :class:`LandmarkAttention` (``"landmark"``): the patch for Hugging Face causal LMs, with
  :func:`insert_landmarks` / :func:`strip_landmarks` for callers who lay out tokens themselves.
"""

from __future__ import annotations

import torch

from .kernel import fused_landmark_attention, kernel_available, kernel_unsupported_reason
from .method import LANDMARK_TOKEN, LandmarkAttention, insert_landmarks, landmark_id, strip_landmarks
from .reference import block_index, grouped_softmax_attention, grouped_softmax_weights, on_block_grid

__all__ = [
    "LANDMARK_TOKEN",
    "LandmarkAttention",
    "block_index",
    "fused_landmark_attention",
    "grouped_softmax_attention",
    "grouped_softmax_weights",
    "insert_landmarks",
    "kernel_available",
    "kernel_unsupported_reason",
    "landmark_attention",
    "landmark_id",
    "on_block_grid",
    "strip_landmarks",
]


def landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_landmark: torch.Tensor,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-softmax landmark attention: fused when the inputs allow it, the reference otherwise.

    The kernel is used when ``block_size`` is given, ``is_landmark`` is exactly the regular layout
    for it (checked), there is no ``key_mask`` and the kernel supports the device, dtype and
    shapes (:func:`kernel_unsupported_reason`).
    """
    if (
        block_size is not None
        and key_mask is None
        and q.shape[2] == k.shape[2]
        and kernel_unsupported_reason(q, k, v, block_size) is None
        and on_block_grid(is_landmark, block_size)
    ):
        return fused_landmark_attention(q, k, v, block_size, scale)
    return grouped_softmax_attention(q, k, v, is_landmark, scale=scale, key_mask=key_mask)
