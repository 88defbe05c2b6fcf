"""benchmarks/visual_gpu_latency.py on the CPU: the tiny models end to end, the limit wrapper, the real configs.

The GPU run itself (7B models) needs a CUDA device; here the same code path runs on the tiny
models (``--tiny``) and on the real image geometry at tiny widths (``--shrink``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import tokenlean
from tokenlean.testing import tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "visual_gpu_latency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("visual_gpu_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _registered_labels(bench) -> list[str]:
    names = {info.name for info in tokenlean.methods()}
    return [label for label, (name, _) in bench.METHODS.items() if name in names]


def _positive(summary) -> bool:
    return summary["n"] >= 1 and all(v is not None and math.isfinite(v) and v > 0 for v in summary["values"])


def test_tiny_run_writes_every_row(bench, tmp_path):
    labels = _registered_labels(bench)
    argv = ["--tiny", "--quick", "--repeats", "1", "--retains", "1", "0.25", "--out", str(tmp_path)]
    code = bench.main([*argv, "--methods", *labels, "no_such_method"])
    assert code == 0  # a failing method is recorded, not fatal

    record = json.loads((tmp_path / "results.json").read_text())
    assert record["machine"]["torch"] == torch.__version__
    assert record["blocks"] == [["llava", 1], ["llava", 8], ["llava_next", 1], ["llava_next", 8]]
    rows = record["rows"]
    for model in ("llava", "llava_next"):
        for batch in (1, 8):
            block = {
                (r["variant"], r["retain"]): r for r in rows if r["model"] == model and r["batch"] == batch
            }
            full, limit = block[("full", 1.0)], block[("limit", 0.25)]
            for row in (full, limit):
                assert row["error"] is None
                for metric in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_mb"):
                    assert _positive(row[metric]), (model, batch, row["variant"], metric)
            # the limit feeds the decoder fewer visual tokens, measured at the first decoder layer
            assert full["visual_layer0"] == full["visual_tokens_full"] > 0
            assert limit["visual_layer0"] == bench.keep_count(0.25, full["visual_tokens_full"])
            assert limit["visual_layer0"] < full["visual_layer0"]
            assert limit["ratio_to_limit"] is None and _positive(limit["speedup_vs_full"])
            missing = block[("no_such_method", 0.25)]
            assert "no_such_method" in missing["error"] and missing["rounds"] == 0
            for label in labels:  # the pruning methods that exist run and are paired with the limit
                row = block[(label, 0.25)]
                assert row["error"] is None, row["error"]
                assert _positive(row["prefill_ms"]) and _positive(row["ratio_to_limit"])
                assert row["within_10pct"] in (True, False)
                assert row["visual_last_layer"] <= row["visual_tokens_full"]

    markdown = (tmp_path / "results.md").read_text()
    assert bench.TABLE_HEADER in markdown
    assert "## llava_next, batch 8" in markdown and "error: MethodConfigError" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_limit_wrapper_restores_get_image_features(bench, family):
    model = tiny_model(family)
    work = bench.make_workload(family, model, batch=2, text=(2, 6), vocab=(1, 100))
    inner = model.model
    assert "get_image_features" not in vars(inner)
    with torch.no_grad():
        before = model(**work.inputs()).logits
        with bench.limit_image_features(model, 0.25):
            kept = bench.keep_count(0.25, work.visual_tokens)
            limited = model(**work.inputs(kept)).logits
        after = model(**work.inputs()).logits
    assert "get_image_features" not in vars(inner)
    assert limited.shape[1] == work.text_tokens + kept < before.shape[1]
    assert torch.equal(before, after)


def test_real_configs_match_the_checkpoints(bench):
    # parameter counts of llava-hf/llava-1.5-7b-hf and llava-v1.6-vicuna-7b-hf (+ image_newline)
    expected = {"llava-1.5-7b": 7_063_427_072, "llava-next-7b": 7_063_427_072 + 4096}
    for name, count in expected.items():
        model = bench.build_real(name, torch.device("meta"), torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count
        config = model.config
        assert config.image_token_id == 32000 and config.text_config.vocab_size == 32064
        assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
        assert config._attn_implementation == "sdpa"


def test_shrunk_real_geometry_gives_the_real_token_counts(bench, tmp_path):
    argv = ["--shrink", "--quick", "--repeats", "1", "--batches", "1", "--retains", "1", "0.1"]
    assert bench.main([*argv, "--methods", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    tokens = {(r["model"], r["variant"]): (r["visual_layer0"], r["text_tokens"]) for r in rows}
    assert tokens[("llava-1.5-7b", "full")] == (576, 64)  # 24 x 24 patches of 14 px at 336 px
    assert tokens[("llava-1.5-7b", "limit")] == (58, 64)
    # 672 x 672 -> base view + 2 x 2 tiles: 576 + 48 x 48 + 48 newlines
    assert tokens[("llava-next-7b", "full")] == (2928, 64)
    assert tokens[("llava-next-7b", "limit")] == (293, 64)
