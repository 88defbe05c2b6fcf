"""Prompt-compression quality as harness tasks (tokenlean.eval.prompt_tasks), their helpers and the BBH loader.

The tasks are run here the way the bench runner runs them (:func:`_run_task`: every variant the
task measures, in the task's order, the variant's patch applied around each call, rows read
back from JSON), so they are tested without depending on the rest of the runner; one slow test
runs them through ``run_bench`` itself.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenlean import data, zoo
from tokenlean.errors import EvalError, ZooError
from tokenlean.eval import bbh as B
from tokenlean.eval import haystack as H
from tokenlean.eval import prompt_tasks as P
from tokenlean.eval import report as R
from tokenlean.eval import stats as S
from tokenlean.eval.context import BenchContext
from tokenlean.eval.tasks import get_task
from tokenlean.eval.variants import CompressorPool, make_variants

# -- statistics ------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    low, high = S.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    assert S.wilson_interval(0, 20)[0] == 0.0
    assert S.wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in S.wilson_interval(0, 0))
    with pytest.raises(EvalError):
        S.wilson_interval(3, 2)


def test_bootstrap_and_paired_difference():
    values = np.r_[np.ones(30), np.zeros(10)]
    low, high = S.bootstrap_ci(values)
    assert low < 0.75 < high
    assert S.bootstrap_ci(values) == S.bootstrap_ci(values)  # seeded
    assert all(math.isnan(x) for x in S.bootstrap_ci([]))
    mean, low, high = S.paired_bootstrap_diff([1, 1, 0, 1], [1, 1, 0, 1])
    assert (mean, low, high) == (0.0, 0.0, 0.0)
    mean, low, high = S.paired_bootstrap_diff([1] * 20, [0] * 20)
    assert mean == 1.0 and low == 1.0
    with pytest.raises(EvalError):
        S.paired_bootstrap_diff([1, 0], [1])


def test_binary_f1():
    out = S.binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert math.isnan(S.binary_f1([0, 0], [0, 0])["f1"])
    with pytest.raises(EvalError):
        S.binary_f1([1], [1, 0])


# -- which characters were kept --------------------------------------------------------------


def test_kept_mask_from_words_and_labels():
    text = "The cat sat on the mat."
    words = ["The", "cat", "sat", "on", "the", "mat", "."]
    mask = P.kept_char_mask(text, "cat mat", words, [0, 1, 0, 0, 0, 1, 0])
    kept = "".join(c for c, m in zip(text, mask) if m)
    assert kept == "catmat"
    # uncased words (as an uncased tokenizer gives them) are located case-insensitively
    mask = P.kept_char_mask(text, "The", ["the", "cat"], [1, 0])
    assert "".join(c for c, m in zip(text, mask) if m) == "The"


def test_kept_mask_falls_back_to_alignment():
    text = "Café au lait is served at the café on Main Street."
    # words that are not substrings (accents stripped): the compressed text is aligned instead
    mask = P.kept_char_mask(text, "Café served Main Street", ["cafe", "au"], [1, 0])
    kept = P.spans_kept(mask, P.word_spans(text))
    words = [text[s:e] for s, e in P.word_spans(text)]
    assert [w for w, k in zip(words, kept) if k] == ["Café", "served", "Main", "Street"]
    # no words or labels at all: alignment too
    mask = P.kept_char_mask(text, "lait Main")
    assert "".join(c for c, m in zip(text, mask) if m) == "laitMain"


def test_spans_kept_threshold():
    mask = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    spans = np.array([[0, 4], [4, 8]])
    assert P.spans_kept(mask, spans).tolist() == [True, False]
    assert P.spans_kept(mask, spans, threshold=0.25).tolist() == [True, True]
    assert P.spans_kept(mask, np.zeros((0, 2))).size == 0


# -- needles ---------------------------------------------------------------------------------

HAYSTACK = (
    "First sentence here. Second one follows! Third is a question? Fourth ends it.\nFifth on a new line."
)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_is_inserted_at_a_sentence_start(depth: float):
    needle = H.make_needles(1, seed=3)[0]
    text, (start, end) = H.insert_needle(HAYSTACK, needle.sentence, depth)
    assert text[start:end] == needle.sentence
    assert text.count(needle.sentence) == 1
    assert text.replace(needle.sentence, "").split() == HAYSTACK.split()
    assert start == 0 or text[start - 1].isspace()
    assert start == 0 or text[:start].rstrip()[-1] in ".!?"
    if depth == 0.0:
        assert start == 0
    if depth == 1.0:
        assert text.endswith(needle.sentence)


def test_needle_depth_out_of_range():
    with pytest.raises(EvalError):
        H.insert_needle(HAYSTACK, "x.", 1.5)


def test_needles_are_distinct_and_seeded():
    needles = H.make_needles(5, seed=0)
    assert needles == H.make_needles(5, seed=0)
    assert len({n.key for n in needles}) == 5
    for n in needles:
        assert re.fullmatch(r"\d{7}", n.key) and n.key in n.sentence and n.city in n.sentence


def test_needle_retention():
    needle = H.make_needles(1)[0]
    text, span = H.insert_needle(HAYSTACK, needle.sentence, 0.5)
    full = np.ones(len(text), dtype=bool)
    out = P.needle_retention(text, span, needle, text, full)
    assert out == {"key_kept": 1.0, "city_kept": 1.0, "word_recall": 1.0}
    split = needle.key[:3] + " " + needle.key[3:]
    assert P.needle_retention(text, span, needle, f"magic {split}", full)["key_kept"] == 0.0
    assert P.needle_retention(text, span, needle, f"magic 9{needle.key}", full)["key_kept"] == 0.0
    none = np.zeros(len(text), dtype=bool)
    assert P.needle_retention(text, span, needle, "", none)["word_recall"] == 0.0


class _WordCounter:
    name = "words"

    def count(self, text: str) -> int:
        return len(text.split())


def test_truncate_to_tokens_cuts_at_a_sentence_end():
    cut = H.truncate_to_tokens(HAYSTACK, _WordCounter(), 7)
    assert cut == "First sentence here. Second one follows!"
    assert H.truncate_to_tokens(HAYSTACK, _WordCounter(), 1000) == HAYSTACK


# -- BBH -------------------------------------------------------------------------------------


def _ex(text: str, choices: tuple[str, ...], target: int = 0) -> data.ChoiceExample:
    return data.ChoiceExample(text, choices, target)


def test_bbh_formats():
    rng = np.random.default_rng(0)
    text, conts, target = B.format_bbh_example(
        "date_understanding",
        _ex("Today is 01/02/2020. What is the date?", ("01/02/2020", "a", "b", "c")),
        rng,
    )
    assert text.startswith("Today is 01/02/2020. What is the date?\nOptions:\n(A) ")
    assert conts == (" (A", " (B", " (C", " (D")
    assert f"({'ABCD'[target]}) 01/02/2020" in text

    text, conts, target = B.format_bbh_example(
        "snarks",
        _ex("Which statement is sarcastic? (a) Nice one. (b) Great, more rain.", ("(a)", "(b)"), 1),
        rng,
    )
    assert text == "Which statement is sarcastic?\nOptions:\n(A) Nice one.\n(B) Great, more rain."
    assert target == 1

    text, conts, target = B.format_bbh_example(
        "hyperbaton",
        _ex(
            'Which sentence has the correct adjective order: a " old red car " b " red old car " ?',
            ("a", "b"),
        ),
        rng,
    )
    assert (
        text == "Which sentence has the correct adjective order:\nOptions:\n(A) old red car\n(B) red old car"
    )

    text, conts, target = B.format_bbh_example("navigate", _ex("Take 1 step.", ("True", "False"), 1), rng)
    assert text.endswith("Take 1 step.\nOptions:\n- Yes\n- No") and conts == (" Yes", " No") and target == 1

    text, conts, target = B.format_bbh_example(
        "sports_understanding", _ex("Messi scored a touchdown", ("plausible", "implausible"), 1), rng
    )
    assert text == 'Is the following sentence plausible? "Messi scored a touchdown."'
    assert conts == (" yes", " no") and target == 1

    text, _, _ = B.format_bbh_example(
        "logical_deduction_three_objects",
        _ex("Three books.", ("A is left.", "B is left.", "C is left.")),
        rng,
    )
    assert "(A) A is left\n" in text and text.startswith(
        "The following paragraphs each describe a set of three"
    )

    with pytest.raises(EvalError, match="no BBH format"):
        B.format_bbh_example("word_sorting", _ex("x", ("a",)), rng)
    with pytest.raises(EvalError, match="does not parse"):
        B.format_bbh_example("snarks", _ex("Which one?", ("(a)", "(b)")), rng)


def test_bigbench_task_json_parsing():
    raw = {
        "description": "Infer the date from context.",
        "task_prefix": "",
        "examples": [
            {"input": "Q1", "target_scores": {"x": 0, "y": 1}},
            {"input": "no choices", "target": "free text"},
            {"input": "Q3", "target_scores": {"a": 1, "b": 1, "c": 0}},
        ],
    }
    task = data._parse_bigbench_task("date_understanding", raw)
    assert task.source == "date_understanding"
    assert [e.input for e in task.examples] == ["Q1", "Q3"]
    assert task.examples[0] == data.ChoiceExample("Q1", ("x", "y"), 1)
    assert task.examples[1].target == 0  # a tie goes to the first


def test_unknown_bbh_task_gets_a_suggestion():
    with pytest.raises(ZooError, match="did you mean 'date_understanding'"):
        data.load_bbh("date_understandin")
    assert "web_of_lies" not in data.available_bbh_tasks()
    assert set(B.BBH_TASK_FORMATS) <= set(data.available_bbh_tasks())


def _fake_sdist(folder: Path) -> bytes:
    """A tiny tar.gz with the bigbench sdist layout (every needed task.json, two examples each)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, source in data._BBH_TASKS.items():
            body = json.dumps(
                {
                    "description": name,
                    "examples": [
                        {"input": f"{name} q{i}", "target_scores": {"a": 1, "b": 0}} for i in range(2)
                    ],
                }
            ).encode()
            info = tarfile.TarInfo(f"{data._BIGBENCH_TASKS_DIR}{source}/task.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        info = tarfile.TarInfo("bigbench-1.0.0/setup.py")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    (folder / data._BIGBENCH_SDIST).write_bytes(buf.getvalue())
    return buf.getvalue()


def test_fetch_bbh_from_a_local_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import hashlib

    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))
    blob = _fake_sdist(tmp_path)
    monkeypatch.setattr(data, "_BIGBENCH_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(data, "_download_url", lambda *a, **k: pytest.fail("must not download"))
    folder = data.fetch_bbh(sdist_dir=tmp_path)
    assert folder == tmp_path / "home" / "data" / "bbh"
    assert sorted(p.stem for p in folder.glob("*.json") if p.stem != "tokenlean-manifest") == sorted(
        data._BBH_TASKS
    )
    task = data.load_bbh("logical_deduction_five_objects")
    assert task.source == "logical_deduction/five_objects"
    assert [e.input for e in task.examples] == [
        "logical_deduction_five_objects q0",
        "logical_deduction_five_objects q1",
    ]
    # a damaged file is reported, with the repair hint
    (folder / "snarks.json").write_text("{", encoding="utf-8")
    with pytest.raises(Exception, match="fetch_bbh"):
        data.load_bbh("snarks")


def test_fetch_bbh_refuses_a_damaged_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))

    def fake_download(url, dest, sha256, bar=None):
        raise ZooError("has sha256 0000, expected 1bb3; the download is damaged")

    monkeypatch.setattr(data, "_download_url", fake_download)
    with pytest.raises(ZooError, match="damaged"):
        data.fetch_bbh()
    parent = tmp_path / "home" / "data"
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


# The BBH cache is fetched by `make test` (`tokenlean data fetch bbh`): these read the real tasks.


def test_real_bbh_tasks_parse():
    task = data.load_bbh("date_understanding")
    assert len(task.examples) == 369
    assert task.examples[0].input == "Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?"
    assert task.examples[0].choices[task.examples[0].target] == "05/01/2021"
    rng = np.random.default_rng(0)
    for name in B.BBH_TASK_FORMATS:  # every example of every supported task formats
        for ex in data.load_bbh(name).examples[:200]:
            text, conts, target = B.format_bbh_example(name, ex, rng)
            assert 0 <= target < len(conts) and text


def test_bbh_items_and_prompt():
    description, demos = B.bbh_cot_prompt("date_understanding")
    assert description == "Infer the date from context.\n\n"
    assert len(demos) == 3 and all(d.startswith("Q: ") and "So the answer is (" in d for d in demos)
    items = B.bbh_items("date_understanding", 12, seed=0)
    assert items == B.bbh_items("date_understanding", 12, seed=0)
    assert len({i.index for i in items}) == 12
    assert all(i.question.endswith("\nA: So the answer is") for i in items)
    # the answer is not always (A) although BIG-bench lists it first
    assert len({i.target for i in items}) > 1
    prefix = B.bbh_prefix(description, demos)
    assert prefix.startswith(description) and prefix.endswith("\n\n") and prefix.count("Q: ") == 3
    assert B.bbh_prefix(description, []) == description


def test_calibrated_predictions_and_answer_kl():
    # the prompt favours (A) whatever the question; calibration removes that bias
    rows = [
        {"scores": [-1.0, -3.0], "content_free": [-0.5, -4.0]},
        {"scores": [-1.0, -2.5, -9.0], "content_free": [-0.5, -4.0, -4.0]},
    ]
    assert P.predictions(rows, "raw").tolist() == [0, 0]
    assert P.predictions(rows, "calibrated").tolist() == [1, 1]
    for row in rows:
        for scoring in ("raw", "calibrated"):
            lp = P.choice_logprobs(row["scores"], row["content_free"], scoring)
            assert np.isclose(np.exp(lp).sum(), 1.0)
    assert np.allclose(P.answer_kl(rows, rows, "raw"), 0.0)
    flipped = [{"scores": r["scores"][::-1], "content_free": r["content_free"][::-1]} for r in rows]
    assert (P.answer_kl(rows, flipped, "raw") > 0).all()
    assert (P.answer_kl(rows, flipped, "calibrated") > 0).all()


# -- task options ----------------------------------------------------------------------------


def test_task_options():
    needle = get_task("needle:heldout=2,haystack_tokens=120,depths=0.2+0.8")
    assert needle.name == "needle:heldout=2,haystack_tokens=120,depths=0.2+0.8"
    assert needle.config() == {"heldout": 2, "haystack_tokens": 120, "depths": [0.2, 0.8], "seed": 0}
    assert get_task("needle:depths=0.5").depths == (0.5,)
    assert (needle.kinds, needle.order, needle.section, needle.primary) == (
        ("baseline", "compressor"),
        "example",
        "needle",
        "key_kept",
    )
    bbh = get_task("bbh:tasks=navigate+snarks,n=7,scoring=raw")
    assert bbh.config() == {"tasks": ["navigate", "snarks"], "n": 7, "scoring": "raw", "seed": 0}
    assert (bbh.kinds, bbh.order, bbh.primary) == (("baseline", "patch", "compressor"), "variant", "accuracy")
    assert get_task("bbh").tasks == P.DEFAULT_BBH_TASKS
    teacher = get_task("teacher:heldout=3")
    assert teacher.config() == {"heldout": 3, "haystack_tokens": 1000, "teacher": "smollm2-135m", "seed": 0}
    for spec, match in [
        ("needle:depths=1.5", "depths"),
        ("needle:depths=0.5+0.5", "twice"),
        ("needle:depths=a+b", "depths"),
        ("needle:heldout=0", "heldout"),
        ("teacher:haystack_tokens=10", "haystack_tokens"),
        ("bbh:tasks=word_sorting", "no BBH format"),
        ("bbh:scoring=softmax", "scoring"),
        ("bbh:n=0", "n must be"),
        ("bbh:depths=0.5", "no option"),
    ]:
        with pytest.raises(ValueError, match=match):
            get_task(spec)


# -- running the tasks as the bench runner does ----------------------------------------------


def _run_task(task: Any, bench: BenchContext, variants: list, skip: set | None = None) -> dict[str, Any]:
    """Rows, aggregates, comparisons and extra of ``task`` over ``variants``, as ``run_bench`` makes them.

    ``skip``: ``(example id, variant name)`` pairs not run (as if a resumed run had them already).
    """
    examples = task.examples(bench.tokenizer)
    measured = [v for v in variants if v.kind in task.kinds]
    if task.order == "variant":
        order = [(v, e) for v in measured for e in examples]
    else:
        order = [(v, e) for e in examples for v in measured]
    rows: dict[str, list[dict[str, Any]]] = {v.name: [] for v in measured}
    for variant, example in order:
        if skip and (example.id, variant.name) in skip:
            continue
        with variant.applied(bench.model):
            row = task.run(bench, variant, example, None)
        rows[variant.name].append(json.loads(json.dumps(row)))  # as samples.jsonl gives it back
    base = measured[0].name
    return {
        "rows": rows,
        "entry": {
            "primary": task.primary,
            "higher_is_better": task.higher_is_better,
            "n_examples": len(examples),
            "config": task.config(),
            "section": task.section,
            "variants": {name: task.aggregate(r) for name, r in rows.items()},
            "compare": {name: task.compare(r, rows[base]) for name, r in rows.items() if name != base},
            "extra": task.extra(rows),
        },
    }


def _record(variants: list, quality: dict[str, Any], tokens: dict | None = None) -> dict[str, Any]:
    return {
        "schema": R.SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu": "test"},
        "model": {"name": "smollm2-135m"},
        "variants": [v.record() for v in variants],
        "latency": {},
        "speedup": {},
        "quality": quality,
        "tokens": tokens or {},
    }


def _md_row(md: str, first_cells: str, after: str = "") -> list[str]:
    """The cells of the first Markdown table row that starts with ``| <first_cells>`` (after the text ``after``)."""
    line = next(x for x in md[md.index(after) :].splitlines() if x.startswith(f"| {first_cells}"))
    return [c.strip() for c in line.strip("|").split(" | ")]


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = zoo.load("smollm2-135m")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny(smol):
    from tokenlean.testing import tiny_model

    return tiny_model("llama", vocab_size=len(smol[1])), smol[1]


def _bench(model: Any, tokenizer: Any, name: str = "smollm2-135m") -> BenchContext:
    return BenchContext(model, tokenizer, name, CompressorPool(shared_models={name: (model, tokenizer)}))


def test_needle_task_rows_and_aggregate(tiny):
    task = get_task("needle:heldout=2,haystack_tokens=200,depths=0.2+0.8")
    variants = make_variants(compressors=["random"], rates=[0.5])
    out = _run_task(task, _bench(*tiny, name="tiny"), variants)
    rows = out["rows"]
    assert [len(r) for r in rows.values()] == [4, 4]
    assert [(r["essay"], r["depth"]) for r in rows["baseline"]][:2] == [("essay47", 0.2), ("essay47", 0.8)]
    # the baseline keeps everything and makes no compress call; each compressed haystack is one call
    assert all(r["key_kept"] == r["city_kept"] == r["word_recall"] == 1.0 for r in rows["baseline"])
    assert not any("origin_tokens" in r for r in rows["baseline"])
    assert all({"origin_tokens", "compressed_tokens", "compress_s"} <= set(r) for r in rows["random@0.5"])
    assert all(
        r["compressed_tokens"] / r["origin_tokens"] == pytest.approx(0.5, abs=0.03)
        for r in rows["random@0.5"]
    )
    agg = out["entry"]["variants"]["random@0.5"]
    kept = [r["key_kept"] for r in rows["random@0.5"]]
    assert agg["key_kept"] == np.mean(kept) and agg["k"] == sum(kept) and agg["n"] == 4
    assert (agg["ci_low"], agg["ci_high"]) == S.wilson_interval(agg["k"], 4)
    assert agg["depth/0.2"] == np.mean(kept[::2]) and agg["depth/0.8"] == np.mean(kept[1::2])
    assert agg["word_recall_low"] <= agg["word_recall"] <= agg["word_recall_high"]
    assert out["entry"]["variants"]["baseline"]["key_kept"] == 1.0
    R.validate_record(_record(variants, {task.name: out["entry"]}))


def test_bbh_task_mechanics_and_resume(tiny):
    """Row layout, one compress call per (variant, subtask), prefix cache reuse, and a resumed variant."""
    task = get_task("bbh:tasks=navigate+snarks,n=2")
    variants = make_variants(  # evicting by default: the scorer rewinds its cache from a copy
        methods=["sink_window:sink_tokens=4,window=64"], compressors=["random"], rates=[0.5]
    )
    bench = _bench(*tiny, name="tiny")
    out = _run_task(task, bench, variants)
    rows = out["rows"]
    assert list(rows) == ["baseline", "sink_window", "random@0.5"]
    assert [(r["subtask"], len(r["scores"])) for r in rows["baseline"]] == [("navigate", 2)] * 2 + [
        ("snarks", 2)
    ] * 2
    firsts = [0, 2]  # the first question of each subtask carries the prompt and the compress call
    for name, rs in rows.items():
        for i, r in enumerate(rs):
            assert ("prefix_tokens" in r) == (i in firsts)
            assert ("demos" in r) == (i in firsts and name != "sink_window")
            assert ("origin_tokens" in r) == (i in firsts and name == "random@0.5")
            assert ("no_demos" in r) == (name == "baseline")
    base0, rnd0 = rows["baseline"][0], rows["random@0.5"][0]
    assert base0["demos"] == B.bbh_cot_prompt("navigate")[1]
    assert len(rnd0["demos"]) == 3 and rnd0["compressed_tokens"] < rnd0["origin_tokens"]
    assert rnd0["prefix_tokens"] < base0["prefix_tokens"]
    assert base0["no_demos"]["prefix_tokens"] < rnd0["prefix_tokens"]
    # the content-free scores depend on the prompt only: the same for every question of a subtask
    assert rows["baseline"][0]["content_free"] == rows["baseline"][1]["content_free"]

    entry = out["entry"]
    agg = entry["variants"]["random@0.5"]
    assert agg["n"] == 4 and agg["n/navigate"] == agg["n/snarks"] == 2
    assert agg["accuracy"] == pytest.approx((agg["k/navigate"] + agg["k/snarks"]) / 4)
    assert agg["demo_tokens"] == np.mean([agg["demo_tokens/navigate"], agg["demo_tokens/snarks"]])
    assert {"accuracy_raw", "accuracy_calibrated", "ci_low", "ci_high"} <= set(agg)
    same = task.compare(rows["baseline"], rows["baseline"])
    assert (same["delta"], same["agreement"], same["kl"]) == (0.0, 1.0, 0.0)
    cmp = entry["compare"]["random@0.5"]
    assert set(cmp["subtasks"]) == {"navigate", "snarks"} and cmp["n_paired"] == 4
    assert cmp["delta"] == pytest.approx(agg["accuracy"] - entry["variants"]["baseline"]["accuracy"])
    extra = entry["extra"]
    assert extra["chance"] == {"navigate": 0.5, "snarks": 0.5} and extra["chance_pooled"] == 0.5
    assert extra["no_demos"]["n"] == 4 and "agreement" in extra["no_demos"]
    assert extra["example"]["original"] == base0["demos"][0]
    assert extra["example"]["compressed"] == {"random@0.5": rnd0["demos"][0]}

    # a resumed run: a fresh task, the first question of each subtask already done
    again = get_task("bbh:tasks=navigate+snarks,n=2")
    ids = [e.id for e in again.examples(None)]
    skip = {(ids[i], v.name) for i in firsts for v in variants}
    rest = _run_task(again, bench, variants, skip=skip)["rows"]
    for name in rows:
        assert rest[name] == [r for i, r in enumerate(rows[name]) if i not in firsts]
        assert not any("origin_tokens" in r for r in rest[name])  # the call is not counted twice


def test_section_rendering_of_a_small_record(tmp_path: Path):
    """The three sections and the plot from a hand-made record: every number where it belongs."""
    variants = make_variants(
        methods=["sink_window"], compressors=["random", "llmlingua:/x"], rates=[0.5, 0.2]
    )
    names = [v.name for v in variants]
    assert names == [
        "baseline",
        "sink_window",
        "random@0.5",
        "random@0.2",
        "llmlingua:/x@0.5",
        "llmlingua:/x@0.2",
    ]
    compressors = names[2:]

    def bbh_agg(acc: float, k: int) -> dict[str, float]:
        low, high = S.wilson_interval(k, 10)
        return {"accuracy": acc, "k": k, "n": 10, "ci_low": low, "ci_high": high, "accuracy_raw": 0.3,
                "accuracy_calibrated": acc, "accuracy/navigate": acc, "k/navigate": k, "n/navigate": 10,
                "demo_tokens/navigate": 700 - 10 * k, "demo_tokens": 700.0 - 10 * k}  # fmt: skip

    cmp = {"delta": -0.1, "delta_low": -0.3, "delta_high": 0.1, "agreement": 0.8, "kl": 0.05, "kl_low": 0.01,
           "kl_high": 0.09, "n_paired": 10, "subtasks": {"navigate": {"agreement": 0.8}}}  # fmt: skip
    no_demos = {**bbh_agg(0.4, 4), **cmp, "agreement": 0.3}
    bbh = {
        "primary": "accuracy",
        "higher_is_better": True,
        "n_examples": 10,
        "config": {"tasks": ["navigate"], "n": 10, "scoring": "calibrated", "seed": 0},
        "section": "bbh",
        "variants": {name: bbh_agg(0.5, 5) for name in names},
        "compare": {name: dict(cmp) for name in names[1:]},
        "extra": {
            "scoring": "calibrated",
            "tasks": ["navigate"],
            "n_per_task": 10,
            "chance": {"navigate": 0.18},
            "chance_pooled": 0.18,
            "no_demos": no_demos,
            "example": {"subtask": "navigate", "original": "Q: x <y>", "compressed": {"random@0.5": "x <"}},
        },
    }
    needle_agg = {"key_kept": 0.5, "k": 1, "n": 2, "ci_low": 0.1, "ci_high": 0.9, "city_kept": 1.0,
                  "word_recall": 0.7, "word_recall_low": 0.5, "word_recall_high": 0.9, "depth/0.5": 0.5}  # fmt: skip
    needle = {
        "primary": "key_kept",
        "higher_is_better": True,
        "n_examples": 2,
        "config": {"heldout": 2, "haystack_tokens": 200, "depths": [0.5], "seed": 0},
        "section": "needle",
        "variants": {
            "baseline": {**needle_agg, "key_kept": 1.0},
            **{n: dict(needle_agg) for n in compressors},
        },
    }
    teacher_agg = {"precision": 0.6, "recall": 0.7, "f1": 0.65, "ci_low": 0.6, "ci_high": 0.7, "n_words": 1000,
                   "n_docs": 2}  # fmt: skip
    teacher = {
        "primary": "f1",
        "higher_is_better": True,
        "n_examples": 2,
        "config": {"heldout": 2, "haystack_tokens": 200, "teacher": "smollm2-135m", "seed": 0},
        "section": "teacher",
        "variants": {"baseline": {**teacher_agg, "f1": 1.0}, **{n: dict(teacher_agg) for n in compressors}},
    }
    tokens = {n: {"requested": 0.5, "achieved_mean": 0.49, "saved": 0.51} for n in compressors}
    record = _record(variants, {"needle": needle, "bbh": bbh, "teacher": teacher}, tokens)
    R.validate_record(record)
    md = R.render_markdown(record)

    # the summary across the prompt tasks comes once, at the top of the first of their sections
    assert md.count("### Prompt compression: summary") == 1
    assert md.index("### Prompt compression: summary") < md.index("### Needle retention")
    assert _md_row(md, "random | 0.5 | 0.490") == ["random", "0.5", "0.490", "50.0 [23.7, 76.3]",
                                                 "-10.0 [-30.0, +10.0]", "80.0", "50.0 [10.0, 90.0]",
                                                 "65.0 [60.0, 70.0]"]  # fmt: skip
    assert _md_row(md, "no demonstrations | 0 | —")[3:6] == [
        "40.0 [16.8, 68.7]",
        "-10.0 [-30.0, +10.0]",
        "30.0",
    ]
    # BBH: chance, the baseline with its trivial comparison, no demos, the patch, the compressors
    assert _md_row(md, "chance") == ["chance", "—", "18.0", "18.0", "—"]
    assert _md_row(md, "uncompressed demos | 1 | 50.0") == ["uncompressed demos", "1", "50.0 [23.7, 76.3]",
                                                            "50.0 [23.7, 76.3]", "+0.0 [+0.0, +0.0]"]  # fmt: skip
    assert (
        _md_row(md, "sink_window (patched reader, uncompressed demos) | 1 | 50.0")[-1]
        == "-10.0 [-30.0, +10.0]"
    )
    assert (
        _md_row(md, "llmlingua:/x (peer: llmlingua) | 0.2 | 50.0", after="### BBH")[2] == "50.0 [23.7, 76.3]"
    )
    agreement = _md_row(md, "random | 0.5 | 650")
    assert agreement == ["random", "0.5", "650", "80.0", "80.0", "0.050 [0.010, 0.090]", "30.0"]
    assert _md_row(md, "uncompressed demos | 1 | 650")[3:6] == ["100.0", "100.0", "0.000 [0.000, 0.000]"]
    assert "within reach of chance" not in md  # chance (18%) is outside the uncompressed interval
    assert "Original:\n\n```\nQ: x <y>\n```" in md and "random at rate 0.5:\n\n```\nx <\n```" in md
    # needle and teacher: one row per compressor variant, the baseline left out
    assert _md_row(md, "random | 0.2 | 50.0 [10.0, 90.0]", after="### Needle") == ["random", "0.2", "50.0 [10.0, 90.0]", "1/2",
                                                               "100.0", "70.0 [50.0, 90.0]", "50.0"]  # fmt: skip
    assert _md_row(md, "llmlingua:/x (peer: llmlingua) | 0.5 | 65.0 [60.0, 70.0]", after="### Agreement with the t")[3:] == [
        "60.0", "70.0", "1,000", "2"
    ]  # fmt: skip
    assert "| baseline | 1 |" not in md

    at_chance = json.loads(json.dumps(record))
    at_chance["quality"]["bbh"]["extra"]["chance_pooled"] = 0.5
    assert "**With the uncompressed demonstrations the reader scores 50.0% [23.7, 76.3], within reach of chance (50.0%)" in R.render_markdown(at_chance)  # fmt: skip
    page = R.render_html(record, {})
    assert "Q: x &lt;y&gt;" in page and "<y>" not in page

    png = P.plot_quality_vs_rate(R._normalized(record))
    assert png[:4] == b"\x89PNG"
    paths = R.write_report(record, tmp_path)
    assert (tmp_path / "quality_vs_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name == "quality_vs_rate.png" for p in paths["plots"])
    # nothing to plot without a compressor
    only_base = _record(
        variants[:1], {"needle": {**needle, "variants": {"baseline": needle["variants"]["baseline"]}}}
    )
    assert P.plot_quality_vs_rate(only_base) is None


# -- the reader and the tasks on real models -------------------------------------------------


def test_choice_scorer_rewinds_an_evicting_cache(tiny):
    """sink_window evicts, so the scorer rewinds from copies: within the window it equals the plain model."""
    import tokenlean

    model, tokenizer = tiny
    prefix = "Answer the question.\n\nQ: Is fire hot?\nA: So the answer is Yes.\n\n"
    question = "Q: Is ice hot?\nA: So the answer is"
    groups = [(" Yes", " maybe not"), (" (A", " (B")]

    def scores():
        scorer = B.ChoiceScorer(model, tokenizer)
        with scorer.prefix(prefix):
            first = [scorer.score(question, conts) for conts in groups]
            again = [scorer.score(question, conts) for conts in groups]  # from the rewound cache
        return first, again

    plain, _ = scores()
    with tokenlean.patch(model, "sink_window", sink_tokens=4, window=256):  # everything fits
        wide, wide_again = scores()
    with tokenlean.patch(model, "sink_window", sink_tokens=2, window=8):  # evicts most of the prefix
        narrow, narrow_again = scores()
    assert all(np.array_equal(a, b) for a, b in zip(plain, wide))
    assert all(np.array_equal(a, b) for a, b in zip(wide, wide_again))
    assert all(np.array_equal(a, b) for a, b in zip(narrow, narrow_again))
    assert not all(np.allclose(a, b) for a, b in zip(plain, narrow))


@pytest.mark.slow
def test_choice_scorer_matches_a_full_forward_pass(smol):
    import torch

    model, tokenizer = smol
    scorer = B.ChoiceScorer(model, tokenizer)
    prefix = "Answer the question.\n\nQ: Is fire hot?\nA: So the answer is Yes.\n\n"
    question = "Q: Is ice hot?\nA: So the answer is"
    groups = [(" Yes", " maybe not"), (" (A", " (B")]  # distinct first tokens; a shared " (" token
    with scorer.prefix(prefix):
        got = [scorer.score(question, conts) for conts in groups]
        assert np.array_equal(scorer.score(question, groups[0]), got[0])  # the cache was restored
    ctx = tokenizer(prefix)["input_ids"] + tokenizer(question, add_special_tokens=False)["input_ids"]
    for conts, values in zip(groups, got):
        for cont, value in zip(conts, values):
            cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ctx + cont_ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont_ids))
            assert value == pytest.approx(expected, abs=1e-3)
    with pytest.raises(EvalError, match="inside"):
        scorer.score(question, groups[0])


@pytest.mark.slow
def test_bbh_task_with_the_smollm2_reader(smol):
    """The reader's answers: scores equal a fresh scorer's, and the report shows the aggregates."""
    task = get_task("bbh:tasks=navigate,n=3")
    variants = make_variants(compressors=["random"], rates=[0.5])
    out = _run_task(task, _bench(*smol), variants)
    rows, entry = out["rows"], out["entry"]
    items = B.bbh_items("navigate", 3, seed=0)
    description, demos = B.bbh_cot_prompt("navigate")
    scorer = B.ChoiceScorer(*smol)
    with scorer.prefix(B.bbh_prefix(description, rows["random@0.5"][0]["demos"])):
        expected = scorer.score(items[1].question, items[1].continuations)
    assert rows["random@0.5"][1]["scores"] == pytest.approx(expected.tolist(), abs=1e-4)
    with scorer.prefix(description):
        expected = scorer.score(B.CONTENT_FREE_QUESTION, items[2].continuations)
    assert rows["baseline"][2]["no_demos"]["content_free"] == pytest.approx(expected.tolist(), abs=1e-4)

    for name, rs in rows.items():
        correct = P.predictions(rs, "calibrated") == np.asarray([r["target"] for r in rs])
        assert entry["variants"][name]["accuracy"] == correct.mean()
    record = _record(variants, {task.name: entry})
    md = R.render_markdown(record)
    base = entry["variants"]["baseline"]
    row = _md_row(md, "uncompressed demos | 1")
    assert row[3] == f"{100 * base['accuracy']:.1f} [{100 * base['ci_low']:.1f}, {100 * base['ci_high']:.1f}]"
    tokens = _md_row(md, "random | 0.5 | " + str(rows["random@0.5"][0]["prefix_tokens"]))
    assert tokens[3] == f"{100 * entry['compare']['random@0.5']['agreement']:.1f}"


@pytest.mark.slow
def test_teacher_task_reuses_the_bench_model(smol, monkeypatch: pytest.MonkeyPatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the bench's model is the teacher: nothing is loaded")

    monkeypatch.setattr(zoo, "load", no_load)
    task = get_task("teacher:heldout=2,haystack_tokens=200")
    variants = make_variants(compressors=["random"], rates=[0.5])
    out = _run_task(task, _bench(*smol), variants)
    rows, entry = out["rows"], out["entry"]
    assert entry["variants"]["baseline"]["f1"] == 1.0
    assert not any("origin_tokens" in r for r in rows["baseline"])
    assert all("origin_tokens" in r for r in rows["random@0.5"])
    agg = entry["variants"]["random@0.5"]
    tp, fp, fn = (sum(r[k] for r in rows["random@0.5"]) for k in ("tp", "fp", "fn"))
    assert agg["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert agg["ci_low"] <= agg["f1"] <= agg["ci_high"] and agg["n_docs"] == 2
    assert agg["n_words"] == entry["variants"]["baseline"]["n_words"] == sum(r["n"] for r in rows["baseline"])
    assert 0.35 < agg["f1"] < 0.65  # random drop at 0.5 agrees with the teacher about half the time
    # the teacher's labels keep half the words, as the rate asks
    (spans, scores) = task._scores["essay47"]
    from tokenlean.compressors.prompt.labels import teacher_labels

    text = dict(P.heldout_haystacks(2, 200))["essay47"]
    assert teacher_labels(text, spans, scores, rate=0.5).mean() == pytest.approx(0.5, abs=0.05)


@pytest.mark.slow
def test_needle_task_with_the_default_compressor(smol):
    task = get_task("needle:heldout=1,haystack_tokens=300,depths=0.5")
    variants = make_variants(compressors=["default"], rates=[0.5])
    out = _run_task(task, _bench(*smol), variants)
    (row,) = out["rows"]["default@0.5"]
    assert row["key_kept"] == 1.0  # the student keeps numbers
    assert 0.3 < row["word_recall"] <= 1.0
    assert row["compressed_tokens"] / row["origin_tokens"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow
def test_prompt_tasks_through_run_bench(smol, tmp_path: Path):
    from tokenlean.eval import BenchConfig, run_bench

    tasks = ["needle:heldout=1,haystack_tokens=200,depths=0.5", "bbh:tasks=navigate,n=2", "teacher:heldout=1,haystack_tokens=200"]  # fmt: skip
    config = BenchConfig(compressors=["random"], rates=[0.5, 0.2], tasks=tasks, latency=False)
    record = run_bench(config, tmp_path, model=smol[0], tokenizer=smol[1], progress=False)
    assert list(record["quality"]) == tasks
    assert set(record["quality"][tasks[1]]["variants"]) == {"baseline", "random@0.5", "random@0.2"}
    # one compress call per needle haystack, per BBH subtask and per teacher document
    assert record["tokens"]["random@0.5"]["calls"] == 3
    md = (tmp_path / "report.md").read_text()
    for title in (
        "Prompt compression: summary",
        "Needle retention",
        "BBH accuracy",
        "Agreement with the teacher",
    ):
        assert f"### {title}" in md
    assert (tmp_path / "quality_vs_rate.png").stat().st_size > 0
