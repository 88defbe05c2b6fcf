"""Visual-token pruning latency: LLaVA-1.5-7B and LLaVA-NeXT-7B at their real sizes, random bf16 weights.

    python benchmarks/visual_gpu_latency.py --out "$OUT/visual"    # one CUDA device call, < 5 minutes
    python benchmarks/visual_gpu_latency.py --tiny                 # CPU, the tiny test models
    python benchmarks/visual_gpu_latency.py --shrink --quick --batches 1 --out /tmp/v   # CPU, real geometry

Both models are built from the published configurations (written below; no hub, no network) with
random weights: latency does not depend on weight values. Prompts are 5 text tokens, the image, 59
text tokens: LLaVA-1.5 576 + 64 = 640 tokens; LLaVA-NeXT gets a 672 x 672 image (the pinpoint with
the most crops: base view + 2 x 2 tiles), 2,928 visual tokens (576 + 48 x 48 + 48 row newlines, as
the model itself counts them) + 64 = 2,992. For each model, batch size (1 and 8) and
retain ratio (100 / 25 / 10 %) the script times, interleaved round by round in one process:

* ``full``: the unpatched model, every visual token;
* ``limit``: the unpatched model fed ``round(r * n)`` visual tokens per image directly (its
  ``get_image_features`` keeps the first ones, and ``input_ids`` holds that many image tokens).
  The vision tower and projector still run on the whole image (pruning cannot avoid them) but
  nothing is selected: this is the fastest a pruning method can be at that token count. At
  100 % the limit is ``full``;
* every pruning method at ``r`` (``tokenlean.patch(model, name, retain_ratio=r, ...)``):
  ``todre`` (stage 1 only, and with stage 2), ``fastv``, ``divprune``, ``random_prune``,
  ``pool_prune``. A method that is not registered, or that raises, gets a row with its error and
  the run goes on.

Metrics (medians over the timed rounds, CUDA events, synchronised; the definitions of
``tokenlean.eval.latency.measure_generation``): prefill = the prompt's forward pass (vision tower,
selection and the decoder; ``logits_to_keep=1`` where the model takes it, as ``generate`` does),
TTFT = until the first token id is on the host, decode tokens/s over ``new_tokens - 1`` greedy
steps with the cache, peak memory. ``ratio to limit`` = limit prefill / method prefill, paired
per round (same retain ratio, same round); the goal is >= 1/1.1 (within 10 % of the limit,
selection and stage 2 included).

``results.json`` (machine, settings, every row with per-round values) and ``results.md`` (one
table per model and batch) are rewritten atomically after every model/batch block, so a run
cut short keeps what it measured. A time budget (``--budget-s``) shortens the rounds of later
blocks rather than overrun the device call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def _bootstrap_tokenlean() -> None:
    """Make ``import tokenlean`` work in a bare checkout (no ``pip install``).

    pyproject's ``package-dir`` maps ``tokenlean`` to ``src/tokenlean`` and its subpackages
    (``tokenlean.eval``, ``tokenlean.attention``, ``tokenlean.compressors``...) to folders at the
    repository root; putting ``src`` on ``sys.path`` and the root on ``tokenlean.__path__``
    reproduces that mapping without copying anything.
    """
    try:
        import tokenlean  # noqa: F401

        return
    except ModuleNotFoundError as exc:
        if exc.name != "tokenlean":
            raise
    if not (ROOT / "src" / "tokenlean" / "__init__.py").is_file():
        raise SystemExit(
            "cannot import tokenlean: run `pip install -e . --no-deps` in the repository root first"
        )
    sys.path.insert(0, str(ROOT / "src"))
    import tokenlean

    tokenlean.__path__.append(str(ROOT))


_bootstrap_tokenlean()

OUT_GPU = ROOT / "benchmarks" / "results" / "visual_gpu_latency"
OUT_TINY = ROOT / "benchmarks" / "results" / "visual_cpu_latency_tiny"

RETAINS = (1.0, 0.25, 0.10)
BATCHES = (1, 8)
GOAL_RATIO = 1 / 1.1  # within 10 % of the limit's prefill

#: label -> (registered method name, extra parameters); ``retain_ratio`` is added per row.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "todre": ("todre", {"stage2": False}),
    "todre+stage2": ("todre", {"stage2": True}),
    "fastv": ("fastv", {}),  # layer: the method's default (2)
    "divprune": ("divprune", {}),
    "random_prune": ("random_prune", {}),
    "pool_prune": ("pool_prune", {}),
}

# --------------------------------------------------------------------------- configurations

# llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-vicuna-7b-hf, from their config.json.
# Confident: the CLIP ViT-L/14-336 tower (hidden 1024, 24 layers, 16 heads, MLP 4096, image 336,
# patch 14 -> 24 x 24 = 576 patches, projection_dim 768, quick_gelu), vision_feature_layer -2 with
# the "default" strategy (CLS dropped), the 2-layer gelu projector, the Vicuna-7B-v1.5 text model
# (= Llama-2-7B: hidden 4096, 32 layers, 32 heads without GQA, MLP 11008, RMSNorm 1e-5, rope theta
# 1e4, 4096 positions, untied head), vocab 32064 with image token 32000, and NeXT's five grid
# pinpoints. Check: the built models have 7,063,427,072 parameters (+4,096 for NeXT's image_newline),
# the published 7.06 B. Less sure, and without effect on latency: pad_token_id (32001 for 1.5, 0
# for NeXT).
_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_TEXT = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    vocab_size=32064,
    tie_word_embeddings=False,
)
_COMMON = dict(
    image_token_index=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    tie_word_embeddings=False,
)
REAL = {
    "llava-1.5-7b": dict(kind="llava", checkpoint="llava-hf/llava-1.5-7b-hf", pad_token_id=32001),
    "llava-next-7b": dict(
        kind="llava_next",
        checkpoint="llava-hf/llava-v1.6-vicuna-7b-hf",
        pad_token_id=0,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    ),
}
# Tiny widths with the real image geometry (same token counts): a CPU check of the GPU path.
_SHRINK_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# (4 decoder layers: FastV's default drop layer 2 must lie inside the decoder)
_SHRINK_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)


def real_config(name: str, shrink: bool = False):
    """The transformers config of ``name`` (a key of :data:`REAL`); ``shrink``: tiny widths."""
    import transformers as tf

    spec = dict(REAL[name])
    kind = spec.pop("kind")
    spec.pop("checkpoint")
    pad = spec.pop("pad_token_id")
    vision = tf.CLIPVisionConfig(**(_VISION | (_SHRINK_VISION if shrink else {})))
    text = tf.LlamaConfig(**(_TEXT | (_SHRINK_TEXT if shrink else {})), pad_token_id=pad)
    cls = tf.LlavaConfig if kind == "llava" else tf.LlavaNextConfig
    extra = {"image_seq_length": 576} if kind == "llava" else {}
    return cls(vision_config=vision, text_config=text, **_COMMON, **extra, **spec)


def build_real(name: str, device: torch.device, dtype: torch.dtype, shrink: bool = False) -> torch.nn.Module:
    """Random-weight model of ``name`` built directly on ``device`` in ``dtype`` (sdpa attention)."""
    import transformers as tf

    config = real_config(name, shrink)
    cls = (
        tf.LlavaForConditionalGeneration
        if REAL[name]["kind"] == "llava"
        else tf.LlavaNextForConditionalGeneration
    )
    torch.manual_seed(0)
    with device:
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# --------------------------------------------------------------------------- inputs


@dataclass
class Workload:
    """One model's inputs at one batch size, and how to make ``input_ids`` for ``k`` visual tokens."""

    name: str
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor | None
    visual_tokens: int  # per image, from the model itself
    prefix: torch.Tensor  # (batch, p) text ids before the image
    suffix: torch.Tensor  # (batch, s) text ids after it
    image_token_id: int

    @property
    def batch(self) -> int:
        return self.prefix.shape[0]

    @property
    def text_tokens(self) -> int:
        return self.prefix.shape[1] + self.suffix.shape[1]

    def input_ids(self, visual: int | None = None) -> torch.Tensor:
        visual = self.visual_tokens if visual is None else visual
        image = torch.full(
            (self.batch, visual), self.image_token_id, dtype=torch.long, device=self.prefix.device
        )
        return torch.cat([self.prefix, image, self.suffix], dim=1)

    def inputs(self, visual: int | None = None) -> dict[str, torch.Tensor]:
        ids = self.input_ids(visual)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": self.pixel_values}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
        return out


def _largest_grid(config) -> tuple[list[int], int]:
    """The pinpoint (height, width) giving LLaVA-NeXT the most crops, and that number of crops."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = config.vision_config.image_size
    counts = [
        (image_size_to_num_patches(list(p), config.image_grid_pinpoints, size), list(p))
        for p in config.image_grid_pinpoints
    ]
    crops, pinpoint = max(counts, key=lambda c: c[0])
    return pinpoint, crops


def image_features_per_image(model: torch.nn.Module, pixel_values: torch.Tensor, image_sizes) -> list[int]:
    """Number of visual tokens the model makes for each image (calls ``get_image_features``)."""
    config = model.config
    kwargs = dict(
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    with torch.inference_mode():
        if image_sizes is not None:
            out = model.model.get_image_features(pixel_values, image_sizes, **kwargs)
        else:
            out = model.model.get_image_features(pixel_values=pixel_values, **kwargs)
    features = _features_of(out)
    if isinstance(features, torch.Tensor):
        return [features.shape[1]] * features.shape[0] if features.dim() == 3 else [features.shape[0]]
    return [f.shape[0] for f in features]


def make_workload(
    name: str,
    model: torch.nn.Module,
    batch: int,
    text: tuple[int, int],
    vocab: tuple[int, int],
    seed: int = 0,
) -> Workload:
    """Random pixels (and, for LLaVA-NeXT, the image size giving the most crops) plus random text ids.

    ``text`` is (tokens before the image, tokens after it); ``vocab`` the id range of text tokens.
    """
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    if config.model_type == "llava_next":
        pinpoint, crops = _largest_grid(config)
        pixel_values = torch.randn(batch, crops, 3, size, size, generator=generator)
        image_sizes = torch.tensor([pinpoint] * batch, dtype=torch.long)
    elif config.model_type == "llava":
        pixel_values = torch.randn(batch, 3, size, size, generator=generator)
        image_sizes = None
    else:
        raise ValueError(f"{name}: model type {config.model_type!r} is not a LLaVA model")
    pixel_values = pixel_values.to(device, dtype)
    image_sizes = None if image_sizes is None else image_sizes.to(device)
    counts = image_features_per_image(
        model, pixel_values[:1], None if image_sizes is None else image_sizes[:1]
    )
    image_token = config.image_token_id
    ids = torch.randint(vocab[0], vocab[1], (batch, text[0] + text[1]), generator=generator)
    ids[ids == image_token] = vocab[0]
    ids = ids.to(device)
    return Workload(
        name=name,
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        visual_tokens=counts[0],
        prefix=ids[:, : text[0]],
        suffix=ids[:, text[0] :],
        image_token_id=image_token,
    )


# --------------------------------------------------------------------------- the limit


def keep_count(retain: float, n: int) -> int:
    """Visual tokens kept of ``n`` at ``retain`` (round half up, at least one)."""
    return max(1, min(n, int(math.floor(retain * n + 0.5))))


def _features_of(output):
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _truncate(features, keep: Callable[[int], int]):
    """The first ``keep(n)`` of the ``n`` features of every image (a list, or an (images, n, dim) tensor)."""
    if isinstance(features, torch.Tensor):
        if features.dim() == 3:
            return features[:, : keep(features.shape[1])]
        return features[: keep(features.shape[0])]
    kept = [f[: keep(f.shape[0])] for f in features]
    return tuple(kept) if isinstance(features, tuple) else kept


@contextlib.contextmanager
def limit_image_features(model: torch.nn.Module, retain: float) -> Iterator[None]:
    """The unpatched model's ``get_image_features`` keeps the first ``round(retain * n)`` tokens per image.

    The original attribute is restored on exit (an instance attribute if there was one, else the
    class method shows through again).
    """
    inner = model.model
    had_own = "get_image_features" in vars(inner)
    own = vars(inner).get("get_image_features")
    original = inner.get_image_features

    def limited(*args, **kwargs):
        out = original(*args, **kwargs)
        features = _truncate(_features_of(out), lambda n: keep_count(retain, n))
        if hasattr(out, "pooler_output"):
            out.pooler_output = features
            return out
        return features

    inner.get_image_features = limited
    try:
        yield
    finally:
        if had_own:
            inner.get_image_features = own
        else:
            del inner.get_image_features


# --------------------------------------------------------------------------- timing


@dataclass
class Variant:
    label: str  # "full", "limit" or a METHODS label / method spec
    retain: float
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    effective_params: dict[str, Any] | None = None
    samples: list[dict[str, float]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, float]:
        return (self.label, self.retain)


def _decoder_layers(model: torch.nn.Module):
    lm = getattr(model.model, "language_model", None)
    if lm is None:
        lm = model.get_decoder()
    return lm.layers


@contextlib.contextmanager
def _count_tokens(model: torch.nn.Module, into: dict[str, int]) -> Iterator[None]:
    """Record the sequence length entering the first and the last decoder layer (first call only)."""
    layers = _decoder_layers(model)

    def hook(key):
        def pre(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None and key not in into:
                into[key] = int(hidden.shape[1])

        return pre

    handles = [
        layers[0].register_forward_pre_hook(hook("layer0"), with_kwargs=True),
        layers[-1].register_forward_pre_hook(hook("last_layer"), with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def time_generation(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int
) -> dict[str, float]:
    """One greedy generation of ``new_tokens`` tokens from a multimodal prompt, each phase timed.

    :func:`tokenlean.eval.latency.measure_generation` with the image inputs (and
    ``logits_to_keep=1``, as ``generate`` does) in ``extra_inputs``: prefill = the prompt's forward
    pass; TTFT = until the first token id is on the host; decode tokens/s =
    ``batch * (new_tokens - 1)`` over the greedy steps after it, with the cache and the attention
    mask one column longer each step.
    """
    from tokenlean.eval.latency import measure_generation

    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    if "logits_to_keep" in _forward_parameters(model):
        extra["logits_to_keep"] = 1
    sample = measure_generation(model, inputs["input_ids"], new_tokens, extra_inputs=extra)
    return {
        "prefill_ms": 1000 * sample.prefill_s,
        "ttft_ms": 1000 * sample.ttft_s,
        "decode_tokens_per_s": sample.decode_tokens_per_s,
        "peak_mb": sample.peak_memory_mb,
    }


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _run_variant(
    model: torch.nn.Module, work: Workload, variant: Variant, new_tokens: int, probe: bool
) -> dict[str, float] | None:
    """One generation of ``variant``; ``None`` (and ``variant.error`` set) if it raised."""
    import tokenlean

    tokens: dict[str, int] = {}
    counting = _count_tokens(model, tokens) if probe else contextlib.nullcontext()
    handle = None
    try:
        if variant.label == "limit":
            inputs = work.inputs(keep_count(variant.retain, work.visual_tokens))
            with limit_image_features(model, variant.retain), counting:
                sample = time_generation(model, inputs, new_tokens)
        else:
            if variant.method is not None:
                handle = tokenlean.patch(model, variant.method, retain_ratio=variant.retain, **variant.params)
                if variant.effective_params is None:
                    with contextlib.suppress(Exception):
                        variant.effective_params = handle.method.params()
            with counting:
                sample = time_generation(model, work.inputs(), new_tokens)
    except Exception as exc:  # a missing or failing method must not stop the run
        variant.error = f"{type(exc).__name__}: {exc}".strip()[:500]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    finally:
        if handle is not None and handle.active:
            handle.remove()
    if probe and tokens:
        text = work.text_tokens
        variant.tokens = {
            "seq_len_layer0": tokens.get("layer0", 0),
            "visual_layer0": tokens.get("layer0", 0) - text,
            "visual_last_layer": tokens.get("last_layer", 0) - text,
        }
    return sample


def make_variants(retains: list[float], methods: list[str]) -> list[Variant]:
    """``full``, then per retain ratio its ``limit`` (none at 1.0: that is ``full``) and every method."""
    variants = [Variant("full", 1.0)]
    for retain in retains:
        if retain < 1.0:
            variants.append(Variant("limit", retain))
        for label in methods:
            name, params = _method_spec(label)
            variants.append(Variant(label, retain, method=name, params=params))
    return variants


def _method_spec(label: str) -> tuple[str, dict[str, Any]]:
    """A :data:`METHODS` label, or ``name:k=v,...`` for any registered method."""
    if label in METHODS:
        name, params = METHODS[label]
        return name, dict(params)
    name, _, text = label.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, raw = item.partition("=")
        params[key.strip()] = _parse_value(raw.strip())
    return name, params


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(raw)
    return raw


# --------------------------------------------------------------------------- one block


def measure_block(
    model: torch.nn.Module,
    work: Workload,
    variants: list[Variant],
    *,
    new_tokens: int,
    repeats: int,
    warmup: int,
    deadline: float,
    log: Callable[[str], None],
) -> int:
    """Warm-up then timed rounds; each round runs every variant once (order rotated per round).

    Returns the number of timed rounds run: fewer than ``repeats`` when the block would pass
    ``deadline`` (a ``time.time()`` value), but at least one.
    """
    rounds = 0
    for index in range(warmup + repeats):
        started = time.time()
        timed = index >= warmup
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if variant.error is not None:
                continue
            sample = _run_variant(model, work, variant, new_tokens, probe=index == 0)
            if sample is not None and timed:
                variant.samples.append(sample)
        took = time.time() - started
        rounds += timed
        label = f"round {index - warmup + 1}/{repeats}" if timed else f"warm-up {index + 1}/{warmup}"
        log(f"{work.name} batch {work.batch}: {label} took {took:.1f} s")
        if timed and time.time() + took > deadline and index + 1 < warmup + repeats:
            log(f"{work.name} batch {work.batch}: stopping after {rounds} timed round(s) (time budget)")
            break
        if index == warmup - 1 and repeats:
            left = deadline - time.time()
            allowed = repeats if left >= took * repeats else max(1, int(left / max(took, 1e-9)))
            log(
                f"{work.name} batch {work.batch}: {repeats} timed rounds need ~{took * repeats:.0f} s "
                f"(estimate from the warm-up); the time budget allows {allowed}"
            )
    return rounds


def summarize(values: list[float]) -> dict[str, Any]:
    finite = sorted(v for v in values if v == v and math.isfinite(v))
    if not finite:
        return {"median": None, "p25": None, "p75": None, "n": 0, "values": values}
    return {
        "median": statistics.median(finite),
        "p25": _percentile(finite, 25),
        "p75": _percentile(finite, 75),
        "n": len(finite),
        "values": values,
    }


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def block_rows(model_name: str, work: Workload, variants: list[Variant]) -> list[dict[str, Any]]:
    """One JSON row per variant: medians, per-round values, paired ratios to the limit and to full."""
    by_key = {v.key: v for v in variants}
    full = by_key[("full", 1.0)]
    rows = []
    for variant in variants:
        limit = full if variant.retain >= 1.0 else by_key.get(("limit", variant.retain))
        visual_in = (
            keep_count(variant.retain, work.visual_tokens) if variant.label == "limit" else work.visual_tokens
        )
        row: dict[str, Any] = {
            "model": model_name,
            "batch": work.batch,
            "variant": variant.label,
            "method": variant.method,
            "params": variant.effective_params
            or (({"retain_ratio": variant.retain} | variant.params) if variant.method else {}),
            "retain": variant.retain,
            "visual_tokens_full": work.visual_tokens,
            "visual_tokens_input": visual_in,
            "text_tokens": work.text_tokens,
            **variant.tokens,
            "rounds": len(variant.samples),
            "error": variant.error,
        }
        for metric in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_mb"):
            row[metric] = summarize([s[metric] for s in variant.samples])
        paired = variant is not limit and limit is not None and not variant.error and not limit.error
        for name, base in (("ratio_to_limit", limit if paired else None), ("speedup_vs_full", full)):
            if base is None or variant is full or variant.error or base.error:
                row[name] = None
                continue
            n = min(len(base.samples), len(variant.samples))
            ratios = [base.samples[i]["prefill_ms"] / variant.samples[i]["prefill_ms"] for i in range(n)]
            row[name] = summarize(ratios)
        if variant.label == "limit":
            row["ratio_to_limit"] = None
        ratio = row["ratio_to_limit"]
        row["within_10pct"] = None if not ratio or ratio["median"] is None else ratio["median"] >= GOAL_RATIO
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    import tokenlean

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenlean": getattr(tokenlean, "__version__", "?"),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    return info


def _fmt(summary: dict | None, digits: int = 1) -> str:
    if not summary or summary.get("median") is None:
        return "—"
    return f"{summary['median']:.{digits}f}"


def _fmt_ratio(summary: dict | None) -> str:
    if not summary or summary.get("median") is None:
        return "—"
    return f"{summary['median']:.3f} [{summary['p25']:.3f}, {summary['p75']:.3f}]"


def _visual_cell(row: dict[str, Any]) -> str:
    layer0 = row.get("visual_layer0")
    last = row.get("visual_last_layer")
    if layer0 is None:
        return str(row["visual_tokens_input"]) if row["variant"] in ("full", "limit") else "?"
    return f"{layer0}" if last == layer0 or last is None else f"{layer0} → {last}"


TABLE_HEADER = (
    "| variant | retain | visual tokens (layer 0 → last) | prefill ms | TTFT ms | decode tok/s | peak MB "
    "| prefill × vs full | ratio to limit [p25, p75] | within 10% |"
)


def render_markdown(record: dict[str, Any]) -> str:
    machine = record["machine"]
    settings = record["settings"]
    where = machine.get("gpu") or machine.get("cpu") or machine["device"]
    lines = [
        "# Visual-token pruning latency"
        + (
            " (tiny models)"
            if settings["tiny"]
            else " (real token counts, tiny widths)"
            if settings["shrink"]
            else ""
        ),
        "",
        f"{where}; torch {machine['torch']}, transformers {machine['transformers']}; "
        f"{settings['dtype']}; {settings['new_tokens']} new tokens; medians of up to {settings['repeats']} "
        f"timed rounds after {settings['warmup']} warm-up round(s); {record['elapsed_s']:.0f} s in all.",
        "",
        "Rows: `full` = unpatched, every visual token; `limit` = the unpatched model fed the kept number "
        "of visual tokens directly (vision tower included, no selection) — the fastest pruning can be; "
        "methods = `tokenlean.patch(model, name, retain_ratio=r)`. `ratio to limit` = limit prefill / "
        f"method prefill, paired per round (goal ≥ {GOAL_RATIO:.3f}, i.e. within 10 %); "
        "`prefill × vs full` = full prefill / row prefill, paired per round. Visual tokens: what enters "
        "the first decoder layer → the last one (FastV-style pruning inside the decoder shows both).",
        "",
    ]
    for model_name, batch in record["blocks"]:
        rows = [r for r in record["rows"] if r["model"] == model_name and r["batch"] == batch]
        if not rows:
            continue
        first = rows[0]
        lines += [
            f"## {model_name}, batch {batch}",
            "",
            f"{first['visual_tokens_full']} visual + {first['text_tokens']} text tokens per sample "
            f"(`{REAL.get(model_name, {}).get('checkpoint', model_name)}`).",
            "",
            TABLE_HEADER,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in rows:
            if row["error"]:
                lines.append(
                    f"| {row['variant']} | {row['retain']:.0%} | — | error: {_md_escape(_short(row['error']))} "
                    "| | | | | | |"
                )
                continue
            within = row["within_10pct"]
            lines.append(
                f"| {row['variant']} | {row['retain']:.0%} | {_visual_cell(row)} | {_fmt(row['prefill_ms'])} "
                f"| {_fmt(row['ttft_ms'])} | {_fmt(row['decode_tokens_per_s'])} | {_fmt(row['peak_mb'], 0)} "
                f"| {_fmt(row['speedup_vs_full'], 2)} | {_fmt_ratio(row['ratio_to_limit'])} "
                f"| {'—' if within is None else ('yes' if within else 'no')} |"
            )
        lines.append("")
    lines += ["## Notes", ""] + [f"* {note}" for note in notes(record)] + [""]
    return "\n".join(lines)


def _short(error: str, limit: int = 120) -> str:
    """The first sentence of an error (the JSON keeps it whole), cut at ``limit`` characters."""
    head = error.split(". ")[0]
    return head if len(head) <= limit else head[: limit - 1] + "…"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def notes(record: dict[str, Any]) -> list[str]:
    out = []
    settings = record["settings"]
    if record["machine"]["device"].startswith("cpu"):
        out.append(
            "Tiny widths on the CPU: every forward is dominated by fixed per-call overhead "
            "(Python, kernel dispatch), so these figures check the code path, not the speed of pruning."
        )
    else:
        out.append(
            "Random weights with the real shapes: latency does not depend on weight values (the "
            "methods select among random features, with the same cost)."
        )
        out.append(
            "Batch 1 on a 7B decoder is bound by weight reads: every forward pass reads ~13.5 GB of "
            "weights whatever the number of tokens, so with few tokens prefill stops shrinking with "
            "them (issue measurement on an H100, plain LLaVA-1.5 decoder: 23.0 → 19.1 ms). Pruning "
            "pays most at batch 8 and for LLaVA-NeXT's ~2,900 visual tokens (H100, plain decoder: "
            "LLaVA-NeXT 2,944 → 352 tokens 94.9 → 20.9 ms at batch 1; LLaVA-1.5 8 × 640 → 8 × 122 "
            "tokens 157.7 → 33.0 ms at batch 8)."
        )
    for model_name, batch in record["blocks"]:
        rows = {
            (r["variant"], r["retain"]): r
            for r in record["rows"]
            if r["model"] == model_name and r["batch"] == batch
        }
        full, limit = rows.get(("full", 1.0)), rows.get(("limit", min(settings["retains"])))
        if full and limit and full["prefill_ms"]["median"] and limit["prefill_ms"]["median"]:
            out.append(
                f"{model_name}, batch {batch}: prefill {full['prefill_ms']['median']:.1f} ms with all "
                f"{full['visual_tokens_full']} visual tokens, {limit['prefill_ms']['median']:.1f} ms at the "
                f"{limit['retain']:.0%} limit ({full['prefill_ms']['median'] / limit['prefill_ms']['median']:.2f}×)."
            )
    out.append(
        "Prefill includes the vision tower on every crop and uses `logits_to_keep=1` (as `generate` "
        "does); TTFT adds the argmax and the copy of the first token to the host."
    )
    errors = sorted({(r["variant"], r["error"].split(":")[0]) for r in record["rows"] if r["error"]})
    if errors:
        out.append(
            "Rows with errors (recorded, run continued): " + ", ".join(f"{v} ({e})" for v, e in errors) + "."
        )
    return out


def write_results(out: Path, record: dict[str, Any]) -> None:
    from tokenlean._io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", record)
    atomic_write_text(out / "results.md", render_markdown(record))


# --------------------------------------------------------------------------- main

TINY = {"llava": dict(text=(2, 6), vocab=(1, 100)), "llava_next": dict(text=(2, 6), vocab=(1, 100))}
GPU_TEXT = dict(text=(5, 59), vocab=(3, 32000))  # 64 text tokens: 576 + 64 = 640 for LLaVA-1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default under benchmarks/results/)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test models on the CPU, float32")
    parser.add_argument("--shrink", action="store_true", help="real token counts, tiny widths (CPU check)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="llava-1.5-7b llava-next-7b (or llava llava_next with --tiny)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--retains", nargs="+", type=float, default=list(RETAINS))
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        help=f"labels among {', '.join(METHODS)} or `name:k=v,...` specs; none for full/limit only",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated (default 8; --quick 4)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds for the whole run (GPU default 270)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 1 with --tiny, else torch's)"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 new tokens (unless given)")
    args = parser.parse_args(argv)
    for name, default, quick in (("repeats", 5, 2), ("warmup", 1, 1), ("new_tokens", 8, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if any(not 0 < r <= 1 for r in args.retains):
        parser.error("--retains must be in (0, 1]")
    if args.new_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--new-tokens and --repeats must be >= 1, --warmup >= 0")
    cpu_mode = args.tiny or args.shrink
    device = torch.device(args.device or ("cpu" if cpu_mode else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    models = args.models or (["llava", "llava_next"] if args.tiny else list(REAL))
    unknown = sorted(set(models) - set(TINY if args.tiny else REAL))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(TINY if args.tiny else REAL)}")
    threads = args.threads or (1 if args.tiny else None)
    previous_threads = torch.get_num_threads()
    if threads:  # the tiny models gain nothing from threads, and shared machines make them noisy
        torch.set_num_threads(threads)
    try:
        return run(args, device, dtype, models)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, models: list[str]) -> int:
    """Measure every block, rewriting the results after each; 0 unless a full/limit row failed."""
    from tokenlean._io import ensure_writable_dir
    from tokenlean.testing import tiny_model

    cpu_mode = args.tiny or args.shrink
    out = args.out or (OUT_TINY if args.tiny else OUT_GPU)
    budget = args.budget_s if args.budget_s is not None else (math.inf if cpu_mode else 270.0)
    retains = sorted(set(args.retains), reverse=True)
    ensure_writable_dir(out)
    started = time.time()
    deadline = started + budget

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {message}", flush=True)

    record: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {
            "tiny": args.tiny,
            "shrink": args.shrink,
            "models": models,
            "batches": args.batches,
            "retains": retains,
            "methods": args.methods,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "new_tokens": args.new_tokens,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "budget_s": None if math.isinf(budget) else budget,
            "dtype": str(dtype).removeprefix("torch."),
            "weights": "random" + ("" if args.tiny else " (real configs)"),
            "goal_ratio_to_limit": GOAL_RATIO,
        },
        "blocks": [],
        "rows": [],
        "elapsed_s": 0.0,
    }
    n_variants = len(make_variants(retains, args.methods))
    log(
        f"{len(models)} model(s) x batches {args.batches} x {n_variants} variants, "
        f"{args.warmup}+{args.repeats} rounds, {args.new_tokens} new tokens on {device}; "
        + ("no time budget" if math.isinf(budget) else f"budget {budget:.0f} s")
    )
    ok = True
    for model_index, model_name in enumerate(models):
        log(f"building {model_name}")
        if args.tiny:
            model = tiny_model(model_name).to(device, dtype)
            text = TINY[model_name]
        else:
            model = build_real(model_name, device, dtype, shrink=args.shrink)
            text = GPU_TEXT
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        params = sum(p.numel() for p in model.parameters())
        log(f"built {model_name}: {params / 1e6:,.1f} M parameters")
        for batch in args.batches:
            work = make_workload(model_name, model, batch, **text)
            variants = make_variants(retains, args.methods)
            log(
                f"{model_name} batch {batch}: {work.visual_tokens} visual + {work.text_tokens} text tokens "
                f"per sample ({work.batch} x {work.visual_tokens + work.text_tokens})"
            )
            # this block's share of the time left, by cost; later models still have to be built (~25 s each)
            remaining = [(m, b) for m in models[model_index:] for b in args.batches]
            remaining = remaining[remaining.index((model_name, batch)) :]
            reserve = 0.0 if cpu_mode else 25.0 * (len(models) - model_index - 1)
            share = (deadline - time.time() - reserve) * _weight(model_name, batch)
            share /= sum(_weight(m, b) for m, b in remaining)
            measure_block(
                model,
                work,
                variants,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                warmup=args.warmup,
                deadline=time.time() + max(share, 0.0),
                log=log,
            )
            rows = block_rows(model_name, work, variants)
            ok &= not any(r["error"] for r in rows if r["variant"] in ("full", "limit"))
            for variant in variants:
                if variant.error:
                    log(
                        f"{model_name} batch {batch}: {variant.label}@{variant.retain:g} failed: {variant.error[:200]}"
                    )
            record["blocks"].append([model_name, batch])
            record["rows"].extend(rows)
            record["elapsed_s"] = round(time.time() - started, 1)
            write_results(out, record)
            del work
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["elapsed_s"] = round(time.time() - started, 1)
    write_results(out, record)
    print(render_markdown(record), flush=True)
    log(f"done; wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if ok else 1


#: prompt tokens per sample, for sharing the time budget between blocks before a model is built
_APPROX_TOKENS = {"llava-1.5-7b": 640, "llava-next-7b": 2992}


def _weight(model_name: str, batch: int) -> float:
    """Relative cost of a model/batch block: prompt tokens, plus the decode steps (~8k tokens' worth)."""
    return batch * _APPROX_TOKENS.get(model_name, 1000) + 8000


if __name__ == "__main__":
    sys.exit(main())
