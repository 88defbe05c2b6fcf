"""Atomic units: spans of text a compressor keeps whole or drops whole, never cuts.

A classifier decides word by word, and a tokenizer's words split ``$4,512,300`` at every comma,
a date at every slash and an e-mail address at every dot. Keeping some of those words and not
others writes a *different* fact into the prompt (``$4 512``, ``12/``, ``( @``), which is worse
than dropping it. :func:`find_units` finds the spans that must move as one piece; the
compressor merges the words inside each span into one unit, scores it, counts it at its real
token cost and keeps or drops it as a whole.

Kinds (:data:`UNIT_KINDS`), found in one left-to-right pass (earlier kinds win where two start
at the same place):

``code``       inline code spans: ```user_accounts```, ````a `b` c````
``url``        ``https://…``, ``ftp://…``, ``www.…`` (trailing sentence punctuation excluded;
               a closing bracket only when the URL opened one)
``email``      ``alice.smith@example.com``
``path``       ``/var/log/app.log``, ``~/x``, ``./run.sh``, ``C:\\Users\\me``, ``src/app/main.py``
``datetime``   ``12/14/2024``, ``2024-03-05``, ``2024-03-05T14:30:00Z``, ``05.03.2024``,
               ``March 5, 2024``, ``5 March 2024``, ``Mar 5``, ``14:30``, ``2:30 pm``, ``14:30 UTC``
``phone``      ``+1 (415) 555-0199``, ``(415) 555-0199``, ``415-555-0199``, ``+44 20 7946 0958``
``version``    ``v2.3.1``, ``1.4.0-rc.1`` (three or more parts; ``3.5`` is a number)
``number``     with sign, currency, separators and a unit: ``$4,512,300``, ``-12.5%``,
               ``3.5 GB``, ``€1.250,00``, ``1,200 USD``, ``10 ms``, ``2x``, ``#42``
``identifier`` ``snake_case``, ``camelCase``/``PascalCase`` with an inner capital,
               ``INC-48213``, ``SHA-256``, dotted names ``os.path.join``, ``config.yaml``
``tag``        hashtags and mentions: ``#release``, ``@alice``
``name``       two to four capitalised words in a row: ``Priya Raman``, ``Jean-Luc O'Neil``,
               ``Mary J. Blige``, ``New York`` (Latin scripts; a capitalised sentence opener
               joins the name after it, which costs granularity, never a fact)

Quoted strings are *not* units (quotes are kept balanced by the compressor's output rules
instead): they can be long, and dropping words inside a quotation does not make any word in
it false. Named entities are units only in the ``name`` form above (multi-word capitalised
names): keeping "Priya" of "Priya Raman" names someone else.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["UNIT_KINDS", "find_units", "unit_pattern"]

UNIT_KINDS = (
    "code", "url", "email", "path", "datetime", "phone", "version", "number", "identifier", "tag", "name",
)  # fmt: skip

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_TIME = r"(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?(?:\s?(?:[AaPp]\.?[Mm]\.?)(?![A-Za-z]))?"
_ZONE = r"(?:\s?(?:UTC|GMT|Z|[ECMP][SD]T|CET|CEST|BST|IST|JST)(?:[+-]\d{1,2}(?::?\d{2})?)?\b)?"
_CURRENCY = r"[$€£¥₹₩₽]"
_CURRENCY_CODE = r"(?:USD|EUR|GBP|JPY|CHF|CAD|AUD|CNY|INR)"
_MEASURE = (
    r"%|‰|percent\b|pp\b|bps\b|"
    r"(?:[KMGTP]i?B|[kKMGT]b(?:ps)?|[KMGT]Hz|Hz|kB|bytes?)\b|"
    r"(?:ns|µs|us|ms|sec|secs|seconds?|s|min|mins|minutes?|h|hrs?|hours?|days?|weeks?|months?|years?)\b|"
    r"(?:mm|cm|km|m|mi|ft|kg|mg|g|lbs?|oz|ml|l|L|°[CF]|kWh|kW|W|V|mAh)\b|"
    r"(?:k|K|M|B|bn|mn|million|billion|trillion|thousand)\b|" + _CURRENCY_CODE + r"\b|x\b|×"
)
_NUMBER_CORE = r"\d+(?:[,.'’]\d+)*"
# A capitalised word (Latin scripts): "Priya", "O'Neil", "Jean-Luc", "Zoë".
_UPPER = "A-ZÀ-ÖØ-Þ"
_LOWER = "a-zß-öø-ÿ"
_CAPITALISED = f"[{_UPPER}](?:[{_LOWER}]+(?:[-'’][{_UPPER}]?[{_LOWER}]+)?|['’][{_UPPER}][{_LOWER}]+)"

_PATTERNS: tuple[tuple[str, str], ...] = (
    ("code", r"(?P<ticks>`+)[^`\n](?:.*?[^`\n])??(?P=ticks)(?!`)"),
    ("url", r"(?:(?:https?|ftp|file)://|www\.)[^\s<>\"'`]+"),
    ("email", r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}"),
    (
        "path",
        r"(?:[A-Za-z]:\\(?:[^\\\s<>:\"|?*]+\\)*[^\\\s<>:\"|?*,;]*"
        r"|(?:~|\.\.?)?/(?:[\w.@+-]+/)*[\w.@+-]*[\w]"
        r"|[\w.-]+/(?:[\w.-]+/)*[\w-]+\.[A-Za-z][\w]{0,7})",
    ),
    (
        "datetime",
        r"\d{4}-\d{2}-\d{2}(?:[T ]" + _TIME + r"(?:Z|[+-]\d{2}:?\d{2})?)?"
        r"|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}(?:,?\s" + _TIME + _ZONE + r")?"
        r"|" + _MONTH + r"\.?\s\d{1,2}(?:st|nd|rd|th)?(?:,?\s\d{4})?(?:,?\s(?:at\s)?" + _TIME + r")?"
        r"|\d{1,2}(?:st|nd|rd|th)?\s" + _MONTH + r"\.?(?:,?\s\d{4})?"
        r"|" + _MONTH + r"\.?\s\d{4}"
        r"|" + _TIME + _ZONE,
    ),
    (
        "phone",
        r"(?:\+\d{1,3}[\s.-]?)?\(\d{1,4}\)[\s.-]?\d{2,4}[\s.-]\d{2,4}(?:[\s.-]\d{2,4})?"
        r"|\+\d{1,3}[\s.-]\d{1,4}(?:[\s.-]\d{2,4}){1,3}"
        r"|\d{3}[.-]\d{3}[.-]\d{4}",
    ),
    ("version", r"[vV]\d+(?:\.\d+)*(?:[-+][0-9A-Za-z.]+)?|\d+\.\d+\.\d+(?:\.\d+)?(?:-[0-9A-Za-z.]+)?"),
    (
        "number",
        r"[-+−±~≈]?(?:"
        + _CURRENCY
        + r"\s?|"
        + _CURRENCY_CODE
        + r"\s?)?(?:[-+−])?"
        + _NUMBER_CORE
        + r"(?:[-–]"
        + _NUMBER_CORE
        + r")?(?:\s?(?:"
        + _MEASURE
        + r"))?"
        r"|#\d+",
    ),
    (
        "identifier",
        r"[^\W\d]\w*?_\w+"
        r"|[a-z]+[A-Z][A-Za-z0-9]*"
        r"|[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*"
        r"|[A-Z][A-Z0-9]+-\d+[A-Za-z0-9]*"
        r"|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?",
    ),
    ("tag", r"[#@][A-Za-z_][\w-]*"),
    (
        "name",
        _CAPITALISED + r"(?:\s(?:[A-Z]\.\s)?" + _CAPITALISED + r"){1,3}",
    ),
)

# A unit starts at a boundary (not inside a word) and ends at one; the number pattern must not
# end inside a word either ("3rd", "2x4"). Lookarounds keep the pass to one regex.
_START = r"(?<![\w@./\\-])"
_END = r"(?![\w@]|[/:.,]\d)"


def unit_pattern(kinds: tuple[str, ...] = UNIT_KINDS) -> re.Pattern[str]:
    """The compiled one-pass pattern for ``kinds`` (named groups = kinds)."""
    unknown = set(kinds) - set(UNIT_KINDS)
    if unknown:
        raise ValueError(f"unknown unit kinds {sorted(unknown)}; choose from {UNIT_KINDS}")
    parts = [f"(?P<{name}>{body})" for name, body in _PATTERNS if name in kinds]
    return re.compile(_START + "(?:" + "|".join(parts) + ")" + _END)


_DEFAULT = unit_pattern()
_TRAILING = ".,;:!?'\"’”"
_CLOSERS = {")": "(", "]": "[", "}": "{"}
# Cheap pre-filter: text without any of these characters has no unit.
_TRIGGER = re.compile(
    r"[\d`@/\\_#:]|[a-z][A-Z]|www\.|[A-Za-z]\.[A-Za-z]|[" + _UPPER + "][" + _LOWER + r"]+\s[" + _UPPER + "]"
)


def _trim(text: str, start: int, end: int, kind: str) -> int:
    """Shorten a URL/path/identifier match so it excludes trailing sentence punctuation."""
    if kind not in ("url", "path", "email", "identifier", "version"):
        return end
    while end > start + 1:
        ch = text[end - 1]
        if (
            ch in _TRAILING
            or ch in _CLOSERS
            and text.count(_CLOSERS[ch], start, end) < text.count(ch, start, end)
        ):
            end -= 1
        else:
            break
    return end


def find_units(text: str, pattern: re.Pattern[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Atomic spans of ``text``.

    Parameters
    ----------
    text
        Any string.
    pattern
        From :func:`unit_pattern` to restrict the kinds (default: all kinds).

    Returns
    -------
    spans : int64 array ``(m, 2)``
        ``[start, end)`` character offsets, sorted and disjoint.
    kinds : list of str
        The kind of each span.
    """
    pattern = _DEFAULT if pattern is None else pattern
    spans: list[tuple[int, int]] = []
    kinds: list[str] = []
    for match in _matches(text, pattern):
        kind = (
            next(k for k in UNIT_KINDS if match.group(k) is not None)
            if match.lastgroup == "ticks" or (match.lastgroup not in UNIT_KINDS)
            else match.lastgroup
        )
        start, end = match.span()
        end = _trim(text, start, end, kind)
        if kind == "number" and not _is_multi_piece(text, start, end):
            continue
        if kind == "path" and "/" not in text[start:end] and "\\" not in text[start:end]:
            continue
        spans.append((start, end))
        kinds.append(kind)
    return np.array(spans, dtype=np.int64).reshape(-1, 2), kinds


def _matches(text: str, pattern: re.Pattern[str]):
    """``pattern.finditer(text)``, run only on windows around trigger characters.

    Prose is mostly plain words, which no unit consists of alone; scanning only the stretch
    from the whitespace-delimited run before a trigger to the one after it finds the same
    matches (a unit never spans more than :data:`_REACH` characters on either side of its
    trigger) several times faster.
    """
    triggers = [m.start() for m in _TRIGGER.finditer(text)]
    if not triggers:
        return
    n = len(text)
    windows: list[list[int]] = []
    for t in triggers:
        lo, hi = max(0, t - _REACH), min(n, t + _REACH)
        if windows and lo <= windows[-1][1]:
            windows[-1][1] = hi
        else:
            windows.append([lo, hi])
    last_end = 0
    for lo, hi in windows:
        # start at a whitespace boundary so a unit is never entered in its middle
        start = max(last_end, _back_to_space(text, lo))
        end = _forward_to_space(text, hi)
        for match in pattern.finditer(text, start, end):
            if match.start() < last_end:
                continue
            yield match
            last_end = match.end()
        last_end = max(last_end, end)


_REACH = 16


def _back_to_space(text: str, pos: int) -> int:
    while pos > 0 and not text[pos - 1].isspace():
        pos -= 1
    return pos


def _forward_to_space(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and not text[pos].isspace():
        pos += 1
    return pos


def _is_multi_piece(text: str, start: int, end: int) -> bool:
    """A plain integer ("42") is one word anyway; only numbers with more than digits are units."""
    return not text[start:end].isdigit()
