"""Block retrieval (InfLLM's training-free scoring, landmark scoring): the cache, the layout, the patch."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf

import tokenlean
from tokenlean import zoo
from tokenlean.attention import block_cache
from tokenlean.attention.block_cache import BlockRetrievalCache
from tokenlean.attention.block_retrieval import BlockRetrieval
from tokenlean.errors import PatchError
from tokenlean.testing import tiny_model

SMALL = dict(block_size=8, sink_tokens=4, window=16, chunk_size=16)  # blocks of 8 behind a 16-token window


def _ids(length, seed=0, batch=1):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _one_layer(attn="sdpa", kv_heads=1):
    """A one-layer Llama: its keys and values depend only on each token and its position."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    config._attn_implementation = attn
    return tf.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_top_k_covering_every_block_equals_full_attention(family, attn):
    model = tiny_model(family, attn_implementation=attn)
    ids = _ids(300, batch=2)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with tokenlean.patch(model, "block_retrieval", top_k=64, **SMALL):  # 300 tokens: < 64 blocks
            chunked = model(input_ids=ids).logits  # 19 chunks of 16 through the cache
            prefill = model(input_ids=ids[:, :250], use_cache=True)
            steps = [prefill.logits]
            cache = prefill.cache
            for t in range(250, 300):
                out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
                cache = out.cache
                steps.append(out.logits)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert isinstance(cache, BlockRetrievalCache) and cache.get_seq_length() == 300


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_retrieval_attends_sinks_retrieved_blocks_and_window_at_layout_positions(attn):
    """One layer, one key/value head: the patched output equals the model run on the layout's tokens."""
    model = _one_layer(attn)
    ids = _ids(200, seed=1)
    handle = tokenlean.patch(model, "block_retrieval", top_k=3, **SMALL)
    method = handle.method
    chosen = []
    retrieve = method._retrieve

    def record(layer, plan, query, scale):
        blocks = retrieve(layer, plan, query, scale)
        chosen.append((plan, blocks))
        return blocks

    method._retrieve = record
    with torch.no_grad():
        out = model(input_ids=ids[:, :192], use_cache=True)  # 12 chunks; the last ones retrieve
        cache = out.cache
        last_chunk = out.logits[0, -16:]
        step = model(input_ids=ids[:, 192:193], cache=cache, use_cache=True).logits[0, -1]
    handle.remove()
    plan, blocks = chosen[-1]
    assert plan.new == 1 and not plan.passthrough and blocks.shape == (1, 1, 3)

    def layout_tokens(plan, blocks):
        slots = list(range(plan.sinks))
        for b in blocks[0, 0].tolist():
            start = SMALL["sink_tokens"] + b * SMALL["block_size"]
            slots += list(range(start, start + SMALL["block_size"]))
        return slots + list(range(plan.local_start, plan.past))

    with torch.no_grad():
        slots = layout_tokens(plan, blocks) + [192]
        expected = model(input_ids=ids[:, slots]).logits[0, -1]
        torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-5)
        plan, blocks = chosen[-2]  # the last prefill chunk: 16 queries sharing their retrieval
        assert plan.new == 16 and plan.past == 176
        slots = layout_tokens(plan, blocks) + list(range(176, 192))
        expected = model(input_ids=ids[:, slots]).logits[0, -16:]
        torch.testing.assert_close(last_chunk, expected, atol=1e-5, rtol=1e-5)


def test_training_free_scoring_picks_the_block_whose_keys_match_the_query():
    method = BlockRetrieval(top_k=1, block_size=4, sink_tokens=0, window=4, chunk_size=4, representatives=1)

    class Rotary:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))

    method._rotary, method._landmark_token = Rotary(), None
    cache = BlockRetrievalCache(0, 4, 4, 1, num_layers=1)
    keys = torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    keys[0, 0, 12:16] += torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])  # head 0: block 3
    keys[0, 1, 28:32] += torch.tensor([0, 0, 0, 3.0, 0, 0, 0, 0])  # head 1: block 7
    layer = cache.layers[0]
    layer.lazy_initialization(keys, keys)
    layer._key_buffer[:, :, :40] = keys
    layer.stored, cache.seen = 40, 40
    cache.rotated_at = torch.zeros(40, dtype=torch.long)  # stored as if at position 0: no rotation
    layer._views()
    method._cache = cache
    plan = cache.plan(1, torch.device("cpu"))
    assert plan.blocks == 9 and not plan.passthrough
    query = torch.zeros(1, 4, 1, 8)  # two query heads per key/value head
    query[0, :2, 0, 0] = 5.0
    query[0, 2:, 0, 3] = 5.0
    # representatives are keys before rotary encoding; a query given at position 0 meets them unrotated
    blocks = method._retrieve(layer, plan, query, scale=1.0)
    assert blocks[0, :, 0].tolist() == [3, 7]


def test_long_generate_attends_a_bounded_layout_and_stores_every_token():
    model = tiny_model("llama")
    ids = _ids(120)
    model.generation_config.eos_token_id = None
    handle = tokenlean.patch(model, "block_retrieval", top_k=2, **SMALL)
    seen = []
    context = handle.method._context

    def record(layer, plan, query, scale):
        keys, values = context(layer, plan, query, scale)
        seen.append(keys.shape[2])
        return keys, values

    handle.method._context = record
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=80, do_sample=False, pad_token_id=0, return_dict_in_generate=True
        )
    handle.remove()
    cache = out.cache
    bound = SMALL["sink_tokens"] + 2 * SMALL["block_size"] + SMALL["window"] + SMALL["block_size"] - 1
    assert seen and max(seen) <= bound
    assert cache.get_seq_length() == 199 and cache.layers[0].keys.shape[2] == 199  # every token kept
    assert cache.attended_length() <= bound


def test_generate_batches_beams_and_removal_restores_bitwise():
    model = tiny_model("qwen2")
    ids = _ids(100, batch=2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.generation_config.eos_token_id = None
        with tokenlean.patch(model, "block_retrieval", top_k=2, **SMALL):
            greedy = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
            beams = model.generate(
                input_ids=ids[:1], max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0
            )
            rows = [
                model.generate(input_ids=ids[i : i + 1], max_new_tokens=12, do_sample=False, pad_token_id=0)
                for i in range(2)
            ]
        after = model(input_ids=ids).logits
    assert greedy.shape == (2, 112) and beams.shape == (1, 106)
    assert torch.equal(greedy, torch.cat(rows))  # rows of a batch retrieve independently
    assert torch.equal(before, after)


def test_bad_input_is_refused_clearly(monkeypatch):
    for kwargs, match in [
        (dict(top_k=0), "top_k"),
        (dict(block_size=1), "block_size"),
        (dict(block_size=48, window=64, chunk_size=96), "window"),
        (dict(chunk_size=100), "chunk_size"),
        (dict(representatives=3), "representatives"),
        (dict(sink_tokens=4, scoring="landmark"), "sink_tokens"),
        (dict(scoring="lru"), "scoring"),
    ]:
        with pytest.raises(ValueError, match=match):
            BlockRetrieval(**kwargs)
    model = tiny_model("llama")
    with torch.no_grad(), tokenlean.patch(model, "block_retrieval", **SMALL):
        padded = torch.ones(2, 30, dtype=torch.long)
        padded[0, :5] = 0
        with pytest.raises(PatchError, match="unpadded"):
            model(input_ids=_ids(30, batch=2), attention_mask=padded)
        with pytest.raises(PatchError, match="cached without the patch"):
            filled = tf.DynamicCache()
            filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
            model(input_ids=_ids(5), cache=filled)
        with pytest.raises(PatchError, match="made for"):
            model(input_ids=_ids(5), cache=BlockRetrievalCache(4, 8, 32, 4, num_layers=3))
    with pytest.raises(PatchError, match="sliding-window"):
        tokenlean.patch(tiny_model("gemma2", attn_implementation="eager"), "block_retrieval", **SMALL)
    with pytest.raises(PatchError, match="landmark patch applied first"):
        tokenlean.patch(
            model,
            "block_retrieval",
            scoring="landmark",
            block_size=8,
            sink_tokens=8,
            window=16,
            chunk_size=16,
        )
    # offloading (or any growth of a CPU store) that would exhaust host memory is refused
    monkeypatch.setattr(block_cache, "host_memory_available", lambda: 1 << 20)
    with torch.no_grad(), tokenlean.patch(model, "block_retrieval", offload=True, **SMALL):
        model(input_ids=_ids(100))  # within the initial buffer
        with pytest.raises(MemoryError, match="host memory"):
            model(input_ids=_ids(2000))
    with torch.no_grad():
        model(input_ids=_ids(10))  # the patch is gone with the with-block


def test_a_context_shorter_than_one_block_is_plain_attention():
    model = tiny_model("llama")
    ids = _ids(5)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with tokenlean.patch(model, "block_retrieval", **SMALL):
            got = model(input_ids=ids).logits
    assert torch.equal(got, full)


@pytest.fixture(scope="module")
def landmark_model():
    model, tokenizer = zoo.load("smollm2-135m")
    model.eval()
    method = tokenlean.LandmarkAttention(block_size=8)
    method.prepare(model, tokenizer)
    return model, tokenizer, method


def test_landmark_scoring_with_every_block_equals_the_landmark_patch_and_generates(landmark_model):
    model, tokenizer, landmark = landmark_model
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 6
    enc = tokenizer(text, return_tensors="pt")
    settings = dict(block_size=8, sink_tokens=8, window=16, chunk_size=16, scoring="landmark")
    with torch.no_grad(), pytest.warns(UserWarning, match="reference"):
        landmark._warned = False
        with tokenlean.patch(model, landmark):
            alone = model(**enc).logits
            with tokenlean.patch(model, "block_retrieval", top_k=64, **settings):
                covered = model(**enc).logits
            with tokenlean.patch(model, "block_retrieval", top_k=2, **settings):
                retrieved = model(**enc).logits
                model.generation_config.eos_token_id = None
                generated = model.generate(**enc, max_new_tokens=20, do_sample=False)
    torch.testing.assert_close(covered, alone, atol=1e-3, rtol=1e-3)  # 30 layers, chunked queries
    assert retrieved.shape == alone.shape and not torch.allclose(retrieved, alone, atol=1e-4)
    assert generated.shape[1] == enc["input_ids"].shape[1] + 20
    assert landmark._token not in generated[0].tolist()  # landmarks stay inside the model


def test_a_harness_variant_stacks_block_retrieval_on_the_landmark_patch(landmark_model):
    from tokenlean.eval.variants import _split_stack, make_variants
    from tokenlean.patching import active_patches

    model, tokenizer, _ = landmark_model
    spec = "landmark:block_size=8+block_retrieval:block_size=8,sink_tokens=8,window=16,chunk_size=16,scoring=landmark,top_k=2"
    baseline, stacked = make_variants([spec])
    assert stacked.name == "landmark+block_retrieval" and stacked.kind == "patch"
    assert [m.name for m in stacked.methods] == ["landmark", "block_retrieval"]
    record = stacked.record()
    assert record["method"] == "landmark+block_retrieval"
    assert record["params"]["landmark.block_size"] == 8 and record["params"]["block_retrieval.top_k"] == 2
    assert record["spec"].count("+") == 1 and record["spec"].startswith("landmark:")
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 6
    enc = tokenizer(text, return_tensors="pt")
    stacked.methods[0].prepare(model, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-kernel fallback note
        with stacked.applied(model):
            assert [h.method.name for h in active_patches(model)] == ["landmark", "block_retrieval"]
            got = model(**enc).logits
        landmark = tokenlean.LandmarkAttention(block_size=8)
        with (
            tokenlean.patch(model, landmark),
            tokenlean.patch(
                model,
                "block_retrieval",
                block_size=8,
                sink_tokens=8,
                window=16,
                chunk_size=16,
                scoring="landmark",
                top_k=2,
            ),
        ):
            expected = model(**enc).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert active_patches(model) == [] and all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items()
    )
    # a '+' inside an option value stays in the value; a method twice in one stack is refused
    assert _split_stack("landmark:delta=/runs/a+b+block_retrieval") == [
        "landmark:delta=/runs/a+b",
        "block_retrieval",
    ]
    with pytest.raises(ValueError, match="twice in one stack"):
        make_variants(["block_retrieval+block_retrieval:top_k=2"])
    assert baseline.methods == () and baseline.record()["spec"] is None
