"""Fused landmark attention for Triton 3.x: forward and backward in O(n) memory.

The layout is the one training and prefill use: a landmark closes every block of ``block_size``
tokens (positions ``i % block_size == block_size - 1``); the tokens after the last full block form
an open block without one. The result equals :func:`~.reference.grouped_softmax_attention`.

One program handles one block of queries (``block_size`` rows, so a query tile is exactly one
landmark block) and walks the earlier key blocks FlashAttention-style:

* for an earlier block: ``s = q kᵀ``; the landmark column gives the block's gate logit; a softmax
  over the block's other columns (its max and sum are local to the tile) gives ``P_b V_b / d_b``;
  an online softmax over the gate logits (running max ``m`` and sum ``l``) weighs these block
  summaries;
* for the own block: causal scores without the landmark column join the same online softmax.

The backward recomputes everything from the saved log-sum-exp of the shared group. With
``Δ_i = dO_i · O_i``, ``dp = dO Vᵀ`` and, per earlier block, ``du_ib = Σ_j π_ij dp_ij``:

* own block: ``ds = p (dp − Δ)``;
* earlier block, ordinary key: ``ds = g_ib π_ij (dp_ij − du_ib)``; landmark key:
  ``ds = g_ib (du_ib − Δ_i)``; ``dV`` gets ``g_ib π_ij dO_i`` (landmarks carry no value).

Two backward kernels (``dK``/``dV`` per key block, looping over the query heads of its group;
``dQ`` per query block), no atomics. Under ``TRITON_INTERPRET=1`` the kernels run on the CPU
(float32 and float16; bfloat16 ``tl.dot`` is wrong in the interpreter), which is how CI tests them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["fused_landmark_attention", "kernel_available", "kernel_unsupported_reason"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


try:  # Triton resolves the names a kernel calls among the module's globals: kernels live at module level
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = tl = None


def _triton() -> dict[str, Any] | None:
    """The compiled kernels, or ``None`` when Triton cannot be imported."""
    if triton is None:  # pragma: no cover - depends on the environment
        return None
    return {"fwd": _landmark_fwd, "dkdv": _landmark_bwd_dkdv, "dq": _landmark_bwd_dq}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available() -> bool:
    """True when Triton imports (a GPU, or ``TRITON_INTERPRET=1`` for the CPU)."""
    return _triton() is not None


def kernel_unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int
) -> str | None:
    """Why the fused kernel cannot take these inputs (``None`` when it can)."""
    if _triton() is None:
        return "triton is not installed"
    if q.device.type != "cuda" and not (_interpreted() and q.device.type == "cpu"):
        return f"the kernel runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not {q.device.type}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (k {k.dtype}, v {v.dtype}); the kernel takes float16, bfloat16 or float32"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bfloat16 tl.dot is wrong under the Triton interpreter"
    dim = q.shape[-1]
    if dim not in (16, 32, 64, 128, 256):
        return f"head_dim {dim}; the kernel takes 16, 32, 64, 128 or 256"
    if block_size not in (16, 32, 64, 128):
        return f"block_size {block_size}; the kernel takes 16, 32, 64 or 128"
    if q.shape[2] != k.shape[2]:
        return "the kernel needs as many queries as keys (training and prefill), not a decoding step"
    return None


if triton is not None:

    @triton.jit
    def _landmark_fwd(
        Q, K, V, OUT, LSE,
        qk_scale, N, H, GROUP,
        BS: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kvh = h // GROUP
        H_KV = H // GROUP
        q_base = (bh.to(tl.int64) * N) * D
        kv_base = ((b * H_KV + kvh).to(tl.int64) * N) * D
        offs_m = qb * BS + tl.arange(0, BS)
        offs_n = tl.arange(0, BS)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < N
        q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BS], float("-inf"), tl.float32)
        l_i = tl.zeros([BS], tl.float32)
        acc = tl.zeros([BS, D], tl.float32)
        lm_col = offs_n == BS - 1
        for kb in range(0, qb):
            offs_k = kb * BS + offs_n
            kt = tl.load(K + kv_base + offs_k[None, :] * D + offs_d[:, None])
            v = tl.load(V + kv_base + offs_k[:, None] * D + offs_d[None, :])
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            else:
                s = tl.dot(q, kt) * qk_scale
            gate = tl.sum(tl.where(lm_col[None, :], s, 0.0), 1)
            s_in = tl.where(lm_col[None, :], float("-inf"), s)
            m_b = tl.max(s_in, 1)
            p = tl.exp2(s_in - m_b[:, None])
            d_b = tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            m_new = tl.maximum(m_i, gate)
            alpha = tl.exp2(m_i - m_new)
            g = tl.exp2(gate - m_new)
            acc = acc * alpha[:, None] + pv * (g / d_b)[:, None]
            l_i = l_i * alpha + g
            m_i = m_new
        offs_k = qb * BS + offs_n
        col_ok = offs_k < N
        kt = tl.load(K + kv_base + offs_k[None, :] * D + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(V + kv_base + offs_k[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt) * qk_scale
        allowed = (offs_k[None, :] <= offs_m[:, None]) & (~lm_col[None, :]) & col_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        out = acc / l_i[:, None]
        tl.store(
            OUT + q_base + offs_m[:, None] * D + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None],
        )
        tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_new + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _landmark_tile_grads(
        q, kt, v, do, lse, delta, offs_m, offs_k, qk_scale, N,
        DIAG: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """ds (natural-logit gradient) and the value weights w of one (query block, key block) tile."""
        offs_n = tl.arange(0, BS)
        lm_col = offs_n == BS - 1
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, kt) * qk_scale
            dp = tl.dot(do, tl.trans(v))
        if DIAG:
            allowed = (offs_k[None, :] <= offs_m[:, None]) & (~lm_col[None, :]) & (offs_k[None, :] < N)
            w = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            ds = w * (dp - delta[:, None])
        else:
            gate = tl.sum(tl.where(lm_col[None, :], s, 0.0), 1)
            s_in = tl.where(lm_col[None, :], float("-inf"), s)
            m_b = tl.max(s_in, 1)
            p = tl.exp2(s_in - m_b[:, None])
            pi = p / tl.sum(p, 1)[:, None]
            g = tl.exp2(gate - lse)
            w = pi * g[:, None]
            du = tl.sum(pi * dp, 1)
            ds = tl.where(lm_col[None, :], (g * (du - delta))[:, None], w * (dp - du[:, None]))
        return ds, w

    @triton.jit
    def _landmark_bwd_dkdv(
        Q, K, V, DO, LSE, DELTA, DK, DV,
        qk_scale, sm_scale, N, H, GROUP,
        BS: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        kb = tl.program_id(0)
        bkv = tl.program_id(1)
        H_KV = H // GROUP
        b = bkv // H_KV
        kvh = bkv % H_KV
        kv_base = (bkv.to(tl.int64) * N) * D
        offs_k = kb * BS + tl.arange(0, BS)
        offs_d = tl.arange(0, D)
        col_ok = offs_k < N
        kt = tl.load(K + kv_base + offs_k[None, :] * D + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(V + kv_base + offs_k[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BS, D], tl.float32)
        dv = tl.zeros([BS, D], tl.float32)
        n_blocks = tl.cdiv(N, BS)
        for g_idx in range(0, GROUP):
            bh = b * H + kvh * GROUP + g_idx
            q_base = (bh.to(tl.int64) * N) * D
            for qb in range(kb, n_blocks):
                offs_m = qb * BS + tl.arange(0, BS)
                row_ok = offs_m < N
                q = tl.load(
                    Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0
                )
                do = tl.load(
                    DO + q_base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0
                )
                lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
                if qb == kb:
                    ds, w = _landmark_tile_grads(
                        q, kt, v, do, lse, delta, offs_m, offs_k, qk_scale, N, True, BS, IEEE
                    )
                else:
                    ds, w = _landmark_tile_grads(
                        q, kt, v, do, lse, delta, offs_m, offs_k, qk_scale, N, False, BS, IEEE
                    )
                if IEEE:
                    dv += tl.dot(tl.trans(w.to(do.dtype)), do, input_precision="ieee")
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
                else:
                    dv += tl.dot(tl.trans(w.to(do.dtype)), do)
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(
            DK + kv_base + offs_k[:, None] * D + offs_d[None, :],
            (dk * sm_scale).to(DK.dtype.element_ty),
            mask=col_ok[:, None],
        )
        tl.store(
            DV + kv_base + offs_k[:, None] * D + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=col_ok[:, None],
        )

    @triton.jit
    def _landmark_bwd_dq(
        Q, K, V, DO, LSE, DELTA, DQ,
        qk_scale, sm_scale, N, H, GROUP,
        BS: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        H_KV = H // GROUP
        q_base = (bh.to(tl.int64) * N) * D
        kv_base = ((b * H_KV + h // GROUP).to(tl.int64) * N) * D
        offs_m = qb * BS + tl.arange(0, BS)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < N
        q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_base + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BS, D], tl.float32)
        for kb in range(0, qb + 1):
            offs_k = kb * BS + tl.arange(0, BS)
            col_ok = offs_k < N
            kt = tl.load(K + kv_base + offs_k[None, :] * D + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(V + kv_base + offs_k[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            if kb == qb:
                ds, w = _landmark_tile_grads(
                    q, kt, v, do, lse, delta, offs_m, offs_k, qk_scale, N, True, BS, IEEE
                )
            else:
                ds, w = _landmark_tile_grads(
                    q, kt, v, do, lse, delta, offs_m, offs_k, qk_scale, N, False, BS, IEEE
                )
            if IEEE:
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
            else:
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
        tl.store(
            DQ + q_base + offs_m[:, None] * D + offs_d[None, :],
            (dq * sm_scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None],
        )


def _launch_args(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> dict[str, Any]:
    batch, heads, n, dim = q.shape
    return {
        "qk_scale": scale * _LOG2E,
        "N": n,
        "H": heads,
        "GROUP": heads // k.shape[1],
        "BS": block_size,
        "D": dim,
        "IEEE": q.dtype == torch.float32,
    }


class _FusedLandmark(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float):
        kernels = _triton()
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, n, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
        args = _launch_args(q, k, block_size, scale)
        grid = (-(-n // block_size), batch * heads)
        kernels["fwd"][grid](q, k, v, out, lse, **args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_size, ctx.scale = block_size, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        kernels = _triton()
        q, k, v, out, lse = ctx.saved_tensors
        do = grad_out.contiguous()
        delta = (do.float() * out.float()).sum(-1)  # (B, H, N)
        batch, heads, n, _ = q.shape
        args = _launch_args(q, k, ctx.block_size, ctx.scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        n_blocks = -(-n // ctx.block_size)
        kernels["dkdv"][(n_blocks, batch * k.shape[1])](
            q, k, v, do, lse, delta, dk, dv, sm_scale=ctx.scale, **args
        )
        kernels["dq"][(n_blocks, batch * heads)](q, k, v, do, lse, delta, dq, sm_scale=ctx.scale, **args)
        return dq, dk, dv, None, None


def fused_landmark_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64, scale: float | None = None
) -> torch.Tensor:
    """Landmark attention with a landmark closing every ``block_size`` tokens, fused (Triton).

    ``q`` ``(batch, heads, seq, head_dim)``, ``k`` and ``v`` ``(batch, kv_heads, seq, head_dim)``
    (grouped-query attention: ``heads`` a multiple of ``kv_heads``). Differentiable. Raises
    ``ValueError`` when the kernel cannot take the inputs (see :func:`kernel_unsupported_reason`);
    :func:`~tokenlean.attention.landmark.landmark_attention` falls back to the reference instead.
    """
    if (
        q.dim() != 4
        or k.shape != v.shape
        or k.dim() != 4
        or q.shape[0] != k.shape[0]
        or q.shape[-1] != k.shape[-1]
    ):
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    reason = kernel_unsupported_reason(q, k, v, block_size)
    if reason is not None:
        raise ValueError(f"fused landmark attention: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FusedLandmark.apply(q, k, v, block_size, scale)
