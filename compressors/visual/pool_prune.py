"""Spatial average pooling of the visual grid down to the retained count (a baseline).

Each image's 2-D patch grid (per frame on Qwen2-VL; the thumbnail and the high-resolution grid
on LLaVA-NeXT, whose newline tokens are dropped) is average-pooled (``adaptive_avg_pool2d``) to
an ``r × c`` grid with ``r · c <= k`` and ``r : c`` close to the grid's aspect. The budget is
split over an image's grids in proportion to their sizes. A pooled token takes the position of
its window's central token. Recent papers find this simple baseline hard to beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenlean.methods import register_method

from ._core import ImageTokens, Kept, StageOnePruning

__all__ = ["PoolPrune", "pooled_shape"]


def pooled_shape(rows: int, cols: int, k: int) -> tuple[int, int]:
    """The ``(r, c)`` pooled grid for a ``rows × cols`` grid and a budget ``k`` (``r * c <= k``)."""
    r = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    c = min(cols, max(1, k // r))
    while r * c > k and r > 1:
        r -= 1
    return r, c


def _window_centres(size: int, out: int) -> list[int]:
    """Central input index of each of ``out`` adaptive-pooling windows over ``size`` inputs."""
    return [(i * size // out + -(-(i + 1) * size // out) - 1) // 2 for i in range(out)]


@register_method("pool_prune")
@dataclass
class PoolPrune(StageOnePruning):
    """Pooling baseline: average-pool each image's visual grid down to the retained count."""

    def select(self, image: ImageTokens, k: int) -> Kept:
        sizes = [rows * cols for _, rows, cols, _ in image.grids]
        shares = _split_budget(k, sizes)
        features, sources = [], []
        for (start, rows, cols, stride), share in zip(image.grids, shares):
            if share == 0:
                continue
            r, c = pooled_shape(rows, cols, share)
            index = (start + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]).to(
                image.features.device
            )
            grid = image.features[index.flatten()].view(rows, cols, -1).permute(2, 0, 1).float()
            pooled = F.adaptive_avg_pool2d(grid[None], (r, c))[0].permute(1, 2, 0).reshape(r * c, -1)
            centre = index[_window_centres(rows, r)][:, _window_centres(cols, c)].flatten()
            features.append(pooled.to(image.features.dtype))
            sources.append(centre)
        source = torch.cat(sources)
        order = source.argsort()
        return Kept(torch.cat(features)[order], source[order])


def _split_budget(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over grids in proportion to ``sizes`` (largest remainders; each at most its size)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    shares = [min(s, math.floor(e)) for s, e in zip(sizes, exact)]
    for i in sorted(range(len(sizes)), key=lambda j: exact[j] - shares[j], reverse=True):
        if sum(shares) >= k:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
    return shares
