"""Long context in the harness: the ``long`` workload (what is timed), the ``passkey`` and ``long_perplexity`` tasks.

* ``long`` workload (``--workload long:lengths=1024+2048+4096,new_tokens=32``): for every
  context length (``+``-separated, as the harness's list options are), a prompt cut from the
  bench text to that many tokens is prefilled (the LM head on its last position only, as
  ``generate()`` prefills) and then ``new_tokens`` greedy decode steps run
  on the KV cache the (patched) model creates itself, as ``generate()`` would: the unpatched
  model's ``DynamicCache``, ``sink_window``'s evicting ``SinkWindowCache``. Per length and
  variant: prefill time (``ctx<L>_prefill_s``), the median latency of one decode step
  (``ctx<L>_decode_token_s``), the KV cache actually held after the prefill and at the end
  (``ctx<L>_kv_prefill_mb``, ``ctx<L>_kv_mb``: the bytes of the cache's key and value tensors,
  summed over its layers), the tokens it holds at the end (``ctx<L>_kv_tokens``: the context
  plus ``new_tokens`` for a full cache, ``sink_tokens + window`` for an evicting one, every
  token for block retrieval), how many of them one decode step attends (``ctx<L>_attended_tokens``:
  the cache's ``attended_length()`` where it has one, e.g. block retrieval's sinks + top-k blocks +
  window; else every token held) and peak
  memory (``ctx<L>_peak_memory_mb``: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
  peak RSS on CPU, reset before each length). Every round runs every variant once over all
  lengths, the variants in rotating order; ratios against the baseline are paired per round and
  length (``ctx<L>_decode``, ``ctx<L>_prefill``, ``ctx<L>_kv_memory``, ``ctx<L>_peak_memory``).
  The headline's speed × is the decode step at the longest context; its memory × is peak memory
  there on CUDA and the KV cache held there on CPU (where peak RSS is dominated by the weights
  and the allocator). It shows whether an evicting cache keeps decode latency and memory flat
  while full attention grows with the context.
* ``passkey`` task (``--task passkey:lengths=1024+2048,n=20``): passkey retrieval (Mohtashami &
  Jaggi, 2023) with the documents of the lm-eval task pack (:func:`~tokenlean.eval.task_pack.passkey_docs`:
  the same seeded keys and depths per length and trial), counted with the model's own tokenizer
  so that each prompt has at most ``length`` tokens. The model continues the prompt greedily
  (at most ``max_new_tokens`` tokens, up to a line break, as the pack's ``generate_until``);
  correct = the first number generated is the key (the pack's ``process_passkey``). Accuracy per
  length and overall with 95 % Wilson intervals; one row per (trial, variant) in
  ``samples.jsonl``, so an interrupted run resumes.
* ``long_perplexity`` task (``--task long_perplexity:lengths=1024+4096+16384``): perplexity of
  held-out text at each length, each window read in chunks on the cache the (patched) model
  creates itself (:func:`streamed_nll`), so that evicting and retrieving caches are scored on what
  they keep; per-length perplexity, its ratio to the baseline's and a plot against length.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tokenlean.errors import EvalError
from tokenlean.patching import cache_keyword, takes_logits_to_keep

from .context import BenchContext
from .latency import _cache_of, _Clock, _peak_memory_mb, _reset_peak_memory
from .stats import paired_bootstrap_diff, wilson_interval
from .tasks import Example, Task, register_task, text_token_ids
from .variants import Variant
from .workloads import Workload, register_workload

__all__ = [
    "LongContextWorkload",
    "LongPerplexityTask",
    "PasskeyTask",
    "attended_length",
    "kv_cache_bytes",
    "kv_cache_length",
    "long_metric",
    "parse_lengths",
    "streamed_nll",
]

DEFAULT_LENGTHS = (1024, 2048, 4096)
#: per-length metrics of the long workload: name -> (unit, higher is better)
_LENGTH_METRICS: dict[str, tuple[str, bool]] = {
    "prefill_s": ("s", False),
    "decode_token_s": ("s", False),
    "kv_prefill_mb": ("MB", False),
    "kv_mb": ("MB", False),
    "kv_tokens": ("tokens", False),
    "attended_tokens": ("tokens", False),
    "peak_memory_mb": ("MB", False),
}
#: per-length speedups: key -> metric
_LENGTH_SPEEDUPS = {
    "prefill": "prefill_s",
    "decode": "decode_token_s",
    "kv_memory": "kv_mb",
    "peak_memory": "peak_memory_mb",
}


def long_metric(length: int, name: str) -> str:
    """The record key of a per-length metric or speedup: ``ctx<length>_<name>``."""
    return f"ctx{int(length)}_{name}"


def parse_lengths(value: Any, what: str) -> tuple[int, ...]:
    """A list of context lengths from an option: ints, or a string of ints separated by ``+``.

    Sorted ascending; empty, non-integer, non-positive or repeated lengths raise :class:`EvalError`.
    """
    from .prompt_tasks import _split_option

    items = _split_option(value)
    if not items:
        raise EvalError(f"{what}: lengths is empty; give token counts separated by '+', e.g. 1024+2048")
    lengths = []
    for item in items:
        try:
            number = int(item) if isinstance(item, str) else item
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise EvalError(f"{what}: lengths must be positive integers separated by '+', got {value!r}")
        lengths.append(number)
    if len(set(lengths)) != len(lengths):
        raise EvalError(f"{what}: a length is given twice: {value!r}")
    return tuple(sorted(lengths))


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"{what} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# the KV cache a model holds
# --------------------------------------------------------------------------------------------


def _layer_tensors(cache: Any) -> list[torch.Tensor]:
    """The key and value tensors of every layer of ``cache`` (a transformers ``Cache`` or legacy tuples)."""
    tensors: list[Any] = []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif isinstance(cache, (tuple, list)):
        for layer in cache:
            tensors += list(layer[:2]) if isinstance(layer, (tuple, list)) else []
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def kv_cache_bytes(cache: Any) -> int:
    """Bytes the key and value tensors of ``cache`` hold, over all layers.

    Counted by storage (each storage once), so a tensor that is a view into a larger buffer counts
    the whole buffer it keeps alive: what the cache actually holds, which is what a bounded
    (evicting) cache saves.
    """
    storages: dict[tuple[str, int], int] = {}
    for tensor in _layer_tensors(cache):
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        storages[key] = max(storages.get(key, 0), storage.nbytes())
    return sum(storages.values())


def kv_cache_length(cache: Any) -> int:
    """Tokens (slots) ``cache`` holds per layer: the longest layer's key length."""
    lengths = [t.shape[-2] for t in _layer_tensors(cache) if t.dim() >= 3]
    return max(lengths, default=0)


def attended_length(cache: Any) -> int:
    """Cached tokens one decode step attends: what the cache says (``attended_length()``, e.g. block
    retrieval's sinks + top-k blocks + window), else every token it holds."""
    method = getattr(cache, "attended_length", None)
    return int(method()) if callable(method) else kv_cache_length(cache)


# --------------------------------------------------------------------------------------------
# the long workload
# --------------------------------------------------------------------------------------------


@register_workload("long")
class LongContextWorkload(Workload):
    """Prefill and ``new_tokens`` greedy decode steps at each of ``lengths`` context tokens (batch 1)."""

    primary = "decode"  # replaced per instance: the decode step at the longest context
    kinds = ("baseline", "patch")

    def __init__(
        self,
        bench: BenchContext,
        lengths: Any = DEFAULT_LENGTHS,
        new_tokens: int = 32,
        text: str = "paul-graham-essays",
    ) -> None:
        super().__init__(bench)
        self.lengths = parse_lengths(lengths, "long workload")
        self.new_tokens = _positive(new_tokens, "long workload: new_tokens")
        self.text = str(text)
        ids = text_token_ids(bench.tokenizer, self.text)
        longest = self.lengths[-1]
        if ids.numel() < longest:
            raise EvalError(
                f"long workload: {self.text!r} has {ids.numel()} tokens, fewer than the longest context ({longest})"
            )
        self.prompts = {n: ids[:n][None].to(bench.device) for n in self.lengths}
        cuda = bench.device.type == "cuda"
        self.metrics = {long_metric(n, m): spec for n in self.lengths for m, spec in _LENGTH_METRICS.items()}
        self.speedups = {
            long_metric(n, key): long_metric(n, metric)
            for n in self.lengths
            for key, metric in _LENGTH_SPEEDUPS.items()
        }
        # the headline's "memory ×" (speedup key peak_memory) at the longest context
        self.speedups["peak_memory"] = long_metric(longest, "peak_memory_mb" if cuda else "kv_mb")
        self.primary = long_metric(longest, "decode")
        peak, memory = (
            ("CUDA max allocated", "peak memory") if cuda else ("process peak RSS", "the KV cache held")
        )
        self.note = (
            f"Per context length: prefill, the median of {self.new_tokens} greedy decode steps on the cache the "
            "model creates itself (as generate() does), the KV cache held after the prefill and at the end (bytes "
            f"of its key/value tensors) and the tokens it holds, peak memory ({peak}). Each round runs a variant "
            f"over every length. Headline: speed × = the decode step at {longest} tokens; memory × = {memory} at "
            f"{longest} tokens."
        )

    def options(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "new_tokens": self.new_tokens, "text": self.text}

    def measure(self, variant: Variant) -> dict[str, float]:
        sample: dict[str, float] = {}
        for length in self.lengths:
            for name, value in self._measure_length(self.prompts[length]).items():
                sample[long_metric(length, name)] = value
        return sample

    @torch.inference_mode()
    def _measure_length(self, input_ids: torch.Tensor) -> dict[str, float]:
        model = self.bench.model
        device = input_ids.device
        clock = _Clock(device)
        # the model makes its own cache; the LM head runs on the last position only, as generate() prefills
        prefill = {"logits_to_keep": 1} if takes_logits_to_keep(model.forward) else {}
        _reset_peak_memory(device)
        start = clock.mark()
        out = model(input_ids=input_ids, use_cache=True, **prefill)
        after_prefill = clock.mark()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = _cache_of(out)
        del out
        kv_prefill = kv_cache_bytes(cache)
        keyword = cache_keyword(model.forward)
        marks = [clock.mark()]
        for _ in range(self.new_tokens):
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            cache = _cache_of(out)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
            marks.append(clock.mark())
        token.cpu()
        steps = [clock.seconds(a, b) for a, b in zip(marks[:-1], marks[1:])]
        result = {
            "prefill_s": clock.seconds(start, after_prefill),
            "decode_token_s": float(np.median(steps)),
            "kv_prefill_mb": kv_prefill / 2**20,
            "kv_mb": kv_cache_bytes(cache) / 2**20,
            "kv_tokens": float(kv_cache_length(cache)),
            "attended_tokens": float(attended_length(cache)),
            "peak_memory_mb": _peak_memory_mb(device),
        }
        del cache
        return result


# --------------------------------------------------------------------------------------------
# the passkey task
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def _greedy_text(model: torch.nn.Module, tokenizer: Any, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy continuation of ``input_ids`` (1, n) on the model's own cache, up to a line break or EOS."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    eos = getattr(tokenizer, "eos_token_id", None)
    keyword = cache_keyword(model.forward)
    prefill = {"logits_to_keep": 1} if takes_logits_to_keep(model.forward) else {}
    out = model(input_ids=ids, use_cache=True, **prefill)  # the LM head on the last position, as generate()
    generated: list[int] = []
    text = ""
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token_id = int(token)
        if eos is not None and token_id == eos:
            break
        generated.append(token_id)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if "\n" in text or step == max_new_tokens - 1:
            break
        out = model(input_ids=token, use_cache=True, **{keyword: _cache_of(out)})
    return text.split("\n", 1)[0]


@register_task("passkey")
class PasskeyTask(Task):
    """Passkey retrieval at each of ``lengths`` prompt tokens (the lm-eval pack's documents, the model's tokenizer).

    Options: ``lengths`` (prompt budgets in the model's tokens, ``+``-separated, default
    1024+2048+4096), ``n`` (trials per length, default 20), ``seed`` (the documents' base seed,
    default 0 as in the pack), ``max_new_tokens`` (default 10 as in the pack), ``baseline_max``
    (default none: the baseline, full attention, runs every length; a length in tokens: it runs
    only lengths up to it, for contexts where full attention is too slow or too big to measure,
    and the patches' longer trials have no paired baseline).

    Row: ``length``, ``trial``, ``depth``, ``prompt_tokens``, ``correct`` (0/1), ``key``,
    ``answer`` (the first number generated, or None) and the generated line. Aggregate:
    ``accuracy`` with ``accuracy_low``/``accuracy_high`` (95 % Wilson), ``k``, ``n`` (over the
    lengths up to ``baseline_max`` when it is set), and per
    length ``length/<L>`` with ``length/<L>_low``, ``length/<L>_high``, ``length/<L>_n``.
    """

    name = "passkey"
    primary = "accuracy"
    higher_is_better = True
    kinds = ("baseline", "patch")
    order = "variant"  # each variant's patch applied once around all its trials
    section = "passkey"

    def __init__(
        self,
        lengths: Any = DEFAULT_LENGTHS,
        n: int = 20,
        seed: int = 0,
        max_new_tokens: int = 10,
        baseline_max: int | None = None,
    ) -> None:
        self.lengths = parse_lengths(lengths, "passkey")
        self.n = _positive(n, "passkey: n")
        self.max_new_tokens = _positive(max_new_tokens, "passkey: max_new_tokens")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EvalError(f"passkey: seed must be an integer, got {seed!r}")
        self.seed = seed
        self.baseline_max = None if baseline_max is None else _positive(baseline_max, "passkey: baseline_max")
        if self.baseline_max is not None and self.baseline_max < self.lengths[0]:
            raise EvalError(
                f"passkey: baseline_max={self.baseline_max} is below every length ({self.lengths[0]} and up): "
                "the baseline would run nothing"
            )

    def config(self) -> dict[str, Any]:
        config = {
            "lengths": list(self.lengths),
            "n": self.n,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.baseline_max is not None:  # earlier runs' configs (and their resumes) stay as they were
            config["baseline_max"] = self.baseline_max
        return config

    def measures(self, variant: Any, example: Example) -> bool:
        if self.baseline_max is None or getattr(variant, "kind", None) != "baseline":
            return True
        return int(example.data["length"]) <= self.baseline_max

    def examples(self, tokenizer: Any) -> list[Example]:
        from .task_pack import passkey_docs

        if tokenizer is None:
            raise EvalError("the passkey task needs the model's tokenizer")
        examples = []
        for length in self.lengths:
            for i, doc in enumerate(passkey_docs(length, self.n, self.seed, counter=tokenizer)):
                prompt = f"{doc['context']} {doc['question']}"
                ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
                if ids.shape[1] > length:
                    raise EvalError(
                        f"passkey: {length} tokens is too short for a passkey prompt "
                        f"(the shortest has {ids.shape[1]} tokens of this tokenizer)"
                    )
                data = {
                    "length": length,
                    "trial": i,
                    "depth": doc["depth"],
                    "key": doc["key"],
                    "input_ids": ids,
                }
                examples.append(Example(id=doc["id"], data=data))
        return examples

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        from .task_pack import first_number, process_passkey

        data = example.data
        text = _greedy_text(bench.model, bench.tokenizer, data["input_ids"], self.max_new_tokens)
        correct = process_passkey({"key": data["key"]}, [text])["acc"]
        return {
            "length": data["length"],
            "trial": data["trial"],
            "depth": data["depth"],
            "prompt_tokens": int(data["input_ids"].shape[1]),
            "correct": float(correct),
            "key": data["key"],
            "answer": first_number(text),
            "generated": text,
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        # with baseline_max, the overall figures pool the lengths the baseline ran, so that every
        # variant's 'accuracy' (and the report's 'kept') compares like with like
        pooled = [r for r in rows if self.baseline_max is None or int(r["length"]) <= self.baseline_max]
        hits = int(round(sum(r["correct"] for r in pooled)))
        low, high = wilson_interval(hits, len(pooled))
        out.update(
            {
                "accuracy": hits / len(pooled) if pooled else float("nan"),
                "accuracy_low": low,
                "accuracy_high": high,
                "k": hits,
                "n": len(pooled),
            }
        )
        for length in self.lengths:
            at = [r for r in rows if int(r["length"]) == length]
            k = int(round(sum(r["correct"] for r in at)))
            low, high = wilson_interval(k, len(at))
            key = f"length/{length}"
            out.update(
                {
                    key: k / len(at) if at else float("nan"),
                    f"{key}_low": low,
                    f"{key}_high": high,
                    f"{key}_n": len(at),
                    f"{key}_tokens": float(np.mean([r["prompt_tokens"] for r in at])) if at else float("nan"),
                }
            )
        return out

    def compare(self, rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy minus the baseline's on the same trials (paired bootstrap, 95 %)."""
        base = {(int(r["length"]), int(r["trial"])): r["correct"] for r in baseline}
        keys = [(int(r["length"]), int(r["trial"])) for r in rows]
        pairs = [(r["correct"], base[k]) for r, k in zip(rows, keys) if k in base]
        if not pairs:
            return {}
        diff, low, high = paired_bootstrap_diff([a for a, _ in pairs], [b for _, b in pairs])
        return {"accuracy_diff": diff, "accuracy_diff_low": low, "accuracy_diff_high": high, "n": len(pairs)}


# --------------------------------------------------------------------------------------------
# perplexity against context length
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def streamed_nll(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int) -> tuple[float, int]:
    """Summed negative log-likelihood of every token of ``input_ids`` (1, n) after the first, and their count.

    The tokens go through the model ``chunk`` at a time on the cache it creates itself (the
    first call passes none), as a long document is read and as ``generate()`` prefills: an
    unpatched model's full cache gives one pass's figure, an evicting or retrieving cache only
    what it keeps. Only one chunk's logits exist at a time; log-probabilities in float32.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    keyword = cache_keyword(model.forward)
    cache: Any = None
    carry: torch.Tensor | None = (
        None  # the previous chunk's last logits: they predict this chunk's first token
    )
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        extra = {keyword: cache} if cache is not None else {}
        out = model(input_ids=piece, use_cache=True, **extra)
        cache = _cache_of(out)
        logits = out.logits[0].float()
        if carry is not None:
            logits = torch.cat([carry, logits], dim=0)
            targets = piece[0]
        else:
            targets = piece[0, 1:]
        scored = logits[: targets.numel()]
        nll -= scored.log_softmax(-1).gather(-1, targets[:, None]).sum().item()
        count += targets.numel()
        carry = logits[-1:]
    return nll, count


@register_task("long_perplexity")
class LongPerplexityTask(Task):
    """Perplexity of held-out long text at each of ``lengths`` tokens, read in chunks through the model's own cache.

    Options: ``lengths`` (window sizes in the model's tokens, ``+``-separated, default
    1024+2048+4096), ``windows`` (windows per length, default 1; window ``w`` of length ``L``
    is tokens ``w*L`` to ``(w+1)*L``, so with one window every length reads the same text from its
    start, each a prefix of the next), ``chunk`` (tokens per forward call, default 512: a
    multiple of ``sink_window``'s and ``block_retrieval``'s default chunks, so their chunked
    passes are unchanged), ``documents`` (``heldout``, the default: the essays no tokenlean
    training command learns from; or ``all``). The text is the bench's ``--text``.

    Each window streams through the (patched) model as :func:`streamed_nll` describes; every
    token after the window's first is scored. Row: ``length``, ``window``, ``nll_sum``,
    ``tokens``. Aggregate: ``perplexity`` over every scored token of every length, and per length
    ``length/<L>`` (perplexity), ``length/<L>_tokens`` and ``length/<L>_windows``. Compare:
    ``length/<L>_ratio``, the variant's perplexity over the baseline's at that length.
    """

    name = "long_perplexity"
    primary = "perplexity"
    higher_is_better = False
    kinds = ("baseline", "patch")
    order = "variant"
    section = "long_perplexity"

    def __init__(
        self,
        lengths: Any = DEFAULT_LENGTHS,
        windows: int = 1,
        chunk: int = 512,
        documents: str = "heldout",
        text: str = "paul-graham-essays",
    ) -> None:
        self.lengths = parse_lengths(lengths, "long_perplexity")
        if min(self.lengths) < 2:
            raise EvalError("long_perplexity: every length must be at least 2 tokens")
        self.windows = _positive(windows, "long_perplexity: windows")
        self.chunk = _positive(chunk, "long_perplexity: chunk")
        if documents not in ("all", "heldout"):
            raise EvalError(f"long_perplexity: documents must be 'all' or 'heldout', got {documents!r}")
        self.documents = documents
        self.text = text

    def config(self) -> dict[str, Any]:
        return {
            "lengths": list(self.lengths),
            "windows": self.windows,
            "chunk": self.chunk,
            "documents": self.documents,
            "text": self.text,
        }

    def examples(self, tokenizer: Any) -> list[Example]:
        if tokenizer is None:
            raise EvalError("the long_perplexity task needs the model's tokenizer")
        ids = text_token_ids(tokenizer, self.text, self.documents)
        needed = self.windows * max(self.lengths)
        if ids.numel() < needed:
            raise EvalError(
                f"long_perplexity: {self.text!r} ({self.documents} documents) has {ids.numel():,} tokens of this "
                f"tokenizer; {self.windows} window(s) of {max(self.lengths):,} need {needed:,}"
            )
        return [
            Example(
                id=f"ppl{n}:{w}", data={"length": n, "window": w, "input_ids": ids[None, w * n : (w + 1) * n]}
            )
            for n in self.lengths
            for w in range(self.windows)
        ]

    def run(self, bench: Any, variant: Any, example: Example, reference: Any) -> dict[str, Any]:
        data = example.data
        nll, tokens = streamed_nll(bench.model, data["input_ids"], self.chunk)
        return {"length": data["length"], "window": data["window"], "nll_sum": nll, "tokens": tokens}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        def perplexity(at: list[dict[str, Any]]) -> float:
            tokens = sum(r["tokens"] for r in at)
            return math.exp(sum(r["nll_sum"] for r in at) / tokens) if tokens else float("nan")

        out: dict[str, float] = {
            "perplexity": perplexity(rows),
            "tokens": float(sum(r["tokens"] for r in rows)),
        }
        for length in self.lengths:
            at = [r for r in rows if int(r["length"]) == length]
            key = f"length/{length}"
            out[key] = perplexity(at)
            out[f"{key}_tokens"] = float(sum(r["tokens"] for r in at))
            out[f"{key}_windows"] = len(at)
        return out

    def compare(self, rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
        """Per length: the variant's perplexity over the baseline's, on the same windows."""
        out: dict[str, Any] = {}
        mine, base = self.aggregate(rows), self.aggregate(baseline)
        for length in self.lengths:
            key = f"length/{length}"
            if math.isfinite(mine[key]) and math.isfinite(base[key]):
                out[f"{key}_ratio"] = mine[key] / base[key]
        return out


# --------------------------------------------------------------------------------------------
# report sections and plots
# --------------------------------------------------------------------------------------------


def _file_stem(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key)


def _stats(record: Mapping[str, Any], name: str, metric: str) -> Mapping[str, Any] | None:
    stats = (record.get("latency") or {}).get(name, {}).get(metric)
    median = None if not stats else stats.get("median")
    return stats if median is not None and math.isfinite(median) else None


def _workload_lengths(workload: Mapping[str, Any]) -> list[int]:
    return [int(n) for n in ((workload.get("options") or {}).get("lengths") or [])]


def _length_axis(ax: Any, lengths: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths))
    ax.set_xticklabels([f"{n:,}" for n in lengths], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("context tokens (log scale)")
    ax.grid(True, alpha=0.3)


def plot_long_context(record: Mapping[str, Any]) -> bytes | None:
    """Decode-step latency and KV cache held against context length, one line per variant (None without data)."""
    from .report import new_figure, png_bytes, variant_colors

    workload = record.get("workload") or {}
    lengths = _workload_lengths(workload)
    if workload.get("name") != "long" or not lengths:
        return None
    colors = variant_colors(record)
    panels = (
        ("decode_token_s", 1e3, "decode step (ms, median; bars p25–p75)"),
        ("kv_mb", 1.0, "KV cache held at the end (MB)"),
    )
    series = {}
    for variant in record["variants"]:
        name = variant["name"]
        for metric, scale, _ in panels:
            points = []
            for n in lengths:
                stats = _stats(record, name, long_metric(n, metric))
                if stats is not None:
                    m = stats["median"] * scale
                    lo = stats.get("p25", stats["median"]) * scale
                    hi = stats.get("p75", stats["median"]) * scale
                    points.append((n, m, max(m - lo, 0.0), max(hi - m, 0.0)))
            if points:
                series[(name, metric)] = points
    if not series:
        return None
    fig = new_figure(10.0, 4.4)
    axes = fig.subplots(1, 2)
    for ax, (metric, _, label) in zip(axes, panels):
        for variant in record["variants"]:
            points = series.get((variant["name"], metric))
            if not points:
                continue
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[[p[2] for p in points], [p[3] for p in points]],
                marker="o",
                ms=5,
                capsize=3,
                lw=1.4,
                color=colors[variant["name"]],
                label=variant["name"],
            )
        _length_axis(ax, lengths)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record['model']['name']}: decode and KV cache against context length", fontsize=10)
    return png_bytes(fig)


def _length_lines(
    record: Mapping[str, Any], entry: Mapping[str, Any], point: Any
) -> tuple[list[int], dict[str, list[Any]]]:
    """A per-length task's lengths, and per variant with data the points ``point(values, n)`` gives (None: no point)."""
    lengths = [int(n) for n in (entry.get("config") or {}).get("lengths") or []]
    lines = {}
    for variant in record["variants"]:
        values = entry["variants"].get(variant["name"]) or {}
        points = [p for n in lengths if (p := point(values, n)) is not None]
        if points:
            lines[variant["name"]] = points
    return lengths, lines


def plot_passkey(record: Mapping[str, Any], entry: Mapping[str, Any], key: str) -> bytes | None:
    """Passkey accuracy against prompt length, one line per variant, 95 % Wilson bars (None without data)."""
    from .report import new_figure, png_bytes, variant_colors

    def point(values: Mapping[str, Any], n: int) -> tuple[int, float, float, float] | None:
        acc = values.get(f"length/{n}")
        if acc is None or not math.isfinite(acc):
            return None
        low, high = values.get(f"length/{n}_low", acc), values.get(f"length/{n}_high", acc)
        return n, 100 * acc, 100 * (acc - low), 100 * (high - acc)

    lengths, lines = _length_lines(record, entry, point)
    if not lines:
        return None
    colors = variant_colors(record)
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(lines.items()):
        shift = 1 + 0.015 * (i - (len(lines) - 1) / 2)  # keep overlapping error bars apart
        ax.errorbar(
            [p[0] * shift for p in points],
            [p[1] for p in points],
            yerr=[[p[2] for p in points], [p[3] for p in points]],
            marker="o",
            ms=5,
            capsize=3,
            lw=1.4,
            color=colors[name],
            label=name,
        )
    _length_axis(ax, lengths)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("passkey accuracy (%), bars: 95% Wilson interval")
    ax.set_title(_plot_title(record, key), fontsize=10)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _plot_title(record: Mapping[str, Any], key: str) -> str:
    """'model: task key', wrapped so that a long list of lengths stays inside the figure."""
    return "\n".join(textwrap.wrap(f"{record['model']['name']}: {key}", 64))


def plot_long_perplexity(record: Mapping[str, Any], entry: Mapping[str, Any], key: str) -> bytes | None:
    """Perplexity against context length, one line per variant (None without data)."""
    from .report import new_figure, png_bytes, variant_colors

    def point(values: Mapping[str, Any], n: int) -> tuple[int, float] | None:
        value = values.get(f"length/{n}")
        return (n, value) if value is not None and math.isfinite(value) else None

    lengths, lines = _length_lines(record, entry, point)
    if not lines:
        return None
    colors = variant_colors(record)
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for name, points in lines.items():
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            ms=5,
            lw=1.4,
            color=colors[name],
            label=name,
        )
    _length_axis(ax, lengths)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(_plot_title(record, key), fontsize=10)
    ax.legend(fontsize=8)
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

    def timing(stats: Mapping[str, Any] | None, scale: float = 1e3) -> str:
        if stats is None:
            return "—"
        text = fmt(stats["median"] * scale)
        p25, p75 = stats.get("p25"), stats.get("p75")
        if p25 is not None and p75 is not None and math.isfinite(p25) and math.isfinite(p75):
            text += f" [{fmt(p25 * scale)}–{fmt(p75 * scale)}]"
        return text

    def ratio(record: Mapping[str, Any], name: str, key: str) -> str:
        stats = (record.get("speedup") or {}).get(name, {}).get(key)
        if not stats or stats.get("median") is None or not math.isfinite(stats["median"]):
            return "—"
        return f"{stats['median']:.2f}× [{stats['p25']:.2f}–{stats['p75']:.2f}]"

    @register_section("workload:long")
    def long_section(record: Any, key: str, workload: Any) -> list:
        lengths = _workload_lengths(workload)
        baseline = record["variants"][0]["name"]
        rows = []
        for n in lengths:
            for variant in record["variants"]:
                name = variant["name"]
                if not record["latency"].get(name):
                    continue

                def get(metric: str, name: str = name, n: int = n) -> Mapping[str, Any] | None:
                    return _stats(record, name, long_metric(n, metric))

                reference = name == baseline
                rows.append(
                    [
                        f"{n:,}",
                        variant_label(record, name),
                        timing(get("prefill_s")),
                        timing(get("decode_token_s")),
                        fmt((get("kv_prefill_mb") or {}).get("median")),
                        fmt((get("kv_mb") or {}).get("median")),
                        fmt((get("kv_tokens") or {}).get("median")),
                        fmt((get("attended_tokens") or {}).get("median")),
                        fmt((get("peak_memory_mb") or {}).get("median")),
                        "1.00×" if reference else ratio(record, name, long_metric(n, "decode")),
                        "1.00×" if reference else ratio(record, name, long_metric(n, "kv_memory")),
                    ]
                )
        if not rows:
            return []
        options = workload.get("options") or {}
        cuda = "cuda" in str((record.get("model") or {}).get("device", ""))
        peak = "CUDA max allocated" if cuda else "process peak RSS (weights included)"
        note = (
            f"Prompts: the first L tokens of the bench text ({options.get('text')}); {options.get('new_tokens')} "
            "greedy decode steps after the prefill, on the cache the model creates itself. Times: median "
            "[p25–p75] over the rounds in ms (decode: the median step of each round). KV cache: bytes of the "
            "cache's key/value tensors after the prefill and at the end (whole buffers, as held), the tokens it "
            "holds at the end, and how many of them one decode step attends. Peak "
            f"memory: {peak}, reset per length. × columns: baseline/variant per paired round, median [p25–p75]; "
            "above 1× is faster or smaller."
        )
        headers = ["context", "variant", "prefill (ms)", "decode step (ms)", "KV after prefill (MB)",
                   "KV at end (MB)", "KV tokens", "attended / step", "peak memory (MB)", "decode ×", "KV memory ×"]  # fmt: skip
        blocks: list = [Table(headers, rows, text_cols=2, note=note)]
        plot = plot_long_context(record)
        if plot:
            caption = (
                "Left: one decode step (ms, median over the rounds; bars p25–p75) against the context length; "
                "right: the KV cache held at the end of decoding (MB). One line per variant."
            )
            blocks.append(Image(plot, "long_context.png", caption))
        return blocks

    def share(values: Mapping[str, Any], key: str) -> str:
        value, low, high = (values.get(k) for k in (key, f"{key}_low", f"{key}_high"))
        if value is None or not math.isfinite(value):
            return "—"
        return f"{100 * value:.1f}% [{100 * low:.0f}–{100 * high:.0f}]"

    @register_section("passkey")
    def passkey_section(record: Any, key: str, entry: Any) -> list:
        config = entry.get("config") or {}
        lengths = [int(n) for n in config.get("lengths") or []]
        baseline = record["variants"][0]["name"]
        compare = entry.get("compare") or {}
        rows = []
        for variant in record["variants"]:
            name = variant["name"]
            values = entry["variants"].get(name)
            if values is None:
                continue
            paired = fmt_accuracy_diff(compare.get(name))
            rows.append(
                [
                    variant_label(record, name),
                    *(share(values, f"length/{n}") for n in lengths),
                    share(values, "accuracy"),
                    fmt_pct(kept(entry, baseline, name)),
                    paired,
                ]
            )

        def mean_tokens(n: int) -> float | None:  # the baseline's, else the first variant's that ran n
            ordered = [entry["variants"].get(baseline), *entry["variants"].values()]
            found = [v.get(f"length/{n}_tokens") for v in ordered if v and v.get(f"length/{n}_n")]
            return found[0] if found else None

        tokens = ", ".join(f"{n:,}: {fmt(t)}" for n in lengths if (t := mean_tokens(n)))
        note = (
            f"{config.get('n')} trials per length (the lm-eval pack's passkey documents, seed {config.get('seed')}: "
            "a 5-digit key at a seeded depth of filler), prompts of at most L tokens of the model's tokenizer "
            f"(mean tokens per length: {tokens or '—'}); greedy continuation of at most "
            f"{config.get('max_new_tokens')} tokens up to a line break; correct = the first number generated is "
            "the key. Cells: accuracy [95% Wilson interval]; Δ vs baseline: paired difference in points on the "
            "same trials [95% bootstrap interval]."
        )
        if config.get("baseline_max"):
            note += (
                f" The baseline ran lengths up to {int(config['baseline_max']):,} tokens only (baseline_max): 'all' "
                "pools those lengths for every variant, and Δ pairs only the trials the baseline ran."
            )
        headers = ["variant", *(f"{n:,} tokens" for n in lengths), "all ↑", "kept", "Δ vs baseline (pp)"]
        blocks: list = [
            Text("primary metric: accuracy (higher is better)."),
            Table(headers, rows, note=note),
        ]
        plot = plot_passkey(record, entry, key)
        if plot:
            caption = (
                "Passkey accuracy against prompt length, one line per variant; bars: 95% Wilson intervals."
            )
            blocks.append(Image(plot, f"{_file_stem(key)}_accuracy.png", caption))
        return blocks

    @register_section("long_perplexity")
    def long_perplexity_section(record: Any, key: str, entry: Any) -> list:
        config = entry.get("config") or {}
        lengths = [int(n) for n in config.get("lengths") or []]
        compare = entry.get("compare") or {}
        rows = []
        for variant in record["variants"]:
            name = variant["name"]
            values = entry["variants"].get(name)
            if values is None:
                continue
            cells = []
            for n in lengths:
                text = fmt(values.get(f"length/{n}"))
                ratio_value = (compare.get(name) or {}).get(f"length/{n}_ratio")
                if ratio_value is not None:
                    text += f" ({ratio_value:.2f}×)"
                cells.append(text)
            rows.append([variant_label(record, name), *cells, fmt(values.get("perplexity"))])
        if not rows:
            return []
        note = (
            f"Perplexity of {config.get('documents')} documents of {config.get('text')}: per length, "
            f"{config.get('windows')} window(s) of L tokens (window w: tokens w·L to (w+1)·L), read "
            f"{config.get('chunk')} tokens per forward call on the cache the model creates itself; every "
            "token after a window's first is scored. In brackets: the variant's perplexity over the "
            "baseline's at that length. all: every scored token of every length pooled."
        )
        headers = ["variant", *(f"{n:,} tokens" for n in lengths), "all ↓"]
        blocks: list = [
            Text("primary metric: perplexity (lower is better)."),
            Table(headers, rows, note=note),
        ]
        plot = plot_long_perplexity(record, entry, key)
        if plot:
            caption = "Perplexity against context length, one line per variant (log scales)."
            blocks.append(Image(plot, f"{_file_stem(key)}_perplexity.png", caption))
        return blocks


_register_sections()
