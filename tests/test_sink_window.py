"""The bundled sink + sliding-window attention: what each token can see, and StreamingLLM eviction."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

import tokenlean
from tokenlean import MethodConfigError, PatchError
from tokenlean.attention.kv_cache import SinkWindowCache
from tokenlean.attention.sink_window import sink_window_mask
from tokenlean.testing import tiny_model

SINKS, WINDOW, LAYERS = 2, 4, 3  # receptive field of the last token: sinks + LAYERS * (WINDOW - 1) back
MODES = ["evict", "mask"]


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _ids(length, seed, batch=1):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _one_layer_llama(attn="sdpa"):
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    config._attn_implementation = attn
    return tf.LlamaForCausalLM(config).eval()


def _greedy(model, ids, new_tokens, **kwargs):
    model.generation_config.eos_token_id = None  # always exactly new_tokens tokens
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=kwargs.pop("attention_mask", torch.ones_like(ids)),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )


# -- the pattern (both modes) -------------------------------------------------------------------


def test_mask_pattern():
    positions = torch.arange(8)[None]
    mask = sink_window_mask(positions, positions, sink_tokens=1, window=3)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 0, 1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 1, 0, 0],
            [1, 0, 0, 0, 1, 1, 1, 0],
            [1, 0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tokens_outside_sinks_and_window_are_invisible(attn, mode):
    model = tiny_model("llama", attn_implementation=attn)
    ids = _ids(20, 1)
    last = ids.shape[1] - 1
    far = last - LAYERS * (WINDOW - 1) - 1  # beyond the last token's receptive field, not a sink
    assert far >= SINKS

    def perturbed(pos):
        out = ids.clone()
        out[0, pos] = (out[0, pos] + 7) % 100 + 3
        return out

    base = _logits(model, ids)[0, last]
    assert not torch.allclose(base, _logits(model, perturbed(far))[0, last]), "unpatched model should see it"
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW, mode=mode):
        ref = _logits(model, ids)[0, last]
        assert torch.allclose(ref, _logits(model, perturbed(far))[0, last], atol=1e-6)
        assert not torch.allclose(ref, _logits(model, perturbed(0))[0, last], atol=1e-4)  # a sink
        assert not torch.allclose(ref, _logits(model, perturbed(last - 1))[0, last], atol=1e-4)  # in window


@pytest.mark.parametrize("mode", MODES)
def test_sdpa_and_eager_agree_under_patch(mode):
    ids = _ids(18, 2, batch=2)
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_model("qwen2", attn_implementation=attn)
        with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW, mode=mode):
            outs.append(_logits(model, ids))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_left_padding_counts_positions_from_the_first_real_token(mode):
    model = tiny_model("llama")
    ids = _ids(16, 3)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    batch = torch.cat([padded, torch.randint(3, 100, (1, 16 + pad))], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW, mode=mode):
        alone = _logits(model, ids)[0]
        in_batch = _logits(model, batch, attention_mask=mask)[0, pad:]
    assert torch.allclose(alone, in_batch, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_incremental_decoding_matches_full_forward(mode):
    model = tiny_model("llama")
    ids = _ids(10, 4)
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW, mode=mode):
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        full = _logits(model, generated, use_cache=False)
    # each generated token is the argmax of the full (uncached) forward at the step before it: in
    # evict mode a long pass treats every query exactly as token-by-token decoding would
    predicted = full[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(predicted, generated[0, ids.shape[1] :])


# -- eviction (mode="evict", the default) ---------------------------------------------------------


def test_eviction_keeps_the_cache_at_sinks_plus_window():
    sinks, window, new_tokens = 4, 16, 60
    model = tiny_model("llama")
    sizes = []

    def record(module, args, kwargs, output):
        sizes.append([layer.keys.shape[2] for layer in output.cache.layers])

    hook = model.register_forward_hook(record, with_kwargs=True)
    with tokenlean.patch(model, "sink_window", sink_tokens=sinks, window=window):
        assert tokenlean.SinkWindowAttention().mode == "evict"
        out = _greedy(model, _ids(12, 5), new_tokens)
    hook.remove()
    assert out.sequences.shape[1] == 12 + new_tokens
    assert isinstance(out.cache, SinkWindowCache)
    assert len(sizes) == new_tokens  # one prefill, then one pass per token
    assert max(max(step) for step in sizes) == sinks + window  # never grows beyond
    assert sizes[-1] == [sinks + window] * LAYERS
    assert out.cache.get_seq_length() == 12 + new_tokens - 1  # tokens seen, not kept
    assert out.cache.kept_length() == sinks + window


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_within_sinks_plus_window_outputs_equal_full_attention_bitwise(family):
    sinks, window = 4, 16 if family != "gemma2" else 4  # gemma2's tiny local window is 8
    model = tiny_model(family)
    prompt_len, new_tokens = (10, 10) if family != "gemma2" else (4, 4)
    ids = _ids(prompt_len, 6, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    base_logits = _logits(model, ids, attention_mask=mask)
    base = _greedy(model, ids, new_tokens, attention_mask=mask)
    with tokenlean.patch(model, "sink_window", sink_tokens=sinks, window=window):
        logits = _logits(model, ids, attention_mask=mask)
        out = _greedy(model, ids, new_tokens, attention_mask=mask)
    assert prompt_len + new_tokens <= sinks + window
    assert torch.equal(logits, base_logits)
    assert torch.equal(out.sequences, base.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, base.logits))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_beyond_the_window_logits_equal_a_recomputation_at_in_cache_positions(attn):
    """StreamingLLM's rule: with tokens 0..S-1 and the last W cached, the next token is scored
    as if the kept tokens were the whole text (positions 0..S+W-1). One layer: keys depend on
    their token only, so a recomputation from scratch of the kept tokens is the exact reference."""
    sinks, window = 3, 5
    model = _one_layer_llama(attn)
    ids = _ids(40, 7)
    got, prefill = [], None
    with torch.no_grad(), tokenlean.patch(model, "sink_window", sink_tokens=sinks, window=window):
        out = model(input_ids=ids[:, :20])  # a prefill longer than sinks + window, then decoding
        prefill, cache = out.logits[0], out.cache
        assert cache.kept_length() == sinks + window
        for t in range(20, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], cache=cache)
            cache = out.cache
            got.append(out.logits[0, -1])
    with torch.no_grad():  # unpatched: the kept tokens as a text of their own
        for i, t in enumerate(range(20, ids.shape[1])):
            kept = torch.cat([ids[:, :sinks], ids[:, t - window + 1 : t + 1]], dim=1)
            ref = model(input_ids=kept).logits[0, -1]
            assert torch.allclose(got[i], ref, atol=1e-5, rtol=0), (t, (got[i] - ref).abs().max())
        for t in range(20):  # every query of the long prefill, too
            kept = (
                ids[:, : t + 1]
                if t < sinks + window
                else torch.cat([ids[:, :sinks], ids[:, t - window + 1 : t + 1]], 1)
            )
            ref = model(input_ids=kept).logits[0, -1]
            assert torch.allclose(prefill[t], ref, atol=1e-5, rtol=0), (t, (prefill[t] - ref).abs().max())


@pytest.mark.parametrize("chunk", [1, 3, 25])
def test_a_long_pass_equals_token_by_token_decoding(chunk):
    model = tiny_model("llama")
    ids = _ids(25, 8)
    with torch.no_grad(), tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        full = model(input_ids=ids, use_cache=False).logits
        cache, pieces = None, []
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], cache=cache, use_cache=True)
            cache = out.cache
            pieces.append(out.logits)
    assert cache.kept_length() == SINKS + WINDOW
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padded_batch_equals_rows_run_alone(family):
    model = tiny_model(family)
    short, long = _ids(7, 9), _ids(12, 10)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        together = _greedy(model, batch, 15, attention_mask=mask)
        rows = [_greedy(model, short, 15), _greedy(model, long, 15)]
        alone = _logits(model, short)[0]
        padded = _logits(model, batch, attention_mask=mask)[0, 5:]
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.equal(together.sequences[0, 12:], rows[0].sequences[0, 7:])
    assert torch.equal(together.sequences[1], rows[1].sequences[0])
    for step, (a, b) in enumerate(zip(together.logits, zip(rows[0].logits, rows[1].logits))):
        assert torch.allclose(a, torch.cat(b), atol=1e-5), step
    assert [layer.keys.shape[2] for layer in together.cache.layers] == [SINKS + WINDOW] * LAYERS


def test_cache_arguments_both_names_and_foreign_caches():
    model = tiny_model("llama")
    ids = _ids(12, 11)
    with torch.no_grad(), tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        first = model(input_ids=ids[:, :10], cache=DynamicCache())  # empty, another kind: replaced
        assert isinstance(first.cache, SinkWindowCache) and first.cache.kept_length() == SINKS + WINDOW
        a = model(input_ids=ids[:, 10:], cache=first.cache).logits
        again = model(input_ids=ids[:, :10])
        with pytest.warns(FutureWarning, match="past_key_values"):
            b = model(input_ids=ids[:, 10:], past_key_values=again.cache).logits
        assert torch.equal(a, b)
    filled = model(input_ids=ids[:, :4]).cache  # unpatched: a filled DynamicCache
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        with pytest.raises(PatchError, match="cached without the patch"):
            model(input_ids=ids[:, 4:], cache=filled)
        other = SinkWindowCache(SINKS + 1, WINDOW, LAYERS)
        with pytest.raises(PatchError, match="sink_tokens=3"):
            model(input_ids=ids, cache=other)


def test_removal_restores_the_model_bitwise():
    model = tiny_model("qwen2")
    ids = _ids(20, 12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    before = (_logits(model, ids, attention_mask=mask), _greedy(model, ids, 20, attention_mask=mask))
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        patched = _greedy(model, ids, 20, attention_mask=mask)
    after = (_logits(model, ids, attention_mask=mask), _greedy(model, ids, 20, attention_mask=mask))
    assert not torch.equal(patched.sequences, before[1].sequences)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1].sequences, after[1].sequences)
    assert type(after[1].cache) is DynamicCache
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model.model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sink_tokens=-1), "sink_tokens must be >= 0"),
        (dict(window=0), "window must be >= 1"),
        (dict(mode="evicted"), re.escape("mode must be of type 'evict' | 'mask', got 'evicted'")),
        (dict(mode=None), "mode must be of type"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(MethodConfigError, match=message):
        tokenlean.SinkWindowAttention(**kwargs)


def test_mode_in_method_specs():
    assert tokenlean.parse_method_spec("sink_window:mode=mask").mode == "mask"
    with pytest.raises(MethodConfigError, match="cannot read 'stream'"):
        tokenlean.parse_method_spec("sink_window:mode=stream")
    with pytest.raises(ValueError, match="num_layers"):
        SinkWindowCache(4, 0, 2)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("gemma3", dict(window=4), "inv_freq"),  # one rotary base per layer type
        ("qwen2_vl", {}, "M-RoPE"),
        ("gemma2", dict(window=1024), "exceeds the model's own sliding window"),
    ],
)
def test_models_evict_mode_cannot_serve_are_refused(family, kwargs, message):
    model = tiny_model(family)
    with pytest.raises(PatchError, match=f"(?s){message}.*mode='mask'"):
        tokenlean.patch(model, "sink_window", **kwargs)
    assert tokenlean.active_patches(model) == []
    tokenlean.patch(model, "sink_window", mode="mask", **kwargs).remove()  # the mask mode serves them


def test_cache_is_not_croppable_and_needs_the_patch():
    model = tiny_model("llama")
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        cache = model(input_ids=_ids(8, 13)).cache
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    with pytest.raises(RuntimeError, match="through the sink_window patch"):
        model(input_ids=_ids(2, 14), cache=cache)


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_streaming_on_smollm2():
    model, tokenizer = tokenlean.zoo.load("smollm2-135m")
    text = "The history of the city begins with a small settlement on the river. " * 6
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    sinks, window = 4, 32
    assert ids.shape[1] > sinks + window
    with tokenlean.patch(model, "sink_window", sink_tokens=sinks, window=window):
        short = _greedy(model, ids[:, :20], 8)
        out = _greedy(model, ids, 60)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits
            cache, steps = None, []
            for t in range(ids.shape[1]):
                step = model(input_ids=ids[:, t : t + 1], cache=cache)
                cache = step.cache
                steps.append(step.logits)
    base = _greedy(model, ids[:, :20], 8)
    assert torch.equal(short.sequences, base.sequences)  # within sinks + window: exactly the model
    assert all(torch.equal(a, b) for a, b in zip(short.logits, base.logits))
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [
        sinks + window
    ] * model.config.num_hidden_layers
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-3, rtol=0)
    assert (torch.cat(steps, dim=1)[0].argmax(-1) == full[0].argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_prefill_equals_one_long_pass(attn):
    """Passes of chunk_size tokens through the evicting cache give what one long pass gives."""
    model = tiny_model("llama", attn_implementation=attn)
    ids = _ids(41, seed=5, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW, chunk_size=1000):
            whole = model(input_ids=ids, attention_mask=mask, use_cache=True)
        with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW, chunk_size=7):
            chunked = model(input_ids=ids, attention_mask=mask, use_cache=True)
            no_cache = model(input_ids=ids, attention_mask=mask, use_cache=False)
    real = mask.bool()
    torch.testing.assert_close(chunked.logits[real], whole.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_cache.logits, chunked.logits)
    assert no_cache.cache is None and chunked.cache.kept_length() == whole.cache.kept_length()
    with pytest.raises(ValueError, match="chunk_size"):
        tokenlean.patch(model, "sink_window", chunk_size=0)
