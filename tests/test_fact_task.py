"""The ``facts`` task (tokenlean.eval.fact_tasks): documents, scoring, the bench run, the reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenlean.errors import EvalError
from tokenlean.eval import fact_tasks as F
from tokenlean.eval.context import BenchContext
from tokenlean.eval.tasks import get_task, task_names
from tokenlean.eval.variants import CompressorPool, make_variants

# -- documents -------------------------------------------------------------------------------


def test_documents_are_deterministic_with_unique_distinctive_facts():
    docs = F.make_documents(3, 16, 300, seed=1)
    assert docs == F.make_documents(3, 16, 300, seed=1)
    assert [d.text for d in docs] != [d.text for d in F.make_documents(3, 16, 300, seed=2)]
    kinds = set()
    for doc in docs:
        assert len(doc.facts) == 16
        texts = [f.text for f in doc.facts]
        assert len(set(texts)) == len(texts)
        assert len({f.question for f in doc.facts}) == len(doc.facts)
        assert len({f.answer for f in doc.facts}) == len(doc.facts)
        positions = [doc.text.index(f.sentence) for f in doc.facts]
        assert positions == sorted(positions)  # facts in document order
        for fact in doc.facts:
            assert len(F._intact_pattern(fact.text).findall(F._norm(doc.text))) == 1
            assert fact.fragments and fact.fragments == F.fragments_of(fact.text, doc.text)
            assert fact.sentence in doc.text and fact.text in fact.sentence
            assert fact.answer in fact.text
        assert set(F.fact_statuses(doc.facts, doc.text, doc.text)) == {"intact"}
        kinds |= {f.kind for f in doc.facts}
        assert 250 <= len(doc.text.split()) <= 300 + 16 * 20
    assert kinds == set(F.FACT_KINDS)
    # a larger document set starts with the same documents (the report's first document)
    assert F.make_documents(1, 16, 300, seed=1)[0] == docs[0]
    with pytest.raises(EvalError, match="at most"):
        F.make_documents(1, len(F.TOPICS) + 1)


def test_facts_task_options_and_registration():
    assert "facts" in task_names()
    task = get_task("facts:docs=2,facts=5,words=120,seed=3")
    assert task.name == "facts:docs=2,facts=5,words=120,seed=3"
    assert task.config() == {
        "docs": 2,
        "facts": 5,
        "words": 120,
        "seed": 3,
        "max_new_tokens": 24,
        "reader": 1,
    }
    assert not task.needs_model and task.kinds == ("baseline", "compressor")
    examples = task.examples()
    assert [e.id for e in examples] == ["doc00", "doc01"]
    assert all(len(e.data.facts) == 5 for e in examples)
    with pytest.raises(ValueError, match="no option"):
        get_task("facts:nope=1")
    with pytest.raises(EvalError, match="facts"):
        get_task("facts:facts=0")


# -- scoring ---------------------------------------------------------------------------------

DOC = (
    "The budget is $4,512,300 this year. The review is on 12/14/2024 as planned. "
    "Mail alice.smith@example.com about it. The job reads the `user_accounts` table. "
    "Call +1 (415) 555-0199 at night. The plan is at https://docs.example.com/api/v2 now. "
    "Our example shows more."
)


def _fact(text: str, kind: str = "amount") -> F.Fact:
    answer = text.strip("`")
    return F.Fact(kind, text, answer, "?", text, F.fragments_of(text, DOC))


def _status(fact_text: str, compressed: str) -> str:
    (status,) = F.fact_statuses([_fact(fact_text)], DOC, compressed)
    return status


def test_fragments_are_distinctive_runs():
    assert _fact("$4,512,300").fragments == ("512", "300")  # "4" is one character
    assert _fact("12/14/2024").fragments == ("12", "14", "2024")
    # "example" occurs elsewhere in the document (the URL, "Our example"): not distinctive
    assert _fact("alice.smith@example.com").fragments == ("alice", "smith")
    assert _fact("https://docs.example.com/api/v2").fragments == ("https", "docs", "api", "v2")


@pytest.mark.parametrize(
    ("fact", "compressed", "expected"),
    [
        ("$4,512,300", "budget $4,512,300 year", "intact"),
        ("$4,512,300", "budget $4,512,300. year", "intact"),
        ("+1 (415) 555-0199", "Call +1 (415)\n  555-0199 night", "intact"),  # whitespace re-flowed
        ("$4,512,300", "budget year review", "dropped"),
        ("$4,512,300", "budget $4 512 year", "corrupted"),  # present in part
        ("$4,512,300", "budget $4,512 year", "corrupted"),  # a prefix is not the fact
        ("$4,512,300", "budget $4512300 year", "corrupted"),  # altered: a run the original lacks
        ("$4,512,300", "budget $4,512,3000 year", "corrupted"),
        ("12/14/2024", "review is on 12/ as planned", "corrupted"),
        ("alice.smith@example.com", "Mail alice.smith@ about", "corrupted"),  # half an e-mail
        ("alice.smith@example.com", "Mail ( @ about", "dropped"),  # punctuation only
        ("alice.smith@example.com", "Mail example about", "dropped"),  # a fragment that is not distinctive
        ("`user_accounts`", "reads the `user table", "corrupted"),
        ("`user_accounts`", "reads the user_accounts table", "corrupted"),  # backticks lost
        ("+1 (415) 555-0199", "Call + 415 555 0199 night", "corrupted"),
        ("https://docs.example.com/api/v2", "plan docs example api v2", "corrupted"),  # URL into words
        ("ALICE", "x", "dropped"),  # not in the document: no fragment at all
    ],
)
def test_fact_status(fact: str, compressed: str, expected: str):
    assert _status(fact, compressed) == expected


def test_corruption_snippet_and_answers():
    fact = _fact("$4,512,300")
    assert "$4 512" in F.corruption_snippet(fact, "The budget is $4 512 this year.")
    assert F.corruption_snippet(fact, "nothing here") == ""
    code = _fact("`user_accounts`", "code")
    assert F.answer_correct("The table is user_accounts.", code)
    assert F.answer_correct("`user_accounts`", code)
    assert not F.answer_correct("user accounts", code)
    phone = _fact("+1 (415) 555-0199", "phone")
    assert F.answer_correct("It is +1 (415)\n555-0199.", phone)  # whitespace only is normalised
    assert not F.answer_correct("+1 415 555 0199", phone)


def test_aggregate_and_compare_on_hand_made_rows():
    task = F.FactTask(docs=2, facts=3)
    rows = [
        {"doc": "doc00", "status": "icd", "kinds": ["amount", "date", "url"], "answers": ["a", "b", "c"],
         "correct": [1, 0, 0], "reader_s": 2.0, "prompt_tokens": 100.0},
        {"doc": "doc01", "status": "iii", "kinds": ["amount", "date", "url"], "answers": ["a", "b", "c"],
         "correct": [1, 1, 1], "reader_s": 4.0, "prompt_tokens": 80.0},
    ]  # fmt: skip
    agg = task.aggregate(rows)
    assert (agg["k"], agg["corrupted_k"], agg["dropped_k"], agg["n"]) == (4, 1, 1, 6)
    assert agg["intact"] == pytest.approx(4 / 6) and agg["ci_low"] < agg["intact"] < agg["ci_high"]
    assert agg["corrupted_low"] < 1 / 6 < agg["corrupted_high"]
    assert agg["intact/date"] == 0.5 and agg["corrupted_k/date"] == 1 and agg["dropped_k/url"] == 1
    assert agg["reader_acc"] == pytest.approx(4 / 6) and agg["reader_acc/intact"] == 1.0
    assert agg["reader_acc/corrupted"] == 0.0 and agg["reader_s"] == 3.0
    base = [dict(r, status="iii", correct=[1, 1, 1]) for r in rows]
    cmp = task.compare(rows, base)
    assert cmp["delta"] == pytest.approx(-2 / 6) and cmp["agreement"] == 1.0 and cmp["n_paired"] == 6
    assert task.compare([{k: v for k, v in r.items() if k != "correct"} for r in rows], base) == {}


# -- through the bench -----------------------------------------------------------------------


def test_facts_task_through_run_bench_without_a_model(tmp_path: Path):
    from tokenlean.eval import BenchConfig, run_bench

    spec = "facts:docs=2,facts=12,words=200"
    config = BenchConfig(model="none", compressors=["random"], rates=[0.5, 0.3], tasks=[spec], latency=False)
    record = run_bench(config, tmp_path, progress=False)
    entry = record["quality"][spec]
    assert entry["section"] == "facts" and entry["primary"] == "intact"
    base, half, third = (entry["variants"][n] for n in ("baseline", "random@0.5", "random@0.3"))
    assert base["intact"] == 1.0 and base["n"] == 24 and base["corrupted_k"] == 0
    assert "reader_acc" not in half and entry["compare"] == {"random@0.5": {}, "random@0.3": {}}
    for agg in (half, third):
        assert agg["k"] + agg["corrupted_k"] + agg["dropped_k"] == agg["n"] == 24
        assert 0 < agg["k"] < 24 and agg["corrupted_k"] > 0 and agg["dropped_k"] > 0
    assert third["k"] < half["k"]
    assert record["tokens"]["random@0.5"]["calls"] == 2
    examples = entry["extra"]["examples"]["random@0.5"]
    assert examples and all(e["left"] for e in examples)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["metrics"]["status"]) == 12 for r in rows)
    md = (tmp_path / "report.md").read_text()
    assert "### Fact retention" in md and "CORRUPTED k/n" in md
    assert f"**Corrupted facts: random @ 0.5: {half['corrupted_k']}/24; random @ 0.3:" in md
    assert "| uncompressed | 1 | — | 0/24 |" in md
    assert "By kind: intact % (corrupted count)" in md and "reader correct" not in md
    assert (tmp_path / F.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"


# -- the reader ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from tokenlean import zoo

    return zoo.load("smollm2-135m")


@pytest.mark.slow
def test_reader_reuses_the_cache_and_answers_like_generate(smol):
    import torch

    model, tokenizer = smol
    reader = F.FactReader(model, tokenizer, max_new_tokens=6)
    doc = F.make_documents(1, 3, 40, seed=0)[0]
    questions = [f.question for f in doc.facts]
    answers, stats = reader.answer_all(doc.text, questions, batched=False)
    assert len(answers) == 3 and stats["prompt_tokens"] > 50 and stats["reader_s"] > 0
    assert reader.answer_all(doc.text, questions, batched=True)[0] == answers  # the batch answers the same
    for question, answer in zip(questions[:2], answers):  # the cached path answers as a fresh generate
        ids = tokenizer(
            reader.prompt(doc.text, question), return_tensors="pt", add_special_tokens=False
        ).input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == answer


@pytest.mark.slow
def test_facts_task_with_the_smollm2_reader_through_run_bench(smol, tmp_path: Path):
    from tokenlean.eval import BenchConfig, run_bench

    model, tokenizer = smol
    spec = "facts:docs=1,facts=3,words=40,max_new_tokens=4"
    config = BenchConfig(compressors=["random"], rates=[0.5], tasks=[spec], latency=False)
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    entry = record["quality"][spec]
    rows = [json.loads(line)["metrics"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["answers"]) == 3 and set(r["correct"]) <= {0, 1} for r in rows)
    base, half = entry["variants"]["baseline"], entry["variants"]["random@0.5"]
    assert base["reader_n"] == 3 and 0 <= half["reader_acc"] <= 1 and half["reader_s"] > 0
    cmp = entry["compare"]["random@0.5"]
    assert cmp["n_paired"] == 3 and cmp["delta"] == pytest.approx(half["reader_acc"] - base["reader_acc"])
    assert entry["extra"]["first_doc"]["answers"]["baseline"] == rows[0]["answers"]
    md = (tmp_path / "report.md").read_text()
    assert "reader correct % [95% CI]" in md and "| reference |" in md
    assert "Reader `smollm2-135m`: accuracy by what happened to the fact" in md
    assert "reader, uncompressed:" in md

    bench = BenchContext(model, tokenizer, "smollm2-135m", CompressorPool())
    off = get_task("facts:docs=1,facts=3,words=40,reader=0")
    assert "answers" not in off.run(bench, make_variants()[0], off.examples()[0], None)
