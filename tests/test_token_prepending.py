"""Token Prepending and SentenceEncoder: rewrite semantics, padding, reversibility, readout, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenlean
from tokenlean import MethodConfigError, PatchError, UnsupportedModelError, zoo
from tokenlean.attention import SentenceEncoder, TokenPrepending, prepare_placeholder
from tokenlean.attention.prepending import PROMPTS, placeholder_id, preprocess_sentence
from tokenlean.testing import tiny_model

PST = 7  # placeholder id used with the tiny (tokenizer-less) models
SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing music on an instrument",
    'The committee said "no" to the plan?',
    "Stocks fell sharply after the announcement.",
    "A child kicks a ball in the park.",
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = zoo.load("smollm2-135m")
    return model, tokenizer


def _layer_inputs(model, **inputs):
    """The hidden states each decoder layer receives (after any earlier pre-hook, e.g. TP's)."""
    seen, hooks = [], []
    for layer in tokenlean.get_adapter(model).decoder_layers(model):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True
            )
        )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


# -- the rewrite rule on tiny models -----------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_placeholder_takes_the_last_token_state_before_each_layer_in_range(family):
    model = tiny_model(family)
    ids = torch.tensor([[5, 9, PST, 11, 12, 13, 14, 15]])
    plain = _layer_inputs(model, input_ids=ids)
    with tokenlean.patch(model, TokenPrepending(start_layer=1, exit_layer=2, placeholder_id=PST)):
        patched = _layer_inputs(model, input_ids=ids)
    assert torch.equal(patched[0], plain[0])  # below start: the plain placeholder embedding
    assert torch.equal(patched[1][0, 2], patched[1][0, -1])  # layer 1: placeholder := last token
    assert not torch.equal(plain[1][0, 2], plain[1][0, -1])
    assert not torch.equal(patched[2][0, 2], patched[2][0, -1])  # from exit on: not rewritten
    assert torch.equal(patched[1][0, :2], plain[1][0, :2])  # tokens before the placeholder unchanged
    assert not torch.allclose(patched[2][0, -1], plain[2][0, -1])  # later tokens saw the summary


def test_start_layer_zero_rewrites_the_embedding_too():
    model = tiny_model("llama")
    ids = torch.tensor([[5, PST, 11, 12, 13]])
    with tokenlean.patch(model, TokenPrepending(start_layer=0, exit_layer=3, placeholder_id=PST)):
        seen = _layer_inputs(model, input_ids=ids)
    assert all(torch.equal(h[0, 1], h[0, -1]) for h in seen)


def test_left_and_right_padding_give_the_one_by_one_result():
    model = tiny_model("llama")
    rows = [[5, PST, 11, 12, 13, 14], [6, PST, 21, 22]]
    method = TokenPrepending(start_layer=1, exit_layer=3, placeholder_id=PST)
    with tokenlean.patch(model, method), torch.no_grad():
        single = [model.model(input_ids=torch.tensor([r])).last_hidden_state[0, -1] for r in rows]
        for side in ("left", "right"):
            width = max(map(len, rows))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
                ids[i, span], mask[i, span] = torch.tensor(r), 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            for i, r in enumerate(rows):
                last = width - 1 if side == "left" else len(r) - 1
                torch.testing.assert_close(out[i, last], single[i], atol=1e-5, rtol=1e-5)


def test_rows_without_placeholder_and_decoding_steps_are_untouched():
    model = tiny_model("qwen2")
    ids = torch.tensor([[5, 9, 10, 11, 12]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        with tokenlean.patch(model, TokenPrepending(exit_layer=3, placeholder_id=PST)):
            assert torch.equal(model(input_ids=ids).logits, before)
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_removal_restores_logits_and_generation_bitwise(family):
    model = tiny_model(family)
    ids = torch.tensor([[5, PST, 11, 12, 13, 14], [0, 0, 6, PST, 21, 22]])
    mask = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with tokenlean.patch(model, "token_prepending", exit_layer=3, placeholder_id=PST):
            patched = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
        gen_after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(before, after) and torch.equal(gen, gen_after)
    assert not torch.allclose(before, patched)


def test_vision_language_model_finds_the_placeholder_through_inputs_embeds():
    model = tiny_model("llava_next")
    ids = torch.tensor([[5, 9, PST, 11, 12, 13]])
    plain = _layer_inputs(model, input_ids=ids)
    with tokenlean.patch(model, TokenPrepending(exit_layer=2, placeholder_id=PST)):
        patched = _layer_inputs(model, input_ids=ids)
    assert torch.equal(patched[1][0, 2], patched[1][0, -1])
    assert not torch.equal(plain[1][0, 2], plain[1][0, -1])


# -- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_layer": 3, "exit_layer": 3}, "greater than start_layer"),
        ({"start_layer": 4, "exit_layer": 2}, "greater than start_layer"),
        ({"start_layer": -1}, ">= 0"),
        ({"exit_layer": 1.5}, r"fraction in \(0, 1\]"),
        ({"exit_layer": 0.0}, r"fraction in \(0, 1\]"),
        ({"placeholder": " "}, "non-empty"),
        ({"placeholder_id": -3}, ">= 0"),
        ({"exit_layer": "7"}, "of type int | float"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(MethodConfigError, match=message):
        TokenPrepending(**kwargs)


def test_layer_range_resolves_fractions_and_checks_the_depth():
    assert TokenPrepending(exit_layer=0.25).layer_range(24) == range(1, 6)
    assert TokenPrepending(exit_layer=1.0).layer_range(24) == range(1, 24)
    assert TokenPrepending(start_layer=0, exit_layer=24).layer_range(24) == range(0, 24)
    with pytest.raises(MethodConfigError, match="beyond the model's 3 layers"):
        TokenPrepending(exit_layer=7).layer_range(3)
    with pytest.raises(MethodConfigError, match="must be greater than start_layer"):
        TokenPrepending(start_layer=2, exit_layer=0.1).layer_range(10)
    with pytest.raises(MethodConfigError, match="beyond"):
        tokenlean.patch(tiny_model("llama"), TokenPrepending(exit_layer=7, placeholder_id=PST))


def test_patch_without_a_placeholder_id_explains_what_to_do():
    model = tiny_model("llama")
    with pytest.raises(PatchError, match="prepare_placeholder"):
        tokenlean.patch(model, TokenPrepending(exit_layer=2))
    assert tokenlean.active_patches(model) == []


def test_spec_string_and_registry():
    method = tokenlean.parse_method_spec("token_prepending:start_layer=1,exit_layer=0.5")
    assert isinstance(method, TokenPrepending) and method.exit_layer == 0.5
    assert tokenlean.parse_method_spec("token_prepending:exit_layer=6").exit_layer == 6
    assert TokenPrepending(exit_layer=2).spec(changed_only=True) == "token_prepending:exit_layer=2"
    names = {m.name for m in tokenlean.methods()}
    assert "token_prepending" in names


# -- placeholder preparation on a real tokenizer -------------------------------------------------


def test_prepare_adds_one_token_once_and_leaves_other_tokens_alone(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    before, hidden = out.logits, out.hidden_states[-1]
    vocab = len(tokenizer)
    token_id = prepare_placeholder(model, tokenizer)
    assert prepare_placeholder(model, tokenizer) == token_id  # idempotent
    assert len(tokenizer) == vocab + 1 and token_id == vocab
    assert placeholder_id(model) == token_id
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == vocab + 1
    torch.testing.assert_close(embeddings[token_id], embeddings[:token_id].mean(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # the decoder's outputs are bitwise unchanged; the (tied) LM head is one row taller, and a
    # GEMM of another shape may block its sums differently (AVX-512 machines do), so the logits
    # of the old tokens agree to float rounding
    assert torch.equal(hidden, out.hidden_states[-1])
    torch.testing.assert_close(out.logits[..., :vocab], before, rtol=1e-5, atol=1e-4)
    # the placeholder absorbs the space before it: exactly one token more than without it
    plain = tokenizer('This sentence : "x" means')["input_ids"]
    with_pst = tokenizer('This sentence : <PST> "x" means')["input_ids"]
    assert with_pst == plain[:3] + [token_id] + plain[3:]


def test_a_reserved_token_is_used_without_growing_the_model(smollm2):
    model, tokenizer = smollm2
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    token_id = prepare_placeholder(model, tokenizer, "<|im_start|>")
    assert token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert model.get_input_embeddings().weight.shape[0] == rows and len(tokenizer) == size
    with pytest.raises(ValueError, match="non-empty"):
        prepare_placeholder(model, tokenizer, "")


# -- SentenceEncoder on smollm2-135m -----------------------------------------------------------


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("tp", [False, True])
def test_batched_and_one_by_one_agree(smollm2, pooling, tp):
    model, tokenizer = smollm2
    encoder = SentenceEncoder(
        model, tokenizer, token_prepending=TokenPrepending(exit_layer=4) if tp else False, pooling=pooling
    )
    batched = encoder.encode(SENTENCES, batch_size=3)
    single = torch.stack([encoder.encode([s])[0] for s in SENTENCES])
    assert batched.shape == (len(SENTENCES), 576)
    torch.testing.assert_close(batched, single, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_encoding_with_tp_leaves_the_model_exactly_as_it_was(smollm2):
    model, tokenizer = smollm2
    plain = SentenceEncoder(model, tokenizer, token_prepending=False)
    before = plain.encode(SENTENCES)
    with_tp = SentenceEncoder(model, tokenizer, token_prepending=True).encode(SENTENCES)
    assert tokenlean.active_patches(model) == []
    assert torch.equal(plain.encode(SENTENCES), before)
    assert not torch.allclose(before, with_tp)
    # the placeholder without TP's rewrite is a different input: TP's effect is not just one token
    no_rewrite = SentenceEncoder(model, tokenizer, prompt='This sentence : <PST> "{sentence}" means in one word:"',
                                 token_prepending=False).encode(SENTENCES)  # fmt: skip
    assert not torch.allclose(no_rewrite, with_tp)


def test_readout_layer_matches_output_hidden_states(smollm2):
    model, tokenizer = smollm2
    text = ["A quiet evening by the lake."]
    ids = tokenizer(PROMPTS["prompteol"].format(pst="", sentence=text[0]), return_tensors="pt").input_ids
    with torch.no_grad():
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(states) == 31
    for layer in (0, 5, 29, 30, -1, -2):
        encoder = SentenceEncoder(model, tokenizer, token_prepending=False, layer=layer, preprocess=False)
        got = encoder.encode(text, normalize=False)[0]
        torch.testing.assert_close(got, states[layer][0, -1].float(), atol=1e-5, rtol=1e-5)


def test_auto_mode_follows_an_active_patch(smollm2):
    model, tokenizer = smollm2
    method = TokenPrepending(exit_layer=5)
    method.prepare(model, tokenizer)
    explicit = SentenceEncoder(model, tokenizer, token_prepending=method).encode(SENTENCES)
    auto = SentenceEncoder(model, tokenizer, token_prepending="auto")
    plain = SentenceEncoder(model, tokenizer, token_prepending=False).encode(SENTENCES)
    assert torch.equal(auto.encode(SENTENCES), plain)
    with tokenlean.patch(model, method):
        assert torch.equal(auto.encode(SENTENCES), explicit)
        with pytest.raises(PatchError, match="differs"):
            SentenceEncoder(model, tokenizer, token_prepending=TokenPrepending(exit_layer=6)).encode(
                SENTENCES
            )


def test_sentence_transformers_style_call(smollm2):
    model, tokenizer = smollm2
    encoder = SentenceEncoder(model, tokenizer, prompt="pretended_cot", token_prepending=False)
    array = encoder.encode(SENTENCES[:2], convert_to_numpy=True, normalize_embeddings=False, task_name="STSB")
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (2, 576)
    assert not np.allclose(np.linalg.norm(array, axis=1), 1.0)
    one = encoder.encode(SENTENCES[0])
    assert one.shape == (576,)
    assert encoder.get_sentence_embedding_dimension() == 576
    sims = encoder.similarity(encoder.encode(SENTENCES[:2]), encoder.encode(SENTENCES[:3]))
    assert sims.shape == (2, 3) and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        encoder.encode(SENTENCES, batchsize=4)


def test_echo_and_mean_pooling_read_the_sentence_tokens(smollm2):
    model, tokenizer = smollm2
    echo = SentenceEncoder(model, tokenizer, prompt="echo", token_prepending=False, pooling="mean")
    ((ids, first, stop),) = echo._tokenize(["Dogs bark."], None)
    assert tokenizer.decode(ids[first:stop]).strip() == "Dogs bark."
    assert first > len(ids) // 2  # the second copy
    bare = SentenceEncoder(model, tokenizer, prompt=None, token_prepending=False, pooling="mean")
    ((ids, first, stop),) = bare._tokenize(["Dogs bark."], None)
    assert (first, stop) == (0, len(ids))


def test_custom_template_gets_the_placeholder_before_the_quoted_sentence(smollm2):
    model, tokenizer = smollm2
    encoder = SentenceEncoder(
        model, tokenizer, prompt="In short, '{sentence}' is about:", token_prepending=True
    )
    ((ids, _, _),) = encoder._tokenize(["Cats sleep."], "<PST>")
    assert tokenizer.decode(ids).startswith("In short,<PST> 'Cats sleep.'")


def test_preprocess_matches_the_official_batcher():
    assert preprocess_sentence("A dog runs") == "A dog runs."
    assert preprocess_sentence('He said "hi".') == "He said 'hi'."
    assert preprocess_sentence("Is it raining?") == "Is it raining."
    assert preprocess_sentence("  ends with quote'  ") == "ends with quote'"


def test_bad_input_gives_clear_errors(smollm2):
    model, tokenizer = smollm2
    encoder = SentenceEncoder(model, tokenizer, token_prepending=False)
    with pytest.raises(ValueError, match="empty: nothing to encode"):
        encoder.encode([])
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        encoder.encode(["fine", "   "])
    with pytest.raises(TypeError, match="sentence 1 is int"):
        encoder.encode(["fine", 3])
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode(None)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["fine"], batch_size=0)
    with pytest.raises(ValueError, match="out of range for a model with 30 layers"):
        SentenceEncoder(model, tokenizer, layer=31)
    with pytest.raises(ValueError, match="out of range"):
        SentenceEncoder(model, tokenizer, layer=-32)
    with pytest.raises(ValueError, match="unknown prompt 'promptEOL'"):
        SentenceEncoder(model, tokenizer, prompt="promptEOL")
    with pytest.raises(ValueError, match="pooling"):
        SentenceEncoder(model, tokenizer, pooling="max")
    with pytest.raises(MethodConfigError, match="beyond the model's 30 layers"):
        SentenceEncoder(model, tokenizer, token_prepending=TokenPrepending(exit_layer=40))
    with pytest.raises(TypeError, match="token_prepending"):
        SentenceEncoder(model, tokenizer, token_prepending="yes")


def test_long_sentences_are_truncated_with_a_warning_and_keep_the_prompt(smollm2):
    model, tokenizer = smollm2
    encoder = SentenceEncoder(model, tokenizer, token_prepending=True, max_length=40)
    long = " ".join(["word"] * 200)
    with pytest.warns(UserWarning, match="1 sentence"):
        rows = encoder._tokenize([long, "short one"], "<PST>")
    assert len(rows[0][0]) <= 40
    assert tokenizer.decode(rows[0][0]).endswith('" means in one word:"')
    with pytest.warns(UserWarning, match="truncated"):
        vectors = encoder.encode([long, "short one"])
    assert vectors.shape == (2, 576) and torch.isfinite(vectors).all()
    with pytest.raises(ValueError, match="no room"):
        SentenceEncoder(model, tokenizer, prompt="knowledge", max_length=10).encode([long])


def test_model_family_the_adapters_do_not_know():
    minilm, tokenizer = zoo.load("minilm-l6")
    with pytest.raises(UnsupportedModelError, match="supported architectures"):
        SentenceEncoder(minilm, tokenizer)
