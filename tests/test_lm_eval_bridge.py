"""lm-eval bridge: offline task folder, real runs on smollm2-135m, refusals, report section."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import tokenlean
from tokenlean.eval import lm_eval_bridge as bridge

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (tokenlean[lmeval])")

SINK = "sink_window:sink_tokens=4,window=16"


@pytest.fixture(scope="module")
def smollm2():
    return tokenlean.zoo.load("smollm2-135m")


@pytest.fixture
def forward_calls(smollm2):
    """Count the model's forward calls with a real hook (removed afterwards)."""
    model, _ = smollm2
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


def _logits(model, tokenizer):
    ids = tokenizer("The best way to get startup ideas is not to try to think of them.", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def _files(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


# -- task folder (no model) -------------------------------------------------------------------


def test_task_folder_is_written_once_and_identically(tmp_path):
    first = bridge.local_task_dir(tmp_path / "a")
    files = _files(first)
    assert sorted(files) == [
        "data/pg_cloze.jsonl",
        "data/pg_essays.jsonl",
        "tokenlean_pg_cloze.yaml",
        "tokenlean_pg_essays.yaml",
    ]
    content = {name: path.read_bytes() for name, path in files.items()}
    mtimes = {name: path.stat().st_mtime_ns for name, path in files.items()}

    assert bridge.local_task_dir(tmp_path / "a") == first
    assert {n: p.read_bytes() for n, p in _files(first).items()} == content
    assert {n: p.stat().st_mtime_ns for n, p in _files(first).items()} == mtimes  # nothing rewritten

    # another folder gets the same data; only the absolute data paths in the YAMLs differ
    other = bridge.local_task_dir(tmp_path / "b")
    for name, data in content.items():
        again = (other / name).read_bytes()
        if name.endswith(".yaml"):
            again = again.replace(str(other).encode(), str(first).encode())
        assert again == data, name

    # a damaged file is repaired on the next call
    (first / "data" / "pg_cloze.jsonl").write_text("oops\n")
    bridge.local_task_dir(first)
    assert (first / "data" / "pg_cloze.jsonl").read_bytes() == content["data/pg_cloze.jsonl"]


def test_task_data_is_real_and_well_formed(tmp_path):
    import yaml

    folder = bridge.local_task_dir(tmp_path)
    essays = [json.loads(line) for line in (folder / "data" / "pg_essays.jsonl").read_text().splitlines()]
    assert len(essays) == 49 and len({e["id"] for e in essays}) == 49
    corpus = tokenlean.data.load_text("paul-graham-essays")
    letters = re.sub("[^A-Za-z]", "", corpus)
    assert all(e["text"] in corpus for e in essays)
    assert sum(len(e["text"]) for e in essays) > 0.99 * len(corpus) - 2 * 49

    cloze = [json.loads(line) for line in (folder / "data" / "pg_cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 200 and len({d["id"] for d in cloze}) == 200
    for doc in cloze:
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert 0 <= doc["gold"] < 4
        assert doc["context"] and re.sub("[^A-Za-z]", "", doc["context"]) in letters
        assert re.sub("[^A-Za-z]", "", doc["choices"][doc["gold"]]) in letters
    assert len({d["gold"] for d in cloze}) == 4  # the answer is not always in the same slot
    assert len({d["essay"] for d in cloze}) > 20

    for task in bridge.LOCAL_TASKS:
        config = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert config["task"] == task and config["dataset_path"] == "json"
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data_file) and os.path.exists(data_file)


# -- refusals (before the model runs) -----------------------------------------------------------


@pytest.mark.slow
def test_unknown_task_is_refused_before_the_model_runs(smollm2, forward_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = smollm2
    with pytest.raises(
        ValueError, match=r"tokenlean_pg_clozee.*did you mean 'tokenlean_pg_cloze'.*local tasks"
    ):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_essays", "tokenlean_pg_clozee"], progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        bridge.evaluate(model, tokenizer, [], progress=False)
    assert forward_calls == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unknown_task_falls_back_to_the_builtin_index(smollm2, forward_calls, caplog):
    model, tokenizer = smollm2
    with caplog.at_level("WARNING", logger=bridge.__name__), pytest.raises(ValueError) as excinfo:
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze", "hellaswagg"], progress=False)
    message = str(excinfo.value)
    assert "neither local nor built into lm-eval" in message and "'hellaswag'" in message
    assert "tokenlean_pg_cloze" in message  # the local tasks are listed
    assert "indexing lm-eval's built-in tasks" in caplog.text
    assert forward_calls == []


@pytest.mark.slow
def test_patched_model_and_bad_specs_are_refused(smollm2, forward_calls):
    model, tokenizer = smollm2
    with (
        tokenlean.patch(model, "sink_window", window=16),
        pytest.raises(tokenlean.PatchError, match="already"),
    ):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], limit=1, progress=False)
    with pytest.raises(tokenlean.MethodConfigError):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=["sink_window:windw=3"], limit=1)
    with pytest.raises(tokenlean.MethodConfigError):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=["no_such_method"], limit=1)
    with pytest.raises(ValueError, match="twice"):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=[SINK, SINK], limit=1)
    assert forward_calls == []
    assert tokenlean.active_patches(model) == []


# -- real runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cloze_accuracy_is_clearly_above_chance(smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = smollm2
    results = bridge.evaluate(model, tokenizer, "tokenlean_pg_cloze", limit=25, batch_size=4, progress=False)
    assert list(results) == ["baseline"]
    scores = results["baseline"]["tokenlean_pg_cloze"]
    # smollm2-135m: 14/25 = 0.56 on these 25 examples (0.55 on all 200); chance is 0.25
    assert scores["acc"] > 0.4, scores
    assert 0 < scores["acc_stderr"] < 0.2
    assert results.tasks["tokenlean_pg_cloze"]["n_examples"] == 25
    assert list(tmp_path.iterdir()) == []  # no cache, log or result files in the working folder


@pytest.mark.slow
def test_perplexity_with_a_method_and_bitwise_restore(smollm2, tmp_path, monkeypatch):
    from tokenlean.eval.report import SCHEMA, validate_record

    monkeypatch.chdir(tmp_path)
    model, tokenizer = smollm2
    env_before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    before = _logits(model, tokenizer)

    results = bridge.evaluate(
        model,
        tokenizer,
        ["tokenlean_pg_essays", "tokenlean_pg_cloze"],
        methods=[SINK],
        limit={"tokenlean_pg_essays": 1, "tokenlean_pg_cloze": 2},
        progress=False,
    )

    assert torch.equal(_logits(model, tokenizer), before)  # the patch is gone, bitwise
    assert tokenlean.active_patches(model) == [] and not model.training
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert list(tmp_path.iterdir()) == []

    assert list(results) == ["baseline", "sink_window"]
    base = results["baseline"]["tokenlean_pg_essays"]
    sink = results["sink_window"]["tokenlean_pg_essays"]
    assert set(base) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # a real LM on real English essays (smollm2-135m: 95.9 on the first essay; 271.5 with the sink window)
    assert math.isfinite(base["word_perplexity"]) and 20 < base["word_perplexity"] < 300
    assert 1.5 < base["byte_perplexity"] < 3.5
    assert sink["word_perplexity"] > 1.5 * base["word_perplexity"]  # seeing 20 tokens costs quality
    assert results.tasks["tokenlean_pg_essays"]["n_examples"] == 1
    assert results.tasks["tokenlean_pg_cloze"]["n_examples"] == 2

    section = bridge.quality_section(results)
    assert list(section) == ["lm-eval:tokenlean_pg_essays", "lm-eval:tokenlean_pg_cloze"]
    ppl = section["lm-eval:tokenlean_pg_essays"]
    assert (ppl["primary"], ppl["higher_is_better"], ppl["n_examples"]) == ("word_perplexity", False, 1)
    assert ppl["config"]["output_type"] == "loglikelihood_rolling" and ppl["config"]["n_documents"] == 49
    assert list(ppl["variants"]) == ["baseline", "sink_window"]
    assert ppl["variants"]["sink_window"]["word_perplexity"] == sink["word_perplexity"]
    cloze = section["lm-eval:tokenlean_pg_cloze"]
    assert (cloze["primary"], cloze["higher_is_better"]) == ("acc", True)

    # the section is what a tokenlean report accepts, also after a JSON round trip
    plain = json.loads(json.dumps(results))
    assert bridge.quality_section(plain, tasks_meta=results.tasks) == section
    assert bridge.quality_section(plain)["lm-eval:tokenlean_pg_essays"]["primary"] == "word_perplexity"
    record = {
        "schema": SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {},
        "model": {"name": "smollm2-135m"},
        "variants": [
            {"name": "baseline", "method": None, "params": {}},
            {"name": "sink_window", "method": "sink_window", "params": {"sink_tokens": 4, "window": 16}},
        ],
        "latency": {},
        "speedup": {},
        "quality": json.loads(json.dumps(section)),
    }
    validate_record(record)
