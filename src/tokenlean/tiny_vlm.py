"""Tiny vision-language models saved with a real processor, loadable like any local checkpoint.

:func:`save_tiny_vlm` writes a :func:`tokenlean.testing.tiny_model` of family ``llava``,
``llava_next`` or ``qwen2_vl`` (random weights, seeded) together with a processor built offline:
a character-level tokenizer of exactly the model's vocabulary (special tokens at the ids the
config names), the family's image processor sized to the tiny vision tower, and a simple chat
template. :func:`tokenlean.zoo.load` then returns ``(model, processor)``, and the processor turns
a PIL image and a prompt into inputs the model accepts, with as many image tokens as the model
produces image features; so the CLI can bench a VLM end to end without downloading anything::

    python -c "from tokenlean.tiny_vlm import save_tiny_vlm; save_tiny_vlm('llava', 'runs/tiny-llava')"
    tokenlean bench --model runs/tiny-llava --workload vision --task vlm_fidelity:n=8 --out runs/vision

Image token counts of a 64×64 image (an easy-vqa picture): LLaVA 16 (a 32×32 view, 8-pixel
patches); LLaVA-NeXT 36 (a 32×32 base view plus one AnyRes tile of the pinpoints ``32×32`` and
``32×64``); Qwen2-VL 16 (resized to at most 32×32 pixels, 4-pixel patches merged 2×2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import OutputDirError

__all__ = ["TINY_VLM_FAMILIES", "save_tiny_vlm", "tiny_processor"]

TINY_VLM_FAMILIES = ("llava", "llava_next", "qwen2_vl")

_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "</s>", "<unk>"
_QWEN_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

# "USER: <image>\n{question}\nASSISTANT:" — the image markup is the family's (``{image}`` below)
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'system' %}SYSTEM: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{image}\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _special_tokens(model: Any) -> dict[int, str]:
    """``{id: token string}`` of the tokens the model's config names (pad, bos, eos, image...)."""
    config = model.config
    text = config.get_text_config()
    ids = {text.pad_token_id: _PAD, text.bos_token_id: _BOS, text.eos_token_id: _EOS}
    if config.model_type == "qwen2_vl":
        ids.update({getattr(config, key): token for key, token in _QWEN_TOKENS.items()})
    else:
        ids[config.image_token_id] = "<image>"
    if None in ids or len(set(ids.values())) != len(ids):
        raise ValueError(f"the tiny {config.model_type} config names clashing or missing special ids: {ids}")
    return ids


def _tokenizer(model: Any) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` of exactly the model's vocabulary size.

    Ids: the config's special tokens where the config puts them, ``<unk>``, newline and the 95
    printable ASCII characters, then ``<extra_i>`` fillers up to ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    config = model.config
    vocab_size = config.get_text_config().vocab_size
    specials = _special_tokens(model)
    plain = [_UNK, "\n", *(chr(c) for c in range(32, 127))]
    free = [i for i in range(vocab_size) if i not in specials]
    if len(free) < len(plain):
        raise ValueError(f"a vocabulary of {vocab_size} has no room for {len(plain)} characters")
    vocab = {token: i for i, token in specials.items()}
    vocab.update(zip(plain, free))
    vocab.update({f"<extra_{i}>": i for i in free[len(plain) :]})

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=_UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([*specials.values(), _UNK])
    if config.model_type == "qwen2_vl":  # no BOS; the image frame tokens are named for the processor
        named = {key.removesuffix("_id"): token for key, token in _QWEN_TOKENS.items()}
    else:  # LLaMA-style: a BOS before every sequence
        named = {"image_token": "<image>"}
        backend.post_processor = processors.TemplateProcessing(
            single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, vocab[_BOS])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_PAD,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        padding_side="left",
        model_max_length=config.get_text_config().max_position_embeddings,
        extra_special_tokens=named,
    )
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    return tokenizer


def _image_processor_class(name: str) -> Any:
    """The PIL backend of an image processor where transformers has one (no torchvision needed)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def tiny_processor(model: Any) -> Any:
    """A processor for a :func:`~tokenlean.testing.tiny_model` VLM (see the module docstring)."""
    import transformers

    config = model.config
    family = config.model_type
    tokenizer = _tokenizer(model)
    if family in ("llava", "llava_next"):
        vision = config.vision_config
        side = vision.image_size
        common = dict(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            do_center_crop=True,
        )
        template = _CHAT_TEMPLATE.replace("{image}", "<image>")
        kwargs = dict(
            patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token (dropped again by the "default" strategy)
            chat_template=template,
            image_token="<image>",
        )
        if family == "llava":
            image_processor = _image_processor_class("CLIPImageProcessor")(**common)
            return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
        image_processor = _image_processor_class("LlavaNextImageProcessor")(
            **common, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints]
        )
        return transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    if family == "qwen2_vl":
        vision = config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        image_processor = _image_processor_class("Qwen2VLImageProcessor")(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            min_pixels=(2 * factor) ** 2,  # at least a 2×2 grid of merged tokens
            max_pixels=(4 * factor) ** 2,  # at most 4×4 merged tokens: a 64×64 image gives 16
        )
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        # transformers' Qwen2VLProcessor also carries a video processor, and video processors need
        # torchvision; the image-only PaddleOCRVLProcessor expands the image token exactly like
        # Qwen2-VL's (grid t·h·w / merge²) and returns the same tensors (pixel_values,
        # image_grid_thw, mm_token_type_ids), so the tiny model loads without torchvision.
        return transformers.PaddleOCRVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=_CHAT_TEMPLATE.replace("{image}", image),
        )
    raise ValueError(f"no tiny processor for model type {family!r}; families: {', '.join(TINY_VLM_FAMILIES)}")


def save_tiny_vlm(
    family: str, path: str | os.PathLike[str], seed: int = 0, *, overwrite: bool = False
) -> Path:
    """Save a tiny random-weight VLM and its processor to the folder ``path``, atomically.

    Parameters
    ----------
    family
        ``"llava"``, ``"llava_next"`` or ``"qwen2_vl"`` (see :data:`TINY_VLM_FAMILIES`).
    path
        The folder to create. Everything is written to a temporary folder beside it first and
        renamed into place at the end, so a failure never leaves a partial folder behind.
    seed
        Seed of the random weights.
    overwrite
        Replace an existing folder at ``path`` (otherwise an existing folder is an error).

    Returns
    -------
    Path
        ``path``; ``tokenlean.zoo.load(path)`` returns ``(model, processor)``.

    Example
    -------
    ``python -c "from tokenlean.tiny_vlm import save_tiny_vlm; save_tiny_vlm('llava', 'runs/tiny-llava')"``
    """
    from .testing import tiny_model

    if family not in TINY_VLM_FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose from {', '.join(TINY_VLM_FAMILIES)}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputDirError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
    model = tiny_model(family, seed=seed)
    processor = tiny_processor(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise OutputDirError(f"cannot write beside {str(target)!r}: {exc.strerror or exc}") from exc
    old: Path | None = None
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        if target.exists():  # overwrite: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "folder")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "folder").exists() and not target.exists():
            os.replace(old / "folder", target)  # put the old folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
