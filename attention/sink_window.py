"""Attention sinks + sliding window: StreamingLLM, with real KV-cache eviction.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024): each query
attends to the first ``sink_tokens`` tokens of its sequence (the sinks) and to the ``window``
most recent tokens including itself; everything in between is gone. Two modes:

``mode="evict"`` (default) — the StreamingLLM algorithm
    The KV cache is a :class:`~tokenlean.attention.kv_cache.SinkWindowCache`: after every forward
    pass each row keeps only its first ``sink_tokens`` real tokens and its ``window`` most recent
    ones, so memory stays at ``sink_tokens + window`` slots per layer through any ``generate()``.
    While patched, the model creates that cache whenever a forward pass with ``use_cache`` gets
    none (``generate()`` and plain ``model(...)`` calls); a cache passed as ``cache=`` or
    ``past_key_values=`` is used if it is one, replaced if it is another, empty cache, refused if
    it is another, filled one.

    *Positions live inside the cache* (the paper's §3.2): with tokens 0,1,2,3,6,7,8 cached, the
    next token is scored as if at position 8 and the cached keys as if at 0..7. Keys reach the
    cache already rotated (RoPE), so each slot records the position its key was rotated at, and
    at attention time the kept keys are rotated once by the difference to their in-cache position
    (angles computed in float64 from the model's ``inv_freq``; a stored key is never re-rotated in
    place, so rounding does not accumulate over a long stream, and the offsets stay below the
    window size while decoding). The model is given the in-cache positions of the new tokens:
    ``position_ids`` passed by the caller are replaced once anything has been evicted, and must
    be the text's positions (real tokens counted from 0 per row) before that.

    *A pass longer than the window* (a long prefill, a perplexity window) is exact too: every
    query sees its sinks and its own window, as if the tokens had been fed one at a time. Within
    the pass, a query's distance to a window key is their distance in the text, and its distance
    to sink ``s`` is ``min(i, sink_tokens + window - 1) - s`` for a query that is the row's
    ``i``-th real token. The second is not one rotation per key, so such passes attend with
    queries and keys of twice the head size — ``[q, q_sink] · [k, 0]`` for window keys and
    ``[q, q_sink] · [0, k_sink]`` for sinks, ``q_sink`` being the query rotated back to its
    in-cache position — through the model's own attention function (sdpa or eager, soft-capping
    and GQA included). After the pass the cache holds only the sinks and the window. An input
    longer than ``chunk_size`` (default 512) is run in passes of that many tokens through the
    cache (chunked prefill), so no pass attends more than ``sink_tokens + window + chunk_size``
    keys; the result is the same within float tolerance.

    *Left padding*: the sinks are each row's first real tokens; positions count real tokens;
    rows keep equal slot counts with masked filler slots. Once anything has been evicted the
    kept slots are not one contiguous range, so the patch builds the attention mask itself from
    the slots' records; until then (while the slots seen, padding included, number at most
    ``sink_tokens + window``) the model runs exactly as unpatched, bitwise.

    Supported: decoders with one standard rotary embedding (rotate-half convention, checked on
    install) — Llama, Mistral, Qwen2/3, Gemma2 and the LLaVA language models. Refused with an
    error: multimodal RoPE (Qwen2-VL), per-layer rotary bases (Gemma3), dynamic/longrope scaling,
    and models whose own sliding window is smaller than ``sink_tokens + window`` (those layers
    would see further than the model was built to; Gemma2's local layers and Mistral's window
    are fine when at least as large). The cache cannot be cropped (assisted decoding needs
    ``mode="mask"``); the harness's BBH scorer and facts reader roll it back from a copy instead
    (``SinkWindowCache.evicts``).

``mode="mask"`` — the pattern only, for quality studies
    The pattern is applied as an attention mask on top of the model's own attention, with the
    original position ids and the full KV cache: it reproduces what each token can see with the
    text's positions, but saves neither memory nor time. Layers with their own sliding window
    (Gemma2/3 local layers) keep it unchanged. Any supported model.

Removal restores the model bitwise (every hook, wrapper and the attention implementation are
undone by the patch core); a ``SinkWindowCache`` created while patched is useless afterwards.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tokenlean.errors import PatchError
from tokenlean.methods import Method, param, register_method
from tokenlean.patching import PatchContext, cache_keyword

from ._rope import as_keywords, cache_length, check_rope_model, chunked_output, pop_cache, rotate, token_slice
from .kv_cache import SinkWindowCache, StepPlan, plan_step

__all__ = ["SinkWindowAttention", "SinkWindowCache", "sink_window_mask"]

_MODES = ("evict", "mask")


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
    chunk_size: int = param(
        512, "evict: a longer input is run in passes of this many tokens through the cache (chunked prefill)"
    )
    mode: Literal["evict", "mask"] = param(
        "evict",
        "evict: StreamingLLM, the KV cache keeps only sinks + window, positions inside the cache; "
        "mask: the pattern as an attention mask only (full cache, text positions; quality studies)",
    )

    def validate(self) -> None:
        if self.sink_tokens < 0:
            self._fail("sink_tokens", self.sink_tokens, ">= 0")
        if self.window < 1:
            self._fail("window", self.window, ">= 1")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            self._fail("chunk_size", self.chunk_size, "an integer >= 1")
        if self.mode not in _MODES:
            self._fail("mode", self.mode, "'evict' or 'mask'")

    # -- install ----------------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        self._plan: StepPlan | None = None  # the forward pass in progress (evict mode)
        if self.mode == "mask":
            # Layers with their own sliding window (Gemma2/3 local layers) keep it unchanged: their
            # cache is already windowed, so key slot indices are not sequence positions there.
            modules = [
                m for m in ctx.adapter.attention_modules(ctx.model) if not getattr(m, "sliding_window", None)
            ]
            ctx.add_attention_wrapper(self._attend_mask, modules=modules)
            return
        self._install_evict(ctx)

    def _install_evict(self, ctx: PatchContext) -> None:
        model = ctx.model
        config = ctx.adapter.text_config(model)
        attention = ctx.adapter.attention_modules(model)
        self._check_model(ctx, config, attention)
        self._rotary = ctx.adapter.rotary_embedding(model)
        self._num_layers = len(attention)
        self._eager = (config._attn_implementation or "eager") == "eager"
        ctx.add_attention_wrapper(self._attend_evict)
        decoder = ctx.adapter.text_model(model)
        cache_name = cache_keyword(decoder.forward)
        params = list(inspect.signature(decoder.forward).parameters.values())

        def forward(call_next: Any, *args: Any, **kwargs: Any) -> Any:
            return self._forward(call_next, config, cache_name, params, *args, **kwargs)

        ctx.wrap_method(decoder, "forward", forward)

    def _check_model(self, ctx: PatchContext, config: Any, attention: list[torch.nn.Module]) -> None:
        """Refuse, with the reason, what in-cache positions cannot be exact for."""
        advice = "; use mode='mask' (the pattern as a mask, no eviction)"
        span = self.sink_tokens + self.window
        check_rope_model(ctx, config, attention, "sink_window (evict)", advice, span=span)

    # -- forward: the cache, the plan, the positions --------------------------------------------
    def _forward(
        self, call_next: Any, config: Any, cache_name: str, params: list[Any], *args: Any, **kwargs: Any
    ) -> Any:
        kwargs = as_keywords(params, args, kwargs)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return call_next(**kwargs)  # let the model raise its own error
        batch, length = ref.shape[:2]
        if length > self.chunk_size:
            return self._chunked(call_next, config, cache_name, params, kwargs, length)
        device = ref.device
        cache = None
        given = False
        for name in ("cache", "past_key_values"):
            value = kwargs.pop(name, None)
            if value is not None:
                cache, given = value, True
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(config, "use_cache", True))
        if cache is not None and not isinstance(cache, SinkWindowCache):
            if cache_length(cache) > 0:
                raise PatchError(
                    f"sink_window (evict): the {type(cache).__name__} passed holds tokens cached without "
                    "the patch; start from an empty cache (or none)"
                )
            cache = None  # an empty cache of another kind (generate's default): use ours instead
        if cache is None and (use_cache or given):
            cache = SinkWindowCache(self.sink_tokens, self.window, self._num_layers)
        if isinstance(cache, SinkWindowCache) and (cache.sink_tokens, cache.window) != (
            self.sink_tokens,
            self.window,
        ):
            raise PatchError(
                f"sink_window (evict): the cache was made for sink_tokens={cache.sink_tokens}, "
                f"window={cache.window}, the patch has {self.sink_tokens}, {self.window}"
            )

        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length):
            raise ValueError(
                "sink_window (evict) needs a 2-D attention_mask (batch, cached + new tokens), got "
                f"shape {tuple(mask.shape)} for {length} new tokens"
            )
        new_valid = (
            mask[:, -length:].to(device).bool()
            if mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        plan = (
            cache.plan(new_valid)
            if cache is not None
            else plan_step(self.sink_tokens, self.window, new_valid)
        )
        given_positions = kwargs.get("position_ids")
        if not plan.passthrough:
            kwargs["position_ids"] = plan.positions
        elif given_positions is not None:
            _check_positions(given_positions, plan)
        if cache is not None:
            kwargs[cache_name] = cache
            cache._pending = plan
        self._plan = plan
        try:
            out = call_next(**kwargs)
        finally:
            self._plan = None
            if cache is not None:
                cache._pending = None
        if cache is not None:
            cache.commit(plan)
        return out

    def _chunked(
        self,
        call_next: Any,
        config: Any,
        cache_name: str,
        params: list[Any],
        kwargs: dict[str, Any],
        length: int,
    ) -> Any:
        """Run a long input in passes of ``chunk_size`` tokens through one evicting cache.

        Each pass attends at most ``sink_tokens + window + chunk_size`` keys, so a prefill costs
        time linear in its length and memory bounded by the window (one long pass would build a
        ``length``-square attention).
        """
        cache, use_cache = pop_cache(kwargs, config)
        if cache is None or not isinstance(cache, SinkWindowCache) and not cache_length(cache):
            cache = SinkWindowCache(self.sink_tokens, self.window, self._num_layers)
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        before = 0 if mask is None or mask.dim() != 2 else mask.shape[1] - length
        outs = []
        for start in range(0, length, self.chunk_size):
            stop = min(start + self.chunk_size, length)
            piece = token_slice({**kwargs, cache_name: cache, "use_cache": True}, start, stop)
            if mask is not None and mask.dim() == 2:
                piece["attention_mask"] = mask[:, : before + stop]
            if positions is not None:
                piece["position_ids"] = positions[..., start:stop]
            outs.append(self._forward(call_next, config, cache_name, params, **piece))
        return chunked_output(outs, cache, use_cache)

    # -- attention --------------------------------------------------------------------------------
    def _attend_evict(
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
        plan = self._plan
        if plan is None:
            raise PatchError("sink_window (evict): call the patched model's forward, not an attention layer")
        if plan.passthrough:  # nothing evicted: the model's own mask and positions are exact
            return call_next(module, query, key, value, attention_mask, **kwargs)
        if key.shape[2] != plan.slots.length or query.shape[2] != plan.new_tokens:
            raise PatchError(
                f"sink_window (evict): the layer sees {key.shape[2]} keys and {query.shape[2]} queries, "
                f"the cache plan {plan.slots.length} and {plan.new_tokens}"
            )
        geometry = self._geometry(plan, query.device)
        inv_freq = self._rotary.inv_freq
        key = rotate(key, geometry.key_delta, inv_freq)
        mask = geometry.mask(query.dtype, additive=self._eager)
        if geometry.query_delta is None:
            return call_next(module, query, key, value, mask, **kwargs)
        # Sinks sit at a per-query distance: attend with [q, q_sink] . [k, 0] / [0, k_sink].
        query_sink = rotate(query, geometry.query_delta, inv_freq)
        sink = geometry.sink_slots[:, None, :, None]
        zeros = torch.zeros_like(key)
        key = torch.cat([torch.where(sink, zeros, key), torch.where(sink, key, zeros)], dim=-1)
        query = torch.cat([query, query_sink], dim=-1)
        if kwargs.get("scaling") is None:  # the doubled head size must not change the scale
            kwargs["scaling"] = getattr(module, "scaling", None) or value.shape[-1] ** -0.5
        if self._eager:
            return call_next(module, query, key, value, mask, **kwargs)
        # SDPA's fused kernels need the values' head size to equal the keys': with a shorter one it
        # falls back to its math path (about 4x slower on a CPU). Zero-padded values give the same
        # output in their first head_dim channels.
        head_dim = value.shape[-1]
        value = torch.cat([value, torch.zeros_like(value)], dim=-1)
        out, weights = call_next(module, query, key, value, mask, **kwargs)
        return out[..., :head_dim], weights

    def _geometry(self, plan: StepPlan, device: torch.device) -> _Geometry:
        cached = getattr(plan, "_geometry", None)
        if cached is None or cached.device != device:
            cached = _Geometry.build(plan, self.sink_tokens, self.window, device)
            plan._geometry = cached  # type: ignore[attr-defined] - shared by every layer of the pass
        return cached

    def _attend_mask(
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


@dataclass
class _Geometry:
    """Mask and rotations of one evicting forward pass (built once, used by every layer)."""

    device: torch.device
    allowed: torch.Tensor  # (batch, 1, queries, slots) bool
    key_delta: torch.Tensor | None  # (batch, slots) long: rotate each key by this many positions
    query_delta: torch.Tensor | None  # (batch, queries) long: rotation of the sink-facing query
    sink_slots: torch.Tensor  # (batch, slots) bool
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, plan: StepPlan, sink_tokens: int, window: int, device: torch.device) -> _Geometry:
        slots = plan.slots
        valid, index, shift = (t.to(device) for t in (slots.valid, slots.index, slots.shift))
        offset = plan.offset.to(device)
        total, queries = slots.length, plan.new_tokens
        q_valid, q_index = valid[:, total - queries :], index[:, total - queries :]
        k_index = index[:, None, :]
        q_col = q_index[:, :, None]
        allowed = (
            valid[:, None, :]
            & q_valid[:, :, None]
            & (k_index <= q_col)
            & ((k_index < sink_tokens) | (q_col - k_index < window))
        )
        # a padding query attends to itself only (its output is unused; no fully masked rows)
        own = (
            torch.arange(total, device=device)[None, None, :]
            == (torch.arange(queries, device=device) + total - queries)[None, :, None]
        )
        allowed = allowed | (own & ~q_valid[:, :, None])
        sink_slots = valid & (index < sink_tokens)
        # Window keys go to "index + offset" (so distances are the text's), sinks to "index".
        key_delta = torch.where(sink_slots, -shift, offset[:, None] - shift)
        key_delta = torch.where(valid, key_delta, 0)
        # The query sits at index + offset; towards the sinks it must sit at min(index, span - 1).
        span = sink_tokens + window
        query_delta = offset[:, None] + (q_index - (span - 1)).clamp(min=0)
        query_delta = -torch.where(q_valid, query_delta, 0)
        needs_sinks = bool(sink_slots.any()) and bool(query_delta.any())
        return cls(
            device=device,
            allowed=allowed[:, None],
            key_delta=key_delta if bool(key_delta.any()) else None,
            query_delta=query_delta if needs_sinks else None,
            sink_slots=sink_slots,
        )

    def mask(self, dtype: torch.dtype, *, additive: bool) -> torch.Tensor:
        """The mask as the base attention wants it: bool (sdpa) or additive ``dtype`` (eager)."""
        key = dtype if additive else torch.bool
        if key not in self._masks:
            if additive:
                self._masks[key] = torch.zeros(
                    self.allowed.shape, dtype=dtype, device=self.device
                ).masked_fill(~self.allowed, torch.finfo(dtype).min)
            else:
                self._masks[key] = self.allowed
        return self._masks[key]


def _check_positions(given: torch.Tensor, plan: StepPlan) -> None:
    """Before any eviction the caller's positions are kept; they must be the text's positions."""
    valid = plan.slots.valid[:, -plan.new_tokens :]
    ours = plan.positions.to(given.device)
    given = given.expand_as(ours) if given.dim() == 2 and given.shape[0] == 1 else given
    if given.shape != ours.shape or bool((given != ours)[valid.to(given.device)].any()):
        raise ValueError(
            "sink_window (evict) assigns positions itself (real tokens counted from 0 per row); "
            "the position_ids passed differ from those"
        )


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
