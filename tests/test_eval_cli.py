"""``tokenlean eval``: lm-eval tasks from the offline pack for the baseline and every variant, in one
process and data-parallel under ``accelerate launch`` (2 CPU processes over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenlean.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (tokenlean[lmeval])")

TASKS = "tokenlean_bbh_navigate,tokenlean_passkey_1k"
ARGS = ["--model", "smollm2-135m", "--method", "sink_window:window=64", "--tasks", TASKS, "--limit", "4",
        "--no-progress"]  # fmt: skip


def _scores(folder: Path) -> dict:
    quality = json.loads((folder / "report.json").read_text())["quality"]
    return {task: entry["variants"] for task, entry in quality.items()}


@pytest.mark.slow
def test_eval_gives_the_same_scores_in_one_and_in_two_processes(tmp_path, capsys):
    assert main(["eval", *ARGS, "--out", str(tmp_path / "one")]) == 0
    md = capsys.readouterr().out
    assert (
        "## Quality: lm-eval:tokenlean_bbh_navigate" in md
        and "## Quality: lm-eval:tokenlean_passkey_1k" in md
    )
    single = _scores(tmp_path / "one")
    assert set(single) == {"lm-eval:tokenlean_bbh_navigate", "lm-eval:tokenlean_passkey_1k"}
    for variants in single.values():
        assert set(variants) == {"baseline", "sink_window"}
    # the unpatched model finds a 1k-token pass key; a 64-token window cannot see it
    assert single["lm-eval:tokenlean_passkey_1k"]["baseline"]["acc"] == 1.0
    assert single["lm-eval:tokenlean_passkey_1k"]["sink_window"]["acc"] < 1.0

    # accelerate's multi-process launcher; on a machine without GPUs the processes talk over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "tokenlean", "eval", *ARGS, "--out", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "report.json").read_text())
    assert record["machine"]["processes"] == 2
    merged = _scores(tmp_path / "two")
    for task, variants in single.items():
        for name, metrics in variants.items():
            for metric, value in metrics.items():
                if metric.endswith("_stderr"):  # computed from the merged samples: summation order differs
                    assert merged[task][name][metric] == pytest.approx(value, rel=1e-9), (task, name, metric)
                else:  # scores and token counts: exactly the single process's
                    assert merged[task][name][metric] == value, (task, name, metric)


def test_eval_bad_input_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["eval", "--tasks", TASKS, "--limit", "0", "--out", str(out)]) == 2
    assert "--limit must be a positive number" in capsys.readouterr().err
    assert main(["eval", "--tasks", TASKS, "--rate", "0.5", "--out", str(out)]) == 2
    assert "no --compressor" in capsys.readouterr().err
    assert main(["eval", "--tasks", TASKS, "--method", "default", "--out", str(out)]) == 2
    assert "pass it with --compressor" in capsys.readouterr().err
    assert main(["eval", "--tasks", " , ", "--out", str(out)]) == 2
    assert "names no task" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_eval_unknown_task_gets_close_names_and_writes_no_report(tmp_path, capsys):
    out = tmp_path / "y"
    assert (
        main(["eval", "--tasks", "tokenlean_passkey_1", "--limit", "2", "--out", str(out), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "tokenlean_passkey_1" in err and "did you mean" in err.lower()
    assert not (out / "report.json").exists()


@pytest.mark.slow
def test_eval_refuses_a_folder_holding_another_run(tmp_path, capsys):
    out = tmp_path / "z"
    assert (
        main(["eval", "--tasks", "tokenlean_passkey_1k", "--limit", "1", "--out", str(out), "--no-progress"])
        == 0
    )
    before = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert (
        main(["eval", "--tasks", "tokenlean_passkey_1k", "--limit", "2", "--out", str(out), "--no-progress"])
        == 2
    )
    assert "different run" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
