"""LLMLingua-2 prompt compression: a token keep/drop classifier, with vectorised post-processing.

:class:`PromptCompressor` runs any 2-label ``*ForTokenClassification`` checkpoint: the
published LLMLingua-2 models (``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``,
``microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank``), a local folder, or the
offline default (minilm-l6 distilled here, see :mod:`.train`).

Two modes:

``llmlingua_compat=True``
    The same kept words as ``llmlingua`` 0.2.2 ``compress_prompt(..., use_llmlingua2=True)``,
    bit for bit: the same chunking (re-tokenised chunk strings), the same ``[NEWi]`` aliases
    for multi-token force tokens, the same encoder calls (512-token padding, batches of 50,
    ``[CLS]``/``[SEP]`` strings even for XLM-R — llmlingua issue #181), the same per-chunk
    percentile thresholds and float32 arithmetic. Only the work around the encoder differs:
    vocabulary lookup tables, segment reductions and cached token counts instead of per-token
    and per-word Python loops.
``llmlingua_compat=False`` (default)
    The model's own special tokens, no padding waste, and a budget that is honoured: words
    are ranked by keep probability over the whole input and taken until the requested share
    of cl100k tokens is reached (llmlingua's per-chunk percentile misses the rate, its #195).
    The output is cut from the original text, so case, spacing and line breaks survive, and
    fenced code, JSON and markdown headings stay verbatim (``keep_structure``). Numbers, dates,
    e-mails, URLs and the other atomic units of :mod:`.units` are kept whole or dropped whole
    (``atomic_units``), and the output is tidied so no bracket, quote or backtick is orphaned
    and no paragraph break appears where the original had none.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenlean.errors import TokenleanError

from .counting import TokenCounter, get_counter
from .result import CompressionResult
from .words import VocabTables, WordRule, detect_rule

__all__ = ["CompressorModelError", "PromptCompressor", "PRECISIONS"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_MAX_FORCE_TOKENS = 100
_NEW_TOKENS = tuple(f"[NEW{i}]" for i in range(_MAX_FORCE_TOKENS))
# Texts longer than this go to the tokenizer in pieces (cut at a line break or space) that it
# encodes in parallel (default mode only; compat tokenises as llmlingua).
_PIECE_CHARS = 16_000
# Default-mode encoder batches: at most this many tokens (batch x padded length).
_BATCH_TOKENS = 16_384
_WS_CODES = np.array(
    [9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000], np.int64
)
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_CLOSING_CODES = np.array([ord(ch) for ch in ",.;:!?)]}”’»%…，。；：！？、）】」』"], np.uint32)
_OPENING_CODES = np.array([ord(ch) for ch in "([{“‘«（【「『"], np.uint32)
_SPLIT_WORDS = re.compile(r'\b\w+\b|[<>=/!@#$%^&*()?":{}|\\`~;_+-]')


class CompressorModelError(TokenleanError, ValueError):
    """The model cannot serve as a keep/drop token classifier."""


def _check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"rate must be a number in (0, 1], got {rate!r}")
    if not 0.0 < float(rate) <= 1.0 or rate != rate:
        raise ValueError(f"rate is the fraction of tokens kept and must be in (0, 1], got {rate!r}")
    return float(rate)


def _check_budget(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_contexts(text_or_list: Any) -> tuple[list[str], bool]:
    if isinstance(text_or_list, str):
        return [text_or_list], True
    if isinstance(text_or_list, (bytes, bytearray)):
        raise TypeError("compress() takes str, not bytes; decode the text first (e.g. data.decode('utf-8'))")
    if isinstance(text_or_list, Sequence):
        items = list(text_or_list)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"context {i} is {type(item).__name__}, not str")
        return items, False
    raise TypeError(f"compress() takes a str or a list of str, got {type(text_or_list).__name__}")


def _f32_segment_mean(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-segment mean, accumulated left to right in float32 exactly like ``sum(list) / len``."""
    acc = values[starts].astype(np.float32, copy=True)
    longest = int(counts.max()) if counts.size else 0
    for k in range(1, longest):
        rows = np.flatnonzero(counts > k)
        acc[rows] += values[starts[rows] + k]
    return acc / counts.astype(np.float32)


def _llmlingua_percentile(values: np.ndarray, python_float: np.ndarray, q: int) -> float:
    """``np.percentile`` on the list llmlingua builds: float32 unless a Python float is in it."""
    array = values.astype(np.float64) if python_float.any() else values.astype(np.float32)
    return float(np.percentile(array, q))


@dataclass
class _Chunk:
    context: int
    ids: np.ndarray  # encoder input ids, special tokens included
    text_ids: np.ndarray  # ids of the text tokens only
    offsets: np.ndarray | None  # (n, 2) char offsets of text tokens in the context (default mode)


@dataclass
class _Words:
    """The words of a set of chunks, as flat arrays."""

    chunk: np.ndarray  # chunk index per word
    probs: np.ndarray  # float32 keep probability (force rules applied)
    probs_raw: np.ndarray  # float32 keep probability without force rules
    python_float: np.ndarray  # llmlingua holds this probability as a Python float
    token_start: np.ndarray  # index of the first token (into the flat token arrays)
    token_count: np.ndarray
    ids: np.ndarray  # flat token ids (text tokens, specials removed)
    span: np.ndarray | None  # (n_words, 2) char spans in the context (default mode)


class PromptCompressor:
    """Compress prompts with a token keep/drop classifier (LLMLingua-2).

    Parameters
    ----------
    model : str, PreTrainedModel
        ``"default"`` (the offline minilm-l6 compressor shipped with tokenlean), a hub id such
        as ``"microsoft/llmlingua-2-xlm-roberta-large-meetingbank"``, a local folder (a saved
        token classifier, or the adapter folder ``tokenlean train-compressor --out`` writes),
        or a loaded ``*ForTokenClassification`` model (then pass ``tokenizer``).
    tokenizer : tokenizer, optional
        The classifier's tokenizer when ``model`` is a loaded model.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    precision : {"fp32", "bf16", "fp16", "int8"}
        Encoder precision. "fp32" (default) gives exact parity with llmlingua. "bf16"/"fp16"
        run the torch module in that dtype (GPUs; "bf16" is also fast on CPUs with AMX).
        "int8" runs the encoder on OpenVINO with int8 weights (CPU only, ``pip install
        'tokenlean[openvino]'``): bf16 matmuls on AMX CPUs, dynamic int8 activations on the
        others (:mod:`.runtime`).
    llmlingua_compat : bool
        Reproduce llmlingua 0.2.2 exactly, including its XLM-R special-token bug (#181) and its
        per-chunk percentile threshold. Default False: correct special tokens, rate honoured.
    counter : str or tokenizer
        What budgets are counted in: ``"cl100k"`` (tiktoken, as LLMLingua-2) or a HF tokenizer.
    word_rule : {"wordpiece", "sentencepiece"}, optional
        How tokens merge into words; guessed from the model name (as llmlingua does) or else
        from the vocabulary.
    max_batch_size : int
        Chunks per encoder call (llmlingua: 50).
    keep_structure : bool
        Keep fenced code blocks, JSON and markdown headings verbatim (default mode only).
    atomic_units : bool or sequence of str
        Keep numbers, dates, times, phone numbers, e-mails, URLs, paths, versions,
        identifiers, inline code and tags whole or drop them whole, never cut
        (:mod:`.units`; default mode only, default ``True``). A sequence restricts the kinds
        (names from :data:`~.units.UNIT_KINDS`). With ``llmlingua_compat=True`` it must stay
        off: llmlingua cuts units, and compat mode reproduces llmlingua.
    """

    def __init__(
        self,
        model: Any = "default",
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        llmlingua_compat: bool = False,
        counter: str | Any = "cl100k",
        word_rule: WordRule | None = None,
        max_batch_size: int = 50,
        keep_structure: bool = True,
        atomic_units: bool | Sequence[str] | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.device = torch.device(device) if device is not None else self._default_device()
        if precision == "int8" and self.device.type != "cpu":
            raise ValueError(
                "precision='int8' is dynamic quantisation for the CPU; use 'fp16' or 'bf16' on a GPU"
            )
        self.compat = bool(llmlingua_compat)
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.max_seq_len = 512
        self.keep_structure = bool(keep_structure) and not self.compat
        self._unit_pattern = self._check_units(atomic_units)
        self.model, self.tokenizer, self.name = self._load(model, tokenizer)
        self._check_classifier(self.model)
        self.special_tokens = {
            v for k, v in self.tokenizer.special_tokens_map.items() if k != "additional_special_tokens" and v
        }
        if self.compat:
            self._add_force_aliases()
        self.rule = word_rule or detect_rule(self.tokenizer, self.name)
        self.tables = VocabTables.build(self.tokenizer, self.rule, self.special_tokens)
        self.model.to(self.device)
        self._apply_precision()
        self.counter: TokenCounter = get_counter(counter)
        self._count_cache: dict[Any, int] = {}
        self._string_cache: dict[bytes, str] = {}
        self.last_timings: dict[str, float] = {}
        self._backend: Any = None

    def _check_units(self, atomic_units: Any) -> re.Pattern[str] | None:
        from .units import UNIT_KINDS, unit_pattern

        if atomic_units is None:
            atomic_units = not self.compat
        if isinstance(atomic_units, bool):
            kinds = UNIT_KINDS if atomic_units else ()
        elif isinstance(atomic_units, (list, tuple, set, frozenset)) and all(
            isinstance(k, str) for k in atomic_units
        ):
            kinds = tuple(atomic_units)
        else:
            raise TypeError(f"atomic_units must be a bool or a sequence of unit kinds, got {atomic_units!r}")
        if kinds and self.compat:
            raise ValueError(
                "atomic_units cannot be used with llmlingua_compat=True: compat mode reproduces "
                "llmlingua 0.2.2 exactly, and llmlingua cuts numbers, dates and URLs"
            )
        return unit_pattern(kinds) if kinds else None

    # ----------------------------------------------------------------- loading

    @staticmethod
    def _default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _load(self, model: Any, tokenizer: Any) -> tuple[Any, Any, str]:
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with a loaded model")
            return model.eval(), tokenizer, str(getattr(model.config, "_name_or_path", "") or "")
        if not isinstance(model, (str, Path)):
            raise TypeError(f"model must be 'default', a hub id, a folder or a loaded model, got {model!r}")
        name = str(model)
        if name == "default":
            from .train import load_default_classifier

            loaded, tok = load_default_classifier()
            return loaded.eval(), tok, "tokenlean/minilm-l6-compressor"
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

        from .lora import ADAPTER_CONFIG

        if (Path(name) / ADAPTER_CONFIG).is_file() and not (Path(name) / "config.json").is_file():
            # a folder written by `tokenlean train-compressor` (LoRA adapter + head on a zoo encoder)
            from .train import load_adapter_classifier

            loaded, tok = load_adapter_classifier(name)
            return loaded.eval(), tok, name
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise CompressorModelError(f"cannot load a model config from {name!r}: {exc}") from exc
        architectures = getattr(config, "architectures", None) or []
        if not any(arch.endswith("ForTokenClassification") for arch in architectures):
            raise CompressorModelError(
                f"{name!r} is not a token classifier (architectures: {architectures or 'none recorded'}); "
                "prompt compression needs a 2-label *ForTokenClassification checkpoint, e.g. "
                "microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank"
            )
        loaded = AutoModelForTokenClassification.from_pretrained(name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(name)
        return loaded.eval(), tok, name

    @staticmethod
    def _check_classifier(model: Any) -> None:
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if not type(model).__name__.endswith("ForTokenClassification") and labels is None:
            raise CompressorModelError(f"{type(model).__name__} is not a token classifier")
        if labels != 2:
            raise CompressorModelError(f"the classifier must have 2 labels (drop, keep), it has {labels}")

    def _add_force_aliases(self) -> None:
        # llmlingua's init_llmlingua2: seed 42, add [NEW0]..[NEW99], resize the embeddings. The
        # new rows are sampled, so the seed is what makes them (and the parity) reproducible.
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(42)
            self.tokenizer.add_special_tokens({"additional_special_tokens": list(_NEW_TOKENS)})
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # llmlingua's resize prints a notice on every load
            try:
                self.model.resize_token_embeddings(len(self.tokenizer))
            finally:
                hf_logging.set_verbosity(level)

    def _apply_precision(self) -> None:
        from .runtime import build_runtime

        if self.precision == "fp16" and self.device.type == "cpu":
            warnings.warn("fp16 on the CPU is slow; use precision='int8' there", stacklevel=3)
        self.runtime = build_runtime(self.model, self.precision, self.device)

    # ----------------------------------------------------------------- public API

    def compress(
        self,
        text_or_list: str | Sequence[str],
        rate: float | None = None,
        target_tokens: int | None = None,
        *,
        force_tokens: Sequence[str] = (),
        force_reserve_digit: bool = False,
        drop_consecutive: bool = False,
        chunk_end_tokens: Sequence[str] = (".", "\n"),
        token_to_word: str = "mean",
        context_filter: bool = False,
        context_rate: float | None = None,
        force_context_ids: Sequence[int] = (),
    ) -> CompressionResult:
        """Compress one text or a list of contexts.

        Parameters
        ----------
        text_or_list : str or list of str
            The prompt, or several contexts (compressed together, joined with ``"\\n\\n"``).
        rate : float, optional
            Fraction of tokens to keep, in (0, 1]; 0.33 is about 3x. Default 0.5.
        target_tokens : int, optional
            Token budget for the output; overrides ``rate`` when given.
        force_tokens : sequence of str
            Tokens or phrases always kept (e.g. ``["\\n", ".", "?"]``); at most 100.
        force_reserve_digit : bool
            Always keep tokens holding a digit.
        drop_consecutive : bool
            Drop a repeated force token when no other kept word stands between the repeats.
        chunk_end_tokens : sequence of str
            Where a text longer than the 512-token window may be cut.
        token_to_word : {"mean", "first"}
            How token probabilities become a word probability.
        context_filter : bool
            With several contexts, first drop whole contexts with a low mean keep probability
            (LLMLingua-2's coarse-to-fine mode).
        context_rate : float, optional
            Share of contexts kept by the filter; default ``(rate + 1) / 2`` (or twice the token
            budget with ``target_tokens``), as llmlingua.
        force_context_ids : sequence of int
            Contexts the filter always keeps.

        Returns
        -------
        CompressionResult
        """
        contexts, _ = _as_contexts(text_or_list)
        if rate is None and target_tokens is None:
            rate = 0.5
        rate = 0.5 if rate is None else _check_rate(rate)
        if target_tokens is not None:
            target_tokens = _check_budget(target_tokens, "target_tokens")
        if context_rate is not None:
            context_rate = _check_rate(context_rate)
        if token_to_word not in ("mean", "first"):
            raise ValueError(f"token_to_word must be 'mean' or 'first', got {token_to_word!r}")
        force_tokens = list(force_tokens)
        if len(force_tokens) > _MAX_FORCE_TOKENS:
            raise ValueError(f"at most {_MAX_FORCE_TOKENS} force tokens, got {len(force_tokens)}")
        for item in [*force_tokens, *chunk_end_tokens]:
            if not isinstance(item, str) or not item:
                raise TypeError(f"force and chunk-end tokens must be non-empty strings, got {item!r}")
        options = {
            "force_tokens": force_tokens,
            "force_reserve_digit": bool(force_reserve_digit),
            "drop_consecutive": bool(drop_consecutive),
            "chunk_end_tokens": list(chunk_end_tokens),
            "token_to_word": token_to_word,
        }
        self.last_timings = {"encoder_s": 0.0}
        origin_counts = self.counter.count_batch(contexts)
        if sum(origin_counts) == 0:
            return CompressionResult(
                text="\n\n".join(contexts), texts=list(contexts), origin_tokens=0, compressed_tokens=0,
                counter=self.counter.name,
            )  # fmt: skip
        if self.compat:
            return self._compress_compat(
                contexts, origin_counts, rate, target_tokens, context_filter and len(contexts) > 1,
                context_rate, list(force_context_ids), options,
            )  # fmt: skip
        if self.keep_structure:
            return self._compress_structured(
                contexts, rate, target_tokens, context_filter, context_rate, list(force_context_ids), options
            )
        return self._compress_default(
            contexts, origin_counts, rate, target_tokens, context_filter and len(contexts) > 1,
            context_rate, list(force_context_ids), options,
        )  # fmt: skip

    __call__ = compress

    def clear_cache(self) -> None:
        """Forget the cached word strings, token counts and encodings (they make repeated calls faster)."""
        self._count_cache.clear()
        self._string_cache.clear()
        clear = getattr(self.counter, "clear", None)
        if clear is not None:
            clear()

    def word_probs(self, text: str) -> tuple[list[str], np.ndarray]:
        """The words of ``text`` and their keep probabilities (no force rules)."""
        contexts, _ = _as_contexts(text)
        chunks = self._chunks_default(contexts, [".", "\n"])
        words = self._words(chunks, self._run_encoder(chunks), [], False, "mean", {})
        texts = [text[s:e] for s, e in words.span.tolist()] if words.span is not None else []
        return texts, words.probs_raw.copy()

    # ----------------------------------------------------------------- encoder

    def _run_encoder(self, chunks: list[_Chunk]) -> list[np.ndarray]:
        """P(keep) per input position of every chunk (float32, special tokens included)."""
        import time

        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(chunks)
        if not chunks:
            return out
        start = time.perf_counter()
        if self.compat:
            # llmlingua: chunks in order, batches of max_batch_size, every row padded to 512.
            pad = self.tokenizer.convert_tokens_to_ids("[PAD]")
            order = list(range(len(chunks)))
            batches = [order[i : i + self.max_batch_size] for i in range(0, len(order), self.max_batch_size)]
            width = lambda rows: self.max_seq_len  # noqa: E731
        else:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].ids))
            batches, current = [], []
            for i in order:
                if current and (
                    len(current) >= self.max_batch_size
                    or (len(current) + 1) * len(chunks[current[0]].ids) > _BATCH_TOKENS
                ):
                    batches.append(current)
                    current = []
                current.append(i)
            if current:
                batches.append(current)
            width = lambda rows: max(len(chunks[i].ids) for i in rows)  # noqa: E731
        for rows in batches:
            w = width(rows)
            ids = np.full((len(rows), w), pad, dtype=np.int64)
            mask = np.zeros((len(rows), w), dtype=bool)
            for r, i in enumerate(rows):
                n = len(chunks[i].ids)
                ids[r, :n] = chunks[i].ids
                mask[r, :n] = True
            if self.compat:
                # llmlingua masks by token string: a literal "[PAD]" in the text is masked too.
                mask &= self.tables.tokens[ids] != "[PAD]"
            probs = self.runtime(ids, mask)
            for r, i in enumerate(rows):
                n = len(chunks[i].ids)
                row = probs[r, :n]
                out[i] = row[mask[r, :n]] if self.compat else row
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_timings["encoder_s"] = self.last_timings.get("encoder_s", 0.0) + time.perf_counter() - start
        return out

    # ----------------------------------------------------------------- chunking

    def _chunk_bounds(self, ids: np.ndarray, end_ids: np.ndarray, max_len: int) -> list[tuple[int, int]]:
        """llmlingua's ``__chunk_context`` cut points on token ids: [(start, stop), ...].

        With ``max_len = 510`` this is llmlingua's rule, which can cut 511 tokens (the window
        then truncates the last one's [SEP]); the default mode passes 509 to stay inside.
        """
        n = len(ids)
        ends = np.flatnonzero(np.isin(ids, end_ids)) if end_ids.size else np.empty(0, np.int64)
        bounds = []
        st = 0
        while st < n:
            if st + max_len > n - 1:
                bounds.append((st, n))
                break
            ed = st + max_len
            k = np.searchsorted(ends, ed, side="right") - 1
            if k >= 0 and ends[k] >= st + 1:
                ed = int(ends[k])
            bounds.append((st, ed + 1))
            st = ed + 1
        return bounds

    def _encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and ``(n, 2)`` character offsets of each text, without special tokens."""
        self._ids_batch([])  # builds the private backend copy
        if self._backend:
            encoded = self._backend.encode_batch(texts, add_special_tokens=False)
            return [
                (np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in encoded
            ]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [
            (np.asarray(i, dtype=np.int64), np.asarray(o, dtype=np.int64).reshape(-1, 2))
            for i, o in zip(enc["input_ids"], enc["offset_mapping"])
        ]

    def _ids_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens; the Rust tokenizer's offset-free batch call when there is one."""
        if self._backend is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            self._backend = False
            if backend is not None and hasattr(backend, "encode_batch_fast"):
                from tokenizers import Tokenizer

                # a private copy: the saved tokenizer may carry truncation/padding settings
                self._backend = Tokenizer.from_str(backend.to_str())
                self._backend.no_truncation()
                self._backend.no_padding()
        if not texts:
            return []
        if self._backend:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _chunks_compat(self, contexts: list[str], chunk_end_tokens: list[str]) -> list[_Chunk]:
        tok = self.tokenizer
        end_ids = self.tables.ids_with_token(chunk_end_tokens)
        # llmlingua's TokenClfDataset always uses mBERT's strings (issue #181).
        cls_id, sep_id = tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
        chunk_texts: list[tuple[int, str]] = []
        encoded = self._ids_batch(contexts)
        for c, ids in enumerate(encoded):
            ids = np.asarray(ids, dtype=np.int64)
            for a, b in self._chunk_bounds(ids, end_ids, self.max_seq_len - 2):
                chunk_texts.append((c, tok.convert_tokens_to_string(self.tables.tokens[ids[a:b]].tolist())))
        chunks = []
        if not chunk_texts:
            return chunks
        re_ids = self._ids_batch([t for _, t in chunk_texts])
        for (c, _), ids in zip(chunk_texts, re_ids):
            full = np.asarray([cls_id, *ids, sep_id], dtype=np.int64)[: self.max_seq_len]
            chunks.append(_Chunk(c, full, full, None))
        self._chunk_strings = [t for _, t in chunk_texts]
        return chunks

    def _chunks_default(self, contexts: list[str], chunk_end_tokens: list[str]) -> list[_Chunk]:
        tok = self.tokenizer
        end_ids = self.tables.ids_with_token(chunk_end_tokens)
        first = [tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id]
        last = [tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id]
        first = [i for i in first if i is not None]
        last = [i for i in last if i is not None]
        pieces: list[tuple[int, int, str]] = []
        for c, text in enumerate(contexts):
            for base, piece in _split_long(text, _PIECE_CHARS):
                pieces.append((c, base, piece))
        chunks: list[_Chunk] = []
        if not pieces:
            return chunks
        # Long texts go to the Rust tokenizer in pieces cut at whitespace, so it can use both
        # cores; a context's pieces are joined again before chunking (as if tokenised whole).
        per_context: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for (c, base, _), (ids, offsets) in zip(pieces, self._encode_with_offsets([p for _, _, p in pieces])):
            got = per_context.setdefault(c, ([], []))
            got[0].append(ids)
            got[1].append(offsets + base)
        room = self.max_seq_len - len(first) - len(last) - 1
        for c in range(len(contexts)):
            if c not in per_context:
                continue
            ids = np.concatenate(per_context[c][0])
            offs = np.concatenate(per_context[c][1])
            for a, b in self._chunk_bounds(ids, end_ids, room):
                full = np.concatenate([first, ids[a:b], last]).astype(np.int64)
                full_offsets = np.full((len(full), 2), -1, dtype=np.int64)
                full_offsets[len(first) : len(first) + b - a] = offs[a:b]
                chunks.append(_Chunk(c, full, ids[a:b], full_offsets))
        return chunks

    # ----------------------------------------------------------------- words

    def _force_tables(
        self, force_tokens: list[str], token_map: dict[str, str]
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Ids that start a word because they are forced, ids whose probability is forced to 1,
        and the original string of every ``[NEWi]`` alias in use."""
        forced = set(force_tokens) | set(token_map.values())
        prob_ids = self.tables.ids_with_pure(forced)
        if self.rule == "wordpiece":
            begin_ids = prob_ids
        else:
            begin_ids = self.tables.ids_with_token(forced)
        aliases = {
            self.tables.by_token[new]: orig for orig, new in token_map.items() if new in self.tables.by_token
        }
        return begin_ids, prob_ids, aliases

    def _words(
        self,
        chunks: list[_Chunk],
        probs: list[np.ndarray],
        force_tokens: list[str],
        force_reserve_digit: bool,
        token_to_word: str,
        token_map: dict[str, str],
        forced_spans: np.ndarray | None = None,
    ) -> _Words:
        tables = self.tables
        lengths = np.array([len(p) for p in probs], dtype=np.int64)
        if self.compat:  # the encoder returned the unmasked positions only
            all_ids = [c.ids[tables.tokens[c.ids] != "[PAD]"] for c in chunks]
        else:
            all_ids = [c.ids for c in chunks]
        all_ids = np.concatenate(all_ids) if chunks else np.empty(0, np.int64)
        all_probs = np.concatenate(probs).astype(np.float32) if chunks else np.empty(0, np.float32)
        chunk_of = np.repeat(np.arange(len(chunks)), lengths)
        offsets = None
        if self.compat:
            keep = ~tables.special[all_ids]  # llmlingua skips every special-token string
        else:  # only the window's own [CLS]/[SEP]; an [UNK] in the text is still a word
            offsets = np.concatenate([c.offsets for c in chunks]) if chunks else np.empty((0, 2), np.int64)
            keep = offsets[:, 0] >= 0
            offsets = offsets[keep]
        ids, p, chunk_of = all_ids[keep], all_probs[keep], chunk_of[keep]
        begin_ids, prob_ids, aliases = self._force_tables(force_tokens, token_map)
        begins = tables.begins[ids] | np.isin(ids, begin_ids)
        if ids.size:
            chunk_start = np.ones(len(ids), dtype=bool)
            chunk_start[1:] = chunk_of[1:] != chunk_of[:-1]
            begins |= chunk_start
        starts = np.flatnonzero(begins)
        counts = np.diff(np.append(starts, len(ids)))
        tp = p.copy()
        forced = np.zeros(len(ids), dtype=bool)
        fb = begins & np.isin(ids, prob_ids)
        tp[fb] = 1.0
        forced |= fb
        if force_reserve_digit:
            digit = tables.digit[ids].copy()
            for alias_id, original in aliases.items():
                digit[ids == alias_id] = bool(re.search(r"\d", original))
            tp[digit] = 1.0
            forced |= digit
        if forced_spans is not None and forced_spans.size and offsets is not None:
            hit = _overlaps(offsets, forced_spans)
            tp[hit] = 1.0
            forced |= hit
        if token_to_word == "mean":
            wp = _f32_segment_mean(tp, starts, counts)
            raw = _f32_segment_mean(p, starts, counts)
        else:
            wp, raw = tp[starts].copy(), p[starts].copy()
        python_float = (
            np.logical_and.reduceat(forced, starts) if starts.size else np.zeros(0, bool)
        ) if token_to_word == "mean" else forced[starts]  # fmt: skip
        span = None
        if offsets is not None and starts.size:
            span = np.stack([offsets[starts, 0], offsets[starts + counts - 1, 1]], axis=1)
        self._aliases = aliases
        return _Words(chunk_of[starts] if starts.size else np.empty(0, np.int64), wp, raw, python_float,
                      starts, counts, ids, span)  # fmt: skip

    def _word_keys(self, words: _Words) -> tuple[np.ndarray, list[str]]:
        """Unique words by their token ids: (index into the unique list per word, unique strings)."""
        n = len(words.token_start)
        if n == 0:
            return np.empty(0, np.int64), []
        width = 8
        short = words.token_count <= width
        matrix = np.full((n, width), -1, dtype=np.int64)
        for k in range(width):
            rows = np.flatnonzero(short & (words.token_count > k))
            matrix[rows, k] = words.ids[words.token_start[rows] + k]
        long_rows = np.flatnonzero(~short)
        # long words (rare): a unique negative marker per word keeps them apart
        matrix[long_rows, 0] = -2 - np.arange(long_rows.size)
        keys = np.ascontiguousarray(matrix).view(np.dtype((np.void, 8 * width))).ravel()
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        strings = []
        tokens, pure = self.tables.tokens, self.tables.pure
        aliases = self._aliases
        for key, w in zip(uniq.tolist(), first.tolist()):
            cached = self._string_cache.get(key) if not aliases else None
            if cached is not None:
                strings.append(cached)
                continue
            s0 = int(words.token_start[w])
            ids = words.ids[s0 : s0 + int(words.token_count[w])].tolist()
            head = aliases.get(ids[0])
            head = tokens[ids[0]] if head is None else head
            string = head + "".join(pure[ids[1:]].tolist()) if len(ids) > 1 else head
            if not aliases and len(ids) <= width:
                self._string_cache[key] = string
            strings.append(string)
        if len(self._string_cache) > 500_000:
            self._string_cache.clear()
        return inverse.ravel(), strings

    def _counts(self, strings: list[str]) -> np.ndarray:
        cache = self._count_cache
        missing = list(dict.fromkeys(s for s in strings if s not in cache))
        if missing:
            for s, n in zip(missing, self.counter.count_batch(missing)):
                cache[s] = n
            if len(cache) > 500_000:
                cache.clear()
                return np.array(self.counter.count_batch(strings), dtype=np.int64)
        return np.array([cache[s] for s in strings], dtype=np.int64)

    # ----------------------------------------------------------------- compat mode

    def _token_map(self, force_tokens: list[str]) -> dict[str, str]:
        return {t: _NEW_TOKENS[i] for i, t in enumerate(force_tokens) if len(self.tokenizer.tokenize(t)) != 1}

    def _compress_compat(
        self,
        contexts: list[str],
        origin_counts: list[int],
        rate: float,
        target_tokens: int | None,
        context_filter: bool,
        context_rate: float | None,
        force_context_ids: list[int],
        options: dict[str, Any],
    ) -> CompressionResult:
        force_tokens = options["force_tokens"]
        token_map = self._token_map(force_tokens)
        chunk_end = list(options["chunk_end_tokens"])
        chunk_end += [token_map[c] for c in chunk_end if c in token_map]
        replaced = []
        for text in contexts:
            for original, alias in token_map.items():
                text = text.replace(original, alias)
            replaced.append(text)
        n_original = sum(origin_counts)
        chunks = self._chunks_compat(replaced, chunk_end)
        chunk_strings = self._chunk_strings if chunks else []
        nothing_to_drop = (rate >= 1.0) if target_tokens is None else (target_tokens >= n_original)
        if nothing_to_drop and not context_filter:
            # llmlingua skips the encoder here too; only the word list is needed
            probs = [np.zeros(int((self.tables.tokens[c.ids] != "[PAD]").sum()), np.float32) for c in chunks]
        else:
            probs = self._run_encoder(chunks)
        words = self._words(
            chunks, probs, force_tokens, options["force_reserve_digit"], options["token_to_word"], token_map
        )
        keys, strings = self._word_keys(words)
        kept_contexts = list(range(len(contexts)))
        if context_filter:
            target = target_tokens if target_tokens is not None else -1
            level_rate = 1.0 if context_rate is None else context_rate
            if context_rate is None:
                if target < 0 and rate < 1.0:
                    level_rate = (rate + 1.0) / 2
                if target >= 0:
                    level_rate = min(target * 2 / n_original, 1.0)
            scores = []
            for c in range(len(contexts)):
                in_c = np.flatnonzero(np.array([chunks[k].context == c for k in words.chunk.tolist()], bool))
                values = words.probs_raw[in_c]
                # sum(list of float32) / len: a float32 running sum
                total = np.cumsum(values, dtype=np.float32)[-1] if values.size else np.float32(0)
                scores.append(np.float32(total / np.float32(len(values))) if values.size else np.float32(0))
            threshold = np.percentile(np.array(scores, dtype=np.float32), int(100 * (1 - level_rate)))
            kept_contexts = [c for c, s in enumerate(scores) if s >= threshold or c in force_context_ids]
            reserved_tokens = sum(
                self.counter.count_batch(
                    [s for k, s in enumerate(chunk_strings) if chunks[k].context in kept_contexts]
                )
            )
            if target_tokens is not None:
                rate = min(target_tokens / reserved_tokens, 1.0)
        elif target_tokens is not None:
            rate = min(target_tokens / n_original, 1.0)
        reduce_rate = max(0.0, 1.0 - rate)
        texts = [""] * len(contexts)
        labels = np.zeros(len(words.probs), dtype=np.int64)
        word_chunk = words.chunk
        if reduce_rate <= 0:
            out_words: list[str] = []
            for c in kept_contexts:
                restored = []
                for k, chunk in enumerate(chunks):
                    if chunk.context == c:
                        s = chunk_strings[k]
                        for original, alias in token_map.items():
                            s = s.replace(alias, original)
                        restored.append(s)
                texts[c] = "".join(restored)
                out_words.extend(_SPLIT_WORDS.findall(texts[c]))
            return self._result(texts, kept_contexts, n_original, out_words, [1] * len(out_words))
        ntok = self._counts(strings)[keys]
        is_force_word = np.isin(np.array(strings, dtype=object), np.array(force_tokens, dtype=object))[keys] if (
            force_tokens and strings
        ) else np.zeros(len(keys), bool)  # fmt: skip
        chunk_texts: list[str] = [""] * len(chunks)
        wp = words.probs.copy()
        pyf = words.python_float.copy()
        bounds = np.searchsorted(word_chunk, np.arange(len(chunks) + 1))
        kept_set = set(kept_contexts)
        for k in range(len(chunks)):
            if chunks[k].context not in kept_set:
                continue
            a, b = int(bounds[k]), int(bounds[k + 1])
            if a == b:
                continue
            cp, cf = wp[a:b], pyf[a:b]
            if options["drop_consecutive"]:
                t_dc = _llmlingua_percentile(cp, cf, int(100 * reduce_rate))
                zero = _consecutive_repeats(keys[a:b], is_force_word[a:b], cp > t_dc)
                cp[zero] = 0.0
                cf[zero] = True
            expanded = np.repeat(cp, ntok[a:b])
            if expanded.size == 0:
                continue
            threshold = _llmlingua_percentile(expanded, np.repeat(cf, ntok[a:b]), int(100 * reduce_rate + 1))
            cp64 = cp.astype(np.float64)
            keep = (cp64 > threshold) | ((threshold == 1.0) & (cp64 == threshold))
            if options["drop_consecutive"]:
                keep &= ~_repeat_after_kept(keys[a:b], is_force_word[a:b], keep)
            labels[a:b] = keep
            kept_strings = [strings[i] for i in keys[a:b][keep].tolist()]
            chunk_texts[k] = self.tokenizer.convert_tokens_to_string(kept_strings) if kept_strings else ""
        for c in kept_contexts:
            texts[c] = "".join(chunk_texts[k] for k in range(len(chunks)) if chunks[k].context == c)
        # every word of every context; those of contexts the filter removed are labelled 0
        word_strings = [strings[i] for i in keys.tolist()]
        if self.rule == "sentencepiece":
            word_strings = [w.lstrip("▁") for w in word_strings]
        return self._result(texts, kept_contexts, n_original, word_strings, labels.tolist())

    def _result(
        self, texts: list[str], kept: list[int], n_original: int, words: list[str], labels: list[int]
    ) -> CompressionResult:
        out = [texts[c] for c in kept]
        compressed = sum(self.counter.count_batch(out))
        return CompressionResult(
            text="\n\n".join(out), texts=texts, origin_tokens=n_original, compressed_tokens=compressed,
            words=words, labels=[int(x) for x in labels] if labels and not isinstance(labels[0], int) else list(labels),
            counter=self.counter.name,
            info={"kept_contexts": kept, "encoder_s": self.last_timings.get("encoder_s", 0.0)},
        )  # fmt: skip

    # ----------------------------------------------------------------- default mode

    def _compress_structured(
        self,
        contexts: list[str],
        rate: float,
        target_tokens: int | None,
        context_filter: bool,
        context_rate: float | None,
        force_context_ids: list[int],
        options: dict[str, Any],
    ) -> CompressionResult:
        from .structure import compress_structured_batch, split_protected

        protected = [seg.text for text in contexts for seg in split_protected(text) if seg.protected]
        if not protected or (context_filter and len(contexts) > 1):
            # nothing to keep verbatim (or whole contexts are being filtered): plain path
            return self._compress_default(
                contexts, self.counter.count_batch(contexts), rate, target_tokens,
                context_filter and len(contexts) > 1, context_rate, force_context_ids, options,
            )  # fmt: skip
        # The prose pieces of all contexts are compressed together, under one budget; code,
        # JSON and headings are kept verbatim and, with target_tokens, paid for first.
        protected_tokens = sum(self.counter.count_batch(protected))
        # what the output costs with every prose piece empty: protected blocks + their line breaks
        # (each prose piece then splits a run of line breaks in two: about one token more)
        skeleton, layout = compress_structured_batch(contexts, lambda pieces: [""] * len(pieces))
        skeleton_tokens = sum(self.counter.count_batch(skeleton)) + int(layout.get("prose_segments", 0))
        inner: list[CompressionResult] = []

        def compress_prose(pieces: list[str]) -> list[str]:
            budget = None if target_tokens is None else max(1, target_tokens - skeleton_tokens)
            result = self._compress_default(
                pieces, self.counter.count_batch(pieces), rate, budget, False, None, [], options
            )
            inner.append(result)
            return result.texts

        texts, _ = compress_structured_batch(contexts, compress_prose)
        words = inner[0].words if inner else []
        labels = inner[0].labels if inner else []
        result = self._result(
            texts, list(range(len(contexts))), sum(self.counter.count_batch(contexts)), words, labels
        )
        result.info["protected_tokens"] = protected_tokens
        if inner and "units" in inner[0].info:
            result.info["units"] = inner[0].info["units"]
        return result

    def _compress_default(
        self,
        contexts: list[str],
        origin_counts: list[int],
        rate: float,
        target_tokens: int | None,
        context_filter: bool,
        context_rate: float | None,
        force_context_ids: list[int],
        options: dict[str, Any],
    ) -> CompressionResult:
        force_tokens = options["force_tokens"]
        single = [t for t in force_tokens if len(self.tokenizer.tokenize(t)) == 1]
        multi = [t for t in force_tokens if t not in single and t.strip()]
        chunks = self._chunks_default(contexts, options["chunk_end_tokens"])
        probs = self._run_encoder(chunks)
        self._aliases = {}
        forced_spans = [_find_spans(text, multi) for text in contexts] if multi else None
        words = self._words(
            chunks, probs, single, options["force_reserve_digit"], options["token_to_word"], {}
        )
        if forced_spans is not None and words.span is not None:
            ctx_of_word = np.array([chunks[k].context for k in words.chunk.tolist()], dtype=np.int64)
            for c, spans in enumerate(forced_spans):
                if spans.size:
                    sel = np.flatnonzero(ctx_of_word == c)
                    hit = _overlaps(words.span[sel], spans)
                    words.probs[sel[hit]] = 1.0
        ctx_of_chunk = np.array([c.context for c in chunks], dtype=np.int64)
        unit_info = {"found": 0, "kept": 0}
        unit_of = np.empty(0, np.int64)
        if self._unit_pattern is not None and len(words.probs):
            words, unit_of = self._merge_units(words, ctx_of_chunk[words.chunk], contexts)
            unit_info["found"] = int((unit_of >= 0).sum())
        n_words = len(words.probs)
        word_ctx = ctx_of_chunk[words.chunk] if n_words else np.empty(0, np.int64)
        n_original = sum(origin_counts)
        kept_contexts = list(range(len(contexts)))
        if context_filter:
            level_rate = context_rate
            if level_rate is None:
                level_rate = min(2 * target_tokens / n_original, 1.0) if target_tokens else (rate + 1.0) / 2
            sums = np.bincount(word_ctx, weights=words.probs_raw, minlength=len(contexts))
            sizes = np.bincount(word_ctx, minlength=len(contexts))
            scores = np.where(sizes > 0, sums / np.maximum(sizes, 1), 0.0)
            threshold = np.percentile(scores, int(100 * (1 - level_rate)))
            kept_contexts = [
                c for c in range(len(contexts)) if scores[c] >= threshold or c in force_context_ids
            ]
        budget = float(target_tokens) if target_tokens is not None else rate * n_original
        in_kept = np.isin(word_ctx, kept_contexts)
        texts_by_ctx = contexts
        word_text = [texts_by_ctx[c][s:e] for c, (s, e) in zip(word_ctx.tolist(), words.span.tolist())] if (
            n_words
        ) else []  # fmt: skip
        keep_newlines = "\n" in force_tokens
        index = [_TextIndex.of(text) for text in contexts]
        newline_before = (
            _newline_before(index, word_ctx, words.span, keep_newlines) if n_words else np.zeros(0, bool)
        )
        cost = self._word_costs(contexts, word_ctx, words.span, word_text, newline_before)
        candidates = np.flatnonzero(in_kept)
        is_force_word = np.zeros(n_words, dtype=bool)
        if force_tokens and n_words:
            fset = set(force_tokens)
            is_force_word = np.array([w in fset for w in word_text], dtype=bool)
        mark = _single_char_codes(index, word_ctx, words.span) if n_words else np.zeros(0, np.uint32)
        pairs = _paired_marks(mark, word_ctx, index, words.span) if n_words else []
        punct = np.isin(mark, _JOINING_CODES)
        after = np.isin(mark, _AFTER_CODES)
        target_mode = target_tokens is not None
        goal = float(target_tokens) if target_mode else rate * n_original
        # Word costs are counted word by word, but the joined text tokenises a little
        # differently: measure the real count and rescale the budget, keeping the best pick
        # (the closest to the goal; with target_tokens, the closest that does not exceed it).
        best: tuple[float, np.ndarray, list[str]] | None = None
        for attempt in range(8):
            if attempt >= 5 and (not target_mode or best is None or best[0] <= n_original):
                break  # the extra attempts only serve a target that is still exceeded
            keep = np.zeros(n_words, dtype=bool)
            keep[_select(words.probs, cost, candidates, budget, target_mode)] = True
            if options["drop_consecutive"]:
                keep &= ~_repeat_after_kept(np.asarray(word_text, dtype=object), is_force_word, keep)
            _tidy(keep, words.probs >= 1.0, pairs, punct, after, word_ctx)
            texts = _rebuild(contexts, word_ctx, words.span, keep, kept_contexts, keep_newlines, index)
            got = sum(self.counter.count_batch([texts[c] for c in kept_contexts]))
            miss = abs(got - goal) if not target_mode or got <= goal else n_original + got
            if best is None or miss < best[0]:
                best = (miss, keep, texts)
            if (
                got == 0
                or abs(got - goal) <= max(1.0, 0.005 * n_original)
                and (not target_mode or got <= goal)
            ):
                break
            if target_mode and got > goal:
                # over a hard budget: shrink by at least the excess (ratios stall on tiny budgets)
                budget = min(budget * goal / got, budget - (got - goal))
            else:
                budget = budget * goal / got if got else budget
        _, keep, texts = best
        result = self._result(texts, kept_contexts, n_original, word_text, keep.astype(int).tolist())
        if unit_of.size:
            unit_info["kept"] = int((keep & (unit_of >= 0)).sum())
        result.info["units"] = unit_info
        return result

    def _word_costs(
        self,
        contexts: list[str],
        word_ctx: np.ndarray,
        span: np.ndarray | None,
        word_text: list[str],
        newline_before: np.ndarray,
    ) -> np.ndarray:
        """Tokens each word costs in the output budget.

        With a counter that reports token offsets (cl100k, fast HF tokenizers) a word costs the
        tokens of the whole text that end after its start and no later than the next word's
        start: its tokens in context, leading space and following punctuation or line breaks
        included, from one tokenisation of the text. Otherwise each distinct word is counted
        alone (plus one token for a line break before it).
        """
        if not len(word_text):
            return np.zeros(0, np.int64)
        token_ends = getattr(self.counter, "token_ends", None)
        if token_ends is None or span is None or token_ends("") is None:
            return self._counts(word_text) + newline_before.astype(np.int64)
        cost = np.zeros(len(word_text), dtype=np.int64)
        bounds = np.searchsorted(word_ctx, np.arange(len(contexts) + 1))
        for c, text in enumerate(contexts):
            a, b = int(bounds[c]), int(bounds[c + 1])
            if a == b:
                continue
            ends = token_ends(text)
            starts = span[a:b, 0]
            limits = np.append(starts[1:], len(text))
            cost[a:b] = np.searchsorted(ends, limits, side="right") - np.searchsorted(
                ends, starts, side="right"
            )
        # a word inside a neighbour's token ("'" of "don't") costs a token of its own when kept alone
        return np.maximum(cost, 1)

    def _merge_units(
        self, words: _Words, word_ctx: np.ndarray, contexts: list[str]
    ) -> tuple[_Words, np.ndarray]:
        """Merge the words inside each atomic unit (:mod:`.units`) into one word.

        A unit's probability is the largest of its words' (a fact matters if any part of it
        does; the classifier tends to score digits high and their separators low), forced
        when any of its words is forced; its span covers its words. Returns the merged words
        and, per merged word, its unit number (``-1`` for ordinary words).
        """
        from .units import find_units

        span = words.span
        uid = np.full(len(word_ctx), -1, dtype=np.int64)
        next_id = 0
        for c, text in enumerate(contexts):
            units, _ = find_units(text, self._unit_pattern)
            if not len(units):
                continue
            sel = np.flatnonzero(word_ctx == c)
            ws, we = span[sel, 0], span[sel, 1]
            k = np.searchsorted(units[:, 0], ws, side="right") - 1
            inside = (k >= 0) & (units[np.maximum(k, 0), 1] > ws)
            # a word that starts before a unit and runs into it belongs to that unit too
            k2 = np.minimum(k + 1, len(units) - 1)
            into = ~inside & (k + 1 < len(units)) & (units[k2, 0] < we)
            k = np.where(into, k2, k)
            member = inside | into
            uid[sel[member]] = k[member] + next_id
            next_id += len(units)
        if next_id == 0:
            return words, uid
        n = len(uid)
        new = np.ones(n, dtype=bool)
        new[1:] = ~((uid[1:] == uid[:-1]) & (uid[1:] >= 0))
        starts = np.flatnonzero(new)
        forced = np.maximum.reduceat((words.probs >= 1.0).astype(np.int8), starts).astype(bool)
        probs = np.maximum.reduceat(words.probs, starts).astype(np.float32)
        probs[forced] = 1.0
        raw = np.maximum.reduceat(words.probs_raw, starts).astype(np.float32)
        merged = _Words(
            chunk=words.chunk[starts],
            probs=probs,
            probs_raw=raw,
            python_float=words.python_float[starts],
            token_start=words.token_start[starts],
            token_count=np.add.reduceat(words.token_count, starts),
            ids=words.ids,
            span=np.stack([span[starts, 0], np.maximum.reduceat(span[:, 1], starts)], axis=1),
        )
        return merged, uid[starts]


# --------------------------------------------------------------------- helpers


def _split_long(text: str, limit: int) -> list[tuple[int, str]]:
    """Cut ``text`` into pieces of at most ``limit`` characters at line breaks or spaces."""
    if len(text) <= limit:
        return [(0, text)]
    pieces, start = [], 0
    while start < len(text):
        stop = min(start + limit, len(text))
        if stop < len(text):
            cut = text.rfind("\n", start + limit // 2, stop)
            if cut < 0:
                cut = text.rfind(" ", start + limit // 2, stop)
            if cut >= 0:
                stop = cut + 1
        pieces.append((start, text[start:stop]))
        start = stop
    return pieces


def _find_spans(text: str, phrases: list[str]) -> np.ndarray:
    if not phrases:
        return np.empty((0, 2), np.int64)
    pattern = re.compile("|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)))
    spans = [(m.start(), m.end()) for m in pattern.finditer(text)]
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def _overlaps(spans: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Which ``spans`` (n, 2) overlap any of the sorted, disjoint ``targets`` (m, 2)."""
    if targets.size == 0 or spans.size == 0:
        return np.zeros(len(spans), dtype=bool)
    k = np.searchsorted(targets[:, 0], spans[:, 1], side="left") - 1
    ok = k >= 0
    hit = np.zeros(len(spans), dtype=bool)
    hit[ok] = targets[k[ok], 1] > spans[ok, 0]
    return hit & (spans[:, 0] >= 0)


def _consecutive_repeats(keys: np.ndarray, is_force: np.ndarray, high: np.ndarray) -> np.ndarray:
    """llmlingua's drop_consecutive pre-pass: a force word equal to the previous force word with
    no high-probability non-force word in between gets probability 0."""
    positions = np.flatnonzero(is_force)
    zero = np.zeros(len(keys), dtype=bool)
    if positions.size < 2:
        return zero
    high_other = np.cumsum(high & ~is_force)
    prev, cur = positions[:-1], positions[1:]
    between = high_other[cur] - high_other[prev] > 0
    zero[cur[(~between) & (keys[cur] == keys[prev])]] = True
    return zero


def _repeat_after_kept(keys: np.ndarray, is_force: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A kept force word equal to the previous kept word is dropped (llmlingua's second rule)."""
    kept = np.flatnonzero(keep)
    drop = np.zeros(len(keys), dtype=bool)
    if kept.size < 2:
        return drop
    cur, prev = kept[1:], kept[:-1]
    drop[cur[is_force[cur] & (keys[cur] == keys[prev])]] = True
    return drop


def _select(
    probs: np.ndarray, cost: np.ndarray, candidates: np.ndarray, budget: float, target_mode: bool
) -> np.ndarray:
    """Words to keep: the most probable first (ties by position) until the budget is spent."""
    if candidates.size == 0:
        return candidates
    order = candidates[np.lexsort((candidates, -probs[candidates].astype(np.float64)))]
    forced = probs[order] >= 1.0
    spent = np.cumsum(cost[order])
    k = int(np.searchsorted(spent, budget, side="right"))
    if not target_mode and k < len(order):
        below = spent[k - 1] if k > 0 else 0
        if abs(spent[k] - budget) < abs(budget - below):
            k += 1
    chosen = order[:k]
    rest = order[k:]
    extra = rest[forced[k:]]  # force tokens are kept even past the budget
    # The next word did not fit (with atomic units it may be a long URL or table of figures):
    # later, cheaper words may still fit in what is left, so take them in the same order.
    left = budget - (spent[k - 1] if k > 0 else 0) - cost[extra].sum()
    if left > 0 and rest.size:
        fits = rest[~forced[k:] & (cost[rest] <= left)]
        if fits.size:
            spent_fits = np.cumsum(cost[fits])
            if spent_fits[-1] <= left:
                more = fits
            else:
                picked = []
                for i, c in zip(fits.tolist(), cost[fits].tolist()):
                    if c <= left:
                        picked.append(i)
                        left -= c
                        if left <= 0:
                            break
                more = np.array(picked, dtype=np.int64)
            extra = np.concatenate([extra, more])
    return np.concatenate([chosen, extra]) if extra.size else chosen


# Punctuation that reads wrong when it follows other punctuation (or opens a text) after the
# words between them were dropped: "a, , b", "(, b", ". ; c".
_JOINING_CODES = np.array([ord(ch) for ch in ",;:.、，。；："], np.uint32)
_AFTER_CODES = np.array([ord(ch) for ch in ",;:.!?([{、，。；：！？"], np.uint32)
_OPENERS = {ord(o): ord(c) for o, c in ("()", "[]", "{}", "“”", "‘’", "«»")}
_CLOSERS = {c: o for o, c in _OPENERS.items()}
_SYMMETRIC = (ord('"'), ord("`"))
_MARK_CODES = np.array([*_OPENERS, *_CLOSERS, *_SYMMETRIC], np.uint32)


def _single_char_codes(index: list[_TextIndex], word_ctx: np.ndarray, span: np.ndarray) -> np.ndarray:
    """The code point of every one-character word, 0 for longer words."""
    out = np.zeros(len(word_ctx), dtype=np.uint32)
    single = span[:, 1] - span[:, 0] == 1
    for c, ix in enumerate(index):
        sel = np.flatnonzero(single & (word_ctx == c))
        if sel.size:
            out[sel] = ix.codes[span[sel, 0]]
    return out


def _paired_marks(
    mark: np.ndarray, word_ctx: np.ndarray, index: list[_TextIndex], span: np.ndarray
) -> list[tuple[int, int]]:
    """Pairs ``(open, close)`` of word indices that are matching brackets or quotes, innermost first.

    Brackets match by nesting; straight double quotes and backticks pair in order within a
    paragraph. Marks without a partner in the original are left out (they were orphans before).
    """
    pairs: list[tuple[int, int]] = []
    stack: list[int] = []
    open_sym: dict[int, int] = {}
    last_ctx = -1
    candidates = np.flatnonzero(np.isin(mark, _MARK_CODES))
    for i, code, c in zip(candidates.tolist(), mark[candidates].tolist(), word_ctx[candidates].tolist()):
        if c != last_ctx:
            stack, open_sym, last_ctx = [], {}, c
        if code in _SYMMETRIC:
            j = open_sym.pop(code, None)
            para = index[c].para
            if j is not None and para[span[i, 0]] == para[span[j, 1]]:
                pairs.append((j, i))
            else:
                open_sym[code] = i
        elif code in _OPENERS:
            stack.append(i)
        else:
            want = _CLOSERS[code]
            for depth in range(len(stack) - 1, -1, -1):
                if int(mark[stack[depth]]) == want:
                    pairs.append((stack[depth], i))
                    del stack[depth:]
                    break
    pairs.sort(key=lambda p: p[1] - p[0])
    return pairs


def _tidy(
    keep: np.ndarray,
    forced: np.ndarray,
    pairs: list[tuple[int, int]],
    punct: np.ndarray,
    after: np.ndarray,
    word_ctx: np.ndarray,
) -> None:
    """Make the kept words readable, in place: no orphaned bracket, quote or backtick (a pair is
    kept with something between its marks, or dropped), and no comma/period/colon left right
    after other punctuation or at the start of a text once the words between were dropped.
    Forced words stay kept (their partner is then kept too)."""
    for o, c in pairs:
        if keep[o] != keep[c]:
            if forced[o] or forced[c]:
                keep[o] = keep[c] = True
            else:
                keep[o] = keep[c] = False
        elif keep[o] and not keep[o + 1 : c].any() and not (forced[o] or forced[c]):
            keep[o] = keep[c] = False
    kept = np.flatnonzero(keep)
    candidates = np.flatnonzero(keep & punct & ~forced)
    if candidates.size == 0:
        return
    position = np.searchsorted(kept, candidates)
    dropped: set[int] = set()
    for i, pos in zip(candidates.tolist(), position.tolist()):
        while pos > 0 and int(kept[pos - 1]) in dropped:
            pos -= 1
        if pos == 0 or word_ctx[kept[pos - 1]] != word_ctx[i]:
            dropped.add(i)  # the text would open with it
        elif int(kept[pos - 1]) < i - 1 and after[kept[pos - 1]]:
            dropped.add(i)  # "a, , b": the words between two marks were dropped
    if dropped:
        keep[np.fromiter(dropped, dtype=np.int64)] = False


@dataclass
class _TextIndex:
    """Per-character facts of one context, computed once per compress call.

    ``codes``: code points (uint32); ``nl``, ``ws``, ``para``: running counts (length n + 1) of
    line breaks, whitespace characters and blank-line starts before each position.
    """

    codes: np.ndarray
    nl: np.ndarray
    ws: np.ndarray
    para: np.ndarray

    @classmethod
    def of(cls, text: str) -> _TextIndex:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        zero = np.zeros(1, np.int64)
        nl = np.concatenate([zero, np.cumsum(codes == 10)])
        ws = np.concatenate([zero, np.cumsum(np.isin(codes, _WS_CODES))])
        marks = np.zeros(len(codes) + 1, dtype=np.int64)
        blank = [m.start() for m in _BLANK_LINE.finditer(text)] if nl[-1] >= 2 else []
        if blank:
            marks[np.array(blank, dtype=np.int64) + 1] = 1
        return cls(codes, nl, ws, np.cumsum(marks))


def _newline_before(
    index: list[_TextIndex], word_ctx: np.ndarray, span: np.ndarray, keep_newlines: bool
) -> np.ndarray:
    """Whether the output will put a line break before each word (it costs a token)."""
    out = np.zeros(len(word_ctx), dtype=bool)
    for c, ix in enumerate(index):
        sel = np.flatnonzero(word_ctx == c)
        if sel.size == 0:
            continue
        before = np.concatenate([[0], span[sel[:-1], 1]])
        if keep_newlines:
            out[sel] = ix.nl[span[sel, 0]] - ix.nl[before] >= 1
        else:
            out[sel] = ix.para[span[sel, 0]] - ix.para[before] >= 1
    return out


def _rebuild(
    contexts: list[str],
    word_ctx: np.ndarray,
    span: np.ndarray | None,
    keep: np.ndarray,
    kept_contexts: list[int],
    keep_newlines: bool = False,
    index: list[_TextIndex] | None = None,
) -> list[str]:
    """Cut the kept words out of the original text and join them readably.

    Between two kept words: a paragraph break (``"\\n\\n"``) when the original had a blank line
    between them, a line break when it had one and ``"\\n"`` is a force token, otherwise one
    space where the original had whitespace or words were dropped, and nothing where the
    original had nothing. No space goes before closing punctuation or after an opening bracket
    that the original wrote without one ("(a b)" with ``a`` dropped gives "(b)", not "( b)").
    """
    texts = [""] * len(contexts)
    if span is None:
        return texts
    for c in kept_contexts:
        text = contexts[c]
        sel = np.flatnonzero((word_ctx == c) & keep)
        if sel.size == 0:
            continue
        ix = index[c] if index is not None else _TextIndex.of(text)
        codes = ix.codes
        s, e = span[sel, 0], span[sel, 1]
        ps = np.concatenate([[s[0]], e[:-1]])
        gap_para = ix.para[s] - ix.para[ps]
        gap_nl = ix.nl[s] - ix.nl[ps]
        gap_ws = ix.ws[s] - ix.ws[ps]
        all_ctx = np.flatnonzero(word_ctx == c)
        position = np.searchsorted(all_ctx, sel)
        skipped = np.diff(np.concatenate([[position[0]], position])) > 1
        space = (gap_ws > 0) | skipped
        # whitespace right before this word / right after the previous kept word, in the original
        ws_before = (s > 0) & (ix.ws[s] - ix.ws[np.maximum(s - 1, 0)] > 0)
        ws_after_prev = (ps < len(codes)) & (ix.ws[np.minimum(ps + 1, len(codes))] - ix.ws[ps] > 0)
        first = codes[s]
        last = codes[np.maximum(ps - 1, 0)]
        tight = (np.isin(first, _CLOSING_CODES) & ~ws_before) | (
            np.isin(last, _OPENING_CODES) & ~ws_after_prev
        )
        seps = np.where(
            gap_para > 0,
            "\n\n",
            np.where((gap_nl >= 1) & keep_newlines, "\n", np.where(space & ~tight, " ", "")),
        )
        seps[0] = ""
        texts[c] = "".join([sep + text[a:b] for sep, a, b in zip(seps.tolist(), s.tolist(), e.tolist())])
    return texts
