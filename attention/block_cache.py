"""A transformers ``Cache`` kept in blocks, from which each query chunk retrieves a few (InfLLM, landmark).

:class:`BlockRetrievalCache` stores every key and value it is given (in a buffer that grows by a
quarter at a time, so appending is amortised O(1) and at most a quarter is spare; optionally in CPU memory while the model runs on a
GPU), and lays the stored tokens out in three regions:

* the **sinks**: the first ``sink_tokens`` tokens, always attended;
* the **blocks**: the tokens after the sinks, in blocks of ``block_size``, once they have left the
  local window; only ``top_k`` of them (per key/value head, chosen by the ``block_retrieval``
  patch from the query chunk) are attended;
* the **local window**: the most recent ``window`` to ``window + block_size - 1`` tokens,
  always attended.

What a forward pass sees is planned here (:meth:`BlockRetrievalCache.plan`, one
:class:`BlockPlan` per pass, shared by every layer) and computed by the patch
(:mod:`tokenlean.attention.block_retrieval`). While the stored blocks number at most
``top_k`` nothing needs choosing: the pass is plain causal attention over everything stored, at
the text's positions (``BlockPlan.passthrough``). Past that, the attended keys are laid out
``[sinks][retrieved blocks, in text order][local window][the pass's own tokens]`` and take the
positions ``0, 1, 2, ...`` of that layout (the landmark paper's and InfLLM's "retrieved blocks
sit before the local window"); keys are stored as they arrive (rotated at the position they
were computed at, recorded per slot in ``rotated_at``) and rotated once, when attended, by the
difference to their layout position, so rounding never accumulates.

``get_seq_length()`` reports every token seen (it drives ``generate()``'s input slicing);
``get_mask_sizes()`` the layout's length while retrieving (the patch builds the mask itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["BlockPlan", "BlockRetrievalCache", "BlockRetrievalLayer", "host_memory_available"]


@dataclass(frozen=True)
class BlockPlan:
    """One forward pass through a :class:`BlockRetrievalCache`.

    Attributes
    ----------
    past
        Tokens stored before the pass.
    new
        Tokens of the pass (the queries).
    sinks
        Sink tokens stored (``min(sink_tokens, past)``).
    blocks
        Complete blocks stored between the sinks and the local window.
    local_start
        First stored token of the local window (``sink_tokens + blocks * block_size`` once
        there are blocks).
    retrieved
        Blocks attended per key/value head: ``top_k`` while retrieving, else every block.
    passthrough
        ``True`` when nothing needs choosing (``blocks <= top_k``): plain causal attention over
        everything stored, at the text's positions.
    context
        Stored tokens the pass attends (the layout before its own tokens).
    positions
        ``(new,)`` long: the rotary positions of the pass's tokens (``context, context + 1, ...``).
    """

    past: int
    new: int
    sinks: int
    blocks: int
    local_start: int
    retrieved: int
    passthrough: bool
    context: int
    positions: torch.Tensor


def host_memory_available() -> int | None:
    """Bytes of host memory available (``MemAvailable`` of ``/proc/meminfo``), ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class BlockRetrievalLayer(CacheLayerMixin):
    """One layer of a :class:`BlockRetrievalCache`: every key/value stored, plus block representatives.

    ``keys`` / ``values`` are views of the stored part of the layer's buffers,
    ``(batch, kv_heads, stored, head_dim)``. ``representatives`` holds, per complete block, the
    vectors a query chunk is scored against (filled by the patch as blocks appear).
    """

    is_sliding = False

    def __init__(self, owner: BlockRetrievalCache) -> None:
        super().__init__()
        self._owner = owner
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.stored = 0
        self.representatives: torch.Tensor | None = None  # (batch, kv_heads, blocks, r, head_dim)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        store = self._owner.store_device(key_states.device)
        batch, heads, _, dim = key_states.shape
        capacity = max(self._owner.initial_capacity, key_states.shape[-2])
        self._key_buffer = key_states.new_empty(batch, heads, capacity, dim, device=store)
        self._value_buffer = value_states.new_empty(
            batch, heads, capacity, value_states.shape[-1], device=store
        )
        self.stored = 0
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.stored]
        self.values = self._value_buffer[:, :, : self.stored]

    def _grow(self, needed: int) -> None:
        capacity = self._key_buffer.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, capacity + max(capacity // 4, 1024))  # amortised O(1), <= 25% spare
        extra = new_capacity - capacity
        row_bytes = (self._key_buffer[:, :, :1].numel() + self._value_buffer[:, :, :1].numel()) * (
            self._key_buffer.element_size()
        )
        self._owner.check_host_memory(extra * row_bytes, self._key_buffer.device)
        pad_k = self._key_buffer.new_empty(*self._key_buffer.shape[:2], extra, self._key_buffer.shape[-1])
        pad_v = self._value_buffer.new_empty(
            *self._value_buffer.shape[:2], extra, self._value_buffer.shape[-1]
        )
        self._key_buffer = torch.cat([self._key_buffer, pad_k], dim=2)
        self._value_buffer = torch.cat([self._value_buffer, pad_v], dim=2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the pass's keys and values; return everything stored (passthrough) or the pass's own."""
        plan = self._owner._pending
        if plan is None:
            raise RuntimeError(
                "a BlockRetrievalCache is filled through the block_retrieval patch: call the patched "
                "model (tokenlean.patch(model, 'block_retrieval')), not a bare layer"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.stored != plan.past:
            raise RuntimeError(
                f"BlockRetrievalCache layer holds {self.stored} tokens, the plan expects {plan.past} "
                "(was a forward pass interrupted?)"
            )
        new = key_states.shape[-2]
        self._grow(self.stored + new)
        store = self._key_buffer.device
        self._key_buffer[:, :, self.stored : self.stored + new] = key_states.to(store, non_blocking=True)
        self._value_buffer[:, :, self.stored : self.stored + new] = value_states.to(store, non_blocking=True)
        self.stored += new
        self._views()
        if plan.passthrough:
            return self.keys.to(key_states.device), self.values.to(value_states.device)
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Tokens seen (every one is stored): it drives default position ids and input slicing."""
        return self._owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the model's own mask: everything (passthrough) or the layout."""
        plan = self._owner._pending
        seen = self._owner.seen
        if plan is None or plan.passthrough:
            return seen + query_length, 0
        return plan.context + query_length, seen - plan.context

    def get_max_length(self) -> int:
        return -1  # grows with the text; what is attended stays bounded

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self.representatives = None
        self.stored = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_rows(beam_idx)

    def _select_rows(self, rows: torch.Tensor) -> None:
        self._key_buffer = self._key_buffer.index_select(0, rows.to(self._key_buffer.device))
        self._value_buffer = self._value_buffer.index_select(0, rows.to(self._value_buffer.device))
        if self.representatives is not None:
            self.representatives = self.representatives.index_select(0, rows.to(self.representatives.device))
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a BlockRetrievalCache cannot be cropped (positions of later tokens depend on what was "
            "retrieved); keep a copy to roll back"
        )


class BlockRetrievalCache(Cache):
    """KV cache in blocks, for the ``block_retrieval`` patch: sinks + retrieved blocks + local window.

    Parameters
    ----------
    sink_tokens, block_size, window, top_k
        The layout (the patch's parameters of the same names).
    num_layers
        Number of attention layers of the model.
    offload
        Keep the stored keys and values in CPU memory (only the attended ones move to the
        model's device each pass). Refused with an error when host memory runs out.

    Notes
    -----
    Installed by the ``block_retrieval`` patch: the patched model creates one whenever a forward
    pass gets no cache (``generate()`` included), and accepts one passed as ``cache=`` /
    ``past_key_values=``. Not croppable (``evicts`` tells the harness's scorers to roll it back
    from a copy); beam search works (rows are reordered with their representatives).
    """

    evicts = True  # not croppable: roll back from a copy
    initial_capacity = 1024

    def __init__(
        self,
        sink_tokens: int,
        block_size: int,
        window: int,
        top_k: int,
        num_layers: int,
        offload: bool = False,
    ) -> None:
        if sink_tokens < 0 or block_size < 1 or window < 1 or top_k < 1 or num_layers < 1:
            raise ValueError(
                "BlockRetrievalCache needs sink_tokens >= 0 and block_size, window, top_k, num_layers >= 1; "
                f"got {sink_tokens}, {block_size}, {window}, {top_k}, {num_layers}"
            )
        super().__init__(layers=[BlockRetrievalLayer(self) for _ in range(num_layers)])
        self.sink_tokens = sink_tokens
        self.block_size = block_size
        self.window = window
        self.top_k = top_k
        self.offload = offload
        self._clear()

    def _clear(self) -> None:
        self.seen = 0
        self.rotated_at = torch.zeros(0, dtype=torch.long)  # (seen,) position each stored key was rotated at
        self._pending: BlockPlan | None = None

    @property
    def settings(self) -> tuple[int, int, int, int]:
        """``(sink_tokens, block_size, window, top_k)``."""
        return self.sink_tokens, self.block_size, self.window, self.top_k

    def store_device(self, device: torch.device) -> torch.device:
        """Where the keys and values are stored: CPU memory when offloading, else ``device``."""
        return torch.device("cpu") if self.offload else device

    def check_host_memory(self, extra_bytes: int, device: torch.device) -> None:
        """Refuse to grow a CPU buffer beyond the host memory available (with a margin of 1 GiB)."""
        if device.type != "cpu":
            return
        available = host_memory_available()
        if available is not None and extra_bytes + (1 << 30) > available:
            where = "offloaded KV cache" if self.offload else "KV cache"
            raise MemoryError(
                f"block_retrieval: the {where} needs {extra_bytes / 2**20:.0f} MiB more host memory and "
                f"{available / 2**20:.0f} MiB are available; use a shorter context or a machine with more memory"
            )

    def plan(self, new: int, device: torch.device) -> BlockPlan:
        """Plan a forward pass of ``new`` tokens."""
        past = self.seen
        sinks = min(self.sink_tokens, past)
        behind = past - self.sink_tokens - self.window
        blocks = behind // self.block_size if behind > 0 else 0
        local_start = self.sink_tokens + blocks * self.block_size if blocks else sinks
        passthrough = blocks <= self.top_k
        if passthrough:
            retrieved, context = blocks, past
        else:
            retrieved = self.top_k
            context = sinks + retrieved * self.block_size + (past - local_start)
        positions = torch.arange(context, context + new, device=device)
        return BlockPlan(past, new, sinks, blocks, local_start, retrieved, passthrough, context, positions)

    def commit(self, plan: BlockPlan) -> None:
        """Record the pass ``plan`` was made for (every layer has stored its tokens)."""
        self.seen += plan.new
        self.rotated_at = torch.cat([self.rotated_at, plan.positions.cpu()])

    def attended_length(self) -> int:
        """Stored tokens the next single-token pass would attend (sinks + ``top_k`` blocks + local)."""
        return self.plan(1, torch.device("cpu")).context

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                rows = torch.arange(layer._key_buffer.shape[0]).repeat_interleave(repeats)
                layer._select_rows(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                rows = torch.arange(layer._key_buffer.shape[0])[indices.cpu()].reshape(-1)
                layer._select_rows(rows)
