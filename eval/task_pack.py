"""The offline lm-eval task pack: tokenlean's own lm-evaluation-harness tasks, built from local data.

:func:`local_task_dir` writes the tasks as an lm-eval include folder
(``TaskManager(include_path=folder, include_defaults=False)``). Every task reads its documents
with ``dataset_path: json`` from an absolute local JSONL file, so nothing is fetched from the
Hugging Face hub. The data come from tokenlean's cached corpora only: the Paul Graham essays
(:func:`tokenlean.data.load_text`), the BIG-bench sources of BBH (:func:`tokenlean.data.load_bbh`)
and the BBH chain-of-thought prompts that lm-eval ships.

Every task carries the tag ``tokenlean`` (``tasks=["tokenlean"]`` runs the whole pack):

``tokenlean_pg_essays``
    ``loglikelihood_rolling`` perplexity, one document per essay (``word_perplexity``,
    ``byte_perplexity``, ``bits_per_byte``, as lm-eval's ``wikitext``).
``tokenlean_pg_cloze``
    ``multiple_choice`` next sentence: two sentences of an essay, the sentence that really
    follows and three sentences of similar length from other essays (``acc``, ``acc_norm``;
    chance 25 %).
``tokenlean_bbh_<task>`` (tag ``tokenlean_bbh``), one per name in :data:`~tokenlean.eval.bbh.BBH_TASK_FORMATS`
    BIG-Bench Hard as LLMLingua-2 evaluates it with log-likelihood scoring and no generated
    reasoning: the prompt is the task description, the three chain-of-thought demonstrations
    (blank lines between them) and ``Q: <question>\\nA: So the answer is``; the answer is the
    label with the highest log-likelihood (``" (A"``, ``" Yes"``...), metric ``acc``. The test
    questions are every BIG-bench example of the task that is not a demonstration (at most
    :data:`BBH_MAX_DOCS`, a seeded sample, which only cuts hyperbaton's 50,000). A document has
    ``description``, ``demos`` (the 3 demonstrations), ``question``, ``choices`` and ``gold``.
``tokenlean_needle``
    Needle in a haystack: a held-out essay (followed by the next ones where it is short) cut to
    about :data:`NEEDLE_TOKENS` cl100k tokens, a sentence "The special magic number for <city> is
    <7 digits>." inserted at depth 0.1, 0.5 or 0.9; the model is asked for the number and
    generates a few tokens (greedy, up to a newline); ``exact_match`` = 1 when the first number
    it generates is the needle's. Fields ``context`` (the haystack with the needle),
    ``question`` (question and answer stem), ``answer``, ``depth``.
``tokenlean_passkey_<n>k`` (tag ``tokenlean_passkey``), n in :data:`PASSKEY_LENGTHS_K`
    Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit key hidden at a seeded random depth
    of a filler text; the whole prompt has at most ``n * 1024`` tokens *of tiktoken cl100k*
    (the model's own tokenizer may count a few percent more or fewer; models are left-truncated
    by lm-eval beyond their maximum length). :data:`PASSKEY_TRIALS` trials per length, each with
    its own seeded key and depth (:func:`passkey_docs`). ``acc`` = the first number generated
    is the key. Fields ``context`` (everything before the question), ``question``, ``key``,
    ``depth``, ``tokens``.

Files are written atomically, and only when their content changes, so the ``datasets`` cache
built from them stays valid. Tasks are written on demand (``local_task_dir(tasks=[...])``):
running the essay tasks never needs the BIG-bench download. A stamp file (``.tokenlean_pack.json``)
records, per task, a fingerprint of the generating code and the hash of every file, so a call
that finds everything in place returns at once, and a damaged or outdated file is rewritten.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenlean._io import atomic_write_text
from tokenlean.errors import EvalError

__all__ = [
    "BBH_MAX_DOCS",
    "BBH_TAG",
    "BBH_TASKS",
    "LOCAL_TAG",
    "LOCAL_TASKS",
    "NEEDLE_DEPTHS",
    "NEEDLE_TASK",
    "NEEDLE_TOKENS",
    "PASSKEY_LENGTHS_K",
    "PASSKEY_TAG",
    "PASSKEY_TASKS",
    "PASSKEY_TRIALS",
    "PG_TASKS",
    "TAGS",
    "bbh_docs",
    "expand_task_names",
    "first_number",
    "local_task_dir",
    "needle_docs",
    "passkey_docs",
    "process_needle",
    "process_passkey",
]

#: Tag of every task of the pack (``tasks=["tokenlean"]`` runs them all).
LOCAL_TAG = "tokenlean"
PG_TASKS: tuple[str, ...] = ("tokenlean_pg_essays", "tokenlean_pg_cloze")

BBH_TAG = "tokenlean_bbh"
#: Most test questions per BBH task (a seeded sample above it; only hyperbaton has more).
BBH_MAX_DOCS = 1000
_BBH_SEED = 0

NEEDLE_TASK = "tokenlean_needle"
#: Haystack length of the needle task, in tiktoken cl100k tokens (before the needle).
NEEDLE_TOKENS = 1000
NEEDLE_DEPTHS: tuple[float, ...] = (0.1, 0.5, 0.9)
_NEEDLE_ESSAYS = 10
_NEEDLE_SEED = 0
_NEEDLE_MAX_GEN_TOKS = 16

PASSKEY_TAG = "tokenlean_passkey"
#: Passkey prompt lengths, in thousands (x 1024) of tiktoken cl100k tokens.
PASSKEY_LENGTHS_K: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: Documents (trials) per passkey length.
PASSKEY_TRIALS = 20
_PASSKEY_SEED = 0
_PASSKEY_MAX_GEN_TOKS = 10


def _bbh_task_names() -> tuple[str, ...]:
    from .bbh import BBH_TASK_FORMATS

    return tuple(f"tokenlean_bbh_{t}" for t in BBH_TASK_FORMATS)


BBH_TASKS: tuple[str, ...] = _bbh_task_names()
PASSKEY_TASKS: tuple[str, ...] = tuple(f"tokenlean_passkey_{n}k" for n in PASSKEY_LENGTHS_K)
#: Every task of the pack, in report order.
LOCAL_TASKS: tuple[str, ...] = (*PG_TASKS, *BBH_TASKS, NEEDLE_TASK, *PASSKEY_TASKS)
#: Tags (lm-eval runs every task carrying a tag given as a task name).
TAGS: dict[str, tuple[str, ...]] = {LOCAL_TAG: LOCAL_TASKS, BBH_TAG: BBH_TASKS, PASSKEY_TAG: PASSKEY_TASKS}

_TEXT = "paul-graham-essays"
_RECIPE_VERSION = 2  # bump when the generated data or YAML change meaning
_STAMP = ".tokenlean_pack.json"
_UTILS_MODULE = "tokenlean_pack_utils"
_CLOZE_EXAMPLES = 200
_CLOZE_SEED = 1234
_CLOZE_CONTEXT_SENTENCES = 2
_CLOZE_DISTRACTORS = 3
_CLOZE_MIN_CHARS, _CLOZE_MAX_CHARS, _CLOZE_MIN_WORDS = 40, 240, 6
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"


def expand_task_names(names: Iterable[str]) -> list[str]:
    """The pack's tasks that ``names`` (task names and tags) select, in pack order; others are ignored."""
    wanted: set[str] = set()
    for name in names:
        if name in TAGS:
            wanted.update(TAGS[name])
        elif name in LOCAL_TASKS:
            wanted.add(name)
    return [t for t in LOCAL_TASKS if t in wanted]


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


def local_task_dir(root: str | os.PathLike[str] | None = None, tasks: Iterable[str] | None = None) -> Path:
    """Write the offline lm-eval tasks (or those of ``tasks``) and their data into ``root``; return it.

    The folder is an lm-eval include folder (``TaskManager(include_path=...)``)::

        <root>/<task>.yaml                 # one per task
        <root>/data/<file>.jsonl           # its documents
        <root>/tokenlean_pack_utils.py     # scoring of the generation tasks (imports tokenlean)
        <root>/.tokenlean_pack.json        # stamp: code fingerprint and file hashes per task

    The YAMLs name their JSONL files by absolute path (lm-eval hands ``data_files`` to
    ``datasets.load_dataset`` unchanged, so a relative path would be read from the current
    folder). Files are written atomically and only when their content changes; the content is
    a deterministic function of the local data.

    Parameters
    ----------
    root : path-like, optional
        Target folder, created if needed. Default: ``tokenlean.zoo.cache_dir() / "lm_eval_tasks"``.
    tasks : iterable of str, optional
        Task names or tags (:data:`LOCAL_TASKS`, :data:`TAGS`) to write; names that are not in
        the pack are ignored. Default: every task (this fetches the BIG-bench sources on first
        use, 358 MB, see :func:`tokenlean.data.fetch_bbh`). Tasks written by earlier calls stay.

    Returns
    -------
    Path
        The absolute folder path.
    """
    from tokenlean import zoo

    root = Path(root).expanduser() if root is not None else zoo.cache_dir() / "lm_eval_tasks"
    root = root.absolute()
    (root / "data").mkdir(parents=True, exist_ok=True)
    names = list(LOCAL_TASKS) if tasks is None else expand_task_names(tasks)
    stamp = _read_stamp(root)
    changed = False
    for name in names:
        fingerprint = _fingerprint(name)
        entry = stamp.get(name)
        if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint and _files_ok(root, entry):
            continue
        files = _build_task(root, name)
        for rel, text in files.items():
            _write_if_changed(root / rel, text)
        stamp[name] = {
            "fingerprint": fingerprint,
            "files": {rel: _sha256(text.encode("utf-8")) for rel, text in files.items()},
        }
        changed = True
    if changed:
        _write_if_changed(root / _STAMP, json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return root


def _read_stamp(root: Path) -> dict[str, Any]:
    try:
        stamp = json.loads((root / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _files_ok(root: Path, entry: Mapping[str, Any]) -> bool:
    files = entry.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, digest in files.items():
        try:
            if _sha256((root / rel).read_bytes()) != digest:
                return False
        except OSError:
            return False
    return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(name: str) -> str:
    """What a task's files depend on besides the (versioned, checksummed) cached data: the code."""
    from . import bbh, haystack

    parts: list[Any] = [_RECIPE_VERSION, name]
    modules = [__file__]
    if name in BBH_TASKS:
        modules.append(bbh.__file__)
        parts.append(_lm_eval_version())
    if name == NEEDLE_TASK or name in PASSKEY_TASKS:
        modules.append(haystack.__file__)
    for path in modules:
        parts.append(_sha256(Path(path).read_bytes()) if path and Path(path).exists() else None)
    return _sha256(json.dumps(parts).encode("utf-8"))


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing
        return None


def _build_task(root: Path, name: str) -> dict[str, str]:
    """``{relative path: text}`` of a task's YAML, data and helper files."""
    data = root / "data"
    if name == "tokenlean_pg_essays":
        docs = _essay_docs()
        rel = "data/pg_essays.jsonl"
        config = {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "text",
            "metric_list": [
                {
                    "metric": "word_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {
                    "metric": "byte_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        }
        header = f"Perplexity on {len(docs)} Paul Graham essays, one document per essay."
        return _task_files(name, rel, docs, config, header, data)
    if name == "tokenlean_pg_cloze":
        docs = _cloze_docs(_essays())
        config = {
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": " ",
            "metric_list": [_mean_metric("acc"), _mean_metric("acc_norm")],
        }
        header = (
            f"Next-sentence cloze: {len(docs)} examples, {_CLOZE_CONTEXT_SENTENCES} sentences of "
            f"context, the true next sentence + {_CLOZE_DISTRACTORS} length-matched sentences from "
            f"other essays (seed {_CLOZE_SEED}); chance accuracy {1 / (1 + _CLOZE_DISTRACTORS):.2f}."
        )
        return _task_files(name, "data/pg_cloze.jsonl", docs, config, header, data)
    if name in BBH_TASKS:
        task = name[len("tokenlean_bbh_") :]
        docs = bbh_docs(task)
        config = {
            # description + demonstrations (blank lines between) + question, as bbh.bbh_prefix builds it
            "doc_to_text": "{{description}}{{demos | join('\\n\\n')}}\n\n{{question}}",
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": "",
            "metric_list": [_mean_metric("acc")],
        }
        header = (
            f"BIG-Bench Hard {task}: {len(docs)} questions, 3 chain-of-thought demonstrations in the "
            "prompt, answer label scored by log-likelihood (LLMLingua-2's BBH protocol)."
        )
        return _task_files(name, f"data/bbh_{task}.jsonl", docs, config, header, data, tags=[BBH_TAG])
    if name == NEEDLE_TASK:
        docs = needle_docs()
        config = _generation_config(
            "{{context}}\n\n{{question}}", "answer", _NEEDLE_MAX_GEN_TOKS, "exact_match"
        )
        header = (
            f"Needle in a haystack: {len(docs)} held-out essay haystacks of ~{NEEDLE_TOKENS} cl100k "
            f"tokens, needle at depths {list(NEEDLE_DEPTHS)}; exact_match = first generated number."
        )
        files = _task_files(name, "data/needle.jsonl", docs, config, header, data, process="process_needle")
        return {**files, f"{_UTILS_MODULE}.py": _utils_module()}
    if name in PASSKEY_TASKS:
        k = int(name[len("tokenlean_passkey_") : -1])
        docs = passkey_docs(k * 1024, PASSKEY_TRIALS, _PASSKEY_SEED)
        config = _generation_config("{{context}} {{question}}", "key", _PASSKEY_MAX_GEN_TOKS, "acc")
        header = (
            f"Passkey retrieval: {len(docs)} prompts of at most {k * 1024} cl100k tokens, a 5-digit key "
            "at a seeded random depth; acc = the first generated number is the key."
        )
        files = _task_files(
            name,
            f"data/passkey_{k}k.jsonl",
            docs,
            config,
            header,
            data,
            tags=[PASSKEY_TAG],
            process="process_passkey",
        )
        return {**files, f"{_UTILS_MODULE}.py": _utils_module()}
    raise EvalError(f"{name!r} is not a task of the offline pack")  # pragma: no cover - callers expand names


def _generation_config(doc_to_text: str, target: str, max_tokens: int, metric: str) -> dict[str, Any]:
    """A greedy ``generate_until`` task stopping at a line break, scored by ``metric`` (a mean)."""
    return {
        "output_type": "generate_until",
        "doc_to_text": doc_to_text,
        "doc_to_target": target,
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_tokens, "do_sample": False},
        "metric_list": [_mean_metric(metric)],
    }


def _mean_metric(name: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def _task_files(
    name: str,
    data_rel: str,
    docs: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    header: str,
    data_dir: Path,
    *,
    tags: Sequence[str] = (),
    process: str | None = None,
) -> dict[str, str]:
    full = {
        "task": name,
        "tag": [LOCAL_TAG, *tags],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_dir.parent / data_rel)}},
        "test_split": "test",
        **config,
        "metadata": {"version": float(_RECIPE_VERSION)},
    }
    yaml_text = _yaml(full, header)
    if process is not None:  # a YAML tag safe_dump cannot write
        yaml_text += f"process_results: !function {_UTILS_MODULE}.{process}\n"
    return {f"{name}.yaml": yaml_text, data_rel: _jsonl(docs)}


def _utils_module() -> str:
    return (
        "# Generated by tokenlean.eval.task_pack.local_task_dir; edits are overwritten.\n"
        "# lm-eval imports this file for `process_results: !function ...` in the YAMLs beside it.\n"
        "from tokenlean.eval.task_pack import process_needle, process_passkey  # noqa: F401\n"
    )


def _jsonl(docs: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


def _yaml(config: Mapping[str, Any], description: str) -> str:
    import yaml

    body = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, width=100)
    return (
        f"# {description}\n"
        f"# Generated by tokenlean.eval.task_pack.local_task_dir (recipe {_RECIPE_VERSION}); "
        "edits are overwritten.\n" + body
    )


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Scoring of the generation tasks (lm-eval calls these through tokenlean_pack_utils.py)
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (``" 52718. Remember"`` -> ``"52718"``), or None."""
    match = _NUMBER.search(text or "")
    return match.group(0) if match else None


def _first_generation(results: Sequence[Any]) -> str:
    out = results[0] if results else ""
    while isinstance(out, (list, tuple)):  # unfiltered responses are lists
        out = out[0] if out else ""
    return str(out)


def process_needle(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``exact_match``: 1.0 when the first number generated is the needle's number."""
    return {"exact_match": float(first_number(_first_generation(results)) == str(doc["answer"]))}


def process_passkey(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``acc``: 1.0 when the first number generated is the pass key."""
    return {"acc": float(first_number(_first_generation(results)) == str(doc["key"]))}


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def bbh_docs(task: str, max_docs: int = BBH_MAX_DOCS, seed: int = _BBH_SEED) -> list[dict[str, Any]]:
    """The documents of ``tokenlean_bbh_<task>``: every eligible BIG-bench example (at most ``max_docs``).

    Each is ``{"id", "task", "index", "description", "demos", "question", "choices", "gold"}``;
    ``description`` ends with a blank line, ``demos`` are the 3 chain-of-thought demonstrations
    (:func:`~tokenlean.eval.bbh.bbh_cot_prompt`), ``question`` is ``"Q: ...\\nA: So the answer
    is"`` and ``choices`` the answer labels (``" (A"``...), ``gold`` the index of the right one.
    The prompt is ``description + "\\n\\n".join(demos) + "\\n\\n" + question``.
    """
    from tokenlean import data

    from .bbh import bbh_cot_prompt, bbh_items

    description, demos = bbh_cot_prompt(task)
    demo_text = "\n".join(demos)
    source = data.load_bbh(task)
    # the examples bbh_items draws from (those that are not demonstrations)
    eligible = sum(1 for ex in source.examples if ex.input.strip() not in demo_text)
    items = bbh_items(task, min(eligible, max_docs), seed=seed)
    return [
        {
            "id": f"{task}:{item.index}",
            "task": task,
            "index": item.index,
            "description": description,
            "demos": list(demos),
            "question": item.question,
            "choices": list(item.continuations),
            "gold": item.target,
        }
        for item in items
    ]


def needle_docs(
    tokens: int = NEEDLE_TOKENS,
    depths: Sequence[float] = NEEDLE_DEPTHS,
    essays: int = _NEEDLE_ESSAYS,
    seed: int = _NEEDLE_SEED,
) -> list[dict[str, Any]]:
    """The documents of ``tokenlean_needle``: one per held-out essay and depth.

    The haystack of essay ``i`` is that essay followed by the next held-out ones (so a short
    essay still fills the budget), cut at a sentence end to at most ``tokens`` cl100k tokens;
    the needle (:func:`~tokenlean.eval.haystack.make_needles`, a city and a 7-digit number) goes
    to the sentence start nearest ``depth``.
    """
    from tokenlean.compressors.prompt.counting import get_counter

    from .haystack import heldout_essays, insert_needle, make_needles, truncate_to_tokens

    counter = get_counter("cl100k")
    held_out = heldout_essays(essays)
    texts = [text.strip() for _, text in held_out]
    names = [name for name, _ in held_out]
    needles = make_needles(len(texts) * len(depths), seed=seed)
    docs = []
    for i, name in enumerate(names):
        joined = "\n\n".join(texts[i:] + texts[:i])
        haystack = truncate_to_tokens(joined, counter, tokens)
        for j, depth in enumerate(depths):
            needle = needles[i * len(depths) + j]
            context, span = insert_needle(haystack, needle.sentence, depth)
            docs.append(
                {
                    "id": f"{name}@{depth:g}",
                    "essay": name,
                    "depth": float(depth),
                    "city": needle.city,
                    "needle": needle.sentence,
                    "needle_start": span[0],
                    "context": context,
                    "question": (
                        f"Question: What is the special magic number for {needle.city}?\n"
                        f"Answer: The special magic number for {needle.city} is"
                    ),
                    "answer": needle.key,
                    "tokens": counter.count(context),
                }
            )
    return docs


def passkey_docs(
    length: int, n: int = PASSKEY_TRIALS, seed: int = _PASSKEY_SEED, counter: str | Any = "cl100k"
) -> list[dict[str, Any]]:
    """``n`` passkey-retrieval documents whose prompts have at most ``length`` tokens.

    Trial ``i`` has its own seed (from ``seed``, ``length`` and ``i``), which draws its depth
    (uniform in [0, 1]) and its 5-digit key (:func:`~tokenlean.eval.haystack.make_passkey`); the
    same arguments always give the same documents.

    Parameters
    ----------
    length : int
        Budget of the whole prompt (context, a space and the question), in tokens of ``counter``.
    n : int
        Number of trials.
    seed : int
        Base seed.
    counter : str or tokenizer
        Token counter (:func:`tokenlean.compressors.prompt.counting.get_counter`); tiktoken cl100k
        by default, which the task names' lengths refer to.

    Returns
    -------
    list of dict
        ``{"id", "length", "depth", "key", "context", "question", "tokens"}``: the prompt is
        ``context + " " + question``, ``tokens`` its length.
    """
    import numpy as np

    from tokenlean.compressors.prompt.counting import get_counter

    from .haystack import PASSKEY_QUESTION, make_passkey

    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise EvalError(f"passkey length must be a positive number of tokens, got {length!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EvalError(f"passkey trials must be a positive integer, got {n!r}")
    count: Callable[[str], int] = get_counter(counter).count
    docs = []
    for i in range(n):
        trial_seed = int.from_bytes(
            hashlib.sha256(f"passkey:{seed}:{length}:{i}".encode()).digest()[:8], "little"
        )
        depth = round(float(np.random.default_rng(trial_seed).uniform(0.0, 1.0)), 4)
        passkey = make_passkey(length, depth, trial_seed, count)
        tail = " " + PASSKEY_QUESTION
        if not passkey.prompt.endswith(tail):  # pragma: no cover - guards against a changed haystack module
            raise EvalError("make_passkey's prompt no longer ends with the passkey question")
        docs.append(
            {
                "id": f"passkey{length}:{i}",
                "length": length,
                "depth": depth,
                "key": passkey.key,
                "context": passkey.prompt[: -len(tail)],
                "question": PASSKEY_QUESTION,
                "tokens": passkey.tokens,
            }
        )
    return docs


def _essays() -> list[tuple[str, str]]:
    """``[(name, text)]`` of the essays, in :func:`tokenlean.data.load_text`'s (sorted) order."""
    from tokenlean import data, zoo

    joined = data.load_text(_TEXT)  # fetches and validates the cache folder
    folder = data.fetch_text(_TEXT)
    manifest = json.loads((folder / zoo.MANIFEST_NAME).read_text(encoding="utf-8"))
    paths = sorted(f["path"] for f in manifest["files"] if f["path"].endswith(".txt"))
    texts = [(folder / rel).read_text(encoding="utf-8") for rel in paths]
    if "\n\n".join(texts) != joined:  # pragma: no cover - guards against a changed data module
        raise RuntimeError(f"the {_TEXT!r} files do not add up to tokenlean.data.load_text({_TEXT!r})")
    return [(Path(rel).stem, text.strip()) for rel, text in zip(paths, texts) if text.strip()]


def _essay_docs() -> list[dict[str, str]]:
    return [{"id": name, "text": text} for name, text in _essays()]


def _sentences(text: str) -> list[str]:
    """Split a scraped essay into sentences (paragraph breaks were lost in the scrape)."""
    text = re.sub(rf"^\s*(?:{_MONTHS}) \d{{4}}", "", text)  # leading date, glued to the first word
    text = re.sub(r"\[\d+\]", " ", text)  # footnote markers
    text = re.sub(r"([a-z0-9)][.?!][\"'”’)]?)([A-Z\"“])", r"\1 \2", text)  # "end.Next" -> "end. Next"
    text = re.sub(r"\s+", " ", text).strip()
    parts = re.split(r"(?<=[.?!])\s+(?=[\"“(]?[A-Z])|(?<=[.?!][\"”)])\s+(?=[A-Z])", text)
    return [p.strip() for p in parts if p.strip()]


def _is_candidate(sentence: str) -> bool:
    return (
        _CLOZE_MIN_CHARS <= len(sentence) <= _CLOZE_MAX_CHARS
        and len(sentence.split()) >= _CLOZE_MIN_WORDS
        and sentence[-1] in '.?!"”)'
        and not re.search(r"https?:|www\.|\[|\]", sentence)
    )


def _cloze_docs(essays: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The cloze examples, in a seeded random order (so any prefix is a random sample)."""
    rng = random.Random(_CLOZE_SEED)
    by_essay = {name: _sentences(text) for name, text in essays}
    pool = [(name, s) for name, sents in by_essay.items() for s in sents if _is_candidate(s)]
    pool.sort(key=lambda item: len(item[1]))
    lengths = [len(s) for _, s in pool]
    targets = [
        (name, i)
        for name, sents in by_essay.items()
        for i in range(_CLOZE_CONTEXT_SENTENCES, len(sents))
        if _is_candidate(sents[i])
        and all(len(c.split()) >= 3 for c in sents[i - _CLOZE_CONTEXT_SENTENCES : i])
    ]
    docs = []
    for name, i in rng.sample(targets, min(_CLOZE_EXAMPLES, len(targets))):
        sents = by_essay[name]
        answer = sents[i]
        choices = [answer, *_distractors(rng, pool, lengths, name, answer)]
        order = list(range(len(choices)))
        rng.shuffle(order)
        docs.append(
            {
                "id": f"{name}:{i}",
                "essay": name,
                "context": " ".join(sents[i - _CLOZE_CONTEXT_SENTENCES : i]),
                "choices": [choices[j] for j in order],
                "gold": order.index(0),
            }
        )
    return docs


def _distractors(
    rng: random.Random, pool: list[tuple[str, str]], lengths: list[int], essay: str, answer: str
) -> list[str]:
    """Sentences from other essays whose length is closest to the answer's (ties broken at random)."""
    center = bisect.bisect_left(lengths, len(answer))
    for width in (10, 20, 40, 80, len(pool)):
        lo, hi = max(0, center - width), min(len(pool), center + width)
        options = sorted({s for name, s in pool[lo:hi] if name != essay and s != answer})
        if len(options) >= _CLOZE_DISTRACTORS:
            return rng.sample(options, _CLOZE_DISTRACTORS)
    raise RuntimeError("not enough sentences for cloze distractors")  # pragma: no cover
