"""Encoder runtimes: what turns token ids into P(keep) for :class:`~.compressor.PromptCompressor`.

The compressor only needs one call, ``runtime(input_ids, attention_mask) -> probs``, so the
token classifier can run on PyTorch (any precision, any device) or on an optimised CPU runtime
without the rest of the compressor knowing.

Runtimes
--------
``"torch"``
    The ``*ForTokenClassification`` module itself, in fp32 (exact, the default), bf16 or fp16.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["EncoderRuntime", "RuntimeError_", "TorchRuntime", "build_runtime"]


class RuntimeError_(ValueError):  # noqa: N801 - not the builtin RuntimeError
    """A runtime/precision combination that cannot work (message says what to use instead)."""


class EncoderRuntime(Protocol):
    """Callable computing keep probabilities for a padded batch.

    ``input_ids`` int64 ``(batch, width)``, ``attention_mask`` bool ``(batch, width)``;
    returns float32 ``(batch, width)`` P(label 1 = keep); values at padded positions are unspecified.
    """

    name: str

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchRuntime:
    """The PyTorch module, in fp32, bf16 or fp16, on its device."""

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.name = f"torch-{precision}"
        if precision in ("bf16", "fp16"):
            model.to(torch.bfloat16 if precision == "bf16" else torch.float16)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids_t = torch.from_numpy(input_ids).to(self.device)
            mask_t = torch.from_numpy(attention_mask).to(self.device)
            logits = self.model(input_ids=ids_t, attention_mask=mask_t).logits
            return torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()


def build_runtime(model: torch.nn.Module, precision: str, device: torch.device, **options: Any) -> EncoderRuntime:
    """The runtime for ``precision`` on ``device``."""
    if precision in ("fp32", "bf16", "fp16"):
        return TorchRuntime(model, precision, device)
    if precision == "int8":  # TEMPORARY: deprecated torch.ao path, to be replaced by a maintained runtime
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            quantized = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        runtime = TorchRuntime(quantized, "fp32", device)
        runtime.name = "torch-ao-int8"
        return runtime
    raise RuntimeError_(f"no runtime for precision {precision!r}")
