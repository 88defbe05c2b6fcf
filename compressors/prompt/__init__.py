"""Prompt compression: text in, text out (LLMLingua-2 token classification).

>>> from tokenlean import PromptCompressor, compress_messages
>>> compressor = PromptCompressor()              # the offline default (minilm-l6, distilled here)
>>> result = compressor.compress(long_text, rate=0.33)
>>> result.text, result.origin_tokens, result.compressed_tokens

``PromptCompressor("microsoft/llmlingua-2-xlm-roberta-large-meetingbank")`` runs the published
checkpoints; ``llmlingua_compat=True`` reproduces llmlingua 0.2.2's output exactly.
"""

from __future__ import annotations

from .compressor import PRECISIONS, CompressorModelError, PromptCompressor
from .counting import TokenCountError, get_counter
from .messages import MessagesError, compress_messages, split_question
from .result import CompressionResult
from .structure import Segment, compress_structured, split_protected
from .units import UNIT_KINDS, find_units

__all__ = [
    "PRECISIONS",
    "UNIT_KINDS",
    "CompressionResult",
    "CompressorModelError",
    "MessagesError",
    "PromptCompressor",
    "Segment",
    "TokenCountError",
    "compress_messages",
    "compress_structured",
    "find_units",
    "get_counter",
    "split_protected",
    "split_question",
]
