"""Integration on the real smollm2-135m from the zoo (fetched by `make test` before pytest)."""

from __future__ import annotations

import json

import pytest
import torch

import tokenlean
from tokenlean.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return tokenlean.zoo.load("smollm2-135m")


def _chat(tokenizer, question):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt")


def test_patch_and_remove_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    inputs = _chat(tokenizer, "What is the capital of France? Answer in one sentence.")
    with torch.no_grad():
        logits = model(**inputs).logits
        answer = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        with tokenlean.patch(model, "sink_window", sink_tokens=4, window=16):
            patched_logits = model(**inputs).logits
        after_logits = model(**inputs).logits
        after_answer = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert inputs["input_ids"].shape[1] > 16
    assert not torch.allclose(logits, patched_logits)
    assert torch.equal(logits, after_logits) and torch.equal(answer, after_answer)
    assert "Paris" in tokenizer.decode(after_answer[0, inputs["input_ids"].shape[1] :])


def test_bench_cli_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["bench", "--model", "smollm2-135m", "--method", "sink_window:sink_tokens=4,window=32", "--out", str(out),
            "--prompt-tokens", "64", "--new-tokens", "4", "--repeats", "2", "--context-tokens", "128", "--windows", "2",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "report.json").read_text())
    ppl = record["quality"]["perplexity"]["variants"]
    assert 5 < ppl["baseline"]["perplexity"] < 100  # a real LM on real English prose
    assert ppl["sink_window"]["perplexity"] > ppl["baseline"]["perplexity"]  # seeing less costs quality
    assert record["model"]["class"] == "LlamaForCausalLM"
    assert "| sink_window |" in capsys.readouterr().out
