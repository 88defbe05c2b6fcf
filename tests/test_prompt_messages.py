"""compress_messages keeps the question, not the whole question message (single-turn calls).

The usual API call is one user message holding a document and a question. Its document is
compressed and only its question stays verbatim: the final text part in content-part form, a
``question=`` text, or the rule of :func:`split_question` for a plain string. The rule and the
argument checks run without a model; the end-to-end tests use the shipped default compressor
(minilm-l6 + the distilled adapter) at rate 0.5 on real text (the Paul Graham essays).
"""

from __future__ import annotations

import copy

import pytest

from tokenlean.compressors.prompt.counting import get_counter
from tokenlean.compressors.prompt.messages import (
    MessagesError,
    MessagesTypeError,
    compress_messages,
    split_question,
)

QUESTION = "What does the author say about addiction?"
# Long enough that the question is well under a quarter of the message.
REPORT = "The report covers sales, costs and staff for each of our regions this year. " * 5


@pytest.fixture(scope="module")
def document() -> str:
    """About 3,000 characters of real prose, cut at a word boundary."""
    from tokenlean.data import load_text

    essays = load_text("paul-graham-essays")
    return essays[: essays.rfind(" ", 0, 2980)]


def _texts(content) -> list[str]:
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


def _chars(content) -> int:
    return sum(len(t) for t in _texts(content))


def _check_figures(messages, out, info) -> None:
    counter = get_counter()
    before = [t for m in messages for t in _texts(m["content"])]
    after = [t for m in out for t in _texts(m["content"])]
    assert info["origin_tokens"] == sum(counter.count_batch(before))
    assert info["compressed_tokens"] == sum(counter.count_batch(after))
    assert info["rate"] == pytest.approx(info["compressed_tokens"] / info["origin_tokens"])
    assert info["ratio"] == pytest.approx(info["origin_tokens"] / info["compressed_tokens"])
    # The compressor saw the document only, and honoured the rate on it.
    assert info["pieces_origin_tokens"] < info["origin_tokens"]
    assert abs(info["pieces_compressed_tokens"] / info["pieces_origin_tokens"] - 0.5) <= 0.03


# --- the rule, without a model ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "question"),
    [
        # the last paragraph, when short
        (REPORT + "\n\nWhich region grew fastest?", "Which region grew fastest?"),
        (
            REPORT + "\n\nQuestion: which region grew fastest?\nAnswer:",
            "Question: which region grew fastest?\nAnswer:",
        ),
        # trailing whitespace and blank lines full of spaces go with the question
        (REPORT + "\n\n  \nWhich region grew fastest?\n\n \t\n", "Which region grew fastest?\n\n \t\n"),
        (REPORT + "\r\n\r\nWhich region grew fastest?\r\n", "Which region grew fastest?\r\n"),
        # no blank line: the trailing lines ending with "?"
        (REPORT + "\nWhich region grew fastest?\n", "Which region grew fastest?\n"),
        (REPORT + "\nWhich region grew fastest?\nAnd why?", "Which region grew fastest?\nAnd why?"),
        # a code block after the question goes with it, blank lines inside the fence included
        (
            REPORT + "\n\nWhat does this print?\n\n```python\nx = 1\n\nprint(x)\n```\n",
            "What does this print?\n\n```python\nx = 1\n\nprint(x)\n```\n",
        ),
        (
            REPORT + "\n\nWhat does this print?\n```python\nx = 1\n\nprint(x)\n```",
            "What does this print?\n```python\nx = 1\n\nprint(x)\n```",
        ),
        (
            REPORT + "\n```python\nx = 1\n\nprint(x)\n```\nWhat does this print?",
            "What does this print?",
        ),
    ],
)
def test_split_question_finds_the_question(text, question):
    context, found = split_question(text)
    assert found == question
    assert context + found == text and context.strip()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  \n\t ",
        "Which region grew fastest?",  # only a question
        "Which region grew fastest?\n\n",
        REPORT,  # one paragraph, no question line
        REPORT + "Which region grew fastest?",  # the question on the document's last line
        "Some context here.\n\nWhich region grew fastest?",  # the question is over a quarter
        "Summarise the text below:\n\n" + REPORT + "\n\n" + REPORT,  # the tail is long
        "```python\nprint(1)\n```\n\nWhat does this print?",  # nothing but code before it
    ],
)
def test_split_question_keeps_the_whole_message(text):
    assert split_question(text) == ("", text)


def test_split_question_bad_type():
    with pytest.raises(MessagesTypeError):
        split_question(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "messages", "error", "match"),
    [
        ({"question": "Not in the message?"}, None, MessagesError, r"not found in messages\[1\]"),
        ({"question": "   "}, None, MessagesError, "blank"),
        ({"question": 3}, None, MessagesTypeError, "must be a str"),
        ({"question": "Which region?", "keep_last": False}, None, MessagesError, "keep_last=True"),
        ({"question": "Which region?"}, [{"role": "system", "content": "x"}], MessagesError, "no message"),
    ],
)
def test_question_argument_errors(kwargs, messages, error, match):
    if messages is None:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": REPORT + "\n\nWhich region grew fastest?"},
        ]
    with pytest.raises(error, match=match):
        compress_messages(messages, rate=0.5, **kwargs)  # raises before any model is loaded


# --- single-turn calls with the default compressor ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("separator", ["\n\n", "\n"])
def test_single_turn_openai_string(document, separator):
    messages = [{"role": "user", "content": document + separator + QUESTION}]
    before = copy.deepcopy(messages)
    out, info = compress_messages(messages, rate=0.5, return_result=True)
    assert messages == before  # input untouched
    text = out[0]["content"]
    assert text.endswith(separator + QUESTION)  # the question verbatim, after its own separator
    assert len(text) < 0.8 * len(messages[0]["content"])
    assert info["compressed_messages"] == [0]
    rule = "last paragraph" if separator == "\n\n" else "question lines"
    assert info["question"] == {"message": 0, "part": None, "text": QUESTION, "rule": rule}
    _check_figures(messages, out, info)


@pytest.mark.slow
def test_single_turn_openai_content_parts(document):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    # One text part holding document and question: the string rule applies to it.
    messages = [{"role": "user", "content": [image, {"type": "text", "text": document + "\n\n" + QUESTION}]}]
    out, info = compress_messages(messages, rate=0.5, return_result=True)
    assert out[0]["content"][0] == image
    text = out[0]["content"][1]["text"]
    assert text.endswith("\n\n" + QUESTION) and len(text) < 0.8 * len(document)
    assert info["question"] == {"message": 0, "part": 1, "text": QUESTION, "rule": "last paragraph"}
    _check_figures(messages, out, info)

    # Two text parts: the final one is the question, verbatim whatever it holds.
    final = "Answer in one sentence.\n\n" + QUESTION
    messages = [
        {"role": "user", "content": [{"type": "text", "text": document}, {"type": "text", "text": final}]}
    ]
    out, info = compress_messages(messages, rate=0.5, return_result=True)
    assert out[0]["content"][1] == {"type": "text", "text": final}
    assert _chars(out[0]["content"]) < 0.8 * _chars(messages[0]["content"])
    assert info["question"]["rule"] == "final text part" and info["question"]["part"] == 1
    _check_figures(messages, out, info)


@pytest.mark.slow
def test_single_turn_anthropic_blocks(document):
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
    messages = [
        {
            "role": "user",
            "content": [
                pdf,
                {"type": "text", "text": document, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": QUESTION},
            ],
        },
        {"role": "assistant", "content": "The author says"},  # a prefill is not the question
    ]
    before = copy.deepcopy(messages)
    out, info = compress_messages(messages, rate=0.5, return_result=True)
    assert messages == before
    blocks = out[0]["content"]
    assert blocks[0] == pdf and blocks[2] == {"type": "text", "text": QUESTION} and out[1] == messages[1]
    assert blocks[1]["cache_control"] == {"type": "ephemeral"}
    assert len(blocks[1]["text"]) < 0.8 * len(document)
    assert info["question"] == {"message": 0, "part": 2, "text": QUESTION, "rule": "final text part"}
    _check_figures(messages, out, info)


@pytest.mark.slow
def test_question_argument(document):
    # An instruction that opens the prompt: kept verbatim, the rest compressed.
    instruction = "Summarise the essay below in three bullet points."
    messages = [{"role": "user", "content": instruction + "\n\n" + document + "\n"}]
    out, info = compress_messages(messages, rate=0.5, question=f"  {instruction}\n", return_result=True)
    text = out[0]["content"]
    assert text.startswith(instruction + "\n\n") and text.endswith("\n")
    assert len(text) < 0.8 * len(messages[0]["content"])
    assert info["question"] == {"message": 0, "part": None, "text": instruction, "rule": "question="}

    # Content parts: the part holding it is split, the other text parts compressed.
    tail = "Answer in one short sentence, quoting the essay."
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": document + "\n\n" + QUESTION + "\n" + tail},
                {"type": "text", "text": document[:800]},
            ],
        }
    ]
    out, info = compress_messages(messages, rate=0.5, question=QUESTION, return_result=True)
    first, second = (p["text"] for p in out[0]["content"])
    assert "\n\n" + QUESTION + "\n" in first
    counter = get_counter()
    sent = [document, tail, document[:800]]  # before and after the question, the other part
    assert info["pieces_origin_tokens"] == sum(counter.count(t.strip()) for t in sent)
    assert len(second) < 0.8 * 800
    assert info["question"]["part"] == 0
    _check_figures(messages, out, info)


def test_messages_kept_whole(document):
    """A question alone, one short paragraph: unchanged, and nothing is compressed."""
    for content in [QUESTION, "Tell me about addiction.\n", [{"type": "text", "text": QUESTION}]]:
        messages = [{"role": "system", "content": document}, {"role": "user", "content": content}]
        out, info = compress_messages(messages, rate=0.5, return_result=True)
        assert out == messages and info["result"] is None and info["compressed_messages"] == []
        assert info["question"]["rule"] == "whole message"


@pytest.mark.slow
def test_question_with_a_code_block(document):
    code = "```python\ndef concentrate(x):\n\n    return x * 10\n```\n"
    question = "Which essay idea does this code illustrate?\n\n" + code
    messages = [{"role": "user", "content": document + "\n\n" + question}]
    out, info = compress_messages(messages, rate=0.5, return_result=True)
    assert out[0]["content"].endswith("\n\n" + question)
    assert len(out[0]["content"]) < 0.8 * len(messages[0]["content"])
    assert info["question"]["text"] == question
    _check_figures(messages, out, info)


@pytest.mark.slow
def test_multi_turn_conversation(document):
    """Earlier behaviour kept: system and assistant untouched, earlier user turns compressed."""
    system = "You answer questions about essays. " * 10
    half = len(document) // 2
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": document[:half]},
        {"role": "assistant", "content": "Understood, go on."},
        {"role": "user", "content": document[half:] + "\n\n" + QUESTION},
    ]
    before = copy.deepcopy(messages)
    out, info = compress_messages(messages, rate=0.5, return_result=True)
    assert messages == before
    assert out[0] == messages[0] and out[2] == messages[2]
    assert len(out[1]["content"]) < 0.8 * half  # an earlier user turn: compressed whole
    assert out[3]["content"].endswith("\n\n" + QUESTION)
    assert len(out[3]["content"]) < 0.8 * len(messages[3]["content"])
    assert info["compressed_messages"] == [1, 3] and info["pieces"] == 2
    _check_figures(messages, out, info)

    counter = get_counter()
    sent = [messages[1]["content"], document[half:]]  # what reached the compressor
    assert info["pieces_origin_tokens"] == sum(counter.count(t.strip()) for t in sent)

    # keep_last=False: the question message is compressed whole, question included.
    out, info = compress_messages(messages, rate=0.5, keep_last=False, return_result=True)
    assert out[0] == messages[0] and out[2] == messages[2] and info["question"] is None
    sent = [messages[1]["content"], messages[3]["content"]]
    assert info["pieces_origin_tokens"] == sum(counter.count(t.strip()) for t in sent)
    assert len(out[3]["content"]) < 0.8 * len(messages[3]["content"])
