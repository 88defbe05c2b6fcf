"""Latency of one generation: prefill, time to first token, decode speed, end-to-end, peak memory.

On CUDA every interval is measured with CUDA events and read after a synchronisation, so
asynchronous kernel launches are never mistaken for finished work; on CPU a monotonic host
clock is exact because CPU ops are synchronous. Peak memory is ``torch.cuda.max_memory_allocated``
on GPU and the process's peak resident set size on CPU (reset before each measurement on Linux
through ``/proc/self/clear_refs``; elsewhere the process-lifetime peak is reported).
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tokenlean.patching import cache_keyword

__all__ = [
    "ENCODE_METRICS",
    "ENCODE_SPEEDUPS",
    "LATENCY_METRICS",
    "LatencySample",
    "measure_encode",
    "measure_generation",
    "summarize",
]

#: metric name -> (unit, higher is better)
LATENCY_METRICS: dict[str, tuple[str, bool]] = {
    "prefill_s": ("s", False),
    "ttft_s": ("s", False),
    "decode_tokens_per_s": ("tokens/s", True),
    "e2e_s": ("s", False),
    "peak_memory_mb": ("MB", False),
}
#: speedup name -> latency metric it is computed from
SPEEDUP_METRICS = {
    "prefill": "prefill_s",
    "ttft": "ttft_s",
    "decode": "decode_tokens_per_s",
    "e2e": "e2e_s",
    "peak_memory": "peak_memory_mb",
}

#: the encoding workload (sentence embeddings): metric name -> (unit, higher is better)
ENCODE_METRICS: dict[str, tuple[str, bool]] = {
    "encode_s": ("s", False),
    "sentences_per_s": ("sentences/s", True),
    "peak_memory_mb": ("MB", False),
}
ENCODE_SPEEDUPS = {"encode": "encode_s", "peak_memory": "peak_memory_mb"}


@dataclass(frozen=True)
class LatencySample:
    """One measured generation (times in seconds, memory in MB)."""

    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    e2e_s: float
    peak_memory_mb: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _Clock:
    """Marks points in time; CUDA events on GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


def _reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-memory counter; ``False`` if only the process-lifetime peak is available."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM, the peak resident set size
            return True
        except OSError:
            return False
    return False


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@torch.inference_mode()
def measure_generation(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    extra_inputs: dict[str, Any] | None = None,
) -> LatencySample:
    """Greedy-generate ``new_tokens`` tokens after ``input_ids`` and time each phase.

    Parameters
    ----------
    model
        A causal LM (patched or not), already on its device.
    input_ids
        ``(batch, prompt_len)`` prompt token ids on the model's device; no padding (left padding
        only with an ``attention_mask`` in ``extra_inputs``).
    new_tokens
        Number of tokens to generate (>= 1); the first comes from the prefill.
    extra_inputs
        More keyword inputs of the prefill call, on the model's device (a VLM's ``pixel_values``,
        ``image_grid_thw``...; their processing is timed inside prefill and TTFT). An
        ``attention_mask`` ``(batch, prompt_len)`` among them is also passed to every decode
        step, one column of ones longer each step, as ``generate()`` does.

    Returns
    -------
    LatencySample
        ``prefill_s``: the prompt's forward pass; ``ttft_s``: until the first token id is on the
        host; ``decode_tokens_per_s``: ``batch * (new_tokens - 1)`` tokens over the decode time
        (``nan`` when ``new_tokens == 1``); ``e2e_s``: the whole generation; ``peak_memory_mb``.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    clock = _Clock(device)
    _reset_peak_memory(device)
    extra_inputs = dict(extra_inputs or {})
    mask = extra_inputs.get("attention_mask")
    start = clock.mark()
    out = model(input_ids=input_ids, use_cache=True, **extra_inputs)
    after_prefill = clock.mark()
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    token.cpu()  # the first token reaches the host (a server would stream it now)
    first_token = clock.mark()
    cache = _cache_of(out)
    del out
    cache_kwarg = cache_keyword(model.forward)
    for _ in range(new_tokens - 1):
        step: dict[str, Any] = {cache_kwarg: cache}
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step["attention_mask"] = mask
        out = model(input_ids=token, use_cache=True, **step)
        cache = _cache_of(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    token.cpu()
    end = clock.mark()
    prefill = clock.seconds(start, after_prefill)
    ttft = clock.seconds(start, first_token)
    e2e = clock.seconds(start, end)
    decode_time = clock.seconds(first_token, end)
    decoded = input_ids.shape[0] * (new_tokens - 1)
    return LatencySample(
        prefill_s=prefill,
        ttft_s=ttft,
        decode_tokens_per_s=decoded / decode_time if decoded and decode_time > 0 else float("nan"),
        e2e_s=e2e,
        peak_memory_mb=_peak_memory_mb(device),
    )


def measure_encode(encoder, sentences: list[str], batch_size: int) -> dict[str, float]:
    """Time ``encoder.encode(sentences, batch_size=batch_size)`` (a :class:`SentenceEncoder`).

    Returns ``encode_s`` (until the embeddings are on the host), ``sentences_per_s`` and
    ``peak_memory_mb`` (see :data:`ENCODE_METRICS`).
    """
    device = next(encoder.model.parameters()).device
    clock = _Clock(device)
    _reset_peak_memory(device)
    start = clock.mark()
    encoder.encode(sentences, batch_size=batch_size)  # returns CPU tensors: the work is done
    end = clock.mark()
    seconds = clock.seconds(start, end)
    return {
        "encode_s": seconds,
        "sentences_per_s": len(sentences) / seconds if seconds > 0 else float("nan"),
        "peak_memory_mb": _peak_memory_mb(device),
    }


def _cache_of(output) -> object:
    """The KV cache of a model output (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_mark(cache: Any, length: int) -> Any:
    """A point to come back to with :func:`cache_rewind`, taken when ``cache`` holds ``length`` tokens.

    The length itself for a cache that ``crop`` can cut back; a copy for one that evicts
    (``cache.evicts``, e.g. ``sink_window``'s: what it dropped is gone, so it cannot be cropped).
    """
    if cache is None:
        return None
    if getattr(cache, "evicts", False):
        return copy.deepcopy(cache)
    return length


def cache_rewind(cache: Any, mark: Any) -> Any:
    """The cache as it was at ``mark`` (:func:`cache_mark`): ``cache`` cropped, or a fresh copy of the snapshot."""
    if mark is None:
        return None
    if isinstance(mark, int):
        current = cache.get_seq_length()
        if current > mark:
            cache.crop(mark - current)
        return cache
    return copy.deepcopy(mark)


def summarize(values: list[float]) -> dict[str, float | int | list[float]]:
    """Median, quartiles, extremes and count of ``values`` (NaNs ignored)."""
    array = np.asarray([v for v in values if v == v], dtype=float)
    if array.size == 0:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0, "values": list(values)}  # fmt: skip
    return {
        "median": float(np.median(array)),
        "p25": float(np.percentile(array, 25)),
        "p75": float(np.percentile(array, 75)),
        "min": float(array.min()),
        "max": float(array.max()),
        "n": int(array.size),
        "values": [float(v) for v in values],
    }


def paired_ratios(baseline: list[float], variant: list[float], higher_is_better: bool) -> list[float]:
    """Per-repeat speedups (>1 = the variant is better): ``b/v`` for costs, ``v/b`` for throughputs."""
    pairs = zip(baseline, variant)
    if higher_is_better:
        return [v / b for b, v in pairs if b > 0 and v == v]
    return [b / v for b, v in pairs if v > 0 and b == b]
