"""Tiny random-weight models of every supported family, for tests and GPU latency scripts.

They are real transformers classes built from small configs, so hooks, masks, caches and
``generate()`` run exactly as on full-size checkpoints. Weights are random (seeded).
"""

from __future__ import annotations

import torch

__all__ = ["TINY_FAMILIES", "tiny_model", "tiny_vlm_inputs"]

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "llava", "llava_next", "qwen2_vl")

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
    elif family == "qwen2_vl":
        text = dict(
            _TEXT,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        )
        config = tf.Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2
            ),
            image_token_id=120,
            video_token_id=121,
            vision_start_token_id=122,
            vision_end_token_id=123,
        )
        model = tf.Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    if family == "gemma2":  # Gemma2's attention soft-capping has no sdpa path
        attn_implementation = "eager"
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_vlm_inputs(model: torch.nn.Module, batch: int = 1, text_len: int = 6, seed: int = 0) -> dict:
    """Model inputs with one image per sample for a tiny LLaVA model (``input_ids``, ``pixel_values``...)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    model_type = config.model_type
    if model_type == "llava":
        n_image = config.image_seq_length
        pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)
        extra = {}
    else:
        raise ValueError(f"tiny_vlm_inputs supports llava, not {model_type!r}")
    text = torch.randint(1, 100, (batch, text_len), generator=generator)
    image = torch.full((batch, n_image), config.image_token_id)
    input_ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        **extra,
    }
