"""Block retrieval over a long KV cache: InfLLM's training-free rule and landmark attention's.

Every token's keys and values are kept (:class:`~tokenlean.attention.block_cache.BlockRetrievalCache`,
optionally in CPU memory), in blocks of ``block_size`` once they leave the local window. For
every query chunk (a prefill runs in chunks of ``chunk_size``; a decode step is a chunk of one)
and every key/value head, the ``top_k`` blocks that score highest against the chunk's queries
are attended, placed before the local window with consistent positions::

    [sink_tokens sinks][top_k retrieved blocks, in text order][local window][the chunk, causal]
     0, 1, 2, ...      positions follow the layout, not the text

so what attention reads per step stays at ``sink_tokens + top_k * block_size + window (+
block_size)`` keys whatever the context length, and the positions a query sees never exceed
that span — the model is not asked to generalise beyond its trained context (Mohtashami & Jaggi,
2023, §3.3; Xiao et al., InfLLM, 2024). Until more than ``top_k`` blocks are stored nothing
needs choosing and the pass is plain causal attention at the text's positions, so a context
shorter than ``sink_tokens + window + top_k * block_size`` gives the model's own outputs.

Scoring rules (``scoring=``):

``training_free`` — InfLLM's, for any pretrained model
    Each block is represented by ``representatives`` vectors: the mean key (before rotary
    encoding) of each of that many equal parts of the block (1 = the block's mean key). A
    query's score for a block is its largest scaled dot product with them, as if the block sat
    at the start of the layout; each query's scores are turned into a softmax over the blocks,
    and a block's score is the sum over the chunk's queries and the query heads that share its
    key/value head.

``landmark`` — landmark attention's, for a model trained with landmarks
    The block is represented by its landmark token's key, and attention over the layout is the
    grouped softmax the model was trained with (landmarks gate their blocks and carry no value).
    Needs the ``landmark`` patch applied first, with the same ``block_size`` (it inserts the
    landmark tokens, also while ``generate()`` decodes, and strips them from the logits), and
    ``sink_tokens`` and ``window`` multiples of ``block_size`` so that retrieved blocks stay on the
    landmark grid. Size the layout to the landmark model's training length, as the paper's
    inference does: for ``smollm2-135m-landmark`` (512 slots) ``sink_tokens=64, top_k=3,
    window=128, chunk_size=128`` attends at most 512 slots; the defaults (up to 1,344) put the
    grouped softmax beyond what the model learned (the README has the passkey figures). E.g.
    ``tokenlean.patch(model, "landmark", delta="smollm2-135m-landmark")`` and
    ``tokenlean.patch(model, "block_retrieval", scoring="landmark", top_k=3, window=128, chunk_size=128)``.

Supported: decoders with one standard rotary embedding (the checks of ``sink_window``'s
evicting mode: Llama, Mistral, Qwen2/3 and the like), one sequence or a batch of unpadded
sequences of equal length. Refused with an error: padded batches, models with their own
sliding-window layers, multimodal or per-layer rotary positions. The cache cannot be cropped
(assisted decoding is not supported); the harness's scorers roll it back from a copy.
Removal restores the model bitwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tokenlean.errors import PatchError
from tokenlean.methods import Method, param, register_method
from tokenlean.patching import PatchContext, active_patches, cache_keyword

from ._rope import as_keywords, cache_length, check_rope_model, chunked_output, pop_cache, rotate, token_slice
from .block_cache import BlockPlan, BlockRetrievalCache, BlockRetrievalLayer

__all__ = ["BlockRetrieval", "BlockRetrievalCache"]

_SCORING = ("training_free", "landmark")


@register_method("block_retrieval")
@dataclass
class BlockRetrieval(Method):
    """A KV cache in blocks: each query chunk attends sinks, its top-k blocks and a local window."""

    top_k: int = param(4, "blocks retrieved per key/value head for each query chunk")
    block_size: int = param(64, "tokens per block (with scoring='landmark': the landmark patch's block size)")
    sink_tokens: int = param(64, "initial tokens every query attends")
    window: int = param(512, "recent tokens every query attends (the local window, at least this many)")
    chunk_size: int = param(512, "queries per pass when a long input is prefilled in chunks")
    scoring: Literal["training_free", "landmark"] = param(
        "training_free",
        "training_free: InfLLM's representative keys (any model); landmark: the blocks' landmark keys "
        "and grouped softmax (a model trained with landmarks, under the landmark patch)",
    )
    representatives: int = param(
        4, "training_free: mean keys per block (block parts) a query is scored against"
    )
    offload: bool = param(False, "keep the stored keys and values in CPU memory (a model on a GPU)")

    def validate(self) -> None:
        for name in ("top_k", "block_size", "window", "chunk_size", "representatives"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(name, value, "an integer >= 1")
        if (
            isinstance(self.sink_tokens, bool)
            or not isinstance(self.sink_tokens, int)
            or self.sink_tokens < 0
        ):
            self._fail("sink_tokens", self.sink_tokens, "an integer >= 0")
        if self.block_size < 2:
            self._fail("block_size", self.block_size, ">= 2")
        if self.scoring not in _SCORING:
            self._fail("scoring", self.scoring, "'training_free' or 'landmark'")
        for name in ("window", "chunk_size"):
            if getattr(self, name) % self.block_size:
                self._fail(name, getattr(self, name), f"a multiple of block_size ({self.block_size})")
        if self.representatives > self.block_size or self.block_size % self.representatives:
            self._fail(
                "representatives", self.representatives, f"a divisor of block_size ({self.block_size})"
            )
        if self.scoring == "landmark" and self.sink_tokens % self.block_size:
            self._fail(
                "sink_tokens",
                self.sink_tokens,
                f"a multiple of block_size ({self.block_size}) with scoring='landmark'",
            )
        if not isinstance(self.offload, bool):
            self._fail("offload", self.offload, "a bool")

    # -- install ----------------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        model = ctx.model
        config = ctx.adapter.text_config(model)
        attention = ctx.adapter.attention_modules(model)
        self._rotary = check_rope_model(ctx, config, attention, "block_retrieval", "")
        self._num_layers = len(attention)
        self._eager = (config._attn_implementation or "eager") == "eager"
        self._landmark_token: int | None = None
        if self.scoring == "landmark":
            self._landmark_token = self._landmark_under(model)
        self._cache: BlockRetrievalCache | None = None
        self._plan: BlockPlan | None = None
        self._layout: dict[int, Any] = {}
        # outermost: with scoring='landmark' it takes over the landmark patch's attention
        ctx.add_attention_wrapper(self._attend, outermost=True)
        decoder = ctx.adapter.text_model(model)
        cache_name = cache_keyword(type(decoder).forward)
        params = list(inspect.signature(decoder.forward).parameters.values())

        def forward(call_next: Any, *args: Any, **kwargs: Any) -> Any:
            return self._forward(call_next, config, cache_name, params, *args, **kwargs)

        ctx.wrap_method(decoder, "forward", forward)
        if self.scoring == "landmark":
            # The landmark patch above makes its own cache when given none: give it ours.
            top_name = cache_keyword(type(model).forward)

            def top_forward(call_next: Any, *args: Any, **kwargs: Any) -> Any:
                given = [n for n in ("cache", "past_key_values") if kwargs.get(n) is not None]
                if not given:
                    if kwargs.get("use_cache", getattr(config, "use_cache", True)):
                        kwargs[top_name] = self.new_cache()
                elif not isinstance(kwargs[given[0]], BlockRetrievalCache) and not cache_length(
                    kwargs[given[0]]
                ):
                    kwargs[given[0]] = self.new_cache()  # generate()'s empty default cache
                return call_next(*args, **kwargs)

            ctx.wrap_method(model, "forward", top_forward, outermost=True)

    def _landmark_under(self, model: torch.nn.Module) -> int:
        from .landmark import LandmarkAttention

        under = [h.method for h in active_patches(model) if isinstance(h.method, LandmarkAttention)]
        if not under:
            raise PatchError(
                "block_retrieval(scoring='landmark') needs the landmark patch applied first "
                "(tokenlean.patch(model, 'landmark', ...)): it lays out the landmark tokens"
            )
        if under[0].block_size != self.block_size:
            raise PatchError(
                f"block_retrieval(scoring='landmark'): block_size={self.block_size}, but the landmark "
                f"patch uses {under[0].block_size}"
            )
        token = getattr(model.config, "landmark_token_id", None)
        if token is None:
            raise PatchError("block_retrieval(scoring='landmark'): the model has no landmark_token_id")
        return int(token)

    def new_cache(self) -> BlockRetrievalCache:
        """An empty cache with this patch's layout (what the patched model creates itself)."""
        return BlockRetrievalCache(
            self.sink_tokens, self.block_size, self.window, self.top_k, self._num_layers, offload=self.offload
        )

    # -- forward: the cache, chunks, positions -----------------------------------------------------
    def _forward(
        self, call_next: Any, config: Any, cache_name: str, params: list[Any], *args: Any, **kwargs: Any
    ) -> Any:
        kwargs = as_keywords(params, args, kwargs)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return call_next(**kwargs)  # let the model raise its own error
        if kwargs.get("output_attentions"):
            raise PatchError("block_retrieval does not return attention weights (output_attentions=True)")
        batch, length = ref.shape[:2]
        cache, use_cache = pop_cache(kwargs, config)
        if cache is not None and not isinstance(cache, BlockRetrievalCache):
            if cache_length(cache) > 0:
                raise PatchError(
                    f"block_retrieval: the {type(cache).__name__} passed holds tokens cached without the "
                    "patch; start from an empty cache (or none)"
                )
            cache = None
        if cache is None:
            cache = self.new_cache()  # also without use_cache: a long pass runs in chunks through it
        elif cache.settings != (self.sink_tokens, self.block_size, self.window, self.top_k):
            raise PatchError(
                f"block_retrieval: the cache was made for (sink_tokens, block_size, window, top_k) = "
                f"{cache.settings}, the patch has {(self.sink_tokens, self.block_size, self.window, self.top_k)}"
            )
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and (mask.dim() != 2 or not bool((mask != 0).all())):
            raise PatchError(
                "block_retrieval supports unpadded inputs only (one sequence, or equal lengths without "
                "padding); run padded rows one at a time"
            )
        if self._landmark_token is not None and ids is not None:
            self._check_landmark_grid(ids, cache.seen)
        for name in ("position_ids", "cache_position"):
            kwargs.pop(name, None)  # positions follow the layout (set per chunk below)
        kwargs["use_cache"] = True
        outs = []
        for start in range(0, length, self.chunk_size):
            stop = min(start + self.chunk_size, length)
            piece = token_slice(kwargs, start, stop)
            plan = cache.plan(stop - start, ref.device)
            piece["position_ids"] = plan.positions[None].expand(batch, -1)
            piece[cache_name] = cache
            cache._pending = plan
            self._cache, self._plan, self._layout = cache, plan, {}
            try:
                outs.append(call_next(**piece))
            finally:
                cache._pending = None
                self._cache, self._plan, self._layout = None, None, {}
            cache.commit(plan)
        return chunked_output(outs, cache, use_cache)

    def _check_landmark_grid(self, ids: torch.Tensor, seen: int) -> None:
        positions = torch.arange(seen, seen + ids.shape[1], device=ids.device)
        expected = (positions % self.block_size) == self.block_size - 1
        found = ids == self._landmark_token
        if bool((found != expected[None]).any()):
            raise PatchError(
                "block_retrieval(scoring='landmark'): the input's landmark tokens are not at the end of "
                f"every block of {self.block_size} (is the landmark patch applied with no padding?)"
            )

    # -- attention --------------------------------------------------------------------------------
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
        plan, cache = self._plan, self._cache
        if plan is None or cache is None:
            raise PatchError("block_retrieval: call the patched model's forward, not an attention layer")
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        if plan.passthrough:
            if self._landmark_token is None:
                return call_next(module, query, key, value, attention_mask, **kwargs)
            return self._grouped(query, key, value, scale)
        layer = cache.layers[module.layer_idx]
        context_keys, context_values = self._context(layer, plan, query, scale)
        key = torch.cat([context_keys, key], dim=2)
        value = torch.cat([context_values, value], dim=2)
        if self._landmark_token is not None:
            return self._grouped(query, key, value, scale)
        mask = self._mask(plan, query, key.shape[2])
        return call_next(module, query, key, value, mask, **kwargs)

    def _grouped(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, None]:
        from .landmark import grouped_softmax_attention

        slots = torch.arange(key.shape[2], device=key.device)
        is_landmark = (slots % self.block_size) == self.block_size - 1
        out = grouped_softmax_attention(query, key, value, is_landmark, scale=scale)
        return out.transpose(1, 2).contiguous(), None

    def _mask(self, plan: BlockPlan, query: torch.Tensor, keys: int) -> torch.Tensor | None:
        if plan.new == 1:
            return None
        key = ("mask", query.dtype, query.device)
        if key not in self._layout:
            rows = torch.arange(plan.new, device=query.device)[:, None]
            cols = torch.arange(keys, device=query.device)[None, :]
            allowed = (cols < plan.context) | (cols - plan.context <= rows)
            if self._eager:
                mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
            else:
                mask = allowed
            self._layout[key] = mask[None, None]
        return self._layout[key]

    def _context(
        self, layer: BlockRetrievalLayer, plan: BlockPlan, query: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values the chunk attends, rotated to their layout positions."""
        device = query.device
        stored_k, stored_v = layer.keys[:, :, : plan.past], layer.values[:, :, : plan.past]
        batch, heads = stored_k.shape[:2]
        blocks = self._retrieve(layer, plan, query, scale)  # (batch, kv_heads, top_k) block numbers
        offsets = torch.arange(self.block_size, device=device)
        retrieved = (self.sink_tokens + blocks[..., None] * self.block_size + offsets).flatten(2)
        sinks = torch.arange(plan.sinks, device=device)
        local = torch.arange(plan.local_start, plan.past, device=device)
        index = torch.cat(
            [sinks.expand(batch, heads, -1), retrieved, local.expand(batch, heads, -1)], dim=2
        )  # (batch, kv_heads, context): the stored slot of each layout slot
        store = stored_k.device
        gather = index.to(store)[..., None]
        keys = stored_k.gather(2, gather.expand(-1, -1, -1, stored_k.shape[-1])).to(device)
        values = stored_v.gather(2, gather.expand(-1, -1, -1, stored_v.shape[-1])).to(device)
        rotated_at = self._rotated_at(plan, device)
        delta = torch.arange(plan.context, device=device) - rotated_at[index]
        return rotate(keys, delta, self._rotary.inv_freq), values

    def _rotated_at(self, plan: BlockPlan, device: torch.device) -> torch.Tensor:
        key = ("rotated_at", device)
        if key not in self._layout:
            self._layout[key] = self._cache.rotated_at[: plan.past].to(device)
        return self._layout[key]

    def _retrieve(
        self, layer: BlockRetrievalLayer, plan: BlockPlan, query: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``(batch, kv_heads, top_k)`` the blocks the chunk's queries score highest, in text order."""
        reps = self._representatives(layer, plan, query.device)  # (batch, kv_heads, blocks, r, dim)
        batch, kv_heads = reps.shape[:2]
        group = query.shape[1] // kv_heads
        q = query.reshape(batch, kv_heads, group, query.shape[2], query.shape[3]).to(reps.dtype)
        scores = torch.einsum("bkgqd,bknrd->bkgqnr", q, reps).amax(-1) * scale
        weight = scores.float().softmax(dim=-1).sum(dim=(2, 3))  # (batch, kv_heads, blocks)
        return weight.topk(plan.retrieved, dim=-1).indices.sort(dim=-1).values

    def _representatives(
        self, layer: BlockRetrievalLayer, plan: BlockPlan, device: torch.device
    ) -> torch.Tensor:
        """Each complete block's representatives, computed once per block (keys before rotary encoding)."""
        done = 0 if layer.representatives is None else layer.representatives.shape[2]
        if done < plan.blocks:
            start = self.sink_tokens + done * self.block_size
            stop = self.sink_tokens + plan.blocks * self.block_size
            keys = layer.keys[:, :, start:stop].to(device)
            rotated_at = self._cache.rotated_at[start:stop].to(device)
            plain = rotate(keys, -rotated_at[None].expand(keys.shape[0], -1), self._rotary.inv_freq)
            batch, heads, _, dim = plain.shape
            plain = plain.reshape(batch, heads, plan.blocks - done, self.block_size, dim)
            if self._landmark_token is not None:
                new = plain[:, :, :, -1:]  # the landmark's key
            else:
                parts = self.representatives
                new = plain.reshape(
                    batch, heads, plan.blocks - done, parts, self.block_size // parts, dim
                ).mean(4)
            layer.representatives = (
                new if layer.representatives is None else torch.cat([layer.representatives, new], dim=2)
            )
        return layer.representatives[:, :, : plan.blocks]
