"""Attention sinks + sliding window (StreamingLLM's attention pattern).

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024): each query
attends to the first ``sink_tokens`` tokens of its sequence (the sinks) and to the ``window``
most recent tokens including itself; everything in between is masked out.

This implementation applies the pattern as an attention mask on top of the model's own
attention (sdpa or eager), keeping the original position ids and the full KV cache. It
reproduces the *quality* effect of the pattern (what each token can see) — the baseline the
landmark-attention module compares against — but it does not evict cache entries, so it
saves no memory and no time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenlean.methods import Method, param, register_method
from tokenlean.patching import PatchContext

__all__ = ["SinkWindowAttention", "sink_window_mask"]


def sink_window_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sink_tokens: int, window: int
) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs.

    Parameters
    ----------
    query_positions
        ``(batch, q_len)`` position of each query within its sequence (0 = first real token).
    key_positions
        ``(batch, kv_len)`` position of each key within its sequence (negative for left padding).
    sink_tokens, window
        The pattern's sizes.

    Returns
    -------
    torch.Tensor
        ``(batch, 1, q_len, kv_len)`` bool, ``True`` where the query may attend to the key.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    causal = k <= q
    visible = (k < sink_tokens) | (q - k < window)
    return (causal & visible & (k >= 0))[:, None]


@register_method("sink_window")
@dataclass
class SinkWindowAttention(Method):
    """Attention sinks + sliding window: each token sees the first tokens and its recent window."""

    sink_tokens: int = param(4, "number of initial tokens every query keeps attending to (the sinks)")
    window: int = param(1024, "number of most recent tokens (including the query itself) each query sees")

    def validate(self) -> None:
        if self.sink_tokens < 0:
            self._fail("sink_tokens", self.sink_tokens, ">= 0")
        if self.window < 1:
            self._fail("window", self.window, ">= 1")

    def install(self, ctx: PatchContext) -> None:
        # Layers with their own sliding window (Gemma2/3 local layers) keep it unchanged: their
        # cache is already windowed, so key slot indices are not sequence positions there.
        modules = [
            m for m in ctx.adapter.attention_modules(ctx.model) if not getattr(m, "sliding_window", None)
        ]
        ctx.add_attention_wrapper(self._attend, modules=modules)

    def _attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        call_next: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        if kv_len <= self.window:  # every key is inside every query's window: nothing to mask
            return call_next(module, query, key, value, attention_mask, **kwargs)
        # The cache holds every token, so the queries are the last q_len key slots. With left
        # padding a sequence starts at its first key slot that the last query may attend to.
        start = _first_visible_key(attention_mask, batch, kv_len, key.device)
        slots = torch.arange(kv_len, device=key.device)
        key_positions = slots[None, :] - start[:, None]
        query_positions = key_positions[:, kv_len - q_len :]
        allowed = sink_window_mask(query_positions, key_positions, self.sink_tokens, self.window)
        return call_next(module, query, key, value, _combine(attention_mask, allowed, query.dtype), **kwargs)


def _first_visible_key(
    mask: torch.Tensor | None, batch: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    """``(batch,)`` index of the first key the last query row may attend to (0 without a mask)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last_row = mask[:, 0, -1, :]
    visible = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
    visible = visible.expand(batch, kv_len)
    return visible.int().argmax(dim=-1)


def _combine(mask: torch.Tensor | None, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Intersect a transformers attention mask (None, bool, or additive float) with ``allowed``."""
    if mask is None:  # additive float works for both sdpa and eager attention
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
