"""Visual token pruning on tiny LLaVA, LLaVA-NeXT and Qwen2-VL models (real transformers classes).

What is checked, for every method on every family:

* retain 1.0 (stage 2 off): logits and ``generate()`` bitwise equal to the unpatched model;
* removal restores the model bitwise;
* a mixed batch (different images, different numbers of visual tokens, a text-only sample,
  left padding) equals each sample run alone;
* ``generate()`` with the cache equals a cache-free forward over prompt + generated tokens
  (the mask, positions and per-layer cache lengths agree across decoding steps);
* stage 1 equals the *unpatched* model fed the kept features directly (the limit);
* FastV keeps the tokens an eager-attention run says the last token attends to most; ToDRE's
  text→visual share equals the one computed from eager attention weights; the [CLS] row equals
  the vision tower's eager attention.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tokenlean
from tokenlean.compressors.visual import visual_token_stats
from tokenlean.compressors.visual._core import _cls_attention_module, _cls_row
from tokenlean.errors import MethodConfigError, PatchError, UnsupportedModelError
from tokenlean.testing import tiny_model, tiny_vlm_inputs

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
# per family: images of a mixed batch (different sizes -> different visual token counts; None = text only)
MIXED = {
    "llava": [1, None, 1],
    "llava_next": [(32, 32), (32, 64), None],
    "qwen2_vl": [(8, 8), (4, 8), None],
    "qwen2_5_vl": [(8, 8), (4, 8), None],
}
# every method at a ratio that drops tokens; stage 2 forced on (tau=1) to exercise the in-decoder drop
PRUNING = [
    ("todre", {"retain_ratio": 0.25, "stage2": False}),
    ("todre", {"retain_ratio": 0.25, "criterion": "k_center", "tau": 1.0, "relevance_layer": 1}),
    ("todre", {"retain_ratio": 0.25, "pivot": "random", "stage2": False}),
    ("fastv", {"retain_ratio": 0.5, "layer": 1}),
    ("divprune", {"retain_ratio": 0.3}),
    ("random_prune", {"retain_ratio": 0.3}),
    ("pool_prune", {"retain_ratio": 0.3}),
]
KEEP_ALL = [
    ("todre", {"retain_ratio": 1.0, "stage2": False}),
    ("fastv", {"retain_ratio": 1.0}),
    ("divprune", {"retain_ratio": 1.0}),
    ("random_prune", {"retain_ratio": 1.0}),
    ("pool_prune", {"retain_ratio": 1.0}),
]


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in FAMILIES}


def _collate(model, samples: list[dict]) -> dict:
    """Left-pad single-sample inputs into one batch (what a processor does)."""
    width = max(s["input_ids"].shape[1] for s in samples)
    out: dict = {}
    ids, mask = [], []
    for s in samples:
        pad = width - s["input_ids"].shape[1]
        ids.append(torch.nn.functional.pad(s["input_ids"], (pad, 0)))
        mask.append(torch.nn.functional.pad(s["attention_mask"], (pad, 0)))
    out["input_ids"], out["attention_mask"] = torch.cat(ids), torch.cat(mask)
    for key in ("pixel_values", "image_sizes", "image_grid_thw"):
        parts = [s[key] for s in samples if key in s]
        if parts:
            out[key] = torch.cat(parts)
    if model.config.model_type.startswith("qwen"):
        out["mm_token_type_ids"] = (out["input_ids"] == model.config.image_token_id).int()
    return out


def _capture(store: dict, key: str, argument: str):
    """A forward pre-hook (with kwargs) keeping the first value of ``argument`` in ``store[key]``."""

    def hook(module, args, kwargs) -> None:
        store.setdefault(key, kwargs[argument])

    return hook


def _singles(model, family: str) -> list[dict]:
    return [tiny_vlm_inputs(model, images=[spec], seed=10 + i) for i, spec in enumerate(MIXED[family])]


def _generate(model, inputs: dict, n: int = 4) -> torch.Tensor:
    # min_new_tokens: a sample that emits EOS alone stops, in a batch it would be padded on
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@torch.no_grad()
def _last_logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,params", KEEP_ALL, ids=[n for n, _ in KEEP_ALL])
def test_retain_one_is_bitwise_the_unpatched_model(models, family, name, params):
    model = models[family]
    inputs = _collate(model, _singles(model, family))
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = _generate(model, inputs)
    with tokenlean.patch(model, name, **params):
        with torch.no_grad():
            patched = model(**inputs).logits
        patched_tokens = _generate(model, inputs)
    assert torch.equal(logits, patched)
    assert torch.equal(tokens, patched_tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,params", PRUNING, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PRUNING)])
def test_pruning_batch_equals_batch_of_one_and_restores_bitwise(models, family, name, params):
    model = models[family]
    singles = _singles(model, family)
    batch = _collate(model, singles)
    before = model(**batch).logits.detach()
    with tokenlean.patch(model, name, **params):
        batch_logits = _last_logits(model, batch)
        stats = visual_token_stats(model)
        batch_tokens = _generate(model, batch)
        for i, single in enumerate(singles):
            torch.testing.assert_close(_last_logits(model, single)[0], batch_logits[i], atol=2e-5, rtol=1e-4)
            assert torch.equal(_generate(model, single)[0], batch_tokens[i]), f"sample {i}"
    after = model(**batch).logits.detach()
    assert torch.equal(before, after)
    assert visual_token_stats(model) is None
    # the decoder saw fewer visual tokens than the prompt held, for every sample with an image
    for n_in, n_mean in zip(stats["input"], stats["mean_per_layer"]):
        assert (n_mean < n_in) if n_in else n_mean == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name,params",
    [p for p in PRUNING if p[0] != "fastv"],
    ids=[f"{n}-{i}" for i, (n, _) in enumerate(PRUNING) if n != "fastv"],
)
def test_cached_generation_equals_a_cache_free_forward(models, family, name, params):
    """Decoding steps see exactly what a full forward of prompt + generated tokens sees.

    (FastV is left out: its choice depends on the last prompt token, which differs between the
    two runs by construction.)
    """
    model = models[family]
    inputs = _collate(model, _singles(model, family))
    with tokenlean.patch(model, name, **params):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = dict(inputs)
        generated = out.sequences[:, inputs["input_ids"].shape[1] : -1]
        full["input_ids"] = out.sequences[:, :-1]
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1)
        if family.startswith("qwen"):
            full["mm_token_type_ids"] = (full["input_ids"] == model.config.image_token_id).int()
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits[:, -1]
    torch.testing.assert_close(out.logits[-1], logits, atol=5e-5, rtol=1e-4)


def _limit_inputs(model, inputs: dict, kept: list[list[int]], positions: str) -> tuple[dict, list]:
    """The unpatched model's inputs with only the kept image tokens, and the kept features."""
    mm = model.model
    image_id = model.config.image_token_id
    features = mm.get_image_features(
        **{k: inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}
    ).pooler_output
    subset = [f[torch.tensor(k)] for f, k in zip(features, kept)]
    rows, pos_rows, image_index = [], [], 0
    orig_pos = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    if model.config.model_type.startswith("qwen"):
        orig_pos = mm.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs["mm_token_type_ids"],
        )[0]  # fmt: skip
    for b, row in enumerate(inputs["input_ids"]):
        keep = inputs["attention_mask"][b].bool().clone()
        image_cols = (row == image_id).nonzero().squeeze(1)
        keep[image_cols] = False
        start = 0
        while start < len(image_cols):
            n = features[image_index].shape[0]
            keep[image_cols[start : start + n][torch.tensor(kept[image_index])]] = True
            start, image_index = start + n, image_index + 1
        rows.append(keep.nonzero().squeeze(1))
        pos_rows.append(orig_pos[..., b, keep])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    lead = orig_pos.shape[:-2]
    pos = torch.ones(*lead, len(rows), width, dtype=torch.long)
    for b, cols in enumerate(rows):
        ids[b, width - len(cols) :] = inputs["input_ids"][b, cols]
        mask[b, width - len(cols) :] = 1
        pos[..., b, width - len(cols) :] = pos_rows[b]
    out = {"input_ids": ids, "attention_mask": mask}
    if positions == "original":
        out["position_ids"] = pos
    return out, subset


# contiguous positions are refused on M-RoPE models (Qwen2-VL, Qwen2.5-VL; see test_bad_input)
_LAYOUTS = [
    (f, p)
    for f in FAMILIES
    for p in ("original", "contiguous")
    if not (f.startswith("qwen") and p == "contiguous")
]


@pytest.mark.parametrize("family,positions", _LAYOUTS)
@pytest.mark.parametrize("name", ["todre", "divprune", "random_prune", "pool_prune"])
def test_stage_one_equals_the_unpatched_model_fed_the_kept_tokens(models, family, positions, name):
    model = models[family]
    inputs = _collate(model, _singles(model, family))
    params = {"retain_ratio": 0.3, "positions": positions}
    if name == "todre":
        params["stage2"] = False
    with tokenlean.patch(model, name, **params):
        pruned = _last_logits(model, inputs)
        kept = visual_token_stats(model)["kept"]
    limit, subset = _limit_inputs(model, inputs, kept, positions)
    if name == "pool_prune":  # pooled features are averages, not a subset: feed the patch's own
        captured = {}
        with tokenlean.patch(model, name, **params):
            handle = model.model.language_model.register_forward_pre_hook(
                _capture(captured, "embeds", "inputs_embeds"), with_kwargs=True
            )
            _last_logits(model, inputs)
            handle.remove()
        image = limit["input_ids"] == model.config.image_token_id
        subset = [captured["embeds"][image]]
    mm = model.model
    original = mm.get_image_features

    def fed(*args, **kwargs):
        out = original(*args, **kwargs)
        out.pooler_output = list(subset) if name != "pool_prune" else subset
        return out

    mm.get_image_features = fed
    try:
        feed = dict(limit)
        for key in ("pixel_values", "image_sizes", "image_grid_thw"):
            if key in inputs:
                feed[key] = inputs[key]
        if family.startswith("qwen"):
            feed["mm_token_type_ids"] = (feed["input_ids"] == model.config.image_token_id).int()
        with torch.no_grad():
            direct = model(**feed).logits[:, -1]
    finally:
        del mm.get_image_features
    torch.testing.assert_close(pruned, direct, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_keeps_the_most_attended_tokens_of_eager_attention(family):
    model = tiny_model(family, attn_implementation="eager")
    inputs = tiny_vlm_inputs(model, images=[MIXED[family][0]], seed=3)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attention = out.attentions[0][0].mean(0)[-1]  # layer K - 1 = 0, head-averaged, last row
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    k = round(0.5 * len(visual))
    expected = sorted(visual[attention[visual].argsort(descending=True)[:k]].tolist())
    with tokenlean.patch(model, "fastv", retain_ratio=0.5, layer=1):
        with torch.no_grad():
            cached = model(**inputs, use_cache=True).past_key_values
        stats = visual_token_stats(model)
    assert stats["decoder_kept"][0] == expected
    length = inputs["input_ids"].shape[1]
    assert cached.layers[0].keys.shape[2] == length
    assert cached.layers[1].keys.shape[2] == length - (len(visual) - k)


@pytest.mark.parametrize("family", FAMILIES)
def test_todre_stage2_share_matches_eager_attention_and_empties_the_cache(family):
    model = tiny_model(family, attn_implementation="eager")
    inputs = tiny_vlm_inputs(model, images=[MIXED[family][0]], seed=4)
    ids = inputs["input_ids"][0]
    visual = ids == model.config.image_token_id
    with torch.no_grad():
        weights = model(**inputs, output_attentions=True).attentions[0][0].mean(0)  # layer 0
    first = int(visual.nonzero()[0])
    text_rows = [i for i in range(first, len(ids)) if not visual[i]]
    expected = weights[text_rows][:, visual].sum(-1).mean().item()
    with tokenlean.patch(model, "todre", retain_ratio=1.0, relevance_layer=1, tau=1.0):
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        stats = visual_token_stats(model)
    assert stats["text_to_visual_attention"][0] == pytest.approx(expected, abs=1e-5)
    assert stats["stage2_dropped"] == [True]
    assert cache.layers[1].keys.shape[2] == len(ids) - int(visual.sum())
    with tokenlean.patch(model, "todre", retain_ratio=1.0, relevance_layer=1, tau=0.0):
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        assert visual_token_stats(model)["stage2_dropped"] == [False]
    assert cache.layers[1].keys.shape[2] == len(ids)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_cls_row_equals_the_vision_towers_eager_attention(family):
    model = tiny_model(family, attn_implementation="eager")
    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    attention = _cls_attention_module(model.model, model.config)
    layer_index = len(tower.encoder.layers) - 1  # the last layer (the paper's), not LLaVA's feature layer -2
    assert attention is tower.encoder.layers[layer_index].self_attn
    captured = {}
    handle = attention.register_forward_pre_hook(_capture(captured, "h", "hidden_states"), with_kwargs=True)
    with torch.no_grad():
        out = tower(pixels, output_attentions=True)
    handle.remove()
    expected = out.attentions[layer_index].mean(1)[:, 0]
    torch.testing.assert_close(_cls_row(attention, captured["h"]), expected, atol=1e-6, rtol=1e-5)


def test_todre_pivot_is_the_cls_argmax_and_is_kept(models):
    model = models["llava"]
    inputs = tiny_vlm_inputs(model, seed=5)
    captured = {}
    tower_attention = _cls_attention_module(model.model, model.config)
    handle = tower_attention.register_forward_pre_hook(
        _capture(captured, "h", "hidden_states"), with_kwargs=True
    )
    with tokenlean.patch(model, "todre", retain_ratio=0.25, stage2=False):
        _last_logits(model, inputs)
        kept = visual_token_stats(model)["kept"][0]
    handle.remove()
    pivot = int(_cls_row(tower_attention, captured["h"])[0, 1:].argmax())
    assert pivot in kept and len(kept) == 4


def test_pool_prune_skips_llava_next_newlines_and_keeps_window_centres(models):
    model = models["llava_next"]
    inputs = tiny_vlm_inputs(model, images=[(32, 64)], seed=6)
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    ).pooler_output[0]
    newline = (features == model.model.image_newline).all(-1).nonzero().squeeze(1).tolist()
    assert newline  # the tiny AnyRes layout has newline tokens
    with tokenlean.patch(model, "pool_prune", retain_ratio=0.3):
        _last_logits(model, inputs)
        kept = visual_token_stats(model)["kept"][0]
    assert not set(kept) & set(newline)
    assert kept == sorted(kept) and 1 <= len(kept) <= round(0.3 * features.shape[0])


def test_retain_tokens_larger_than_the_image_keeps_all_with_one_warning(models):
    model = models["llava"]
    inputs = tiny_vlm_inputs(model, batch=2)
    logits = _last_logits(model, inputs)
    with (
        tokenlean.patch(model, "divprune", retain_tokens=1000),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        patched = _last_logits(model, inputs)
        _last_logits(model, inputs)
    assert torch.equal(logits, patched)
    assert len([w for w in caught if "retain_tokens=1000" in str(w.message)]) == 1


def test_bench_spec_builds_every_method():
    method = tokenlean.parse_method_spec(
        "todre:retain_ratio=0.1,criterion=k_center,relevance_layer=20,pivot=center"
    )
    assert method.retain_ratio == 0.1 and method.relevance_layer == 20 and method.pivot == "center"
    assert tokenlean.parse_method_spec("todre:relevance_layer=0.5").relevance_layer == 0.5
    names = {info.name for info in tokenlean.methods()}
    assert {"todre", "fastv", "divprune", "random_prune", "pool_prune"} <= names
    assert isinstance(tokenlean.ToDRE(), tokenlean.compressors.visual.VisualPruning)


def test_bad_input(models):
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(MethodConfigError, match="retain_ratio"):
            tokenlean.ToDRE(retain_ratio=bad)
    with pytest.raises(MethodConfigError, match="relevance_layer"):
        tokenlean.ToDRE(relevance_layer=1.5)
    with pytest.raises(MethodConfigError, match="retain_tokens"):
        tokenlean.DivPrune(retain_tokens=0)
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        tokenlean.patch(tiny_model("llama"), "todre")
    llava, qwen = models["llava"], models["qwen2_vl"]
    with pytest.raises(MethodConfigError, match="must be in"):
        tokenlean.patch(llava, "todre", relevance_layer=3)  # the tiny decoder has 3 layers
    with pytest.raises(MethodConfigError, match="M-RoPE"):
        tokenlean.patch(qwen, "random_prune", positions="contiguous")
    with pytest.raises(PatchError, match="no \\[CLS\\]"):
        tokenlean.patch(qwen, "todre", pivot="cls")
    inputs = tiny_vlm_inputs(llava)
    reference = _last_logits(llava, inputs)
    with tokenlean.patch(llava, "todre"):
        with pytest.raises(PatchError, match="already applied"):
            tokenlean.patch(llava, "todre")
        with pytest.raises(PatchError, match="one visual pruning method"):
            tokenlean.patch(llava, "fastv")
        wrong = dict(
            inputs, input_ids=inputs["input_ids"][:, 1:], attention_mask=inputs["attention_mask"][:, 1:]
        )
        wrong["input_ids"] = torch.cat([wrong["input_ids"][:, :3], wrong["input_ids"][:, 4:]], dim=1)
        wrong["attention_mask"] = wrong["attention_mask"][:, 1:]
        with pytest.raises(ValueError, match="image tokens"):
            llava(**wrong)
    prepending = tokenlean.patch(llava, "token_prepending", placeholder_id=5, exit_layer=2)
    with pytest.raises(PatchError, match="token_prepending"):
        tokenlean.patch(llava, "todre")
    prepending.remove()
    assert torch.equal(_last_logits(llava, inputs), reference)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("name", ["todre", "divprune", "random_prune"])
def test_contiguous_generation_equals_the_unpatched_model_generating_from_the_kept_tokens(
    models, family, name
):
    """The decoding steps, against an independent reference: with contiguous positions, the pruned
    model's ``generate()`` is the unpatched model's ``generate()`` on the shortened prompt."""
    model = models[family]
    inputs = _collate(model, _singles(model, family))
    params = {"retain_ratio": 0.3, "positions": "contiguous"}
    if name == "todre":
        params["stage2"] = False
    settings = dict(
        max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with tokenlean.patch(model, name, **params):
        pruned = model.generate(**inputs, **settings)
        kept = visual_token_stats(model)["kept"]
    limit, subset = _limit_inputs(model, inputs, kept, "contiguous")
    embeds = model.get_input_embeddings()(limit["input_ids"])
    image = (limit["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(image, torch.cat(subset).to(embeds.dtype))
    direct = model.generate(inputs_embeds=embeds, attention_mask=limit["attention_mask"], **settings)
    new = inputs["input_ids"].shape[1]
    assert torch.equal(pruned.sequences[:, new:], direct.sequences)  # from inputs_embeds: new tokens only
    for step_pruned, step_direct in zip(pruned.logits, direct.logits):
        torch.testing.assert_close(step_pruned, step_direct, atol=2e-5, rtol=1e-4)
