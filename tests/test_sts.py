"""Similarity data, Spearman, STS tasks in the bench (quality + encode latency), ``tokenlean embed``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tokenlean import data, zoo
from tokenlean.attention import SentenceEncoder
from tokenlean.cli import main
from tokenlean.errors import ZooError
from tokenlean.eval import BenchConfig, get_task, run_bench, spearman
from tokenlean.eval.sts import split_mask


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])


def test_split_mask_is_seeded_and_sized():
    a = split_mask(1225, 0.5, seed=0)
    assert a.sum() == 612 and np.array_equal(a, split_mask(1225, 0.5, seed=0))
    assert not np.array_equal(a, split_mask(1225, 0.5, seed=1))
    with pytest.raises(ValueError, match="dev_fraction"):
        split_mask(10, 1.0)


def test_similarity_sets_are_the_real_ones():
    lee = data.load_similarity("lee")
    assert len(lee) == 1225
    assert lee[0].text_a.startswith("The national executive of the strife-torn Democrats")
    assert lee[0].score == pytest.approx(0.3)
    assert any("£3,000" in p.text_a or "£3,000" in p.text_b for p in lee)  # Latin-1 decoded
    wordsim = data.load_similarity("wordsim353")
    assert len(wordsim) == 353 and (wordsim[0].text_a, wordsim[0].text_b, wordsim[0].score) == (
        "love",
        "sex",
        6.77,
    )
    assert len(data.load_similarity("simlex999")) == 999
    with pytest.raises(ZooError, match="did you mean 'wordsim353'"):
        data.load_similarity("wordsim")


def test_task_specs_take_typed_options():
    task = get_task("sts_lee:prompt=none,layer=-3,pooling=mean", text="x", context_tokens=8, n_windows=2)
    assert task.name == "sts_lee:prompt=none,layer=-3,pooling=mean"
    assert (task.prompt, task.layer, task.pooling) == (None, -3, "mean")
    assert get_task("sts_wordsim353").name == "sts_wordsim353"
    window = get_task("perplexity:n_windows=3", context_tokens=16)
    assert (window.n_windows, window.context_tokens) == (3, 16)
    with pytest.raises(ValueError, match="has no option"):
        get_task("perplexity:prompt=x")
    with pytest.raises(ValueError, match="bad options for task"):
        get_task("sts_lee:promt=x")
    with pytest.raises(ValueError, match="expected key=value"):
        get_task("sts_lee:prompt")
    with pytest.raises(ValueError, match="Did you mean 'sts_lee'"):
        get_task("sts_le")


@pytest.mark.slow
def test_bench_measures_sts_and_encode_latency_with_token_prepending(tmp_path):
    config = BenchConfig(
        model="smollm2-135m",
        methods=["token_prepending:exit_layer=4"],
        tasks=["sts_wordsim353"],
        workload="encode",
        encode_sentences=8,
        batch_size=4,
        repeats=2,
        warmup=0,
    )
    record = run_bench(config, tmp_path / "run", progress=False)
    entry = record["quality"]["sts_wordsim353"]
    base, tp = entry["variants"]["baseline"], entry["variants"]["token_prepending"]
    assert entry["primary"] == "spearman" and base["pairs"] == 353
    assert base["spearman"] != tp["spearman"]
    for row in (base, tp):
        assert 0 < row["spearman"] < 100 and 0 < row["spearman_dev"] < 100 and 0 < row["spearman_test"] < 100

    # the baseline's figure is what an independent computation gives
    model, tokenizer = zoo.load("smollm2-135m")
    pairs = data.load_similarity("wordsim353")
    encoder = SentenceEncoder(model, tokenizer, token_prepending=False)
    a = encoder.encode([p.text_a for p in pairs])
    b = encoder.encode([p.text_b for p in pairs])
    expected = spearmanr((a * b).sum(-1).numpy(), [p.score for p in pairs]).statistic
    assert base["spearman"] == pytest.approx(100 * expected, abs=1e-3)

    assert set(record["latency"]["baseline"]) == {"encode_s", "sentences_per_s", "peak_memory_mb"}
    assert record["speedup"]["token_prepending"]["encode"]["n"] == 2
    lines = (tmp_path / "run" / "latency.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["sample"]["encode_s"] > 0
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "## Quality: sts_wordsim353" in markdown and "| spearman ↑ |" in markdown
    assert "% (sts_wordsim353) |" in markdown and "speed × (encode) |" in markdown  # the headline


@pytest.mark.slow
def test_embed_cli_writes_the_encoder_output(tmp_path, capsys):
    src = tmp_path / "sentences.txt"
    sentences = ["A man is playing a guitar.", "A woman slices an onion", "The sky is blue today"]
    src.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    assert main(["embed", str(src), "-o", str(out), "--tp", "--exit-layer", "5", "--no-progress"]) == 0
    array = np.load(out)
    assert array.shape == (3, 576) and array.dtype == np.float32
    assert "3 x 576 float32 embeddings" in capsys.readouterr().err

    from tokenlean.attention import TokenPrepending

    model, tokenizer = zoo.load("smollm2-135m")
    expected = SentenceEncoder(model, tokenizer, token_prepending=TokenPrepending(exit_layer=5)).encode(
        sentences
    )
    torch.testing.assert_close(torch.from_numpy(array), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (b"one\n\nthree\n", [], "line 2 is empty"),
        (b"caf\xe9\n", [], "not valid UTF-8"),
        (b"\n\n", [], "holds no sentences"),
        (b"fine\n", ["--layer", "99"], "out of range"),
        (b"fine\n", ["--tp", "--exit-layer", "1", "--start-layer", "1"], "greater than start_layer"),
    ],
)
def test_embed_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, content, args, message):
    src = tmp_path / "in.txt"
    src.write_bytes(content)
    out = tmp_path / "out.npy"
    assert main(["embed", str(src), "-o", str(out), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [src]


def test_embed_cli_refuses_a_non_npy_output(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("fine\n")
    assert main(["embed", str(src), "-o", str(tmp_path / "out.txt")]) == 2
    assert "must end with .npy" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o.npy")]) == 2
