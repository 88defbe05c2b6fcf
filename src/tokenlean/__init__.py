"""tokenlean: spend fewer tokens.

Reversible patches on loaded Hugging Face models (visual token pruning, token prepending,
landmark attention, attention sinks), sentence embeddings from decoders, text-in/text-out prompt compression, and one harness
that measures latency and quality of each against the unpatched model.

>>> import tokenlean
>>> model, tokenizer = tokenlean.zoo.load("smollm2-135m")
>>> with tokenlean.patch(model, "sink_window", window=256):
...     out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=8)
"""

from __future__ import annotations

from .adapters import ModelAdapter, get_adapter, supported_architectures
from .errors import (
    CacheCorruptError,
    MethodConfigError,
    OutputDirError,
    PatchError,
    TokenleanError,
    UnsupportedModelError,
    ZooError,
)
from .methods import Method, MethodInfo, ParamInfo, methods, param, parse_method_spec, register_method
from .patching import PatchContext, PatchHandle, active_patches, patch

__version__ = "0.1.0"

__all__ = [
    "CacheCorruptError",
    "CompressionResult",
    "DivPrune",
    "FastV",
    "Method",
    "MethodConfigError",
    "MethodInfo",
    "ModelAdapter",
    "OutputDirError",
    "ParamInfo",
    "PatchContext",
    "PatchError",
    "PatchHandle",
    "PoolPrune",
    "PromptCompressor",
    "RandomPrune",
    "SentenceEncoder",
    "SinkWindowAttention",
    "BlockRetrieval",
    "LandmarkAttention",
    "ToDRE",
    "TokenPrepending",
    "TokenleanError",
    "UnsupportedModelError",
    "ZooError",
    "active_patches",
    "compress_messages",
    "get_adapter",
    "methods",
    "param",
    "parse_method_spec",
    "patch",
    "register_method",
    "supported_architectures",
    "zoo",
]


_VISUAL = ("ToDRE", "FastV", "DivPrune", "RandomPrune", "PoolPrune")


def __getattr__(name: str):
    # Built-in methods live in the subpackages, which import the core: resolve them lazily.
    if name in ("zoo", "data"):
        import importlib

        return importlib.import_module(f"tokenlean.{name}")
    if name in (
        "SinkWindowAttention",
        "BlockRetrieval",
        "LandmarkAttention",
        "TokenPrepending",
        "SentenceEncoder",
    ):
        import tokenlean.attention

        return getattr(tokenlean.attention, name)
    if name in _VISUAL:
        import tokenlean.compressors.visual

        return getattr(tokenlean.compressors.visual, name)
    if name in ("PromptCompressor", "CompressionResult", "compress_messages"):
        import tokenlean.compressors.prompt

        return getattr(tokenlean.compressors.prompt, name)
    raise AttributeError(f"module 'tokenlean' has no attribute {name!r}")
