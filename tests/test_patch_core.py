"""Patch core: reversibility, composition, errors, registry, adapters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokenlean
from tokenlean import MethodConfigError, PatchError, UnsupportedModelError
from tokenlean.methods import Method, param, register_method
from tokenlean.testing import TINY_FAMILIES, tiny_model, tiny_vlm_inputs


@register_method("_test_scale_embeddings")
@dataclass
class ScaleEmbeddings(Method):
    """Test method: scales the token embeddings with a forward hook and wraps one method."""

    factor: float = param(2.0, "multiplier applied to the embeddings")
    ratio: float = param(0.5, "a ratio in (0, 1], only validated")

    def validate(self) -> None:
        self._check_fraction("ratio")

    def install(self, ctx):
        ctx.add_forward_hook(ctx.adapter.embed_tokens(ctx.model), lambda m, a, k, out: out * self.factor)
        # a stacked per-instance wrapper on the same module's forward
        ctx.wrap_method(
            ctx.adapter.embed_tokens(ctx.model), "forward", lambda nxt, *a, **k: nxt(*a, **k) + 0.0
        )


@register_method("_test_broken")
@dataclass
class BrokenMethod(Method):
    """Test method: installs a hook, then fails."""

    def install(self, ctx):
        ctx.add_forward_hook(ctx.adapter.embed_tokens(ctx.model), lambda m, a, k, out: out * 0)
        ctx.add_attention_wrapper(lambda *a, call_next, **k: call_next(*a, **k))
        raise RuntimeError("install failed halfway")


TEXT_FAMILIES = [f for f in TINY_FAMILIES if f not in ("llava", "llava_next", "qwen2_vl")]


def _inputs(batch=2, length=24, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad and batch > 1:
        mask[0, :5] = 0  # left padding on the first sample
        ids[0, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return logits, generated


# sink_window's default (evict) mode refuses these (M-RoPE, per-layer rotary bases); mask mode serves them
EVICT_REFUSED = ("gemma3", "qwen2_vl", "qwen2_5_vl")


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(
    "method",
    [
        "sink_window:sink_tokens=1,window=4",
        "sink_window:sink_tokens=1,window=4,mode=mask",
        "_test_scale_embeddings",
    ],
)
def test_removal_restores_model_bitwise(family, method):
    model = tiny_model(family)
    inputs = tiny_vlm_inputs(model, batch=2) if family == "llava" else _inputs()
    if family in ("llava_next", "qwen2_vl"):
        inputs = _inputs()  # text-only forward through the VLM's language model path
    before = _run(model, inputs)
    if family in EVICT_REFUSED and method == "sink_window:sink_tokens=1,window=4":
        with pytest.raises(PatchError, match="mode='mask'"):
            tokenlean.patch(model, tokenlean.parse_method_spec(method))
        after = _run(model, inputs)
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert tokenlean.active_patches(model) == []
        return
    handle = tokenlean.patch(model, tokenlean.parse_method_spec(method))
    patched = _run(model, inputs)
    handle.remove()
    after = _run(model, inputs)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[0], patched[0]), "the patch did not change the outputs"
    assert tokenlean.active_patches(model) == []
    assert model.config.get_text_config()._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("first_removed", ["sink", "scale"])
def test_two_patches_removed_in_either_order(first_removed):
    model = tiny_model("llama")
    inputs = _inputs()
    base = _run(model, inputs)
    sink = tokenlean.patch(model, "sink_window", sink_tokens=1, window=4)
    only_sink = _run(model, inputs)
    scale = tokenlean.patch(model, "_test_scale_embeddings", factor=3.0)
    both = _run(model, inputs)
    assert not torch.allclose(both[0], only_sink[0])
    assert [h.method.name for h in tokenlean.active_patches(model)] == [
        "sink_window",
        "_test_scale_embeddings",
    ]
    (sink if first_removed == "sink" else scale).remove()
    remaining = _run(model, inputs)
    if first_removed == "scale":
        assert torch.equal(remaining[0], only_sink[0])
    else:  # only the scale patch is left: the attention implementation is back to sdpa
        assert model.config._attn_implementation == "sdpa"
        assert not torch.allclose(remaining[0], base[0])
    (scale if first_removed == "sink" else sink).remove()
    after = _run(model, inputs)
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])


def test_context_manager_removes_even_on_error():
    model = tiny_model("qwen2")
    inputs = _inputs()
    base = _run(model, inputs)[0]
    with pytest.raises(ZeroDivisionError), tokenlean.patch(model, "sink_window", window=2):
        assert len(tokenlean.active_patches(model)) == 1
        _ = 1 / 0
    assert tokenlean.active_patches(model) == []
    assert torch.equal(_run(model, inputs)[0], base)


def test_patching_twice_and_removing_twice_are_errors():
    model = tiny_model("llama")
    handle = tokenlean.patch(model, "sink_window", window=8)
    with pytest.raises(PatchError, match="already applied"):
        tokenlean.patch(model, "sink_window", window=16)
    handle.remove()
    with pytest.raises(PatchError, match="already removed"):
        handle.remove()
    tokenlean.patch(model, "sink_window", window=16).remove()  # applicable again after removal


def test_failed_install_leaves_model_untouched():
    model = tiny_model("llama")
    inputs = _inputs()
    base = _run(model, inputs)[0]
    with pytest.raises(RuntimeError, match="halfway"):
        tokenlean.patch(model, "_test_broken")
    assert tokenlean.active_patches(model) == []
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_run(model, inputs)[0], base)


def test_no_op_attention_wrapper_keeps_padded_batches_exact():
    """The registered mask function keeps the padding mask (without it, padded rows go wrong)."""
    model = tiny_model("llama")
    inputs = _inputs()
    base = _run(model, inputs)[0]
    with tokenlean.patch(model, "sink_window", window=10_000):
        assert model.config._attn_implementation == "tokenlean_sdpa"
        patched = _run(model, inputs)[0]
    assert torch.equal(base, patched)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sink_windwo", "did you mean 'sink_window'"),
        ("sink_window:window=-3", "window must be >= 1"),
        ("sink_window:window=2.5", "cannot read '2.5' as int"),
        ("sink_window:widow=3", "no parameter"),
        ("sink_window:window", "expected key=value"),
        ("_test_scale_embeddings:ratio=1.5", r"ratio must be in \(0, 1\]"),
        ("_test_scale_embeddings:ratio=-0.1", r"ratio must be in \(0, 1\]"),
    ],
)
def test_bad_method_specs(spec, message):
    with pytest.raises(MethodConfigError, match=f"(?i){message}"):
        tokenlean.parse_method_spec(spec)


def test_bad_types_and_overrides():
    with pytest.raises(MethodConfigError, match="of type int"):
        tokenlean.SinkWindowAttention(window=True)
    with pytest.raises(MethodConfigError, match="of type int"):
        tokenlean.SinkWindowAttention(window="64")
    assert tokenlean.SinkWindowAttention(window=64) == tokenlean.parse_method_spec("sink_window:window=64")
    with pytest.raises(MethodConfigError, match="no parameter"):
        tokenlean.patch(tiny_model("llama"), "sink_window", windw=3)
    assert ScaleEmbeddings(factor=2).factor == 2.0 and isinstance(ScaleEmbeddings(factor=2).factor, float)


def test_methods_lists_parameters_with_docs():
    infos = {info.name: info for info in tokenlean.methods()}
    sink = infos["sink_window"]
    assert sink.cls is tokenlean.SinkWindowAttention
    assert [(p.name, p.type, p.default) for p in sink.params] == [
        ("sink_tokens", "int", 4),
        ("window", "int", 1024),
        ("chunk_size", "int", 512),
        ("mode", "'evict' | 'mask'", "evict"),
    ]
    assert all(p.doc for p in sink.params)
    assert sink.summary.startswith("Attention sinks")


def test_unsupported_architecture_names_supported_ones():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(UnsupportedModelError, match="supported architectures: .*llama.*qwen2_vl"):
        tokenlean.patch(bert, "sink_window")
    with pytest.raises(TypeError):
        tokenlean.patch("not a model", "sink_window")


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_vlm_adapter_finds_vision_parts(family):
    model = tiny_model(family)
    adapter = tokenlean.get_adapter(model)
    assert adapter.is_multimodal
    assert adapter.image_token_id(model) == model.config.image_token_id
    assert adapter.vision_tower(model) is not adapter.projector(model)
    assert len(adapter.decoder_layers(model)) == model.config.text_config.num_hidden_layers
    # switching attention for a VLM only touches the text decoder
    with tokenlean.patch(model, "sink_window", window=4, mode="mask"):
        assert model.config.text_config._attn_implementation == "tokenlean_sdpa"
        assert model.config.vision_config._attn_implementation != "tokenlean_sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"


def test_text_adapter_has_no_vision():
    model = tiny_model("llama")
    adapter = tokenlean.get_adapter(model)
    with pytest.raises(UnsupportedModelError):
        adapter.vision_tower(model)
    assert adapter.embed_tokens(model) is model.model.embed_tokens
    assert adapter.rotary_embedding(model) is model.model.rotary_emb
    # the bare decoder stack is accepted too
    assert tokenlean.get_adapter(model.model).decoder_layers(model.model) is model.model.layers


@register_method("_test_tag_image_features")
@dataclass
class TagImageFeatures(Method):
    """Test method: wraps get_image_features and records that it ran."""

    tag: str = param("a", "name recorded on each call")

    def install(self, ctx):
        calls = self.calls = []

        def wrapper(call_next, *args, **kwargs):
            calls.append(self.tag)
            return call_next(*args, **kwargs)

        ctx.wrap_method(ctx.model.model, "get_image_features", wrapper)


@pytest.mark.parametrize("first_removed", [0, 1])
def test_stacked_method_wrappers_remove_in_either_order(first_removed):
    model = tiny_model("llava")
    inputs = tiny_vlm_inputs(model)
    base = _run(model, inputs)[0]
    assert "get_image_features" not in vars(model.model)

    a = tokenlean.patch(model, TagImageFeatures(tag="a"))
    b = _SecondTag(tag="b").apply(model)
    with torch.no_grad():
        model(**inputs)
    assert a.method.calls == ["a"] and b.method.calls == ["b"]
    handles = [a, b]
    handles[first_removed].remove()
    survivor = handles[1 - first_removed]
    with torch.no_grad():
        model(**inputs)
    assert survivor.method.calls == [survivor.method.tag] * 2
    assert handles[first_removed].method.calls == [handles[first_removed].method.tag]
    survivor.remove()
    assert "get_image_features" not in vars(model.model)  # the class method shows through again
    assert torch.equal(_run(model, inputs)[0], base)


@register_method("_test_second_tag")
@dataclass
class _SecondTag(TagImageFeatures):
    """Test method: a second, distinct wrapper type on the same method."""
