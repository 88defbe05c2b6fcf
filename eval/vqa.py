"""Visual question answering quality of a vision-language model: the ``vqa``, ``vlm_attention_share``
and ``vlm_kept_patches`` tasks, with their report sections.

All three read the easy-vqa **test** split (``pip install "tokenlean[vision]"``) and take the bench's
model and processor as :func:`tokenlean.zoo.load` returns them (e.g. ``easyvqa-llava``).

* ``vqa`` (``vqa:n=2000,batch=16,max_new_tokens=3,seed=0``; ``n=all`` for all 9,673 questions):
  accuracy by **exact match of the greedy-generated answer**. The subset is **plain random**
  (a seeded permutation of the test questions, its first ``n``: a smaller ``n`` is a prefix of a
  larger one), not stratified. An example is ``batch`` questions processed as one left-padded
  batch (every picture has the same size, so the pixels need no padding) and answered by one
  ``model.generate()`` call of at most ``max_new_tokens`` greedy tokens; the generated ids are
  decoded with the processor's tokenizer (special tokens skipped), stripped and lower-cased
  (:func:`normalize_answer`) and compared with the easy-vqa answer. Per variant: accuracy overall
  and by question type (shape / colour / yes-no, from the answer: :func:`question_type`) with
  95 % Wilson intervals; the visual tokens in the prompt, entering the decoder, and averaged over
  the decoder layers (``visual_tokens``: the x of the accuracy plot); the share of prompts where
  ToDRE's stage 2 dropped every visual token (``stage2_fired``, for variants that report it).
  Against the baseline (paired, same questions): the accuracy difference with a bootstrap
  interval and the answers it turned wrong / right.
* ``vlm_attention_share`` (``m=64,batch=16,tau=0.1,relevance_layer=0.875``): "information
  migration" on the **unpatched** model: for every decoder layer, the share α_t→v of the
  question tokens' attention mass on visual keys (question tokens: the real, non-visual tokens
  after the first visual token, as ToDRE's stage 2 counts them; head-averaged, then averaged
  over the question tokens), from the eager attention weights of each decoder layer (the text
  model is switched to eager attention for this measurement only and switched back). Per layer
  the mean and quartiles over the ``m`` prompts; whether stage 2's drop would fire at ``tau``
  (it reads α in the layer before ``relevance_layer``).
* ``vlm_kept_patches`` (``images=4,retain=0.1``): for a few test pictures, the patches each
  method keeps at ``retain``: stage 1's kept tokens (a pooled token's window centre), or, for an
  in-decoder drop alone (FastV), the visual tokens kept from its layer on. Drawn as a grid in
  the report: the picture as the model sees it (upscaled 4×, nearest), dropped patches dimmed,
  kept ones outlined.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tokenlean.errors import EvalError

from .stats import paired_bootstrap_diff, wilson_interval
from .tasks import Example, Task, register_task
from .vision import (
    DEFAULT_QUESTION,
    _import,
    _require_vlm,
    _to_model,
    easy_vqa_questions,
    processor_inputs,
    visual_token_counts,
)

__all__ = [
    "QUESTION_TYPES",
    "SHAPES",
    "AttentionShareTask",
    "KeptPatchesTask",
    "VQATask",
    "attention_shares",
    "kept_patches",
    "normalize_answer",
    "question_type",
]

#: The three easy-vqa shape words; every other non-yes/no answer is a colour.
SHAPES = ("circle", "rectangle", "triangle")
#: Question types: metric key -> display name.
QUESTION_TYPES = {"shape": "shape", "color": "colour", "yes_no": "yes/no"}
#: Special-token strings removed from a decoded answer even when the tokenizer does not mark them special.
_SPECIAL_STRINGS = ("</s>", "<s>", "<pad>", "<unk>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def question_type(answer: str) -> str:
    """The question type of an easy-vqa answer: ``"yes_no"``, ``"shape"`` or ``"color"``."""
    word = answer.strip().lower()
    if word in ("yes", "no"):
        return "yes_no"
    if word in SHAPES:
        return "shape"
    return "color"


def normalize_answer(text: str, special_tokens: Sequence[str] = ()) -> str:
    """A generated answer as compared: special-token strings removed, stripped, lower-cased,
    trailing punctuation dropped (``"Circle </s>"`` -> ``"circle"``)."""
    for token in (*special_tokens, *_SPECIAL_STRINGS):
        if token:
            text = text.replace(token, " ")
    return " ".join(text.split()).lower().rstrip(" .!?,;:")


def _positive_int(task: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"{task}: {key} must be a positive integer, got {value!r}")
    return value


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _subset(n: int | None, seed: int, what: str) -> list[tuple[int, int, str, str]]:
    """The first ``n`` questions (all for None) of a seeded permutation, as ``(index, image, question, answer)``."""
    questions = easy_vqa_questions()
    if n is not None and n > len(questions):
        raise EvalError(f"{what}: n={n}, but easy-vqa has {len(questions)} test questions (n=all for all)")
    order = np.random.default_rng(seed).permutation(len(questions))[: len(questions) if n is None else n]
    return [(int(i), *questions[int(i)]) for i in order]


class _EasyVQAImages:
    """Test pictures of easy-vqa by image id, opened on demand (RGB)."""

    def __init__(self, what: str) -> None:
        self.paths = _import("easy_vqa", what).get_test_image_paths()

    def __call__(self, image_id: int) -> Any:
        from PIL import Image

        return Image.open(self.paths[image_id]).convert("RGB")


# --------------------------------------------------------------------------------------------
# vqa
# --------------------------------------------------------------------------------------------


@register_task("vqa")
class VQATask(Task):
    """easy-vqa test accuracy: exact match of the greedy-generated answer, by question type."""

    name = "vqa"
    primary = "accuracy"
    higher_is_better = True
    kinds = ("baseline", "patch")
    order = "example"
    section = "vqa"

    def __init__(self, n: int | str = 2000, batch: int = 16, max_new_tokens: int = 3, seed: int = 0) -> None:
        if isinstance(n, str) and n.lower() == "all":
            self.n: int | None = None
        else:
            self.n = _positive_int("vqa", "n", n)
        self.batch = _positive_int("vqa", "batch", batch)
        self.max_new_tokens = _positive_int("vqa", "max_new_tokens", max_new_tokens)
        self.seed = int(seed)
        self._cache: tuple[str, dict[str, Any]] | None = None
        self._images: _EasyVQAImages | None = None

    def config(self) -> dict[str, Any]:
        return {
            "n": "all" if self.n is None else self.n,
            "batch": self.batch,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "split": "test",
            "subset": "plain random (seeded permutation)",
            "scoring": "exact match of the greedy answer",
        }

    def examples(self, tokenizer: Any) -> list[Example]:
        _require_vlm("the vqa task", processor=tokenizer)
        self.processor = tokenizer
        picked = _subset(self.n, self.seed, "vqa")
        return [
            Example(id=f"batch{k:04d}", data=chunk) for k, chunk in enumerate(_chunks(picked, self.batch))
        ]

    def _inputs(self, example: Example) -> dict[str, Any]:
        """The example's processed batch (the last one is cached: every variant runs it in turn)."""
        if self._cache is None or self._cache[0] != example.id:
            if self._images is None:
                self._images = _EasyVQAImages("the vqa task")
            images = [self._images(image_id) for _, image_id, _, _ in example.data]
            questions = [question for _, _, question, _ in example.data]
            self._cache = (example.id, processor_inputs(self.processor, images, questions))
        return self._cache[1]

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        model = bench.model
        _require_vlm("the vqa task", model=model)
        moved = _to_model(self._inputs(example), model)
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            out = model.generate(
                **moved, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        counts = visual_token_counts(model, moved["input_ids"])
        generated = out[:, moved["input_ids"].shape[1] :].cpu()
        specials = [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
        predictions = [
            normalize_answer(tokenizer.decode(row, skip_special_tokens=True), specials) for row in generated
        ]
        answers = [answer for _, _, _, answer in example.data]
        hits = [int(p == normalize_answer(a)) for p, a in zip(predictions, answers)]
        row: dict[str, Any] = {
            "n": len(hits),
            "correct": sum(hits),
            "hits": hits,
            "predictions": predictions,
            "visual_tokens_input_sum": float(sum(counts["input"])),
            "visual_tokens_decoder_sum": float(sum(counts["decoder"])),
            "visual_tokens_sum": float(sum(counts["per_layer"])),
            "stage2_fired": None if counts["stage2"] is None else int(sum(counts["stage2"])),
        }
        for key in QUESTION_TYPES:
            mine = [h for h, a in zip(hits, answers) if question_type(a) == key]
            row[f"{key}_n"], row[f"{key}_correct"] = len(mine), sum(mine)
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float | None]:
        n = sum(int(r["n"]) for r in rows)
        out: dict[str, float | None] = {}

        def rate(key: str, correct: int, total: int) -> None:
            low, high = wilson_interval(correct, total)
            out.update(
                {
                    key: correct / total if total else None,
                    f"{key}_low": low if total else None,
                    f"{key}_high": high if total else None,
                    f"{key}_n": total,
                }
            )

        rate("accuracy", sum(int(r["correct"]) for r in rows), n)
        for key in QUESTION_TYPES:
            rate(key, sum(int(r[f"{key}_correct"]) for r in rows), sum(int(r[f"{key}_n"]) for r in rows))
        for key in ("visual_tokens", "visual_tokens_decoder", "visual_tokens_input"):
            out[key] = sum(float(r[f"{key}_sum"]) for r in rows) / n if n else None
        fired = [r["stage2_fired"] for r in rows if r.get("stage2_fired") is not None]
        out["stage2_fired"] = sum(fired) / n if fired and len(fired) == len(rows) and n else None
        return out

    def compare(self, rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
        mine = [h for r in rows for h in r["hits"]]
        base = [h for r in baseline for h in r["hits"]]
        if len(mine) != len(base) or not mine:
            return {}
        diff, low, high = paired_bootstrap_diff(mine, base)
        return {
            "accuracy_diff": diff,
            "accuracy_diff_low": low,
            "accuracy_diff_high": high,
            "turned_wrong": sum(1 for m, b in zip(mine, base) if b and not m),
            "turned_right": sum(1 for m, b in zip(mine, base) if m and not b),
        }


# --------------------------------------------------------------------------------------------
# vlm_attention_share
# --------------------------------------------------------------------------------------------


def _decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    language_model = getattr(getattr(model, "model", model), "language_model", None)
    layers = getattr(language_model, "layers", None)
    if layers is None:
        raise EvalError(
            f"cannot find the decoder layers of {type(model).__name__} (model.model.language_model.layers)"
        )
    return layers


def question_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """``(batch, seq)`` bool: the real, non-visual tokens after each sample's first visual token."""
    visual = input_ids == image_token_id
    real = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    seq = input_ids.shape[1]
    order = torch.arange(seq, device=input_ids.device)
    first = torch.where(
        visual.any(1), visual.int().argmax(1), torch.full_like(visual[:, 0], seq, dtype=torch.long)
    )
    return real & ~visual & (order[None, :] > first[:, None])


def share_from_attention(probs: torch.Tensor, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """α_t→v per sample of one layer: ``probs`` ``(batch, heads, seq, seq)`` attention
    probabilities, ``visual`` and ``question`` ``(batch, seq)`` bool masks of keys and queries.

    The heads' mean of each question row's mass on visual keys, averaged over the question rows
    (NaN for a sample without question tokens)."""
    on_visual = (probs.float() * visual[:, None, None, :]).sum(-1).mean(1)  # (batch, seq) per query row
    rows = question.float()
    return (on_visual * rows).sum(1) / rows.sum(1)


@torch.inference_mode()
def attention_shares(model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``(batch, layers)`` α_t→v of every decoder layer for the prompts ``inputs`` (one prefill).

    The text model runs with eager attention for this one forward pass (its attention weights are
    read by a hook on each layer's attention module), then gets its implementation back."""
    moved = _to_model(dict(inputs), model)
    text_config = model.config.get_text_config()
    before = getattr(text_config, "_attn_implementation", None) or "eager"
    weights: list[torch.Tensor | None] = []

    def grab(module: torch.nn.Module, args: Any, output: Any) -> None:
        weights.append(output[1] if isinstance(output, tuple) and len(output) > 1 else None)

    layers = _decoder_layers(model)
    hooks = [layer.self_attn.register_forward_hook(grab) for layer in layers]
    try:
        if before != "eager":
            model.set_attn_implementation({"text_config": "eager"})
        model(**moved, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        if before != "eager":
            model.set_attn_implementation({"text_config": before})
    if len(weights) != len(layers) or any(w is None for w in weights):
        raise EvalError("the decoder layers returned no attention weights under eager attention")
    input_ids = moved["input_ids"]
    visual = input_ids == model.config.image_token_id
    question = question_mask(input_ids, moved.get("attention_mask"), model.config.image_token_id)
    return torch.stack([share_from_attention(w, visual, question) for w in weights], dim=1).cpu()


def _stage2_layers(num_layers: int, relevance_layer: float | int) -> tuple[int, int]:
    """ToDRE's stage-2 layer (tokens leave from it) and the layer its α is read from (the one before)."""
    from tokenlean.compressors.visual import ToDRE

    layer = ToDRE(relevance_layer=relevance_layer).layer_index(num_layers)
    return layer, layer - 1


@register_task("vlm_attention_share")
class AttentionShareTask(Task):
    """Information migration: the question's attention share on visual tokens, per decoder layer (unpatched)."""

    name = "vlm_attention_share"
    primary = "share_at_stage2"
    higher_is_better = True
    kinds = ("baseline",)
    section = "vlm_attention_share"

    def __init__(
        self,
        m: int = 64,
        batch: int = 16,
        tau: float = 0.10,
        relevance_layer: float | int = 0.875,
        seed: int = 0,
    ) -> None:
        self.m = _positive_int("vlm_attention_share", "m", m)
        self.batch = _positive_int("vlm_attention_share", "batch", batch)
        if not 0 <= float(tau) <= 1:
            raise EvalError(f"vlm_attention_share: tau must be in [0, 1], got {tau!r}")
        self.tau, self.relevance_layer, self.seed = float(tau), relevance_layer, int(seed)
        self._images: _EasyVQAImages | None = None

    def config(self) -> dict[str, Any]:
        return {"m": self.m, "batch": self.batch, "tau": self.tau, "relevance_layer": self.relevance_layer,
                "seed": self.seed, "split": "test"}  # fmt: skip

    def examples(self, tokenizer: Any) -> list[Example]:
        _require_vlm("the vlm_attention_share task", processor=tokenizer)
        self.processor = tokenizer
        picked = _subset(self.m, self.seed, "vlm_attention_share")
        return [
            Example(id=f"batch{k:04d}", data=chunk) for k, chunk in enumerate(_chunks(picked, self.batch))
        ]

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        model = bench.model
        _require_vlm("the vlm_attention_share task", model=model)
        if self._images is None:
            self._images = _EasyVQAImages("the vlm_attention_share task")
        images = [self._images(image_id) for _, image_id, _, _ in example.data]
        inputs = processor_inputs(self.processor, images, [q for _, _, q, _ in example.data])
        shares = attention_shares(model, inputs)
        return {"shares": [[float(x) for x in row] for row in shares.tolist()]}

    def _matrix(self, rows: list[dict[str, Any]]) -> np.ndarray:
        return np.array([s for r in rows for s in r["shares"]], dtype=float)  # (prompts, layers)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float | None]:
        shares = self._matrix(rows)
        if shares.size == 0:
            return {"share_at_stage2": None, "stage2_would_fire": None, "layers": None, "prompts": 0}
        layers = shares.shape[1]
        stage2, read = _stage2_layers(layers, self.relevance_layer)
        at = shares[:, read]
        return {
            "share_at_stage2": float(np.nanmean(at)),
            "stage2_would_fire": float(np.mean(at < self.tau)),
            "share_first_layer": float(np.nanmean(shares[:, 0])),
            "share_last_layer": float(np.nanmean(shares[:, -1])),
            "layers": layers,
            "prompts": int(shares.shape[0]),
        }

    def extra(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        if not rows:
            return {}
        shares = self._matrix(next(iter(rows.values())))
        if shares.size == 0:
            return {}
        layers = shares.shape[1]
        stage2, read = _stage2_layers(layers, self.relevance_layer)
        q = np.nanquantile(shares, [0.25, 0.5, 0.75], axis=0)
        return {
            "layers": layers,
            "prompts": int(shares.shape[0]),
            "mean": [float(x) for x in np.nanmean(shares, axis=0)],
            "q25": [float(x) for x in q[0]],
            "median": [float(x) for x in q[1]],
            "q75": [float(x) for x in q[2]],
            "below_tau": [float(x) for x in np.mean(shares < self.tau, axis=0)],
            "tau": self.tau,
            "stage2_layer": stage2,
            "read_layer": read,
            "fires": float(np.mean(shares[:, read] < self.tau)),
        }


# --------------------------------------------------------------------------------------------
# vlm_kept_patches
# --------------------------------------------------------------------------------------------


def kept_patches(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[str, list[list[int]]]:
    """After a prefill, each sample's kept patches as indices into its image's visual tokens.

    Returns ``(source, kept)``: ``"stage1"`` (the tokens selected before the decoder; a pooled
    token's window centre), ``"decoder"`` (an in-decoder drop alone, as FastV: the visual tokens
    kept from its layer on, mapped from prompt columns to patch indices) or ``"all"`` (unpatched).
    One image per sample is assumed."""
    from tokenlean.compressors.visual import visual_token_stats

    stats = visual_token_stats(model)
    image_id = model.config.image_token_id
    columns = [(row == image_id).nonzero().squeeze(1).tolist() for row in input_ids.cpu()]
    if stats is None:
        return "all", [list(range(len(c))) for c in columns]
    if "decoder_kept" in stats and all(
        len(k) == n for k, n in zip(stats.get("kept") or [], [len(c) for c in columns])
    ):
        kept = []
        for cols, decoder_cols in zip(columns, stats["decoder_kept"]):
            where = {c: i for i, c in enumerate(cols)}
            kept.append(sorted(where[c] for c in decoder_cols if c in where))
        return "decoder", kept
    return "stage1", [sorted(int(i) for i in k) for k in stats["kept"]]


def _png_b64(pixels: torch.Tensor, processor: Any) -> str:
    """The picture the model sees (``pixel_values`` of one image, un-normalised) as a base64 PNG."""
    from PIL import Image

    image_processor = processor.image_processor
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0])[:, None, None]
    std = torch.tensor(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0])[:, None, None]
    array = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _retain_of(params: Mapping[str, Any]) -> float | None:
    return None if params.get("retain_tokens") is not None else params.get("retain_ratio")


@register_task("vlm_kept_patches")
class KeptPatchesTask(Task):
    """The patches each pruning method keeps of a few easy-vqa test pictures (a figure in the report)."""

    name = "vlm_kept_patches"
    primary = "kept_tokens"
    higher_is_better = True
    kinds = ("baseline", "patch")
    section = "vlm_kept_patches"

    def __init__(self, images: int = 4, retain: float = 0.1, question: str = DEFAULT_QUESTION) -> None:
        self.images = _positive_int("vlm_kept_patches", "images", images)
        if not 0 < float(retain) <= 1:
            raise EvalError(f"vlm_kept_patches: retain must be in (0, 1], got {retain!r}")
        self.retain, self.question = float(retain), str(question)

    def config(self) -> dict[str, Any]:
        return {"images": self.images, "retain": self.retain, "question": self.question, "split": "test"}

    def examples(self, tokenizer: Any) -> list[Example]:
        _require_vlm("the vlm_kept_patches task", processor=tokenizer)
        self.processor = tokenizer
        load = _EasyVQAImages("the vlm_kept_patches task")
        ids = sorted(load.paths)[: self.images]
        return [Example(id="images", data={"ids": ids, "images": [load(i) for i in ids]})]

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        params = variant.method.params() if getattr(variant, "method", None) is not None else {}
        retain = _retain_of(params) if params else 1.0
        shown = variant.kind == "baseline" or (retain is not None and math.isclose(retain, self.retain))
        if not shown:
            return {"shown": 0}
        model = bench.model
        _require_vlm("the vlm_kept_patches task", model=model)
        inputs = processor_inputs(self.processor, example.data["images"], [self.question] * self.images)
        moved = _to_model(inputs, model)
        with torch.inference_mode():
            model(**moved)
        source, kept = kept_patches(model, moved["input_ids"])
        row: dict[str, Any] = {
            "shown": 1,
            "source": source,
            "kept": kept,
            "tokens": int((moved["input_ids"][0] == model.config.image_token_id).sum()),
        }
        if variant.kind == "baseline":
            row["pictures"] = [_png_b64(p, self.processor) for p in inputs["pixel_values"]]
            row["ids"] = list(example.data["ids"])
        return row

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float | None]:
        shown = [r for r in rows if r.get("shown")]
        if not shown:
            return {"kept_tokens": None}
        counts = [len(k) for r in shown for k in r["kept"]]
        return {"kept_tokens": float(np.mean(counts)) if counts else None}

    def extra(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"retain": self.retain, "variants": {}}
        for name, variant_rows in rows.items():
            row = variant_rows[0] if variant_rows else {}
            if not row.get("shown"):
                continue
            if "pictures" in row:
                out.update(pictures=row["pictures"], ids=row["ids"], tokens=row["tokens"])
            else:
                out["variants"][name] = {"source": row["source"], "kept": row["kept"]}
        return out


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------

#: Parameters that set a variant's budget (the x of the plot), not its family.
_BUDGET_PARAMS = ("retain_ratio", "retain_tokens")


def variant_families(record: Mapping[str, Any]) -> dict[str, tuple[str, float | None]]:
    """``{variant: (family label, retain)}``: a family is a method with every parameter but the
    budget fixed; the label names the method and the parameters that vary between its variants
    in the run (e.g. ``todre criterion=k_center, stage2=False``)."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for variant in record["variants"]:
        if variant.get("method") is not None:
            by_method.setdefault(variant["method"], []).append(variant["params"])
    varying: dict[str, list[str]] = {}
    for method, all_params in by_method.items():
        keys = sorted({k for p in all_params for k in p} - set(_BUDGET_PARAMS))
        varying[method] = [k for k in keys if len({repr(p.get(k)) for p in all_params}) > 1]
    out: dict[str, tuple[str, float | None]] = {}
    for variant in record["variants"]:
        method = variant.get("method")
        if method is None:
            out[variant["name"]] = ("baseline", 1.0)
            continue
        params = variant["params"]
        detail = ", ".join(f"{k}={params.get(k)}" for k in varying[method])
        out[variant["name"]] = (f"{method} {detail}" if detail else method, _retain_of(params))
    return out


def _family_order(record: Mapping[str, Any], families: Mapping[str, tuple[str, float | None]]) -> list[str]:
    """Variant names: baseline first, then by family (in order of appearance), the largest budget first."""
    seen: list[str] = []
    for variant in record["variants"]:
        family = families[variant["name"]][0]
        if family not in seen:
            seen.append(family)
    names = [v["name"] for v in record["variants"]]
    return sorted(
        names,
        key=lambda n: (
            seen.index(families[n][0]),
            -(families[n][1] if families[n][1] is not None else 0.0),
            names.index(n),
        ),
    )


def _token_ticks(ax: Any, xs: Sequence[float]) -> None:
    """Integer tick labels at the token counts plotted (a log axis), when there are few of them."""
    ticks = sorted({round(x) for x in xs if x and x >= 0.5})
    if ticks and len(ticks) <= 14:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks], fontsize=8)
        ax.minorticks_off()


def _plot_accuracy(record: Mapping[str, Any], entry: Mapping[str, Any], key: str) -> bytes | None:
    from .report import new_figure, png_bytes

    families = variant_families(record)
    values = entry["variants"]
    baseline = record["variants"][0]["name"]
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for name in _family_order(record, families):
        v = values.get(name)
        if name == baseline or not v or v.get("accuracy") is None or v.get("visual_tokens") is None:
            continue
        lines.setdefault(families[name][0], []).append(
            (v["visual_tokens"], 100 * v["accuracy"], 100 * v["accuracy_low"], 100 * v["accuracy_high"])
        )
    if not lines:
        return None
    fig = new_figure(8.2, 5.2)
    ax = fig.add_subplot()
    base = values.get(baseline) or {}
    if base.get("accuracy") is not None:
        ax.axhspan(100 * base["accuracy_low"], 100 * base["accuracy_high"], color="0.88", zorder=0)
        ax.axhline(100 * base["accuracy"], color="0.35", ls="--", lw=1.2,
                   label=f"baseline {100 * base['accuracy']:.1f}% ({fmt_tokens(base.get('visual_tokens'))} tokens)")  # fmt: skip
    markers = "osD^v<>ph*X"
    for i, (family, points) in enumerate(lines.items()):
        points.sort()
        shift = 1 + 0.012 * (i - (len(lines) - 1) / 2)  # keep overlapping error bars apart
        xs = [p[0] * shift for p in points]
        ys = [p[1] for p in points]
        err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        ax.errorbar(xs, ys, yerr=err, marker=markers[i % len(markers)], ms=5, capsize=3, lw=1.3,
                    color=f"C{i % 10}", label=family)  # fmt: skip
    ax.set_xscale("log")
    _token_ticks(ax, [p[0] for pts in lines.values() for p in pts] + [base.get("visual_tokens") or 0])
    ax.set_xlabel("visual tokens the decoder saw (mean over its layers; log scale)")
    ax.set_ylabel("accuracy (%), bars: 95% Wilson interval")
    ax.set_title(f"{record['model']['name']}: {key} accuracy against retained visual tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    return png_bytes(fig)


def _latency(record: Mapping[str, Any], name: str, metric: str) -> Mapping[str, Any] | None:
    stats = (record.get("latency") or {}).get(name, {}).get(metric)
    return stats if stats and stats.get("median") is not None else None


def _ms(record: Mapping[str, Any], name: str, metric: str) -> str:
    stats = _latency(record, name, metric)
    return "—" if stats is None else f"{1000 * stats['median']:.1f}"


def _plot_speed(record: Mapping[str, Any], entry: Mapping[str, Any], key: str) -> bytes | None:
    """TTFT against visual tokens, and accuracy against TTFT, one line per family (None without timings)."""
    from .report import new_figure, png_bytes

    families = variant_families(record)
    values = entry["variants"]
    baseline = record["variants"][0]["name"]
    lines: dict[str, list[tuple[float, float, float, float, float]]] = {}
    for name in _family_order(record, families):
        v, stats = values.get(name), _latency(record, name, "ttft_s")
        if (
            name == baseline
            or not v
            or stats is None
            or v.get("visual_tokens") is None
            or v.get("accuracy") is None
        ):
            continue
        ms = 1000 * stats["median"]
        lo, hi = 1000 * stats.get("p25", stats["median"]), 1000 * stats.get("p75", stats["median"])
        lines.setdefault(families[name][0], []).append(
            (v["visual_tokens"], ms, ms - lo, hi - ms, 100 * v["accuracy"])
        )
    if not lines:
        return None
    fig = new_figure(11.0, 4.6)
    left, right = fig.subplots(1, 2)
    base, base_stats = values.get(baseline) or {}, _latency(record, baseline, "ttft_s")
    if base_stats is not None:
        left.axhline(1000 * base_stats["median"], color="0.35", ls="--", lw=1.2, label="baseline")
        right.axvline(1000 * base_stats["median"], color="0.35", ls="--", lw=1.2)
    if base.get("accuracy") is not None:
        right.axhline(100 * base["accuracy"], color="0.35", ls="--", lw=1.2, label="baseline")
    markers = "osD^v<>ph*X"
    for i, (family, points) in enumerate(lines.items()):
        points.sort()
        style = dict(marker=markers[i % len(markers)], ms=5, lw=1.2, color=f"C{i % 10}", label=family)
        left.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[[p[2] for p in points],
                      [p[3] for p in points]], capsize=3, **style)  # fmt: skip
        right.plot([p[1] for p in points], [p[4] for p in points], ls="none", **style)
    left.set_xscale("log")
    _token_ticks(left, [p[0] for pts in lines.values() for p in pts])
    left.set_xlabel("visual tokens the decoder saw (mean over its layers; log scale)")
    left.set_ylabel("time to first token (ms, CPU)")
    right.set_xlabel("time to first token (ms, CPU)")
    right.set_ylabel("accuracy (%)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{record['model']['name']}: {key} speed against visual tokens and accuracy")
    return png_bytes(fig)


def fmt_tokens(x: Any) -> str:
    return "—" if x is None else f"{x:.3g}"


def _plot_attention_share(record: Mapping[str, Any], extra: Mapping[str, Any]) -> bytes | None:
    from .report import new_figure, png_bytes

    if not extra.get("mean"):
        return None
    layers = list(range(int(extra["layers"])))
    fig = new_figure(7.0, 4.4)
    ax = fig.add_subplot()
    ax.fill_between(layers, [100 * x for x in extra["q25"]], [100 * x for x in extra["q75"]], color="C0",
                    alpha=0.2, label="quartiles (p25–p75) over prompts")  # fmt: skip
    ax.plot(layers, [100 * x for x in extra["mean"]], marker="o", color="C0", label="mean")
    ax.plot(layers, [100 * x for x in extra["median"]], ls=":", color="C0", label="median")
    ax.axhline(100 * extra["tau"], color="C3", ls="--", lw=1.2, label=f"τ = {extra['tau']:.2f}")
    ax.axvline(extra["read_layer"], color="0.4", ls="-.", lw=1,
               label=f"ToDRE stage 2 reads layer {extra['read_layer']} (drops from {extra['stage2_layer']})")  # fmt: skip
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer (0-based)")
    ax.set_ylabel("question → visual attention share α_t→v (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{record['model']['name']}: information migration ({extra['prompts']} test prompts, unpatched)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _plot_kept(record: Mapping[str, Any], extra: Mapping[str, Any]) -> bytes | None:
    from matplotlib.patches import Rectangle
    from PIL import Image as PILImage

    from .report import new_figure, png_bytes

    pictures = extra.get("pictures") or []
    tokens = int(extra.get("tokens") or 0)
    side = math.isqrt(tokens)
    if not pictures or side * side != tokens:
        return None
    method_of = {v["name"]: v["method"] for v in record["variants"]}
    columns: list[tuple[str, Mapping[str, Any]]] = []
    for name, cell in (extra.get("variants") or {}).items():
        if any(method_of.get(n) == method_of.get(name) and c["kept"] == cell["kept"] for n, c in columns):
            continue  # same method, same patches (e.g. ToDRE with and without stage 2): one column
        columns.append((name, cell))
    families = variant_families(record)
    labels = [
        families.get(name, (name, None))[0].replace(", ", "\n").replace(" ", "\n", 1) for name, _ in columns
    ]
    images = []
    for data in pictures:
        image = PILImage.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        images.append(np.asarray(image.resize((image.width * 4, image.height * 4), PILImage.NEAREST)))
    n_rows, n_cols = len(images), 1 + len(columns)
    fig = new_figure(1.75 * n_cols + 0.3, 1.8 * n_rows + 0.5)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, image in enumerate(images):
        height, width = image.shape[:2]
        ph, pw = height / side, width / side
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                title = "as seen by the model" if c == 0 else labels[c - 1]
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(f"test image {extra['ids'][r]}", fontsize=7)
                continue
            cell = columns[c - 1][1]
            keep = set(cell["kept"][r]) if r < len(cell["kept"]) else set()
            ax.set_xlabel(
                f"{len(keep)} of {tokens}" + (" (in decoder)" if cell["source"] == "decoder" else ""),
                fontsize=7,
            )
            for index in range(tokens):
                y, x = divmod(index, side)
                if index in keep:
                    ax.add_patch(
                        Rectangle((x * pw - 0.5, y * ph - 0.5), pw, ph, fill=False, ec="#00b4d8", lw=1.1)
                    )
                else:
                    ax.add_patch(
                        Rectangle(
                            (x * pw - 0.5, y * ph - 0.5), pw, ph, fill=True, fc="black", alpha=0.45, lw=0
                        )
                    )
    fig.suptitle(f"kept patches at retain {extra['retain']:g} (outlined; dropped ones dimmed)", fontsize=9)
    return png_bytes(fig)


def _register_sections() -> None:
    from .report import (
        Image,
        Table,
        Text,
        fmt,
        fmt_accuracy_diff,
        fmt_pct,
        kept,
        register_section,
        variant_label,
    )

    def share(values: Mapping[str, Any], key: str) -> str:
        value, low, high = (values.get(k) for k in (key, f"{key}_low", f"{key}_high"))
        if value is None:
            return "—"
        return f"{100 * value:.1f}% [{100 * low:.1f}–{100 * high:.1f}]"

    def file_stem(key: str) -> str:
        return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key)

    @register_section("vqa")
    def vqa_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
        families = variant_families(record)
        baseline = record["variants"][0]["name"]
        compare = entry.get("compare") or {}
        rows = []
        for name in _family_order(record, families):
            values = entry["variants"].get(name)
            if values is None:
                continue
            family, retain = families[name]
            fired = values.get("stage2_fired")
            paired = fmt_accuracy_diff(compare.get(name))
            rows.append(
                [
                    variant_label(record, name),
                    family,
                    "—" if retain is None else f"{100 * retain:g}%",
                    fmt(values.get("visual_tokens_decoder")),
                    fmt(values.get("visual_tokens")),
                    share(values, "accuracy"),
                    *(share(values, t) for t in QUESTION_TYPES),
                    fmt_pct(kept(entry, baseline, name)),
                    paired,
                    "—" if fired is None else f"{100 * fired:.0f}%",
                    _ms(record, name, "prefill_s"),
                    _ms(record, name, "ttft_s"),
                ]
            )
        config = entry.get("config") or {}
        first = entry["variants"].get(baseline) or {}
        counts = ", ".join(
            f"{QUESTION_TYPES[t]} {first.get(f'{t}_n')}"
            for t in QUESTION_TYPES
            if first.get(f"{t}_n") is not None
        )
        note = (
            f"{first.get('accuracy_n', '?')} easy-vqa test questions ({counts}; a plain random subset, seed "
            f"{config.get('seed')}), {config.get('batch')} per left-padded batch; exact match of the greedy "
            f"answer (at most {config.get('max_new_tokens')} tokens, decoded, stripped, lower-cased). "
            "Accuracy cells: value [95% Wilson interval]. Visual tokens per prompt: entering the decoder, and the "
            "mean over the decoder layers (lower when FastV or ToDRE's stage 2 drop tokens inside it; the x of the "
            "plot). kept: accuracy relative to the baseline; Δ vs baseline: paired difference in points on the "
            "same questions [95% bootstrap interval]; stage 2 fired: share of prompts where ToDRE dropped every "
            "visual token inside the decoder. Prefill and TTFT: median over the timed rounds of the bench's workload "
            "(CPU; one image + question; see Latency)."
        )
        headers = ["variant", "family", "retain", "visual tokens into decoder", "visual tokens / layer", "accuracy ↑",
                   "shape", "colour", "yes/no", "kept", "Δ vs baseline (pp)", "stage 2 fired", "prefill (ms)", "TTFT (ms)"]  # fmt: skip
        blocks: list = [
            Text("primary metric: accuracy (higher is better)."),
            Table(headers, rows, text_cols=3, note=note),
        ]
        plot = _plot_accuracy(record, entry, key)
        if plot:
            blocks.append(
                Image(
                    plot,
                    f"{file_stem(key)}_accuracy_vs_tokens.png",
                    "Accuracy against the visual tokens the decoder saw (mean over its layers), one line per method "
                    "family; bars: 95% Wilson intervals; dashed: the unpruned baseline (band: its interval). Points of "
                    "different families at one budget are shifted by ≤ 5% on x so their bars do not overlap.",
                )
            )
        speed = _plot_speed(record, entry, key)
        if speed:
            blocks.append(
                Image(
                    speed,
                    f"{file_stem(key)}_ttft.png",
                    "Left: CPU time to first token (median, bars p25–p75 over the timed rounds of the workload) against "
                    "the visual tokens the decoder saw; right: accuracy against that time. One line per method family; "
                    "dashed: the baseline.",
                )
            )
        return blocks

    def _stage2_fired_table(record: Mapping[str, Any]) -> Any:
        """How often stage 2 fired in the vqa task, after stage 1 (fewer visual tokens, lower α)."""
        families = variant_families(record)
        for key, entry in record["quality"].items():
            if entry.get("section") != "vqa":
                continue
            rows = []
            for name in _family_order(record, families):
                fired = (entry["variants"].get(name) or {}).get("stage2_fired")
                if fired is not None:
                    family, retain = families[name]
                    budget = "—" if retain is None else f"{100 * retain:g}%"
                    rows.append([variant_label(record, name), family, budget, f"{100 * fired:.1f}%"])
            if rows:
                note = (
                    f"From the {key} task: the share of its prompts where stage 2 dropped every visual token, "
                    "measured after stage 1 kept the retained share (the α it reads falls with fewer visual tokens)."
                )
                return Table(["variant", "family", "retain", "stage 2 fired"], rows, text_cols=3,
                             title="Stage 2 after stage 1 (vqa task)", note=note)  # fmt: skip
        return None

    @register_section("vlm_attention_share")
    def attention_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
        extra = entry.get("extra") or {}
        if not extra.get("mean"):
            return [Text("No results.")]
        read, tau = extra["read_layer"], extra["tau"]
        fires = extra["fires"]
        verdict = (
            f"At τ = {tau:g}, ToDRE's stage 2 (which reads α_t→v in layer {read} and drops every visual token from "
            f"layer {extra['stage2_layer']} on) would fire on {100 * fires:.0f}% of the {extra['prompts']} prompts "
            f"of the unpruned model: α at layer {read} is {100 * extra['mean'][read]:.1f}% on average (median "
            f"{100 * extra['median'][read]:.1f}%, quartiles {100 * extra['q25'][read]:.1f}–{100 * extra['q75'][read]:.1f}%)."
        )
        if fires == 0:
            verdict += " It does not fire on this model at the default τ."
        elif fires == 1:
            verdict += " It fires on every prompt."
        rows = [
            [
                str(layer),
                f"{100 * extra['mean'][layer]:.1f}%",
                f"{100 * extra['median'][layer]:.1f}%",
                f"{100 * extra['q25'][layer]:.1f}–{100 * extra['q75'][layer]:.1f}%",
                f"{100 * extra['below_tau'][layer]:.0f}%",
            ]  # fmt: skip
            for layer in range(int(extra["layers"]))
        ]
        note = (
            "α_t→v: share of the question tokens' attention mass (real, non-visual tokens after the first visual "
            "token; heads averaged, then question tokens averaged) on visual keys, from the eager attention weights "
            "of the unpatched model, per decoder layer (0-based); mean, median and quartiles over the prompts; "
            f"below τ: share of prompts with α < {tau:g} in that layer."
        )
        blocks: list = [
            Text(verdict, strong=True),
            Table(["layer", "mean α", "median", "p25–p75", "below τ"], rows, note=note),
        ]
        fired = _stage2_fired_table(record)
        if fired is not None:
            blocks.append(fired)
        plot = _plot_attention_share(record, extra)
        if plot:
            blocks.append(
                Image(plot, f"{file_stem(key)}.png", "Information migration: α_t→v by decoder layer.")
            )
        return blocks

    @register_section("vlm_kept_patches")
    def kept_section(record: Mapping[str, Any], key: str, entry: Mapping[str, Any]) -> list:
        extra = entry.get("extra") or {}
        if not extra.get("variants"):
            return [Text(f"No variant at retain {extra.get('retain')} in this run.")]
        figure = _plot_kept(record, extra)
        caption = (
            f"Easy-vqa test pictures as the model sees them (upscaled 4×, nearest) and the patches each method "
            f"keeps at retain {extra['retain']:g}: stage-1 selections before the decoder (a pooled token at its "
            "window's centre); FastV's drop inside the decoder as the visual tokens it keeps from its layer on. "
            "A ToDRE variant that keeps the same patches as one already shown (stage 2 on/off) is left out."
        )
        if figure is None:
            return [Text("The kept patches cannot be drawn: the image tokens do not form one square grid.")]
        return [Image(figure, f"{file_stem(key)}.png", caption)]


_register_sections()
