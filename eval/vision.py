"""Vision-language models in the harness: the ``vision`` workload and the ``vlm_fidelity`` task.

Both take the bench's model as loaded from a local folder or hub id with a vision config
(:func:`tokenlean.zoo.load` returns its *processor* as the tokenizer), and real, local images:

* ``easy-vqa`` (default): the 64×64 test pictures and questions of the ``easy-vqa`` package;
* ``skimage``: scikit-image's photographs (astronaut, chelsea, coffee...).

Both packages come with ``pip install "tokenlean[vision]"``.

* ``vision`` workload: greedy generation after an image + question prompt, per variant (the
  baseline and visual pruning patches): prefill, TTFT, decode throughput, end-to-end and peak
  memory, plus the visual tokens of the prompt (``visual_tokens_input``), the visual tokens the
  decoder saw (``visual_tokens_decoder``) and their mean over the decoder layers
  (``visual_tokens_per_layer``; lower than ``visual_tokens_decoder`` when tokens are dropped
  inside the decoder, as FastV and ToDRE's stage 2 do). The vision encoder, the token selection
  and the prefill all count in prefill and TTFT.
* ``vlm_fidelity`` task: on ``n`` easy-vqa test questions (a seeded subset), how closely a
  patched model follows the unpatched one: the same greedy answer (``answer_agreement``, the
  primary metric), the same first token (``top1_agreement``), and KL(unpatched ‖ patched) of the
  next-token distribution at the end of the prompt (``kl``); agreement rates with 95 % Wilson
  intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenlean.errors import EvalError

from .context import BenchContext
from .latency import LATENCY_METRICS, SPEEDUP_METRICS, measure_generation
from .stats import wilson_interval
from .tasks import Example, Task, register_task
from .variants import Variant
from .workloads import Workload, register_workload

__all__ = [
    "IMAGE_SETS",
    "VLMFidelityTask",
    "VisionWorkload",
    "easy_vqa_questions",
    "load_images",
    "processor_inputs",
    "visual_token_counts",
    "visual_tokens",
    "vlm_inputs",
    "vlm_prompt",
]

#: The local image sets: name -> what it is.
IMAGE_SETS = {
    "easy-vqa": "the easy-vqa test pictures (64×64 PNG, a coloured shape each)",
    "skimage": "scikit-image's photographs (astronaut, chelsea, coffee, rocket, ...)",
}
DEFAULT_QUESTION = "What shape is in the image?"
#: scikit-image photographs shipped inside the package (nothing is downloaded), in order.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
_INSTALL = 'pip install "tokenlean[vision]"'


# --------------------------------------------------------------------------------------------
# images and prompts
# --------------------------------------------------------------------------------------------


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvalError(f"{what} needs the {module!r} package: {_INSTALL}") from None


def load_images(name: str, n: int) -> list[Any]:
    """The first ``n`` images of the local set ``name`` as RGB PIL images (repeated if fewer).

    Parameters
    ----------
    name
        ``"easy-vqa"`` (test pictures in id order) or ``"skimage"`` (scikit-image's photographs).
    n
        Number of images (>= 1).
    """
    from PIL import Image

    if name == "easy-vqa":
        easy_vqa = _import("easy_vqa", "the easy-vqa image set")
        paths = easy_vqa.get_test_image_paths()
        images = [Image.open(paths[i]).convert("RGB") for i in sorted(paths)[:n]]
    elif name == "skimage":
        data = _import("skimage.data", "the skimage image set")
        images = [Image.fromarray(getattr(data, photo)()).convert("RGB") for photo in _SKIMAGE_PHOTOS[:n]]
    else:
        raise EvalError(f"unknown image set {name!r}; image sets: {', '.join(IMAGE_SETS)}")
    while len(images) < n:
        images = images + images
    return images[:n]


def easy_vqa_questions() -> list[tuple[int, str, str]]:
    """Every easy-vqa test question as ``(image id, question, answer)``, in the package's order."""
    easy_vqa = _import("easy_vqa", "the easy-vqa questions")
    questions, answers, image_ids = easy_vqa.get_test_questions()
    return [(int(i), str(q), str(a)) for q, a, i in zip(questions, answers, image_ids)]


def _require_vlm(what: str, processor: Any = None, model: torch.nn.Module | None = None) -> None:
    """A clear EvalError unless ``processor`` (if given) is a VLM processor and ``model`` (if given) a VLM."""
    ok = True
    if processor is not None:
        ok = getattr(processor, "image_processor", None) is not None and hasattr(processor, "tokenizer")
    if model is not None:
        config = getattr(model, "config", None)
        ok = ok and getattr(config, "vision_config", None) is not None
        ok = ok and getattr(config, "image_token_id", None) is not None
    if not ok:
        got = " with ".join(f"a {type(x).__name__}" for x in (processor, model) if x is not None)
        raise EvalError(
            f"{what} needs a vision-language model loaded with its processor (a local folder or hub id "
            f"with a vision config, e.g. one written by tokenlean.tiny_vlm.save_tiny_vlm); got {got}"
        )


def _image_markup(processor: Any) -> str:
    """The text that stands for one image without a chat template (``<image>``, Qwen's pad in its frame)."""
    image = getattr(processor, "image_token", None) or "<image>"
    tokenizer = processor.tokenizer
    start, end = getattr(tokenizer, "vision_start_token", None), getattr(tokenizer, "vision_end_token", None)
    return f"{start}{image}{end}" if start and end else image


def vlm_prompt(processor: Any, question: str) -> str:
    """One image followed by ``question``: the processor's chat template (with the generation
    prompt) when it has one, else ``"<image>\\n{question}"`` with the processor's image token."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{_image_markup(processor)}\n{question}"


def vlm_inputs(
    processor: Any, images: Sequence[Any], questions: Sequence[str], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Model inputs of one image + question per row, on the model's device (floats in its dtype).

    The processor's output is passed through as it is (``input_ids``, ``attention_mask``,
    ``pixel_values``, and ``image_sizes`` or ``image_grid_thw`` + ``mm_token_type_ids``...).
    """
    return _to_model(processor_inputs(processor, images, questions), model)


def processor_inputs(processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict[str, Any]:
    """One batch of image + question prompts as the processor makes them (CPU tensors), rows of
    different lengths left-padded, as ``generate()`` needs."""
    texts = [vlm_prompt(processor, q) for q in questions]
    batch = processor(images=list(images), text=texts, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch)


def _to_model(inputs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``inputs`` with every tensor on the model's device, floating ones in its dtype."""
    first = next(model.parameters())

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(first.device, first.dtype) if value.is_floating_point() else value.to(first.device)

    return {key: move(value) for key, value in inputs.items()}


def visual_token_counts(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Visual tokens of the last prefill, per sample.

    ``input``: image tokens in the prompt; ``decoder``: visual tokens that entered the decoder;
    ``per_layer``: visual tokens averaged over the decoder layers (lists of floats); ``stage2``:
    per sample, whether ToDRE's stage 2 dropped the visual tokens (None when it did not run).
    Without a visual pruning patch the decoder saw every image token of ``input_ids``.
    """
    from tokenlean.compressors.visual import visual_token_stats

    stats = visual_token_stats(model)  # the pruning patch's counts; None without a visual patch
    if stats is None:
        count = (input_ids == model.config.image_token_id).sum(-1).float().tolist()
        return {"input": count, "decoder": count, "per_layer": count, "stage2": None}
    return {
        "input": [float(v) for v in stats["input"]],
        "decoder": [float(v) for v in stats["decoder"]],
        "per_layer": [float(v) for v in stats["mean_per_layer"]],
        "stage2": None if "stage2_dropped" not in stats else [bool(v) for v in stats["stage2_dropped"]],
    }


def visual_tokens(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """:func:`visual_token_counts` as means over the batch's samples (``visual_tokens_input``,
    ``visual_tokens_decoder``, ``visual_tokens_per_layer``)."""
    counts = visual_token_counts(model, input_ids)
    return {f"visual_tokens_{key}": float(np.mean(counts[key])) for key in ("input", "decoder", "per_layer")}


# --------------------------------------------------------------------------------------------
# the vision workload
# --------------------------------------------------------------------------------------------

_VISUAL_METRICS = {
    "visual_tokens_input": ("tokens", False),
    "visual_tokens_decoder": ("tokens", False),
    "visual_tokens_per_layer": ("tokens", False),
}


@register_workload("vision")
class VisionWorkload(Workload):
    """Greedy generation of ``new_tokens`` tokens after an image + ``question`` prompt (``batch_size`` rows)."""

    metrics = {**LATENCY_METRICS, "prompt_tokens": ("tokens", False), **_VISUAL_METRICS}
    speedups = SPEEDUP_METRICS
    primary = "e2e"
    kinds = ("baseline", "patch")
    note = (
        "Prefill and TTFT include the vision encoder, the visual token selection of a pruning patch and "
        "the prompt's forward pass; the images are preprocessed once, before timing. Visual tokens: in the "
        "prompt, entering the decoder, and averaged over the decoder layers (means over the batch)."
    )

    def __init__(
        self,
        bench: BenchContext,
        new_tokens: int = 32,
        batch_size: int = 1,
        images: str = "easy-vqa",
        question: str = DEFAULT_QUESTION,
    ) -> None:
        super().__init__(bench)
        for key, value in (("new_tokens", new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"vision workload: {key} must be a positive integer, got {value!r}")
        if images not in IMAGE_SETS:
            raise EvalError(
                f"vision workload: unknown image set {images!r}; image sets: {', '.join(IMAGE_SETS)}"
            )
        _require_vlm("the vision workload", bench.tokenizer, bench.model)
        self.new_tokens, self.batch_size, self.images, self.question = (
            new_tokens,
            batch_size,
            images,
            str(question),
        )
        pictures = load_images(images, batch_size)
        # one size for every row: the same number of visual tokens, so no row is padded
        size = pictures[0].size
        pictures = [p if p.size == size else p.resize(size) for p in pictures]
        self.inputs = vlm_inputs(bench.tokenizer, pictures, [self.question] * batch_size, bench.model)
        mask = self.inputs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            # no padding: without a mask the decode steps need no position bookkeeping of their own
            # (Qwen2-VL's forward derives decode positions from the whole mask, which breaks a plain
            # decode loop; generate() sidesteps that by passing position ids)
            del self.inputs["attention_mask"]

    def options(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "batch_size": self.batch_size,
            "images": self.images,
            "question": self.question,
        }

    def measure(self, variant: Variant) -> dict[str, float]:
        model = self.bench.model
        input_ids = self.inputs["input_ids"]
        extra = {k: v for k, v in self.inputs.items() if k != "input_ids"}
        sample = measure_generation(model, input_ids, self.new_tokens, extra_inputs=extra).as_dict()
        sample["prompt_tokens"] = float(input_ids.shape[1])
        sample.update(visual_tokens(model, input_ids))
        return sample


# --------------------------------------------------------------------------------------------
# the vlm_fidelity task
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def _answer(model: torch.nn.Module, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answer ids ``(<= max_new_tokens,)`` and the log-probabilities ``(vocab,)`` after the prompt."""
    moved = _to_model(inputs, model)
    out = model.generate(
        **moved,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    answer = out.sequences[0, moved["input_ids"].shape[1] :].cpu()
    log_probs = F.log_softmax(out.logits[0][0].float(), dim=-1).cpu()
    tokens = visual_tokens(model, moved["input_ids"])["visual_tokens_decoder"]
    return {"answer": answer, "log_probs": log_probs, "visual_tokens": tokens}


@register_task("vlm_fidelity")
class VLMFidelityTask(Task):
    """Agreement of a patched VLM with the unpatched one on easy-vqa questions (answers, first token, KL)."""

    name = "vlm_fidelity"
    primary = "answer_agreement"
    higher_is_better = True
    needs_reference = True
    kinds = ("baseline", "patch")
    section = "vlm_fidelity"

    def __init__(self, n: int = 32, max_new_tokens: int = 8, seed: int = 0) -> None:
        for key, value in (("n", n), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"vlm_fidelity: {key} must be a positive integer, got {value!r}")
        self.n, self.max_new_tokens, self.seed = n, max_new_tokens, int(seed)

    def config(self) -> dict[str, Any]:
        return {"n": self.n, "max_new_tokens": self.max_new_tokens, "seed": self.seed, "images": "easy-vqa"}

    def examples(self, tokenizer: Any) -> list[Example]:
        from PIL import Image

        _require_vlm("the vlm_fidelity task", processor=tokenizer)
        processor = tokenizer
        questions = easy_vqa_questions()
        if self.n > len(questions):
            raise EvalError(f"vlm_fidelity: n={self.n}, but easy-vqa has {len(questions)} test questions")
        picked = np.sort(np.random.default_rng(self.seed).choice(len(questions), self.n, replace=False))
        paths = _import("easy_vqa", "the vlm_fidelity task").get_test_image_paths()
        examples = []
        for index in picked:
            image_id, question, answer = questions[int(index)]
            image = Image.open(paths[image_id]).convert("RGB")
            inputs = processor_inputs(processor, [image], [question])
            data = {"inputs": inputs, "question": question, "answer": answer, "image": image_id}
            examples.append(Example(id=f"q{int(index)}", data=data))
        return examples

    def reference(self, model: torch.nn.Module, example: Example) -> dict[str, Any]:
        _require_vlm("the vlm_fidelity task", model=model)
        return _answer(model, example.data["inputs"], self.max_new_tokens)

    def score(self, model: torch.nn.Module, example: Example, reference: dict[str, Any]) -> dict[str, float]:
        mine = _answer(model, example.data["inputs"], self.max_new_tokens)
        same_answer = torch.equal(mine["answer"], reference["answer"])
        top1 = int(mine["log_probs"].argmax()) == int(reference["log_probs"].argmax())
        ref = reference["log_probs"]
        kl = float((ref.exp() * (ref - mine["log_probs"])).sum())
        return {
            "answer_agreement": float(same_answer),
            "top1_agreement": float(top1),
            "kl": max(kl, 0.0),
            "visual_tokens": mine["visual_tokens"],
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        n = len(rows)
        out: dict[str, float] = {}
        for key in ("answer_agreement", "top1_agreement"):
            hits = int(round(sum(r[key] for r in rows)))
            low, high = wilson_interval(hits, n)
            out.update({key: hits / n if n else float("nan"), f"{key}_low": low, f"{key}_high": high})
        out["kl"] = float(np.mean([r["kl"] for r in rows])) if n else float("nan")
        out["visual_tokens"] = float(np.mean([r["visual_tokens"] for r in rows])) if n else float("nan")
        return out


# --------------------------------------------------------------------------------------------
# report sections
# --------------------------------------------------------------------------------------------


def _register_sections() -> None:
    from .report import Table, Text, fmt, fmt_pct, kept, register_section, variant_label

    def share(entry: Any, key: str) -> str:
        value, low, high = (entry.get(k) for k in (key, f"{key}_low", f"{key}_high"))
        if value is None:
            return "—"
        return f"{100 * value:.1f}% [{100 * low:.0f}–{100 * high:.0f}]" if low is not None else fmt(value)

    @register_section("vlm_fidelity")
    def vlm_fidelity_section(record: Any, key: str, entry: Any) -> list:
        baseline = record["variants"][0]["name"]
        rows = []
        for variant in record["variants"]:
            values = entry["variants"].get(variant["name"])
            if values is None:
                continue
            rows.append(
                [
                    variant_label(record, variant["name"]),
                    share(values, "answer_agreement"),
                    share(values, "top1_agreement"),
                    fmt(values.get("kl")),
                    fmt(values.get("visual_tokens")),
                    fmt_pct(kept(entry, baseline, variant["name"])),
                ]
            )
        config = entry.get("config") or {}
        note = (
            f"{entry.get('n_examples')} easy-vqa test questions (seed {config.get('seed')}), greedy answers of "
            f"up to {config.get('max_new_tokens')} tokens, against the unpatched model: same answer, same first "
            "token [95% Wilson interval]; KL(unpatched ‖ variant) of the next-token distribution after the "
            "prompt; visual tokens the decoder saw."
        )
        headers = ["variant", "same answer ↑", "same first token", "KL", "visual tokens", "kept"]
        return [Text("primary metric: answer_agreement (higher is better)."), Table(headers, rows, note=note)]

    @register_section("workload:vision")
    def vision_tokens_section(record: Any, key: str, workload: Any) -> list:
        rows = []
        for variant in record["variants"]:
            latency = record["latency"].get(variant["name"]) or {}
            cells = [(latency.get(m) or {}).get("median") for m in _VISUAL_METRICS]
            if cells[0] is None:
                continue
            kept_pct = 100.0 * cells[1] / cells[0] if cells[0] and cells[1] is not None else None
            rows.append([variant_label(record, variant["name"]), *map(fmt, cells), fmt_pct(kept_pct)])
        if not rows:
            return []
        headers = ["variant", "in the prompt", "entering the decoder", "mean over decoder layers", "kept"]
        note = (
            "Visual tokens per sample (median over the rounds); kept = entering the decoder / in the prompt."
        )
        return [Table(headers, rows, note=note)]


_register_sections()
