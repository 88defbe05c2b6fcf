"""Fact retention of prompt compressors: are typed facts kept intact, dropped, or corrupted?

The ``facts`` task measures the baseline (the text as given) and every compressor variant
(``--compressor`` at every ``--rate``) on generated documents, and renders the report section
``facts`` and the plot ``facts_vs_rate.png``.

Documents
---------
Each document is a run of consecutive paragraphs of the held-out Paul Graham essays (the ones
the default compressor never saw in training; hard line wraps undone, glued paragraphs split),
about ``words`` words, into which ``facts`` generated facts are woven as sentences at
sentence starts spread over the text (meeting-notes / status-report sentences such as "The
budget approved for the billing service is $4,512,300."). Every fact has a kind, the exact
string that appears in the document, the answer a reader must give and a question about it:

=========  =============================================================================
kind       examples
=========  =============================================================================
amount     ``$4,512,300``, ``€1,250.00``, ``-12.5%``, ``37.5 GB``
date       ``12/14/2024``, ``2024-03-05``, ``March 5, 2024``
time       ``14:30``
name       ``Priya Raman``
email      ``tomasz.kowalczyk@northwind.io``
url        ``https://docs.globex.net/pages/falcon-4471``
path       ``/var/log/kestrel/error-2291.log``, ``C:\\Users\\hnovak\\Documents\\estimates_2291.xlsx``
phone      ``+1 (415) 555-0199``, ``+44 20 7946 0958``
version    ``v3.17.4``
code       inline code ```invoice_ledger``` (answer: ``invoice_ledger``), ticket ``INC-48213``
tag        hashtag ``#cobalt-freeze``, mention ``@dana_k``
=========  =============================================================================

Kinds are dealt round-robin from shuffled decks, so every document mixes them. Everything is
drawn from ``numpy.random.default_rng(seed)``: the same options give the same documents.
Within a document the fact strings are unique (each occurs exactly once), each fact's topic
(the subject of its question) is unique, and every fact has at least one *distinctive
fragment* (below), so that a corruption of it can be seen.

Scoring (per fact, per compressed text)
---------------------------------------
Whitespace runs are collapsed to one space in the fact and the compressed text first
(re-flowing whitespace changes no fact); an *alphanumeric run* is a maximal run of letters and
digits (``[^\\W_]+``), compared case-insensitively.

* **intact**: the exact fact string is present, not glued to more of a value on either side
  (no letter or digit just before it; after it, no letter or digit, nor a punctuation mark
  followed by one: ``$4,512`` is not intact inside ``$4,512,300``).
* **corrupted**: not intact, but a *distinctive fragment* of the fact is present. A fragment
  is an alphanumeric run of the fact, at least 2 characters long, that is an alphanumeric run
  nowhere else in the original document (so in a deleting compressor's output it can only
  come from this fact). It is present when it is an alphanumeric run of the compressed text,
  or lies inside a run of the compressed text that the original document does not have (a
  run the compressor created by altering text, e.g. ``4512300``). So: the fact is there only
  in part, or altered (``$4 512``, ``12/`` of ``12/14/2024``, ``alice.smith@`` of an e-mail,
  the words of a URL).
* **dropped**: neither (no trace of the fact is left; e.g. only punctuation such as ``( @``).

Shares of intact, corrupted and dropped facts are pooled over the documents per variant, with
95 % Wilson intervals, and split by kind.

Reader
------
When the bench has a language model, it reads each (compressed) document and answers every
fact's question (the tokenizer's chat template when it has one, else ``Document/Question/
Answer`` text; greedy decoding of at most ``max_new_tokens`` new tokens, stopped at the
end-of-sequence token). The document's KV cache (the longest token prefix the prompts share)
is computed once; all its questions are then decoded together as one batch on copies of it
(each question padded on its left, masked, with its own positions), so a decoding step reads
the weights once for all of them (``batched=0``: one question after another on the cache,
cropped back after each answer; the same answers, about twice as slow on a CPU).
An answer is **correct** when, with whitespace runs collapsed to one space in both, it
contains the fact's answer string (case and punctuation as in the document; inline code is
answered without its backticks). The uncompressed baseline is the reference row; each
compressor's paired change against it is a bootstrap over facts. With ``--model none`` the
task reports string matching only.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenlean.errors import EvalError

from .haystack import heldout_essays, sentence_starts
from .prompt_tasks import _positive_int
from .report import Pre, Table, Text, new_figure, png_bytes, register_plot, register_section
from .stats import paired_bootstrap_diff, wilson_interval
from .tasks import Example, Task, register_task

__all__ = [
    "FACT_KINDS",
    "STATUSES",
    "Fact",
    "FactDocument",
    "FactReader",
    "FactTask",
    "answer_correct",
    "corruption_snippet",
    "fact_statuses",
    "fragments_of",
    "make_documents",
    "plot_facts_vs_rate",
]

#: Fact kinds, in report order.
FACT_KINDS = ("amount", "date", "time", "name", "email", "url", "path", "phone", "version", "code", "tag")
#: Per-fact outcomes, in report order; rows store them as their first letters.
STATUSES = ("intact", "corrupted", "dropped")
SECTION = "facts"
PLOT_NAME = "facts_vs_rate.png"
#: How many corruption examples a variant's rows carry into the report (per document).
_EXAMPLES_PER_DOC = 4
_DASH = "—"

_RUN_RE = re.compile(r"[^\W_]+")
_WS_RE = re.compile(r"\s+")


def _norm(text: str) -> str:
    """Whitespace runs collapsed to one space."""
    return _WS_RE.sub(" ", text)


def _runs(text: str) -> list[str]:
    """The lower-cased alphanumeric runs of ``text``."""
    return [m.group().lower() for m in _RUN_RE.finditer(text)]


def _intact_pattern(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<![^\W_])" + re.escape(_norm(text).strip()) + r"(?![^\W_]|[^\w\s][^\W_])")


# --------------------------------------------------------------------------------------------
# facts and documents
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One fact of a document.

    Attributes
    ----------
    kind : str
        One of :data:`FACT_KINDS`.
    text : str
        The exact string in the document (what must stay intact).
    answer : str
        What a correct answer contains (``text``, or inline code without its backticks).
    question : str
        The question whose answer is the fact.
    sentence : str
        The sentence that carries the fact in the document.
    fragments : tuple of str
        The fact's distinctive fragments (lower-cased alphanumeric runs, >= 2 characters,
        found nowhere else in the document).
    """

    kind: str
    text: str
    answer: str
    question: str
    sentence: str
    fragments: tuple[str, ...] = ()


@dataclass(frozen=True)
class FactDocument:
    """A generated document: its ``text``, its ``facts`` (in document order) and its ``source`` essays."""

    id: str
    text: str
    facts: tuple[Fact, ...]
    source: str


_FIRST = ("Priya", "Tomasz", "Ingrid", "Kwame", "Yuki", "Mateo", "Anouk", "Rafael", "Leilani", "Dmitri",
          "Sunita", "Oluwaseun", "Henrik", "Mei", "Bastien", "Zainab", "Callum", "Fiorella", "Jun", "Eskil",
          "Amara", "Teodor", "Noor", "Lucian", "Saoirse", "Idris", "Marisol", "Kenji", "Ottilie", "Ravi",
          "Svetlana", "Emeka", "Linnea", "Tariq", "Giulia", "Hamish", "Ayasha", "Joaquin", "Freya", "Nikhil",
          "Dana", "Orla", "Bartek", "Soraya", "Ewan", "Farida", "Lorenzo", "Hana")  # fmt: skip
_LAST = ("Raman", "Kowalczyk", "Haugen", "Mensah", "Tanaka", "Alvarez", "Okafor", "Lindqvist", "Castellanos",
         "Nakamura", "Petrov", "Abernathy", "Oyelaran", "Brennan", "Takeda", "Moreau", "Haddad", "Fitzgerald",
         "Quispe", "Varga", "Sorensen", "Achebe", "Ferreira", "Kaminski", "Delacroix", "Iyer", "Wojcik",
         "Mbeki", "Halvorsen", "Esposito", "Yilmaz", "Chaudhry", "Rasmussen", "Ibarra", "Novak", "Szabo",
         "Gallagher", "Adeyemi", "Lindgren", "Oduya", "Marchetti", "Kovacs")  # fmt: skip
_DOMAINS = ("northwind.io", "acme-corp.com", "globex.net", "initech.org", "umbrella-labs.co", "contoso.com",
            "vandelay.biz", "hooli.dev", "stark-ind.com", "wayne-ent.net")  # fmt: skip
_HOSTS = ("kb", "docs", "git", "dash", "intranet", "files")
_URL_DIRS = ("runbooks", "pages", "projects", "reports", "dashboards", "specs", "d", "space")
_SLUGS = ("falcon", "juniper", "cobalt", "saffron", "tundra", "quartz", "marlin", "orchid", "basalt", "nimbus",
          "zephyr", "lantern", "mosaic", "kestrel", "sierra", "topaz", "willow", "ember", "glacier", "heron",
          "pylon", "cinder", "aurora", "bramble", "canyon", "delta", "fjord", "garnet", "hollow", "indigo")  # fmt: skip
_UNIX_ROOTS = ("var/log", "srv/store", "opt", "etc", "home/deploy", "mnt/backups")
_UNIX_FILES = (("error", "log"), ("access", "log"), ("config", "yaml"), ("extract", "csv"), ("snapshot", "tar.gz"),
               ("settings", "json"), ("events", "jsonl"), ("dump", "sql"))  # fmt: skip
_WIN_DIRS = ("Documents", "Desktop", "Downloads", "Projects")
_WIN_FILES = (("estimates", "xlsx"), ("roadmap", "docx"), ("agenda", "docx"), ("forecast", "xlsx"),
              ("contract", "pdf"), ("slides", "pptx"))  # fmt: skip
_TABLE_A = ("invoice", "ledger", "session", "payment", "shipment", "tenant", "quota", "refund", "payout",
            "coupon", "carrier", "parcel", "voucher", "rebate")  # fmt: skip
_TABLE_B = ("accounts", "events", "items", "history", "snapshots", "archive", "lines", "records", "metrics",
            "batches", "mapping", "ledger")  # fmt: skip
_TICKETS = ("INC", "OPS", "SEC", "CHG", "BUG", "REQ")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_TITLES = ("Weekly operations review: notes", "Quarterly planning notes", "Project status report",
           "Notes from the steering meeting", "Monthly engineering update", "Team sync: minutes")  # fmt: skip

#: The subjects of the facts' questions; one per fact within a document.
TOPICS = (
    "the billing service", "the data warehouse migration", "the mobile app", "the onboarding flow",
    "the search index", "the payroll system", "the vendor audit", "the customer portal",
    "the analytics pipeline", "the support queue", "the Berlin office move", "the security review",
    "the pricing experiment", "the newsletter campaign", "the inventory sync", "the recommendation engine",
    "the backup cluster", "the API gateway", "the partner program", "the hiring plan", "the loyalty program",
    "the fraud model", "the checkout page", "the design system", "the status page", "the internal wiki",
    "the reporting dashboard", "the translation project", "the load balancer", "the identity service",
    "the warehouse robots", "the summer release", "the compliance training", "the cost review",
    "the chat widget", "the mailing list", "the test fleet", "the print catalogue", "the field survey",
    "the grant application",
)  # fmt: skip


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


#: Sentence and question templates: ``{topic}`` (``{Topic}`` at a sentence start) and ``{v}``.
TEMPLATES: dict[str, tuple[str, str]] = {
    "budget": ("The budget approved for {topic} is {v}.", "What budget was approved for {topic}?"),
    "spend": ("Spending on {topic} reached {v} last quarter.", "How much was spent on {topic} last quarter?"),
    "change": (
        "Usage of {topic} changed by {v} compared with the previous month.",
        "By how much did usage of {topic} change compared with the previous month?",
    ),
    "size": ("The nightly export of {topic} is {v} in size.", "How large is the nightly export of {topic}?"),
    "review": ("The review of {topic} is scheduled for {v}.", "When is the review of {topic} scheduled?"),
    "due": ("Work on {topic} is due to finish on {v}.", "On what date is work on {topic} due to finish?"),
    "call": (
        "The weekly call about {topic} starts at {v}.",
        "At what time does the weekly call about {topic} start?",
    ),
    "owner": ("Going forward, {v} is responsible for {topic}.", "Who is responsible for {topic}?"),
    "signoff": ("The decision on {topic} was signed off by {v}.", "Who signed off the decision on {topic}?"),
    "email": (
        "Questions about {topic} should be sent to {v}.",
        "To which e-mail address should questions about {topic} be sent?",
    ),
    "url": ("The plan for {topic} is documented at {v}.", "At which URL is the plan for {topic} documented?"),
    "log": ("Logs for {topic} are written to {v}.", "To which file path are the logs for {topic} written?"),
    "sheet": (
        "The working file for {topic} is saved as {v}.",
        "Under which path is the working file for {topic} saved?",
    ),
    "phone": ("The on-call number for {topic} is {v}.", "What is the on-call phone number for {topic}?"),
    "version": ("{Topic} was upgraded to {v} this week.", "To which version was {topic} upgraded this week?"),
    "table": ("{Topic} reads its data from the {v} table.", "From which table does {topic} read its data?"),
    "ticket": (
        "The outage in {topic} is tracked as {v}.",
        "Under which ticket is the outage in {topic} tracked?",
    ),
    "hashtag": (
        "Updates on {topic} are posted under {v}.",
        "Under which hashtag are updates on {topic} posted?",
    ),
    "mention": (
        "Review requests for {topic} go to {v} on the team chat.",
        "To which chat handle do review requests for {topic} go?",
    ),
}


def _value(kind: str, rng: np.random.Generator, names: list[tuple[str, str]]) -> tuple[str, str, str]:
    """``(text, answer, template)`` of one new fact of ``kind`` (a key of :data:`TEMPLATES`).

    ``names`` is the document's deck of unused (first, last) names; person-derived values
    (names, e-mails, handles, Windows users) pop its last entry (the caller puts it back, at
    the front, when it rejects the fact), so no two facts share a name.
    """
    r = rng.random()
    if kind == "amount":
        if r < 0.45:
            if rng.random() < 0.6:
                v = f"${int(rng.integers(1_000, 99_999_999)):,}"
            else:
                v = f"€{int(rng.integers(100, 999_999)):,}.{int(rng.integers(0, 100)):02d}"
            return v, v, _pick(rng, ("budget", "spend"))
        if r < 0.75:
            v = f"{_pick(rng, '-+')}{rng.integers(1, 100)}.{rng.integers(0, 10)}%".lstrip("+")
            return v, v, "change"
        v = f"{rng.integers(1, 1000)}.{rng.integers(0, 10)} {_pick(rng, ('MB', 'GB', 'TB'))}"
        return v, v, "size"
    if kind == "date":
        year, month, day = int(rng.integers(2019, 2028)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        if r < 1 / 3:
            v = f"{month:02d}/{day:02d}/{year}"
        elif r < 2 / 3:
            v = f"{year}-{month:02d}-{day:02d}"
        else:
            v = f"{_MONTHS[month - 1]} {day}, {year}"
        return v, v, _pick(rng, ("review", "due"))
    if kind == "time":
        v = f"{rng.integers(7, 20):02d}:{5 * rng.integers(0, 12):02d}"
        return v, v, "call"
    if kind == "name":
        first, last = names.pop()
        v = f"{first} {last}"
        return v, v, "owner" if r < 0.5 else "signoff"
    if kind == "email":
        first, last = names.pop()
        local = f"{first}.{last}" if r < 0.6 else f"{first[0]}{last}"
        v = f"{local.lower()}@{_pick(rng, _DOMAINS)}"
        return v, v, "email"
    if kind == "url":
        path = f"{_pick(rng, _URL_DIRS)}/{_pick(rng, _SLUGS)}-{rng.integers(100, 10000)}"
        v = f"https://{_pick(rng, _HOSTS)}.{_pick(rng, _DOMAINS)}/{path}"
        return v, v, "url"
    if kind == "path":
        if r < 0.6:
            stem, ext = _pick(rng, _UNIX_FILES)
            v = f"/{_pick(rng, _UNIX_ROOTS)}/{_pick(rng, _SLUGS)}/{stem}-{rng.integers(100, 10000)}.{ext}"
            return v, v, "log"
        first, last = names.pop()
        stem, ext = _pick(rng, _WIN_FILES)
        user = f"{first[0]}{last}".lower()
        v = f"C:\\Users\\{user}\\{_pick(rng, _WIN_DIRS)}\\{stem}_{rng.integers(100, 10000)}.{ext}"
        return v, v, "sheet"
    if kind == "phone":
        if r < 0.6:
            v = f"+1 ({rng.integers(201, 990)}) 555-{rng.integers(0, 10000):04d}"
        else:
            v = f"+44 20 7946 {rng.integers(0, 10000):04d}"
        return v, v, "phone"
    if kind == "version":
        v = f"v{rng.integers(1, 10)}.{rng.integers(10, 40)}.{rng.integers(0, 20)}"
        return v, v, "version"
    if kind == "code":
        if r < 0.5:
            name = f"{_pick(rng, _TABLE_A)}_{_pick(rng, _TABLE_B)}"
            return f"`{name}`", name, "table"
        v = f"{_pick(rng, _TICKETS)}-{rng.integers(10000, 100000)}"
        return v, v, "ticket"
    if kind == "tag":
        if r < 0.5:
            word = _pick(rng, ("freeze", "launch", "sync", "retro", "rollout"))
            v = f"#{_pick(rng, _SLUGS)}-{word}{rng.integers(1, 100)}"
            return v, v, "hashtag"
        first, last = names.pop()
        v = f"@{first.lower()}_{last[0].lower()}{rng.integers(1, 100)}"
        return v, v, "mention"
    raise EvalError(f"unknown fact kind {kind!r}; kinds: {', '.join(FACT_KINDS)}")


_GLUED_RE = re.compile(r"(?<=[a-z0-9][.?!])(?=[A-Z])|(?<=[a-z][.?!][\"'])(?=[A-Z])")
_HEADER_RE = re.compile(r"^\s*(?:Want to start a startup\?\s*Get funded by\s*Y Combinator\.\s*)?"
                        r"(?:(?:January|February|March|April|May|June|July|August|September|October|"
                        r"November|December)\s+\d{4})?")  # fmt: skip


def essay_paragraphs(count: int = 10) -> list[tuple[str, str]]:
    """The held-out essays as clean paragraphs: ``[(essay name, paragraph), ...]`` in order.

    The essays' hard line wraps are undone, the date line and the Y Combinator banner removed,
    and paragraphs glued by the source ("useful.To start") split again.
    """
    out = []
    for name, text in heldout_essays(count):
        text = _HEADER_RE.sub("", text, count=1)
        for block in re.split(r"\n\s*\n", text):
            for para in _GLUED_RE.split(_norm(block).strip()):
                para = para.strip()
                if len(para.split()) >= 5:
                    out.append((name, para))
    return out


def _filler(paragraphs: list[tuple[str, str]], start: int, words: int) -> tuple[str, str, int]:
    """About ``words`` words of paragraphs from index ``start`` on (wrapping), cut at a sentence end.

    Returns ``(text, source essays, next start)``.
    """
    chosen: list[str] = []
    sources: list[str] = []
    total, i = 0, start
    while total < words:
        name, para = paragraphs[i % len(paragraphs)]
        i += 1
        n = len(para.split())
        if total + n > words:
            cuts = [s for s in sentence_starts(para) if 0 < s < len(para)]
            fits = [s for s in cuts if total + len(para[:s].split()) <= words]
            if fits or not chosen:  # a first paragraph longer than the budget: its first sentence at least
                chosen.append(para[: fits[-1] if fits else (cuts[0] if cuts else len(para))].strip())
                sources.append(name)
            break
        chosen.append(para)
        sources.append(name)
        total += n
    return "\n\n".join(chosen), "+".join(dict.fromkeys(sources)), i


def _capitalized(template: str, topic: str, value: str) -> str:
    return template.format(topic=topic, Topic=topic[:1].upper() + topic[1:], v=value)


def _fragment_counts(fact_runs: list[str], doc_counts: Counter) -> tuple[str, ...]:
    own = Counter(fact_runs)
    return tuple(r for r in dict.fromkeys(fact_runs) if len(r) >= 2 and doc_counts[r] == own[r])


def fragments_of(fact_text: str, document: str) -> tuple[str, ...]:
    """The distinctive fragments of ``fact_text`` in ``document`` (which contains it once).

    Lower-cased alphanumeric runs of the fact, at least 2 characters, that are not an
    alphanumeric run anywhere else in the document.
    """
    return _fragment_counts(_runs(fact_text), Counter(_runs(document)))


def _insert_sentences(filler: str, sentences: list[str], rng: np.random.Generator) -> str:
    """``sentences`` inserted in order at sentence starts spread evenly over ``filler``."""
    starts = [s for s in sentence_starts(filler) if 0 < s < len(filler)]  # not before the title
    n = len(sentences)
    slots: dict[int, list[str]] = {}
    for j, sentence in enumerate(sentences):
        lo = j * len(starts) // n
        hi = max(lo + 1, (j + 1) * len(starts) // n)
        at = starts[int(rng.integers(lo, hi))] if starts else 0
        slots.setdefault(at, []).append(sentence)
    out, prev = [], 0
    for at in sorted(slots):
        out.append(filler[prev:at])
        glue = " ".join(slots[at])
        before = "".join(out)
        lead = "" if not before or before[-1].isspace() else " "
        tail = "" if at >= len(filler) or filler[at].isspace() else " "
        out.append(lead + glue + tail)
        prev = at
    out.append(filler[prev:])
    return "".join(out).strip()


def _acceptable(text: str, sentence: str, counts: Counter, texts: list[str], earlier: list[str]) -> bool:
    """Whether a candidate fact may join a document.

    ``counts`` are the document's alphanumeric runs with the candidate's sentence added;
    ``texts`` the document so far; ``earlier`` the facts already in it. The fact's string must
    not occur in the document yet (nor an earlier fact's in its sentence), it must have a
    distinctive fragment, and every earlier fact must keep one.
    """
    pattern = _intact_pattern(text)
    if any(pattern.search(_norm(t)) for t in texts):
        return False
    if any(_intact_pattern(e).search(sentence) for e in earlier):
        return False
    return bool(_fragment_counts(_runs(text), counts)) and all(
        _fragment_counts(_runs(e), counts) for e in earlier
    )


def make_documents(docs: int = 10, facts: int = 16, words: int = 500, seed: int = 0) -> list[FactDocument]:
    """``docs`` documents of about ``words`` filler words with ``facts`` facts each (deterministic).

    See the module docstring. Raises :class:`~tokenlean.errors.EvalError` for impossible options
    (more facts than topics, a fact that cannot be made distinctive).
    """
    if facts > len(TOPICS):
        raise EvalError(f"at most {len(TOPICS)} facts per document, got {facts}")
    rng = np.random.default_rng(seed)
    paragraphs = essay_paragraphs()
    deck: list[str] = []
    out, start = [], 0
    for d in range(docs):
        filler, source, start = _filler(paragraphs, start, words)
        title = _pick(rng, _TITLES)
        filler = f"{title}\n\n{filler}"
        topics = [TOPICS[i] for i in rng.permutation(len(TOPICS))[:facts]]
        names = [
            (_FIRST[i], _LAST[j]) for i, j in zip(rng.permutation(len(_FIRST)), rng.permutation(len(_LAST)))
        ]
        counts = Counter(_runs(filler))
        made: list[tuple[str, str, str, str]] = []  # kind, text, answer, question
        sentences: list[str] = []
        spare = [t for t in TOPICS if t not in topics]  # topics no fact of the document has yet
        for topic in topics:
            if not deck:
                deck = [FACT_KINDS[i] for i in rng.permutation(len(FACT_KINDS))]
            kind = deck.pop()
            for attempt in range(200):
                if attempt and attempt % 50 == 0 and spare:  # the topic's words may be the problem
                    topic = spare.pop(int(rng.integers(len(spare))))
                last_name = names[-1] if names else None
                text, answer, template = _value(kind, rng, names)
                s_tpl, q_tpl = TEMPLATES[template]
                sentence = _capitalized(s_tpl, topic, text)
                new = counts + Counter(_runs(sentence))
                if _acceptable(text, sentence, new, [filler, *sentences], [m[1] for m in made]):
                    counts = new
                    made.append((kind, text, answer, _capitalized(q_tpl, topic, text)))
                    sentences.append(sentence)
                    break
                if last_name is not None and (not names or names[-1] != last_name):
                    names.insert(0, last_name)  # the name was used: give it back, behind the others
            else:
                raise EvalError(f"could not make a distinctive {kind} fact for document {d} (seed {seed})")
        order = rng.permutation(len(sentences))
        text = _insert_sentences(filler, [sentences[i] for i in order], rng)
        doc_counts = Counter(_runs(text))
        norm_doc = _norm(text)
        fact_list = []
        for i in order:  # document order
            kind, ftext, answer, question = made[i]
            frags = _fragment_counts(_runs(ftext), doc_counts)
            hits = len(_intact_pattern(ftext).findall(norm_doc))
            if hits != 1 or not frags:  # cannot happen: checked while generating
                raise EvalError(f"fact {ftext!r} of document {d} occurs {hits} times / has no fragment")
            fact_list.append(Fact(kind, ftext, answer, question, sentences[i], frags))
        out.append(FactDocument(f"doc{d:02d}", text, tuple(fact_list), source))
    return out


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def fact_statuses(facts: Sequence[Fact], original: str, compressed: str) -> list[str]:
    """``"intact"``, ``"corrupted"`` or ``"dropped"`` for each fact of ``original`` in ``compressed``.

    See the module docstring for the definitions. ``facts`` carry their distinctive fragments
    (:func:`fragments_of`, computed on ``original``).
    """
    comp = _norm(compressed)
    comp_runs = _runs(comp)
    present = set(comp_runs)
    novel = [r for r in set(comp_runs) - set(_runs(original))]
    out = []
    for fact in facts:
        if _intact_pattern(fact.text).search(comp):
            out.append("intact")
        elif any(f in present or any(f in r for r in novel) for f in fact.fragments):
            out.append("corrupted")
        else:
            out.append("dropped")
    return out


def corruption_snippet(fact: Fact, compressed: str, context: int = 2) -> str:
    """What is left of a corrupted ``fact`` in ``compressed``: its fragments with ``context`` words around.

    Empty when no fragment is found.
    """
    comp = _norm(compressed)
    hits = []
    for m in _RUN_RE.finditer(comp):
        run = m.group().lower()
        if any(run == f or (len(run) > len(f) and f in run) for f in fact.fragments):
            hits.append(m.span())
    if not hits:
        return ""
    first = hits[0][0]
    end = max(e for s, e in hits if s - first <= 60)
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", comp)]
    i = next(k for k, (s, e) in enumerate(words) if e > first)
    j = next((k for k, (s, e) in enumerate(words) if e >= end), len(words) - 1)
    lo, hi = max(0, i - context), min(len(words) - 1, j + context)
    return comp[words[lo][0] : words[hi][1]]


def answer_correct(answer: str, fact: Fact) -> bool:
    """Whether a reader's ``answer`` contains ``fact.answer`` (whitespace runs collapsed in both)."""
    return _norm(fact.answer).strip() in _norm(answer)


# --------------------------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------------------------

READER_INSTRUCTION = (
    "Read the document below, then answer the question with the exact value as it is written in the "
    "document, and nothing else."
)
_SENTINEL = "\ue000"


class FactReader:
    """Answers questions about a document with a causal LM, reusing the document's KV cache.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : its tokenizer (its chat template is used when it has one)
    max_new_tokens : int
        Greedy decoding stops at an end-of-sequence token or after this many tokens.
    batched : bool
        Decode a document's questions together (see :meth:`answer_all`).
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 24, batched: bool = True) -> None:
        from tokenlean.patching import cache_keyword, takes_logits_to_keep

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.batched = bool(batched)
        self._cache_kw = cache_keyword(model.forward)
        self._logits_to_keep = takes_logits_to_keep(model.forward)
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        eos: set[int] = set()
        for source in (getattr(tokenizer, "eos_token_id", None),
                       getattr(getattr(model, "generation_config", None), "eos_token_id", None)):  # fmt: skip
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(x) for x in source)
        for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
            if isinstance(tid, int):
                eos.add(tid)
        self.eos = eos

    def prompt(self, document: str, question: str) -> str:
        """The prompt text for one question (before tokenization)."""
        user = f"{READER_INSTRUCTION}\n\nDocument:\n{document}\n\nQuestion: {question}"
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        return f"{user}\nAnswer:"

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def _forward(self, ids: list[int], cache: Any) -> tuple[Any, int]:
        import torch

        from tokenlean.eval.latency import _cache_of

        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {self._cache_kw: cache} if cache is not None else {}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True, **kwargs)
        return _cache_of(out), int(out.logits[0, -1].argmax())

    def answer_all(
        self, document: str, questions: Sequence[str], batched: bool | None = None
    ) -> tuple[list[str], dict[str, float]]:
        """Greedy answers to ``questions`` about ``document``, and ``{"reader_s", "prompt_tokens"}``.

        The prompt up to the question (the longest token prefix the prompts share) is run once.
        ``batched`` (default: :attr:`batched`) then decodes all questions together on copies of
        that cache, the questions padded between the shared prefix and themselves (masked, with
        their own positions), so each decoding step reads the weights once for every question;
        otherwise each question runs in turn on the cache, cropped back after its answer (an evicting
        cache, which cannot be cropped, is restored from a copy instead).
        """
        import torch

        from tokenlean.eval.latency import cache_mark, cache_rewind

        start = time.perf_counter()
        prefix = self.prompt(document, _SENTINEL).split(_SENTINEL)[0]
        cached = self._ids(prefix)
        prompts = [self._ids(self.prompt(document, q)) for q in questions]
        keep = len(cached)
        for ids in prompts:  # the prefix every prompt shares, at least one token left to run
            limit = min(keep, len(ids) - 1)
            k = 0
            while k < limit and cached[k] == ids[k]:
                k += 1
            keep = k
        with torch.inference_mode():
            cache = self._forward(cached[:keep], None)[0] if keep else None
            batch = self.batched if batched is None else batched
            # an evicting cache (sink_window) runs the questions in turn, from a copy of the prefix's
            if (
                batch
                and len(prompts) > 1
                and hasattr(cache, "batch_repeat_interleave")
                and not getattr(cache, "evicts", False)
            ):
                answers = self._decode_batch(cache, keep, [ids[keep:] for ids in prompts])
            else:
                mark = cache_mark(cache, keep)
                answers = []
                for ids in prompts:
                    cache, token = self._forward(ids[keep:], cache)
                    new: list[int] = []
                    while token not in self.eos:
                        new.append(token)
                        if len(new) >= self.max_new_tokens:
                            break
                        cache, token = self._forward([token], cache)
                    answers.append(self._decode(new))
                    cache = cache_rewind(cache, mark)
        return answers, {"reader_s": time.perf_counter() - start, "prompt_tokens": float(len(cached))}

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _decode_batch(self, cache: Any, length: int, tails: list[list[int]]) -> list[str]:
        """Greedy answers of all ``tails`` (question tokens) after the ``length`` cached prefix tokens."""
        import torch

        from tokenlean.eval.latency import _cache_of

        device = next(self.model.parameters()).device
        n, width = len(tails), max(len(t) for t in tails)
        pad = next(iter(self.eos), 0)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, length + width), dtype=torch.long)
        mask[:, :length] = 1
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, tail in enumerate(tails):  # padding between the prefix and the question
            ids[i, width - len(tail) :] = torch.tensor(tail)
            mask[i, length + width - len(tail) :] = 1
            positions[i, width - len(tail) :] = torch.arange(length, length + len(tail))
        cache.batch_repeat_interleave(n)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         use_cache=True, **{self._cache_kw: cache}, **kwargs)  # fmt: skip
        next_pos = positions[:, -1:] + 1
        new: list[list[int]] = [[] for _ in tails]
        done = [False] * n
        for _step in range(self.max_new_tokens):
            tokens = out.logits[:, -1].argmax(-1).tolist()
            for i, token in enumerate(tokens):
                if not done[i]:
                    if token in self.eos:
                        done[i] = True
                    else:
                        new[i].append(int(token))
                        done[i] = len(new[i]) >= self.max_new_tokens
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            step = torch.tensor([[t] for t in tokens], dtype=torch.long)
            out = self.model(input_ids=step.to(device), attention_mask=mask.to(device), position_ids=next_pos.to(device),
                             use_cache=True, **{self._cache_kw: _cache_of(out)}, **kwargs)  # fmt: skip
            next_pos = next_pos + 1
        return [self._decode(t) for t in new]


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


@register_task("facts")
class FactTask(Task):
    """Fact retention: are a document's typed facts kept intact, dropped, or corrupted?

    Options (``--task facts:docs=8,facts=16,...``): ``docs`` (documents, default 10), ``facts``
    (facts per document, default 16, at most 40), ``words`` (filler words per document, default
    500), ``seed`` (facts, their places and the bootstrap; default 0), ``max_new_tokens`` (reader
    answer length, default 24), ``reader`` (1: the bench's model answers the questions when there
    is one, the default; 0: string matching only), ``batched`` (1: a document's questions are
    decoded as one batch, the default; 0: in turn). One example per document.

    Row: ``status`` (one letter per fact, document order: ``i``ntact, ``c``orrupted,
    ``d``ropped), ``kinds`` (the facts' kinds), ``examples`` (a few corrupted facts with what
    was left of them), the compress call's counts for compressor variants, and with a reader
    ``answers``, ``correct`` (one 0/1 per fact), ``reader_s``, ``prompt_tokens``.
    """

    name = "facts"
    needs_model = False
    primary = "intact"
    higher_is_better = True
    kinds = ("baseline", "compressor")
    order = "example"
    section = SECTION

    def __init__(
        self,
        docs: int = 10,
        facts: int = 16,
        words: int = 500,
        seed: int = 0,
        max_new_tokens: int = 24,
        reader: int = 1,
        batched: int = 1,
    ) -> None:
        self.docs = _positive_int(docs, "docs")
        self.facts = _positive_int(facts, "facts")
        if self.facts > len(TOPICS):
            raise EvalError(f"facts must be at most {len(TOPICS)}, got {facts!r}")
        self.words = _positive_int(words, "words", minimum=20)
        self.seed = int(seed)
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        if reader not in (0, 1, True, False):
            raise EvalError(f"reader must be 0 or 1, got {reader!r}")
        self.reader = bool(reader)
        if batched not in (0, 1, True, False):
            raise EvalError(f"batched must be 0 or 1, got {batched!r}")
        self.batched = bool(batched)
        self._reader: FactReader | None = None
        self._docs: list[FactDocument] = []

    def config(self) -> dict[str, Any]:
        return {
            "docs": self.docs,
            "facts": self.facts,
            "words": self.words,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "reader": int(self.reader),
        }

    def examples(self, tokenizer: Any = None) -> list[Example]:
        self._docs = make_documents(self.docs, self.facts, self.words, self.seed)
        return [Example(doc.id, doc) for doc in self._docs]

    def _get_reader(self, bench: Any) -> FactReader | None:
        if not self.reader or getattr(bench, "model", None) is None:
            return None
        if self._reader is None or self._reader.model is not bench.model:
            self._reader = FactReader(bench.model, bench.tokenizer, self.max_new_tokens, self.batched)
        return self._reader

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        doc: FactDocument = example.data
        row: dict[str, Any] = {"doc": doc.id, "source": doc.source}
        if variant.kind == "compressor":
            compressed = bench.compress(variant, doc.text)
            text = compressed.text
            row.update(compressed.row())
        else:
            text = doc.text
        statuses = fact_statuses(doc.facts, doc.text, text)
        row["status"] = "".join(s[0] for s in statuses)
        row["kinds"] = [f.kind for f in doc.facts]
        row["examples"] = [
            {"kind": f.kind, "fact": f.text, "left": corruption_snippet(f, text)}
            for f, s in zip(doc.facts, statuses)
            if s == "corrupted"
        ][:_EXAMPLES_PER_DOC]
        reader = self._get_reader(bench)
        if reader is not None:
            answers, stats = reader.answer_all(text, [f.question for f in doc.facts])
            row["answers"] = answers
            row["correct"] = [int(answer_correct(a, f)) for a, f in zip(answers, doc.facts)]
            row.update(stats)
        return row

    # -- summaries ------------------------------------------------------------------------------

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Shares of intact/corrupted/dropped facts (Wilson), per kind, and the reader's accuracy.

        Keys: ``intact`` (primary), ``k``, ``n``, ``ci_low``/``ci_high``; ``corrupted``,
        ``corrupted_k``, ``corrupted_low``/``corrupted_high``; the same for ``dropped``;
        ``docs``; per kind ``n/<kind>``, ``intact/<kind>``, ``corrupted_k/<kind>``,
        ``dropped_k/<kind>``. With a reader: ``reader_acc``, ``reader_k``, ``reader_n``,
        ``reader_low``/``reader_high``, ``reader_acc/<status>`` (accuracy on the facts of each
        outcome), ``reader_acc/<kind>``, ``reader_s`` (mean seconds per document),
        ``prompt_tokens`` (mean reader tokens before the question).
        """
        if not rows:
            return {}
        status = [c for r in rows for c in r["status"]]
        kinds = [k for r in rows for k in r["kinds"]]
        n = len(status)
        out: dict[str, float] = {"docs": len(rows), "n": n}
        for name in STATUSES:
            k = sum(c == name[0] for c in status)
            low, high = wilson_interval(k, n)
            prefix = "" if name == "intact" else f"{name}_"
            if name == "intact":
                out.update({"intact": k / n if n else float("nan"), "k": k, "ci_low": low, "ci_high": high})
            else:
                out.update({name: k / n if n else float("nan"), f"{prefix}k": k, f"{prefix}low": low,
                            f"{prefix}high": high})  # fmt: skip
        for kind in _kinds_in(kinds):
            sel = [s for s, k in zip(status, kinds) if k == kind]
            out[f"n/{kind}"] = len(sel)
            out[f"intact/{kind}"] = sum(s == "i" for s in sel) / len(sel)
            out[f"corrupted_k/{kind}"] = sum(s == "c" for s in sel)
            out[f"dropped_k/{kind}"] = sum(s == "d" for s in sel)
        if all("correct" in r for r in rows):
            correct = [int(c) for r in rows for c in r["correct"]]
            k = sum(correct)
            low, high = wilson_interval(k, len(correct))
            out.update({"reader_acc": k / len(correct) if correct else float("nan"), "reader_k": k,
                        "reader_n": len(correct), "reader_low": low, "reader_high": high})  # fmt: skip
            for name in STATUSES:
                sel = [c for c, s in zip(correct, status) if s == name[0]]
                out[f"reader_acc/{name}"] = sum(sel) / len(sel) if sel else None
                out[f"reader_n/{name}"] = len(sel)
            for kind in _kinds_in(kinds):
                sel = [c for c, kk in zip(correct, kinds) if kk == kind]
                out[f"reader_acc/{kind}"] = sum(sel) / len(sel)
            out["reader_s"] = float(np.mean([r["reader_s"] for r in rows]))
            out["prompt_tokens"] = float(np.mean([r["prompt_tokens"] for r in rows]))
        return out

    def compare(self, rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
        """The reader's paired accuracy change against the uncompressed text (bootstrap over facts).

        ``delta``, ``delta_low``/``delta_high``, ``agreement`` (share of facts answered
        identically), ``n_paired``; empty without a reader.
        """
        by_doc = {r["doc"]: r for r in baseline}
        mine, base, same = [], [], []
        for r in rows:
            b = by_doc.get(r["doc"])
            if b is None or "correct" not in r or "correct" not in b:
                continue
            mine += [int(c) for c in r["correct"]]
            base += [int(c) for c in b["correct"]]
            same += [int(x == y) for x, y in zip(r["answers"], b["answers"])]
        if not mine:
            return {}
        delta, low, high = paired_bootstrap_diff(mine, base, seed=self.seed)
        return {"delta": delta, "delta_low": low, "delta_high": high, "agreement": float(np.mean(same)),
                "n_paired": len(mine)}  # fmt: skip

    def extra(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Corruption examples per variant, and the facts of the first document with their questions."""
        examples = {}
        for name, rs in rows.items():
            found = [e for r in rs for e in r.get("examples") or []]
            if found:
                examples[name] = found[:12]
        first = (self._docs or make_documents(1, self.facts, self.words, self.seed))[0]
        reader_answers = {}
        for name, rs in rows.items():
            if rs and "answers" in rs[0] and rs[0].get("doc") == first.id:
                reader_answers[name] = list(rs[0]["answers"])
        return {
            "kinds": list(FACT_KINDS),
            "examples": examples,
            "first_doc": {
                "id": first.id,
                "source": first.source,
                "facts": [
                    {"kind": f.kind, "text": f.text, "question": f.question, "fragments": list(f.fragments)}
                    for f in first.facts
                ],  # fmt: skip
                "answers": reader_answers,
            },
        }


def _kinds_in(kinds: Sequence[str]) -> list[str]:
    seen = set(kinds)
    return [k for k in FACT_KINDS if k in seen] + sorted(seen - set(FACT_KINDS))


# --------------------------------------------------------------------------------------------
# report section and plot
# --------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: Any, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}" if _finite(x) else _DASH


def _pct_ci(value: Any, low: Any, high: Any) -> str:
    text = _pct(value)
    if text != _DASH and _finite(low) and _finite(high):
        text += f" [{_pct(low)}, {_pct(high)}]"
    return text


def _spec(v: Mapping[str, Any]) -> str:
    return str(v.get("spec") or v["name"].rsplit("@", 1)[0])


def _label(v: Mapping[str, Any]) -> str:
    return _spec(v) + (f" (peer: {v['peer']})" if v.get("peer") else "")


def _rate(v: Mapping[str, Any]) -> str:
    return f"{v['rate']:g}" if _finite(v.get("rate")) else "1"


def _rows_of(
    record: Mapping[str, Any], entry: Mapping[str, Any]
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """``(variant, aggregate)`` of every variant the entry measured, baseline first."""
    return [(v, entry["variants"][v["name"]]) for v in record["variants"] if v["name"] in entry["variants"]]


_NOTE = (
    "Per fact, in the text the reader gets: intact = the exact fact string is there (whitespace runs "
    "collapsed); corrupted = not intact, but one of its distinctive fragments is (an alphanumeric run of "
    "the fact, 2+ characters, found nowhere else in the document), as a run or inside a run the compressor "
    "created: the fact survives only in part, or altered; dropped = no trace. Shares pooled over documents, "
    "95% Wilson intervals. Rate: fraction of cl100k tokens kept (requested); achieved: mean over the "
    "variant's documents."
)
_READER_NOTE = (
    "The reader answers every fact's question from the text it gets (greedy); correct = the "
    "answer contains the fact's value (whitespace runs collapsed; inline code without backticks). "
    "Δ: paired change against the uncompressed text, bootstrap 95% interval over facts; same answer: share "
    "of facts answered exactly as from the uncompressed text. Columns by outcome: accuracy on the facts "
    "that came out intact / corrupted / dropped (n in brackets)."
)


@register_section(SECTION)
def facts_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
    """Intact / corrupted / dropped per variant, corruptions by kind, reader accuracy, examples."""
    blocks: list = []
    config = entry.get("config") or {}
    extra = entry.get("extra") or {}
    compare = entry.get("compare") or {}
    tokens = record.get("tokens") or {}
    rows = _rows_of(record, entry)
    if not rows:
        return [Text("No results.")]
    if config:
        blocks.append(
            Text(
                f"{config.get('docs')} document{'' if config.get('docs') == 1 else 's'} of about "
                f"{config.get('words')} words of held-out essays with "
                f"{config.get('facts')} generated facts each (seed {config.get('seed')}): "
                f"{rows[0][1].get('n', _DASH)} facts per variant."
            )
        )
    has_reader = any("reader_acc" in agg for _, agg in rows)
    corrupting = [
        f"{_label(v)} @ {_rate(v)}: {agg.get('corrupted_k')}/{agg.get('n')}"
        for v, agg in rows
        if v.get("kind") == "compressor" and (agg.get("corrupted_k") or 0) > 0
    ]
    clean = [f"{_label(v)} @ {_rate(v)}" for v, agg in rows
             if v.get("kind") == "compressor" and agg.get("corrupted_k") == 0]  # fmt: skip
    if corrupting:
        blocks.append(Text("Corrupted facts: " + "; ".join(corrupting) + ".", strong=True))
    if clean:
        blocks.append(Text("No corrupted fact: " + ", ".join(clean) + "."))

    headers = ["variant", "rate", "achieved", "CORRUPTED k/n", "corrupted % [95% CI]", "intact % [95% CI]",
               "dropped % [95% CI]"]  # fmt: skip
    if has_reader:
        headers += ["reader correct % [95% CI]", "Δ vs uncompressed, pp [95% CI]"]
    table = []
    for v, agg in rows:
        achieved = (tokens.get(v["name"]) or {}).get("achieved_mean")
        label = "uncompressed" if v.get("kind") == "baseline" else _label(v)
        row = [
            label,
            _rate(v),
            f"{achieved:.3f}" if _finite(achieved) else _DASH,
            f"{agg.get('corrupted_k')}/{agg.get('n')}",
            _pct_ci(agg.get("corrupted"), agg.get("corrupted_low"), agg.get("corrupted_high")),
            _pct_ci(agg.get("intact"), agg.get("ci_low"), agg.get("ci_high")),
            _pct_ci(agg.get("dropped"), agg.get("dropped_low"), agg.get("dropped_high")),
        ]
        if has_reader:
            cmp = compare.get(v["name"]) or {}
            delta = _DASH
            if v.get("kind") == "baseline":
                delta = "reference"
            elif _finite(cmp.get("delta")):
                delta = f"{100 * cmp['delta']:+.1f}"
                if _finite(cmp.get("delta_low")) and _finite(cmp.get("delta_high")):
                    delta += f" [{100 * cmp['delta_low']:+.1f}, {100 * cmp['delta_high']:+.1f}]"
            row += [_pct_ci(agg.get("reader_acc"), agg.get("reader_low"), agg.get("reader_high")), delta]
        table.append(row)
    blocks.append(Table(headers, table, text_cols=2, title="Fact retention", note=_NOTE))

    kinds = [k for k in extra.get("kinds") or FACT_KINDS if any(f"n/{k}" in agg for _, agg in rows)]
    by_kind = []
    for v, agg in rows:
        if v.get("kind") == "baseline":
            continue
        cells = []
        for k in kinds:
            c = agg.get(f"corrupted_k/{k}")
            cells.append(f"{_pct(agg.get(f'intact/{k}'), 0)} ({c})" if _finite(agg.get(f"n/{k}")) else _DASH)
        by_kind.append([_label(v), _rate(v), *cells])
    if by_kind:
        n_kind = {k: rows[0][1].get(f"n/{k}") for k in kinds}
        heads = ["compressor", "rate", *[f"{k} (n={n_kind[k]})" for k in kinds]]
        blocks.append(Table(heads, by_kind, text_cols=2, title="By kind: intact % (corrupted count)"))

    if has_reader:
        heads = ["variant", "rate", "same answer as uncompressed %", "when intact", "when corrupted",
                 "when dropped", "reader s / document", "reader prompt tokens"]  # fmt: skip
        table = []
        for v, agg in rows:
            cmp = compare.get(v["name"]) or {}
            cells = []
            for s in STATUSES:
                nn = agg.get(f"reader_n/{s}")
                cells.append(f"{_pct(agg.get(f'reader_acc/{s}'))} ({nn})" if nn else _DASH)
            table.append([
                "uncompressed" if v.get("kind") == "baseline" else _label(v),
                _rate(v),
                "100.0" if v.get("kind") == "baseline" else _pct(cmp.get("agreement")),
                *cells,
                f"{agg['reader_s']:.1f}" if _finite(agg.get("reader_s")) else _DASH,
                f"{agg['prompt_tokens']:.0f}" if _finite(agg.get("prompt_tokens")) else _DASH,
            ])  # fmt: skip
        title = f"Reader `{record['model']['name']}`: accuracy by what happened to the fact"
        blocks.append(Table(heads, table, text_cols=2, title=title, note=_READER_NOTE))

    examples = extra.get("examples") or {}
    names = {v["name"]: v for v in record["variants"]}
    lines = []
    for name, found in examples.items():
        v = names.get(name)
        label = f"{_label(v)} @ {_rate(v)}" if v else name
        for e in found[:6]:
            lines.append(f"{label:<28} {e['kind']:<8} {e['fact']}  ->  …{e['left']}…")
    if lines:
        blocks.append(
            Pre("\n".join(lines), title="Corrupted facts: the fact, and what was left of it (first few)")
        )
    first = extra.get("first_doc") or {}
    if first.get("facts"):
        answers = (first.get("answers") or {}).get(record["variants"][0]["name"]) or []
        lines = []
        for i, f in enumerate(first["facts"]):
            lines.append(f"{f['kind']:<8} {f['text']:<44} {f['question']}")
            if i < len(answers):
                lines.append(f"{'':<8} {'':<44} reader, uncompressed: {answers[i]}")
        blocks.append(Pre("\n".join(lines), title=f"The facts of {first.get('id')} ({first.get('source')})"))
    return blocks


@register_plot(PLOT_NAME)
def plot_facts_vs_rate(record: Mapping[str, Any]) -> bytes | None:
    """Intact and corrupted shares (and reader accuracy) against the requested rate, per compressor."""
    entry = next((e for e in record["quality"].values() if e.get("section") == SECTION), None)
    if entry is None:
        return None
    rows = [
        (v, a) for v, a in _rows_of(record, entry) if v.get("kind") == "compressor" and _finite(v.get("rate"))
    ]
    if not rows:
        return None
    base = next((a for v, a in _rows_of(record, entry) if v.get("kind") == "baseline"), {})
    panels = [("intact", "ci_low", "ci_high", "facts intact"),
              ("corrupted", "corrupted_low", "corrupted_high", "facts corrupted")]  # fmt: skip
    if any("reader_acc" in a for _, a in rows):
        panels.append(
            ("reader_acc", "reader_low", "reader_high", f"reader correct ({record['model']['name']})")
        )
    specs = list(dict.fromkeys(_spec(v) for v, _ in rows))
    fig = new_figure(4.2 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, lo_key, hi_key, title) in zip(axes, panels):
        for i, spec in enumerate(specs):
            pts = sorted((float(v["rate"]), a.get(key), a.get(lo_key), a.get(hi_key), _label(v))
                         for v, a in rows if _spec(v) == spec and _finite(a.get(key)))  # fmt: skip
            if not pts:
                continue
            shift = 0.004 * (i - (len(specs) - 1) / 2)
            ys = [100 * p[1] for p in pts]
            err = [[100 * max(p[1] - (p[2] if _finite(p[2]) else p[1]), 0) for p in pts],
                   [100 * max((p[3] if _finite(p[3]) else p[1]) - p[1], 0) for p in pts]]  # fmt: skip
            ax.errorbar([p[0] + shift for p in pts], ys, yerr=err, marker="o", capsize=3, color=f"C{i % 10}",
                        label=pts[0][4])  # fmt: skip
        if key == "reader_acc" and _finite(base.get("reader_acc")):
            ax.axhline(100 * base["reader_acc"], color="0.3", ls="--", lw=1, label="uncompressed")
        ax.set_xlabel("requested rate (fraction of tokens kept)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return png_bytes(fig)
