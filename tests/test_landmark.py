"""Landmark attention: the grouped-softmax reference, the fused Triton kernel (interpreter mode on the
CPU), the ``landmark`` patch on smollm2-135m, and the ``train-landmark`` recipe (a few steps)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import tokenlean
from tokenlean import zoo
from tokenlean.attention.landmark import (
    LANDMARK_TOKEN,
    LandmarkAttention,
    block_index,
    fused_landmark_attention,
    grouped_softmax_attention,
    grouped_softmax_weights,
    insert_landmarks,
    kernel_unsupported_reason,
    landmark_attention,
    strip_landmarks,
)
from tokenlean.errors import MethodConfigError, OutputDirError, PatchError


def _literal(q, k, v, is_lm, key_mask=None):
    """The paper's grouped softmax written out per query, in float64 Python loops (no tensor tricks)."""
    batch, heads, q_len, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for b in range(batch):
        lm = [bool(x) for x in (is_lm[b] if is_lm.dim() == 2 else is_lm)]
        real = [True] * seq if key_mask is None else [bool(x) for x in key_mask[b]]
        blk = [sum(lm[:j]) for j in range(seq)]
        for h in range(heads):
            kh = h // (heads // kv_heads)
            for qi in range(q_len):
                i = seq - q_len + qi
                s = {
                    j: float(q[b, h, qi].double() @ k[b, kh, j].double()) / math.sqrt(dim)
                    for j in range(i + 1)
                }

                def members(block, upto, lm=lm, real=real, blk=blk):
                    return [t for t in range(upto) if not lm[t] and real[t] and blk[t] == block]

                shared = [
                    j
                    for j in range(i + 1)
                    if real[j]
                    and (
                        (lm[j] and blk[j] < blk[i] and members(blk[j], j)) or (not lm[j] and blk[j] == blk[i])
                    )
                ]
                if not shared:
                    continue
                top = max(s[j] for j in shared)
                z = sum(math.exp(s[j] - top) for j in shared)
                for j in shared:
                    g = math.exp(s[j] - top) / z
                    if not lm[j]:
                        out[b, h, qi] += g * v[b, kh, j].double()
                        continue
                    inner = members(blk[j], j)
                    m = max(s[t] for t in inner)
                    zz = sum(math.exp(s[t] - m) for t in inner)
                    for t in inner:
                        out[b, h, qi] += g * math.exp(s[t] - m) / zz * v[b, kh, t].double()
    return out


def _qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=torch.float32).to(dtype)
    return q, k, v


def _regular(seq, block):
    return torch.tensor([i % block == block - 1 for i in range(seq)])


# -- the reference --------------------------------------------------------------------------------


def test_block_index_counts_landmarks_strictly_before():
    lm = torch.tensor([0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    assert block_index(lm).tolist() == [0, 0, 0, 1, 1, 2, 3]


@pytest.mark.parametrize(
    "layout",
    [
        [3, 7, 11],  # regular-ish
        [2, 5, 6, 9],  # two landmarks in a row: an empty block never gates
        [],  # no landmark: plain causal attention
        [0, 12],  # a landmark first and last
    ],
)
def test_reference_equals_the_literal_grouped_softmax(layout):
    q, k, v = _qkv(2, 4, 2, 13, 8)
    lm = torch.zeros(2, 13, dtype=torch.bool)
    lm[:, layout] = True
    lm[1] = torch.roll(lm[1], 1)
    got = grouped_softmax_attention(q, k, v, lm)
    assert torch.allclose(got, _literal(q, k, v, lm), atol=1e-12)


def test_reference_with_fewer_queries_and_padding_equals_the_literal_one():
    q, k, v = _qkv(2, 2, 2, 12, 4)
    lm = _regular(12, 4)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    got = grouped_softmax_attention(q[:, :, -5:], k, v, lm, key_mask=mask)
    assert torch.allclose(got, _literal(q[:, :, -5:], k, v, lm, mask), atol=1e-12)


def test_without_landmarks_it_is_causal_softmax_attention():
    q, k, v = _qkv(1, 2, 2, 9, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = grouped_softmax_attention(q, k, v, torch.zeros(9, dtype=torch.bool))
    assert torch.allclose(got, expected, atol=1e-12)


def test_weights_rows_sum_to_one_and_landmarks_carry_no_value():
    q, k, v = _qkv(2, 3, 3, 20, 8)
    lm = _regular(20, 5)
    weights, gates = grouped_softmax_weights(q, k, lm)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 20, dtype=torch.float64), atol=1e-12)
    assert weights[..., lm].abs().max() == 0
    assert gates[..., ~lm].abs().max() == 0
    own = torch.arange(20)[:, None] // 5 == torch.arange(20)[None, :] // 5
    assert gates[..., own & lm[None]].abs().max() == 0  # a query never gates by its own block's landmark
    assert torch.triu(weights, diagonal=1).abs().max() == 0  # causal


def test_a_query_block_is_weighted_by_its_landmark_gate():
    q, k, v = _qkv(1, 1, 1, 8, 4)
    lm = _regular(8, 4)
    weights, gates = grouped_softmax_weights(q, k, lm)
    # the last query: block 0 (slots 0-2) takes exactly the gate of the landmark at slot 3
    assert torch.allclose(weights[0, 0, 7, :3].sum(), gates[0, 0, 7, 3], atol=1e-12)


def test_query_chunks_change_nothing():
    q, k, v = _qkv(2, 2, 1, 40, 8)
    lm = _regular(40, 6)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :5] = False
    whole = grouped_softmax_attention(q, k, v, lm, key_mask=mask, query_chunk=40)
    chunked = grouped_softmax_attention(q, k, v, lm, key_mask=mask, query_chunk=7)
    assert torch.allclose(whole, chunked, atol=1e-12)


def test_gradcheck_in_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 10, 4))
    lm = _regular(10, 4)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_softmax_attention(a, b, c, lm), (q, k, v))


def test_bad_inputs_are_refused_clearly():
    q, k, v = _qkv(1, 2, 2, 8, 4)
    with pytest.raises(TypeError, match="bool"):
        grouped_softmax_attention(q, k, v, torch.zeros(8))
    with pytest.raises(ValueError, match="is_landmark"):
        grouped_softmax_attention(q, k, v, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple"):
        grouped_softmax_attention(q[:, :1].expand(1, 3, 8, 4), k, v, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
        grouped_softmax_attention(q[0], k, v, torch.zeros(8, dtype=torch.bool))


# -- the fused kernel (TRITON_INTERPRET=1 from conftest) ---------------------------------------------


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "seq", "dim", "block", "dtype", "tol"),
    [
        (1, 2, 2, 64, 16, 16, torch.float32, 2e-5),
        (2, 4, 2, 70, 32, 16, torch.float32, 2e-5),  # grouped-query heads, an open last block
        (1, 2, 1, 96, 16, 32, torch.float32, 2e-5),
        (1, 2, 2, 48, 16, 16, torch.float16, 4e-3),
    ],
)
def test_kernel_forward_and_backward_equal_the_reference(batch, heads, kv_heads, seq, dim, block, dtype, tol):
    q, k, v = (t.requires_grad_() for t in _qkv(batch, heads, kv_heads, seq, dim, dtype=dtype, seed=3))
    assert kernel_unsupported_reason(q, k, v, block) is None
    out = fused_landmark_attention(q, k, v, block_size=block)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out.backward(grad)
    got = [out.detach().double(), *(t.grad.double() for t in (q, k, v))]
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = grouped_softmax_attention(q2, k2, v2, _regular(seq, block))
    ref.backward(grad.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, [ref.detach(), q2.grad, k2.grad, v2.grad]):
        err = (a - b).abs().max().item()
        assert err < tol * max(1.0, b.abs().max().item()), f"{name}: {err}"


def test_kernel_refuses_what_it_cannot_do():
    q, k, v = _qkv(1, 2, 2, 32, 16, dtype=torch.bfloat16)
    assert "bfloat16" in kernel_unsupported_reason(q, k, v, 16)
    q, k, v = _qkv(1, 2, 2, 32, 12, dtype=torch.float32)
    assert "head_dim" in kernel_unsupported_reason(q, k, v, 16)
    q, k, v = _qkv(1, 2, 2, 32, 16, dtype=torch.float32)
    assert "block_size" in kernel_unsupported_reason(q, k, v, 24)
    assert "decoding" in kernel_unsupported_reason(q[:, :, -1:], k, v, 16)
    with pytest.raises(ValueError, match="block_size"):
        fused_landmark_attention(q, k, v, block_size=24)


def test_dispatcher_uses_the_reference_for_irregular_layouts():
    q, k, v = _qkv(1, 2, 2, 32, 16, dtype=torch.float32)
    lm = _regular(32, 16)
    assert torch.allclose(
        landmark_attention(q, k, v, lm, block_size=16), grouped_softmax_attention(q, k, v, lm), atol=2e-5
    )
    odd = lm.clone()
    odd[5] = True
    assert torch.equal(
        landmark_attention(q, k, v, odd, block_size=16), grouped_softmax_attention(q, k, v, odd)
    )


# -- the patch on smollm2-135m ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = zoo.load("smollm2-135m")
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def prepared(smollm2):
    model, tokenizer = smollm2
    with torch.no_grad():
        before = model(
            **tokenizer("A short text to compare.", return_tensors="pt"), output_hidden_states=True
        )
    vocab = len(tokenizer)
    method = LandmarkAttention(block_size=8)
    method.prepare(model, tokenizer)
    return model, tokenizer, method, before, vocab


TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 2


def test_prepare_adds_one_token_with_the_mean_row_and_changes_nothing_else(prepared):
    model, tokenizer, method, before, vocab = prepared
    assert len(tokenizer) == vocab + 1
    token = tokenizer.convert_tokens_to_ids(LANDMARK_TOKEN)
    rows = model.get_input_embeddings().weight
    assert torch.allclose(rows[token], rows[:token].mean(0), atol=1e-6)
    method.prepare(model, tokenizer)  # idempotent
    assert len(tokenizer) == vocab + 1
    with torch.no_grad():
        after = model(**tokenizer("A short text to compare.", return_tensors="pt"), output_hidden_states=True)
    # the body is untouched (bitwise); the head gained a row, and a GEMM one column wider may round differently
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, before.hidden_states))
    assert torch.allclose(after.logits[..., :vocab], before.logits, atol=1e-4, rtol=0)


def test_insert_and_strip_landmarks():
    ids = torch.arange(10, 20)[None]
    new, mask, index = insert_landmarks(ids, landmark=99, block_size=4)
    assert new[0].tolist() == [10, 11, 12, 99, 13, 14, 15, 99, 16, 17, 18, 99, 19]
    assert mask.all()
    assert torch.equal(strip_landmarks(new[..., None], index)[..., 0], ids)
    padded = torch.tensor([[0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    new, mask, index = insert_landmarks(padded, landmark=99, block_size=4, attention_mask=attn)
    assert new[0].tolist()[:7] == [0, 0, 1, 2, 3, 99, 4] and mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    assert new[1].tolist() == [1, 2, 3, 99, 4, 5, 6, 99]


def test_short_text_matches_the_unpatched_model(prepared):
    model, tokenizer, method, before, vocab = prepared
    enc = tokenizer("A short text", return_tensors="pt")  # fewer than block_size - 1 tokens: no landmark
    with torch.no_grad():
        base = model(**enc).logits
        with tokenlean.patch(model, method), pytest.warns(UserWarning, match="reference"):
            method._warned = False
            got = model(**enc).logits
    assert torch.allclose(got[..., :vocab], base[..., :vocab], atol=1e-4)
    assert (got[..., -1] == torch.finfo(got.dtype).min).all()  # the landmark is never predicted


def test_pre_inserted_landmarks_give_the_same_logits_and_misplaced_ones_are_refused(prepared):
    model, tokenizer, method, _, _ = prepared
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), tokenlean.patch(model, method):
        auto = model(input_ids=ids).logits
        new, mask, index = insert_landmarks(ids, method._token, method.block_size)
        given = model(input_ids=new, attention_mask=mask).logits
        assert torch.equal(strip_landmarks(given, index), auto)
        bad = ids.clone()
        bad[0, 2] = method._token
        with pytest.raises(ValueError, match="not where landmark attention puts them"):
            model(input_ids=bad)
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(ids))


def test_generate_with_the_cache_equals_recomputing_without_it(prepared):
    model, tokenizer, method, _, _ = prepared
    enc = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad(), tokenlean.patch(model, method):
        out = model.generate(**enc, max_new_tokens=18, do_sample=False)  # crosses two block boundaries
        seq = enc["input_ids"]
        for _ in range(18):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    assert method._token not in out[0].tolist()


def test_a_left_padded_batch_row_generates_what_it_generates_alone(prepared):
    model, tokenizer, method, _, _ = prepared
    tokenizer.padding_side = "left"
    short = "Hello there, my friend, how are you doing on this fine day?"
    with torch.no_grad(), tokenlean.patch(model, method):
        batch = model.generate(
            **tokenizer([TEXT, short], return_tensors="pt", padding=True), max_new_tokens=10, do_sample=False
        )
        alone = model.generate(**tokenizer([short], return_tensors="pt"), max_new_tokens=10, do_sample=False)
    assert batch[1, -10:].tolist() == alone[0, -10:].tolist()


def test_removal_restores_the_model_bitwise(prepared):
    model, tokenizer, method, _, _ = prepared
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    forward = model.forward
    enc = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
        with tokenlean.patch(model, method):
            model(**enc)
        after = model(**enc).logits
    assert torch.equal(before, after)
    assert model.config._attn_implementation == impl and model.forward == forward
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_settings_and_an_unprepared_model_are_refused(smollm2):
    with pytest.raises(MethodConfigError, match="block_size"):
        LandmarkAttention(block_size=1)
    model, _ = zoo.load("smollm2-135m")
    with pytest.raises(PatchError, match="prepare"):
        tokenlean.patch(model, "landmark")


def test_a_tokenizer_that_cannot_take_a_new_token_is_refused_clearly(smollm2):
    model, tokenizer = smollm2

    class FixedVocabulary:  # e.g. a tiktoken encoding: a vocabulary with no API to add tokens
        def get_vocab(self):
            return tokenizer.get_vocab()

    with pytest.raises(PatchError, match="cannot add the <landmark> token"):
        LandmarkAttention().prepare(model, FixedVocabulary())


def test_the_kernel_path_of_the_patch_equals_the_reference_path(prepared):
    model, tokenizer, method, _, _ = prepared
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :30]
    with torch.no_grad():
        with tokenlean.patch(model, LandmarkAttention(block_size=16, kernel="reference")):
            ref = model(input_ids=ids).logits
        with tokenlean.patch(model, LandmarkAttention(block_size=16, kernel="triton")):
            fused = model(input_ids=ids).logits
    assert torch.allclose(fused, ref, atol=2e-3)


# -- train-landmark -----------------------------------------------------------------------------------


def _tiny_cfg(**kw):
    from tokenlean.landmark_train import LandmarkTrainConfig

    return LandmarkTrainConfig(
        **{
            "block_size": 16,
            "context": 192,  # 180 tokens: room for the recall exercises
            "max_steps": 3,
            "seqs_per_step": 2,
            "micro_batch": 1,
            "threads": 1,
            **kw,
        }
    )


def test_train_landmark_resumes_exactly_and_refuses_another_run(tmp_path):
    from safetensors.torch import load_file

    from tokenlean.landmark_train import train_landmark

    straight = train_landmark(tmp_path / "a", _tiny_cfg(), progress=False, final_eval=False)
    assert straight["steps"] == 3 and straight["delta_bytes"] < 20e6
    part = train_landmark(tmp_path / "b", _tiny_cfg(), progress=False, final_eval=False, stop_after=2)
    assert part["interrupted"]
    with pytest.raises(OutputDirError, match="another run"):
        train_landmark(tmp_path / "b", _tiny_cfg(), progress=False, final_eval=False)
    with pytest.raises(OutputDirError, match="other settings"):
        train_landmark(tmp_path / "b", _tiny_cfg(seed=1), progress=False, final_eval=False, resume=True)
    train_landmark(tmp_path / "b", _tiny_cfg(), progress=False, final_eval=False, resume=True)
    a = load_file(str(tmp_path / "a" / "delta" / "landmark_delta.safetensors"))
    b = load_file(str(tmp_path / "b" / "delta" / "landmark_delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert any(a[key].abs().max() > 0 for key in a if key.startswith("b."))  # the LoRA B matrices moved


def test_applying_the_delta_equals_the_hooked_training_model(tmp_path):
    from tokenlean.landmark_train import LandmarkDelta, apply_landmark_delta, train_landmark

    train_landmark(tmp_path / "r", _tiny_cfg(max_steps=2), progress=False, final_eval=False)
    model, tokenizer = zoo.load("smollm2-135m")
    model.eval()
    apply_landmark_delta(model, tokenizer, tmp_path / "r" / "delta")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :40]
    with torch.no_grad(), tokenlean.patch(model, LandmarkAttention(block_size=16)):
        merged = model(input_ids=ids).logits
    hooked_model, tok2 = zoo.load("smollm2-135m")
    hooked_model.eval()
    method = LandmarkAttention(block_size=16)
    method.prepare(hooked_model, tok2)
    delta = LandmarkDelta(hooked_model, 16, 32.0, hooked_model.config.landmark_token_id)
    state = torch.load(tmp_path / "r" / "checkpoints" / "checkpoint.pt", weights_only=False)["delta"]
    delta.load_state_dict(state)
    handles = delta.attach(hooked_model)
    with torch.no_grad(), tokenlean.patch(hooked_model, method):
        hooked = hooked_model(input_ids=ids).logits
    with torch.no_grad():
        lora_only = hooked_model(input_ids=ids).logits  # the LoRA hooks, plain attention, no landmarks
    for h in handles:
        h.remove()
    ablation = LandmarkAttention(block_size=16, delta=str(tmp_path / "r"), landmarks=False)
    with torch.no_grad(), tokenlean.patch(hooked_model, ablation):
        # (the landmark's own logit differs: the patch sets its tied row, the training hooks only its input)
        assert torch.allclose(hooked_model(input_ids=ids).logits[..., :-1], lora_only[..., :-1], atol=1e-5)
    with pytest.raises(MethodConfigError, match="landmarks"):
        LandmarkAttention(landmarks=False)
    assert torch.allclose(merged, hooked, atol=2e-4)
    # the same delta applied by the patch itself (delta=run folder), on the prepared base model
    state = {key: value.clone() for key, value in hooked_model.state_dict().items()}
    with (
        torch.no_grad(),
        tokenlean.patch(hooked_model, LandmarkAttention(block_size=16, delta=str(tmp_path / "r"))),
    ):
        patched = hooked_model(input_ids=ids).logits
    assert torch.allclose(patched, hooked, atol=1e-5)
    assert all(torch.equal(state[key], value) for key, value in hooked_model.state_dict().items())
    with pytest.raises(PatchError, match="block_size=16"):
        tokenlean.patch(hooked_model, LandmarkAttention(block_size=8, delta=str(tmp_path / "r")))
    from tokenlean.landmark_train import LandmarkTrainError

    with pytest.raises(LandmarkTrainError, match="no landmark delta"):
        tokenlean.patch(hooked_model, LandmarkAttention(block_size=16, delta=str(tmp_path)))


def test_the_gpu_benchmark_script_runs_its_cpu_check(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "landmark_gpu_kernel.py"
    spec = importlib.util.spec_from_file_location("landmark_gpu_kernel", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--tiny"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["speed"] == [] and len(results["correctness"]) == 1
    row = results["correctness"][0]
    assert max(row[k] for k in ("out", "dq", "dk", "dv")) < 1e-5
    assert "Correctness" in (tmp_path / "results.md").read_text()


def test_the_shipped_landmark_model_loads_offline_and_equals_the_delta_patch():
    import json

    entry = zoo.get_entry("smollm2-135m-landmark")
    manifest = json.loads((entry.path / zoo.PACKAGED_MANIFEST_NAME).read_text())
    assert sum(f["size"] for f in manifest["files"].values()) <= 20e6
    # the run that made it was evaluated: training brought the held-out perplexity down from the untrained landmarks'
    assert manifest["final"]["perplexity"] < manifest["untrained"]["perplexity"]
    model, tokenizer = zoo.load("smollm2-135m-landmark")
    token = tokenizer.convert_tokens_to_ids(LANDMARK_TOKEN)
    assert token == model.config.landmark_token_id
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :80]
    with torch.no_grad(), tokenlean.patch(model, LandmarkAttention(block_size=64)):
        merged = model(input_ids=ids).logits
    base, base_tokenizer = zoo.load("smollm2-135m")
    method = LandmarkAttention(block_size=64, delta="smollm2-135m-landmark")
    method.prepare(base, base_tokenizer)
    with torch.no_grad(), tokenlean.patch(base, method):
        hooked = base(input_ids=ids).logits
    assert torch.allclose(merged, hooked, atol=1e-4)


def test_retrieval_metric_prompts_gates_and_chance():
    """The passkey sits at the start of one of blocks 1..6, the question follows; figures are proportions."""
    from tokenlean.landmark_train import RETRIEVAL_BLOCKS, _split_docs, landmark_retrieval_accuracy

    model, tokenizer = zoo.load("smollm2-135m")
    model.eval()
    method = LandmarkAttention(block_size=32, kernel="reference")
    method.prepare(model, tokenizer)
    _, held = _split_docs()
    seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    with tokenlean.patch(model, method):
        forward = model.forward

        def spy(*args, **kwargs):
            seen.append((kwargs["input_ids"], method._gate_recorder))
            return forward(*args, **kwargs)

        model.forward = spy
        try:
            first = landmark_retrieval_accuracy(model, tokenizer, method, held, prompts=3)
            again = landmark_retrieval_accuracy(model, tokenizer, method, held, prompts=3)
        finally:
            model.forward = forward  # the patch's own wrapper, which removal undoes
        # the recorded gates are the question's last token's: the same as the last query's of the
        # prompt without the answer appended
        ids, recorded = seen[0]
        answer = len(tokenizer(" 12345", add_special_tokens=False)["input_ids"])
        alone: list[torch.Tensor] = []
        method._gate_recorder = alone
        try:
            with torch.no_grad():
                model(input_ids=ids[:, :-answer], use_cache=False)
        finally:
            method._gate_recorder = None
        assert len(alone) == len(recorded) == model.config.num_hidden_layers
        for a, r in zip(alone, recorded):
            torch.testing.assert_close(r, a, atol=1e-5, rtol=1e-5)
    assert method._gate_recorder is None and method._gate_query is None
    assert first == again  # seeded
    assert first["candidates"] == RETRIEVAL_BLOCKS - 1 and first["chance"] == pytest.approx(1 / 6)
    for key in ("accuracy", "head_accuracy", "head_top2", "answer_accuracy"):
        assert 0.0 <= first[key] <= 1.0
    assert first["head_top2"] >= first["head_accuracy"]
    question = tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    per_block = 31
    for ids, _ in seen[:3]:
        ids = ids[0].tolist()
        assert len(ids) == RETRIEVAL_BLOCKS * per_block + len(question) + answer
        assert ids[-answer - len(question) : -answer] == question
        text = [tokenizer.decode(ids[b * per_block : (b + 1) * per_block]) for b in range(RETRIEVAL_BLOCKS)]
        holders = [b for b, t in enumerate(text) if t.startswith(" The pass key is")]
        assert len(holders) == 1 and 1 <= holders[0] < RETRIEVAL_BLOCKS
        key = text[holders[0]].split()[4].rstrip(".")
        assert tokenizer.decode(ids[-answer:]) == f" {key}"  # the answer appended is the hidden key
    assert first["question_offsets"] == [0, 0, 0]
    # with random offsets, that many text tokens sit between the seventh block and the question
    seen.clear()
    with tokenlean.patch(model, method):
        model.forward, forward = spy, model.forward
        try:
            shifted = landmark_retrieval_accuracy(
                model, tokenizer, method, held, prompts=4, question_offset="random"
            )
        finally:
            model.forward = forward
    assert (
        all(0 <= o < per_block for o in shifted["question_offsets"])
        and len(set(shifted["question_offsets"])) > 1
    )
    for (ids, _), offset in zip(seen, shifted["question_offsets"]):
        assert ids.shape[1] == RETRIEVAL_BLOCKS * per_block + offset + len(question) + answer
    for bad in (-1, 31, "middle", True):
        with pytest.raises(ValueError, match="question_offset"):
            landmark_retrieval_accuracy(model, tokenizer, method, held, prompts=1, question_offset=bad)


def test_recall_exercises_hide_facts_in_earlier_blocks_and_ask_them_at_the_end():
    import numpy as np

    from tokenlean.landmark_train import LandmarkTrainError, _split_docs, _windows, recall_window

    _, tokenizer = zoo.load("smollm2-135m")
    windows = _windows(tokenizer, _split_docs()[1], 504)
    asked_counts = set()
    for seed in range(12):
        ids = windows[seed % len(windows)]
        out, answer = recall_window(ids, tokenizer, np.random.default_rng(seed), 64)
        again, answer2 = recall_window(ids, tokenizer, np.random.default_rng(seed), 64)
        assert torch.equal(out, again) and torch.equal(answer, answer2)  # seeded
        assert out.shape == ids.shape and answer.dtype == torch.bool
        changed = (out != ids).nonzero().flatten()
        assert int(changed.min()) >= 63  # nothing in the first block (the attention sink)
        text = tokenizer.decode(out[out != ids])
        keys = re.findall(r"\b\d{5}\b", tokenizer.decode(out))
        digits = tokenizer.decode(out[answer]).replace(" ", "")
        asked = [digits[i : i + 5] for i in range(0, len(digits), 5)]
        asked_counts.add(len(asked))
        assert 1 <= len(asked) <= 2 and all(keys.count(k) == 2 for k in asked)  # stated once, answered once
        assert "pass key" not in text  # not the passkey test's wording
        # the facts end at least one block (63 tokens) before the questions start
        edited = set(changed.tolist())
        tail = int(answer.nonzero().min())
        while tail - 1 in edited:
            tail -= 1
        assert max(i for i in edited if i < tail) < tail - 63
    assert asked_counts == {1, 2}
    with pytest.raises(LandmarkTrainError, match="too short|no room"):
        recall_window(windows[0][:120], tokenizer, np.random.default_rng(0), 64)


def test_the_training_loss_is_the_lm_loss_plus_the_weighted_answer_loss():
    from tokenlean.landmark_train import _training_loss

    model, tokenizer = zoo.load("smollm2-135m")
    model.eval()
    ids = tokenizer(TEXT * 4, return_tensors="pt")["input_ids"][:, :48]
    assert ids.shape[1] == 48
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, 40:45] = True
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
        logits = model(input_ids=ids).logits[0, :-1]
        answers_only = torch.nn.functional.cross_entropy(logits[39:44], ids[0, 40:45])
        assert torch.allclose(_training_loss(model, ids, answer, 0.0), plain, atol=1e-5)
        assert torch.allclose(_training_loss(model, ids, torch.zeros_like(answer), 2.0), plain, atol=1e-5)
        assert torch.allclose(_training_loss(model, ids, answer, 2.0), plain + 2.0 * answers_only, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"recall_fraction": 1.5}, r"recall_fraction must be in \[0, 1\]"),
        ({"recall_weight": -1.0}, "recall_weight must be >= 0"),
        ({"context": 64}, "recall exercises need windows of at least"),
    ],
)
def test_bad_recall_settings_are_refused_before_the_run_folder_is_made(tmp_path, settings, match):
    from tokenlean.landmark_train import LandmarkTrainError, train_landmark

    with pytest.raises(LandmarkTrainError, match=match):
        train_landmark(tmp_path / "run", _tiny_cfg(**settings), progress=False, final_eval=False)
    assert not (tmp_path / "run").exists()
