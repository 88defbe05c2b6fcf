"""Long context in the harness (tokenlean.eval.long_context): the ``long`` workload and the ``passkey`` task.

A tiny random Llama with the real SmolLM2 tokenizer; the workload and the task run through
``run_bench`` itself (records, report sections and plots, resume), with ``sink_window``'s
evicting cache beside the unpatched model's full one.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

import tokenlean
from tokenlean.errors import EvalError
from tokenlean.eval import BenchConfig, run_bench
from tokenlean.eval import long_context as L
from tokenlean.eval import report as R
from tokenlean.eval.context import BenchContext
from tokenlean.eval.stats import wilson_interval
from tokenlean.eval.task_pack import passkey_docs
from tokenlean.eval.tasks import get_task
from tokenlean.eval.variants import CompressorPool
from tokenlean.eval.workloads import get_workload
from tokenlean.testing import tiny_model

SINK = "sink_window:sink_tokens=4,window=64"
WORKLOAD = "long:lengths=128+256,new_tokens=4"
TASK = "passkey:lengths=128+256,n=3"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenlean.zoo.fetch("smollm2-135m", progress=False))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


def _bench(model, tokenizer) -> BenchContext:
    return BenchContext(model, tokenizer, "tiny-llama", CompressorPool(shared_models={}))


def _config(**overrides) -> BenchConfig:
    settings = dict(model="tiny-llama", methods=[SINK], tasks=[TASK], workload=WORKLOAD, repeats=2, warmup=0)
    settings.update(overrides)
    return BenchConfig(**settings)


# -- options ---------------------------------------------------------------------------------


def test_lengths_and_options(model, tokenizer):
    assert L.parse_lengths("1024+2048+4096", "x") == (1024, 2048, 4096)
    assert L.parse_lengths("256+128", "x") == (128, 256)  # sorted
    assert L.parse_lengths(512, "x") == (512,)
    assert L.parse_lengths([64, 32], "x") == (32, 64)
    bench = _bench(model, tokenizer)
    workload = get_workload(WORKLOAD, bench)
    assert workload.options() == {"lengths": [128, 256], "new_tokens": 4, "text": "paul-graham-essays"}
    assert workload.primary == "ctx256_decode"
    assert workload.speedups["peak_memory"] == "ctx256_kv_mb"  # CPU: the KV cache held
    assert {"ctx128_decode_token_s", "ctx256_kv_tokens", "ctx256_peak_memory_mb"} <= set(workload.metrics)
    assert [v.shape for v in workload.prompts.values()] == [(1, 128), (1, 256)]
    assert get_workload("long", bench, new_tokens=7).new_tokens == 7  # the bench's --new-tokens
    task = get_task(TASK)
    assert task.name == TASK and task.config() == {
        "lengths": [128, 256],
        "n": 3,
        "seed": 0,
        "max_new_tokens": 10,
    }


@pytest.mark.parametrize(
    "spec, match",
    [
        ("long:lengths=", "empty"),
        ("long:lengths=+", "empty"),
        ("long:lengths=0", "positive integers"),
        ("long:lengths=128+-5", "positive integers"),
        ("long:lengths=128+abc", "positive integers"),
        ("long:lengths=1.5", "positive integers"),
        ("long:lengths=128+128", "twice"),
        ("long:new_tokens=0", "new_tokens must be a positive integer"),
        ("long:lengths=128,new_tokens=-1", "new_tokens must be a positive integer"),
        ("long:lengths=100000000", "fewer than the longest context"),
        ("long:lenghts=128", "no option"),
    ],
)
def test_bad_workload_options(model, tokenizer, spec, match):
    with pytest.raises(EvalError, match=match):
        get_workload(spec, _bench(model, tokenizer))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("passkey:lengths=", "empty"),
        ("passkey:lengths=0", "positive integers"),
        ("passkey:lengths=1024+-1", "positive integers"),
        ("passkey:n=0", "n must be a positive integer"),
        ("passkey:n=-3", "n must be a positive integer"),
        ("passkey:max_new_tokens=0", "max_new_tokens must be a positive integer"),
    ],
)
def test_bad_task_options(spec, match):
    with pytest.raises(EvalError, match=match):
        get_task(spec)


def test_bad_specs_fail_in_the_config_and_short_passkeys_are_refused(tokenizer):
    with pytest.raises(EvalError, match="no option"):
        BenchConfig(workload="long:length=128")
    with pytest.raises(EvalError, match="too short"):
        get_task("passkey:lengths=16,n=1").examples(tokenizer)


# -- the KV cache held -----------------------------------------------------------------------


def test_kv_cache_bytes_and_length(model):
    ids = torch.randint(0, 1000, (1, 20))
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    )  # float32 keys + values
    assert isinstance(cache, DynamicCache)
    assert L.kv_cache_length(cache) == 20
    assert L.kv_cache_bytes(cache) == 20 * per_token
    assert L.kv_cache_bytes(DynamicCache()) == 0 and L.kv_cache_length(DynamicCache()) == 0
    keys = torch.zeros(1, 2, 10, 8)
    legacy = ((keys, torch.zeros(1, 2, 10, 8)),)
    assert L.kv_cache_bytes(legacy) == 2 * keys.numel() * 4 and L.kv_cache_length(legacy) == 10
    view = ((keys[:, :, :3], keys[:, :, 3:6]),)  # views keep their whole buffer alive: counted once
    assert L.kv_cache_bytes(view) == keys.numel() * 4 and L.kv_cache_length(view) == 3


# -- the passkey task ------------------------------------------------------------------------


def test_passkey_examples_are_the_packs_documents(tokenizer):
    task = get_task(TASK)
    examples = task.examples(tokenizer)
    assert [e.id for e in examples] == [f"passkey{n}:{i}" for n in (128, 256) for i in range(3)]
    for length in (128, 256):
        mine = [e.data for e in examples if e.data["length"] == length]
        pack = passkey_docs(length, 3, 0)  # the lm-eval pack's documents (cl100k): same keys and depths
        assert [(d["key"], d["depth"]) for d in mine] == [(d["key"], d["depth"]) for d in pack]
        for data, doc in zip(mine, passkey_docs(length, 3, 0, counter=tokenizer)):
            assert length - 30 < data["input_ids"].shape[1] <= length  # fits, and fills most of it
            assert tokenizer.decode(data["input_ids"][0]) == f"{doc['context']} {doc['question']}"


def test_passkey_scoring_aggregate_and_compare(model, tokenizer, monkeypatch):
    task = get_task("passkey:lengths=128+256,n=2")
    example = task.examples(tokenizer)[0]
    key = example.data["key"]
    bench = _bench(model, tokenizer)
    monkeypatch.setattr(L, "_greedy_text", lambda *args: f" {key}. Remember it")
    row = task.run(bench, None, example, None)
    assert row["correct"] == 1.0 and row["answer"] == key and row["length"] == 128 and row["trial"] == 0
    monkeypatch.setattr(L, "_greedy_text", lambda *args: " 1234")
    assert task.run(bench, None, example, None)["correct"] == 0.0

    def rows(hits):
        return [{"length": n, "trial": i, "correct": float(h), "prompt_tokens": n - 10}
                for (n, i), h in zip([(128, 0), (128, 1), (256, 0), (256, 1)], hits)]  # fmt: skip

    base, variant = rows([1, 1, 1, 0]), rows([1, 0, 0, 0])
    out = task.aggregate(variant)
    assert (out["accuracy"], out["k"], out["n"]) == (0.25, 1, 4)
    assert (out["accuracy_low"], out["accuracy_high"]) == wilson_interval(1, 4)
    assert (out["length/128"], out["length/128_n"], out["length/256"]) == (0.5, 2, 0.0)
    assert (out["length/256_low"], out["length/256_high"]) == wilson_interval(0, 2)
    assert out["length/256_tokens"] == 246.0
    diff = task.compare(variant, base)
    assert diff["accuracy_diff"] == pytest.approx(-0.5) and diff["n"] == 4
    assert diff["accuracy_diff_low"] <= -0.5 <= diff["accuracy_diff_high"]


def test_greedy_text_stops_at_a_line_break(model, tokenizer, monkeypatch):
    decoded = iter(["1", "12", "12\n3"])
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: next(decoded), raising=False)
    ids = torch.randint(0, 1000, (1, 12))
    assert L._greedy_text(model, tokenizer, ids, 10) == "12"


# -- through the runner ----------------------------------------------------------------------


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_long_workload_and_passkey_through_run_bench(model, tokenizer, tmp_path, monkeypatch):
    record = run_bench(_config(), tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert tokenlean.active_patches(model) == []
    workload = record["workload"]
    assert workload["name"] == "long" and workload["options"]["lengths"] == [128, 256]
    assert workload["primary"] == "ctx256_decode"
    latency, speedup = record["latency"], record["speedup"]
    for variant in ("baseline", "sink_window"):
        for n in (128, 256):
            for metric in (
                "prefill_s",
                "decode_token_s",
                "kv_prefill_mb",
                "kv_mb",
                "kv_tokens",
                "peak_memory_mb",
            ):
                stats = latency[variant][L.long_metric(n, metric)]
                assert stats["n"] == 2 and stats["median"] > 0
    for n in (128, 256):
        # the full cache holds the context and every decoded token; the evicting one sinks + window, always
        full = latency["baseline"][L.long_metric(n, "kv_tokens")]
        assert full["min"] == full["max"] == n + 4
        evicting = latency["sink_window"][L.long_metric(n, "kv_tokens")]
        assert evicting["min"] == evicting["max"] == 68
        assert latency["sink_window"][L.long_metric(n, "kv_prefill_mb")]["median"] == pytest.approx(
            latency["sink_window"][L.long_metric(n, "kv_mb")]["median"]
        )
        kv_ratio = speedup["sink_window"][L.long_metric(n, "kv_memory")]["median"]
        assert kv_ratio == pytest.approx((n + 4) / 68)
    assert set(speedup["sink_window"]) == {
        *(L.long_metric(n, k) for n in (128, 256) for k in ("prefill", "decode", "kv_memory", "peak_memory")),
        "peak_memory",
    }
    assert speedup["sink_window"]["peak_memory"]["median"] == pytest.approx(260 / 68)
    rounds = [r["variant"] for r in _rows(tmp_path / "latency.jsonl")]
    assert rounds == ["baseline", "sink_window", "sink_window", "baseline"]  # rotating order

    entry = record["quality"][TASK]
    assert entry["section"] == "passkey" and entry["n_examples"] == 6
    for variant in ("baseline", "sink_window"):
        values = entry["variants"][variant]
        assert values["n"] == 6 and values["length/128_n"] == values["length/256_n"] == 3
        assert 0 <= values["length/256_low"] <= values["length/256"] <= values["length/256_high"] <= 1
    assert set(entry["compare"]) == {"sink_window"}
    samples = [r for r in _rows(tmp_path / "samples.jsonl") if r["task"] == TASK]
    assert len(samples) == 12 and {r["metrics"]["length"] for r in samples} == {128, 256}

    md = (tmp_path / "report.md").read_text()
    assert "## Workload: long" in md and "| context | variant | prefill (ms) | decode step (ms) |" in md
    sink_row = next(line for line in md.splitlines() if line.startswith("| 256 | sink_window |"))
    assert "| 68 |" in sink_row and "3.82× [3.82–3.82] |" in sink_row  # KV tokens, KV memory ×
    assert f"## Quality: {TASK}" in md and "| variant | 128 tokens | 256 tokens | all ↑ |" in md
    plot = "passkey_lengths_128_256_n_3_accuracy.png"
    for name in ("long_context.png", plot):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
        assert f"]({name})" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # speed vs quality + the two sections' plots
    assert "Workload: long" in page and "KV memory ×" in page

    # a finished run resumes without measuring or scoring anything again
    def must_not_run(*args, **kwargs):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(L.LongContextWorkload, "measure", must_not_run)
    monkeypatch.setattr(L.PasskeyTask, "run", must_not_run)
    again = run_bench(_config(), tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert again["quality"] == record["quality"] and again["latency"] == record["latency"]


def test_an_interrupted_long_run_resumes_from_what_it_wrote(model, tokenizer, tmp_path, monkeypatch):
    config = _config(
        methods=[SINK], tasks=["passkey:lengths=128,n=2"], workload="long:lengths=128,new_tokens=2"
    )
    calls = {"run": 0, "measure": 0}
    run, measure = L.PasskeyTask.run, L.LongContextWorkload.measure

    def counted_run(self, *args, **kwargs):
        calls["run"] += 1
        if calls["run"] == 4:
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    def counted_measure(self, *args, **kwargs):
        calls["measure"] += 1
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(L.PasskeyTask, "run", counted_run)
    monkeypatch.setattr(L.LongContextWorkload, "measure", counted_measure)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert len(_rows(tmp_path / "samples.jsonl")) == 3 and not (tmp_path / "report.json").exists()
    calls["run"] = 100
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert calls["run"] == 101  # only the missing row
    assert calls["measure"] == 4  # 2 rounds x 2 variants, no warm-up
    assert record["quality"]["passkey:lengths=128,n=2"]["variants"]["sink_window"]["n"] == 2
    lines = (tmp_path / "latency.jsonl").read_text().splitlines()
    (tmp_path / "latency.jsonl").write_text("\n".join(lines[:3]) + "\n")  # the last timing lost
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert calls["measure"] == 5 and calls["run"] == 101
    assert record["latency"]["sink_window"]["ctx128_kv_tokens"]["median"] == 68


def test_sections_and_plots_need_their_data():
    record = {
        "schema": R.SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {},
        "model": {"name": "m"},
        "variants": [{"name": "baseline", "kind": "baseline", "method": None, "params": {}}],
        "latency": {},
        "speedup": {},
        "quality": {},
        "workload": {"name": "generate", "options": {}},
    }
    assert L.plot_long_context(record) is None
    entry = {"primary": "accuracy", "higher_is_better": True, "variants": {}, "config": {"lengths": [128]}}
    assert L.plot_passkey(record, entry, "passkey") is None
    assert "Workload: long" not in R.render_markdown(record)


def test_attended_length_is_what_a_step_reads():
    from tokenlean.attention.block_cache import BlockRetrievalCache

    keys = torch.zeros(1, 2, 10, 4)
    full = DynamicCache()
    full.update(keys, keys, 0)
    assert L.attended_length(full) == 10  # a full cache: every token
    cache = BlockRetrievalCache(sink_tokens=4, block_size=8, window=16, top_k=2, num_layers=1)
    cache.seen = 200  # 4 sinks, 22 blocks behind the window: 4 + 2 * 8 + the local window
    local = 200 - (4 + ((200 - 4 - 16) // 8) * 8)
    assert L.attended_length(cache) == 4 + 2 * 8 + local and 16 <= local < 24


def test_the_gpu_long_context_script_runs_its_cpu_check(tmp_path):
    """benchmarks/long_context_gpu.py (the device call's script) in its CPU smoke mode: one report per model."""
    import importlib.util
    from pathlib import Path

    from tokenlean import zoo

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "long_context_gpu.py"
    spec = importlib.util.spec_from_file_location("long_context_gpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tokenizer_dir = zoo.get_entry("smollm2-135m").path
    argv = ["--out", str(tmp_path), "--tokenizer", str(tokenizer_dir), "--device", "cpu", "--dtype", "float32",
            "--quick", "--repeats", "1", "--new-tokens", "2", "--models", "smollm2-135m"]  # fmt: skip
    assert script.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lengths"] == [128, 256] and list(summary["models"]) == ["smollm2-135m"]
    record = json.loads((tmp_path / "smollm2-135m" / "report.json").read_text())
    names = [v["name"] for v in record["variants"]]
    assert names == ["baseline", "sink_window", "block_retrieval"]
    held = {n: record["latency"][n]["ctx256_kv_tokens"]["median"] for n in names}
    assert held["baseline"] > 256 and held["sink_window"] == 64  # the evicting cache keeps sinks + window


# -- perplexity against context length -------------------------------------------------------

PPL = "long_perplexity:lengths=64+192,chunk=32"


def test_streamed_perplexity_of_the_full_cache_equals_one_pass(model):
    """Chunks through the unpatched model's own cache score exactly what one pass over the window scores."""
    from tokenlean.eval.tasks import PerplexityTask

    ids = torch.randint(5, 1000, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_probs = PerplexityTask._log_probs(model, ids[0])
    one_pass = -log_probs.gather(-1, ids[0, 1:, None]).sum().item()
    for chunk in (1, 32, 50, 150, 1000):
        nll, count = L.streamed_nll(model, ids, chunk)
        assert count == 149 and nll == pytest.approx(one_pass, abs=1e-3), chunk  # sums of ~2,000: float noise


def test_streamed_perplexity_sees_only_what_a_cache_keeps(model):
    """block_retrieval covering every block reads like full attention; the evicting window forgets."""
    ids = torch.randint(5, 1000, (1, 192), generator=torch.Generator().manual_seed(0))
    full, _ = L.streamed_nll(model, ids, 32)
    small = dict(block_size=8, sink_tokens=4, window=16, chunk_size=16)
    with tokenlean.patch(model, "block_retrieval", top_k=64, **small):
        covered, _ = L.streamed_nll(model, ids, 32)
    with tokenlean.patch(model, "sink_window", sink_tokens=4, window=64):
        evicting, _ = L.streamed_nll(model, ids, 32)
        within, _ = L.streamed_nll(model, ids[:, :60], 32)
    assert covered == pytest.approx(full, abs=1e-3)
    # 192 tokens > 4 sinks + 64 recent: 124 tokens read a shorter context (the tiny random model's attention
    # is nearly uniform, so the change is small, but far above the float noise of the line above)
    assert abs(evicting - full) > 5e-3
    assert within == pytest.approx(L.streamed_nll(model, ids[:, :60], 32)[0], rel=1e-5)  # inside the window
    assert tokenlean.active_patches(model) == []


def test_long_perplexity_windows_aggregate_and_compare(tokenizer):
    task = get_task("long_perplexity:lengths=64+128,windows=2")
    assert task.config() == {"lengths": [64, 128], "windows": 2, "chunk": 512, "documents": "heldout",
                             "text": "paul-graham-essays"}  # fmt: skip
    examples = task.examples(tokenizer)
    assert [e.id for e in examples] == ["ppl64:0", "ppl64:1", "ppl128:0", "ppl128:1"]
    first, second = examples[0].data["input_ids"], examples[1].data["input_ids"]
    assert first.shape == second.shape == (1, 64)
    assert torch.equal(
        examples[2].data["input_ids"][:, :64], first
    )  # window 0 of every length: the same start
    assert torch.equal(examples[2].data["input_ids"][:, 64:], second)

    def rows(nlls):
        return [{"length": n, "window": w, "nll_sum": v, "tokens": n - 1}
                for (n, w), v in zip([(64, 0), (64, 1), (128, 0), (128, 1)], nlls)]  # fmt: skip

    base, variant = rows([63.0, 126.0, 127.0, 254.0]), rows([126.0, 126.0, 254.0, 254.0])
    out = task.aggregate(base)
    assert out["length/64"] == pytest.approx(math.exp(189 / 126)) and out["length/64_windows"] == 2
    assert out["length/128_tokens"] == 254 and out["perplexity"] == pytest.approx(math.exp(570 / 380))
    ratio = task.compare(variant, base)
    assert ratio["length/64_ratio"] == pytest.approx(math.exp(252 / 126) / math.exp(189 / 126))
    assert ratio["length/128_ratio"] == pytest.approx(math.exp(2) / math.exp(381 / 254))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("long_perplexity:lengths=", "empty"),
        ("long_perplexity:lengths=1", "at least 2"),
        ("long_perplexity:windows=0", "windows must be a positive integer"),
        ("long_perplexity:chunk=0", "chunk must be a positive integer"),
        ("long_perplexity:documents=some", "documents must be"),
    ],
)
def test_bad_long_perplexity_options(spec, match):
    with pytest.raises(EvalError, match=match):
        get_task(spec)


def test_long_perplexity_refuses_a_text_too_short(tokenizer):
    with pytest.raises(EvalError, match="need"):
        get_task("long_perplexity:lengths=100000,windows=20").examples(tokenizer)


def test_long_perplexity_through_run_bench(model, tokenizer, tmp_path):
    config = _config(tasks=[PPL], latency=False)
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    entry = record["quality"][PPL]
    assert entry["section"] == "long_perplexity" and entry["n_examples"] == 2
    base, sink = entry["variants"]["baseline"], entry["variants"]["sink_window"]
    assert base["length/64"] == pytest.approx(sink["length/64"], rel=1e-5)  # within the window: the same
    assert abs(base["length/192"] - sink["length/192"]) > 1e-4 * base["length/192"]  # past it: not
    assert entry["compare"]["sink_window"]["length/64_ratio"] == pytest.approx(1.0, rel=1e-5)
    md = (tmp_path / "report.md").read_text()
    assert f"## Quality: {PPL}" in md and "| variant | 64 tokens | 192 tokens | all ↓ |" in md
    name = "long_perplexity_lengths_64_192_chunk_32_perplexity.png"
    assert (tmp_path / name).read_bytes().startswith(b"\x89PNG") and f"]({name})" in md


def test_plot_titles_wrap_a_long_task_key():
    """Six lengths in the task key made a title wider than the figure; it wraps, losing nothing."""
    key = "long_perplexity:lengths=1024+2048+4096+8192+16384+32768"
    title = L._plot_title({"model": {"name": "smollm2-135m"}}, key)
    lines = title.split("\n")
    assert len(lines) == 2 and max(map(len, lines)) <= 64
    assert lines == ["smollm2-135m:", key]  # broken at the space: nothing dropped
    assert L._plot_title({"model": {"name": "m"}}, "passkey:lengths=128") == "m: passkey:lengths=128"


def test_passkey_baseline_max_leaves_the_longest_prompts_to_the_patches(model, tokenizer, tmp_path):
    """Full attention runs only up to baseline_max; 'all' and Δ then compare the lengths both ran."""
    task = "passkey:lengths=128+256,n=2,baseline_max=128"
    assert get_task(task).config()["baseline_max"] == 128
    assert "baseline_max" not in get_task("passkey:lengths=128").config()  # earlier runs resume as they were
    with pytest.raises(EvalError, match="below every length"):
        get_task("passkey:lengths=128+256,baseline_max=64")
    record = run_bench(
        _config(tasks=[task], latency=False), tmp_path, model=model, tokenizer=tokenizer, progress=False
    )
    samples = [r for r in _rows(tmp_path / "samples.jsonl") if r["task"] == task]
    ran = sorted((r["variant"], r["metrics"]["length"]) for r in samples)
    assert ran == [("baseline", 128)] * 2 + [("sink_window", 128)] * 2 + [("sink_window", 256)] * 2
    entry = record["quality"][task]
    base, sink = entry["variants"]["baseline"], entry["variants"]["sink_window"]
    assert base["length/256_n"] == 0 and math.isnan(base["length/256"])
    assert sink["length/256_n"] == 2 and base["n"] == sink["n"] == 2  # 'all': the 128-token trials only
    assert sink["accuracy"] == sink["length/128"]
    assert entry["compare"]["sink_window"]["n"] == 2
    md = (tmp_path / "report.md").read_text()
    base_row = next(line for line in md.splitlines() if line.startswith("| baseline |") and "%" in line)
    assert "| — |" in base_row and "baseline_max" in md
    assert re.search(r"mean tokens per length: 128: \d+, 256: \d+\)", md)  # 256 from the patch's trials
