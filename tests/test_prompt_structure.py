"""Structure-preserving split and chat-message compression (issue 4, item 7).

These tests check plumbing only (what is cut, what reaches the compressor, what is put back
where), so they use a tiny fake compressor instead of a model; the real PromptCompressor is
tested in its own files.
"""

from __future__ import annotations

import copy
import json
import random
import time

import pytest

from tokenlean.compressors.prompt.messages import MessagesError, compress_messages
from tokenlean.compressors.prompt.result import CompressionResult
from tokenlean.compressors.prompt.structure import (
    Segment,
    StructureError,
    compress_structured,
    compress_structured_batch,
    split_protected,
)
from tokenlean.errors import TokenleanError


class FakeCompressor:
    """Minimal stand-in for PromptCompressor (message plumbing only): keeps every other word."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict]] = []

    def compress(self, texts, rate=None, target_tokens=None, **kwargs):
        self.calls.append((list(texts), {"rate": rate, "target_tokens": target_tokens, **kwargs}))
        out = [" ".join(t.split()[::2]) for t in texts]
        origin = sum(len(t.split()) for t in texts)
        kept = sum(len(t.split()) for t in out)
        return CompressionResult(
            text="\n\n".join(out), texts=out, origin_tokens=origin, compressed_tokens=kept
        )


def drop_odd(pieces: list[str]) -> list[str]:
    return [" ".join(p.split()[::2]) for p in pieces]


def assert_json_values(text: str) -> None:
    """``text`` is one or more JSON objects/arrays (adjacent blocks merge into one segment)."""
    decoder = json.JSONDecoder()
    pos = 0
    while text[pos:].strip():
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        value, pos = decoder.raw_decode(text, pos)
        assert isinstance(value, (dict, list))


def joined(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


# --- split_protected ---------------------------------------------------------------------------

_PIECES = [
    "Plain prose sentence with words.\n",
    "more prose without newline",
    "\n",
    "\n\n",
    "   \n",
    "# Heading one\n",
    "### Heading three",
    "####### seven hashes is prose\n",
    "#hashtag is prose\n",
    "```python\nprint('x')\n# comment\n```\n",
    "```\nunclosed fence\n",
    "~~~~\ncode ~~~\n~~~\n~~~~\n",
    "```js```\n",
    "`inline` code\n",
    '{"a": [1, 2, {"b": null}]}\n',
    '{"broken": \n',
    "[1, 2,\n 3]\n",
    "[citation needed]\n",
    "{not json}\n",
    '  {"indented": true}  \n',
    "| a | b |\n|---|---|\n| 1 | 2 |\n",
    "\r\n",
    "line with CRLF\r\n",
    "# crlf heading\r\n",
    "{",
    "[",
    "`",
    "~",
    "#",
    "é ü 漢字 emoji 🙂\n",
    "\t\ttabbed\n",
    "    ```\n    indented fence\n    ```\n",
]


@pytest.mark.parametrize("tables", [False, True])
def test_split_round_trips_random_mixes(tables):
    rng = random.Random(1234)
    for _ in range(600):
        pieces = rng.choices(_PIECES, k=rng.randint(0, 12))
        # Random glue too: cut pieces at random points so blocks start mid-line.
        text = "".join(p if rng.random() < 0.8 else p[: rng.randint(0, len(p))] for p in pieces)
        for flags in ((True, True, True), (False, True, False), (True, False, True), (False, False, False)):
            segments = split_protected(text, code=flags[0], json=flags[1], headings=flags[2], tables=tables)
            assert joined(segments) == text
            assert all(s.text for s in segments)
            assert all(s.protected == (s.kind != "prose") for s in segments)
            for a, b in zip(segments, segments[1:]):
                assert a.protected or b.protected, "two prose segments must be merged"
            offset = 0
            for s in segments:
                if s.kind == "json":
                    assert_json_values(s.text)
                if s.protected:  # protected blocks are whole lines
                    assert offset == 0 or text[offset - 1] == "\n"
                offset += len(s.text)


def test_split_random_characters_round_trip():
    rng = random.Random(7)
    alphabet = "ab #`~{}[]\"':,|-\n\t\r 01"
    for _ in range(2000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 60)))
        assert joined(split_protected(text, tables=True)) == text


def test_split_kinds():
    text = (
        "Intro.\n# Title\nBody text.\n```python\nx = 1\n# not a heading\n```\nMiddle.\n"
        '{"k": [1, 2],\n "v": "w"}\n'
        "[1] a footnote line\n~~~\nunterminated"
    )
    segments = split_protected(text)
    assert [(s.kind, s.text) for s in segments] == [
        ("prose", "Intro.\n"),
        ("heading", "# Title\n"),
        ("prose", "Body text.\n"),
        ("code", "```python\nx = 1\n# not a heading\n```\n"),
        ("prose", "Middle.\n"),
        ("json", '{"k": [1, 2],\n "v": "w"}\n'),
        ("prose", "[1] a footnote line\n"),
        ("code", "~~~\nunterminated"),
    ]


def test_split_fence_rules():
    # A closing fence must use the same character and be at least as long.
    text = "````\n```\n~~~\n````\nafter\n"
    assert [s.kind for s in split_protected(text)] == ["code", "prose"]
    assert split_protected(text)[0].text == "````\n```\n~~~\n````\n"
    # ```x``` on one line is inline code.
    assert [s.kind for s in split_protected("```x``` here\n")] == ["prose"]
    assert split_protected("```x``` here\n", code=False)[0].kind == "prose"


def test_split_whole_json_and_flags():
    doc = json.dumps({"a": [1, 2, {"b": "c"}], "d": None}, indent=2)
    assert split_protected(doc) == [Segment(doc, True, "json")]
    assert split_protected("  " + doc + "\n") == [Segment("  " + doc + "\n", True, "json")]
    assert split_protected(doc, json=False)[0].kind == "prose"
    # Text after the value on its last line: not a block.
    assert [s.kind for s in split_protected('{"a": 1} is an object\n')] == ["prose"]
    assert split_protected("# h\n", headings=False) == [Segment("# h\n", False, "prose")]
    assert split_protected("```\nx\n```\n", code=False) == [Segment("```\nx\n```\n", False, "prose")]
    assert split_protected("") == []


def test_split_tables_opt_in():
    text = "Before.\n| a | b |\n|:--|--:|\n| 1 | 2 |\n\nAfter.\n"
    assert [s.kind for s in split_protected(text)] == ["prose"]
    assert [(s.kind, s.text) for s in split_protected(text, tables=True)] == [
        ("prose", "Before.\n"),
        ("table", "| a | b |\n|:--|--:|\n| 1 | 2 |\n"),
        ("prose", "\nAfter.\n"),
    ]


def test_split_5mb_is_fast():
    block = (
        "Some prose about things, long enough to look like text. " * 6
        + "\n# Heading\n```py\nx = {1: 2}\n```\n"
        + '{"a": [1, 2, 3]}\n[not json]\n'
    )
    text = (block * (5_000_000 // len(block) + 1))[:5_000_000]
    adversarial = "[\n" * 1_000_000 + '{"a":\n' * 300_000
    for t in (text, adversarial):
        start = time.perf_counter()
        segments = split_protected(t, tables=True)
        elapsed = time.perf_counter() - start
        assert joined(segments) == t
        assert elapsed < 8.0  # about 0.5 s alone on one core; generous for a shared CI machine


def test_split_rejects_non_str():
    with pytest.raises(TypeError):
        split_protected(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenleanError):
        split_protected(None)  # type: ignore[arg-type]


# --- compress_structured -----------------------------------------------------------------------


def test_compress_structured_keeps_blocks_verbatim():
    code = "```python\ndef f(a, b, c):\n    return a + b + c\n```\n"
    obj = '{"name": "x", "values": [1, 2, 3]}\n'
    text = f"one two three four\n# Keep This Heading\nfive six seven eight\n{code}nine ten eleven\n{obj}"
    seen: list[list[str]] = []

    def fn(pieces):
        seen.append(list(pieces))
        return drop_odd(pieces)

    out, info = compress_structured(text, fn)
    assert len(seen) == 1  # one batched call
    assert seen[0] == ["one two three four", "five six seven eight", "nine ten eleven"]
    assert out == f"one three\n# Keep This Heading\nfive seven\n{code}nine eleven\n{obj}"
    assert info["protected"] == {"heading": 1, "code": 1, "json": 1}
    assert info["prose_segments"] == 3


def test_compress_structured_separation_and_edges():
    # Prose compressed to nothing leaves its trailing blank lines; fences stay on their own lines.
    out, _ = compress_structured("gone\n\n```\nx\n```\n", lambda ps: ["" for _ in ps])
    assert out == "\n\n```\nx\n```\n"
    out, _ = compress_structured("  a b c  ", drop_odd)
    assert out == "  a c  "
    calls = []
    out, info = compress_structured("# only\n```\ncode\n```\n", lambda ps: calls.append(ps) or ps)
    assert out == "# only\n```\ncode\n```\n" and calls == [] and info["prose_segments"] == 0
    assert compress_structured("", drop_odd)[0] == ""
    # Everything off: the whole text is prose.
    out, _ = compress_structured("a b\n# c d\n", drop_odd, code=False, json=False, headings=False)
    assert out == "a # d\n"


def test_compress_structured_batch_order():
    texts = ["a b c\n# H\nd e f", "", "```\nk\n```\n", "g h i"]
    out, info = compress_structured_batch(texts, drop_odd)
    assert out == ["a c\n# H\nd f", "", "```\nk\n```\n", "g i"]
    assert info["prose_segments"] == 3


def test_compress_structured_bad_compress_fn():
    with pytest.raises(StructureError):
        compress_structured("a b c", lambda ps: [])
    with pytest.raises(StructureError):
        compress_structured("a b c", lambda ps: [None])
    with pytest.raises(StructureError):
        compress_structured("a b c", lambda ps: "abc")
    with pytest.raises(TypeError):
        compress_structured("a b c", "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        compress_structured_batch("a string", drop_odd)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        compress_structured_batch(["ok", 3], drop_odd)  # type: ignore[list-item]


# --- compress_messages -------------------------------------------------------------------------

LONG = "alpha beta gamma delta epsilon zeta eta theta"
LONG_HALF = "alpha gamma epsilon eta"


def test_openai_string_messages():
    messages = [
        {"role": "system", "content": LONG},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": LONG},
        {"role": "user", "content": "What is " + LONG + "?"},
    ]
    before = copy.deepcopy(messages)
    fake = FakeCompressor()
    out = compress_messages(messages, rate=0.5, compressor=fake, force_tokens=["\n"])
    assert messages == before  # input not mutated
    assert out is not messages and out[1] is not messages[1]
    assert [m["content"] for m in out] == [LONG, LONG_HALF, LONG, "What is " + LONG + "?"]
    assert len(fake.calls) == 1
    assert fake.calls[0][0] == [LONG]
    assert fake.calls[0][1] == {"rate": 0.5, "target_tokens": None, "force_tokens": ["\n"]}


def test_openai_parts_images_and_roles():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": LONG}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": LONG}, image, {"type": "text", "text": "x y z"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "1", "content": LONG},
        {"role": "user", "content": "final question"},
    ]
    before = copy.deepcopy(messages)
    fake = FakeCompressor()
    out, info = compress_messages(messages, target_tokens=5, compressor=fake, return_result=True)
    assert messages == before
    assert out[0] == before[0]
    assert out[1]["content"][0] == {"type": "text", "text": LONG_HALF}
    assert out[1]["content"][1] == image
    assert out[1]["content"][2] == {"type": "text", "text": "x z"}
    assert out[2] == before[2] and out[3] == before[3] and out[4] == before[4]
    assert fake.calls[0][0] == [LONG, "x y z"] and fake.calls[0][1]["target_tokens"] == 5
    assert info["compressed_messages"] == [1]
    assert info["origin_tokens"] > info["compressed_tokens"] > 0
    assert info["pieces_origin_tokens"] == 11 and info["pieces_compressed_tokens"] == 6
    assert info["result"] is not None and 0 < info["rate"] < 1

    # More roles; keep_last=False compresses the question too.
    out = compress_messages(messages, roles=("user", "tool"), keep_last=False, compressor=FakeCompressor())
    assert out[3]["content"] == LONG_HALF and out[4]["content"] == "final"
    assert out[0] == before[0]
    out = compress_messages(messages, roles="system", keep_last=False, compressor=FakeCompressor())
    assert out[0]["content"][0]["text"] == LONG_HALF and out[1] == before[1]


def test_anthropic_blocks():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "text", "text": LONG + '\n```json\n{"k": 1}\n```\n' + LONG},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"q": LONG}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": LONG}]},
        {"role": "user", "content": [{"type": "text", "text": "the question " + LONG}]},
        {"role": "assistant", "content": "{"},  # prefill: the question above stays untouched
    ]
    before = copy.deepcopy(messages)
    out = compress_messages(messages, rate=0.5, compressor=FakeCompressor())
    assert messages == before
    assert out[0]["content"][0] == before[0]["content"][0]
    assert out[0]["content"][1]["text"] == LONG_HALF + '\n```json\n{"k": 1}\n```\n' + LONG_HALF
    assert out[1:] == before[1:]


def test_messages_protect_option():
    text = "# Title words here\nbody one two three"
    messages = [{"role": "user", "content": text}, {"role": "user", "content": "q"}]
    assert (
        compress_messages(messages, compressor=FakeCompressor())[0]["content"]
        == "# Title words here\nbody two"
    )
    out = compress_messages(messages, compressor=FakeCompressor(), protect=False)
    assert out[0]["content"] == "# words body two"  # the fake joins with spaces
    with pytest.raises(ValueError, match="unknown kind"):
        compress_messages(messages, compressor=FakeCompressor(), protect=("code", "xml"))


def test_messages_nothing_to_compress():
    fake = FakeCompressor()
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": LONG}]
    out, info = compress_messages(messages, compressor=fake, return_result=True)
    assert out == messages and fake.calls == []
    assert info["result"] is None and info["rate"] == 1.0 and info["compressed_messages"] == []
    assert compress_messages([], compressor=fake) == []


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ("hello", TypeError),
        ({"role": "user", "content": "x"}, TypeError),
        (None, TypeError),
        (["hello"], TypeError),
        ([{"content": "x"}], ValueError),
        ([{"role": "user"}], ValueError),
        ([{"role": 3, "content": "x"}], TypeError),
        ([{"role": "user", "content": 5}], TypeError),
        ([{"role": "user", "content": ["plain string part"]}], TypeError),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], TypeError),
    ],
)
def test_messages_bad_shapes(messages, error):
    with pytest.raises(error) as excinfo:
        compress_messages(messages, compressor=FakeCompressor())
    assert isinstance(excinfo.value, MessagesError)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0}, ValueError),
        ({"rate": -0.5}, ValueError),
        ({"rate": 1.5}, ValueError),
        ({"rate": float("nan")}, ValueError),
        ({"rate": "0.5"}, TypeError),
        ({"target_tokens": -1}, ValueError),
        ({"target_tokens": 2.5}, TypeError),
        ({"roles": 5}, TypeError),
        ({"compressor": object()}, TypeError),
    ],
)
def test_messages_bad_arguments(kwargs, error):
    messages = [{"role": "user", "content": LONG}, {"role": "user", "content": "q"}]
    kwargs.setdefault("compressor", FakeCompressor())
    with pytest.raises(error):
        compress_messages(messages, **kwargs)


def test_messages_responses_api_parts_and_lazy_default():
    messages = [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": LONG}, {"type": "input_image", "image_url": "u"}],
        },
        {"role": "user", "content": "q"},
    ]
    out = compress_messages(messages, compressor=FakeCompressor())
    assert out[0]["content"] == [
        {"type": "input_text", "text": LONG_HALF},
        {"type": "input_image", "image_url": "u"},
    ]
    # Nothing to compress: the default compressor is never built (no model is loaded).
    untouched = [{"role": "system", "content": LONG}, {"role": "user", "content": LONG}]
    out, info = compress_messages(untouched, rate=0.5, return_result=True)
    assert (
        out == untouched and info["result"] is None and info["origin_tokens"] == info["compressed_tokens"] > 0
    )
