"""What the attention patches that move keys in position share: RoPE rotation and model checks.

:func:`rotate` turns a key (or query) rotated at one position into the same vector rotated at
another (rotate-half RoPE, angles in float64); :func:`check_rope_model` refuses, with the
reason, the models whose positions such a patch cannot move exactly; :func:`as_keywords` and
:func:`cache_length` and :func:`merge_chunk_outputs` (a long input run in chunks) serve the
decoder-forward wrappers of those patches.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from tokenlean.errors import PatchError

__all__ = [
    "as_keywords",
    "cache_length",
    "check_rope_model",
    "chunked_output",
    "merge_chunk_outputs",
    "pop_cache",
    "rotate",
    "token_slice",
    "rotation_matches_model",
]


def rotate(x: torch.Tensor, delta: torch.Tensor | None, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, n, head_dim)`` by ``delta`` positions (RoPE, rotate-half).

    ``delta`` is ``(batch, n)`` (one shift per slot, every head alike) or ``(batch, heads, n)``
    (a shift per head and slot); ``None`` leaves ``x`` unchanged. The first ``2 * len(inv_freq)``
    features are rotated (all of them unless the model uses partial rotary); angles are computed
    in float64, the product in float32 at least.
    """
    if delta is None:
        return x
    rot = 2 * inv_freq.shape[-1]
    angles = delta.to(device=x.device, dtype=torch.float64)[..., None] * inv_freq.to(x.device, torch.float64)
    angles = torch.cat([angles, angles], dim=-1)
    if delta.dim() == 2:
        angles = angles[:, None]  # (batch, 1, n, rot)
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos().to(work), angles.sin().to(work)
    part = x[..., :rot].to(work)
    half = rot // 2
    rotated = part * cos + torch.cat([-part[..., half:], part[..., :half]], dim=-1) * sin
    rotated = rotated.to(x.dtype)
    return rotated if rot == x.shape[-1] else torch.cat([rotated, x[..., rot:]], dim=-1)


def rotation_matches_model(attention: torch.nn.Module, rotary: torch.nn.Module) -> bool:
    """Whether the model's ``apply_rotary_pos_emb`` is the rotate-half rotation :func:`rotate` does."""
    apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    head_dim = getattr(attention, "head_dim", None)
    if apply is None or not head_dim:
        return False
    inv_freq = rotary.inv_freq
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 1, 3, head_dim, generator=generator).to(inv_freq.device)
    positions = torch.tensor([[0, 3, 17]], device=inv_freq.device)
    try:
        with torch.no_grad():
            cos, sin = rotary(probe, positions)
            expected, _ = apply(probe, probe, cos, sin)
    except Exception:
        return False
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    ours = rotate(probe, positions, inv_freq) * scale
    return expected.shape == ours.shape and torch.allclose(
        expected.float(), ours.float(), atol=1e-4, rtol=1e-4
    )


def check_rope_model(
    ctx: Any, config: Any, attention: list[torch.nn.Module], what: str, advice: str, span: int | None = None
) -> torch.nn.Module:
    """Refuse what keys moved in position cannot be exact for; return the rotary embedding.

    ``what`` names the patch in the messages, ``advice`` ends them; ``span`` (optional) is the
    number of keys a query sees, refused when the model's own sliding window is smaller.
    """
    own_window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if span is not None and own_window is not None and span > own_window:
        raise PatchError(
            f"{what}: the span it attends ({span} keys) exceeds the model's own sliding window ({own_window}); "
            f"queries would see further than its layers were built to{advice}"
        )
    if span is None and (own_window is not None and any("sliding" in str(t) for t in layer_types)):
        raise PatchError(f"{what} does not support models with their own sliding-window layers{advice}")
    if getattr(config, "attention_chunk_size", None):
        raise PatchError(f"{what} does not support chunked attention layers{advice}")
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "mrope_section" in rope:
        raise PatchError(f"{what} does not support multimodal rotary positions (M-RoPE){advice}")
    rotary = ctx.adapter.rotary_embedding(ctx.model)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        found = "no rotary embedding" if rotary is None else f"{type(rotary).__name__} without one inv_freq"
        raise PatchError(
            f"{what} needs one rotary position embedding with an inv_freq buffer "
            f"(one rotary base for every layer); {type(ctx.model).__name__} has {found}{advice}"
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise PatchError(
            f"{what} does not support {rope_type!r} rotary scaling (its frequencies change with the "
            f"sequence length){advice}"
        )
    if not rotation_matches_model(attention[0], rotary):
        raise PatchError(
            f"{what} re-rotates cached keys with the rotate-half RoPE convention, and "
            f"{type(attention[0]).__name__} rotates differently{advice}"
        )
    return rotary


def as_keywords(
    params: list[inspect.Parameter], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Positional arguments of a forward call as keywords (by the signature's order)."""
    if not args:
        return kwargs
    names = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments ({len(args)}) for the model's forward")
    return {**dict(zip(names, args)), **kwargs}


def cache_length(cache: Any) -> int:
    """``cache.get_seq_length()``, 0 for caches that cannot say."""
    try:
        return int(cache.get_seq_length())
    except Exception:  # pragma: no cover - exotic caches
        return 0


def merge_chunk_outputs(outs: list[Any]) -> Any:
    """One decoder output from the outputs of consecutive chunks (token dimension 1)."""
    first = outs[0]
    merged = {}
    for name, value in first.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            merged[name] = torch.cat([o[name] for o in outs], dim=1)
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            merged[name] = tuple(torch.cat([o[name][i] for o in outs], dim=1) for i in range(len(value)))
        else:
            merged[name] = outs[-1][name]
    return type(first)(**merged)


# -- chunked passes (sink_window and block_retrieval run long inputs in chunks through one cache) --


def pop_cache(kwargs: dict[str, Any], config: Any) -> tuple[Any, bool]:
    """Take the cache out of ``kwargs`` (``cache`` or ``past_key_values``) and the caller's ``use_cache``.

    ``use_cache`` defaults to the model config's, as transformers' own forward does.
    """
    cache = None
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if value is not None:
            cache = value
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(config, "use_cache", True))
    return cache, bool(use_cache)


def token_slice(kwargs: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """A copy of the forward's keywords with the per-token inputs (ids or embeddings) cut to ``start:stop``."""
    piece = dict(kwargs)
    for name in ("input_ids", "inputs_embeds"):
        if piece.get(name) is not None:
            piece[name] = piece[name][:, start:stop]
    return piece


def chunked_output(outs: list[Any], cache: Any, use_cache: bool) -> Any:
    """The chunks' outputs as one, returning ``cache`` (or None when the caller asked for no cache)."""
    out = outs[0] if len(outs) == 1 else merge_chunk_outputs(outs)
    for name in ("cache", "past_key_values"):
        if name in out:
            out[name] = cache if use_cache else None
    return out
