"""Visual token pruning for vision-language models, as reversible patches.

Methods (registered names in brackets), each one file:

* :class:`ToDRE` (``todre``): diverse subset before the decoder (stage 1), all visual tokens
  dropped inside it once the text stops attending to them (stage 2);
* :class:`FastV` (``fastv``): drop the least-attended visual tokens after layer K;
* :class:`DivPrune` (``divprune``): max-min diverse subset before the decoder;
* :class:`RandomPrune` (``random_prune``) and :class:`PoolPrune` (``pool_prune``): baselines.

They patch ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``; the shared
bookkeeping of dropped tokens (mask, positions, KV cache, ``generate()``) is in ``_core``.
:func:`select_diverse` is stage 1's selection on its own; :func:`visual_token_stats` reports the
visual tokens the decoder saw in the last prefill.

A new method subclasses :class:`StageOnePruning` (``retain_ratio``, ``retain_tokens``,
``positions``) and overrides ``select(image, k) -> Kept`` (which of an :class:`ImageTokens`'
tokens to keep), or :class:`VisualPruning` and overrides ``decoder_drop(num_layers) ->
DecoderDrop`` (which visual tokens leave inside the decoder); the shared core does the rest.
"""

from ._core import DecoderDrop, ImageTokens, Kept, StageOnePruning, VisualPruning, visual_token_stats
from .divprune import DivPrune
from .fastv import FastV
from .pool_prune import PoolPrune
from .random_prune import RandomPrune
from .selection import select_diverse, select_diverse_reference
from .todre import ToDRE

__all__ = [
    "DecoderDrop",
    "DivPrune",
    "FastV",
    "ImageTokens",
    "Kept",
    "PoolPrune",
    "RandomPrune",
    "StageOnePruning",
    "ToDRE",
    "VisualPruning",
    "select_diverse",
    "select_diverse_reference",
    "visual_token_stats",
]
