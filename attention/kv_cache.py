"""A transformers ``Cache`` that evicts: attention sinks + a recent window (StreamingLLM).

:class:`SinkWindowCache` keeps, for every row of the batch, the first ``sink_tokens`` *real*
tokens (the sinks; left padding does not count) and the ``window`` most recent ones; every
other entry is dropped after each forward pass, so its key/value tensors never hold more than
``sink_tokens + window`` slots per layer, however long ``generate()`` runs.

The cache only stores and selects. What the slots *mean* — which real token each one holds,
and at which rotary position its stored key was rotated — is kept here as :class:`SlotInfo`
(one ``(batch, slots)`` tensor per field, shared by every layer), and the
``sink_window`` patch (:mod:`tokenlean.attention.sink_window`) uses it to build the attention
mask and to re-rotate keys to their in-cache positions. A forward pass goes:

1. the patch calls :meth:`SinkWindowCache.plan` with the new tokens' padding mask: it returns
   the :class:`StepPlan` (the slots every layer will see, the new tokens' positions, which slots
   stay);
2. each layer's :meth:`SinkWindowLayer.update` returns the old slots followed by the new ones
   (what the attention needs, a long prefill included) and stores only the slots that stay;
3. the patch calls :meth:`SinkWindowCache.commit` with the plan.

``get_seq_length()`` reports the slots *seen* (as ``DynamicSlidingWindowLayer`` does): it is
what ``generate()`` uses to slice its inputs. ``get_mask_sizes()`` returns the kept length and
an offset that keeps transformers' own mask construction in range; once anything has been
evicted that mask is not used (the patch builds its own, the kept slots not being one
contiguous range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["SinkWindowCache", "SinkWindowLayer", "SlotInfo", "StepPlan", "plan_step"]


@dataclass
class SlotInfo:
    """What every key slot holds, per row. All fields are ``(batch, slots)``.

    Attributes
    ----------
    valid
        bool: the slot holds a real token (``False`` for padding and for filler slots that only
        keep the rows of the batch at equal length).
    index
        long: the token's index among its row's real tokens (0 = first real token); -1 where not
        valid.
    shift
        long: the rotary position the stored key was rotated at, minus ``index``.
    """

    valid: torch.Tensor
    index: torch.Tensor
    shift: torch.Tensor

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> SlotInfo:
        long = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(torch.zeros(batch, 0, dtype=torch.bool, device=device), long, long.clone())

    def take(self, slots: torch.Tensor) -> SlotInfo:
        """The slots ``slots`` ``(batch, n)`` of each row, in that order."""
        return SlotInfo(*(t.gather(1, slots) for t in (self.valid, self.index, self.shift)))

    def rows(self, rows: torch.Tensor) -> SlotInfo:
        """The rows ``rows`` (a 1-D index tensor) of the batch."""
        return SlotInfo(*(t.index_select(0, rows.to(t.device)) for t in (self.valid, self.index, self.shift)))


@dataclass
class StepPlan:
    """One forward pass through the sinks + window rule (built by :func:`plan_step`).

    Attributes
    ----------
    slots
        Every slot the attention layers see in this pass: the cached slots, then the new tokens.
    new_tokens
        Number of new tokens (the queries): the last ``new_tokens`` of ``slots``.
    offset
        ``(batch,)`` long: position minus real-token index of this pass's tokens (0 until a row
        has evicted something; StreamingLLM's rule shifts positions down as tokens are evicted).
    positions
        ``(batch, new_tokens)`` long: the rotary positions of the new tokens (in-cache positions;
        0 for padding).
    keep
        ``(batch, kept)`` indices into ``slots`` of what is stored after the pass, in order, or
        ``None`` when every slot stays.
    kept_valid
        ``(batch, kept)`` bool: which kept slots hold a real token (``None`` with ``keep``).
    real_tokens
        ``(batch,)`` long: real tokens seen per row after the pass.
    passthrough
        ``True`` while nothing has ever been evicted (before or in this pass): the model's own
        mask and default positions are then exact, and the patch leaves the pass untouched.
    """

    slots: SlotInfo
    new_tokens: int
    offset: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor | None
    kept_valid: torch.Tensor | None
    real_tokens: torch.Tensor
    passthrough: bool


def plan_step(
    sink_tokens: int,
    window: int,
    new_valid: torch.Tensor,
    cached: SlotInfo | None = None,
    real_tokens: torch.Tensor | None = None,
    contiguous: bool = True,
) -> StepPlan:
    """Plan one forward pass: which slots the layers see, the positions, what stays.

    Parameters
    ----------
    sink_tokens, window
        The rule: a row keeps its first ``sink_tokens`` real tokens and its ``window`` most
        recent ones.
    new_valid
        ``(batch, new_tokens)`` bool: which new tokens are real (``False``: padding).
    cached
        The slots already cached (``None``: an empty cache, or no cache at all).
    real_tokens
        ``(batch,)`` long: real tokens seen per row before this pass (``None``: zeros).
    contiguous
        Whether the cache still holds every slot it was given (nothing evicted yet).
    """
    batch, new_tokens = new_valid.shape
    device = new_valid.device
    if cached is None:
        cached = SlotInfo.empty(batch, device)
    if real_tokens is None:
        real_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    new_index = real_tokens[:, None] + new_valid.long().cumsum(1) - 1
    new_index = torch.where(new_valid, new_index, -1)
    real_after = real_tokens + new_valid.long().sum(1)
    valid = torch.cat([cached.valid, new_valid], dim=1)
    index = torch.cat([cached.index, new_index], dim=1)
    stays = valid & ((index < sink_tokens) | (index >= (real_after - window)[:, None]))
    # StreamingLLM's rule: positions count the cached tokens, so a row's new tokens start right
    # after the old tokens that stay (evicted ones shift the rest down).
    offset = stays[:, : cached.length].long().sum(1) - real_tokens
    positions = torch.where(new_valid, new_index + offset[:, None], 0)
    shift = torch.cat([cached.shift, offset[:, None].expand(batch, new_tokens)], dim=1)
    slots = SlotInfo(valid, index, shift)

    total = slots.length
    kept = int(stays.long().sum(1).max()) if batch else 0
    keep = kept_valid = None
    if kept < total:  # rows keep `kept` slots: theirs first, then (masked) fillers, in slot order
        order = torch.arange(total, device=device)
        priority = stays.long() * (total + 1) + order
        keep = priority.topk(kept, dim=1).indices.sort(dim=1).values
        kept_valid = stays.gather(1, keep)
    return StepPlan(
        slots=slots,
        new_tokens=new_tokens,
        offset=offset,
        positions=positions,
        keep=keep,
        kept_valid=kept_valid,
        real_tokens=real_after,
        passthrough=contiguous and keep is None,
    )


class SinkWindowLayer(CacheLayerMixin):
    """One layer of a :class:`SinkWindowCache`: ``(batch, kv_heads, slots, head_dim)`` keys and values.

    It follows the plan its cache holds for the current forward pass; used outside the
    ``sink_window`` patch it raises.
    """

    is_sliding = False

    def __init__(self, owner: SinkWindowCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the cached slots followed by the new ones; store only the slots the plan keeps."""
        plan = self._owner._pending
        if plan is None:
            raise RuntimeError(
                "a SinkWindowCache is filled through the sink_window patch: call the patched model "
                "(tokenlean.patch(model, 'sink_window')), not a bare layer"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if keys.shape[-2] != plan.slots.length:
            raise RuntimeError(
                f"SinkWindowCache layer holds {keys.shape[-2]} slots after the update, "
                f"but the plan has {plan.slots.length} (was a forward pass interrupted?)"
            )
        if plan.keep is None:
            self.keys, self.values = keys, values
        else:
            index = plan.keep.to(keys.device)[:, None, :, None]
            self.keys = keys.gather(2, index.expand(*keys.shape[:2], -1, keys.shape[-1]))
            self.values = values.gather(2, index.expand(*values.shape[:2], -1, values.shape[-1]))
        return keys, values

    def get_seq_length(self) -> int:
        """Slots seen so far (padding included), not slots kept: it drives default position ids."""
        return self._owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)``: kept slots plus the query; the offset keeps masks in range."""
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, max(self._owner.seen - kept, 0)

    def get_max_length(self) -> int:
        return self._owner.sink_tokens + self._owner.window

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a SinkWindowCache cannot be cropped (evicted entries are gone); use the sink_window "
            "patch with mode='mask' where a cache must be rolled back"
        )


class SinkWindowCache(Cache):
    """KV cache keeping each row's first ``sink_tokens`` real tokens and its last ``window`` tokens.

    Parameters
    ----------
    sink_tokens, window
        The eviction rule (the ``sink_window`` patch's parameters).
    num_layers
        Number of attention layers of the model.

    Notes
    -----
    Installed by the ``sink_window`` patch (``mode="evict"``): the patched model creates one
    whenever a forward pass with ``use_cache`` gets no cache (``generate()`` included), and
    accepts one passed as ``cache=`` / ``past_key_values=``. Not croppable; beam search and
    ``num_return_sequences`` work (rows are reordered or repeated with their slot records).
    ``evicts`` tells callers that need to roll a cache back (the harness's BBH scorer and facts
    reader) to keep a copy instead of cropping.
    """

    evicts = True  # entries leave for good: roll back from a copy, not with crop()

    def __init__(self, sink_tokens: int, window: int, num_layers: int) -> None:
        if sink_tokens < 0 or window < 1 or num_layers < 1:
            raise ValueError(
                f"SinkWindowCache needs sink_tokens >= 0, window >= 1 and num_layers >= 1, "
                f"got {sink_tokens}, {window}, {num_layers}"
            )
        super().__init__(layers=[SinkWindowLayer(self) for _ in range(num_layers)])
        self.sink_tokens = sink_tokens
        self.window = window
        self._clear()

    def _clear(self) -> None:
        self.seen = 0  # slots given to the cache so far, padding included
        self.real_tokens: torch.Tensor | None = None  # (batch,) real tokens seen per row
        self.slots: SlotInfo | None = None  # what the kept slots hold
        self.contiguous = True  # nothing evicted yet: the kept slots are every slot seen
        self._pending: StepPlan | None = None

    @property
    def batch_size(self) -> int:
        return -1 if self.slots is None else self.slots.valid.shape[0]

    def kept_length(self) -> int:
        """Slots held per layer (at most ``sink_tokens + window``)."""
        return 0 if self.slots is None else self.slots.length

    def plan(self, new_valid: torch.Tensor) -> StepPlan:
        """Plan a forward pass of ``new_valid.shape[1]`` tokens (``new_valid``: real, not padding)."""
        if self.slots is not None and self.slots.valid.shape[0] != new_valid.shape[0]:
            raise ValueError(
                f"the SinkWindowCache holds {self.slots.valid.shape[0]} rows, the input has {new_valid.shape[0]}"
            )
        slots = self.slots
        real = self.real_tokens
        if slots is not None and slots.valid.device != new_valid.device:
            slots = SlotInfo(*(t.to(new_valid.device) for t in (slots.valid, slots.index, slots.shift)))
            real = real.to(new_valid.device)
        return plan_step(self.sink_tokens, self.window, new_valid, slots, real, self.contiguous)

    def commit(self, plan: StepPlan) -> None:
        """Record what the layers stored in the forward pass ``plan`` was made for."""
        self.seen += plan.new_tokens
        self.real_tokens = plan.real_tokens
        if plan.keep is None:
            self.slots = plan.slots
        else:
            kept = plan.slots.take(plan.keep)
            self.slots = SlotInfo(plan.kept_valid, torch.where(plan.kept_valid, kept.index, -1), kept.shift)
            self.contiguous = False

    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    def _rows(self, rows: torch.Tensor) -> None:
        if self.slots is not None:
            self.slots = self.slots.rows(rows)
            self.real_tokens = self.real_tokens.index_select(0, rows.to(self.real_tokens.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
                layer.values = layer.values.repeat_interleave(repeats, dim=0)
        if self.slots is not None:
            rows = torch.arange(self.slots.valid.shape[0]).repeat_interleave(repeats)
            self._rows(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[indices, ...]
                layer.values = layer.values[indices, ...]
        if self.slots is not None:
            rows = torch.arange(self.slots.valid.shape[0])[indices.cpu()]
            self._rows(rows.reshape(-1))
