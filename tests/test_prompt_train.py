"""Training the default prompt compressor: teacher, labels, LoRA, training loop, baselines.

Real parts throughout: smollm2-135m is the teacher, minilm-l6 the student. The training runs
are a few steps on a small text (the shipped adapter comes from one full run, see
benchmarks/results/prompt_train_log.txt).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from tokenlean.compressors.prompt import baselines, labels, lora, selfinfo, train

SHORT = (
    "The committee met on Tuesday to review the budget for the new library. Sarah said the "
    "architect's plan was too expensive, and John agreed that the glass roof should go. "
    "They voted to ask for three new quotes before the end of March.\n\n"
    "In the afternoon the group visited the old building. The roof leaks, the heating is from "
    "1962 and the reading room floods every spring. Everyone agreed the move cannot wait."
)


@pytest.fixture(scope="module")
def teacher():
    from tokenlean import zoo

    model, tok = zoo.load("smollm2-135m")
    return model.eval(), tok


@pytest.fixture(scope="module")
def student_tok():
    return labels.student_tokenizer("minilm-l6")


# -- self-information ----------------------------------------------------------------------------


@pytest.mark.slow
def test_self_information_surprising_word_scores_higher(teacher, student_tok):
    model, tok = teacher
    text = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat sat on the hippopotamus."
    spans = labels.word_spans(text, student_tok)
    scores = selfinfo.word_self_information(text, model, tok, spans, progress=False)
    words = [text[s:e] for s, e in spans.tolist()]
    assert len(scores) == len(words) and np.isfinite(scores).all() and (scores >= 0).all()
    mats = [scores[i] for i, w in enumerate(words) if w == "mat"]
    hippo = scores[words.index("hippopotamus")]
    assert hippo > 3 * max(mats[1:])  # predictable repeat vs surprise
    # Windowed scoring agrees with one pass where the windows overlap the same context.
    one = selfinfo.word_self_information(
        SHORT, model, tok, labels.word_spans(SHORT, student_tok), progress=False
    )
    win = selfinfo.word_self_information(
        SHORT,
        model,
        tok,
        labels.word_spans(SHORT, student_tok),
        window=48,
        stride=32,
        batch_size=3,
        progress=False,
    )
    assert one.shape == win.shape and np.corrcoef(one, win)[0, 1] > 0.8
    first = len(labels.word_spans(SHORT[:120], student_tok)) - 2  # inside the first window: same context
    np.testing.assert_allclose(one[:first], win[:first], atol=1e-3)
    with pytest.raises(selfinfo.SelfInfoError):
        selfinfo.word_self_information(text, model, tok, [(0, 10_000)], progress=False)
    with pytest.raises(selfinfo.SelfInfoError):
        selfinfo.word_self_information(text, model, tok, spans, window=16, stride=16, progress=False)
    assert selfinfo.word_self_information("", model, tok, np.zeros((0, 2)), progress=False).shape == (0,)
    # The teacher's labels as training builds them: half the words of each chunk kept.
    [(spans, keep)] = train.teacher_word_labels([text], rate=0.5, teacher=teacher, progress=False)
    assert len(spans) == len(keep) == len(words) and keep.sum() == round(0.5 * len(words))
    assert keep[words.index("hippopotamus")] == 1


def test_spans_information_sums_overlapping_tokens():
    offsets = np.array([[0, 5], [5, 11], [11, 12], [12, 13], [13, 18]])
    info = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    spans = np.array([[0, 5], [6, 12], [14, 18], [20, 22]])
    np.testing.assert_allclose(selfinfo.spans_information(offsets, info, spans), [1.0, 6.0, 16.0, 0.0])


# -- labels -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_align_compressed_hand_made(student_tok):
    original = "John: So, um, I've been thinking about the project, you know, and I believe we need to make some changes."
    compressed = "John: thinking project, believe need make changes."
    words = [original[s:e] for s, e in labels.word_spans(original, student_tok).tolist()]
    got = labels.align_compressed(original, compressed, tokenizer=student_tok)
    assert len(got) == len(words)
    kept = [w for w, lab in zip(words, got) if lab]
    assert kept == ["John", ":", "thinking", "project", ",", "believe", "need", "make", "changes", "."]
    # The first "," after "project" is matched, not the one after "So" (in order), and case is ignored.
    assert labels.align_compressed("A b A c", "a C", tokenizer=student_tok) == [1, 0, 0, 1]
    # A word outside the search window is not matched; a word absent from the original is skipped.
    assert labels.align_compressed("x y z w", "w", tokenizer=student_tok, window=2) == [0, 0, 0, 0]
    assert labels.align_compressed("x y z", "q y", tokenizer=student_tok) == [0, 1, 0]
    assert labels.align_compressed("", "", tokenizer=student_tok) == []
    with pytest.raises(labels.LabelError):
        labels.align_compressed(b"bytes", "x", tokenizer=student_tok)


def test_teacher_labels_keep_top_fraction_per_chunk():
    text = "a b c d e f g h"
    spans = np.array([[i * 2, i * 2 + 1] for i in range(8)])
    scores = np.array([1, 9, 2, 8, 3, 7, 4, 6], dtype=float)
    got = labels.teacher_labels(text, spans, scores, rate=0.5, chunk_chars=8)  # chunks: a-d, e-h
    assert got.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert labels.teacher_labels(text, spans, scores, rate=1.0).tolist() == [1] * 8
    assert labels.teacher_labels(text, spans, scores, rate=0.25).sum() == 2
    for bad in (0, -0.1, 1.5, "x"):
        with pytest.raises(labels.LabelError):
            labels.teacher_labels(text, spans, scores, rate=bad)
    with pytest.raises(labels.LabelError):
        labels.teacher_labels(text, spans, scores[:3])
    with pytest.raises(labels.LabelError):
        labels.teacher_labels(text, spans + 100, scores)


def test_load_labelled_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"original": "a b c", "compressed": "a c"})
        + "\n\n"
        + json.dumps({"prompt": "d e", "compressed_prompt": "e"})
        + "\n",
        encoding="utf-8",
    )
    assert labels.load_labelled_jsonl(good) == [("a b c", "a c"), ("d e", "e")]
    cases = {
        "bad.jsonl": (b'{"original": "a", "compressed": "a"}\n{not json\n', "bad.jsonl:2"),
        "keys.jsonl": (b'{"text": "a"}\n', "needs keys"),
        "type.jsonl": (b'{"original": 3, "compressed": "a"}\n', "must be strings"),
        "list.jsonl": (b"[1, 2]\n", "JSON object"),
        "empty.jsonl": (b"\n\n", "no labelled pairs"),
        "latin1.jsonl": ('{"original": "caf\u00e9", "compressed": ""}\n'.encode("latin-1"), "UTF-8"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(labels.LabelledDataError, match=message):
            labels.load_labelled_jsonl(tmp_path / name)
    with pytest.raises(labels.LabelledDataError, match="does not exist"):
        labels.load_labelled_jsonl(tmp_path / "missing.jsonl")


# -- LoRA ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_merge_equals_unmerged_and_round_trips(tmp_path, student_tok):
    torch.manual_seed(0)
    model = train._build_classifier("minilm-l6").eval()
    names = lora.apply_lora(model, rank=4, alpha=8)
    assert len(names) == 6 * len(lora.DEFAULT_TARGETS)
    assert {n.split("layer.0.")[-1] for n in names if ".layer.0." in n} == set(lora.DEFAULT_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.05)
    batch = student_tok(
        ["a first sentence to classify", "and a second, longer one here"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        before = model(**batch).logits
        lora.save_adapter(
            tmp_path / "ad",
            model,
            {"base_model": "minilm-l6", "rank": 4, "alpha": 8, "targets": list(lora.DEFAULT_TARGETS)},
        )
        lora.merge_lora(model)
        assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
        after = model(**batch).logits
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)
    loaded, _ = train.load_adapter_classifier(tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, after, atol=2e-2, rtol=2e-2)  # fp16 storage
    with pytest.raises(lora.AdapterError):
        lora.apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(lora.AdapterError):
        lora.apply_lora(loaded, rank=0)


# -- training -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_training_writes_loadable_adapter(tmp_path, teacher, student_tok):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SHORT, encoding="utf-8")
    out = tmp_path / "adapter"
    steps = []
    report = train.train_compressor(
        out,
        texts=[str(corpus)],
        teacher=teacher,
        steps=3,
        batch_size=2,
        max_length=64,
        lr=5e-3,
        progress=False,
        log_file=tmp_path / "log.txt",
        on_step=lambda step, loss: steps.append((step, loss)),
    )
    assert [s for s, _ in steps] == [1, 2, 3] and all(np.isfinite(loss) for _, loss in steps)
    weights = out / lora.ADAPTER_WEIGHTS
    assert weights.stat().st_size < 5 * 1024 * 1024
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert config["base_model"] == "minilm-l6" and config["training"]["steps"] == 3
    assert 0.3 < config["training"]["train_keep_fraction"] < 0.8
    assert (tmp_path / "log.txt").read_text().count("train loss") >= 1
    assert json.loads((tmp_path / "log.json").read_text())["training"]["final_train_loss"] > 0
    assert report["adapter_dir"] == str(out)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    trained, tok = train.load_adapter_classifier(out)
    # the folder train-compressor writes is what PromptCompressor(model=DIR) takes
    from tokenlean.compressors.prompt import PromptCompressor

    compressor = PromptCompressor(str(out), device="cpu")
    assert compressor.compress(SHORT, rate=0.5).compressed_tokens > 0
    ids = torch.tensor([tok(SHORT[:200])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(compressor.model(input_ids=ids).logits, trained(input_ids=ids).logits)
    torch.manual_seed(0)
    untrained = train._build_classifier("minilm-l6").eval()
    batch = tok([SHORT[:200]], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(trained(**batch).logits, untrained(**batch).logits, atol=1e-3)

    # A half-written pair (weights newer than the JSON) still loads, from the weights' own copy.
    (out / lora.ADAPTER_CONFIG).write_text(json.dumps({"format": "stale"}))
    _, cfg = lora.load_adapter(out)
    assert cfg["rank"] == train.DEFAULT_RANK and "weights_sha256" not in cfg


@pytest.mark.slow
def test_labelled_jsonl_training_through_cli_args(tmp_path):
    data = tmp_path / "pairs.jsonl"
    pairs = [
        ("Well, so, the meeting is moved to Friday at noon, I think.", "meeting moved Friday noon."),
        ("Um, please bring the signed forms and, you know, your badge.", "bring signed forms, badge."),
        (
            "Actually the report is due next week, not tomorrow as we said.",
            "report due next week, not tomorrow.",
        ),
        ("So the budget was approved by the board yesterday evening.", "budget approved by board yesterday."),
    ]
    data.write_text(
        "\n".join(json.dumps({"prompt": o, "compressed_prompt": c}) for o, c in pairs), encoding="utf-8"
    )
    parser = train.add_train_arguments(argparse.ArgumentParser())
    out = tmp_path / "adapter"
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--labelled",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--heldout",
            "1",
            "--quiet",
        ]
    )
    assert train.run_train(args) == 0
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert config["training"]["labelled"] == str(data) and config["training"]["heldout_documents"] == 1
    assert 0.0 <= config["training"]["heldout_f1"] <= 1.0
    model, _ = train.load_adapter_classifier(out)
    assert model.config.num_labels == 2


def test_training_bad_inputs_write_nothing(tmp_path, monkeypatch):
    out = tmp_path / "never"
    for kwargs in ({"rate": 0}, {"rate": 1.5}, {"steps": 0}, {"batch_size": 0}, {"lr": 0}, {"max_length": 4}):
        with pytest.raises(train.TrainError):
            train.train_compressor(out, progress=False, **kwargs)
    with pytest.raises(train.TrainError, match="neither"):
        train.train_compressor(out, texts=["no-such-corpus"], progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(train.TrainError, match="UTF-8"):
        train.train_compressor(out, texts=[str(bad)], progress=False)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"original": "a"}\n')
    with pytest.raises(labels.LabelledDataError):
        train.train_compressor(out, labelled=jsonl, progress=False)
    assert not out.exists()
    with pytest.raises(lora.AdapterError, match="no adapter.safetensors"):
        train.load_adapter_classifier(tmp_path / "nothing")
    monkeypatch.setattr(train, "DEFAULT_ADAPTER_DIR", tmp_path / "gone")
    with pytest.raises(lora.AdapterError, match="missing"):
        train.load_default_classifier()


# -- baselines ----------------------------------------------------------------------------------


def _long_text() -> str:
    return "\n".join([SHORT] * 3)


def test_random_drop_honours_rate_and_budget():
    comp = baselines.RandomDropCompressor(seed=0)
    text = _long_text()
    for rate in (0.5, 0.33, 0.2):
        res = comp.compress(text, rate=rate)
        assert res.origin_tokens >= 200 and abs(res.rate - rate) <= 0.02, (rate, res.rate)
        assert len(res.labels) == len(res.words) == len(baselines.split_words(text))
    assert comp.compress(text, rate=0.5).text == comp.compress(text, rate=0.5).text  # seeded
    assert comp.compress(text, target_tokens=50).compressed_tokens <= 50
    res = comp.compress([SHORT, "", SHORT], target_tokens=60)
    assert res.compressed_tokens <= 60 and len(res.texts) == 3 and res.texts[1] == ""
    empty = comp.compress("")
    assert empty.text == "" and empty.rate == 1.0 and empty.ratio == 1.0
    assert comp.compress("one two", rate=1.0).text == "one two"
    # Kept words keep their characters; a newline in the original gap becomes the separator.
    kept = baselines._rebuild(
        "a b\n\nc  d", np.array([[0, 1], [2, 3], [5, 6], [8, 9]]), np.array([1, 0, 1, 1])
    )
    assert kept == "a\nc d"
    for bad in ({"rate": 0}, {"rate": 1.01}, {"rate": -1}, {"target_tokens": -1}):
        with pytest.raises(ValueError):
            comp.compress(text, **bad)
    for bad in (b"bytes", ["ok", 3], 5):
        with pytest.raises(TypeError):
            comp.compress(bad)


@pytest.mark.slow
def test_selective_context_keeps_informative_words(teacher):
    model, tok = teacher
    comp = baselines.SelectiveContextCompressor(model, tokenizer=tok)
    text = _long_text()
    res = comp.compress(text, rate=0.33)
    assert abs(res.rate - 0.33) <= 0.02
    kept = {w for w, lab in zip(res.words, res.labels) if lab}
    dropped = {w for w, lab in zip(res.words, res.labels) if not lab}
    assert "1962" in kept and "the" in dropped
    assert comp.compress(SHORT, target_tokens=40).compressed_tokens <= 40
    assert comp.compress("").rate == 1.0
    with pytest.raises(TypeError):
        baselines.SelectiveContextCompressor(model)
