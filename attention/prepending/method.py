"""Token Prepending (Fu et al., 2025): let every token see a summary of the whole sentence.

In a decoder, early tokens cannot attend to later ones, so a sentence embedding read from the
last token is built from a stream in which most tokens never saw the sentence. Token Prepending
puts a placeholder token (``<PST>``) before the sentence and, before each decoder layer ``i`` with
``start_layer <= i < exit_layer``, overwrites the placeholder's hidden state with the *input*
hidden state of the last token (the previous layer's sentence embedding). Every later token then
attends to that summary. Layers below ``start_layer`` see the plain placeholder embedding;
layers from ``exit_layer`` on run unmodified. Attention itself is untouched.

The official code forks whole modeling files for three families and hard-codes the
placeholder id. Here it is forward pre-hooks (the decoder stack finds the placeholder and the last real
token of every row, each layer in the range rewrites one position per row, with no host
synchronisation), so it
works on every decoder the adapters know, with left *or* right padding, and the placeholder id
always comes from the tokenizer (:func:`prepare_placeholder`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from tokenlean.adapters import get_adapter
from tokenlean.errors import MethodConfigError, PatchError
from tokenlean.methods import Method, param, register_method
from tokenlean.patching import PatchContext

__all__ = ["TokenPrepending", "placeholder_id", "prepare_placeholder"]

# model -> {placeholder text: token id}, filled by prepare_placeholder
_PLACEHOLDERS: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def prepare_placeholder(model: nn.Module, tokenizer: Any, placeholder: str = "<PST>") -> int:
    """Make ``placeholder`` a single token of ``tokenizer`` with an embedding row in ``model``.

    A placeholder the tokenizer already has as one token (e.g. Gemma's ``<unused0>``) is used
    as it is. Otherwise it is added to the tokenizer as a special token that absorbs the space
    before it (so ``'x : <PST> "s"'`` costs exactly one token more than ``'x : "s"'``); its id is
    the next free one, and the model's embedding matrix grows only if that id has no row yet.
    A newly added token's row is set to the mean of the existing rows (the paper finds the
    initialisation does not matter). Outputs for every other token are unchanged. Idempotent.

    Returns
    -------
    int
        The placeholder's token id (also remembered for :class:`TokenPrepending` on ``model``).

    Raises
    ------
    ValueError
        If ``placeholder`` is empty, or an existing placeholder is not a single token.
    """
    if not isinstance(placeholder, str) or not placeholder.strip():
        raise ValueError(f"placeholder must be a non-empty string, got {placeholder!r}")
    vocab = tokenizer.get_vocab()
    added = placeholder not in vocab
    if added:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(placeholder, special=True, lstrip=True, normalized=False)])
    token_id = int(tokenizer.convert_tokens_to_ids(placeholder))
    if tokenizer(placeholder, add_special_tokens=False)["input_ids"] != [token_id]:
        raise ValueError(
            f"placeholder {placeholder!r} is not a single token of this tokenizer; use a new string "
            "(it is then added) or a reserved token the tokenizer already has"
        )
    embeddings = get_adapter(model).embed_tokens(model)
    if token_id >= embeddings.num_embeddings:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
        embeddings = get_adapter(model).embed_tokens(model)
    if added:
        with torch.no_grad():
            weight = embeddings.weight
            weight[token_id] = weight[:token_id].float().mean(0).to(weight.dtype)
    _PLACEHOLDERS.setdefault(model, {})[placeholder] = token_id
    return token_id


def placeholder_id(model: nn.Module, placeholder: str = "<PST>") -> int | None:
    """The id :func:`prepare_placeholder` gave ``placeholder`` on ``model`` (``None`` if not prepared)."""
    return _PLACEHOLDERS.get(model, {}).get(placeholder)


@register_method("token_prepending")
@dataclass
class TokenPrepending(Method):
    """Token Prepending: copy the last token's state into a placeholder before the sentence, per layer."""

    start_layer: int = param(1, "first decoder layer (0-based) before which the placeholder is rewritten")
    exit_layer: int | float = param(
        7, "layer where rewriting stops (exclusive); a float in (0, 1] is a fraction of the depth"
    )
    placeholder: str = param("<PST>", "placeholder token text (added to the tokenizer if missing)")
    placeholder_id: int | None = param(None, "placeholder token id; None = the one prepare() recorded")

    def validate(self) -> None:
        if self.start_layer < 0:
            self._fail("start_layer", self.start_layer, ">= 0")
        if isinstance(self.exit_layer, float):
            if not 0.0 < self.exit_layer <= 1.0:
                self._fail("exit_layer", self.exit_layer, "an int layer index or a float fraction in (0, 1]")
        elif self.exit_layer <= self.start_layer:
            self._fail("exit_layer", self.exit_layer, f"greater than start_layer ({self.start_layer})")
        if not self.placeholder.strip():
            self._fail("placeholder", self.placeholder, "a non-empty string")
        if self.placeholder_id is not None and self.placeholder_id < 0:
            self._fail("placeholder_id", self.placeholder_id, ">= 0 or None")

    def layer_range(self, num_layers: int) -> range:
        """The decoder layers rewritten on a model with ``num_layers`` layers.

        Raises
        ------
        MethodConfigError
            If the range is empty or beyond the model's depth.
        """
        exit_layer = self.exit_layer
        if isinstance(exit_layer, float):
            exit_layer = max(1, round(exit_layer * num_layers))
        if exit_layer > num_layers:
            raise MethodConfigError(
                f"TokenPrepending.exit_layer={self.exit_layer} is beyond the model's {num_layers} layers"
            )
        if exit_layer <= self.start_layer:
            raise MethodConfigError(
                f"TokenPrepending: exit layer {exit_layer} (from exit_layer={self.exit_layer} on "
                f"{num_layers} layers) must be greater than start_layer={self.start_layer}"
            )
        return range(self.start_layer, exit_layer)

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        """Add the placeholder to ``tokenizer`` and ``model`` (see :func:`prepare_placeholder`)."""
        token_id = prepare_placeholder(model, tokenizer, self.placeholder)
        if self.placeholder_id is not None and self.placeholder_id != token_id:
            raise MethodConfigError(
                f"TokenPrepending.placeholder_id={self.placeholder_id} but the tokenizer gives "
                f"{self.placeholder!r} the id {token_id}"
            )

    def resolve_placeholder_id(self, model: nn.Module) -> int:
        """The placeholder id used on ``model``: ``placeholder_id`` or the one prepared for it."""
        token_id = (
            self.placeholder_id
            if self.placeholder_id is not None
            else placeholder_id(model, self.placeholder)
        )
        if token_id is None:
            raise PatchError(
                f"TokenPrepending: {self.placeholder!r} has no token id on this model; call "
                "tokenlean.attention.prepare_placeholder(model, tokenizer) (or method.prepare) first, "
                "or pass placeholder_id"
            )
        return token_id

    def install(self, ctx: PatchContext) -> None:
        layers = ctx.adapter.decoder_layers(ctx.model)
        rewritten = self.layer_range(len(layers))
        token_id = self.resolve_placeholder_id(ctx.model)
        text_model = ctx.adapter.text_model(ctx.model)
        # Per forward: (rows, placeholder positions, last-token positions), or None.
        state: dict[str, Any] = {"where": None, "outer_ids": None}

        def outer_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # Vision-language models feed their decoder inputs_embeds: take the ids from the top.
            state["outer_ids"] = kwargs.get("input_ids", args[0] if args else None)

        def locate(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            outer, state["outer_ids"] = state["outer_ids"], None
            embeds = kwargs.get("inputs_embeds")
            if ids is None and outer is not None and embeds is not None and outer.shape == embeds.shape[:2]:
                ids = outer
            state["where"] = None if ids is None else _locate(ids, token_id, kwargs.get("attention_mask"))

        def rewrite(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            where = state["where"]
            if where is None:
                return None
            rows, pst, last = where
            hidden = args[0] if args else kwargs["hidden_states"]
            if torch.is_grad_enabled() and hidden.requires_grad:
                hidden = hidden.clone()  # keep autograd's saved tensors intact
            # in place otherwise: the previous layer's output is not used again except here
            hidden[rows, pst] = hidden[rows, last]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        if ctx.model is not text_model:
            ctx.add_forward_pre_hook(ctx.model, outer_ids)
        ctx.add_forward_pre_hook(text_model, locate)
        for index in rewritten:
            ctx.add_forward_pre_hook(layers[index], rewrite)


def _locate(
    input_ids: torch.Tensor, token_id: int, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per row: the placeholder's position and the last real token's position.

    The last real token of a row is the last position its 2-D ``attention_mask`` keeps (so left
    and right padding both work); without a 2-D mask it is the last position. The first
    placeholder of a row is used. A row without a placeholder before its last token gets the
    last token's own position, which turns its rewrite into a no-op; this keeps everything on
    the device with no host synchronisation. Single-token steps (decoding) return ``None``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        return None
    length = input_ids.shape[1]
    hits = input_ids == token_id
    pst = hits.int().argmax(dim=1)
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask[:, -length:].bool()
        last = length - 1 - keep.flip(1).int().argmax(dim=1)
    else:
        last = torch.full_like(pst, length - 1)
    valid = hits.any(dim=1) & (pst < last)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return rows, torch.where(valid, pst, last), last
