"""Atomic units and readable output of the default prompt compressor.

Every unit kind of :mod:`tokenlean.compressors.prompt.units` is found on its own and inside
prose; the shipped default compressor keeps each unit whole or drops it whole at every rate;
the output has no orphaned brackets, quotes or backticks and no blank line that the original
did not have. Bad input (only units, a unit over the whole budget, a budget below the forced
tokens, emoji and mixed scripts inside units, megabytes of units) gives a correct result.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from tokenlean.compressors.prompt import PromptCompressor
from tokenlean.compressors.prompt.units import UNIT_KINDS, find_units, unit_pattern

# one example per line: (kind, text); each must be found exactly, alone in a sentence
UNITS = [
    ("number", "$4,512,300"),
    ("number", "-12.5%"),
    ("number", "3.5 GB"),
    ("number", "€1.250,00"),
    ("number", "1,200 USD"),
    ("number", "10-15%"),
    ("number", "250 ms"),
    ("number", "#42"),
    ("datetime", "12/14/2024"),
    ("datetime", "2024-03-05"),
    ("datetime", "2024-03-05T14:30:00Z"),
    ("datetime", "05.03.2024"),
    ("datetime", "March 5, 2024"),
    ("datetime", "5 March 2024"),
    ("datetime", "14:30"),
    ("datetime", "2:30 pm"),
    ("datetime", "10:30 AM PST"),
    ("datetime", "12/14/2024, 10:30 AM PST"),
    ("phone", "+1 (415) 555-0199"),
    ("phone", "(415) 555-0199"),
    ("phone", "415-555-0199"),
    ("phone", "+44 20 7946 0958"),
    ("email", "alice.smith@example.com"),
    ("email", "ops+alerts@mail.example.co.uk"),
    ("url", "https://intranet.example.com/wiki/Migration-Plan"),
    ("url", "https://example.org/search?q=a+b&page=2#top"),
    ("url", "www.example.com/docs"),
    ("path", "/var/log/app/error.log"),
    ("path", "~/projects/tokenlean"),
    ("path", "./scripts/run.sh"),
    ("path", "C:\\Users\\alice\\report.docx"),
    ("path", "src/app/main.py"),
    ("version", "v2.3.1"),
    ("version", "1.4.0-rc.1"),
    ("code", "`user_accounts`"),
    ("code", "``a `b` c``"),
    ("identifier", "user_accounts"),
    ("identifier", "camelCaseName"),
    ("identifier", "INC-48213"),
    ("identifier", "os.path.join"),
    ("tag", "#release"),
    ("tag", "@alice"),
    ("name", "Priya Raman"),
    ("name", "Jean-Luc O'Neil"),
    ("name", "Mary J. Blige"),
]


@pytest.mark.parametrize(("kind", "unit"), UNITS, ids=[u for _, u in UNITS])
def test_each_unit_is_found_whole(kind, unit):
    for text in (f"We noted {unit} in the log.", f"({unit})", f"{unit}, then more.", unit):
        spans, kinds = find_units(text)
        found = [text[a:b] for a, b in spans.tolist()]
        assert unit in found, (text, found)
        assert kinds[found.index(unit)] == kind


def test_units_in_mixed_scripts_and_emoji():
    text = "Le budget 🚀 est de €1.250,00 — 名前 user_名前 écrit à zoë@exemple.fr le 05.03.2024 📅."
    spans, _ = find_units(text)
    found = [text[a:b] for a, b in spans.tolist()]
    assert found == ["€1.250,00", "user_名前", "zoë@exemple.fr", "05.03.2024"]


def test_plain_prose_has_no_units():
    text = "It was the best of times, it was the worst of times. Nothing here is a unit: not even 42."
    spans, _ = find_units(text)
    assert [text[a:b] for a, b in spans.tolist()] == []  # a bare integer is one word anyway


def test_unit_kinds_can_be_restricted():
    text = "Mail alice@example.com by 12/14/2024."
    spans, kinds = find_units(text, unit_pattern(("email",)))
    assert kinds == ["email"]
    with pytest.raises(ValueError, match="unknown unit kinds"):
        unit_pattern(("emails",))


# ------------------------------------------------------------------------------ compressor


@pytest.fixture(scope="module")
def compressor():
    return PromptCompressor("default", device="cpu")


@pytest.fixture(scope="module")
def essays() -> str:
    from tokenlean.data import load_text

    return load_text("paul-graham-essays")


def _paragraphs(essays: str, n: int, seed: int) -> list[str]:
    """``n`` paragraphs of 40-120 words of the essays (one line each), in random order."""
    rng = random.Random(seed)
    words = essays.split()
    out, i = [], 0
    while i < len(words):
        k = rng.randint(40, 120)
        out.append(" ".join(words[i : i + k]))
        i += k
    rng.shuffle(out)
    return out[:n]


def _document(essays: str, seed: int = 0) -> tuple[str, list[str]]:
    """Prose paragraphs with every unit of UNITS woven in, each unit used once."""
    paragraphs = _paragraphs(essays, len(UNITS), seed)
    out, units = [], []
    for i, (_, unit) in enumerate(UNITS):
        out.append(paragraphs[i])
        out.append(f"For the record, item {i + 1} reads {unit} as agreed.")
        units.append(unit)
    return "\n\n".join(out), units


def _fragments(unit: str, document: str) -> list[str]:
    """Alphanumeric runs of ``unit`` (>= 2 chars) found nowhere else in ``document``."""
    rest = document.replace(unit, " ")
    return [f for f in re.findall(r"[^\W_]{2,}", unit) if f not in rest]


def _cut_units(output: str, units: list[str], document: str) -> list[str]:
    return [u for u in units if u not in output and any(f in output for f in _fragments(u, document))]


@pytest.mark.parametrize("rate", [0.5, 0.33, 0.2])
def test_no_unit_is_cut(compressor, essays, rate):
    document, units = _document(essays)
    result = compressor.compress(document, rate=rate)
    assert _cut_units(result.text, units, document) == []
    assert abs(result.rate - rate) <= 0.02, result.rate
    assert result.info["units"]["found"] >= len(units)
    # the same classifier without units cuts some of them: the test can fail
    plain = PromptCompressor(compressor.model, tokenizer=compressor.tokenizer, atomic_units=False)
    assert _cut_units(plain.compress(document, rate=rate).text, units, document)


def test_text_of_only_units(compressor):
    rng = random.Random(1)
    rows = [
        f"{rng.randint(1, 99999)},{rng.randint(1, 999)}.{rng.randint(10, 99)},{rng.randint(2000, 2030)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
        for _ in range(300)
    ]
    csv = "\n".join(rows)
    urls = "\n".join(f"https://example.com/item/{i}/page-{i * 7}?ref=x{i}" for i in range(200))
    for text in (csv, urls):
        spans, _ = find_units(text)
        units = [text[a:b] for a, b in spans.tolist()]
        result = compressor.compress(text, rate=0.33)
        kept = set(result.text.split())
        assert all(k in units or k.rstrip(",") in units or k in text.split() for k in kept)
        assert _cut_units(result.text, units, text) == []
        assert abs(result.rate - 0.33) <= 0.02


def test_unit_longer_than_the_budget_is_dropped_whole(compressor):
    url = "https://example.com/" + "/".join(f"segment{i}" for i in range(60))
    text = f"Please read {url} before the meeting tomorrow."
    result = compressor.compress(text, target_tokens=6)
    assert result.compressed_tokens <= 6
    assert url not in result.text and "segment" not in result.text
    result = compressor.compress(url, target_tokens=3)
    assert result.text == "" and result.compressed_tokens == 0


def test_budget_below_forced_tokens(compressor):
    text = "One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten. The total was $4,512,300."
    result = compressor.compress(text, target_tokens=2, force_tokens=["."])
    # force tokens are kept past the budget (documented); units are still whole or absent
    assert result.text.count(".") >= 10
    assert _cut_units(result.text, ["$4,512,300"], text) == []


def test_five_megabytes_of_units():
    """5 MB of nothing but units through a tiny random classifier (decisions near ties, speed)."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from tokenlean import zoo

    tok = AutoTokenizer.from_pretrained(str(zoo.get_entry("minilm-l6").path))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    tiny = PromptCompressor(BertForTokenClassification(config).eval(), tokenizer=tok, device="cpu")
    rng = random.Random(2)
    parts, size = [], 0
    while size < 5_000_000:
        part = (
            f"INC-{rng.randint(10000, 99999)} ${rng.randint(1, 999)},{rng.randint(100, 999)} "
            f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/2024 u{rng.randint(1, 9999)}@example.com "
            f"https://x.example.com/{rng.randint(1, 10**6)}/é?q={rng.randint(1, 99)} +1 (415) 555-{rng.randint(1000, 9999)}"
        )
        parts.append(part)
        size += len(part) + 1
    text = "\n".join(parts)
    spans, _ = find_units(text)
    whole = {text[a:b] for a, b in spans.tolist()}
    assert sum(b - a for a, b in spans.tolist()) > 0.9 * len(text.replace(" ", "").replace("\n", ""))
    result = tiny.compress(text, rate=0.2)
    assert abs(result.rate - 0.2) <= 0.02
    # every unit in the output is a unit of the input, and every output run is part of one
    out_spans, kinds = find_units(result.text)
    assert {result.text[a:b] for (a, b), k in zip(out_spans.tolist(), kinds) if k != "name"} <= whole
    covered = np.zeros(len(result.text) + 1, dtype=np.int64)
    for a, b in out_spans.tolist():
        covered[a] += 1
        covered[b] -= 1
    inside = np.cumsum(covered)[:-1] > 0
    assert inside[[i for i, ch in enumerate(result.text) if not ch.isspace()]].all()


def test_compat_mode_refuses_units(compressor):
    with pytest.raises(ValueError, match="llmlingua_compat"):
        PromptCompressor(
            compressor.model, tokenizer=compressor.tokenizer, llmlingua_compat=True, atomic_units=True
        )
    with pytest.raises(TypeError, match="atomic_units"):
        PromptCompressor(compressor.model, tokenizer=compressor.tokenizer, atomic_units="yes")
    assert set(UNIT_KINDS) >= {"number", "url", "email"}


# ------------------------------------------------------------------------------ readability


def _balanced(text: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for ch in text:
        if ch in depth:
            depth[ch] += 1
        elif ch in closing:
            depth[closing[ch]] -= 1
            if depth[closing[ch]] < 0:
                return False
    return all(v == 0 for v in depth.values()) and text.count('"') % 2 == 0 and text.count("`") % 2 == 0


@pytest.mark.parametrize("rate", [0.5, 0.33, 0.2])
def test_output_is_readable(compressor, essays, rate):
    rng = random.Random(3)
    paragraphs = _paragraphs(essays, 60, 3)
    lines = []
    for p in paragraphs:
        words = re.sub(r"[()\[\]{}\"`]", "", p).split()
        k = rng.randint(3, len(words) - 3)
        # brackets, quotes and backticks around a few words, lines without blank lines between
        lines.append(
            " ".join(words[:k]) + ' ("' + " ".join(words[k : k + 3]) + '") `x_y` [see ' + words[-1] + "]"
        )
    text = "\n\n".join("\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3))
    assert _balanced(text)
    out = compressor.compress(text, rate=rate).text
    assert _balanced(out), out[:500]
    # paragraph breaks only where the original had them: at most one per original paragraph
    assert out.count("\n\n") <= text.count("\n\n")
    assert "\n\n\n" not in out and not out.startswith((" ", "\n", ",", ".", ";"))
    assert not re.search(r" [,.;:!?)\]]", out), re.search(r".{20} [,.;:!?)\]].{20}", out)
    assert not re.search(r"[(\[] ", out)
    assert not re.search(r"[,;:] ?[,;:.]", out)


def test_dropped_lines_leave_no_blank_line(compressor):
    text = "\n".join(
        f"Line {i}: the quick brown fox jumps over the lazy dog again and again." for i in range(40)
    )
    out = compressor.compress(text, rate=0.3, force_tokens=["\n"]).text
    assert "\n\n" not in out
    out = compressor.compress(text, rate=0.3).text
    assert "\n" not in out


def test_budget_in_another_tokenizer(compressor, essays):
    """Costs from a Hugging Face tokenizer's offsets (counter=tokenizer) honour the rate as well."""
    from tokenlean.compressors.prompt.counting import get_counter

    counter = get_counter(compressor.tokenizer)
    text = essays[50_000:62_000]
    ends = counter.token_ends(text)
    assert len(ends) == counter.count(text) and (np.diff(ends) >= 0).all() and ends[-1] <= len(text)
    other = PromptCompressor(compressor.model, tokenizer=compressor.tokenizer, counter=compressor.tokenizer)
    document, units = _document(essays, seed=4)
    result = other.compress(document, rate=0.33)
    assert abs(result.rate - 0.33) <= 0.02 and result.counter == counter.name
    assert _cut_units(result.text, units, document) == []
