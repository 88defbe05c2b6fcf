"""Tiny random-weight models of every supported family, for tests and GPU latency scripts.

They are real transformers classes built from small configs, so hooks, masks, caches and
``generate()`` run exactly as on full-size checkpoints. Weights are random (seeded).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_FAMILIES", "tiny_model", "tiny_vlm_inputs"]

TINY_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
)

_TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
)


def tiny_model(
    family: str, seed: int = 0, attn_implementation: str = "sdpa", vocab_size: int | None = None
) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` in eval mode (float32, CPU).

    Parameters
    ----------
    family
        One of :data:`TINY_FAMILIES`.
    seed
        Seed for the weights.
    attn_implementation
        ``"sdpa"`` or ``"eager"`` (Gemma2 is always eager: it has no sdpa path).
    vocab_size
        Vocabulary size of the text-only families (default 128), e.g. ``len(tokenizer)`` to pair
        the tiny model with a real tokenizer.
    """
    import transformers as tf

    torch.manual_seed(seed)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls_name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
        config = getattr(tf, f"{cls_name}Config")(**dict(_TEXT, vocab_size=vocab_size or _TEXT["vocab_size"]))
        model = getattr(tf, f"{cls_name}ForCausalLM")(config)
    elif family == "gemma2":
        config = tf.Gemma2Config(**_TEXT, head_dim=8, sliding_window=8)
        model = tf.Gemma2ForCausalLM(config)
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            **_TEXT,
            head_dim=8,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
        )
        model = tf.Gemma3ForCausalLM(config)
    elif family in ("llava", "llava_next"):
        vision = tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        text = tf.LlamaConfig(**_TEXT)
        if family == "llava":
            config = tf.LlavaConfig(
                vision_config=vision, text_config=text, image_token_index=127, image_seq_length=16
            )
            model = tf.LlavaForConditionalGeneration(config)
        else:
            config = tf.LlavaNextConfig(
                vision_config=vision,
                text_config=text,
                image_token_index=127,
                image_grid_pinpoints=[[32, 32], [32, 64]],
            )
            model = tf.LlavaNextForConditionalGeneration(config)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(
            _TEXT,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        )
        ids = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
        if family == "qwen2_vl":
            vision = dict(
                depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2
            )
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2VLForConditionalGeneration(config)
        else:  # Qwen2.5-VL: windowed vision attention, one full-attention block
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=4,
                patch_size=4,
                spatial_merge_size=2,
                out_hidden_size=32,
                window_size=16,
                fullatt_block_indexes=[1],
            )
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2_5_VLForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    if family == "gemma2":  # Gemma2's attention soft-capping has no sdpa path
        attn_implementation = "eager"
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_vlm_inputs(
    model: torch.nn.Module,
    batch: int = 1,
    text_len: int = 6,
    seed: int = 0,
    *,
    images: list[Any] | None = None,
) -> dict:
    """Model inputs for a tiny vision-language model: ``input_ids``, ``attention_mask``, pixels.

    Each sample is ``prefix (2 tokens) · image tokens · rest of the text``; samples of different
    lengths are left-padded (pad id 0, attention 0), as ``generate()`` expects.

    Parameters
    ----------
    model
        A :func:`tiny_model` of family ``llava``, ``llava_next``, ``qwen2_vl`` or ``qwen2_5_vl``.
    batch
        Number of samples (ignored when ``images`` is given).
    text_len
        Text tokens per sample besides the image tokens.
    seed
        Seed of the random text ids and pixels.
    images
        One entry per sample; ``None`` makes a text-only sample. LLaVA: any other value is one
        image. LLaVA-NeXT: the image size ``(height, width)`` in pixels (AnyRes picks the tiles,
        so sizes give different numbers of visual tokens). Qwen2-VL and Qwen2.5-VL: the patch grid
        ``(height, width)`` in 4-pixel patches, both even (``h * w / 4`` visual tokens).
        Default: the same image for every sample (``(32, 32)`` / ``(8, 8)``).

    Returns
    -------
    dict
        ``input_ids`` and ``attention_mask`` ``(batch, seq)``, and ``pixel_values`` (plus
        ``image_sizes`` for LLaVA-NeXT, ``image_grid_thw`` and ``mm_token_type_ids`` for
        Qwen2-VL) for the samples that have an image, in sample order.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    model_type = config.model_type
    defaults = {"llava": True, "llava_next": (32, 32), "qwen2_vl": (8, 8), "qwen2_5_vl": (8, 8)}
    if model_type not in defaults:
        raise ValueError(f"tiny_vlm_inputs supports {sorted(defaults)}, not {model_type!r}")
    if images is None:
        images = [defaults[model_type]] * batch
    rows, pixels, sizes, grids = [], [], [], []
    for spec in images:
        text = torch.randint(1, 100, (text_len,), generator=generator).tolist()
        image: list[int] = []
        if spec is not None:
            n_image = _tiny_image(model, spec, generator, pixels, sizes, grids)
            image = [config.image_token_id] * n_image
            if model_type in ("qwen2_vl", "qwen2_5_vl"):
                image = [config.vision_start_token_id, *image, config.vision_end_token_id]
        rows.append(text[:2] + image + text[2:])
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        out["pixel_values"] = torch.cat(pixels) if model_type.startswith("qwen") else torch.stack(pixels)
    if model_type == "llava_next" and sizes:
        out["image_sizes"] = torch.tensor(sizes)
    if model_type.startswith("qwen"):
        if grids:
            out["image_grid_thw"] = torch.tensor(grids)
        out["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    return out


def _tiny_image(model: torch.nn.Module, spec: Any, generator: torch.Generator, pixels, sizes, grids) -> int:
    """Append one random image's tensors for ``spec``; return its number of visual tokens."""
    config = model.config
    if config.model_type == "llava":
        pixels.append(torch.randn(3, 32, 32, generator=generator))
        return config.image_seq_length
    if config.model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        height, width = spec
        n_tiles = image_size_to_num_patches(
            (height, width), config.image_grid_pinpoints, config.vision_config.image_size
        )
        tiles = torch.randn(n_tiles, 3, 32, 32, generator=generator)
        # tile stacks are zero-padded to the largest AnyRes layout of the tiny pinpoints (3 tiles)
        pixels.append(torch.cat([tiles, torch.zeros(3 - n_tiles, 3, 32, 32)]) if n_tiles < 3 else tiles)
        sizes.append([height, width])
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=tiles[None],
                image_sizes=torch.tensor([[height, width]]),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output
        return int(features[0].shape[0])
    height, width = spec
    if height % 2 or width % 2:
        raise ValueError(f"Qwen2-VL patch grids must be even, got {spec}")
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels.append(torch.randn(height * width, patch_dim, generator=generator))
    grids.append([1, height, width])
    return height * width // vision.spatial_merge_size**2
