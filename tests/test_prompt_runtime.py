"""The OpenVINO runtime behind ``PromptCompressor(precision="int8")``: agreement with fp32 on the
shipped default compressor and real text, batch/padding behaviour, the rate, the options, and the
error when openvino is missing. (Speed is measured by ``benchmarks/prompt_runtimes.py``.)"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from tokenlean.compressors.prompt import runtime as rt_mod
from tokenlean.compressors.prompt.compressor import PromptCompressor
from tokenlean.compressors.prompt.runtime import RuntimeError_, build_runtime

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def essays() -> str:
    from tokenlean.data import load_text

    return load_text("paul-graham-essays")


@pytest.fixture(scope="module")
def fp32() -> PromptCompressor:
    return PromptCompressor("default", device="cpu")


@pytest.fixture(scope="module")
def int8() -> PromptCompressor:
    pytest.importorskip("openvino", reason="precision='int8' needs the openvino extra")
    return PromptCompressor("default", device="cpu", precision="int8")


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer random BERT token classifier on minilm-l6's tokenizer (cheap to convert)."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from tokenlean import zoo

    tok = AutoTokenizer.from_pretrained(str(zoo.get_entry("minilm-l6").path))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    return BertForTokenClassification(config).eval(), tok


def _batch(tokenizer, text: str, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    width = max(lengths)
    out = np.full((len(lengths), width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=bool)
    at = 0
    for r, n in enumerate(lengths):
        out[r, :n] = [tokenizer.cls_token_id, *ids[at : at + n - 2], tokenizer.sep_token_id]
        mask[r, :n] = True
        at += n - 2
    return out, mask


def _top(p: np.ndarray, rate: float) -> np.ndarray:
    keep = np.zeros(len(p), dtype=bool)
    keep[np.argsort(-p, kind="stable")[: int(round(rate * len(p)))]] = True
    return keep


# ------------------------------------------------------------------ the shipped default, real text


def test_int8_builds_openvino_and_says_what_it_runs_in(int8):
    rt = int8.runtime
    info = rt.info
    assert rt.name.startswith("openvino-w8") and info["weights"] == "int8"
    amx = rt_mod.cpu_features()["amx"]
    if info["compute"] == "bf16":  # "auto" picks bf16 only where there are AMX tiles
        assert amx and info["inference_precision"] == "bf16" and rt.name == "openvino-w8-bf16"
    else:
        assert info["compute"] == "int8" and rt.name == "openvino-w8a8"
        assert info["inference_precision"] == "f32" and info["dynamic_quantization_group_size"] == 32
    assert info["num_threads"] == torch.get_num_threads()
    assert info["head"] == "fp32 numpy"
    assert "torch.ao" not in type(rt).__module__


def test_int8_probabilities_close_to_fp32(fp32, int8, essays):
    text = essays[100_000:130_000]
    _, p32 = fp32.word_probs(text)
    _, p8 = int8.word_probs(text)
    assert p8.dtype == p32.dtype and p8.shape == p32.shape
    diff = np.abs(p8 - p32)
    # measured on the default classifier: mean 0.0035-0.0044, max 0.04-0.07 (w8-bf16 and w8a8)
    assert diff.mean() < 0.01 and diff.max() < 0.15
    assert np.corrcoef(p32, p8)[0, 1] > 0.995
    # the plain top-k decision the runtime alone decides: measured 99.5-99.7%
    for rate in (0.5, 0.33):
        assert (_top(p8, rate) == _top(p32, rate)).mean() >= 0.99


def test_int8_keep_drop_labels_agree_and_rate_is_honoured(fp32, int8, essays):
    text = essays[100_000:130_000]
    for rate in (0.5, 0.33):
        a = fp32.compress(text, rate=rate)
        b = int8.compress(text, rate=rate)
        assert a.words == b.words
        agree = (np.asarray(a.labels) == np.asarray(b.labels)).mean()
        assert agree >= 0.99, (rate, agree)
        assert abs(b.rate - rate) <= 0.02 and abs(b.rate - a.rate) <= 0.01


def test_int8_rate_honoured_for_several_rates(int8, essays):
    text = essays[:12_000]
    for rate in (0.2, 0.4, 0.7):
        assert abs(int8.compress(text, rate=rate).rate - rate) <= 0.02


# ------------------------------------------------------------------ the runtime call itself


def test_padded_rows_equal_single_rows_shape_and_dtype(fp32, int8, essays):
    ids, mask = _batch(int8.tokenizer, essays[:20_000], [512, 300, 37])
    probs = int8.runtime(ids, mask)
    assert probs.dtype == np.float32 and probs.shape == ids.shape
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    ref = fp32.runtime(ids, mask)
    for r, n in enumerate(mask.sum(1)):
        alone = int8.runtime(ids[r : r + 1, :n], mask[r : r + 1, :n])[0]
        # other shapes, other kernel blocking: measured up to 0.005 (int8 rounding moves)
        assert np.abs(probs[r, :n] - alone).max() < 0.02
        assert np.abs(probs[r, :n] - ref[r, :n]).mean() < 0.01


def test_fp32_openvino_matches_torch(tiny, essays):
    pytest.importorskip("openvino")
    model, tok = tiny
    ids, mask = _batch(tok, essays[:5000], [64, 40])
    torch_p = build_runtime(model, "fp32", CPU)(ids, mask)
    ov_rt = build_runtime(model, "fp32", CPU, runtime="openvino")
    assert ov_rt.name == "openvino-fp32" and ov_rt.info["inference_precision"] == "f32"
    np.testing.assert_allclose(ov_rt(ids, mask)[mask], torch_p[mask], atol=1e-5)


def test_options_names_and_cache(tiny, essays):
    pytest.importorskip("openvino")
    model, tok = tiny
    ids, mask = _batch(tok, essays[:5000], [64, 40])
    w8a8 = build_runtime(model, "int8", CPU, compute="int8")
    assert w8a8.name == "openvino-w8a8" and w8a8.info["dynamic_quantization_group_size"] == 32
    assert w8a8.info["inference_precision"] == "f32"
    again = build_runtime(model, "int8", CPU, compute="int8")
    assert again.info["cached"] and np.array_equal(again(ids, mask), w8a8(ids, mask))
    weight_only = build_runtime(model, "int8", CPU, compute="fp32", num_threads=1)
    assert weight_only.name == "openvino-w8-fp32" and weight_only.info["num_threads"] == 1
    assert not weight_only.info["cached"]
    with pytest.raises(RuntimeError_, match="multiple of 16"):
        build_runtime(model, "int8", CPU, group_size=20)
    with pytest.raises(RuntimeError_, match="compute"):
        build_runtime(model, "int8", CPU, compute="int4")
    with pytest.raises(TypeError, match="unknown options"):
        build_runtime(model, "int8", CPU, threads=2)
    with pytest.raises(TypeError, match="no options"):
        build_runtime(model, "bf16", CPU, num_threads=2)
    with pytest.raises(RuntimeError_, match="CPU"):
        build_runtime(model, "int8", torch.device("meta"))
    with pytest.raises(RuntimeError_, match="fp16"):
        build_runtime(model, "fp16", CPU, runtime="openvino")


def test_build_prints_and_warns_nothing(capfd):
    pytest.importorskip("openvino")
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)  # fmt: skip
    torch.manual_seed(1)  # new weights: a real conversion, not a cache hit
    model = BertForTokenClassification(config).eval()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = build_runtime(model, "int8", CPU)
        runtime(np.ones((1, 5), np.int64), np.ones((1, 5), bool))
    assert not runtime.info["cached"]
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_missing_openvino_names_the_extra(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'tokenlean\[openvino\]'"):
        build_runtime(model, "int8", CPU)
    with pytest.raises(ImportError, match=r"tokenlean\[openvino\]"):
        PromptCompressor(model, tokenizer=tok, device="cpu", precision="int8")


def test_too_old_openvino_is_refused(tiny, monkeypatch):
    ov = pytest.importorskip("openvino")
    model, _ = tiny
    monkeypatch.setattr(ov, "__version__", "2025.2.0-19140-c01cd93e24d-releases/2025/2")
    with pytest.raises(ImportError, match="too old"):
        build_runtime(model, "int8", CPU)
