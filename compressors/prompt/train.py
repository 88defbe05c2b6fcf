"""Train the offline default compressor: a LoRA on minilm-l6, distilled from a causal LM teacher.

Recipe (``tokenlean train-compressor``; about 20-30 minutes on 2 CPU cores):

1. **Texts.** The Paul Graham essays (``tokenlean.data``), one document per essay file in sorted
   file-name order. The **last 10 essays are held out** (:func:`paul_graham_split`): they are
   never trained on, the held-out F1 below is measured on them, and the quality report uses them
   as needle-retention haystacks. Other corpora or ``.txt`` files can be named; for those the
   last 10 % of the documents are held out.
2. **Teacher labels.** ``smollm2-135m`` scores every word (minilm-l6's WordPiece words) by its
   self-information ``-log p`` in 1024-token windows (:mod:`.selfinfo`); in every chunk of about
   one encoder window the top ``rate`` fraction of words is labelled keep (:func:`.labels.teacher_labels`).
   With ``labelled=`` a JSON-lines file of (original, compressed) pairs is aligned into labels
   instead (:func:`.labels.align_compressed`) and no teacher is run.
3. **Student.** ``BertForTokenClassification`` (2 labels, 1 = keep) on minilm-l6 with LoRA on the
   query/key/value/attention-output/intermediate/output linear layers of all 6 layers, plus the
   new classification head; AdamW with warm-up and cosine decay, cross-entropy on token labels
   (every token carries its word's label; ``[CLS]``/``[SEP]``/padding ignored), chunks of at most
   510 tokens cut at word starts.
4. **Evaluation.** Held-out F1 of the keep class against the teacher's labels, with the student
   keeping as many words per chunk as the teacher (word ``P(keep)`` = mean over its tokens).
5. **Output.** ``adapter.safetensors`` (LoRA + head, fp16, about 1.4 MB) and ``adapter_config.json``,
   written atomically; :func:`load_adapter_classifier` rebuilds a merged classifier from them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenlean._io import atomic_write_json, atomic_write_text, ensure_writable_dir
from tokenlean.errors import TokenleanError

from .labels import (
    DEFAULT_CHUNK_CHARS,
    TextWords,
    align_compressed,
    chunk_ids,
    group_f1,
    load_labelled_jsonl,
    student_tokenizer,
    teacher_labels,
    text_words,
    top_fraction,
)
from .lora import DEFAULT_TARGETS, AdapterError, apply_lora, load_adapter_into, save_adapter

__all__ = [
    "DEFAULT_ADAPTER_DIR",
    "HELDOUT_ESSAYS",
    "TrainError",
    "add_train_arguments",
    "load_adapter_classifier",
    "load_default_classifier",
    "paul_graham_essays",
    "paul_graham_split",
    "run_train",
    "teacher_word_labels",
    "train_compressor",
]

logger = logging.getLogger(__name__)

#: The shipped adapter (inside the installed package).
DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parent / "default"
#: Paul Graham essays held out from training (the last ones in sorted file-name order).
HELDOUT_ESSAYS = 10
PAUL_GRAHAM = "paul-graham-essays"
LABEL_NAMES = {0: "drop", 1: "keep"}

# Defaults of the shipped run (see the module docstring).
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 5e-4
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0
DEFAULT_RATE = 0.5
DEFAULT_MAX_LENGTH = 512


class TrainError(TokenleanError, ValueError):
    """Bad arguments or data for training a compressor."""


# -- documents ---------------------------------------------------------------------------------


def _source_documents(name: str) -> list[str]:
    """The documents of a ``tokenlean.data`` corpus: one per file, sorted by file name."""
    from tokenlean import data

    joined = data.load_text(name)  # fetches on first use, checks the cache
    folder = data.fetch_text(name)
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    docs = [p.read_text(encoding="utf-8") for p in files]
    if not docs or "\n\n".join(docs) != joined:  # not one file per document: one document
        return [joined]
    return docs


def paul_graham_essays() -> list[str]:
    """The 49 Paul Graham essays, one string each, in sorted file-name order."""
    return _source_documents(PAUL_GRAHAM)


def paul_graham_split(heldout: int = HELDOUT_ESSAYS) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` essays: the last ``heldout`` essays are held out of training."""
    essays = paul_graham_essays()
    if not 0 <= heldout < len(essays):
        raise TrainError(f"heldout must be in [0, {len(essays) - 1}], got {heldout}")
    return essays[: len(essays) - heldout], essays[len(essays) - heldout :]


def _read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path} is not valid UTF-8 (byte {exc.start}): {exc.reason}") from None
    except OSError as exc:
        raise TrainError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_documents(texts: Sequence[str], heldout: int | None) -> tuple[list[str], list[str], str]:
    """Training and held-out documents, and a description of what is held out."""
    from tokenlean import data

    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise TrainError("texts is empty: name a corpus (e.g. 'paul-graham-essays') or .txt files")
    names = set(data.available_texts())
    train: list[str] = []
    held: list[str] = []
    notes: list[str] = []
    for item in texts:
        if not isinstance(item, str):
            raise TrainError(f"texts must be names or paths (str), got {type(item).__name__}")
        if item in names:
            docs = _source_documents(item)
            label = item
        elif Path(item).is_file():
            docs = [_read_text_file(Path(item))]
            label = str(item)
        else:
            raise TrainError(f"{item!r} is neither a text corpus ({', '.join(sorted(names))}) nor a file")
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise TrainError(f"{label} holds no text")
        n = (HELDOUT_ESSAYS if heldout is None else heldout) if item == PAUL_GRAHAM else None
        if n is None:
            n = (len(docs) // 10) if heldout is None else heldout
        n = min(max(0, int(n)), len(docs) - 1)
        train += docs[: len(docs) - n]
        held += docs[len(docs) - n :]
        notes.append(f"{label}: last {n} of {len(docs)} documents held out")
    return train, held, "; ".join(notes)


# -- examples ----------------------------------------------------------------------------------


@dataclass
class _Doc:
    words: TextWords
    labels: np.ndarray  # per word
    groups: np.ndarray  # per word: evaluation group (labelling chunk)


def _chunks(tw: TextWords, max_tokens: int) -> list[tuple[int, int]]:
    """Token ranges of at most ``max_tokens`` tokens, each cut at the start of a word."""
    n = len(tw.ids)
    out: list[tuple[int, int]] = []
    begins = np.flatnonzero(np.diff(tw.word_of_token, prepend=-1) != 0)
    start = 0
    while start < n:
        end = min(start + max_tokens, n)
        if end < n:
            j = np.searchsorted(begins, end, side="right") - 1  # last word start <= end
            if begins[j] > start:
                end = int(begins[j])
        out.append((start, end))
        start = end
    return out


def _examples(docs: Sequence[_Doc], tokenizer: Any, max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = []
    for doc in docs:
        token_labels = doc.labels[doc.words.word_of_token]
        for s, e in _chunks(doc.words, max_length - 2):
            ids = np.concatenate([[cls], doc.words.ids[s:e], [sep]]).astype(np.int64)
            lab = np.concatenate([[-100], token_labels[s:e], [-100]]).astype(np.int64)
            out.append((ids, lab))
    return out


def _collate(batch: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in batch)
    ids = np.full((len(batch), length), pad_id, dtype=np.int64)
    labels = np.full((len(batch), length), -100, dtype=np.int64)
    mask = np.zeros((len(batch), length), dtype=np.int64)
    for row, (i, lab) in enumerate(batch):
        ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels),
    }


# -- student -----------------------------------------------------------------------------------


def _zoo_path(name: str) -> Path:
    from tokenlean import zoo

    if Path(name).is_dir():
        return Path(name)
    entry = zoo.get_entry(name)
    if not entry.is_cached:
        zoo.fetch(name)
    return entry.path


def _build_classifier(base: str, attention_dropout: float | None = None) -> Any:
    """``BertForTokenClassification`` with 2 labels on a zoo encoder (the head is new)."""
    import transformers
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = _zoo_path(base)
    config = AutoConfig.from_pretrained(
        path, num_labels=2, id2label=LABEL_NAMES, label2id={"drop": 0, "keep": 1}
    )
    if attention_dropout is not None:
        # Dropout on attention probabilities sends CPU SDPA to its slow path (3-5x slower training).
        config.attention_probs_dropout_prob = attention_dropout
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the "newly initialised head" report is expected
    transformers.logging.disable_progress_bar()  # a 1-second load needs no bar
    try:
        model = AutoModelForTokenClassification.from_pretrained(path, config=config)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    return model


def _word_probs(
    model: Any, tokenizer: Any, docs: Sequence[_Doc], max_length: int, batch_size: int = 16
) -> list[np.ndarray]:
    """Student ``P(keep)`` of every word of every document (mean over the word's tokens)."""
    device = next(model.parameters()).device
    pieces: list[tuple[int, int, int]] = []  # (doc, token start, token end)
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for d, doc in enumerate(docs):
        for s, e in _chunks(doc.words, max_length - 2):
            pieces.append((d, s, e))
            ids = np.concatenate([[cls], doc.words.ids[s:e], [sep]]).astype(np.int64)
            examples.append((ids, np.zeros_like(ids)))
    token_probs = [np.zeros(len(doc.words.ids)) for doc in docs]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(examples), batch_size):
            batch = _collate(examples[b : b + batch_size], tokenizer.pad_token_id or 0)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            probs = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()
            for row, (d, s, e) in enumerate(pieces[b : b + batch_size]):
                token_probs[d][s:e] = probs[row, 1 : 1 + e - s]
    model.train(was_training)
    out = []
    for doc, tp in zip(docs, token_probs):
        wot = doc.words.word_of_token
        n_words = len(doc.words.spans)
        sums = np.bincount(wot, weights=tp, minlength=n_words)
        counts = np.bincount(wot, minlength=n_words)
        out.append(sums / np.maximum(counts, 1))
    return out


def _evaluate(model: Any, tokenizer: Any, docs: Sequence[_Doc], max_length: int) -> dict[str, float]:
    """Held-out F1 of the keep class: at the reference's own keep count per group, and at P>0.5."""
    if not docs:
        return {}
    probs = _word_probs(model, tokenizer, docs, max_length)
    ref_all, matched_all, argmax_all = [], [], []
    for doc, p in zip(docs, probs):
        groups = doc.groups
        keep = np.bincount(groups, weights=doc.labels, minlength=groups.max() + 1 if len(groups) else 0)
        matched_all.append(top_fraction(p, groups, keep.astype(np.int64)))
        argmax_all.append((p > 0.5).astype(np.int64))
        ref_all.append(doc.labels)
    ref = np.concatenate(ref_all)
    return {
        "f1": group_f1(ref, np.concatenate(matched_all)),
        "f1_argmax": group_f1(ref, np.concatenate(argmax_all)),
        "keep_fraction_argmax": float(np.concatenate(argmax_all).mean()),
        "reference_keep_fraction": float(ref.mean()),
        "words": int(len(ref)),
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait})"
    )


class _Log:
    def __init__(self, verbose: bool) -> None:
        self.lines: list[str] = []
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        self.lines.append(line)
        logger.info(message)
        if self.verbose:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)


def _check_args(rate: float, steps: int, batch_size: int, lr: float, max_length: int) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
        raise TrainError(f"rate must be in (0, 1] (the fraction of words kept), got {rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrainError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not float(lr) > 0:
        raise TrainError(f"lr must be > 0, got {lr!r}")
    if not 8 <= int(max_length) <= 512:
        raise TrainError(f"max_length must be in [8, 512], got {max_length!r}")


def _teacher_docs(
    texts: Sequence[str],
    tokenizer: Any,
    teacher: str | tuple[Any, Any],
    rate: float,
    window: int,
    stride: int | None,
    progress: bool,
    device: Any,
    desc: str,
) -> list[_Doc]:
    from tokenlean import zoo

    from .selfinfo import word_self_information_many

    words = [text_words(tokenizer, t) for t in texts]
    if isinstance(teacher, str):
        lm, lm_tok = zoo.load(teacher, device=device, download=True)
    else:
        lm, lm_tok = teacher
    lm.eval()
    scores = word_self_information_many(
        list(texts), lm, lm_tok, [w.spans for w in words], window=window, stride=stride, progress=progress
    )
    del lm
    docs = []
    for t, w, s in zip(texts, words, scores):
        labels = teacher_labels(t, w.spans, s, rate=rate)
        docs.append(_Doc(w, labels, chunk_ids(w.spans, DEFAULT_CHUNK_CHARS)))
    logger.debug("%s: %d documents labelled", desc, len(docs))
    return docs


def teacher_word_labels(
    texts: Sequence[str],
    rate: float = DEFAULT_RATE,
    teacher: str | tuple[Any, Any] = "smollm2-135m",
    student: str = "minilm-l6",
    window: int = 1024,
    stride: int | None = None,
    progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The teacher's keep/drop labels of the student's words, exactly as training builds them.

    For agreement-with-teacher figures (e.g. F1 on the held-out essays of
    :func:`paul_graham_split`). Returns one ``(word_spans, labels)`` pair per text: character
    spans ``(n_words, 2)`` of minilm-l6's WordPiece words and their 0/1 labels (1 = keep).
    """
    if isinstance(texts, str):
        texts = [texts]
    for t in texts:
        if not isinstance(t, str):
            raise TrainError(f"texts must be str, got {type(t).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
        raise TrainError(f"rate must be in (0, 1] (the fraction of words kept), got {rate!r}")
    tokenizer = student_tokenizer(student)
    docs = _teacher_docs(list(texts), tokenizer, teacher, rate, window, stride, progress, None, "teacher")
    return [(d.words.spans, d.labels) for d in docs]


def _labelled_docs(pairs: Sequence[tuple[str, str]], tokenizer: Any) -> list[_Doc]:
    docs = []
    for original, compressed in pairs:
        w = text_words(tokenizer, original)
        labels = np.asarray(align_compressed(original, compressed, tokenizer=tokenizer), dtype=np.int64)
        docs.append(_Doc(w, labels, np.zeros(len(labels), dtype=np.int64)))
    return docs


def train_compressor(
    out_dir: str | os.PathLike[str],
    texts: Sequence[str] = (PAUL_GRAHAM,),
    labelled: str | os.PathLike[str] | None = None,
    teacher: str | tuple[Any, Any] = "smollm2-135m",
    student: str = "minilm-l6",
    rate: float = DEFAULT_RATE,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    heldout: int | None = None,
    window: int = 1024,
    stride: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    eval_every: int = 50,
    device: str | torch.device | None = None,
    progress: bool = True,
    log_file: str | os.PathLike[str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Distil a keep/drop token classifier (LoRA on ``student``) and write its adapter to ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        Folder for ``adapter.safetensors`` + ``adapter_config.json`` (written atomically, last).
    texts : sequence of str
        Corpus names from ``tokenlean.data.available_texts()`` and/or paths of UTF-8 ``.txt`` files.
        Ignored when ``labelled`` is given.
    labelled : path-like, optional
        JSON-lines file of ``{"original", "compressed"}`` pairs (or llmlingua's ``"prompt"`` /
        ``"compressed_prompt"``): train on these aligned labels instead of the teacher's.
    teacher : str or (model, tokenizer)
        Causal LM scoring self-information: a zoo name, or an already loaded model and tokenizer.
    student : str
        Encoder zoo name (or local folder) under the classification head.
    rate : float
        Fraction of words the teacher labels keep, in (0, 1].
    steps, batch_size, lr : training length, chunks per step, AdamW learning rate.
    rank, alpha, targets : LoRA settings.
    seed : int
        Seeds the head, LoRA initialisation and batch order.
    heldout : int, optional
        Documents held out per corpus (default: the last 10 Paul Graham essays; the last 10 %
        of other corpora's documents; the last 10 % of labelled pairs).
    window, stride : teacher LM window and scored tokens per window.
    max_length : encoder window (tokens, with ``[CLS]``/``[SEP]``).
    eval_every : held-out evaluation every this many steps (and at the start and end).
    device : where to train (CPU by default).
    progress : tqdm bars and log lines on stderr.
    log_file : path-like, optional
        Where to write the run log (text) and the figures (same name, ``.json``), atomically.
    on_step : callable, optional
        Called as ``on_step(step, loss)`` after every step.

    Returns
    -------
    dict
        The training figures (also stored in ``adapter_config.json``).

    Raises
    ------
    TrainError
        On bad arguments or unreadable data; nothing is written then.
    """
    _check_args(rate, steps, batch_size, lr, max_length)
    settings = {
        "texts": texts,
        "labelled": labelled,
        "teacher": teacher,
        "student": student,
        "rate": rate,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "seed": seed,
        "heldout": heldout,
        "window": window,
        "stride": stride,
        "max_length": max_length,
        "eval_every": eval_every,
        "device": device,
        "progress": progress,
        "log_file": log_file,
        "on_step": on_step,
    }
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    log = _Log(progress)
    existed = Path(out_dir).exists()
    out = ensure_writable_dir(out_dir)  # fail now, not after the teacher has run
    try:
        return _train(out, log, t_start, cpu_start, **settings)
    except BaseException:
        if not existed:  # leave nothing behind: the folder was made for this run
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _train(
    out: Path,
    log: _Log,
    t_start: float,
    cpu_start: float,
    *,
    texts: Sequence[str],
    labelled: str | os.PathLike[str] | None,
    teacher: str | tuple[Any, Any],
    student: str,
    rate: float,
    steps: int,
    batch_size: int,
    lr: float,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    seed: int,
    heldout: int | None,
    window: int,
    stride: int | None,
    max_length: int,
    eval_every: int,
    device: str | torch.device | None,
    progress: bool,
    log_file: str | os.PathLike[str] | None,
    on_step: Callable[[int, float], None] | None,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    tokenizer = student_tokenizer(student)

    t0 = time.perf_counter()
    if labelled is not None:
        pairs = load_labelled_jsonl(labelled)
        n_held = (len(pairs) // 10) if heldout is None else min(max(0, int(heldout)), len(pairs) - 1)
        held_pairs, train_pairs = pairs[len(pairs) - n_held :], pairs[: len(pairs) - n_held]
        log(f"labelled data {labelled}: {len(pairs)} pairs, last {n_held} held out")
        train_docs, held_docs = _labelled_docs(train_pairs, tokenizer), _labelled_docs(held_pairs, tokenizer)
        source = {"labelled": str(labelled), "pairs": len(pairs), "heldout": f"last {n_held} pairs"}
    else:
        train_texts, held_texts, held_note = _load_documents(texts, heldout)
        log(f"texts {list(texts)}: {len(train_texts)} training documents; {held_note}")
        log(
            f"teacher {teacher if isinstance(teacher, str) else 'model'}: self-information of every word (window {window}), labels at rate {rate}"
        )
        all_docs = _teacher_docs(
            train_texts + held_texts, tokenizer, teacher, rate, window, stride, progress, device, "teacher"
        )
        train_docs, held_docs = all_docs[: len(train_texts)], all_docs[len(train_texts) :]
        teacher_name = teacher if isinstance(teacher, str) else type(teacher[0]).__name__
        source = {"texts": list(texts), "teacher": teacher_name, "heldout": held_note}
    t_labels = time.perf_counter() - t0
    examples = _examples(train_docs, tokenizer, max_length)
    if not examples:
        raise TrainError("no training text left after holding out the evaluation documents")
    n_tokens = int(sum((lab >= 0).sum() for _, lab in examples))
    keep_frac = float(np.mean(np.concatenate([lab[lab >= 0] for _, lab in examples])))
    log(f"labels ready in {t_labels:.0f}s: {len(examples)} chunks, {n_tokens} tokens, {keep_frac:.1%} keep")

    model = _build_classifier(student, attention_dropout=0.0)
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    log(f"student {student} + LoRA rank {rank} alpha {alpha:g}: {n_trainable} trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    warmup = max(1, min(20, steps // 10))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    history: list[dict[str, Any]] = []
    untrained = _evaluate(model, tokenizer, held_docs, max_length)
    if untrained:
        log(f"step 0: held-out F1 {untrained['f1']:.3f} (untrained head)")
        history.append({"step": 0, **untrained})

    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    pad_id = tokenizer.pad_token_id or 0
    t1 = time.perf_counter()
    model.train()
    with tqdm(total=steps, desc="train compressor", unit="step", disable=not progress) as bar:
        for step in range(1, steps + 1):
            if len(order) < batch_size:
                order += torch.randperm(len(examples), generator=generator).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = {k: v.to(dev) for k, v in _collate([examples[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            losses.append(value)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(step, value)
            if step % 10 == 0 or step == steps:
                log(
                    f"step {step}: train loss {np.mean(losses[-10:]):.4f} (lr {scheduler.get_last_lr()[0]:.2e})"
                )
            if held_docs and eval_every > 0 and (step % eval_every == 0 or step == steps):
                figures = _evaluate(model, tokenizer, held_docs, max_length)
                history.append({"step": step, "train_loss": float(np.mean(losses[-10:])), **figures})
                log(f"step {step}: held-out F1 {figures['f1']:.3f} (at P>0.5: {figures['f1_argmax']:.3f})")
    t_train = time.perf_counter() - t1
    final = history[-1] if held_docs else {}
    report: dict[str, Any] = {
        "base_model": student,
        "rank": rank,
        "alpha": alpha,
        "targets": list(targets),
        "label_names": LABEL_NAMES,
        "max_length": max_length,
        "word_rule": "wordpiece",
        "training": {
            **source,
            "rate": rate,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "teacher_window": window if labelled is None else None,
            "train_documents": len(train_docs),
            "heldout_documents": len(held_docs),
            "train_chunks": len(examples),
            "train_tokens": n_tokens,
            "train_keep_fraction": keep_frac,
            "trainable_parameters": n_trainable,
            "final_train_loss": float(np.mean(losses[-10:])),
            "heldout_f1": final.get("f1"),
            "heldout_f1_argmax": final.get("f1_argmax"),
            "heldout_f1_untrained": untrained.get("f1") if untrained else None,
            "heldout_words": final.get("words"),
            "labels_seconds": round(t_labels, 1),
            "train_seconds": round(t_train, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "load_average_1min_at_end": _load_average(),
            "machine": _machine(),
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
            "history": history,
        },
    }
    save_adapter(out, model, report)
    report["training"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["training"]["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    figures = report["training"]
    f1_text = "n/a" if figures["heldout_f1"] is None else f"{figures['heldout_f1']:.3f}"
    log(
        f"done in {figures['total_seconds']:.0f}s ({figures['cpu_seconds']:.0f} CPU-s): final loss {figures['final_train_loss']:.4f}, "
        f"held-out F1 {f1_text}; adapter in {out}"
    )
    report["adapter_dir"] = str(out)
    report["log"] = list(log.lines)
    if log_file is not None:
        log_path = Path(log_file)
        ensure_writable_dir(log_path.parent)
        atomic_write_text(log_path, "\n".join(log.lines) + "\n")
        atomic_write_json(log_path.with_suffix(".json"), {k: v for k, v in report.items() if k != "log"})
    return report


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - metadata lookups raise several error types
        return None


# -- loading -----------------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise TrainError(f"dtype must be one of {sorted(table)} or a torch.dtype, got {dtype!r}") from None


def load_adapter_classifier(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """Rebuild a trained compressor from an adapter folder: ``(model, tokenizer)``.

    Loads the base encoder named in the adapter config from the zoo, adds a 2-label token
    classification head, applies and merges the LoRA (no inference overhead); eval mode.

    Raises
    ------
    AdapterError
        If the folder lacks the adapter files or they do not fit the base model.
    """
    from .lora import load_adapter

    _, config = load_adapter(path)  # fails early and clearly on a missing or damaged adapter
    base = str(config.get("base_model", "minilm-l6"))
    model = _build_classifier(base)
    load_adapter_into(model, path, merge=True)
    resolved = _resolve_dtype(dtype)
    if resolved is not None:
        model.to(dtype=resolved)
    if device is not None:
        model.to(device)
    model.eval()
    return model, student_tokenizer(base)


def load_default_classifier(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """The shipped default compressor (minilm-l6 + the adapter in ``compressors/prompt/default``).

    Returns ``(model, tokenizer)``: a merged ``BertForTokenClassification`` (label 1 = keep) in
    eval mode, and minilm-l6's fast tokenizer.

    Raises
    ------
    AdapterError
        If the shipped adapter files are missing (train them with ``tokenlean train-compressor``).
    """
    if not (DEFAULT_ADAPTER_DIR / "adapter.safetensors").is_file():
        raise AdapterError(
            f"the default compressor's adapter is missing from {DEFAULT_ADAPTER_DIR} (a broken install?); "
            f"reinstall tokenlean, or train one with `tokenlean train-compressor --out DIR` and pass "
            "PromptCompressor(model=DIR)"
        )
    return load_adapter_classifier(DEFAULT_ADAPTER_DIR, device=device, dtype=dtype)


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder holding a tokenlean LoRA adapter (``adapter.safetensors``)."""
    return (Path(path) / "adapter.safetensors").is_file()


# -- command line ------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tokenlean train-compressor`` options to ``parser``."""
    parser.add_argument("--out", default="compressor-adapter", help="adapter folder (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help="fraction of words the teacher keeps (default: %(default)s)",
    )
    parser.add_argument(
        "--labelled",
        metavar="FILE.jsonl",
        help='train on aligned {"original", "compressed"} pairs instead of the teacher',
    )
    parser.add_argument(
        "--texts",
        nargs="+",
        default=[PAUL_GRAHAM],
        metavar="NAME",
        help="text corpora (tokenlean.data names) or .txt files for the teacher (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="chunks per step")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate")
    parser.add_argument("--lora-rank", type=int, default=DEFAULT_RANK, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=DEFAULT_ALPHA, help="LoRA alpha")
    parser.add_argument("--heldout", type=int, default=None, help="documents held out for evaluation")
    parser.add_argument("--teacher", default="smollm2-135m", help="causal LM teacher (zoo name)")
    parser.add_argument("--log", metavar="FILE", help="write the run log here (and its figures as FILE.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run ``tokenlean train-compressor`` from parsed arguments; prints the figures; returns 0."""
    report = train_compressor(
        args.out,
        texts=args.texts,
        labelled=args.labelled,
        teacher=args.teacher,
        rate=args.rate,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        seed=args.seed,
        heldout=args.heldout,
        progress=not args.quiet,
        log_file=args.log,
    )
    figures = report["training"]
    summary = {
        "adapter_dir": report["adapter_dir"],
        "total_seconds": figures["total_seconds"],
        "final_train_loss": figures["final_train_loss"],
        "heldout_f1": figures["heldout_f1"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = add_train_arguments(argparse.ArgumentParser(prog="tokenlean train-compressor"))
    sys.exit(run_train(parser.parse_args()))
