"""ToDRE: diversity-driven selection before the decoder, relevance-driven removal inside it.

Stage 1 keeps a small, diverse subset of an image's projected visual tokens: greedy
``max_sum`` diversification (the paper's v2: each step adds the token with the least cumulative
cosine similarity to the chosen set) or ``k_center`` (v1 / DivPrune: the token farthest from
the chosen set), started from a pivot: the token the vision encoder's [CLS] attends to most in
its last layer (the global thumbnail's on LLaVA-NeXT), or, for encoders
without [CLS] such as Qwen2-VL's, the token nearest the mean feature (``center``) or a seeded
random one.

Stage 2 measures, in the attention of the layer before ``relevance_layer``, the share of the
*text* queries' attention mass that lands on visual keys, α_t→v. Below ``tau``, every visual
token of that sample leaves the decoder from ``relevance_layer`` on: hidden states, mask,
rotary positions and the KV cache the decoding steps use.

Which tokens count as text: the non-visual prompt tokens *after the first visual token* (the
question). Tokens before the image cannot see it under a causal mask, so counting them would
only dilute α_t→v. The paper's second ratio, α_v→t (visual queries on text keys), is
identically zero under a causal mask when the image precedes the question, so tokenlean tests
α_t→v alone (the paper's rule "both below τ" reduces to it in that layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from tokenlean.errors import PatchError
from tokenlean.methods import param, register_method

from ._core import DecoderDrop, ImageTokens, Kept, StageOnePruning, left_aligned
from .selection import select_diverse

__all__ = ["ToDRE", "center_token"]


def center_token(features: torch.Tensor) -> int:
    """Index of the token whose normalised feature is nearest (cosine) to the mean of them all."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    return int((x @ x.mean(0)).argmax())


@register_method("todre")
@dataclass
class ToDRE(StageOnePruning):
    """ToDRE: a diverse subset of visual tokens before the decoder; all dropped inside it once the text stops attending."""

    criterion: Literal["max_sum", "k_center"] = param(
        "max_sum", "stage-1 rule: max_sum (v2, least cumulative similarity) or k_center (v1, max-min)"
    )
    pivot: Literal["cls", "center", "random"] | None = param(
        None,
        "first token: cls attention, center (nearest the mean), random; None: cls where the encoder has one",
    )
    relevance_layer: int | float = param(
        0.875, "stage-2 layer: a fraction of the depth in (0, 1) or a layer index (tokens leave from there)"
    )
    tau: float = param(
        0.10, "stage 2 drops the visual tokens when the text's attention share on them is below this"
    )
    stage2: bool = param(True, "run stage 2 (relevance-driven removal inside the decoder)")
    seed: int = param(0, "seed of the random pivot")

    @property
    def needs_cls(self) -> bool:  # type: ignore[override]
        return self.pivot in (None, "cls")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.relevance_layer, float) and not 0 < self.relevance_layer < 1:
            self._fail(
                "relevance_layer", self.relevance_layer, "a fraction in (0, 1) or an integer layer index >= 1"
            )
        if isinstance(self.relevance_layer, int) and self.relevance_layer < 1:
            self._fail(
                "relevance_layer", self.relevance_layer, "a layer index >= 1 (or a fraction in (0, 1))"
            )
        if not 0 <= self.tau <= 1:
            self._fail("tau", self.tau, "in [0, 1]")

    def check_model(self, model: Any) -> None:
        if self.pivot == "cls" and model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
            raise PatchError(
                "ToDRE(pivot='cls'): Qwen2-VL's vision encoder has no [CLS] token; use pivot='center' or "
                "'random' (or None, which picks center there)"
            )

    def select(self, image: ImageTokens, k: int) -> Kept:
        index = select_diverse(image.features, k, pivot=self._pivot(image), criterion=self.criterion)
        return Kept(image.features[index], index)

    def select_many(self, images: list[ImageTokens], k: int) -> list[Kept]:
        """One batched selection for images with the same token count (per-image pivots)."""
        if len(images) == 1:
            return [self.select(images[0], k)]
        features = torch.stack([image.features for image in images])
        pivots = torch.tensor([self._pivot(image) for image in images], device=features.device)
        index = select_diverse(features, k, pivot=pivots, criterion=self.criterion)
        return [Kept(image.features[row], row) for image, row in zip(images, index)]

    def _pivot(self, image: ImageTokens) -> int:
        rule = self.pivot or ("cls" if image.cls_attention is not None else "center")
        if rule == "cls":
            if image.cls_attention is None:
                raise PatchError(
                    "ToDRE(pivot='cls'): no [CLS] attention is available for this vision encoder"
                )
            return int(image.cls_attention.argmax())
        if rule == "random":
            generator = torch.Generator().manual_seed(self.seed)
            return int(torch.randint(image.n, (1,), generator=generator))
        return center_token(image.features)

    def layer_index(self, num_layers: int) -> int:
        """The decoder layer stage 2 acts from (scores come from the layer before it)."""
        if isinstance(self.relevance_layer, float):
            return min(num_layers - 1, max(1, round(self.relevance_layer * num_layers)))
        return self.relevance_layer

    def decoder_drop(self, num_layers: int) -> DecoderDrop | None:
        if not self.stage2:
            return None
        return DecoderDrop(self.layer_index(num_layers), self._decide)

    def _decide(self, rows_fn: Any, visual: torch.Tensor, real: torch.Tensor, extra: dict) -> torch.Tensor:
        seq = visual.shape[1]
        order = torch.arange(seq, device=visual.device)
        has_visual = visual.any(1)
        first = torch.where(
            has_visual, visual.int().argmax(1), torch.full_like(has_visual, seq, dtype=torch.long)
        )
        text = real & ~visual & (order[None, :] > first[:, None])
        width = max(1, int(text.sum(1).max()))
        rows = left_aligned(text, width)
        valid = rows >= 0
        probs = rows_fn(rows, valid)  # (b, heads, r, S)
        on_visual = (probs * visual[:, None, None, :]).sum(-1).mean(1)  # (b, r)
        share = on_visual.sum(1) / valid.sum(1).clamp(min=1)
        drop = has_visual & valid.any(1) & (share < self.tau)
        extra["text_to_visual_attention"] = share
        extra["stage2_dropped"] = drop
        return visual & ~drop[:, None]
