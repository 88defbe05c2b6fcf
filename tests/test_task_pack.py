"""The offline lm-eval task pack: loads offline, deterministic files, well-formed documents."""

from __future__ import annotations

import json
import os
import re

import pytest

import tokenlean
from tokenlean.eval import bbh as B
from tokenlean.eval import haystack as H
from tokenlean.eval import task_pack as tp

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (tokenlean[lmeval])")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _docs(folder, rel):
    return [json.loads(line) for line in (folder / rel).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def pack():
    """The whole pack in its default place (the folder evaluate() uses; its datasets cache is reused)."""
    return tp.local_task_dir()


def test_task_names_and_tags():
    assert tp.LOCAL_TASKS[:2] == ("tokenlean_pg_essays", "tokenlean_pg_cloze")
    assert tuple(f"tokenlean_bbh_{t}" for t in B.BBH_TASK_FORMATS) == tp.BBH_TASKS
    assert tuple(f"tokenlean_passkey_{n}k" for n in (1, 2, 4, 8, 16, 32)) == tp.PASSKEY_TASKS
    assert tp.NEEDLE_TASK in tp.LOCAL_TASKS and len(set(tp.LOCAL_TASKS)) == len(tp.LOCAL_TASKS) == 19
    assert tp.expand_task_names(["tokenlean_passkey", "tokenlean_pg_cloze", "hellaswag"]) == [
        "tokenlean_pg_cloze",
        *tp.PASSKEY_TASKS,
    ]
    assert tp.expand_task_names(["tokenlean"]) == list(tp.LOCAL_TASKS)


def test_every_task_loads_offline_with_include_defaults_off(pack, monkeypatch):
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    manager = TaskManager(include_path=str(pack), include_defaults=False)
    assert set(tp.LOCAL_TASKS) | set(tp.TAGS) <= set(manager.all_tasks)
    loaded = manager.load(["tokenlean"])
    assert set(loaded["tasks"]) == set(tp.LOCAL_TASKS)
    for name, task in loaded["tasks"].items():
        docs = task.eval_docs
        assert len(docs) > 0, name
        doc = docs[0]
        text = task.doc_to_text(doc)
        assert isinstance(text, str) and (text or name == "tokenlean_pg_essays")
        if name in tp.BBH_TASKS:
            assert task.OUTPUT_TYPE == "multiple_choice"
            # the prompt is description + demonstrations (blank lines between) + question
            assert text == B.bbh_prefix(doc["description"], doc["demos"]) + doc["question"]
            assert task.doc_to_choice(doc) == doc["choices"] and task.doc_to_target(doc) == doc["gold"]
        elif name == tp.NEEDLE_TASK or name in tp.PASSKEY_TASKS:
            assert task.OUTPUT_TYPE == "generate_until"
            assert text.startswith(doc["context"]) and text.endswith(doc["question"])
            answer = doc["answer"] if name == tp.NEEDLE_TASK else doc["key"]
            metric = "exact_match" if name == tp.NEEDLE_TASK else "acc"
            # lm-eval scores through the pack's process_results: the first number generated
            assert task.process_results(doc, [f" {answer}. And 123"]) == {metric: 1.0}
            assert task.process_results(doc, [f" 123 {answer}"]) == {metric: 0.0}
            assert task.config.generation_kwargs["until"] == ["\n"]


def test_files_are_deterministic_written_once_and_repaired(tmp_path, monkeypatch):
    first = tp.local_task_dir(tmp_path / "a")
    files = _files(first)
    expected = {f"{t}.yaml" for t in tp.LOCAL_TASKS} | {".tokenlean_pack.json", "tokenlean_pack_utils.py"}
    expected |= {"data/pg_essays.jsonl", "data/pg_cloze.jsonl", "data/needle.jsonl"}
    expected |= {f"data/bbh_{t}.jsonl" for t in B.BBH_TASK_FORMATS}
    expected |= {f"data/passkey_{n}k.jsonl" for n in tp.PASSKEY_LENGTHS_K}
    assert set(files) == expected
    content = {name: path.read_bytes() for name, path in files.items()}
    mtimes = {name: path.stat().st_mtime_ns for name, path in files.items()}

    # a second call finds everything in place (the stamp and the file hashes): nothing is rebuilt
    def must_not_build(*args, **kwargs):
        raise AssertionError("an up-to-date task must not be generated again")

    with monkeypatch.context() as m:
        m.setattr(tp, "_build_task", must_not_build)
        assert tp.local_task_dir(tmp_path / "a") == first
    assert {n: p.stat().st_mtime_ns for n, p in _files(first).items()} == mtimes

    # another folder gets the same data; only the absolute data paths in the YAMLs (and stamp) differ
    other = tp.local_task_dir(tmp_path / "b")
    for name, data in content.items():
        if name == ".tokenlean_pack.json":  # holds the YAMLs' hashes
            continue
        again = (other / name).read_bytes()
        if name.endswith(".yaml"):
            again = again.replace(str(other).encode(), str(first).encode())
        assert again == data, name

    # a damaged file is rebuilt; only it is written again
    (first / "data" / "pg_cloze.jsonl").write_text("oops\n")
    (first / "data" / "passkey_1k.jsonl").unlink()
    tp.local_task_dir(first)
    assert {n: p.read_bytes() for n, p in _files(first).items()} == content
    untouched = set(content) - {"data/pg_cloze.jsonl", "data/passkey_1k.jsonl"}
    assert {n: p.stat().st_mtime_ns for n, p in _files(first).items() if n in untouched} == {
        n: t for n, t in mtimes.items() if n in untouched
    }


def test_tasks_are_written_on_demand(tmp_path, monkeypatch):
    from tokenlean import data

    def no_bigbench(*args, **kwargs):
        raise AssertionError("the essay tasks must not need the BIG-bench sources")

    monkeypatch.setattr(data, "load_bbh", no_bigbench)
    folder = tp.local_task_dir(tmp_path, tasks=["tokenlean_pg_cloze", "tokenlean_passkey_2k", "hellaswag"])
    assert sorted(p.name for p in folder.glob("*.yaml")) == [
        "tokenlean_passkey_2k.yaml",
        "tokenlean_pg_cloze.yaml",
    ]
    config = (folder / "tokenlean_passkey_2k.yaml").read_text()
    assert f"test: {folder / 'data' / 'passkey_2k.jsonl'}" in config and os.path.isabs(str(folder))
    assert "process_results: !function tokenlean_pack_utils.process_passkey" in config
    assert "- tokenlean\n- tokenlean_passkey\n" in config


def test_bbh_documents(pack):
    for task in B.BBH_TASK_FORMATS:
        docs = _docs(pack, f"data/bbh_{task}.jsonl")
        description, demos = B.bbh_cot_prompt(task)
        source = tokenlean.data.load_bbh(task)
        eligible = [ex for ex in source.examples if ex.input.strip() not in "\n".join(demos)]
        assert len(docs) == min(len(eligible), tp.BBH_MAX_DOCS), task
        assert len({d["id"] for d in docs}) == len(docs)
        for doc in docs:
            assert doc["description"] == description and description.endswith("\n\n")
            assert doc["demos"] == demos and len(doc["demos"]) == 3
            assert all(d.startswith("Q: ") and B.ANSWER_STEM in d for d in doc["demos"])
            assert doc["question"].startswith("Q: ") and doc["question"].endswith(f"\nA: {B.ANSWER_STEM}")
            assert doc["question"] not in "\n".join(demos)  # test questions are not demonstrations
            assert 2 <= len(doc["choices"]) == len(set(doc["choices"])) and 0 <= doc["gold"] < len(
                doc["choices"]
            )
            assert all(c.startswith(" ") for c in doc["choices"])
        assert len({d["gold"] for d in docs}) > 1, task  # the answer is not always the same label
    # the same questions as bbh_items draws (seed 0)
    items = B.bbh_items("snarks", len(_docs(pack, "data/bbh_snarks.jsonl")))
    assert [d["question"] for d in _docs(pack, "data/bbh_snarks.jsonl")] == [i.question for i in items]


def test_passkey_documents(pack):
    from tokenlean.compressors.prompt.counting import get_counter

    count = get_counter("cl100k").count
    for k in tp.PASSKEY_LENGTHS_K:
        docs = _docs(pack, f"data/passkey_{k}k.jsonl")
        assert len(docs) == tp.PASSKEY_TRIALS >= 20
        for doc in docs:
            assert re.fullmatch(r"\d{5}", doc["key"]) and 0.0 <= doc["depth"] <= 1.0
            assert H.PASSKEY_LINE.format(key=doc["key"]) in doc["context"]
            assert doc["context"].startswith(H.PASSKEY_INTRO) and doc["question"] == H.PASSKEY_QUESTION
            if k <= 2:  # counting the long ones again is slow
                assert doc["tokens"] == count(doc["context"] + " " + doc["question"]) <= k * 1024
            assert 0.9 * k * 1024 < doc["tokens"] <= k * 1024
        assert len({d["key"] for d in docs}) >= 18 and len({round(d["depth"], 1) for d in docs}) >= 5
    # the public generator gives the same documents (trial seeds do not depend on n)
    assert tp.passkey_docs(1024, 3) == _docs(pack, "data/passkey_1k.jsonl")[:3]
    assert [d["key"] for d in tp.passkey_docs(1024, 3, seed=1)] != [
        d["key"] for d in tp.passkey_docs(1024, 3)
    ]


def test_needle_documents(pack):
    from tokenlean.compressors.prompt.counting import get_counter

    count = get_counter("cl100k").count
    docs = _docs(pack, "data/needle.jsonl")
    assert len(docs) == 10 * len(tp.NEEDLE_DEPTHS)
    assert sorted({d["depth"] for d in docs}) == list(tp.NEEDLE_DEPTHS)
    essays = "\n\n".join(text for _, text in H.heldout_essays(10))
    for doc in docs:
        assert (
            doc["needle"] in doc["context"]
            and doc["answer"] in doc["needle"]
            and doc["city"] in doc["needle"]
        )
        assert doc["context"].count(doc["answer"]) == 1
        assert doc["question"].startswith(f"Question: What is the special magic number for {doc['city']}?")
        assert doc["question"].endswith(f"The special magic number for {doc['city']} is")
        assert 900 < count(doc["context"]) <= tp.NEEDLE_TOKENS + 30
        haystack = doc["context"].replace(doc["needle"], "", 1)
        assert re.sub(r"\s", "", haystack)[:200] in re.sub(r"\s", "", essays)  # real held-out text
        assert abs(doc["needle_start"] / len(doc["context"]) - doc["depth"]) < 0.05


def test_first_number():
    assert tp.first_number(" 52718. Remember it, 123") == "52718"
    assert tp.first_number("The number is 8,655,618") == "8"
    assert tp.first_number("no digits") is None and tp.first_number("") is None
    assert tp.process_passkey({"key": "52718"}, [" 52718."]) == {"acc": 1.0}
    assert tp.process_passkey({"key": "52718"}, ["5271"]) == {"acc": 0.0}
    assert tp.process_needle({"answer": "8655618"}, [["8655618"]]) == {"exact_match": 1.0}
