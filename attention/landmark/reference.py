"""Landmark attention's grouped softmax, in plain PyTorch (the reference every fast path is tested against).

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(NeurIPS 2023). The context is cut into blocks, each closed by a landmark token. For a query:

* the keys of each **earlier** block are weighted by a softmax *within that block* (over its
  ordinary tokens only), and the block as a whole is gated by its landmark's weight;
* the landmark weights and the ordinary tokens of the query's **own** block share one softmax
  (the "shared group");
* the own block's landmark is masked (a landmark query does not see itself), landmarks carry no
  value, and each row of the resulting weights sums to 1.

So ``out_i = sum_{j in own block} g_ij v_j + sum_{b earlier} g_ib sum_{j in b} pi_ij v_j`` with
``g = softmax`` over the shared group and ``pi = softmax`` within block ``b``.

Blocks are defined by the landmark flags alone: a block is the run of tokens up to and including
its landmark; the tokens after the last landmark form the (open) last block. Landmarks need not be
evenly spaced here (the fused kernel needs them at the end of every ``block_size`` tokens).
"""

from __future__ import annotations

import torch

__all__ = ["block_index", "on_block_grid", "grouped_softmax_attention", "grouped_softmax_weights"]


def block_index(is_landmark: torch.Tensor) -> torch.Tensor:
    """Block of every position: the number of landmarks strictly before it (a landmark closes its block)."""
    flags = is_landmark.long()
    return torch.cumsum(flags, dim=-1) - flags


def on_block_grid(is_landmark: torch.Tensor, block_size: int) -> bool:
    """True when the landmarks sit exactly at ``i % block_size == block_size - 1`` (the kernel's layout)."""
    slots = torch.arange(is_landmark.shape[-1], device=is_landmark.device)
    return bool((is_landmark == (slots % block_size == block_size - 1)).all())


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_landmark: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k and v must be (batch, heads, seq, head_dim); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    batch, seq = k.shape[0], k.shape[2]
    if is_landmark.dtype != torch.bool:
        raise TypeError(f"is_landmark must be a bool tensor, got {is_landmark.dtype}")
    if is_landmark.dim() == 1:
        is_landmark = is_landmark[None]
    if is_landmark.dim() != 2 or is_landmark.shape[-1] != seq or is_landmark.shape[0] not in (1, batch):
        raise ValueError(
            f"is_landmark must be (seq,) or (batch, seq) = ({batch}, {seq}); got {tuple(is_landmark.shape)}"
        )
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor (True = real token), got {key_mask.dtype}")
        if key_mask.dim() == 1:
            key_mask = key_mask[None]
        if key_mask.shape[-1] != seq or key_mask.shape[0] not in (1, batch):
            raise ValueError(f"key_mask must be (seq,) or (batch, seq); got {tuple(key_mask.shape)}")
    return is_landmark.to(k.device), None if key_mask is None else key_mask.to(k.device)


def grouped_softmax_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    is_landmark: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights ``(batch, heads, q_len, seq)`` of the grouped softmax, and the landmark gates.

    The second tensor holds, at each landmark key, the shared-group probability of that landmark
    (the weight with which the query would take the landmark's block), zero elsewhere: the scores a
    retrieval policy ranks blocks by. The queries are the last ``q_len`` positions.
    ``key_mask`` (``(batch, seq)`` bool, ``True`` = real token) removes padding keys from every
    group. Computed in float32 (float64 stays float64); O(q_len × seq) memory.
    """
    is_landmark, key_mask = _check(q, k, k, is_landmark, key_mask)
    batch, heads, q_len, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    scale = dim**-0.5 if scale is None else scale
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale  # (B, H, Q, S)

    is_lm = is_landmark.expand(batch, seq)
    real = torch.ones_like(is_lm) if key_mask is None else key_mask.expand(batch, seq)
    blk = block_index(is_lm)  # (B, S)
    key_pos = torch.arange(seq, device=k.device)
    query_pos = key_pos[seq - q_len :]
    causal = key_pos[None, :] <= query_pos[:, None]  # (Q, S)
    blk_q = blk[:, seq - q_len :, None]  # (B, Q, 1)
    blk_k = blk[:, None, :]  # (B, 1, S)
    normal = (~is_lm & real)[:, None, :]
    # A landmark gates its block only if the block has a real ordinary token (else it has no value).
    per_block = torch.zeros(batch, seq + 1, dtype=torch.long, device=k.device)
    per_block = per_block.scatter_add(1, blk, (~is_lm & real).long())
    has_normal = per_block.gather(1, blk) > 0  # (B, S): the token's block has a real ordinary token
    gate_key = (is_lm & real & has_normal)[:, None, :]
    shared = causal[None] & ((gate_key & (blk_k < blk_q)) | (normal & (blk_k == blk_q)))  # (B, Q, S)
    inner = causal[None] & normal & (blk_k < blk_q)

    neg = torch.finfo(work).min
    shared4, inner4 = shared[:, None], inner[:, None]
    p_shared = torch.softmax(scores.masked_fill(~shared4, neg), dim=-1).masked_fill(~shared4, 0.0)
    # Within-block softmax, block by block (the max is only for stability: detached).
    idx = blk_k[:, None].expand(batch, heads, q_len, seq)
    inner_scores = scores.masked_fill(~inner4, neg)
    n_blocks = int(blk.max()) + 1 if seq else 1
    block_max = torch.full((batch, heads, q_len, n_blocks), neg, dtype=work, device=k.device)
    block_max = block_max.scatter_reduce(-1, idx, inner_scores.detach(), reduce="amax", include_self=True)
    expo = torch.exp(inner_scores - block_max.gather(-1, idx)).masked_fill(~inner4, 0.0)
    block_sum = torch.zeros_like(block_max).scatter_add(-1, idx, expo)
    pi = expo / block_sum.gather(-1, idx).clamp_min(torch.finfo(work).tiny)
    # The gate of each earlier block: its landmark's shared probability.
    gates = p_shared.masked_fill(~gate_key[:, None], 0.0)
    block_gate = torch.zeros_like(block_max).scatter_add(-1, idx, gates)
    weights = pi * block_gate.gather(-1, idx) + p_shared.masked_fill(~normal[:, None], 0.0)
    return weights, gates


def grouped_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_landmark: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Landmark attention with the paper's grouped softmax (causal, all blocks visible).

    Parameters
    ----------
    q, k, v
        ``(batch, heads, q_len, head_dim)`` and ``(batch, kv_heads, seq, head_dim)``; the queries
        are the last ``q_len`` positions (``q_len == seq`` in training and prefill); grouped-query
        attention (``heads`` a multiple of ``kv_heads``) is supported.
    is_landmark
        ``(seq,)`` or ``(batch, seq)`` bool: which keys are landmark tokens.
    scale
        Score scale, ``head_dim ** -0.5`` by default.
    key_mask
        Optional ``(batch, seq)`` bool, ``True`` for real tokens (``False``: padding, never attended).
    query_chunk
        Queries per pass. The weights of a pass take ``batch × heads × chunk × seq`` floats (times
        a few intermediates); by default chunks keep that under 2**25 per pass, so an 8k-token
        sequence needs no n×n matrix at once. The result does not depend on it.

    Returns
    -------
    torch.Tensor
        ``(batch, heads, q_len, head_dim)`` in ``q``'s dtype. A query with nothing to attend to
        (e.g. a padding row) gets zeros.
    """
    is_landmark, key_mask = _check(q, k, v, is_landmark, key_mask)
    batch, heads, q_len, _ = q.shape
    seq = k.shape[2]
    if query_chunk is None:
        query_chunk = max(1, (1 << 25) // max(1, batch * heads * seq))
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    if q_len > query_chunk:
        parts = []
        for start in range(0, q_len, query_chunk):
            stop = min(start + query_chunk, q_len)
            end = seq - q_len + stop  # keys up to the chunk's last query
            parts.append(
                grouped_softmax_attention(
                    q[:, :, start:stop],
                    k[:, :, :end],
                    v[:, :, :end],
                    is_landmark[:, :end],
                    scale=scale,
                    key_mask=None if key_mask is None else key_mask[:, :end],
                    query_chunk=stop - start,
                )
            )
        return torch.cat(parts, dim=2)
    weights, _ = grouped_softmax_weights(q, k, is_landmark, scale=scale, key_mask=key_mask)
    if heads != v.shape[1]:
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    return torch.matmul(weights, v.to(weights.dtype)).to(q.dtype)
