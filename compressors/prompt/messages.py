"""Compress chat message lists (OpenAI and Anthropic shapes) before an API call.

Only the text of messages whose role is in ``roles`` is compressed (``"user"`` by default);
system messages, the question (``keep_last``), images, tool calls and tool results are left as
they are, and fenced code, JSON and markdown headings inside a compressed text are kept
verbatim (see :mod:`tokenlean.compressors.prompt.structure`). All compressed pieces go to the
compressor in one call, so ``rate`` and ``target_tokens`` apply to them together.

The question message
--------------------
With ``keep_last=True`` (the default) the last message whose role is in ``roles`` is the
*question message* (an assistant prefill after it does not count). It is not kept whole: the
usual single-turn call is one user message holding a document and a question, so its context is
compressed with the other pieces and only the question stays verbatim:

- ``question="..."`` given: the last occurrence of that text (leading and trailing blanks of
  the argument ignored) in the question message's text is kept verbatim, and everything else in
  the message's text (before it, after it, other text parts) is compressed. It may stand
  anywhere, so an instruction that opens the prompt (``"Summarise the text below:"``) works too.
  Text not found verbatim raises :class:`MessagesError`.
- content parts holding two or more text parts: every text part but the final one is
  compressed; the final text part is kept verbatim (the sender's own split).
- a string content, or content parts holding one text part: the rule of
  :func:`split_question` (the last paragraph when it is short, else the trailing lines ending
  with ``?``; otherwise the whole message is kept verbatim, as for a message that is only a
  question).

``keep_last=False`` compresses the question message like any other.

Shapes understood
-----------------
- ``{"role": ..., "content": "a string"}`` (both APIs);
- ``{"role": ..., "content": [part, ...]}`` where a part ``{"type": "text", "text": "..."}``
  (or ``"input_text"``) is compressed and every other part (``image_url``, ``input_audio``, ``image``, ``document``,
  ``tool_use``, ``tool_result``...) is copied unchanged;
- ``"content": None`` (an OpenAI assistant message carrying ``tool_calls``) is left alone.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenlean.errors import TokenleanError

from .structure import compress_structured_batch, split_protected

__all__ = [
    "QUESTION_MAX_SHARE",
    "TEXT_PART_TYPES",
    "MessagesError",
    "MessagesTypeError",
    "compress_messages",
    "split_question",
]

_PROTECT_KINDS = ("code", "json", "headings", "tables")
#: Content-part types whose ``"text"`` is compressed (``input_text``: OpenAI's Responses API).
TEXT_PART_TYPES = ("text", "input_text")
#: The most the question found by :func:`split_question` may weigh, as a share of the message's
#: prose (non-blank characters outside fenced code); a longer tail is not taken for the question.
QUESTION_MAX_SHARE = 0.25


class MessagesError(TokenleanError, ValueError):
    """A message list or a compress_messages argument is invalid."""


class MessagesTypeError(MessagesError, TypeError):
    """A message list or a compress_messages argument has the wrong type."""


@functools.lru_cache(maxsize=1)
def _default_compressor() -> Any:
    from .compressor import PromptCompressor

    return PromptCompressor()


def _validate_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise MessagesTypeError(
            f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise MessagesTypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if "role" not in message:
            raise MessagesError(f"messages[{i}] has no 'role'")
        if not isinstance(message["role"], str):
            raise MessagesTypeError(
                f"messages[{i}]['role'] must be a str, got {type(message['role']).__name__}"
            )
        if "content" not in message:
            raise MessagesError(f"messages[{i}] (role {message['role']!r}) has no 'content'")
        content = message["content"]
        if content is None or isinstance(content, str):
            continue
        if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
            raise MessagesTypeError(
                f"messages[{i}]['content'] must be a str, a list of content parts or None, "
                f"got {type(content).__name__}"
            )
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise MessagesTypeError(
                    f"messages[{i}]['content'][{j}] must be a dict such as "
                    f"{{'type': 'text', 'text': ...}}, got {type(part).__name__}"
                )
            if part.get("type") in TEXT_PART_TYPES and not isinstance(part.get("text"), str):
                raise MessagesTypeError(
                    f"messages[{i}]['content'][{j}] is a text part whose 'text' is "
                    f"{type(part.get('text')).__name__}, not a str"
                )


def _validate_budget(rate: Any, target_tokens: Any) -> None:
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise MessagesTypeError(f"rate must be a number in (0, 1], got {type(rate).__name__}")
        if not math.isfinite(rate) or not 0 < rate <= 1:
            raise MessagesError(f"rate must be in (0, 1] (the fraction of tokens kept), got {rate}")
    if target_tokens is not None:
        if isinstance(target_tokens, bool) or not isinstance(target_tokens, int):
            raise MessagesTypeError(f"target_tokens must be an int, got {type(target_tokens).__name__}")
        if target_tokens < 0:
            raise MessagesError(f"target_tokens must be >= 0, got {target_tokens}")


def _normalise_roles(roles: Any) -> frozenset[str]:
    if isinstance(roles, str):
        return frozenset((roles,))
    if not isinstance(roles, Iterable):
        raise MessagesTypeError(f"roles must be a str or a tuple of str, got {type(roles).__name__}")
    out = tuple(roles)
    for role in out:
        if not isinstance(role, str):
            raise MessagesTypeError(f"roles must hold strings, got {type(role).__name__}")
    return frozenset(out)


def _normalise_protect(protect: Any) -> dict[str, bool]:
    if protect is None or protect is False:
        kinds: tuple[str, ...] = ()
    elif protect is True:
        kinds = ("code", "json", "headings")
    elif isinstance(protect, str):
        kinds = (protect,)
    else:
        kinds = tuple(protect)
    unknown = [k for k in kinds if k not in _PROTECT_KINDS]
    if unknown:
        raise MessagesError(f"protect: unknown kind(s) {unknown}; choose from {list(_PROTECT_KINDS)}")
    return {kind: kind in kinds for kind in _PROTECT_KINDS}


def _text_slots(
    messages: Sequence[Mapping[str, Any]], indices: Iterable[int]
) -> list[tuple[int, int | None]]:
    """``(message index, part index or None for a string content)`` of every text to compress."""
    slots: list[tuple[int, int | None]] = []
    for i in indices:
        content = messages[i]["content"]
        if isinstance(content, str):
            slots.append((i, None))
        elif content is not None:
            slots.extend((i, j) for j, part in enumerate(content) if part.get("type") in TEXT_PART_TYPES)
    return slots


def _all_texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        messages[i]["content"] if j is None else messages[i]["content"][j]["text"]
        for i, j in _text_slots(messages, range(len(messages)))
    ]


# --- where the question starts -----------------------------------------------------------------

_LINE = re.compile(r"[^\n]*\n|[^\n]+")


def _question_lines(text: str) -> list[tuple[int, str, int]]:
    """``(start, kind, weight)`` of each line of ``text`` with its trailing blanks cut off.

    ``kind`` is ``"code"`` (inside a fenced code block), ``"blank"``, ``"ask"`` (a line ending
    with ``?``) or ``"text"``; ``weight`` is the number of non-blank characters of a text or ask
    line (0 otherwise).
    """
    body = text[: len(text.rstrip())]
    fences = [(0, 0)]
    pos = 0
    for seg in split_protected(text, code=True, json=False, headings=False):
        if seg.protected:
            fences.append((pos, pos + len(seg.text)))
        pos += len(seg.text)
    lines: list[tuple[int, str, int]] = []
    f = 0
    for match in _LINE.finditer(body):
        start, line = match.start(), match.group(0)
        while f + 1 < len(fences) and fences[f + 1][0] <= start:
            f += 1
        if fences[f][0] <= start < fences[f][1]:
            lines.append((start, "code", 0))
        elif not line.strip():
            lines.append((start, "blank", 0))
        else:
            kind = "ask" if line.rstrip().endswith("?") else "text"
            lines.append((start, kind, len("".join(line.split()))))
    return lines


def _question_start(text: str, max_share: float = QUESTION_MAX_SHARE) -> tuple[int, str]:
    """``(index where the question starts, rule)``: 0 and ``"whole message"`` when no rule applies."""
    lines = _question_lines(text)
    total = sum(weight for _, _, weight in lines)
    if total == 0:
        return 0, "whole message"

    def short(first: int) -> bool:
        return sum(weight for _, _, weight in lines[first:]) <= max_share * total

    # 1. The last paragraph holding prose (code-only paragraphs after it go with it).
    starts = [
        k
        for k, (_, kind, _) in enumerate(lines)
        if kind != "blank" and (k == 0 or lines[k - 1][1] == "blank")
    ]
    bounds = list(zip(starts, [*starts[1:], len(lines)]))
    for p in range(len(bounds) - 1, 0, -1):
        first, stop = bounds[p]
        if any(weight for _, _, weight in lines[first:stop]):
            if short(first):
                return lines[first][0], "last paragraph"
            break
    # 2. The trailing lines ending with "?" (fenced code and blank lines after them go with them).
    k = len(lines) - 1
    while k >= 0 and lines[k][1] in ("code", "blank"):
        k -= 1
    end = k
    while k >= 0 and lines[k][1] == "ask":
        k -= 1
    if k < end and short(k + 1):
        return lines[k + 1][0], "question lines"
    return 0, "whole message"


def split_question(text: str) -> tuple[str, str]:
    """Split a message into ``(context, question)`` by the rule :func:`compress_messages` uses.

    ``context + question == text`` always. The context is what gets compressed; the question,
    with the whitespace that ends the message, is kept verbatim. The question starts at

    1. the last paragraph (lines after the last blank line; blank lines inside fenced code
       blocks do not count) that holds prose, when it weighs at most :data:`QUESTION_MAX_SHARE`
       (a quarter) of the message; a fenced code block after it, in its own paragraph, goes
       with it ("What does this print?", blank line, the code);
    2. otherwise the trailing lines that end with ``?`` (fenced code after them goes with them),
       under the same quarter limit;
    3. otherwise nowhere: the context is ``""`` and the whole message is the question (a
       message of one paragraph without a ``?`` line at its end, a message that is only a
       question, a long tail).

    Weights count non-blank characters outside fenced code blocks (code is never compressed
    anyway). The separator (the blank lines before the question) stays at the end of the
    context, where compression keeps it.

    Examples
    --------
    >>> report = "The report covers sales, costs and staff for each of our regions. " * 3
    >>> split_question(report + "\\n\\nWhich region grew fastest?\\n")[1]
    'Which region grew fastest?\\n'
    >>> split_question("Which region grew fastest?")
    ('', 'Which region grew fastest?')
    """
    if not isinstance(text, str):
        raise MessagesTypeError(f"text must be a str, got {type(text).__name__}")
    start, _ = _question_start(text)
    return text[:start], text[start:]


def _validate_question(question: Any) -> str | None:
    if question is None:
        return None
    if not isinstance(question, str):
        raise MessagesTypeError(f"question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise MessagesError("question must hold some text (it is kept verbatim), got a blank string")
    return question.strip()


#: One text slot to rebuild: (message index, part index or None, [(piece, compress?), ...]).
_Plan = tuple[int, "int | None", list[tuple[str, bool]]]


def _question_plan(
    messages: Sequence[Mapping[str, Any]], i: int, question: str | None
) -> tuple[list[_Plan], dict[str, Any]]:
    """The pieces of the question message ``messages[i]`` (compressed or verbatim) and where its question is."""
    slots = _text_slots(messages, [i])
    texts = [messages[i]["content"] if j is None else messages[i]["content"][j]["text"] for _, j in slots]
    plan: list[_Plan] = [(i, j, [(t, True)]) for (_, j), t in zip(slots, texts)]
    if question is not None:
        for k in range(len(texts) - 1, -1, -1):
            pos = texts[k].rfind(question)
            if pos >= 0:
                break
        else:
            role = messages[i]["role"]
            ending = f"its text ends with {texts[-1][-80:]!r}" if texts else "it has no text"
            raise MessagesError(
                f"question {question[:80]!r} not found in messages[{i}] (the last {role!r} message, whose "
                f"question stays verbatim): it must appear there character for character "
                f"(whitespace and case included); {ending}"
            )
        stop = pos + len(question)
        text = texts[k]
        plan[k] = (i, slots[k][1], [(text[:pos], True), (question, False), (text[stop:], True)])
        return plan, {"message": i, "part": slots[k][1], "text": question, "rule": "question="}
    if not texts:
        return plan, {"message": i, "part": None, "text": "", "rule": "no text"}
    text = texts[-1]
    if len(texts) > 1:
        start, rule = 0, "final text part"
    else:
        start, rule = _question_start(text)
    plan[-1] = (i, slots[-1][1], [(text[:start], True), (text[start:], False)])
    return plan, {"message": i, "part": slots[-1][1], "text": text[start:], "rule": rule}


def _counter_of(compressor: Any) -> Any:
    from .counting import get_counter

    for attr in ("counter", "_counter", "token_counter"):
        candidate = getattr(compressor, attr, None)
        if candidate is not None and hasattr(candidate, "count_batch"):
            return candidate
    return get_counter("cl100k")


def compress_messages(
    messages: Sequence[Mapping[str, Any]],
    rate: float | None = None,
    target_tokens: int | None = None,
    roles: Sequence[str] | str = ("user",),
    keep_last: bool = True,
    compressor: Any = None,
    protect: bool | Sequence[str] = True,
    return_result: bool = False,
    question: str | None = None,
    **compress_kwargs: Any,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, Any]]:
    """Compress the text of a chat message list, keeping its structure and the question.

    Parameters
    ----------
    messages : list of dict
        OpenAI- or Anthropic-style messages: ``{"role": str, "content": str | list of parts | None}``.
    rate : float, optional
        Fraction of the compressed pieces' tokens to keep, in (0, 1] (0.33 is about 3x).
    target_tokens : int, optional
        Token budget for all compressed pieces together (not for the whole conversation).
    roles : str or tuple of str
        Roles whose text is compressed (default ``("user",)``; system messages are untouched).
    keep_last : bool
        Keep the question verbatim. The question message is the last message whose role is in
        ``roles`` (an assistant prefill after it does not count); its context is compressed and
        its question kept: with ``question=``, that text; else with two or more text parts,
        the final text part; else (a string, or one text part) the rule of
        :func:`split_question`: the last paragraph when it is at most a quarter of the
        message, else the trailing lines ending with ``?``, else the whole message. Earlier
        messages are compressed whole. ``False``: the question message is compressed whole too.
    compressor : object, optional
        Anything with ``.compress(list_of_str, rate=..., target_tokens=..., **kw)`` returning a
        :class:`~tokenlean.compressors.prompt.result.CompressionResult` (``.texts`` in order).
        Default: one shared ``PromptCompressor()`` with the shipped model, built on first use.
    protect : bool or tuple of str
        Kinds of block kept verbatim inside compressed texts: ``True`` (default) is
        ``("code", "json", "headings")``; ``"tables"`` may be added; ``False`` or ``()`` protects nothing.
    return_result : bool
        Also return a dict of figures (see Returns).
    question : str, optional
        The question (or instruction) to keep verbatim in the question message. Its last
        occurrence in that message's text (leading and trailing blanks of the argument
        ignored; anywhere, so an instruction opening the prompt works too) is kept, and the rest
        of the message's text, before and after it, is compressed. Needs ``keep_last=True``.
    **compress_kwargs
        Passed on to ``compressor.compress`` (``force_tokens``, ``drop_consecutive``...).

    Returns
    -------
    list of dict, or (list of dict, dict)
        A new message list of the same shape (the input is not modified). With
        ``return_result=True`` also a dict: ``origin_tokens`` / ``compressed_tokens`` (all text
        of all messages, before and after), ``ratio``, ``rate``, ``counter``,
        ``compressed_messages`` (indices of the messages whose text changed), ``pieces`` (texts sent to
        the compressor), ``pieces_origin_tokens`` / ``pieces_compressed_tokens`` (the
        compressor's own counts), ``protected`` (protected blocks per kind), ``result``
        (the compressor's result, ``None`` when nothing was compressed) and ``question``:
        ``{"message": index, "part": part index or None, "text": the text kept verbatim,
        "rule": "question=" | "final text part" | "last paragraph" | "question lines" |
        "whole message" | "no text"}``, or ``None`` with ``keep_last=False`` or no message to keep.

    Raises
    ------
    MessagesTypeError, MessagesError
        (``TypeError`` / ``ValueError``) for a malformed message list, a bad rate or budget, or
        a ``question`` not found verbatim in the question message.

    Examples
    --------
    A single-turn call, one user message holding a document and a question: the document is
    compressed, the question (its last paragraph here) comes back verbatim.

    >>> messages = [{"role": "user", "content": document + "\\n\\nWhat is the main risk?"}]  # doctest: +SKIP
    >>> short = compress_messages(messages, rate=0.5)  # doctest: +SKIP
    >>> short[0]["content"].endswith("\\n\\nWhat is the main risk?")  # doctest: +SKIP
    True
    """
    _validate_messages(messages)
    _validate_budget(rate, target_tokens)
    role_set = _normalise_roles(roles)
    if compressor is not None and not callable(getattr(compressor, "compress", None)):
        raise MessagesTypeError(f"compressor must have a .compress method, got {type(compressor).__name__}")
    flags = _normalise_protect(protect)
    question = _validate_question(question)

    candidates = [i for i, m in enumerate(messages) if m["role"] in role_set]
    if question is not None and not keep_last:
        raise MessagesError("question= names the text kept verbatim, which needs keep_last=True")
    if question is not None and not candidates:
        raise MessagesError(f"question= given, but no message has a role in {sorted(role_set)}")
    out: list[dict[str, Any]] = [copy.deepcopy(dict(m)) for m in messages]
    last = candidates[-1] if keep_last and candidates else None
    plan: list[_Plan] = [
        (i, j, [(out[i]["content"] if j is None else out[i]["content"][j]["text"], True)])
        for i, j in _text_slots(out, [c for c in candidates if c != last])
    ]
    question_info: dict[str, Any] | None = None
    if last is not None:
        question_plan, question_info = _question_plan(out, last, question)
        plan.extend(question_plan)
    texts = [piece for _, _, parts in plan for piece, compress in parts if compress and piece]

    holder: dict[str, Any] = {"result": None}

    def compress_fn(pieces: list[str]) -> list[str]:
        nonlocal compressor
        if compressor is None:
            compressor = _default_compressor()
        result = compressor.compress(pieces, rate=rate, target_tokens=target_tokens, **compress_kwargs)
        holder["result"] = result
        return list(result.texts)

    new_texts, split_info = compress_structured_batch(
        texts,
        compress_fn,
        code=flags["code"],
        json=flags["json"],
        headings=flags["headings"],
        tables=flags["tables"],
    )
    compressed_pieces = iter(new_texts)
    touched: list[int] = []
    for i, j, parts in plan:
        old = "".join(piece for piece, _ in parts)
        new = "".join(next(compressed_pieces) if compress and piece else piece for piece, compress in parts)
        if new == old:
            continue
        if j is None:
            out[i]["content"] = new
        else:
            out[i]["content"][j]["text"] = new
        if not touched or touched[-1] != i:
            touched.append(i)
    if not return_result:
        return out

    result = holder["result"]
    counter = _counter_of(compressor)
    origin = sum(counter.count_batch(_all_texts(messages)))
    compressed = sum(counter.count_batch(_all_texts(out)))
    info = {
        "origin_tokens": origin,
        "compressed_tokens": compressed,
        "ratio": 1.0
        if compressed == 0 and origin == 0
        else (origin / compressed if compressed else math.inf),
        "rate": 1.0 if origin == 0 else compressed / origin,
        "counter": getattr(counter, "name", type(counter).__name__),
        "compressed_messages": touched,
        "pieces": split_info["prose_segments"],
        "pieces_origin_tokens": getattr(result, "origin_tokens", 0),
        "pieces_compressed_tokens": getattr(result, "compressed_tokens", 0),
        "protected": split_info["protected"],
        "result": result,
        "question": question_info,
    }
    return out, info
