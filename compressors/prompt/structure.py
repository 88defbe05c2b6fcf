"""Keep the structure of a prompt verbatim while its prose is compressed.

A word-dropping compressor destroys fenced code, JSON and markdown headings (llmlingua #114,
#202): a dropped brace or backtick breaks the block, and a dropped ``#`` turns a heading into
prose. :func:`split_protected` cuts a text into prose and protected segments (their texts
concatenate back to the input exactly); :func:`compress_structured` compresses only the prose
and puts every protected segment back untouched, in order.

What is protected
-----------------
code
    Fenced code blocks: a line whose first non-blank characters are three or more backticks or
    tildes (an info string such as ````` ```python ````` may follow; a backtick fence's info string
    has no backtick, so ````` ```x``` ````` on one line is inline code, not a fence), up to the
    first line holding only a fence of the same character at least as long. An unterminated
    fence runs to the end of the text.
heading
    Markdown ATX headings: a line starting (after at most three spaces) with one to six ``#``
    followed by a space, a tab or the end of the line.
json
    A JSON object or array that starts a line (after optional indentation) and ends a line: the
    extent is found with :meth:`json.JSONDecoder.raw_decode`, and only blanks may follow the
    closing bracket on its line. A whole text that is one JSON object/array is one segment.
table (off by default)
    A markdown table: a header line holding ``|``, a delimiter row such as ``|---|:--:|``, and
    the non-blank lines holding ``|`` right after it.

A protected segment covers whole lines, including the newline that ends its last line, so a
prose segment always starts at the beginning of a line. Indented (four-space) code blocks and
inline code spans are prose.

The scan is linear in the text: candidate lines are found with one anchored regular
expression, and the work spent on JSON candidates that fail to parse is capped at a small
multiple of the text length (a 5 MB text splits in well under a second).
"""

from __future__ import annotations

import functools
import json as _json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tokenlean.errors import TokenleanError

__all__ = [
    "KINDS",
    "Segment",
    "StructureError",
    "compress_structured",
    "compress_structured_batch",
    "split_protected",
]

#: The kinds of segment :func:`split_protected` returns.
KINDS = ("prose", "code", "json", "heading", "table")


class StructureError(TokenleanError, ValueError):
    """Bad input to the structure-preserving split, or a compress function that broke its contract."""


class StructureTypeError(StructureError, TypeError):
    """An argument of the wrong type (e.g. a text that is not a ``str``)."""


@dataclass(frozen=True)
class Segment:
    """One piece of a text: prose to compress, or a protected block to keep verbatim.

    Attributes
    ----------
    text : str
        The exact characters of this piece of the input.
    protected : bool
        ``True`` for code, JSON, headings and tables (kept verbatim), ``False`` for prose.
    kind : str
        ``"prose"``, ``"code"``, ``"json"``, ``"heading"`` or ``"table"``.
    """

    text: str
    protected: bool
    kind: str


# A line that may open a protected block: a fence, a heading or a JSON object/array (only the
# kinds asked for, so that lines of a kind that is off cost no Python-level work).
@functools.lru_cache(maxsize=8)
def _candidate_pattern(code: bool, json: bool, headings: bool) -> re.Pattern[str]:
    branches = []
    if code:
        branches.append(r"(?P<fence>`{3,}|~{3,})")
    if headings:
        branches.append(r"(?P<head>#{1,6})(?=[ \t\r\n]|\Z)")
    if json:
        branches.append(r"(?P<json>[{\[])")
    return re.compile(r"^(?P<indent>[ \t]*)(?:" + "|".join(branches) + ")", re.MULTILINE)


_CLOSE_BACKTICK = re.compile(r"^[ \t]*(`{3,})[ \t\r]*$", re.MULTILINE)
_CLOSE_TILDE = re.compile(r"^[ \t]*(~{3,})[ \t\r]*$", re.MULTILINE)
# A table delimiter row: cells of dashes with optional alignment colons, separated by pipes.
_DELIMITER_ROW = re.compile(
    r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t\r]*$", re.MULTILINE
)

# A run of consecutive heading lines (one segment).
_HEADING_RUN = re.compile(r"(?: {0,3}#{1,6}(?:[ \t\r][^\n]*)?(?:\n|\Z))+")

_DECODER = _json.JSONDecoder()


def _line_end(text: str, pos: int) -> int:
    """Index just past the newline ending the line that holds ``pos`` (``len(text)`` on the last line)."""
    nl = text.find("\n", pos)
    return len(text) if nl == -1 else nl + 1


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _fence_end(text: str, match: re.Match[str]) -> int | None:
    """End of the fenced block opened on ``match``'s line, or ``None`` when the line is not a fence."""
    fence = match.group("fence")
    open_end = _line_end(text, match.end())
    info = text[match.end() : open_end]
    if fence[0] == "`" and "`" in info:
        return None  # ```inline``` on one line, not a fence (CommonMark)
    closer = _CLOSE_BACKTICK if fence[0] == "`" else _CLOSE_TILDE
    pos = open_end
    while True:
        close = closer.search(text, pos)
        if close is None:
            return len(text)  # unterminated: runs to the end
        if len(close.group(1)) >= len(fence):
            return _line_end(text, close.end())
        pos = close.end()


def _json_end(text: str, idx: int) -> tuple[int | None, int]:
    """``(end of the JSON value starting at idx or None, characters scanned)``.

    The decoder runs on a growing slice of the text: a :class:`json.JSONDecodeError` counts the
    lines from the start of the string it was given, which on the whole text would make every
    failed candidate cost O(its position), quadratic over a long text.
    """
    window = 1024
    while True:
        chunk = text[idx : idx + window]
        try:
            _, end = _DECODER.raw_decode(chunk)
        except _json.JSONDecodeError as exc:
            truncated = exc.pos >= len(chunk) - 16 or exc.msg.startswith("Unterminated string")
            if truncated and idx + len(chunk) < len(text):
                window *= 4
                continue
            return None, max(exc.pos, 1)
        except RecursionError:  # nested deeper than Python's recursion limit
            return None, len(chunk) + len(text) // 64 + 10_000
        return idx + end, end


def _table_spans(text: str) -> list[tuple[int, int]]:
    """Spans (whole lines) of markdown tables, in order."""
    spans: list[tuple[int, int]] = []
    for row in _DELIMITER_ROW.finditer(text):
        if "|" not in row.group(0) or row.start() == 0:
            continue
        head_start = _line_start(text, row.start() - 1)
        header = text[head_start : row.start()]
        if "|" not in header or not header.strip():
            continue
        if spans and head_start < spans[-1][1]:
            continue
        end = _line_end(text, row.end())
        while end < len(text):
            nxt = _line_end(text, end)
            line = text[end:nxt]
            if not line.strip() or "|" not in line:
                break
            end = nxt
        spans.append((head_start, end))
    return spans


def _protected_spans(
    text: str, code: bool, json: bool, headings: bool, tables: bool
) -> list[tuple[int, int, str]]:
    spans: list[tuple[int, int, str]] = []
    table_spans = _table_spans(text) if tables else []
    t_index = 0
    # Work spent on JSON candidates that did not parse (characters scanned); past the cap the
    # rest of the text gets no JSON detection, which keeps adversarial inputs linear.
    json_budget = 4 * len(text) + 100_000
    pos = 0
    matches: Iterator[re.Match[str]] = (
        _candidate_pattern(code, json, headings).finditer(text) if (code or json or headings) else iter(())
    )
    while True:
        match = next(matches, None)
        if match is None:
            break
        start = match.start()
        if start < pos:
            continue  # inside a block already protected
        while t_index < len(table_spans) and table_spans[t_index][0] <= start:
            t_start, t_end = table_spans[t_index]
            t_index += 1
            if t_start >= pos:
                spans.append((t_start, t_end, "table"))
                pos = t_end
        if start < pos:
            continue
        end: int | None = None
        kind = ""
        groups = match.groupdict()
        if groups.get("fence") is not None:
            end, kind = _fence_end(text, match), "code"
        elif groups.get("head") is not None:
            if len(groups["indent"].expandtabs(4)) <= 3:
                run = _HEADING_RUN.match(text, start)
                end = run.end() if run is not None else _line_end(text, match.end())
                kind = "heading"
        else:
            value_end, cost = _json_end(text, match.start("json"))
            if value_end is None:
                json_budget -= cost
            else:
                end = _line_end(text, value_end)
                if text[value_end:end].strip():
                    json_budget -= end - start
                    end = None  # something follows the value on its line: prose, not a JSON block
                else:
                    kind = "json"
            if json_budget <= 0:
                # JSON detection is spent: scan on for the other kinds only.
                json = False
                resume = max(pos, match.end())
                matches = (
                    _candidate_pattern(code, False, headings).finditer(text, resume)
                    if (code or headings)
                    else iter(())
                )
        if end is not None:
            spans.append((start, end, kind))
            pos = end
            if end - start > 4096 and (code or json or headings):
                # Restart the scan past a long block rather than step over every line inside it.
                matches = _candidate_pattern(code, json, headings).finditer(text, end)
    for t_start, t_end in table_spans[t_index:]:
        if t_start >= pos:
            spans.append((t_start, t_end, "table"))
            pos = t_end
    return spans


def split_protected(
    text: str, code: bool = True, json: bool = True, headings: bool = True, tables: bool = False
) -> list[Segment]:
    """Cut ``text`` into prose and protected segments.

    Parameters
    ----------
    text : str
        The prompt.
    code, json, headings, tables : bool
        Which kinds of block to protect (fenced code, JSON objects/arrays, ATX headings,
        markdown tables). A kind that is off is prose.

    Returns
    -------
    list of Segment
        In text order; ``"".join(s.text for s in segments) == text`` always holds. No segment
        is empty (an empty text gives ``[]``); adjacent blocks of one kind form one segment;
        two protected segments of different kinds may be adjacent, two prose segments never are.
    """
    if not isinstance(text, str):
        raise StructureTypeError(f"text must be a str, got {type(text).__name__}")
    merged: list[list[Any]] = []
    for start, end, kind in _protected_spans(text, code, json, headings, tables):
        if merged and merged[-1][1] == start and merged[-1][2] == kind:
            merged[-1][1] = end  # adjacent blocks of one kind are one segment
        else:
            merged.append([start, end, kind])
    segments: list[Segment] = []
    pos = 0
    for start, end, kind in merged:
        if start > pos:
            segments.append(Segment(text[pos:start], False, "prose"))
        segments.append(Segment(text[start:end], True, kind))
        pos = end
    if pos < len(text):
        segments.append(Segment(text[pos:], False, "prose"))
    return segments


def _split_blanks(text: str) -> tuple[str, str, str]:
    """``(leading whitespace, core, trailing whitespace)`` of ``text``."""
    core = text.strip()
    if not core:
        return text, "", ""
    lead = len(text) - len(text.lstrip())
    trail = len(text.rstrip())
    return text[:lead], text[lead:trail], text[trail:]


def compress_structured_batch(
    texts: Sequence[str],
    compress_fn: Callable[[list[str]], Sequence[str]],
    code: bool = True,
    json: bool = True,
    headings: bool = True,
    tables: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """Compress the prose of several texts in one ``compress_fn`` call, keeping structure verbatim.

    Every text is cut with :func:`split_protected`. The prose segments of all texts (their
    leading and trailing whitespace set aside; blank ones skipped) go to ``compress_fn`` in one
    list, in order; each compressed piece is put back between its original whitespace, so the
    newlines around code fences, headings and JSON stay as they were. A prose piece compressed
    to nothing leaves only its trailing whitespace.

    Parameters
    ----------
    texts : sequence of str
        The texts.
    compress_fn : callable
        ``compress_fn(list_of_prose) -> list_of_compressed`` (same length, strings). It is not
        called when no text has prose.
    code, json, headings, tables : bool
        Which kinds of block to keep verbatim (see :func:`split_protected`).

    Returns
    -------
    (list of str, dict)
        The compressed texts, and figures: ``segments``, ``prose_segments`` (pieces sent to
        ``compress_fn``), ``protected`` (count per kind), ``protected_chars``, ``prose_chars``.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise StructureTypeError(f"texts must be a list of str, got {type(texts).__name__}")
    if not callable(compress_fn):
        raise StructureTypeError(f"compress_fn must be callable, got {type(compress_fn).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise StructureTypeError(f"texts[{i}] must be a str, got {type(text).__name__}")

    split = [split_protected(t, code=code, json=json, headings=headings, tables=tables) for t in texts]
    prose: list[str] = []
    n_segments = 0
    protected_counts: dict[str, int] = {}
    protected_chars = prose_chars = 0
    for segments in split:
        n_segments += len(segments)
        for seg in segments:
            if seg.protected:
                protected_counts[seg.kind] = protected_counts.get(seg.kind, 0) + 1
                protected_chars += len(seg.text)
            else:
                core = _split_blanks(seg.text)[1]
                if core:
                    prose.append(core)
                    prose_chars += len(core)

    compressed: list[str] = []
    if prose:
        out = compress_fn(list(prose))
        if isinstance(out, str) or not isinstance(out, Sequence):
            raise StructureError(f"compress_fn must return a list of str, got {type(out).__name__}")
        compressed = list(out)
        if len(compressed) != len(prose):
            raise StructureError(
                f"compress_fn returned {len(compressed)} texts for {len(prose)} prose pieces"
            )
        for i, piece in enumerate(compressed):
            if not isinstance(piece, str):
                raise StructureError(
                    f"compress_fn returned a {type(piece).__name__} at position {i}, not a str"
                )

    results: list[str] = []
    k = 0
    for segments in split:
        parts: list[str] = []
        for seg in segments:
            if seg.protected:
                parts.append(seg.text)
                continue
            lead, core, trail = _split_blanks(seg.text)
            if not core:
                parts.append(seg.text)
                continue
            piece = compressed[k].strip()
            k += 1
            parts.append(lead + piece + trail if piece else trail)
        results.append("".join(parts))
    info = {
        "segments": n_segments,
        "prose_segments": len(prose),
        "protected": protected_counts,
        "protected_chars": protected_chars,
        "prose_chars": prose_chars,
    }
    return results, info


def compress_structured(
    text: str,
    compress_fn: Callable[[list[str]], Sequence[str]],
    code: bool = True,
    json: bool = True,
    headings: bool = True,
    tables: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Compress the prose of ``text`` with ``compress_fn``, keeping code, JSON and headings verbatim.

    Parameters
    ----------
    text : str
        The prompt.
    compress_fn : callable
        ``compress_fn(list_of_prose) -> list_of_compressed``, called once with every prose
        piece of the text (not called when there is none), e.g. a closure over
        ``PromptCompressor.compress(pieces, rate=...).texts``.
    code, json, headings, tables : bool
        Which kinds of block to keep verbatim (see :func:`split_protected`).

    Returns
    -------
    (str, dict)
        The compressed text and the figures of :func:`compress_structured_batch`.

    Examples
    --------
    >>> drop_odd = lambda xs: [" ".join(x.split()[::2]) for x in xs]
    >>> compress_structured("one two three\\n```\\na b c\\n```\\n", drop_odd)[0]
    'one three\\n```\\na b c\\n```\\n'
    """
    if not isinstance(text, str):
        raise StructureTypeError(f"text must be a str, got {type(text).__name__}")
    texts, info = compress_structured_batch(
        [text], compress_fn, code=code, json=json, headings=headings, tables=tables
    )
    return texts[0], info
