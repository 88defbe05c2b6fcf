"""The ``landmark`` patch: landmark attention on a Hugging Face causal LM, with landmarks inserted for you.

Usage::

    method = tokenlean.LandmarkAttention(block_size=64)
    method.prepare(model, tokenizer)        # adds "<landmark>" (its embedding row: the mean row)
    with tokenlean.patch(model, method):
        out = model(**tokenizer(text, return_tensors="pt"))   # logits for the text's own tokens
        ids = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=20)

While patched, the model's ``forward`` inserts a landmark after every ``block_size - 1`` tokens
of each row (counting across calls through the KV cache, so ``generate()`` inserts them as
decoding crosses block boundaries), runs every attention layer with the grouped softmax, and
returns logits for the caller's tokens only (landmarks stripped; the landmark token itself is
never predicted: its logit is the dtype's minimum). Rows of a batch may have different lengths
(padding in ``attention_mask``); their landmarks then sit at different slots, so positions are
computed per row. Input that already holds landmarks is accepted only in exactly the layout the
rule produces (:func:`insert_landmarks`), and is then passed through as it is.

The attention uses the fused Triton kernel for full-sequence passes on CUDA (one regular layout,
no padding: training and single-prompt prefill) and :func:`grouped_softmax_attention` otherwise;
the first fallback of a full-sequence pass logs one warning with the reason.

Removal restores the model bitwise. :meth:`LandmarkAttention.prepare` is the exception it
documents: the landmark token's new embedding row (and the vocabulary size) stay.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tokenlean.errors import PatchError
from tokenlean.methods import Method, param, register_method
from tokenlean.patching import PatchContext, cache_keyword

from .._rope import cache_length
from .kernel import fused_landmark_attention, kernel_unsupported_reason
from .reference import grouped_softmax_attention, grouped_softmax_weights, on_block_grid

__all__ = ["LANDMARK_TOKEN", "LandmarkAttention", "insert_landmarks", "landmark_id", "strip_landmarks"]

logger = logging.getLogger(__name__)

LANDMARK_TOKEN = "<landmark>"
_STATE = "_tokenlean_landmark"


def landmark_id(model: torch.nn.Module) -> int | None:
    """The landmark token id :meth:`LandmarkAttention.prepare` gave ``model`` (``None`` if not prepared)."""
    from tokenlean.attention.prepending import method as prepending

    found = prepending.placeholder_id(model, LANDMARK_TOKEN)
    if found is None:
        found = getattr(model.config, "landmark_token_id", None)
    return None if found is None else int(found)


def insert_landmarks(
    input_ids: torch.Tensor,
    landmark: int,
    block_size: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Insert ``landmark`` after every ``block_size - 1`` real tokens of each row.

    Returns ``(ids, mask, index)``: the new ``(batch, slots)`` ids and attention mask (rows are
    right-padded with ``mask = 0`` to equal length; the caller's own padding stays where it was),
    and ``index`` ``(batch, seq)``, the slot of each input token, for :func:`strip_landmarks`.
    """
    layout = _Layout.start(input_ids.shape[0], block_size)
    rows = layout.extend(input_ids.tolist(), _mask_rows(attention_mask, input_ids), landmark)
    return _tensors(rows, input_ids.device)[:3]


def strip_landmarks(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``outputs[b, index[b, t]]``: per-slot outputs (logits, hidden states) back at the input tokens."""
    gather = index.to(outputs.device)
    gather = gather.view(*gather.shape, *([1] * (outputs.dim() - 2))).expand(
        *gather.shape, *outputs.shape[2:]
    )
    return outputs.gather(1, gather)


def _mask_rows(mask: torch.Tensor | None, ids: torch.Tensor) -> list[list[int]]:
    if mask is None:
        return [[1] * ids.shape[1] for _ in range(ids.shape[0])]
    if mask.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"landmark attention needs a 2-D attention_mask of the input's shape {tuple(ids.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return [[int(x != 0) for x in row] for row in mask.tolist()]


@dataclass
class _Row:
    ids: list[int]
    real: list[bool]
    is_lm: list[bool]
    positions: list[int]
    index: list[int]  # slot (within this chunk) of each input token


class _Layout:
    """Per-row block bookkeeping across calls: real tokens in the open block, next position."""

    def __init__(self, count: list[int], next_pos: list[int], block_size: int) -> None:
        self.count = count
        self.next_pos = next_pos
        self.block_size = block_size

    @classmethod
    def start(cls, batch: int, block_size: int) -> _Layout:
        return cls([0] * batch, [0] * batch, block_size)

    def extend(self, ids: list[list[int]], mask: list[list[int]], landmark: int) -> list[_Row]:
        """Lay out one chunk of input per row (inserting landmarks), advancing the counters."""
        rows = []
        for b, (row_ids, row_mask) in enumerate(zip(ids, mask)):
            out = _Row([], [], [], [], [])
            for token, m in zip(row_ids, row_mask):
                out.index.append(len(out.ids))
                if not m:  # the caller's padding: a masked slot, no position
                    out.ids.append(token)
                    out.real.append(False)
                    out.is_lm.append(False)
                    out.positions.append(1)
                    continue
                out.ids.append(token)
                out.real.append(True)
                out.is_lm.append(False)
                out.positions.append(self.next_pos[b])
                self.next_pos[b] += 1
                self.count[b] += 1
                if self.count[b] == self.block_size - 1:
                    out.ids.append(landmark)
                    out.real.append(True)
                    out.is_lm.append(True)
                    out.positions.append(self.next_pos[b])
                    self.next_pos[b] += 1
                    self.count[b] = 0
            rows.append(out)
        return rows


def _tensors(rows: list[_Row], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """ids, mask, index, positions, is_landmark of a chunk: rows right-padded with masked slots."""
    width = max(len(r.ids) for r in rows)
    ids, mask, index, pos, lm = [], [], [], [], []
    for r in rows:
        extra = width - len(r.ids)
        ids.append(r.ids + [pad_id] * extra)
        mask.append([int(x) for x in r.real] + [0] * extra)
        index.append(r.index)
        pos.append(r.positions + [1] * extra)
        lm.append(r.is_lm + [False] * extra)
    as_long = {"dtype": torch.long, "device": device}
    return (
        torch.tensor(ids, **as_long),
        torch.tensor(mask, **as_long),
        torch.tensor(index, **as_long),
        torch.tensor(pos, **as_long),
        torch.tensor(lm, dtype=torch.bool, device=device),
    )


@dataclass
class _CacheState:
    """What the attention needs about every slot of a KV cache (kept on the cache object)."""

    layout: _Layout
    real: torch.Tensor  # (batch, slots) bool
    is_lm: torch.Tensor  # (batch, slots) bool
    regular: bool  # no padding, landmarks exactly at slot % block_size == block_size - 1


@register_method("landmark")
@dataclass
class LandmarkAttention(Method):
    """Landmark attention: a landmark token per block gates the block (grouped softmax)."""

    block_size: int = param(
        64, "tokens per block, its landmark included (a landmark after every block_size - 1)"
    )
    kernel: Literal["auto", "triton", "reference"] = param(
        "auto", "auto: the fused Triton kernel for full-sequence passes on CUDA, the reference elsewhere"
    )
    delta: str | None = param(
        None,
        "trained landmark weights applied while patched: a zoo name (smollm2-135m-landmark) or a "
        "train-landmark delta folder; none: the untrained mean-row landmark",
    )

    landmarks: bool = param(
        True,
        "false: apply only the delta's LoRA terms and leave attention as it is (an ablation separating "
        "what the fine-tune does to the text from what the landmarks cost)",
    )

    def validate(self) -> None:
        if self.block_size < 2:
            self._fail("block_size", self.block_size, ">= 2 (a block needs a token besides its landmark)")
        if not self.landmarks and self.delta is None:
            self._fail(
                "landmarks", self.landmarks, "true unless a delta is given (else the patch does nothing)"
            )

    # -- tokenizer side ---------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Add ``<landmark>`` to ``tokenizer`` and give it an embedding row (the mean row) in ``model``.

        Idempotent; a tokenizer that already has the token (a model trained with landmarks)
        keeps its id. The new row and the larger vocabulary stay after the patch is removed;
        every other token's outputs are unchanged.
        """
        from tokenlean.attention.prepending import prepare_placeholder

        try:
            token = prepare_placeholder(model, tokenizer, LANDMARK_TOKEN)
        except (ValueError, TypeError, AttributeError) as exc:
            raise PatchError(f"cannot add the {LANDMARK_TOKEN} token to this tokenizer: {exc}") from exc
        model.config.landmark_token_id = token

    # -- install ----------------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        model = ctx.model
        token = landmark_id(model)
        if token is None:
            raise PatchError(
                "landmark attention needs the landmark token: call "
                "LandmarkAttention().prepare(model, tokenizer) before patching"
            )
        config = ctx.adapter.text_config(model)
        if getattr(config, "sliding_window", None) and any(
            getattr(m, "sliding_window", None) for m in ctx.adapter.attention_modules(model)
        ):
            raise PatchError(
                "landmark attention does not support models with sliding-window attention layers"
            )
        if getattr(config, "attn_logit_softcapping", None):
            raise PatchError("landmark attention does not support attention logit soft-capping")
        if self.delta is not None:
            self._install_delta(ctx, token)
        if not self.landmarks:
            return
        self._token = token
        self._current: _CacheState | None = None
        self._warned = False
        self._gate_recorder: list[torch.Tensor] | None = None  # set by landmark_retrieval_accuracy
        self._gate_query: int | None = None  # the slot whose gates it records (None: the last query)
        ctx.add_attention_wrapper(self._attend)

        def forward(call_next: Any, *args: Any, **kwargs: Any) -> Any:
            return self._forward(call_next, config, *args, **kwargs)

        ctx.wrap_method(model, "forward", forward)

    def _install_delta(self, ctx: PatchContext, token: int) -> None:
        """LoRA terms as forward hooks and the trained landmark row, both undone on removal."""
        from tokenlean.landmark_train import load_landmark_delta

        meta, tensors = load_landmark_delta(self.delta)
        if int(meta["block_size"]) != self.block_size:
            raise PatchError(
                f"the landmark delta {self.delta!r} was trained with block_size={meta['block_size']}, "
                f"not {self.block_size}"
            )
        model = ctx.model
        modules = dict(model.named_modules())
        scale = float(meta["scale"])
        for name in meta["projections"]:
            module = modules.get(name)
            key = name.replace(".", "__")
            a, b = tensors[f"a.{key}"], tensors[f"b.{key}"]
            if (
                not isinstance(module, torch.nn.Linear)
                or a.shape[1] != module.in_features
                or b.shape[0] != module.out_features
            ):
                raise PatchError(
                    f"the landmark delta {self.delta!r} (for {meta.get('base_model')!r}) does not fit this model: "
                    f"no {name} of shape ({b.shape[0]}, {a.shape[1]})"
                )
            weight = module.weight
            low = (b.float() * scale).to(device=weight.device, dtype=weight.dtype)
            high = a.to(device=weight.device, dtype=weight.dtype)

            def hook(mod: Any, inputs: Any, output: torch.Tensor, low=low, high=high) -> torch.Tensor:
                return output + (inputs[0] @ high.t()) @ low.t()

            ctx.add_forward_hook(module, hook, with_kwargs=False)
        rows = model.get_input_embeddings().weight
        saved = rows[token].detach().clone()
        with torch.no_grad():
            rows[token] = tensors["landmark_vector"].to(device=rows.device, dtype=rows.dtype)

        def restore() -> None:
            with torch.no_grad():
                rows[token] = saved

        ctx.on_remove(restore)

    # -- forward: lay out the landmarks, run, strip -------------------------------------------------
    def _forward(self, call_next: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            if len(args) > 1:
                raise TypeError("landmark attention: pass the model's inputs as keywords (besides input_ids)")
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError(
                "landmark attention needs input_ids (it inserts landmark tokens); inputs_embeds is not supported"
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("landmark attention: pass input_ids, not inputs_embeds")
        for name in ("cache_position", "position_ids"):  # recomputed from the layout below
            kwargs.pop(name, None)
        user_mask = kwargs.pop("attention_mask", None)
        labels = kwargs.pop("labels", None)
        # transformers renamed past_key_values to cache (5.2x); accept both, answer in the caller's name
        cache_kw = "cache" if kwargs.get("cache") is not None else "past_key_values"
        if kwargs.get(cache_kw) is None and "past_key_values" not in kwargs:
            cache_kw = cache_keyword(call_next)
        cache = kwargs.get(cache_kw)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(config, "use_cache", True))
        keep = kwargs.pop("logits_to_keep", 0)
        batch, seq = input_ids.shape
        state: _CacheState | None = getattr(cache, _STATE, None) if cache is not None else None
        if cache is not None and state is None and cache_length(cache) > 0:
            raise ValueError(
                "landmark attention: this KV cache was filled without the landmark patch; start from an empty cache"
            )
        if state is not None and state.real.shape[0] != batch:
            raise ValueError(
                f"landmark attention: the cache holds {state.real.shape[0]} rows, the input {batch}"
            )
        if user_mask is not None and user_mask.dim() == 2 and state is not None:
            user_mask = user_mask[:, -seq:]  # generate() passes the mask of the whole sequence so far
        mask_rows = _mask_rows(user_mask, input_ids)

        layout = state.layout if state is not None else _Layout.start(batch, self.block_size)
        ids_rows = input_ids.tolist()
        preinserted = self._check_preinserted(ids_rows, mask_rows, layout)
        if preinserted:
            rows = self._rows_as_given(ids_rows, mask_rows, layout)
        else:
            rows = layout.extend(ids_rows, mask_rows, self._token)
        ids, mask, index, positions, is_lm = _tensors(rows, input_ids.device)
        real = mask.bool()
        past_slots = 0 if state is None else state.real.shape[1]
        if state is None:
            all_real, all_lm = real, is_lm
            regular = bool(real.all()) and on_block_grid(is_lm, self.block_size)
        else:
            all_real = torch.cat([state.real, real], dim=1)
            all_lm = torch.cat([state.is_lm, is_lm], dim=1)
            regular = False  # decoding / chunks: the kernel is for full-sequence passes
        new_state = _CacheState(layout, all_real, all_lm, regular)
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=config)
            kwargs[cache_kw] = cache
        kwargs["cache_position"] = torch.arange(past_slots, past_slots + ids.shape[1], device=ids.device)
        if isinstance(keep, int) and keep > 0:
            # only the slots of the last `keep` input tokens of each row reach the LM head
            index = index[:, -keep:].contiguous()
            needed = torch.unique(index)
            kwargs["logits_to_keep"] = needed
            index = torch.searchsorted(needed, index)
        elif not (isinstance(keep, int) and keep == 0):
            raise ValueError(
                "landmark attention: logits_to_keep must be an int (slots shift when landmarks are inserted)"
            )
        self._current = new_state
        try:
            out = call_next(
                input_ids=ids,
                attention_mask=all_real.long(),
                position_ids=positions,
                **kwargs,
            )
        finally:
            self._current = None
        if use_cache and cache is not None:
            setattr(cache, _STATE, new_state)
        logits = strip_landmarks(out.logits, index)
        logits[..., self._token] = torch.finfo(logits.dtype).min
        out.logits = logits
        if labels is not None:
            from torch.nn import functional as F

            shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            target = labels[:, 1:].to(logits.device).reshape(-1)
            out.loss = F.cross_entropy(shift, target, ignore_index=-100)
        return out

    def _check_preinserted(self, ids: list[list[int]], mask: list[list[int]], layout: _Layout) -> bool:
        """True when the input already carries landmarks exactly where the rule puts them; error otherwise."""
        if not any(self._token in row for row in ids):
            return False
        probe = _Layout(list(layout.count), list(layout.next_pos), self.block_size)
        stripped = [[t for t in row if t != self._token] for row in ids]
        stripped_mask = [[m for t, m in zip(row, mrow) if t != self._token] for row, mrow in zip(ids, mask)]
        expected = probe.extend(stripped, stripped_mask, self._token)
        if [r.ids for r in expected] != ids:
            raise ValueError(
                f"the input holds {LANDMARK_TOKEN} tokens that are not where landmark attention puts them "
                f"(after every {self.block_size - 1} real tokens); remove them, or lay them out with insert_landmarks()"
            )
        return True

    def _rows_as_given(self, ids: list[list[int]], mask: list[list[int]], layout: _Layout) -> list[_Row]:
        rows = []
        for b, (row_ids, row_mask) in enumerate(zip(ids, mask)):
            out = _Row([], [], [], [], [])
            for token, m in zip(row_ids, row_mask):
                out.index.append(len(out.ids))
                out.ids.append(token)
                out.real.append(bool(m))
                out.is_lm.append(bool(m) and token == self._token)
                out.positions.append(layout.next_pos[b] if m else 1)
                if m:
                    layout.next_pos[b] += 1
                    layout.count[b] = 0 if token == self._token else layout.count[b] + 1
            rows.append(out)
        return rows

    # -- attention ----------------------------------------------------------------------------------
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
    ) -> tuple[torch.Tensor, None]:
        state = self._current
        if state is None:
            raise PatchError(
                "landmark attention: call the patched model's forward (not a submodule directly)"
            )
        slots = key.shape[2]
        if state.real.shape[1] != slots:
            raise PatchError(
                f"landmark attention: the layer sees {slots} keys but the layout has {state.real.shape[1]} slots "
                "(a cache that drops entries is not supported)"
            )
        scale = kwargs.get("scaling")
        full = query.shape[2] == slots
        out = None
        if full and self.kernel != "reference":
            reason = "the layout has padding or landmarks off the block grid" if not state.regular else None
            if reason is None and self.kernel == "auto" and query.device.type != "cuda":
                reason = f"the kernel is used on CUDA devices, not {query.device.type}"
            if reason is None:
                reason = kernel_unsupported_reason(query, key, value, self.block_size)
            if reason is None:
                out = fused_landmark_attention(query, key, value, self.block_size, scale)
            elif self.kernel == "triton":
                raise PatchError(f"landmark attention: kernel='triton' but {reason}")
            elif not self._warned:
                self._warned = True
                warnings.warn(
                    f"landmark attention: using the PyTorch reference, not the fused kernel ({reason})",
                    stacklevel=2,
                )
        if out is None:
            key_mask = None if bool(state.real.all()) else state.real
            out = grouped_softmax_attention(
                query, key, value, state.is_lm.to(query.device), scale=scale, key_mask=key_mask
            )
        if self._gate_recorder is not None:  # one query's landmark gates, (batch, heads, 1, slots it sees)
            # the keys it sees end at its own slot (the reference takes its queries to be the last ones)
            first = key.shape[2] - query.shape[2]  # the slot of this pass's first query
            row = query.shape[2] - 1 if self._gate_query is None else self._gate_query - first
            if not 0 <= row < query.shape[2]:
                raise PatchError(
                    f"landmark gate recorder: slot {self._gate_query} is not among this pass's queries "
                    f"(slots {first}..{key.shape[2] - 1})"
                )
            seen = first + row + 1
            key_mask = None if bool(state.real[:, :seen].all()) else state.real[:, :seen]
            self._gate_recorder.append(
                grouped_softmax_weights(
                    query[:, :, row : row + 1],
                    key[:, :, :seen],
                    state.is_lm[..., :seen],
                    scale=scale,
                    key_mask=key_mask,
                )[1]
            )
        return out.transpose(1, 2).contiguous(), None
