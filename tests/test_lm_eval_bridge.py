"""lm-eval bridge: offline task folder, real runs on smollm2-135m, refusals, report section."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import tokenlean
from tokenlean.eval import lm_eval_bridge as bridge

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (tokenlean[lmeval])")

SINK = "sink_window:sink_tokens=4,window=16"


@pytest.fixture(scope="module")
def smollm2():
    return tokenlean.zoo.load("smollm2-135m")


@pytest.fixture
def forward_calls(smollm2):
    """Count the model's forward calls with a real hook (removed afterwards)."""
    model, _ = smollm2
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


def _logits(model, tokenizer):
    ids = tokenizer("The best way to get startup ideas is not to try to think of them.", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def _files(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


# -- task folder (no model) -------------------------------------------------------------------


def test_task_folder_is_the_task_pack(tmp_path):
    from tokenlean.eval import task_pack

    assert bridge.local_task_dir is task_pack.local_task_dir
    assert bridge.LOCAL_TASKS == task_pack.LOCAL_TASKS and bridge.LOCAL_TAG == "tokenlean"
    folder = bridge.local_task_dir(tmp_path, tasks=task_pack.PG_TASKS)
    assert sorted(_files(folder)) == [
        ".tokenlean_pack.json",
        "data/pg_cloze.jsonl",
        "data/pg_essays.jsonl",
        "tokenlean_pg_cloze.yaml",
        "tokenlean_pg_essays.yaml",
    ]


def test_task_data_is_real_and_well_formed(tmp_path):
    import yaml

    folder = bridge.local_task_dir(tmp_path, tasks=["tokenlean_pg_essays", "tokenlean_pg_cloze"])
    essays = [json.loads(line) for line in (folder / "data" / "pg_essays.jsonl").read_text().splitlines()]
    assert len(essays) == 49 and len({e["id"] for e in essays}) == 49
    corpus = tokenlean.data.load_text("paul-graham-essays")
    letters = re.sub("[^A-Za-z]", "", corpus)
    assert all(e["text"] in corpus for e in essays)
    assert sum(len(e["text"]) for e in essays) > 0.99 * len(corpus) - 2 * 49

    cloze = [json.loads(line) for line in (folder / "data" / "pg_cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 200 and len({d["id"] for d in cloze}) == 200
    for doc in cloze:
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert 0 <= doc["gold"] < 4
        assert doc["context"] and re.sub("[^A-Za-z]", "", doc["context"]) in letters
        assert re.sub("[^A-Za-z]", "", doc["choices"][doc["gold"]]) in letters
    assert len({d["gold"] for d in cloze}) == 4  # the answer is not always in the same slot
    assert len({d["essay"] for d in cloze}) > 20

    for task in ("tokenlean_pg_essays", "tokenlean_pg_cloze"):
        config = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert config["task"] == task and config["dataset_path"] == "json"
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data_file) and os.path.exists(data_file)


# -- refusals (before the model runs) -----------------------------------------------------------


@pytest.mark.slow
def test_unknown_task_is_refused_before_the_model_runs(smollm2, forward_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = smollm2
    with pytest.raises(
        ValueError, match=r"tokenlean_pg_clozee.*did you mean 'tokenlean_pg_cloze'.*local tasks"
    ):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_essays", "tokenlean_pg_clozee"], progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        bridge.evaluate(model, tokenizer, [], progress=False)
    assert forward_calls == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unknown_task_falls_back_to_the_builtin_index(smollm2, forward_calls, caplog):
    model, tokenizer = smollm2
    with caplog.at_level("WARNING", logger=bridge.__name__), pytest.raises(ValueError) as excinfo:
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze", "hellaswagg"], progress=False)
    message = str(excinfo.value)
    assert "neither local nor built into lm-eval" in message and "'hellaswag'" in message
    assert "tokenlean_pg_cloze" in message  # the local tasks are listed
    assert "indexing lm-eval's built-in tasks" in caplog.text
    assert forward_calls == []


@pytest.mark.slow
def test_patched_model_and_bad_specs_are_refused(smollm2, forward_calls):
    model, tokenizer = smollm2
    with (
        tokenlean.patch(model, "sink_window", window=16),
        pytest.raises(tokenlean.PatchError, match="already"),
    ):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], limit=1, progress=False)
    with pytest.raises(tokenlean.MethodConfigError):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=["sink_window:windw=3"], limit=1)
    with pytest.raises(tokenlean.MethodConfigError):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=["no_such_method"], limit=1)
    with pytest.raises(ValueError, match="twice"):
        bridge.evaluate(model, tokenizer, ["tokenlean_pg_cloze"], methods=[SINK, SINK], limit=1)
    assert forward_calls == []
    assert tokenlean.active_patches(model) == []


# -- real runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cloze_accuracy_is_clearly_above_chance(smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = smollm2
    results = bridge.evaluate(model, tokenizer, "tokenlean_pg_cloze", limit=25, batch_size=4, progress=False)
    assert list(results) == ["baseline"]
    scores = results["baseline"]["tokenlean_pg_cloze"]
    # smollm2-135m: 14/25 = 0.56 on these 25 examples (0.55 on all 200); chance is 0.25
    assert scores["acc"] > 0.4, scores
    assert 0 < scores["acc_stderr"] < 0.2
    assert results.tasks["tokenlean_pg_cloze"]["n_examples"] == 25
    assert list(tmp_path.iterdir()) == []  # no cache, log or result files in the working folder


@pytest.mark.slow
def test_perplexity_with_a_method_and_bitwise_restore(smollm2, tmp_path, monkeypatch):
    from tokenlean.eval.report import SCHEMA, validate_record

    monkeypatch.chdir(tmp_path)
    model, tokenizer = smollm2
    env_before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    before = _logits(model, tokenizer)

    results = bridge.evaluate(
        model,
        tokenizer,
        ["tokenlean_pg_essays", "tokenlean_pg_cloze"],
        methods=[SINK],
        limit={"tokenlean_pg_essays": 1, "tokenlean_pg_cloze": 2},
        progress=False,
    )

    assert torch.equal(_logits(model, tokenizer), before)  # the patch is gone, bitwise
    assert tokenlean.active_patches(model) == [] and not model.training
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert list(tmp_path.iterdir()) == []

    assert list(results) == ["baseline", "sink_window"]
    base = results["baseline"]["tokenlean_pg_essays"]
    sink = results["sink_window"]["tokenlean_pg_essays"]
    assert set(base) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # a real LM on real English essays (smollm2-135m: 95.9 on the first essay; 271.5 with the sink window)
    assert math.isfinite(base["word_perplexity"]) and 20 < base["word_perplexity"] < 300
    assert 1.5 < base["byte_perplexity"] < 3.5
    assert sink["word_perplexity"] > 1.5 * base["word_perplexity"]  # seeing 20 tokens costs quality
    assert results.tasks["tokenlean_pg_essays"]["n_examples"] == 1
    assert results.tasks["tokenlean_pg_cloze"]["n_examples"] == 2

    section = bridge.quality_section(results)
    assert list(section) == ["lm-eval:tokenlean_pg_essays", "lm-eval:tokenlean_pg_cloze"]
    ppl = section["lm-eval:tokenlean_pg_essays"]
    assert (ppl["primary"], ppl["higher_is_better"], ppl["n_examples"]) == ("word_perplexity", False, 1)
    assert ppl["config"]["output_type"] == "loglikelihood_rolling" and ppl["config"]["n_documents"] == 49
    assert list(ppl["variants"]) == ["baseline", "sink_window"]
    assert ppl["variants"]["sink_window"]["word_perplexity"] == sink["word_perplexity"]
    cloze = section["lm-eval:tokenlean_pg_cloze"]
    assert (cloze["primary"], cloze["higher_is_better"]) == ("acc", True)

    # the section is what a tokenlean report accepts, also after a JSON round trip
    plain = json.loads(json.dumps(results))
    assert bridge.quality_section(plain, tasks_meta=results.tasks) == section
    assert bridge.quality_section(plain)["lm-eval:tokenlean_pg_essays"]["primary"] == "word_perplexity"
    record = {
        "schema": SCHEMA,
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {},
        "model": {"name": "smollm2-135m"},
        "variants": [
            {"name": "baseline", "method": None, "params": {}},
            {"name": "sink_window", "method": "sink_window", "params": {"sink_tokens": 4, "window": 16}},
        ],
        "latency": {},
        "speedup": {},
        "quality": json.loads(json.dumps(section)),
    }
    validate_record(record)


# -- the compress rule (no model) ------------------------------------------------------------------


def _bbh_doc():
    return {
        "description": "Answer questions.\n\n",
        "demos": ["Q: one?\nA: So the answer is (A).", "Q: two?\nA: So the answer is (B)."],
        "question": "Q: three?\nA: So the answer is",
    }


def test_compress_rule_demos_context_fewshot_and_none():
    from types import SimpleNamespace

    doc = _bbh_doc()
    prompt = doc["description"] + "\n\n".join(doc["demos"]) + "\n\n" + doc["question"]
    segments = bridge.compressible_segments(prompt, doc)
    assert "".join(text for text, _ in segments) == prompt
    assert [text for text, flag in segments if flag] == doc["demos"]  # (a) the demonstrations, as a list
    assert segments[0] == (doc["description"], False) and segments[-1] == ("\n\n" + doc["question"], False)

    haystack = {"context": "Filler. The pass key is 12345. Filler."}
    prompt = haystack["context"] + " What is the pass key? The pass key is"
    assert bridge.compressible_segments(prompt, haystack) == [
        ("", False),
        (haystack["context"], True),
        (" What is the pass key? The pass key is", False),
    ]

    # (b) a few-shot task: between the description and the document's own text, split at the delimiter
    task = SimpleNamespace(
        config=SimpleNamespace(num_fewshot=2, description="Solve.\n\n", fewshot_delimiter="\n\n"),
        fewshot_cfg=SimpleNamespace(fewshot_delimiter="\n\n"),
        multiple_input=0,
        resolve_field=lambda doc, field: field,
        doc_to_text=lambda doc: f"Question: {doc['q']}\nAnswer:",
    )
    prompt = "Solve.\n\nQuestion: 1+1\nAnswer: 2\n\nQuestion: 2+2\nAnswer: 4\n\nQuestion: 3+3\nAnswer:"
    segments = bridge.compressible_segments(prompt, {"q": "3+3"}, task)
    assert "".join(text for text, _ in segments) == prompt
    assert [text for text, flag in segments if flag] == [
        "Question: 1+1\nAnswer: 2",
        "Question: 2+2\nAnswer: 4",
    ]
    assert segments[-1] == ("Question: 3+3\nAnswer:", False)

    # (c) nothing to compress
    task.config.num_fewshot = 0
    assert bridge.compressible_segments("Question: 3+3\nAnswer:", {"q": "3+3"}, task) is None
    assert bridge.compressible_segments("Some text", {"context": "not in it"}) is None
    assert bridge.compressible_segments("Q: x", {"demos": ["missing demo"]}) is None


def test_distributed_rank_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert bridge.distributed_rank() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert bridge.distributed_rank() == (3, 4)


@pytest.mark.slow
def test_hub_task_fails_offline_with_one_clear_line(smollm2, forward_calls, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_only_task\n"
        "dataset_path: tokenlean-tests/no-such-dataset\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: q\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
    )
    model, tokenizer = smollm2
    with pytest.raises(tokenlean.errors.EvalError) as excinfo:
        bridge.evaluate(model, tokenizer, ["hub_only_task"], include_path=tmp_path, progress=False)
    message = str(excinfo.value)
    assert "\n" not in message and "'hub_only_task'" in message and "offline" in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    assert forward_calls == []


# -- BBH + passkey for every kind of variant, resume, data parallel -----------------------------

DP_TASKS = ["tokenlean_bbh_navigate", "tokenlean_passkey_1k"]
DP_METHOD = "sink_window:window=64"
DP_LIMIT = 2


@pytest.fixture(scope="module")
def variant_runs(smollm2, tmp_path_factory):
    """baseline, a patch and a compressor on a BBH task and 1k passkeys; the requests the model got."""
    from lm_eval.models.huggingface import HFLM

    from tokenlean.eval.variants import make_variants

    model, tokenizer = smollm2
    log_path = tmp_path_factory.mktemp("lm_eval_log") / "lm_eval.jsonl"
    variants = make_variants([DP_METHOD], ["random"], [0.5])
    requests = []  # (variant, task, doc_id, context) as HFLM receives them
    current = {}

    def capture(method):
        original = getattr(HFLM, method)

        def wrapper(self, reqs, disable_tqdm=False):
            requests.extend((current["variant"], r.task_name, r.doc_id, r.args[0]) for r in reqs)
            return original(self, reqs, disable_tqdm=disable_tqdm)

        return wrapper

    applied = type(variants[0]).applied

    def tracking(self, model):
        current["variant"] = self.name
        return applied(self, model)

    before = _logits(model, tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HFLM, "loglikelihood", capture("loglikelihood"))
        mp.setattr(HFLM, "generate_until", capture("generate_until"))
        mp.setattr(type(variants[0]), "applied", tracking)
        results = bridge.evaluate(
            model, tokenizer, DP_TASKS, variants=variants, limit=DP_LIMIT, progress=False, log_path=log_path
        )
    assert torch.equal(_logits(model, tokenizer), before)  # the patch is gone, bitwise
    assert tokenlean.active_patches(model) == []
    return {"results": results, "requests": requests, "log_path": log_path, "variants": variants}


@pytest.mark.slow
def test_scores_and_token_savings_of_every_variant(variant_runs):
    results = variant_runs["results"]
    assert list(results) == ["baseline", "sink_window", "random@0.5"]
    for per_task in results.values():
        assert list(per_task) == DP_TASKS
        for metrics in per_task.values():
            assert 0.0 <= metrics["acc"] <= 1.0 and metrics["acc"] * DP_LIMIT == round(
                metrics["acc"] * DP_LIMIT
            )
            assert metrics["context_tokens"] > 0
    base, sink, rand = (results[v] for v in ("baseline", "sink_window", "random@0.5"))
    # smollm2-135m finds every 1k-token pass key; with a 64-token window it cannot see them
    assert base["tokenlean_passkey_1k"]["acc"] == 1.0
    assert sink["tokenlean_passkey_1k"]["acc"] < base["tokenlean_passkey_1k"]["acc"]
    for task in DP_TASKS:
        assert base[task]["tokens_saved"] == sink[task]["tokens_saved"] == 0.0
        assert base[task]["context_tokens"] == sink[task]["context_tokens"]
        assert 0.3 < rand[task]["tokens_saved"] < 0.7  # random word drop at rate 0.5
        assert rand[task]["context_tokens"] < 0.8 * base[task]["context_tokens"]
    # BBH prompts: ~800 tokens (3 chain-of-thought demonstrations), passkeys: at most 1024 cl100k tokens
    assert 500 < base["tokenlean_bbh_navigate"]["context_tokens"] < 1200
    assert 900 < base["tokenlean_passkey_1k"]["context_tokens"] < 1150

    meta = results.tasks
    assert meta["tokenlean_bbh_navigate"]["config"]["output_type"] == "multiple_choice"
    assert meta["tokenlean_passkey_1k"]["config"]["output_type"] == "generate_until"
    assert all(m["primary"] == "acc" and m["n_examples"] == DP_LIMIT for m in meta.values())
    section = bridge.quality_section(results)
    assert section["lm-eval:tokenlean_passkey_1k"]["variants"]["random@0.5"]["tokens_saved"] > 0.3
    assert section["lm-eval:tokenlean_bbh_navigate"]["primary"] == "acc"


@pytest.mark.slow
def test_compressed_requests_keep_description_and_question(variant_runs, tmp_path):
    from tokenlean.eval import task_pack

    docs = {
        "tokenlean_bbh_navigate": task_pack.bbh_docs("navigate")[:DP_LIMIT],
        "tokenlean_passkey_1k": task_pack.passkey_docs(1024, DP_LIMIT),
    }
    contexts = {}
    for variant, task, doc_id, context in variant_runs["requests"]:
        contexts.setdefault((variant, task, doc_id), set()).add(context)
    for (variant, task, doc_id), seen in contexts.items():
        assert len(seen) == 1  # the choices of a question share one (compressed) context
        (context,) = seen
        doc = docs[task][doc_id]
        if task == "tokenlean_bbh_navigate":
            original = _bbh_prefix(doc) + doc["question"]
            assert context.startswith(doc["description"])
            assert context.endswith("\n\n" + doc["question"])
        else:
            original = doc["context"] + " " + doc["question"]
            assert context.endswith(" " + doc["question"])
        if variant == "random@0.5":
            assert len(context) < 0.8 * len(original)
            if task == "tokenlean_bbh_navigate":
                assert not any(demo in context for demo in doc["demos"])
        else:
            assert context == original
    assert {v for v, *_ in contexts} == {"baseline", "sink_window", "random@0.5"}


def _bbh_prefix(doc):
    from tokenlean.eval.bbh import bbh_prefix

    return bbh_prefix(doc["description"], doc["demos"])


@pytest.mark.slow
def test_resume_skips_finished_variants(variant_runs, smollm2, forward_calls):
    model, tokenizer = smollm2
    log_path = variant_runs["log_path"]
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["baseline", "sink_window", "random@0.5"]
    again = bridge.evaluate(
        model,
        tokenizer,
        DP_TASKS,
        variants=variant_runs["variants"],
        limit=DP_LIMIT,
        progress=False,
        log_path=log_path,
    )
    assert forward_calls == []  # everything came from the log
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(variant_runs["results"]))
    assert again.tasks == json.loads(json.dumps(variant_runs["results"].tasks))
    assert len(log_path.read_text().splitlines()) == 3  # nothing appended
    # another limit is another run: nothing is reused
    with pytest.raises(AssertionError, match="must not run"):
        _refuse_runs(model, tokenizer, log_path)


def _refuse_runs(model, tokenizer, log_path):
    import lm_eval

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            lm_eval, "simple_evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("must not run"))
        )
        bridge.evaluate(model, tokenizer, DP_TASKS, limit=DP_LIMIT + 1, progress=False, log_path=log_path)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, out, log, fail_rank=None, timeout=300):
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(
        TOKENLEAN_DP_TASKS=",".join(DP_TASKS),
        TOKENLEAN_DP_METHODS=DP_METHOD,
        TOKENLEAN_DP_LIMIT=str(DP_LIMIT),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    env.pop("TOKENLEAN_DP_FAIL_RANK", None)
    if fail_rank is not None:
        env["TOKENLEAN_DP_FAIL_RANK"] = str(fail_rank)
    driver = Path(__file__).with_name("lm_eval_dp_driver.py")
    # `--cpu` would make accelerate 1.15 use its one-process launcher; `--multi_gpu` on a machine
    # without GPUs starts torchrun workers, and the bridge picks gloo.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(driver), str(out), str(log),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_two_processes_match_one_and_a_dead_rank_fails_the_launch(variant_runs, tmp_path):
    out, log = tmp_path / "results.json", tmp_path / "log.jsonl"

    # rank 1 dies when the patched variant starts, while rank 0 waits for it: the launch fails, fast
    proc, seconds = _launch(tmp_path, out, log, fail_rank=1)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "injected failure on rank 1" in proc.stderr
    assert seconds < 240 and not out.exists()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["baseline"]  # rank 0 logged the finished variant

    # the rerun resumes: only the patched variant runs, on both ranks
    proc, _ = _launch(tmp_path, out, log)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload["world_size"] == 2
    assert [json.loads(line)["variant"] for line in log.read_text().splitlines()] == [
        "baseline",
        "sink_window",
    ]
    single = json.loads(json.dumps(variant_runs["results"]))
    assert payload["results"] == {
        v: single[v] for v in ("baseline", "sink_window")
    }  # identical scores and tokens
    assert payload["tasks"] == json.loads(json.dumps(variant_runs["results"].tasks))


@pytest.mark.slow
def test_a_dispatched_model_is_used_where_it_is(smollm2, tmp_path):
    """A model loaded with a device map (here one layer offloaded to disk) runs without being moved."""
    import transformers

    model, tokenizer = smollm2
    layers = model.config.num_hidden_layers
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": "disk" if i == 0 else "cpu" for i in range(layers)})
    dispatched = transformers.AutoModelForCausalLM.from_pretrained(
        model.config._name_or_path, device_map=device_map, offload_folder=str(tmp_path)
    )
    assert dispatched.hf_device_map["model.layers.0"] == "disk"

    def no_move(*args, **kwargs):
        raise AssertionError("evaluate() must not move a dispatched model")

    dispatched.to = no_move
    results = bridge.evaluate(dispatched, tokenizer, ["tokenlean_passkey_1k"], limit=1, progress=False)
    assert results["baseline"]["tokenlean_passkey_1k"]["acc"] == 1.0
