"""Compress chat message lists (OpenAI and Anthropic shapes) before an API call.

Only the text of messages whose role is in ``roles`` is compressed (``"user"`` by default);
system messages, the final question (``keep_last``), images, tool calls and tool results are
left as they are, and fenced code, JSON and markdown headings inside a compressed text are
kept verbatim (see :mod:`tokenlean.compressors.prompt.structure`). All compressed pieces go
to the compressor in one call, so ``rate`` and ``target_tokens`` apply to them together.

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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenlean.errors import TokenleanError

from .structure import compress_structured_batch

__all__ = ["TEXT_PART_TYPES", "MessagesError", "MessagesTypeError", "compress_messages"]

_PROTECT_KINDS = ("code", "json", "headings", "tables")
#: Content-part types whose ``"text"`` is compressed (``input_text``: OpenAI's Responses API).
TEXT_PART_TYPES = ("text", "input_text")


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
    **compress_kwargs: Any,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, Any]]:
    """Compress the text of a chat message list, keeping its structure.

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
        Leave the question untouched: the last message whose role is in ``roles`` (an assistant
        prefill after it does not count as the question).
    compressor : object, optional
        Anything with ``.compress(list_of_str, rate=..., target_tokens=..., **kw)`` returning a
        :class:`~tokenlean.compressors.prompt.result.CompressionResult` (``.texts`` in order).
        Default: one shared ``PromptCompressor()`` with the shipped model, built on first use.
    protect : bool or tuple of str
        Kinds of block kept verbatim inside compressed texts: ``True`` (default) is
        ``("code", "json", "headings")``; ``"tables"`` may be added; ``False`` or ``()`` protects nothing.
    return_result : bool
        Also return a dict of figures (see Returns).
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
        compressor's own counts), ``protected`` (protected blocks per kind) and ``result``
        (the compressor's result, ``None`` when nothing was compressed).

    Raises
    ------
    MessagesTypeError, MessagesError
        (``TypeError`` / ``ValueError``) for a malformed message list, a bad rate or budget.
    """
    _validate_messages(messages)
    _validate_budget(rate, target_tokens)
    role_set = _normalise_roles(roles)
    if compressor is not None and not callable(getattr(compressor, "compress", None)):
        raise MessagesTypeError(f"compressor must have a .compress method, got {type(compressor).__name__}")
    flags = _normalise_protect(protect)

    candidates = [i for i, m in enumerate(messages) if m["role"] in role_set]
    if keep_last and candidates:
        candidates = candidates[:-1]
    out: list[dict[str, Any]] = [copy.deepcopy(dict(m)) for m in messages]
    slots = _text_slots(out, candidates)
    texts = [out[i]["content"] if j is None else out[i]["content"][j]["text"] for i, j in slots]

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
    touched: list[int] = []
    for (i, j), old, new in zip(slots, texts, new_texts):
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
    }
    return out, info
