"""Where visual tokens are dropped, solved once for every visual pruning method.

Dropping tokens changes the sequence length, and every place that tracks length must agree:
hidden states, the attention mask, position ids (M-RoPE for Qwen2-VL), the KV cache and
``generate()``'s own bookkeeping of the attention mask across decoding steps. This module does
that bookkeeping; a method only says *which* tokens to keep (:class:`VisualPruning`).

Two places a method can drop tokens:

* **Before the decoder** (:meth:`VisualPruning.select`, e.g. ToDRE stage 1, DivPrune, random,
  pooling): a wrapper around the multimodal model's ``forward`` gets the projected image
  features, asks the method which to keep (or what to put instead, for pooling), and feeds the
  decoder a shorter sequence: the kept features at their image positions, the text, a new
  attention mask (samples re-left-padded to the longest) and the kept tokens' position ids.
* **Inside the decoder** (:meth:`VisualPruning.decoder_drop`, e.g. FastV, ToDRE stage 2): an
  attention wrapper on layer ``P - 1`` computes, from that layer's own queries and keys, the
  attention probabilities of a few query rows (only those rows: SDPA stays on everywhere) and
  the method decides which visual tokens leave; pre-hooks on layers ``P..L-1`` then shorten
  the hidden states, the mask and the rotary embeddings. Layers ``>= P`` therefore cache fewer
  entries than the layers before them.

While decoding, the same wrapper maps ``generate()``'s inputs (attention mask over the
*original* prompt, the original positions) onto the shortened cache: the prefill leaves its
layout on the cache object (``cache._tokenlean_visual``), each decoding step reads it.

Positions of kept tokens: ``"original"`` keeps each kept token's position id (its M-RoPE
``(t, h, w)`` triple on Qwen2-VL) and decoding continues where the unpruned prompt would have;
``"contiguous"`` re-indexes the shortened prompt ``0, 1, 2, ...`` as FastV's and DivPrune's
official code do (LLaVA families only: M-RoPE has no contiguous equivalent).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from tokenlean.errors import MethodConfigError, PatchError, UnsupportedModelError
from tokenlean.methods import Method, param
from tokenlean.patching import PatchContext, active_patches

__all__ = [
    "DecoderDrop",
    "ImageTokens",
    "Kept",
    "StageOnePruning",
    "VisualPruning",
    "attention_rows",
    "visual_token_stats",
]

#: ``config.model_type`` values visual pruning supports.
SUPPORTED_VLMS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
_MROPE = ("qwen2_vl", "qwen2_5_vl")
_STATE_ATTR = "_tokenlean_visual"

# model -> the runtime of the visual patch on it (for visual_token_stats)
_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, _Runtime] = weakref.WeakKeyDictionary()


@dataclass
class ImageTokens:
    """One image's visual tokens, as the decoder would receive them.

    Attributes
    ----------
    features : torch.Tensor
        ``(n, d)`` projected features (the decoder's embedding space).
    cls_attention : torch.Tensor or None
        ``(m,)`` attention of the vision encoder's [CLS] query on the first ``m`` tokens, in
        the encoder's last layer (``m = n`` for LLaVA; the global thumbnail's tokens for
        LLaVA-NeXT); ``None`` for encoders without [CLS] (Qwen2-VL) or when not requested.
    grids : list of (start, rows, cols, stride)
        The 2-D patch grids the tokens are laid out in: token ``start + r * stride + c`` is at
        row ``r``, column ``c``. One grid for LLaVA and per Qwen2-VL frame; the thumbnail and
        the high-resolution grid for LLaVA-NeXT (stride ``cols + 1``: each row ends with a
        newline token, which belongs to no grid).
    index : int
        The image's index in the batch's images.
    """

    features: torch.Tensor
    cls_attention: torch.Tensor | None
    grids: list[tuple[int, int, int, int]]
    index: int

    @property
    def n(self) -> int:
        return self.features.shape[0]


@dataclass
class Kept:
    """What a method keeps of one image: ``features`` ``(k, d)`` and their ``source`` token
    indices ``(k,)`` (ascending; a pooled token's source is its window's central token, which
    gives it its position)."""

    features: torch.Tensor
    source: torch.Tensor


@dataclass
class DecoderDrop:
    """An in-decoder drop: at layer ``layer`` (scores from layer ``layer - 1``'s attention).

    ``decide(rows_fn, visual, real, extra)`` gets ``visual`` and ``real`` ``(batch, seq)`` bool
    masks of the prefill layout, ``rows_fn(rows, valid) -> (batch, heads, r, seq)`` attention
    probabilities of query rows ``rows`` ``(batch, r)``, and ``extra``, a dict whose entries
    :func:`visual_token_stats` reports; it returns the ``(batch, seq)`` bool mask of the visual
    tokens to keep (non-visual tokens are always kept).
    """

    layer: int
    decide: Callable[..., torch.Tensor]


@dataclass
class VisualPruning(Method):
    """Base class of visual token pruning methods (a method overrides ``select`` and/or ``decoder_drop``)."""

    #: whether :meth:`select` reads ``ImageTokens.cls_attention``
    needs_cls: ClassVar[bool] = False

    # -- to override ---------------------------------------------------------------------------
    def select(self, image: ImageTokens, k: int) -> Kept | None:
        """Stage 1: keep ``k`` of ``image``'s tokens (``None``: keep all, the default)."""
        return None

    def select_many(self, images: list[ImageTokens], k: int) -> list[Kept | None]:
        """:meth:`select` for images with the same token count (override to batch them)."""
        return [self.select(image, k) for image in images]

    def budget(self, n: int) -> int:
        """The number of tokens :meth:`select` keeps of an image with ``n`` (default: all)."""
        return n

    def decoder_drop(self, num_layers: int) -> DecoderDrop | None:
        """Stage 2: the in-decoder drop, or ``None`` (the default)."""
        return None

    def check_model(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Refuse a model the method cannot handle (beyond the shared checks)."""

    # -- shared --------------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        model = ctx.model
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_VLMS:
            raise UnsupportedModelError(
                f"{self.name!r} prunes visual tokens of vision-language models; "
                f"{type(model).__name__} (model_type={model_type!r}) is not one. Supported: "
                "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
                "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"
            )
        for other in active_patches(model):
            if other.method.name == "token_prepending":
                raise PatchError(
                    f"{self.name!r} cannot be combined with token_prepending (it rewrites the "
                    "prompt's token layout); remove that patch first"
                )
            if isinstance(other.method, VisualPruning):
                raise PatchError(
                    f"{self.name!r}: {other.method.name!r} already prunes this model's visual "
                    "tokens; one visual pruning method at a time"
                )
        if getattr(self, "positions", "original") == "contiguous" and model_type in _MROPE:
            raise MethodConfigError(
                f"{type(self).__name__}.positions='contiguous' is not defined for M-RoPE models "
                f"({model_type}); kept tokens keep their (t, h, w) positions: use 'original'"
            )
        self.check_model(model)
        runtime = _Runtime(self, ctx)
        runtime.install(ctx)
        _RUNTIMES[model] = runtime
        ctx.on_remove(lambda: _RUNTIMES.pop(model, None))

    def _k(self, n: int, retain_ratio: float, retain_tokens: int | None) -> int:
        """Tokens to keep of ``n``: ``retain_tokens`` if set (all, with one warning, if it exceeds
        ``n``), else ``round(retain_ratio * n)``, at least 1."""
        if retain_tokens is not None:
            if retain_tokens > n:
                _warn_once(
                    self,
                    f"{self.name}: retain_tokens={retain_tokens} exceeds the {n} visual tokens of an "
                    "image; keeping all of them",
                )
                return n
            return retain_tokens
        return min(n, max(1, round(retain_ratio * n)))


@dataclass
class StageOnePruning(VisualPruning):
    """Base of methods that keep a share of each image's visual tokens before the decoder."""

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


def visual_token_stats(model: nn.Module) -> dict[str, Any] | None:
    """Visual tokens of the last prefill of ``model`` under its visual pruning patch.

    Returns
    -------
    dict or None
        ``input``: visual tokens in the prompt, per sample; ``decoder``: visual tokens entering
        the decoder (after stage 1), per sample; ``mean_per_layer``: per sample, the visual
        tokens averaged over the decoder layers (stage 2 and FastV lower it); ``kept``: per
        image, the indices of its tokens stage 1 kept (a pooled token's window centre). With an
        in-decoder drop also ``decoder_kept``: per sample, the prefill columns of the visual
        tokens kept from the drop layer on; ToDRE adds ``text_to_visual_attention`` and
        ``stage2_dropped`` per sample. ``None`` when no visual pruning patch is active or
        nothing has run yet.
    """
    runtime = _RUNTIMES.get(model)
    if runtime is None or runtime.stats is None:
        return None
    out: dict[str, Any] = {}
    for key, value in runtime.stats.items():
        if key == "decoder_kept":  # (batch, seq) bool -> per sample, the kept columns
            value = [row.nonzero().squeeze(1).tolist() for row in value]
        elif key == "kept":
            value = [v.tolist() for v in value]
        elif isinstance(value, torch.Tensor):
            value = value.tolist()
        out[key] = value
    return out


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention probabilities of a few query rows, computed from queries and keys.

    Parameters
    ----------
    query
        ``(batch, heads, seq, head_dim)``.
    key
        ``(batch, kv_heads, seq, head_dim)`` (grouped heads are repeated here).
    mask
        The layer's mask ``(batch, 1, seq, seq)`` (bool: True = attend; float: additive), or
        ``None`` for plain causal attention.
    scaling
        The softmax scale the layer uses.
    rows
        ``(batch, r)`` query rows (sequence indices) to compute.
    valid
        ``(batch, r)`` bool; invalid rows come back as zeros.

    Returns
    -------
    torch.Tensor
        ``(batch, heads, r, seq)`` float32 probabilities (each valid row sums to 1).
    """
    batch, heads, seq, head_dim = query.shape
    index = rows.clamp(min=0)
    q = query.gather(2, index[:, None, :, None].expand(batch, heads, -1, head_dim)).float()
    k = key.float()
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (batch, heads, r, seq)
    if mask is None:
        allowed = torch.arange(seq, device=query.device)[None, None, :] <= index[:, :, None]
        allowed = allowed[:, None]
    else:
        m = mask.gather(2, index[:, None, :, None].expand(mask.shape[0], mask.shape[1], -1, seq))
        if m.dtype == torch.bool:
            allowed = m
        else:
            scores = scores + m.float()
            allowed = m > torch.finfo(m.dtype).min / 2
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs * valid[:, None, :, None]


# --------------------------------------------------------------------------------------------
# the runtime: wrappers and hooks of one installed patch
# --------------------------------------------------------------------------------------------


@dataclass
class _Forward:
    """Per-forward state shared by the multimodal wrapper and the decoder hooks."""

    decode: bool
    visual: torch.Tensor | None = None  # (b, S) visual columns of the prefill layout
    real: torch.Tensor | None = None  # (b, S) non-padding columns
    keep: torch.Tensor | None = None  # (b, S) decided in-decoder keep mask (prefill)
    layout: torch.Tensor | None = None  # (b, S2) columns kept from layer P on (-1: padding)
    gathered: dict[str, Any] = field(default_factory=dict)  # mask / rotary / ids for layers >= P
    past: int = 0  # decode: tokens appended since the prefill
    prompt_len: int = 0  # decode: S, the prompt length the layers before the drop cached
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _DecodeState:
    """What a prefill leaves on its cache for the decoding steps."""

    orig_len: int  # L: the prompt as the caller gave it
    new_len: int  # S: the prompt the decoder saw
    mask: torch.Tensor  # (b, S) attention mask of the shortened prompt
    next_pos: torch.Tensor  # (b,) position after each sample's last prompt token
    dropped: torch.Tensor  # (b,) prompt tokens stage 1 dropped per sample
    layout: torch.Tensor | None  # (b, S2) in-decoder layout (columns of S), or None


class _Runtime:
    def __init__(self, method: VisualPruning, ctx: PatchContext) -> None:
        self.method = method
        self.model = ctx.model
        self.adapter = ctx.adapter
        self.mm = _multimodal_model(ctx.model)
        self.model_type = ctx.model.config.model_type
        self.image_token_id = ctx.adapter.image_token_id(ctx.model)
        self.layers = ctx.adapter.decoder_layers(ctx.model)
        self.num_layers = len(self.layers)
        self.drop = method.decoder_drop(self.num_layers)
        if self.drop is not None and not 1 <= self.drop.layer < self.num_layers:
            raise MethodConfigError(
                f"{type(method).__name__}: the in-decoder drop layer must be in [1, "
                f"{self.num_layers - 1}] for this {self.num_layers}-layer decoder, got {self.drop.layer}"
            )
        self.positions = getattr(method, "positions", "original")
        self.fwd: _Forward | None = None
        self.stats: dict[str, Any] | None = None
        self.feature_call: tuple[list[torch.Tensor], dict[str, Any], torch.Tensor | None] | None = None
        self._signature = inspect.signature(type(self.mm).forward)
        self._feature_signature = inspect.signature(self.mm.get_image_features)

    # -- installing ----------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        ctx.wrap_method(self.mm, "get_image_features", self._image_features)
        ctx.wrap_method(self.mm, "forward", self._forward)
        if self.drop is not None:
            modules = self.adapter.attention_modules(self.model)
            ctx.add_attention_wrapper(self._score, modules=[modules[self.drop.layer - 1]])
            for layer in self.layers[self.drop.layer :]:
                ctx.add_forward_pre_hook(layer, self._layer_pre_hook, with_kwargs=True)

    # -- image features: what they were computed from, and the [CLS] row -------------------------
    def _image_features(self, call_next: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``get_image_features``, remembering its arguments (grids, image sizes) and, for
        methods that need it, the vision encoder's [CLS] attention row. ``generate()`` computes
        the features before the multimodal forward, which then only receives them."""
        attention = _cls_attention_module(self.mm, self.model.config) if self.method.needs_cls else None
        captured: list[torch.Tensor] = []
        handle = None
        if attention is not None:

            def capture(module: nn.Module, args: tuple, kw: dict) -> None:
                hidden = kw.get("hidden_states", args[0] if args else None)
                captured.append(_cls_row(module, hidden))

            handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = call_next(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        bound = self._feature_signature.bind_partial(*args, **kwargs).arguments if args else kwargs
        features = list(out.pooler_output) if hasattr(out, "pooler_output") else list(out)
        self.feature_call = (features, bound, captured[-1] if captured else None)
        return out

    def _feature_call(
        self, features: list[torch.Tensor], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """The arguments ``features`` were computed with (falling back to the forward's) and the [CLS] rows."""
        if self.feature_call is not None:
            seen, bound, rows = self.feature_call
            if len(seen) == len(features) and all(a is b for a, b in zip(seen, features)):
                return {**kwargs, **{k: v for k, v in bound.items() if v is not None}}, rows
        return kwargs, None

    def _cls_for(
        self, features: list[torch.Tensor], kwargs: dict[str, Any], rows: Any
    ) -> list[torch.Tensor | None]:
        """Per image, the [CLS] attention over its (thumbnail) tokens, if it was captured."""
        if rows is None:
            return [None] * len(features)
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        rows = rows[:, 1:] if strategy == "default" else rows  # (crops, tokens)
        if self.model_type == "llava_next":  # crop 0 of each image is its global thumbnail
            starts = _crop_starts(self.model.config, kwargs.get("image_sizes"), len(features))
            return [rows[s] for s in starts]
        return [rows[i] for i in range(len(features))]

    # -- the multimodal forward ----------------------------------------------------------------
    def _forward(self, call_next: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if args:
            bound = self._signature.bind_partial(self.mm, *args, **kwargs)
            kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
            kwargs.update(kwargs.pop("kwargs", {}))
        cache_key = (
            "cache" if "cache" in kwargs or "cache" in self._signature.parameters else "past_key_values"
        )
        cache = kwargs.get(cache_key)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        has_images = kwargs.get("pixel_values") is not None or encoded.get("image") is not None
        if kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            raise PatchError(f"{self.method.name!r} prunes image tokens; video inputs are not supported yet")
        state = getattr(cache, _STATE_ATTR, None) if cache is not None else None
        try:
            if has_images:
                return self._prefill(call_next, kwargs, cache)
            if state is not None:
                return self._decode(call_next, kwargs, cache, state)
            return call_next(**kwargs)
        finally:
            self.fwd = None

    def _prefill(self, call_next: Callable[..., Any], kwargs: dict[str, Any], cache: Any) -> Any:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise PatchError(
                f"{self.method.name!r} needs input_ids (with the image placeholder tokens) to find "
                "the visual tokens; inputs_embeds alone cannot be pruned"
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise PatchError(
                f"{self.method.name!r} prunes a prompt's images at its prefill; images appended to "
                "an existing cache are not supported"
            )
        device = input_ids.device
        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise PatchError(
                f"{self.method.name!r} needs a 2-D attention mask, got shape {tuple(mask.shape)}"
            )
        real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        encoded, raw = self._features(kwargs)
        features = [f.reshape(-1, f.shape[-1]) for f in raw]
        image_cols = input_ids == self.image_token_id
        counts = [int(f.shape[0]) for f in features]
        if int(image_cols.sum()) != sum(counts):
            raise ValueError(
                f"the prompt has {int(image_cols.sum())} image tokens but its {len(features)} image(s) "
                f"give {sum(counts)} visual tokens ({counts}); the processor and the model disagree"
            )
        # each image's columns, in the row-major order masked_scatter fills them
        flat = image_cols.flatten().nonzero().squeeze(1)
        per_image = torch.split(flat, counts)
        owners = (flat[torch.tensor([0, *counts[:-1]]).cumsum(0)] // length).tolist() if counts else []
        feature_kwargs, rows = self._feature_call(raw, kwargs)
        cls_rows = self._cls_for(features, feature_kwargs, rows)
        grids = self._grids(features, feature_kwargs)
        keep = real & ~image_cols
        kept_features: list[torch.Tensor] = []
        kept_sources: list[list[int]] = []
        dropped_any = False
        visual_in = [0] * batch
        images = [ImageTokens(feat, cls_rows[i], grids[i], i) for i, feat in enumerate(features)]
        choices = self._select_all(images)
        for image, cols, choice in zip(images, per_image, choices):
            visual_in[owners[image.index]] += image.n
            if choice is None:
                source, kept = torch.arange(image.n, device=image.features.device), image.features
            else:
                source, kept = choice.source, choice.features
                dropped_any = True
            kept_sources.append(source)
            keep.view(-1)[cols.to(device)[source.to(device)]] = True
            kept_features.append(kept)
        visual_in_t = torch.tensor(visual_in, device=device)
        if not dropped_any:  # nothing left before the decoder: the model's own path, bitwise
            self.fwd = _Forward(
                decode=False, visual=image_cols & real, real=real, extra={"kept": kept_sources}
            )
            call = dict(kwargs)
            if kwargs.get("pixel_values") is not None and "mm_encoder_outputs" in self._signature.parameters:
                # hand over the features computed above: the vision tower runs once
                call.update(
                    pixel_values=None,
                    mm_encoder_outputs={**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded},
                )
            out = call_next(**call)
            self._finish(out, length, length, real.long(), None, visual_in_t, visual_in_t)
            return out
        # the shortened, re-left-padded layout
        lengths = keep.sum(1)
        width = int(lengths.max())
        layout = left_aligned(keep, width)  # (b, S) source columns, -1 = padding
        new_real = layout >= 0
        cols = layout.clamp(min=0)
        ids = input_ids.gather(1, cols).masked_fill(~new_real, 0)
        embed = self.mm.get_input_embeddings()
        inputs_embeds = embed(ids)
        new_image = image_cols.gather(1, cols) & new_real
        values = torch.cat(kept_features).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(new_image[..., None], values)
        new_mask = new_real.long()
        positions, next_pos = self._positions(kwargs, input_ids, real, cols, new_real)
        call = dict(kwargs)
        for name in ("pixel_values", "image_sizes", "image_grid_thw", "mm_encoder_outputs", "mm_token_type_ids",
                     "input_ids"):  # fmt: skip
            if name in call:
                call[name] = None
        call.update(inputs_embeds=inputs_embeds, attention_mask=new_mask, position_ids=positions)
        if call.get("cache_position") is not None:
            call["cache_position"] = torch.arange(width, device=device)
        self.fwd = _Forward(decode=False, visual=new_image, real=new_real, extra={"kept": kept_sources})
        out = call_next(**call)
        decoder_visual = new_image.sum(1)
        dropped = real.sum(1) - lengths
        self._finish(out, length, width, new_mask, (next_pos, dropped), visual_in_t, decoder_visual)
        return out

    def _select_all(self, images: list[ImageTokens]) -> list[Kept | None]:
        """Stage 1 for every image; images with the same token count and budget go in one call."""
        choices: list[Kept | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[ImageTokens]] = {}
        for image in images:
            k = self.method.budget(image.n)
            if k < image.n:
                groups.setdefault((image.n, k), []).append(image)
        for (_, k), group in groups.items():
            for image, choice in zip(group, self.method.select_many(group, k)):
                choices[image.index] = choice
        return choices

    def _finish(
        self,
        out: Any,
        orig_len: int,
        new_len: int,
        new_mask: torch.Tensor,
        positions: tuple[torch.Tensor, torch.Tensor] | None,
        visual_in: torch.Tensor,
        decoder_visual: torch.Tensor,
    ) -> None:
        fwd = self.fwd
        per_layer = decoder_visual.float()
        if fwd is not None and fwd.layout is not None and self.drop is not None:
            after = (fwd.visual.gather(1, fwd.layout.clamp(min=0)) & (fwd.layout >= 0)).sum(1)
            p = self.drop.layer
            per_layer = (p * decoder_visual + (self.num_layers - p) * after) / self.num_layers
        # kept as tensors (no host copies on the timed path); visual_token_stats() makes them lists
        self.stats = {
            "input": visual_in,
            "decoder": decoder_visual,
            "mean_per_layer": per_layer,
            **({} if fwd is None else fwd.extra),
        }
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            return
        batch = new_mask.shape[0]
        if positions is None:
            zeros = torch.zeros(batch, dtype=torch.long, device=new_mask.device)
            next_pos, dropped = zeros, zeros
        else:
            next_pos, dropped = positions
        layout = None if fwd is None else fwd.layout
        if positions is None and layout is None:
            return  # nothing was dropped anywhere: decoding needs no mapping
        setattr(cache, _STATE_ATTR, _DecodeState(orig_len, new_len, new_mask, next_pos, dropped, layout))

    def _decode(
        self,
        call_next: Callable[..., Any],
        kwargs: dict[str, Any],
        cache: Any,
        state: _DecodeState,
    ) -> Any:
        source = kwargs.get("input_ids")
        if source is None:
            source = kwargs.get("inputs_embeds")
        batch, q = source.shape[0], source.shape[1]
        device = source.device
        past = cache.get_seq_length()
        appended = past - state.new_len
        call = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.shape[1] != state.orig_len + appended + q:
                raise PatchError(
                    f"{self.method.name!r}: the attention mask has {mask.shape[1]} columns, but the cache "
                    f"holds a {state.orig_len}-token prompt and {appended} new tokens plus {q} now"
                )
            call["attention_mask"] = torch.cat([state.mask.to(mask.dtype), mask[:, state.orig_len :]], dim=1)
        elif not bool(state.mask.all()):
            ones = torch.ones(batch, appended + q, dtype=state.mask.dtype, device=device)
            call["attention_mask"] = torch.cat([state.mask, ones], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None and self.positions == "contiguous":
            call["position_ids"] = positions - state.dropped.view(-1, 1)
        elif positions is None and state.new_len != state.orig_len:
            steps = torch.arange(q, device=device)
            pos = state.next_pos.view(-1, 1) + appended + steps  # (b, q)
            call["position_ids"] = pos[None].expand(3, -1, -1) if self.model_type in _MROPE else pos
        if call.get("cache_position") is not None:
            call["cache_position"] = torch.arange(past, past + q, device=device)
        self.fwd = _Forward(decode=True, layout=state.layout, past=appended, prompt_len=state.new_len)
        return call_next(**call)

    # -- inputs of the shortened prompt --------------------------------------------------------
    def _features(self, kwargs: dict[str, Any]) -> tuple[Any, list[torch.Tensor]]:
        """``get_image_features``'s output for the call's images, and its features (one tensor per image)."""
        encoded = kwargs.get("mm_encoder_outputs") or {}
        out = encoded.get("image")
        if out is None:
            accepted = self._feature_signature.parameters
            names = ("pixel_values", "image_sizes", "image_grid_thw", "vision_feature_layer",
                     "vision_feature_select_strategy")  # fmt: skip
            call = {n: kwargs[n] for n in names if n in accepted and n in kwargs}
            out = self.mm.get_image_features(**call)
        return out, list(out.pooler_output if hasattr(out, "pooler_output") else out)

    def _grids(
        self, features: list[torch.Tensor], kwargs: dict[str, Any]
    ) -> list[list[tuple[int, int, int, int]]]:
        config = self.model.config
        if self.model_type in _MROPE:
            merge = config.vision_config.spatial_merge_size
            thw = kwargs.get("image_grid_thw")
            if thw is None:
                return [[(0, 1, f.shape[0], f.shape[0])] for f in features]
            grids = []
            for t, h, w in thw.tolist():
                rows, cols = h // merge, w // merge
                grids.append([(f * rows * cols, rows, cols, cols) for f in range(t)])
            return grids
        side = config.vision_config.image_size // config.vision_config.patch_size
        full = getattr(config, "vision_feature_select_strategy", "default") != "default"
        out = []
        for feat in features:
            base = side * side + (1 if full else 0)
            if self.model_type != "llava_next" or feat.shape[0] <= base:
                out.append(_square_grid(feat.shape[0], full))
                continue
            grids = [(1 if full else 0, side, side, side)]
            newline = getattr(self.mm, "image_newline", None)
            rest = feat[base:]
            if newline is not None:
                marks = (rest == newline.to(rest.dtype)).all(-1).nonzero().squeeze(1)
                if len(marks):
                    cols = int(marks[0])
                    grids.append((base, len(marks), cols, cols + 1))  # rows end with a newline token
            out.append(grids)
        return out

    def _positions(
        self,
        kwargs: dict[str, Any],
        input_ids: torch.Tensor,
        real: torch.Tensor,
        cols: torch.Tensor,
        new_real: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the shortened prompt ``(..., b, S)`` and each sample's next position ``(b,)``."""
        if self.positions == "contiguous":
            pos = (new_real.long().cumsum(1) - 1).clamp(min=0)
            return pos, new_real.sum(1)
        given = kwargs.get("position_ids")
        if self.model_type in _MROPE:
            if given is None:
                given = self._rope_index(kwargs, input_ids)
            else:
                given = given[-3:] if given.dim() == 3 else given[None].expand(3, -1, -1)
            index = cols[None].expand(given.shape[0], -1, -1)
            pos = given.gather(2, index).masked_fill(~new_real[None], 1)
            next_pos = given.masked_fill(~real[None], -1).amax(dim=(0, 2)) + 1
            return pos, next_pos
        if given is None:
            given = (real.long().cumsum(1) - 1).clamp(min=0)
        given = given.expand(input_ids.shape[0], -1)
        pos = given.gather(1, cols).masked_fill(~new_real, 1)
        next_pos = given.masked_fill(~real, -1).amax(1) + 1
        return pos, next_pos

    def _rope_index(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        accepted = inspect.signature(self.mm.get_rope_index).parameters
        call = {n: kwargs.get(n) for n in ("image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids")
                if n in accepted}  # fmt: skip
        if "mm_token_type_ids" in accepted and call.get("mm_token_type_ids") is None:
            call["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        position_ids, _ = self.mm.get_rope_index(input_ids, **call)
        return position_ids

    # -- the in-decoder drop -------------------------------------------------------------------
    def _score(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        call_next: Any,
        **kwargs: Any,
    ) -> Any:
        fwd = self.fwd
        if (
            fwd is not None
            and not fwd.decode
            and fwd.visual is not None
            and bool(fwd.visual.any())
            and query.shape[2] == key.shape[2] == fwd.visual.shape[1]
        ):
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)

            def rows_fn(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
                return attention_rows(query, key, attention_mask, float(scaling), rows, valid)

            keep_visual = self.drop.decide(rows_fn, fwd.visual, fwd.real, fwd.extra)
            fwd.keep = fwd.real & (~fwd.visual | keep_visual)
            fwd.extra["decoder_kept"] = fwd.visual & keep_visual
        return call_next(module, query, key, value, attention_mask, **kwargs)

    def _layer_pre_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict] | None:
        fwd = self.fwd
        if fwd is None:
            return None
        if fwd.decode:
            if fwd.layout is None:
                return None
            if "mask" not in fwd.gathered:
                hidden = args[0] if args else kwargs["hidden_states"]
                fwd.gathered["mask"] = _decode_mask(
                    kwargs.get("attention_mask"), fwd.layout, fwd.prompt_len, fwd.past, hidden.shape[1]
                )
            kwargs = dict(kwargs, attention_mask=fwd.gathered["mask"])
            return args, kwargs
        if fwd.keep is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if fwd.layout is None:  # the first layer of the drop: build the layout once
            if bool((fwd.keep == fwd.real).all()):
                fwd.keep = None  # every sample keeps its visual tokens: nothing to do
                return None
            fwd.layout = left_aligned(fwd.keep, int(fwd.keep.sum(1).max()))
            fwd.gathered = _gather_layer_inputs(kwargs, fwd.layout, fwd.keep.shape[1])
        if hidden.shape[1] != fwd.layout.shape[1]:
            index = fwd.layout.clamp(min=0)
            hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            hidden = hidden * (fwd.layout >= 0)[..., None].to(hidden.dtype)
        kwargs = dict(kwargs, **fwd.gathered)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _multimodal_model(model: nn.Module) -> nn.Module:
    """The module owning ``get_image_features`` and the language model (``model.model`` or ``model``)."""
    for candidate in (getattr(model, "model", None), model):
        if (
            candidate is not None
            and hasattr(candidate, "get_image_features")
            and hasattr(candidate, "language_model")
        ):
            return candidate
    raise UnsupportedModelError(f"{type(model).__name__} has no multimodal model with get_image_features")


def left_aligned(keep: torch.Tensor, width: int) -> torch.Tensor:
    """``(b, width)`` column indices of each row's True entries, right-aligned (-1 = left padding)."""
    batch, length = keep.shape
    counts = keep.sum(1)
    order = torch.arange(length, device=keep.device).expand(batch, -1)
    # sort kept columns first in their order, then take them right-aligned
    key = torch.where(keep, order, order + length)
    sorted_cols = key.sort(1).values
    slot = torch.arange(width, device=keep.device)[None, :] - (width - counts)[:, None]  # index into kept
    valid = slot >= 0
    cols = sorted_cols.gather(1, slot.clamp(min=0))
    return torch.where(valid, cols, torch.full_like(cols, -1))


def _gather_layer_inputs(kwargs: dict[str, Any], layout: torch.Tensor, length: int) -> dict[str, Any]:
    """The prefill's layer kwargs (mask, rotary embeddings, position ids) cut to ``layout``.

    ``layout`` ``(b, S2)`` holds the kept columns of the ``length``-column prefill (-1: padding).
    Padding rows attend to themselves only, so no row of the mask is empty.
    """
    out: dict[str, Any] = {}
    valid = layout >= 0
    index = layout.clamp(min=0)
    width = layout.shape[1]
    mask = kwargs.get("attention_mask")
    keys = valid[:, None, None, :]
    if mask is None:  # plain causal: the kept columns stay in order
        allowed = keys & torch.ones(width, width, dtype=torch.bool, device=layout.device).tril()
    else:
        heads = mask.shape[1]
        rows = mask.gather(2, index[:, None, :, None].expand(-1, heads, -1, mask.shape[-1]))
        both = rows.gather(3, index[:, None, None, :].expand(-1, heads, width, -1))
        allowed = keys & (both if both.dtype == torch.bool else both > torch.finfo(both.dtype).min / 2)
    diagonal = torch.eye(width, dtype=torch.bool, device=layout.device)
    allowed = allowed | ((~valid)[:, None, :, None] & diagonal)
    if mask is None and bool(valid.all()):
        out["attention_mask"] = None
    else:
        out["attention_mask"] = _as_mask_like(allowed, mask)
    rotary = kwargs.get("position_embeddings")
    if rotary is not None:
        out["position_embeddings"] = tuple(_gather_seq(t, index) for t in rotary)
    ids = kwargs.get("position_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[-1] == length:
        out["position_ids"] = _gather_seq(ids.unsqueeze(-1), index).squeeze(-1)
    return out


def _as_mask_like(allowed: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """``allowed`` (bool) in the form of ``like``: bool, or additive float (0 / dtype min)."""
    if like is None or like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed, torch.finfo(like.dtype).min
    )


def _gather_seq(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` ``(..., b, S, d)`` along its sequence dimension with ``index`` ``(b, S2)``."""
    if tensor.shape[-3] != index.shape[0]:  # a table shared by the batch
        tensor = tensor.expand(*tensor.shape[:-3], index.shape[0], *tensor.shape[-2:])
    lead = tensor.shape[:-3]
    idx = index[..., None].expand(*index.shape, tensor.shape[-1])
    idx = idx.expand(*lead, *idx.shape)
    return tensor.gather(-2, idx)


def _decode_mask(
    mask: torch.Tensor | None, layout: torch.Tensor, prompt_len: int, appended: int, q: int
) -> torch.Tensor | None:
    """A decoding step's mask for the layers past the drop.

    Their cache holds the ``layout`` columns of the prompt, then every token appended since:
    the step's mask (over the ``prompt_len``-column prompt of the earlier layers, the
    ``appended`` tokens and the ``q`` new ones) is cut to those columns.
    """
    device = layout.device
    batch = layout.shape[0]
    valid = layout >= 0
    new = torch.arange(prompt_len, prompt_len + appended + q, device=device).expand(batch, -1)
    cols = torch.cat([layout.clamp(min=0), new], dim=1)  # (b, kv)
    col_valid = torch.cat([valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
    if mask is None:
        if q == 1 and bool(valid.all()):
            return None
        step = torch.arange(q, device=device)[:, None]
        later = torch.arange(cols.shape[1], device=device)[None, :] - layout.shape[1] - appended
        allowed = col_valid[:, None, None, :] & (later <= step)[None, None]
        return allowed
    heads = mask.shape[1]
    picked = mask.gather(3, cols[:, None, None, :].expand(-1, heads, mask.shape[2], -1))
    ok = picked if picked.dtype == torch.bool else picked > torch.finfo(picked.dtype).min / 2
    return _as_mask_like(ok & col_valid[:, None, None, :], mask)


def _square_grid(n: int, with_cls: bool) -> list[tuple[int, int, int, int]]:
    start = 1 if with_cls else 0
    side = math.isqrt(n - start)
    if side * side == n - start:
        return [(start, side, side, side)]
    return [(start, 1, n - start, n - start)]


def _crop_starts(config: Any, image_sizes: Any, n_images: int) -> list[int]:
    """Index of each image's first (thumbnail) crop in the vision tower's batch (LLaVA-NeXT)."""
    if image_sizes is None:
        return list(range(n_images))
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    starts, offset = [], 0
    for size in torch.as_tensor(image_sizes).tolist()[:n_images]:
        starts.append(offset)
        offset += image_size_to_num_patches(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
    return starts


def _cls_attention_module(mm: nn.Module, config: Any) -> nn.Module | None:
    """The attention module of the vision encoder's last layer (CLIP-style towers), as ToDRE uses.

    (LLaVA reads its features from the layer before last, ``vision_feature_layer=-2``; the paper
    takes the [CLS] attention of the encoder's last layer all the same, and so does tokenlean.)
    """
    tower = mm.vision_tower if hasattr(mm, "vision_tower") else None
    encoder = getattr(tower, "encoder", None) or getattr(
        getattr(tower, "vision_model", None), "encoder", None
    )
    layers = getattr(encoder, "layers", None)
    if not layers:
        return None
    return getattr(layers[-1], "self_attn", None)


def _cls_row(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens)`` [CLS]-query attention of a CLIP attention module, head-averaged."""
    batch, tokens, _ = hidden.shape
    heads = attention.num_heads
    head_dim = attention.head_dim
    with torch.no_grad():
        q = attention.q_proj(hidden[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
        k = attention.k_proj(hidden).view(batch, tokens, heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attention.scale
        return scores.softmax(-1).mean(1)[:, 0]


def _warn_once(method: Any, message: str) -> None:
    seen = method.__dict__.setdefault("_tokenlean_warned", set())
    if message not in seen:
        seen.add(message)
        warnings.warn(message, stacklevel=4)
