"""Self-information of words under a causal language model (Selective Context, LLMLingua-1).

The self-information of a token is ``-log p(token | preceding text)`` (in nats). A word's
self-information is the sum over the language-model tokens that overlap it (matched by
character offsets), so a word split into several LM tokens adds up all of them; an LM token
that straddles two words counts for both. The first token of a text is scored after the LM's
document-start token (``<|endoftext|>`` where the vocabulary has it, else BOS / EOS).

Long texts are scored in sliding windows: each window is at most ``window`` LM tokens, and
after the first every window re-reads ``window - stride`` tokens of context before the
``stride`` tokens it scores. Windows of equal length are batched; only the logits of the
scored positions are computed when the model supports ``logits_to_keep``.

This is the teacher of the default compressor (words with the highest self-information are
labelled "keep") and the Selective-Context baseline.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokenlean.errors import TokenleanError

__all__ = [
    "SelfInfoError",
    "spans_information",
    "token_self_information",
    "word_self_information",
    "word_self_information_many",
]

#: Default share of a window that is scored (the rest is re-read context).
DEFAULT_STRIDE_FRACTION = 7 / 8


class SelfInfoError(TokenleanError, ValueError):
    """Bad arguments for self-information scoring."""


def _start_token_id(tokenizer: Any) -> int | None:
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def _check_window(window: int, stride: int | None) -> tuple[int, int]:
    if int(window) < 2:
        raise SelfInfoError(f"window must be >= 2 tokens, got {window}")
    window = int(window)
    stride = max(1, int(window * DEFAULT_STRIDE_FRACTION)) if stride is None else int(stride)
    if not 1 <= stride <= window - 1:
        raise SelfInfoError(f"stride must be in [1, window - 1] = [1, {window - 1}], got {stride}")
    return window, stride


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_target)`` of each window over a sequence of ``n`` ids (targets 1..n-1)."""
    out: list[tuple[int, int, int]] = []
    target = 1
    while target < n:
        if not out:
            start, end = 0, min(window, n)
        else:
            start = max(0, target - (window - stride))
            end = min(target + stride, n)
        out.append((start, end, target))
        target = end
    return out


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_self_information(
    sequences: Sequence[Sequence[int]],
    model: Any,
    start_id: int | None,
    window: int = 1024,
    stride: int | None = None,
    batch_size: int = 2,
    progress: bool = True,
    desc: str = "self-information",
) -> list[np.ndarray]:
    """``-log p`` (nats) of every token of every id sequence, scored in sliding windows.

    Parameters
    ----------
    sequences : sequence of sequences of int
        Token ids of each text (without special tokens).
    model : causal LM
        A Hugging Face ``*ForCausalLM`` (eval mode is set by the caller).
    start_id : int or None
        Id put before each text so its first token is scored too; with None the first token
        gets the mean self-information of the others.
    window, stride : int
        Window length and scored tokens per window after the first (default ``7/8`` of window).
    batch_size : int
        Windows per forward pass (windows of equal length only, so nothing is padded).

    Returns
    -------
    list of float64 arrays
        One array per sequence, one value per token.
    """
    from tqdm.auto import tqdm

    window, stride = _check_window(window, stride)
    if int(batch_size) < 1:
        raise SelfInfoError(f"batch_size must be >= 1, got {batch_size}")
    prefix = [] if start_id is None else [int(start_id)]
    full = [np.asarray(prefix + list(seq), dtype=np.int64) for seq in sequences]
    results = [np.zeros(len(seq), dtype=np.float64) for seq in full]
    jobs = []  # (length, seq index, start, end, first_target)
    for i, ids in enumerate(full):
        for start, end, target in _windows(len(ids), window, stride):
            jobs.append((end - start, i, start, end, target))
    # Equal-length windows together: no padding, one keep-length per batch.
    jobs.sort(key=lambda j: (-j[0], j[1], j[2]))
    batches = []
    for job in jobs:
        if batches and batches[-1][0][0] == job[0] and len(batches[-1]) < batch_size:
            batches[-1].append(job)
        else:
            batches.append([job])
    device = next(model.parameters()).device
    keep_logits = _supports_logits_to_keep(model)
    n_tokens = sum(j[0] for j in jobs)
    with (
        torch.inference_mode(),
        tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar,
    ):
        for batch in batches:
            length = batch[0][0]
            ids = torch.from_numpy(np.stack([full[i][s:e] for _, i, s, e, _ in batch])).to(device)
            # Targets t in [first_target, end) are predicted at positions t-1-start.
            n_keep = max(e - t for _, _, s, e, t in batch) + 1
            kwargs = {"logits_to_keep": n_keep} if keep_logits else {}
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
            offset = length - logits.shape[1]  # position of logits[:, 0] in the window
            for row, (_, i, s, e, t) in enumerate(batch):
                pos = torch.arange(t - 1 - s, e - 1 - s, device=device)
                rows = logits[row, pos - offset].float()
                targets = ids[row, pos + 1]
                logp = rows.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)
                results[i][t:e] = (-logp).double().cpu().numpy()
            bar.update(sum(j[0] for j in batch))
    out = []
    for res in results:
        if prefix:
            out.append(res[1:])
        else:
            if len(res) > 1:
                res[0] = res[1:].mean()
            out.append(res)
    return out


def spans_information(
    token_offsets: np.ndarray, token_info: np.ndarray, word_spans: np.ndarray
) -> np.ndarray:
    """Sum ``token_info`` over the tokens whose character span overlaps each word span.

    ``token_offsets`` is an ``(n_tokens, 2)`` array of ``(start, end)`` in text order;
    ``word_spans`` an ``(n_words, 2)`` array. A word overlapped by no token scores 0.
    """
    offsets = np.asarray(token_offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(word_spans, dtype=np.int64).reshape(-1, 2)
    info = np.asarray(token_info, dtype=np.float64)
    if len(spans) == 0:
        return np.zeros(0, dtype=np.float64)
    if len(offsets) == 0:
        return np.zeros(len(spans), dtype=np.float64)
    starts = np.maximum.accumulate(offsets[:, 0])
    ends = np.maximum.accumulate(offsets[:, 1])
    # Tokens lo..hi-1 overlap the word: end > word start and start < word end (non-empty tokens).
    lo = np.searchsorted(ends, spans[:, 0], side="right")
    hi = np.searchsorted(starts, spans[:, 1], side="left")
    nonempty = offsets[:, 1] > offsets[:, 0]
    csum = np.concatenate([[0.0], np.cumsum(np.where(nonempty, info, 0.0))])
    hi = np.maximum(hi, lo)
    return csum[hi] - csum[lo]


def _validate_spans(text: str, word_spans: Any) -> np.ndarray:
    spans = np.asarray(word_spans, dtype=np.int64)
    if spans.size == 0:
        return spans.reshape(0, 2)
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise SelfInfoError(f"word_spans must be (start, end) pairs, got an array of shape {spans.shape}")
    if (spans[:, 0] < 0).any() or (spans[:, 1] > len(text)).any() or (spans[:, 1] < spans[:, 0]).any():
        raise SelfInfoError("word_spans must satisfy 0 <= start <= end <= len(text)")
    return spans


def word_self_information_many(
    texts: Sequence[str],
    model: Any,
    tokenizer: Any,
    word_spans: Sequence[Any],
    window: int = 1024,
    stride: int | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> list[np.ndarray]:
    """:func:`word_self_information` for several texts at once (windows batched across texts)."""
    if len(texts) != len(word_spans):
        raise SelfInfoError(f"{len(texts)} texts but {len(word_spans)} word-span lists")
    for t in texts:
        if not isinstance(t, str):
            raise SelfInfoError(f"texts must be str, got {type(t).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise SelfInfoError("self-information needs a fast tokenizer (character offsets)")
    spans = [_validate_spans(t, s) for t, s in zip(texts, word_spans)]
    encs = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True, verbose=False) for t in texts]
    infos = token_self_information(
        [e["input_ids"] for e in encs],
        model,
        _start_token_id(tokenizer),
        window=window,
        stride=stride,
        batch_size=batch_size,
        progress=progress,
    )
    return [
        spans_information(np.asarray(e["offset_mapping"], dtype=np.int64).reshape(-1, 2), info, s)
        for e, info, s in zip(encs, infos, spans)
    ]


def word_self_information(
    text: str,
    model: Any,
    tokenizer: Any,
    word_spans: Any,
    window: int = 1024,
    stride: int | None = None,
    batch_size: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """Self-information (nats) of each word of ``text`` under a causal LM.

    Parameters
    ----------
    text : str
        The text.
    model, tokenizer
        A causal LM and its fast tokenizer (e.g. ``zoo.load("smollm2-135m")``).
    word_spans : array-like of (start, end)
        Character span of each word in ``text``, in text order.
    window : int
        Longest LM window in tokens (default 1024).
    stride : int, optional
        Tokens scored per window after the first; the other ``window - stride`` are re-read
        context (default ``7/8`` of the window, i.e. 896 scored after 128 of context).
    batch_size : int
        Equal-length windows per forward pass.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    numpy.ndarray
        ``float64`` array, one value per word: the sum of ``-log p`` of the LM tokens overlapping it.

    Raises
    ------
    SelfInfoError
        On non-string text, malformed spans or a bad window.
    """
    if not isinstance(text, str):
        raise SelfInfoError(f"text must be str, got {type(text).__name__}")
    return word_self_information_many(
        [text],
        model,
        tokenizer,
        [word_spans],
        window=window,
        stride=stride,
        batch_size=batch_size,
        progress=progress,
    )[0]
