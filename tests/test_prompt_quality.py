"""Tests of the prompt-compression quality report (tokenlean.eval.compression) and the BBH loader."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tokenlean import data, zoo
from tokenlean.compressors.prompt.result import CompressionResult
from tokenlean.errors import ZooError
from tokenlean.eval import compression as C

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
BBH_CACHED = (zoo.cache_dir() / "data" / "bbh" / "tokenlean-manifest.json").is_file()


# -- statistics ------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    low, high = C.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    assert C.wilson_interval(0, 20)[0] == 0.0
    assert C.wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in C.wilson_interval(0, 0))
    with pytest.raises(C.QualityError):
        C.wilson_interval(3, 2)


def test_bootstrap_and_paired_difference():
    values = np.r_[np.ones(30), np.zeros(10)]
    low, high = C.bootstrap_ci(values)
    assert low < 0.75 < high
    assert C.bootstrap_ci(values) == C.bootstrap_ci(values)  # seeded
    mean, low, high = C.paired_bootstrap_diff([1, 1, 0, 1], [1, 1, 0, 1])
    assert (mean, low, high) == (0.0, 0.0, 0.0)
    mean, low, high = C.paired_bootstrap_diff([1] * 20, [0] * 20)
    assert mean == 1.0 and low == 1.0
    with pytest.raises(C.QualityError):
        C.paired_bootstrap_diff([1, 0], [1])


def test_binary_f1():
    out = C.binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert math.isnan(C.binary_f1([0, 0], [0, 0])["f1"])
    with pytest.raises(C.QualityError):
        C.binary_f1([1], [1, 0])


# -- which characters were kept --------------------------------------------------------------


def test_kept_mask_from_words_and_labels():
    text = "The cat sat on the mat."
    words = ["The", "cat", "sat", "on", "the", "mat", "."]
    mask = C.kept_char_mask(text, "cat mat", words, [0, 1, 0, 0, 0, 1, 0])
    kept = "".join(c for c, m in zip(text, mask) if m)
    assert kept == "catmat"
    # uncased words (as an uncased tokenizer gives them) are located case-insensitively
    mask = C.kept_char_mask(text, "The", ["the", "cat"], [1, 0])
    assert "".join(c for c, m in zip(text, mask) if m) == "The"


def test_kept_mask_falls_back_to_alignment():
    text = "Café au lait is served at the café on Main Street."
    # words that are not substrings (accents stripped): the compressed text is aligned instead
    mask = C.kept_char_mask(text, "Café served Main Street", ["cafe", "au"], [1, 0])
    kept = C.spans_kept(mask, C.word_spans(text))
    words = [text[s:e] for s, e in C.word_spans(text)]
    assert [w for w, k in zip(words, kept) if k] == ["Café", "served", "Main", "Street"]


def test_spans_kept_threshold():
    mask = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    spans = np.array([[0, 4], [4, 8]])
    assert C.spans_kept(mask, spans).tolist() == [True, False]
    assert C.spans_kept(mask, spans, threshold=0.25).tolist() == [True, True]
    assert C.spans_kept(mask, np.zeros((0, 2))).size == 0


# -- needles ---------------------------------------------------------------------------------

HAYSTACK = (
    "First sentence here. Second one follows! Third is a question? Fourth ends it.\nFifth on a new line."
)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_is_inserted_at_a_sentence_start(depth: float):
    needle = C.make_needles(1, seed=3)[0]
    text, (start, end) = C.insert_needle(HAYSTACK, needle.sentence, depth)
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
    with pytest.raises(C.QualityError):
        C.insert_needle(HAYSTACK, "x.", 1.5)


def test_needles_are_distinct_and_seeded():
    needles = C.make_needles(5, seed=0)
    assert needles == C.make_needles(5, seed=0)
    assert len({n.key for n in needles}) == 5
    for n in needles:
        assert re.fullmatch(r"\d{7}", n.key) and n.key in n.sentence and n.city in n.sentence


def test_needle_retention():
    needle = C.make_needles(1)[0]
    text, span = C.insert_needle(HAYSTACK, needle.sentence, 0.5)
    full = np.ones(len(text), dtype=bool)
    out = C.needle_retention(text, span, needle, text, full)
    assert out == {"key_kept": 1.0, "city_kept": 1.0, "word_recall": 1.0}
    split = needle.key[:3] + " " + needle.key[3:]
    assert C.needle_retention(text, span, needle, f"magic {split}", full)["key_kept"] == 0.0
    assert C.needle_retention(text, span, needle, f"magic 9{needle.key}", full)["key_kept"] == 0.0
    none = np.zeros(len(text), dtype=bool)
    assert C.needle_retention(text, span, needle, "", none)["word_recall"] == 0.0


class _WordCounter:
    name = "words"

    def count(self, text: str) -> int:
        return len(text.split())


def test_truncate_to_tokens_cuts_at_a_sentence_end():
    cut = C.truncate_to_tokens(HAYSTACK, _WordCounter(), 7)
    assert cut == "First sentence here. Second one follows!"
    assert C.truncate_to_tokens(HAYSTACK, _WordCounter(), 1000) == HAYSTACK


# -- BBH -------------------------------------------------------------------------------------


def _ex(text: str, choices: tuple[str, ...], target: int = 0) -> data.ChoiceExample:
    return data.ChoiceExample(text, choices, target)


def test_bbh_formats():
    rng = np.random.default_rng(0)
    text, conts, target = C.format_bbh_example(
        "date_understanding",
        _ex("Today is 01/02/2020. What is the date?", ("01/02/2020", "a", "b", "c")),
        rng,
    )
    assert text.startswith("Today is 01/02/2020. What is the date?\nOptions:\n(A) ")
    assert conts == (" (A", " (B", " (C", " (D")
    assert f"({'ABCD'[target]}) 01/02/2020" in text

    text, conts, target = C.format_bbh_example(
        "snarks",
        _ex("Which statement is sarcastic? (a) Nice one. (b) Great, more rain.", ("(a)", "(b)"), 1),
        rng,
    )
    assert text == "Which statement is sarcastic?\nOptions:\n(A) Nice one.\n(B) Great, more rain."
    assert target == 1

    text, conts, target = C.format_bbh_example(
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

    text, conts, target = C.format_bbh_example("navigate", _ex("Take 1 step.", ("True", "False"), 1), rng)
    assert text.endswith("Take 1 step.\nOptions:\n- Yes\n- No") and conts == (" Yes", " No") and target == 1

    text, conts, target = C.format_bbh_example(
        "sports_understanding", _ex("Messi scored a touchdown", ("plausible", "implausible"), 1), rng
    )
    assert text == 'Is the following sentence plausible? "Messi scored a touchdown."'
    assert conts == (" yes", " no") and target == 1

    text, _, _ = C.format_bbh_example(
        "logical_deduction_three_objects",
        _ex("Three books.", ("A is left.", "B is left.", "C is left.")),
        rng,
    )
    assert "(A) A is left\n" in text and text.startswith(
        "The following paragraphs each describe a set of three"
    )

    with pytest.raises(C.QualityError, match="no BBH format"):
        C.format_bbh_example("word_sorting", _ex("x", ("a",)), rng)
    with pytest.raises(C.QualityError, match="does not parse"):
        C.format_bbh_example("snarks", _ex("Which one?", ("(a)", "(b)")), rng)


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
    assert set(C.BBH_TASK_FORMATS) <= set(data.available_bbh_tasks())


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


@pytest.mark.skipif(
    not BBH_CACHED, reason="the bigbench sdist's BBH tasks are not cached (run tokenlean.data.fetch_bbh())"
)
def test_real_bbh_tasks_parse():
    task = data.load_bbh("date_understanding")
    assert len(task.examples) == 369
    assert task.examples[0].input == "Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?"
    assert task.examples[0].choices[task.examples[0].target] == "05/01/2021"
    rng = np.random.default_rng(0)
    for name in C.BBH_TASK_FORMATS:  # every example of every supported task formats
        for ex in data.load_bbh(name).examples[:200]:
            text, conts, target = C.format_bbh_example(name, ex, rng)
            assert 0 <= target < len(conts) and text


@pytest.mark.skipif(
    not (BBH_CACHED and HAS_LM_EVAL), reason="needs the cached BBH tasks and lm-eval's BBH prompts"
)
def test_bbh_items_and_prompt():
    description, demos = C.bbh_cot_prompt("date_understanding")
    assert description == "Infer the date from context.\n\n"
    assert len(demos) == 3 and all(d.startswith("Q: ") and "So the answer is (" in d for d in demos)
    items = C.bbh_items("date_understanding", 12, seed=0)
    assert items == C.bbh_items("date_understanding", 12, seed=0)
    assert len({i.index for i in items}) == 12
    assert all(i.question.endswith("\nA: So the answer is") for i in items)
    # the answer is not always (A) although BIG-bench lists it first
    assert len({i.target for i in items}) > 1
    prefix = C.bbh_prefix(description, demos)
    assert prefix.startswith(description) and prefix.endswith("\n\n") and prefix.count("Q: ") == 3
    assert C.bbh_prefix(description, []) == description


def test_calibrated_predictions_and_answer_kl():
    # the prompt favours (A) whatever the question; calibration removes that bias
    row = {"scores": [[-1.0, -3.0], [-1.0, -2.5, -9.0]], "content_free": [[-0.5, -4.0], [-0.5, -4.0, -4.0]]}
    assert C._predictions(row, "raw").tolist() == [0, 0]
    assert C._predictions(row, "calibrated").tolist() == [1, 1]
    logp = C._choice_logprobs(row, "raw")
    assert all(np.isclose(np.exp(lp).sum(), 1.0) for lp in logp)
    assert np.allclose(C._kl(logp, logp), 0.0)
    flipped = [lp[::-1] for lp in logp]
    assert (C._kl(logp, flipped) > 0).all()


# -- config, run folder and report -----------------------------------------------------------


def test_config_validation():
    with pytest.raises(C.QualityError, match="rates"):
        C.QualityConfig(rates=(0.0,))
    with pytest.raises(C.QualityError, match="no BBH format"):
        C.QualityConfig(tasks=("word_sorting",))
    with pytest.raises(C.QualityError, match="unknown metric"):
        C.QualityConfig(metrics=("bleu",))
    with pytest.raises(C.QualityError, match="scoring"):
        C.QualityConfig(scoring="softmax")
    with pytest.raises(C.QualityError, match="twice"):
        C.QualityConfig(methods=("random", "random"))
    with pytest.raises(C.QualityError, match="unknown compression method"):
        C.make_compressor("llmlingua-3")


class _KeepLongWords:
    """A test double: keeps the longest words (whitespace words) at the rate."""

    def __init__(self) -> None:
        self.calls = 0

    def compress(self, text_or_list, rate=None):
        self.calls += 1
        contexts = [text_or_list] if isinstance(text_or_list, str) else list(text_or_list)
        texts, words, labels = [], [], []
        for text in contexts:
            w = text.split()
            order = np.argsort([-len(x) for x in w], kind="stable")
            keep = np.zeros(len(w), dtype=int)
            keep[order[: max(1, round(rate * len(w)))]] = 1
            texts.append(" ".join(x for x, k in zip(w, keep) if k))
            words += w
            labels += keep.tolist()
        origin = sum(len(t.split()) for t in contexts)
        joined = "\n\n".join(texts)
        return CompressionResult(joined, texts, origin, len(joined.split()), words, labels, counter="words")


def _needle_config(**kw) -> C.QualityConfig:
    settings = {
        "methods": ("long",),
        "metrics": ("needle",),
        "rates": (0.5, 0.2),
        "needle_depths": (0.2, 0.8),
        "heldout": 2,
        "haystack_tokens": 120,
    }
    settings.update(kw)
    return C.QualityConfig(**settings)


@pytest.mark.slow  # reads the held-out essays (fetched on first use)
def test_needle_run_writes_a_report_and_resumes(tmp_path: Path):
    out = tmp_path / "run"
    fake = _KeepLongWords()
    record = C.run_quality(_needle_config(), out, progress=False, compressors={"long": fake})
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "report.html", "quality_vs_rate.png", "rate_honoured.png"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    cell = record["needle"]["long"]["0.5"]
    assert cell["n"] == 4 and cell["k"] == 4  # a 7-digit number is among the longest words
    assert record["rate"]["long"]["0.2"]["mean"] == pytest.approx(0.2, abs=0.02)
    assert json.loads((out / "report.json").read_text())["schema"] == C.SCHEMA
    md = (out / "report.md").read_text()
    assert "## Needle retention" in md and "## Rate honoured" in md and "## BBH" not in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2

    calls = fake.calls
    again = C.run_quality(_needle_config(), out, progress=False, compressors={"long": fake})
    assert fake.calls == calls  # every unit was already done
    assert again["needle"] == record["needle"]
    # a method or rate can be added (or dropped): only the new units run
    other = _KeepLongWords()
    grown = C.run_quality(
        _needle_config(methods=("long", "other"), rates=(0.5,)),
        out,
        progress=False,
        compressors={"long": fake, "other": other},
    )
    assert fake.calls == calls and other.calls == 4
    assert set(grown["needle"]) == {"long", "other"} and set(grown["needle"]["long"]) == {"0.5"}
    with pytest.raises(C.QualityError, match="other settings \\(haystack_tokens\\)"):
        C.run_quality(_needle_config(haystack_tokens=200), out, progress=False, compressors={"long": fake})


def _synthetic_record() -> dict:
    methods = ["a", "b"]
    rates = [0.5, 0.2]
    cond = {
        "uncompressed": {"method": None, "rate": None},
        "no_demos": {"method": None, "rate": None},
        **{f"{m}@{r:g}": {"method": m, "rate": r} for m in methods for r in rates},
    }
    stat = {
        "accuracy": 0.5,
        "k": 5,
        "n": 10,
        "ci": [0.24, 0.76],
        "delta": -0.1,
        "delta_ci": [-0.3, 0.1],
        "agreement": 0.8,
    }
    for c in cond.values():
        c.update(
            {
                "tasks": {"date_understanding": dict(stat)},
                "prefix_tokens": {"date_understanding": 600},
                "pooled": dict(stat),
            }
        )
    cell = {
        "requested": 0.5,
        "mean": 0.49,
        "min": 0.45,
        "max": 0.52,
        "mean_abs_error_pp": 1.2,
        "within_2pp": float("nan"),
        "n_calls": 3,
        "n_calls_200plus": 0,
        "seconds": 1.5,
        "origin_tokens": 900,
    }
    return {
        "schema": C.SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu": "test <cpu>"},
        "config": {"methods": methods, "rates": rates, "needle_depths": [0.5]},
        "methods": {"a": {"label": "method <a>"}, "b": {"label": "b"}},
        "wall_s": 12.0,
        "bbh": {
            "reader": "smollm2-135m",
            "tasks": ["date_understanding"],
            "n_per_task": 10,
            "chance": {"date_understanding": 0.18},
            "conditions": cond,
        },
        "needle": {
            m: {
                f"{r:g}": {
                    "key_kept": 0.5,
                    "k": 1,
                    "n": 2,
                    "ci": [0.1, 0.9],
                    "city_kept": 1.0,
                    "word_recall": 0.7,
                    "word_recall_ci": [0.5, 0.9],
                    "by_depth": {"0.5": 0.5},
                }
                for r in rates
            }
            for m in methods
        },
        "teacher": {
            m: {
                f"{r:g}": {
                    "precision": 0.6,
                    "recall": 0.7,
                    "f1": 0.65,
                    "ci": [0.6, 0.7],
                    "n_words": 1000,
                    "n_docs": 2,
                }
                for r in rates
            }
            for m in methods
        },
        "rate": {m: {f"{r:g}": {**cell, "requested": r} for r in rates} for m in methods},
        "examples": {"task": "date_understanding", "original": "Q: x <y>", "compressed": {"a": {"0.5": "x"}}},
    }


def test_report_rendering_and_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    record = _synthetic_record()
    md = C.render_markdown(record)
    assert (
        "| method <a> | 0.5 | 0.490 | 50.0 [24.0, 76.0] | -10.0 [-30.0, +10.0] | 80.0 | 50.0 [10.0, 90.0] | 65.0 [60.0, 70.0] |"
        in md
    )
    assert "| chance | — | 18.0 | 18.0 |" in md
    assert "— of 0" in md  # no input of 200+ tokens: the within-2pp share is undefined
    assert "within reach of chance" not in md  # chance (18%) is outside the uncompressed interval
    at_chance = json.loads(json.dumps(record))
    at_chance["bbh"]["chance"]["date_understanding"] = 0.5
    assert "within reach of chance (50.0%)" in C.render_markdown(at_chance)
    page = C.render_html(record, {"quality_vs_rate.png": b"\x89PNG"})
    assert "method &lt;a&gt;" in page and "<a>" not in page.split("<body>", 1)[1].replace("<a ", "")
    assert "data:image/png;base64," in page

    out = tmp_path / "report"
    paths = C.write_quality_report(record, out)
    assert paths["json"].is_file() and paths["markdown"].is_file() and paths["html"].is_file()
    assert (out / "quality_vs_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rate_honoured.png").read_bytes()[:4] == b"\x89PNG"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(C, "render_html", broken)
    with pytest.raises(RuntimeError):
        C.write_quality_report({**record, "wall_s": 99.0}, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written


def test_cli_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    C.add_quality_arguments(parser)
    args = parser.parse_args(
        ["--out", "x", "--rates", "0.5,0.25", "--methods", "random", "--tasks", "navigate", "--n", "7"]
    )
    config = C.config_from_args(args)
    assert config.rates == (0.5, 0.25) and config.methods == ("random",) and config.tasks == ("navigate",)
    assert config.n == 7
    quick = C.config_from_args(parser.parse_args(["--out", "x", "--quick"]))
    assert quick.n == C.QUICK["n"] and quick.tasks == C.QUICK["tasks"]


# -- the reader ------------------------------------------------------------------------------


@pytest.mark.slow
def test_choice_scorer_matches_a_full_forward_pass():
    import torch

    model, tokenizer = zoo.load("smollm2-135m")
    scorer = C.ChoiceScorer(model, tokenizer)
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
    with pytest.raises(C.QualityError, match="inside"):
        scorer.score(question, groups[0])
