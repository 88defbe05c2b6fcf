"""Model adapters: the one place that knows where things live in each architecture.

Methods never test class names. They ask :func:`get_adapter` for the model's adapter and then
for its decoder layers, attention modules, rotary embedding, token embeddings, vision tower,
projector and image-token id.

Supported families (by ``config.model_type``): Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3
(text and vision-language), LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL. Both the ``*ForCausalLM``
/ ``*ForConditionalGeneration`` heads and the bare ``*Model`` stacks are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .errors import UnsupportedModelError

__all__ = ["ModelAdapter", "get_adapter", "supported_architectures"]


@dataclass(frozen=True)
class ModelAdapter:
    """Where one architecture family keeps its parts.

    Attribute paths are tried in order, relative to the model passed in; the first that
    exists wins, so the same adapter serves ``LlamaForCausalLM`` and ``LlamaModel``.
    """

    family: str
    model_types: tuple[str, ...]
    text_model_paths: tuple[str, ...] = ("model.language_model", "language_model", "model", "")
    vision_tower_paths: tuple[str, ...] = ()
    projector_paths: tuple[str, ...] = ()
    image_token_attr: str | None = None
    attention_attr: str = "self_attn"

    @property
    def is_multimodal(self) -> bool:
        return bool(self.vision_tower_paths)

    # -- text decoder ---------------------------------------------------------------------------
    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (the module owning ``layers``, ``embed_tokens``, ``rotary_emb``, ``norm``)."""
        for path in self.text_model_paths:
            module = _resolve(model, path)
            if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
                return module
        raise UnsupportedModelError(
            f"could not find the decoder layers of {type(model).__name__} (family {self.family})"
        )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order: ``ModuleList`` of length ``num_hidden_layers``."""
        return self.text_model(model).layers

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """One self-attention module per decoder layer, in layer order."""
        return [getattr(layer, self.attention_attr) for layer in self.decoder_layers(model)]

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        """The rotary position embedding module of the decoder (``None`` if the family has none)."""
        return getattr(self.text_model(model), "rotary_emb", None)

    def embed_tokens(self, model: nn.Module) -> nn.Embedding:
        """The input token embedding of the decoder."""
        return self.text_model(model).embed_tokens

    def text_config(self, model: nn.Module) -> Any:
        """The configuration the decoder layers read (``text_config`` for vision-language models)."""
        return self.text_model(model).config

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    # -- vision side ----------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision encoder (raises for text-only models)."""
        return self._first(model, self.vision_tower_paths, "vision tower")

    def projector(self, model: nn.Module) -> nn.Module:
        """The vision-to-text projector (LLaVA's ``multi_modal_projector``, Qwen2-VL's ``merger``)."""
        return self._first(model, self.projector_paths, "projector")

    def image_token_id(self, model: nn.Module) -> int:
        """The id of the placeholder token that image features replace in ``input_ids``."""
        if self.image_token_attr is None:
            raise UnsupportedModelError(f"{self.family} models take no images")
        value = getattr(model.config, self.image_token_attr, None)
        if value is None:
            raise UnsupportedModelError(f"{type(model).__name__}.config has no {self.image_token_attr}")
        return int(value)

    def attn_implementation_request(self, model: nn.Module, name: str) -> str | dict[str, str]:
        """Argument for ``model.set_attn_implementation`` that switches only the text decoder."""
        if self.is_multimodal and hasattr(model.config, "text_config"):
            return {"text_config": name}
        return name

    def _first(self, model: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
        for path in paths:
            module = _resolve(model, path)
            if module is not None:
                return module
        raise UnsupportedModelError(f"{type(model).__name__} ({self.family}) has no {what}")


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_LLAVA_VISION = dict(
    vision_tower_paths=("model.vision_tower", "vision_tower"),
    projector_paths=("model.multi_modal_projector", "multi_modal_projector"),
    image_token_attr="image_token_id",
)
_QWEN_VL_VISION = dict(
    vision_tower_paths=("model.visual", "visual"),
    projector_paths=("model.visual.merger", "visual.merger"),
    image_token_attr="image_token_id",
)

_ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter("llama", ("llama",)),
    ModelAdapter("mistral", ("mistral",)),
    ModelAdapter("qwen2", ("qwen2",)),
    ModelAdapter("qwen3", ("qwen3",)),
    ModelAdapter("gemma2", ("gemma2",)),
    ModelAdapter("gemma3-text", ("gemma3_text",)),
    ModelAdapter("gemma3", ("gemma3",), **_LLAVA_VISION),
    ModelAdapter("llava", ("llava",), **_LLAVA_VISION),
    ModelAdapter("llava-next", ("llava_next",), **_LLAVA_VISION),
    ModelAdapter("qwen2-vl", ("qwen2_vl",), **_QWEN_VL_VISION),
    ModelAdapter("qwen2.5-vl", ("qwen2_5_vl",), **_QWEN_VL_VISION),
)
_BY_MODEL_TYPE = {mt: adapter for adapter in _ADAPTERS for mt in adapter.model_types}


def supported_architectures() -> list[str]:
    """The ``config.model_type`` values the adapters know."""
    return sorted(_BY_MODEL_TYPE)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``.

    Raises
    ------
    UnsupportedModelError
        For a model whose ``config.model_type`` no adapter knows; the message lists the
        supported ones.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"tokenlean cannot patch {type(model).__name__} (model_type={model_type!r}); "
            f"supported architectures: {', '.join(supported_architectures())}"
        )
    return adapter
