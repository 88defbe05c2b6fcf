"""The harness: latency measurement, quality tasks, resumable bench runs, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import tokenlean
from tokenlean import MethodConfigError, OutputDirError
from tokenlean.cli import main
from tokenlean.eval import BenchConfig, FidelityTask, measure_generation, run_bench
from tokenlean.eval.tasks import PerplexityTask, get_task
from tokenlean.testing import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    path = tokenlean.zoo.fetch("smollm2-135m", progress=False)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture()
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


def small_config(**overrides):
    settings = dict(
        model="tiny-llama",
        methods=["sink_window:sink_tokens=2,window=8"],
        tasks=["perplexity", "fidelity"],
        prompt_tokens=32,
        new_tokens=4,
        repeats=2,
        warmup=1,
        context_tokens=48,
        n_windows=3,
    )
    settings.update(overrides)
    return BenchConfig(**settings)


def test_measure_generation(model):
    ids = torch.randint(0, 1000, (2, 16))
    sample = measure_generation(model, ids, new_tokens=5)
    assert 0 < sample.prefill_s <= sample.ttft_s <= sample.e2e_s
    assert sample.decode_tokens_per_s > 0 and sample.peak_memory_mb > 0
    assert math.isnan(measure_generation(model, ids, new_tokens=1).decode_tokens_per_s)
    with pytest.raises(ValueError):
        measure_generation(model, ids, new_tokens=0)


def test_perplexity_task_matches_transformers_loss(model, tokenizer):
    task = PerplexityTask(context_tokens=40, n_windows=2)
    examples = task.examples(tokenizer)
    rows = [task.score(model, ex, None) for ex in examples]
    with torch.no_grad():
        losses = [model(input_ids=ex.data[None], labels=ex.data[None]).loss.item() for ex in examples]
    assert task.aggregate(rows)["perplexity"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-4)


def test_fidelity_of_the_reference_itself_is_perfect(model, tokenizer):
    task = FidelityTask(context_tokens=40, n_windows=1)
    (example,) = task.examples(tokenizer)
    reference = task.reference(model, example)
    assert task.score(model, example, reference) == {"top1_agreement": 1.0, "kl_divergence": 0.0}
    with tokenlean.patch(model, "sink_window", sink_tokens=1, window=4):
        patched = task.score(model, example, reference)
    assert patched["top1_agreement"] < 1.0 and patched["kl_divergence"] > 0


def test_bad_task_options():
    with pytest.raises(ValueError, match="(?i)did you mean .perplexity."):
        get_task("perplexty")
    with pytest.raises(ValueError, match="n_windows"):
        get_task("perplexity", n_windows=0)
    with pytest.raises(ValueError, match="positive integer"):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="nothing to measure"):
        BenchConfig(latency=False, tasks=[])
    with pytest.raises(ValueError, match="device"):
        BenchConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            BenchConfig(device="cuda")


def test_run_bench_writes_a_complete_report(model, tokenizer, tmp_path):
    record = run_bench(small_config(), tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert [v["name"] for v in record["variants"]] == ["baseline", "sink_window"]
    fidelity = record["quality"]["fidelity"]["variants"]
    assert fidelity["baseline"] == {"top1_agreement": 1.0, "kl_divergence": 0.0}
    assert fidelity["sink_window"]["top1_agreement"] < 1.0
    ppl = record["quality"]["perplexity"]["variants"]
    assert ppl["baseline"]["tokens"] == 3 * 47
    assert ppl["baseline"]["perplexity"] != ppl["sink_window"]["perplexity"]
    for variant in ("baseline", "sink_window"):
        assert record["latency"][variant]["e2e_s"]["n"] == 2
    assert set(record["speedup"]["sink_window"]) == {"prefill", "ttft", "decode", "e2e", "peak_memory"}
    for name in (
        "report.json",
        "report.md",
        "report.html",
        "latency.png",
        "speedup_vs_quality.png",
        "run.json",
    ):
        assert (tmp_path / name).stat().st_size > 0
    assert tokenlean.active_patches(model) == []
    latency_rows = [json.loads(line) for line in (tmp_path / "latency.jsonl").read_text().splitlines()]
    # interleaved: the order of variants rotates between repeats
    assert [r["variant"] for r in latency_rows] == ["baseline", "sink_window", "sink_window", "baseline"]


def test_interrupted_run_resumes_from_what_it_wrote(model, tokenizer, tmp_path, monkeypatch):
    config = small_config(latency=False)
    calls = {"n": 0}
    original = PerplexityTask.score

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PerplexityTask, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "report.json").exists()
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3
    with open(tmp_path / "samples.jsonl", "a") as fh:  # a torn line from a crash mid-write
        fh.write('{"task": "perplexity", "exam')
    calls["n"] = 100
    resumed = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert calls["n"] == 100 + 3  # only the 3 missing perplexity rows were computed again
    fresh = run_bench(config, tmp_path / "fresh", model=model, tokenizer=tokenizer, progress=False)
    assert resumed["quality"] == fresh["quality"]


def test_out_dir_with_another_run_is_refused(model, tokenizer, tmp_path):
    run_bench(
        small_config(latency=False, tasks=["perplexity"]),
        tmp_path,
        model=model,
        tokenizer=tokenizer,
        progress=False,
    )
    before = (tmp_path / "report.json").read_bytes()
    other = small_config(latency=False, tasks=["perplexity"], n_windows=2)
    with pytest.raises(OutputDirError, match="different run"):
        run_bench(other, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert (tmp_path / "report.json").read_bytes() == before
    record = run_bench(other, tmp_path, model=model, tokenizer=tokenizer, overwrite=True, progress=False)
    assert record["quality"]["perplexity"]["n_examples"] == 2


def test_run_from_before_a_setting_existed_resumes(model, tokenizer, tmp_path, monkeypatch):
    config = small_config(latency=False, tasks=["perplexity"])
    run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    run_file = tmp_path / "run.json"
    old = json.loads(run_file.read_text())
    for added in ("workload", "encode_prompt", "encode_sentences"):  # settings newer than the run
        del old["config"][added]
    run_file.write_text(json.dumps(old))

    def must_not_score(*args, **kwargs):
        raise AssertionError("a resumed run scored an example again")

    monkeypatch.setattr(PerplexityTask, "score", must_not_score)
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert record["quality"]["perplexity"]["n_examples"] == 3
    assert json.loads(run_file.read_text())["config"]["workload"] == "generate"
    old["config"]["n_windows"] = 2  # a setting that differs is still refused
    run_file.write_text(json.dumps(old))
    with pytest.raises(OutputDirError, match="different run"):
        run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)


def test_bad_inputs_write_nothing(model, tokenizer, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(MethodConfigError):
        run_bench(small_config(methods=["sink_window:window=-1"]), target, model=model, tokenizer=tokenizer)
    assert not target.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError):
        run_bench(small_config(), blocker / "out", model=model, tokenizer=tokenizer)
    with tokenlean.patch(model, "sink_window"), pytest.raises(ValueError, match="already carries patches"):
        run_bench(small_config(), target, model=model, tokenizer=tokenizer)


def test_cli_methods_models_and_errors(capsys, tmp_path):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "sink_window:" in out and "window (int, default 1024)" in out
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert main(["bench", "--method", "sink_windw", "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean 'sink_window'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["report", str(tmp_path)]) == 2
    # bad model name or dtype: a clear error and no output folder
    assert (
        main(["bench", "--model", "smolm2-135m", "--method", "sink_window", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "did you mean 'smollm2-135m'" in capsys.readouterr().err
    assert main(["bench", "--dtype", "float13", "--method", "sink_window", "--out", str(tmp_path / "z")]) == 2
    assert "unknown dtype" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_cli_report_rerenders(model, tokenizer, tmp_path, capsys):
    run_bench(
        small_config(latency=False, tasks=["perplexity"]),
        tmp_path,
        model=model,
        tokenizer=tokenizer,
        progress=False,
    )
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").exists()
    assert "sink_window" in capsys.readouterr().out


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from tokenlean._io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def test_bench_runs_lm_eval_tasks_and_resumes_without_rerunning(model, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (tokenlean[lmeval])")
    config = small_config(latency=False, tasks=[], lm_eval_tasks=["tokenlean_pg_cloze"], lm_eval_limit=4)
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    section = record["quality"]["lm-eval:tokenlean_pg_cloze"]
    assert section["primary"] == "acc" and section["higher_is_better"] is True
    assert set(section["variants"]) == {"baseline", "sink_window"}
    assert 0.0 <= section["variants"]["baseline"]["acc"] <= 1.0
    assert len((tmp_path / "lm_eval.jsonl").read_text().splitlines()) == 2  # one line per finished variant

    def must_not_run(*args, **kwargs):
        raise AssertionError("finished lm-eval variants must be reused on resume, not run again")

    monkeypatch.setattr(type(model), "forward", must_not_run)
    again = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert again["quality"] == record["quality"]


# --------------------------------------------------------------------------------------------
# prompt compressors and peers in the same runner
# --------------------------------------------------------------------------------------------


def test_variants_from_patches_and_compressors():
    from tokenlean.eval.variants import make_variants

    variants = make_variants(
        ["sink_window:window=64"], ["random", "llmlingua:/x/y-bert-base-multilingual-cased"], [0.5, 0.33]
    )
    assert [v.name for v in variants] == [
        "baseline",
        "sink_window",
        "random@0.5",
        "random@0.33",
        "llmlingua:/x/y-bert-base-multilingual-cased@0.5",
        "llmlingua:/x/y-bert-base-multilingual-cased@0.33",
    ]
    assert [v.kind for v in variants] == ["baseline", "patch"] + ["compressor"] * 4
    assert variants[-1].peer == "llmlingua" and variants[2].peer is None
    assert variants[2].record() == {
        "name": "random@0.5", "kind": "compressor", "method": "random", "params": {"rate": 0.5},
        "spec": "random", "rate": 0.5, "peer": None,
    }  # fmt: skip
    # options are canonical: the same compressor spelt two ways is one configuration
    with pytest.raises(ValueError, match="given twice"):
        make_variants([], ["random:seed=1", "random:seed=1"])


@pytest.mark.parametrize(
    ("methods", "compressors", "rates", "match"),
    [
        (["default"], [], [], "is a prompt compressor, not a model patch: pass it with --compressor"),
        (
            [],
            ["sink_window"],
            [],
            "is a model patch, not a prompt compressor: pass it with --method sink_window",
        ),
        ([], [], [0.5], "no --compressor"),
        ([], ["random"], [1.5], r"in \(0, 1\]"),
        ([], ["random"], [0.0], r"in \(0, 1\]"),
        ([], ["randm"], [], "Did you mean 'random'"),
        ([], ["random:sed=3"], [], "has no option"),
    ],
)
def test_bad_variant_specs_are_refused_before_loading(methods, compressors, rates, match, tmp_path):
    config = BenchConfig(model="no-such-model", methods=methods, compressors=compressors, rates=rates)
    with pytest.raises(ValueError, match=match):
        run_bench(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_workload_specs():
    with pytest.raises(ValueError, match="Did you mean 'generate'"):
        BenchConfig(workload="generat")
    with pytest.raises(ValueError, match="has no option"):
        BenchConfig(workload="compress:wrds=10")


def test_compressors_run_beside_patches_and_resume(model, tokenizer, tmp_path, monkeypatch):
    config = small_config(
        compressors=["random"], rates=[0.5, 0.33], tasks=["perplexity", "needle:heldout=2,haystack_tokens=200"],
        prompt_tokens=64,
    )  # fmt: skip
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    names = [v["name"] for v in record["variants"]]
    assert names == ["baseline", "sink_window", "random@0.5", "random@0.33"]
    # each task measures the kinds it applies to
    assert set(record["quality"]["perplexity"]["variants"]) == {"baseline", "sink_window"}
    needle = record["quality"]["needle:heldout=2,haystack_tokens=200"]
    assert set(needle["variants"]) == {"baseline", "random@0.5", "random@0.33"}
    assert needle["variants"]["baseline"]["key_kept"] == 1.0
    # every compress call is pooled: the needle haystacks and the timed prompt (first round only)
    tokens = record["tokens"]
    assert set(tokens) == {"random@0.5", "random@0.33"}
    assert tokens["random@0.5"]["calls"] == needle["n_examples"] + 1
    assert tokens["random@0.33"]["saved"] == pytest.approx(1 - 0.33, abs=0.03)
    assert tokens["random@0.5"]["achieved_mean"] == pytest.approx(0.5, abs=0.02)
    # the timed prompt of a compressor variant is shorter, and its compression counts in e2e
    lat = record["latency"]
    assert lat["random@0.33"]["prompt_tokens"]["median"] < lat["baseline"]["prompt_tokens"]["median"] == 64
    assert lat["random@0.33"]["compress_s"]["median"] > 0 == lat["baseline"]["compress_s"]["median"]
    md = (tmp_path / "report.md").read_text()
    assert "| random@0.33 | compressor |" in md and "## Tokens saved and rate honoured" in md
    assert (tmp_path / "rate_honoured.png").stat().st_size > 0

    from tokenlean.compressors.prompt.baselines import RandomDropCompressor

    def must_not_compress(*args, **kwargs):
        raise AssertionError("a resumed run compressed again")

    monkeypatch.setattr(RandomDropCompressor, "compress", must_not_compress)
    again = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert again["quality"] == record["quality"] and again["tokens"] == record["tokens"]


def test_default_tasks_follow_the_variants():
    assert BenchConfig(methods=["sink_window"]).tasks == ["perplexity", "fidelity"]
    assert BenchConfig(compressors=["random"]).tasks == ["needle"]
    assert BenchConfig(methods=["sink_window"], compressors=["random"]).tasks == [
        "perplexity",
        "fidelity",
        "needle",
    ]
    assert BenchConfig(compressors=["random"], tasks=[], latency=True).tasks == []


@pytest.mark.slow
def test_llmlingua_peer_beside_tokenlean_in_the_compress_workload(model, tokenizer, tmp_path):
    """The real llmlingua 0.2.2 and tokenlean's compat mode: identical outputs, timed interleaved."""
    pytest.importorskip("llmlingua", reason="llmlingua 0.2.2 is in the dev extra")
    config = small_config(
        methods=[], compressors=["llmlingua:default", "default:compat=true", "random"], rates=[0.33],
        tasks=[], workload="compress:words=400", repeats=2,
    )  # fmt: skip
    record = run_bench(config, tmp_path, model=model, tokenizer=tokenizer, progress=False)
    workload = record["workload"]
    assert workload["name"] == "compress" and workload["reference"] == "llmlingua:default@0.33"
    assert set(record["latency"]) == {"llmlingua:default@0.33", "default:compat=true@0.33", "random@0.33"}
    assert set(record["speedup"]) == {"default:compat=true@0.33", "random@0.33"}  # against the peer
    assert set(record["speedup"]["random@0.33"]) == {"compress", "encoder", "around_encoder", "peak_memory"}
    extra = workload["extra"]
    assert extra["identical_output"]["default:compat=true@0.33"]["llmlingua:default@0.33"] is True
    assert extra["word_agreement"]["default:compat=true@0.33"]["llmlingua:default@0.33"] == 1.0
    assert extra["word_agreement"]["random@0.33"]["llmlingua:default@0.33"] < 0.9
    peer = record["latency"]["llmlingua:default@0.33"]
    assert 0 < peer["encoder_s"]["median"] < peer["compress_s"]["median"]
    md = (tmp_path / "report.md").read_text()
    assert "llmlingua:default@0.33 (peer: llmlingua)" in md and "## Workload: compress" in md


def test_a_run_without_a_language_model(tmp_path):
    """``--model none``: compressors on text tasks and the compress workload, nothing loaded."""
    config = BenchConfig(
        model="none", compressors=["random"], rates=[0.5], tasks=["needle:heldout=1,haystack_tokens=150,depths=0.5"],
        workload="compress:words=300", repeats=2, warmup=0,
    )  # fmt: skip
    record = run_bench(config, tmp_path / "ok", progress=False)
    assert record["model"]["class"] is None
    assert (
        record["quality"]["needle:heldout=1,haystack_tokens=150,depths=0.5"]["variants"]["random@0.5"]["n"]
        == 1
    )
    assert set(record["latency"]) == {"random@0.5"}
    for bad, match in (
        (dict(methods=["sink_window"]), "model patches"),
        (dict(tasks=["perplexity"]), "the perplexity task"),
        (dict(workload="generate"), "the generate workload"),
    ):
        with pytest.raises(ValueError, match=match):
            run_bench(BenchConfig(**{**dataclass_fields(config), **bad}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def dataclass_fields(config):
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
