"""Sentence embeddings from a decoder LLM: a prompt, an optional Token Prepending patch, a readout.

:class:`SentenceEncoder` wraps a loaded Hugging Face decoder and its tokenizer::

    model, tokenizer = tokenlean.zoo.load("smollm2-135m")
    encoder = tokenlean.SentenceEncoder(model, tokenizer, prompt="prompteol", token_prepending=True)
    embeddings = encoder.encode(["A man is playing a guitar.", "Someone plays music."])  # (2, 576)

Prompts (``{sentence}`` is the sentence, ``{pst}`` where the Token Prepending placeholder goes):

* ``prompteol``: ``This sentence : "{sentence}" means in one word:"`` (Jiang et al., 2023)
* ``pretended_cot``: ``After thinking step by step , this sentence : ...`` (Zhang et al., 2024)
* ``knowledge``: knowledge enhancement, a sentence on what carries a sentence's meaning first
* ``echo``: the sentence twice, read by mean pooling over the second copy (Springer et al., 2024)
* ``None``: the bare sentence (for the mean-pooling and last-token baselines)

The readout is the hidden state at ``layer`` (an index into the ``num_layers + 1`` hidden
states, 0 = embeddings, -1 = the final normed output; default -2), pooled over the last token
or the tokens of the sentence. The forward stops after the readout layer, and the LM head is
never run. Rows are left-padded with explicit position ids, so a batch gives the same
embeddings as one-by-one encoding up to float rounding.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenlean.adapters import get_adapter
from tokenlean.errors import PatchError
from tokenlean.patching import active_patches, apply_method

from .method import TokenPrepending

__all__ = ["PROMPTS", "SentenceEncoder", "preprocess_sentence"]

logger = logging.getLogger(__name__)

PROMPTS: dict[str, str] = {
    "prompteol": 'This sentence : {pst}"{sentence}" means in one word:"',
    "pretended_cot": 'After thinking step by step , this sentence : {pst}"{sentence}" means in one word:"',
    "knowledge": (
        "The essence of a sentence is often captured by its main subjects and actions, while descriptive "
        "terms provide additional but less central details. With this in mind , this sentence : "
        '{pst}"{sentence}" means in one word:"'
    ),
    "echo": "Rewrite the sentence: {sentence}\nRewritten sentence: {pst}{sentence}",
}

# keyword arguments sentence-transformers / MTEB pass to encode() that do not apply here
_IGNORED_ENCODE_KWARGS = frozenset({"task_name", "prompt_type", "prompt_name", "prompt", "request_qid"})


def preprocess_sentence(sentence: str) -> str:
    """The SentEval batcher of the official code: end with punctuation, ``"`` becomes ``'``.

    A sentence not ending in ``.``, ``?``, ``"`` or ``'`` gets a ``.``; double quotes become
    single quotes (the prompt quotes the sentence); a final ``?`` becomes ``.``.
    """
    sentence = sentence.strip()
    if sentence and sentence[-1] not in ".?\"'":
        sentence += "."
    sentence = sentence.replace('"', "'")
    if sentence.endswith("?"):
        sentence = sentence[:-1] + "."
    return sentence


class _Template:
    """A prompt template split around the (last) ``{sentence}`` slot."""

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or "{sentence}" not in template:
            raise ValueError(f"a prompt template must contain '{{sentence}}', got {template!r}")
        if template.count("{pst}") > 1:
            raise ValueError(f"a prompt template may contain '{{pst}}' at most once, got {template!r}")
        if "{pst}" not in template:  # the placeholder goes right before the first sentence slot
            slot = template.index("{sentence}")
            if slot > 0 and template[slot - 1] in "\"'":
                slot -= 1
            template = template[:slot] + "{pst}" + template[slot:]
        self.template = template

    def render(self, sentence: str, placeholder: str | None) -> tuple[str, int, int]:
        """``(text, start, end)``: the prompt and the character span of the last sentence copy."""
        text = self.template.replace("{pst}", "" if placeholder is None else placeholder + " ")
        head, _, tail = text.rpartition("{sentence}")
        head = head.replace("{sentence}", sentence)
        return head + sentence + tail, len(head), len(head) + len(sentence)


class SentenceEncoder:
    """Sentence embeddings from a decoder LLM, optionally with Token Prepending.

    Parameters
    ----------
    model
        A loaded Hugging Face decoder of a family the adapters know (see
        :func:`tokenlean.supported_architectures`); its LM head is never run.
    tokenizer
        Its tokenizer (a fast one: the encoder uses character offsets).
    prompt
        ``"prompteol"``, ``"pretended_cot"``, ``"knowledge"``, ``"echo"``, a template containing
        ``{sentence}`` (and optionally ``{pst}``), or ``None`` for the bare sentence.
    token_prepending
        ``True`` (a default :class:`TokenPrepending`), a configured :class:`TokenPrepending`,
        ``False``, or ``"auto"`` (use the TokenPrepending patch the model already carries, if
        any). With Token Prepending the placeholder is added to ``tokenizer`` and ``model`` once
        (:func:`~tokenlean.attention.prepare_placeholder`), and the patch is applied around each
        :meth:`encode` call only.
    layer
        Which hidden state to read: an index into the ``num_layers + 1`` states (0 = embeddings,
        ``num_layers`` or -1 = the final normed output); default -2.
    pooling
        ``"last"``: the last token's state; ``"mean"``: the mean over the sentence's tokens (the
        last copy of the sentence for ``echo``).
    preprocess
        Apply :func:`preprocess_sentence` first (as the official evaluation does).
    max_length
        Longest prompt in tokens; longer sentences are cut (with a warning), the prompt kept.

    Raises
    ------
    UnsupportedModelError
        For a model family the adapters do not know.
    ValueError, MethodConfigError
        For an unknown prompt, a layer out of range, or a Token Prepending layer range beyond
        the model's depth.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompt: str | None = "prompteol",
        token_prepending: bool | TokenPrepending | Literal["auto"] = True,
        layer: int = -2,
        pooling: Literal["last", "mean"] = "last",
        preprocess: bool = True,
        max_length: int = 512,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = get_adapter(model)
        self.num_layers = self.adapter.num_layers(model)
        if prompt is None:
            template = "{sentence}"
        elif prompt in PROMPTS:
            template = PROMPTS[prompt]
        elif isinstance(prompt, str) and "{sentence}" in prompt:
            template = prompt
        else:
            raise ValueError(
                f"unknown prompt {prompt!r}: use one of {', '.join(PROMPTS)}, None, "
                "or a template containing '{sentence}'"
            )
        self.prompt = prompt
        self._template = _Template(template)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise ValueError(
                f"layer {layer} is out of range for a model with {self.num_layers} layers "
                f"(hidden states 0..{self.num_layers}, or negative from -{self.num_layers + 1})"
            )
        self.layer = layer % (self.num_layers + 1)
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.preprocess = preprocess
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.max_length = max_length
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("SentenceEncoder needs a fast tokenizer (it uses character offsets)")

        if token_prepending is True:
            token_prepending = TokenPrepending()
        if token_prepending not in (False, "auto") and not isinstance(token_prepending, TokenPrepending):
            raise TypeError(
                f"token_prepending must be True, False, 'auto' or a TokenPrepending, got {token_prepending!r}"
            )
        self.token_prepending: TokenPrepending | None | str = token_prepending or None
        if isinstance(token_prepending, TokenPrepending):
            token_prepending.layer_range(self.num_layers)  # a range beyond the depth fails here
            token_prepending.prepare(model, tokenizer)

    # -- sentence-transformers / MTEB surface ---------------------------------------------------
    def get_sentence_embedding_dimension(self) -> int:
        """Size of one embedding (the decoder's hidden size)."""
        return int(self.adapter.text_config(self.model).hidden_size)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix ``(len(a), len(b))`` between two sets of embeddings."""
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool = True,
        *,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = True,
        normalize_embeddings: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | np.ndarray:
        """Embed ``sentences``.

        Parameters
        ----------
        sentences
            A list of non-empty strings (or one string, giving one vector).
        batch_size
            Sentences per forward pass (sorted by length, so padding stays small).
        normalize
            L2-normalise each embedding. ``normalize_embeddings`` is the sentence-transformers
            name for the same switch and wins when given.
        show_progress_bar
            Show a progress bar over batches (default: off).
        convert_to_numpy
            Return a float32 NumPy array instead of a tensor (sentence-transformers / MTEB style).
        convert_to_tensor
            Accepted for sentence-transformers compatibility (a tensor is the default).
        **kwargs
            ``task_name``, ``prompt_type``, ``prompt_name``... passed by MTEB; ignored.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            ``(n, hidden_size)`` float32 on the CPU (``(hidden_size,)`` for one string).
        """
        unknown = set(kwargs) - _IGNORED_ENCODE_KWARGS
        if unknown:
            raise TypeError(f"encode() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        single = isinstance(sentences, str)
        texts = _check_sentences([sentences] if single else sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if normalize_embeddings is not None:
            normalize = normalize_embeddings

        method, external = self._tp_for_call()
        placeholder = None if method is None else method.placeholder
        prepared = self._tokenize(texts, placeholder)
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        out = torch.empty(len(prepared), self.get_sentence_embedding_dimension())
        bar = tqdm(total=len(order), desc="encode", unit="sent", disable=not show_progress_bar)
        handle = apply_method(self.model, method) if method is not None and not external else None
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out[chunk] = self._embed_batch([prepared[i] for i in chunk])
                bar.update(len(chunk))
        finally:
            if handle is not None:
                handle.remove()
            bar.close()
        if normalize:
            out = F.normalize(out, dim=-1)
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy else out

    # -- internals ------------------------------------------------------------------------------
    def _tp_for_call(self) -> tuple[TokenPrepending | None, bool]:
        """The TokenPrepending in effect for this call, and whether the model already carries it."""
        active = [h.method for h in active_patches(self.model) if isinstance(h.method, TokenPrepending)]
        if self.token_prepending == "auto":
            return (active[0], True) if active else (None, False)
        if self.token_prepending is None:
            return None, False
        if active:
            if active[0] != self.token_prepending:
                raise PatchError(
                    f"the model already carries {active[0]!r}, which differs from this encoder's "
                    f"{self.token_prepending!r}; remove it or use token_prepending='auto'"
                )
            return active[0], True
        return self.token_prepending, False

    def _tokenize(self, texts: list[str], placeholder: str | None) -> list[tuple[list[int], int, int]]:
        """Per text: ``(token ids, first, end)`` with ``[first, end)`` the sentence's token span."""
        texts = [preprocess_sentence(t) for t in texts] if self.preprocess else list(texts)
        result = self._render_and_tokenize(texts, placeholder)
        cut = 0
        for attempt in range(5):  # cut the excess tokens off the sentence; a merge may leave one over
            too_long = [i for i, (ids, _, _) in enumerate(result) if len(ids) > self.max_length]
            if not too_long:
                break
            if attempt == 4:
                raise RuntimeError(
                    f"could not fit {len(too_long)} sentence(s) into max_length={self.max_length}"
                )
            cut = max(cut, len(too_long))
            excess = [len(result[i][0]) - self.max_length for i in too_long]
            shorter = self._truncate([texts[i] for i in too_long], excess)
            for i, text, row in zip(
                too_long, shorter, self._render_and_tokenize(shorter, placeholder), strict=True
            ):
                texts[i], result[i] = text, row
        if cut:
            warnings.warn(
                f"{cut} sentence(s) did not fit max_length={self.max_length} tokens with the prompt "
                "and were truncated",
                stacklevel=3,
            )
        return result

    def _render_and_tokenize(
        self, texts: list[str], placeholder: str | None
    ) -> list[tuple[list[int], int, int]]:
        rendered = [self._template.render(t, placeholder) for t in texts]
        encoded = self.tokenizer(
            [r[0] for r in rendered], add_special_tokens=True, return_offsets_mapping=True
        )
        result = []
        for ids, offsets, (_, start, end) in zip(
            encoded["input_ids"], encoded["offset_mapping"], rendered, strict=True
        ):
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            first, stop = (inside[0], inside[-1] + 1) if inside else (len(ids) - 1, len(ids))
            result.append((list(ids), first, stop))
        return result

    def _truncate(self, texts: list[str], excess: list[int]) -> list[str]:
        """Cut ``excess[i]`` tokens off the end of sentence ``i`` (the prompt is never cut)."""
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        shorter = []
        for text, offsets, drop in zip(texts, encoded["offset_mapping"], excess, strict=True):
            keep = len(offsets) - drop
            if keep < 1:
                raise ValueError(f"max_length={self.max_length} leaves no room for a sentence in this prompt")
            shorter.append(text[: offsets[keep - 1][1]])
        return shorter

    @torch.inference_mode()
    def _embed_batch(self, batch: list[tuple[list[int], int, int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids, _, _ in batch)
        pad_id = self.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else (self.tokenizer.eos_token_id or 0)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        span = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (ids, first, stop) in enumerate(batch):
            offset = width - len(ids)  # left padding: the last token is at -1 in every row
            input_ids[row, offset:] = torch.tensor(ids)
            mask[row, offset:] = 1
            span[row, offset + first : offset + stop] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self._hidden_states(input_ids.to(device), mask.to(device), positions.to(device)).float()
        if self.pooling == "last":
            return hidden[:, -1].cpu()
        weights = span.to(hidden.device, hidden.dtype)[..., None]
        return ((hidden * weights).sum(1) / weights.sum(1)).cpu()

    def _hidden_states(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``(batch, seq, hidden)`` hidden state number ``self.layer``; stops the forward there."""
        text_model = self.adapter.text_model(self.model)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
        if self.layer == self.num_layers:
            return text_model(**kwargs).last_hidden_state
        captured: list[torch.Tensor] = []

        def stop(module: nn.Module, args: tuple, hook_kwargs: dict) -> None:
            captured.append(args[0] if args else hook_kwargs["hidden_states"])
            raise _ReadoutReached

        hook = self.adapter.decoder_layers(self.model)[self.layer].register_forward_pre_hook(
            stop, with_kwargs=True
        )
        try:
            text_model(**kwargs)
        except _ReadoutReached:
            pass
        finally:
            hook.remove()
        return captured[0]

    def __repr__(self) -> str:
        return (
            f"SentenceEncoder(model={type(self.model).__name__}, prompt={self.prompt!r}, "
            f"token_prepending={self.token_prepending!r}, layer={self.layer}, pooling={self.pooling!r})"
        )


class _ReadoutReached(Exception):
    """Raised by the readout hook to skip the layers after the one being read."""


def _check_sentences(sentences: Any) -> list[str]:
    if isinstance(sentences, (bytes, bytearray)) or not isinstance(sentences, Sequence):
        raise TypeError(f"sentences must be a string or a list of strings, got {type(sentences).__name__}")
    texts = list(sentences)
    if not texts:
        raise ValueError("sentences is empty: nothing to encode")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"sentence {i} is {type(text).__name__}, not str")
        if not text.strip():
            raise ValueError(f"sentence {i} is empty or whitespace only")
    return texts
