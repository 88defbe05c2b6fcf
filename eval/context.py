"""What tasks and workloads get from the runner: the loaded model and how to run a variant's text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .variants import Compressed, CompressorPool, Variant

__all__ = ["BenchContext"]


@dataclass
class BenchContext:
    """The run a task or workload measures in.

    Attributes
    ----------
    model : torch.nn.Module or None
        The loaded model (None in a ``--model none`` run of text tasks). While a task's :meth:`~tokenlean.eval.tasks.Task.run` or a workload's
        ``measure`` is called for a ``patch`` variant, the variant's patch is applied to it;
        otherwise it is the unpatched model.
    tokenizer : tokenizer
    model_name : str
        The zoo name, hub id or path the model came from (or the label given with it).
    compressors : CompressorPool
        Builds and runs the run's prompt compressors.
    seed : int
    text : str
        The run's local text (``BenchConfig.text``).
    cache : dict
        Scratch space shared by tasks and workloads within one run (e.g. a second model).
    """

    model: torch.nn.Module | None
    tokenizer: Any
    model_name: str
    compressors: CompressorPool
    seed: int = 0
    text: str = "paul-graham-essays"
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """The model's device (the CPU in a run without a language model)."""
        if self.model is None:
            return torch.device("cpu")
        return next(self.model.parameters()).device

    def compress(self, variant: Variant, text_or_list: str | Sequence[str]) -> Compressed:
        """``text_or_list`` as ``variant`` hands it to the model (compressed for compressor variants)."""
        return self.compressors.compress(variant, text_or_list)
