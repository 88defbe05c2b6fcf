"""The vqa, vlm_attention_share and vlm_kept_patches tasks on a tiny LLaVA folder, and their report sections."""

from __future__ import annotations

import json

import pytest
import torch

import tokenlean
from tokenlean.compressors.visual import visual_token_stats
from tokenlean.errors import EvalError
from tokenlean.eval import BenchConfig, BenchContext, make_variants, run_bench
from tokenlean.eval.report import Image, _html_blocks, _md_blocks, render_html, render_markdown
from tokenlean.eval.tasks import get_task, task_names
from tokenlean.eval.variants import CompressorPool
from tokenlean.eval.vision import _to_model, processor_inputs
from tokenlean.eval.vqa import (
    QUESTION_TYPES,
    _plot_kept,
    attention_shares,
    normalize_answer,
    question_type,
)
from tokenlean.tiny_vlm import save_tiny_vlm

easy_vqa = pytest.importorskip("easy_vqa")

#: image tokens of one easy-vqa picture in the tiny LLaVA (a 4 × 4 grid)
TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_vlm("llava", tmp_path_factory.mktemp("vqa") / "tiny-llava")
    model, processor = tokenlean.zoo.load(str(folder))
    model.eval()
    bench = BenchContext(model, processor, str(folder), CompressorPool(shared_models={}), seed=0)
    return folder, model, processor, bench


def _rows(task, bench, specs):
    """``{variant: [row per example]}`` of ``task`` for the baseline and ``specs``."""
    examples = task.examples(bench.tokenizer)
    rows = {}
    for variant in make_variants(specs, [], []):
        if variant.kind not in task.kinds:
            continue
        with variant.applied(bench.model):
            rows[variant.name] = [task.run(bench, variant, e, None) for e in examples]
    return examples, rows


def test_the_tasks_are_registered():
    assert {"vqa", "vlm_attention_share", "vlm_kept_patches"} <= set(task_names())
    assert get_task("vqa:n=all").n is None
    with pytest.raises(EvalError, match="positive integer"):
        get_task("vqa:n=0")
    with pytest.raises(EvalError, match="retain"):
        get_task("vlm_kept_patches:retain=1.5")


def test_answer_normalisation():
    assert normalize_answer("Circle </s>") == "circle"
    assert normalize_answer(" Yes. <pad><pad>") == "yes"
    assert normalize_answer("<|im_end|>TEAL", special_tokens=("<|im_end|>",)) == "teal"
    assert normalize_answer("no no") == "no no"  # a repeated answer is not an exact match


def test_question_types_cover_every_easy_vqa_answer():
    answers = easy_vqa.get_answers()
    types = {a: question_type(a) for a in answers}
    assert set(types.values()) == set(QUESTION_TYPES)
    assert sorted(a for a, t in types.items() if t == "shape") == ["circle", "rectangle", "triangle"]
    assert sorted(a for a, t in types.items() if t == "yes_no") == ["no", "yes"]
    assert len([a for a, t in types.items() if t == "color"]) == len(answers) - 5 == 8


def test_vqa_task_rows_and_aggregate(tiny):
    _, model, processor, bench = tiny
    task = get_task("vqa:n=32")
    examples, rows = _rows(task, bench, ["random_prune:retain_ratio=0.25", "todre:retain_ratio=0.25"])
    assert [len(e.data) for e in examples] == [16, 16]
    batch = task._inputs(examples[0])
    assert bool(batch["attention_mask"][:, -1].all())  # left-padded: every prompt ends in the last column
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 16 * TOKENS
    for name, variant_rows in rows.items():
        values = task.aggregate(variant_rows)
        assert 0.0 <= values["accuracy"] <= 1.0
        assert values["accuracy_n"] == 32
        assert sum(values[f"{t}_n"] for t in QUESTION_TYPES) == 32
        correct = sum(r["correct"] for r in variant_rows)
        assert correct == sum(r[f"{t}_correct"] for r in variant_rows for t in QUESTION_TYPES)
        for key in ("accuracy", *QUESTION_TYPES):
            if values[f"{key}_n"]:
                assert values[f"{key}_low"] <= values[key] <= values[f"{key}_high"]
        expected = TOKENS if name == "baseline" else TOKENS // 4
        assert values["visual_tokens_decoder"] == expected
        assert values["visual_tokens_input"] == TOKENS
        assert (values["stage2_fired"] is not None) == name.startswith("todre")
    random_name = next(name for name in rows if name.startswith("random_prune"))
    paired = task.compare(rows[random_name], rows["baseline"])
    assert paired["accuracy_diff_low"] <= paired["accuracy_diff"] <= paired["accuracy_diff_high"]
    json.dumps(rows)  # rows go to samples.jsonl as they are


def test_vqa_scores_exact_matches(tiny, monkeypatch):
    """A model that answers every question right (in capitals, then </s>) scores 100 %; wrong ones 0 %."""
    _, model, processor, bench = tiny
    task = get_task("vqa:n=20,batch=8")
    examples = task.examples(processor)
    tokenizer = processor.tokenizer
    current: list[str] = []

    def oracle(**inputs):
        answers = [tokenizer(a.capitalize() + "</s>", add_special_tokens=False).input_ids for a in current]
        width = max(map(len, answers))
        tail = [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in answers]
        return torch.cat([inputs["input_ids"], torch.tensor(tail)], dim=1)

    monkeypatch.setattr(model, "generate", oracle)
    baseline = make_variants([], [], [])[0]
    rows = []
    for example in examples:
        current[:] = [answer for *_, answer in example.data]
        rows.append(task.run(bench, baseline, example, None))
    assert task.aggregate(rows)["accuracy"] == 1.0
    for row, example in zip(rows, examples):
        assert row["predictions"] == [normalize_answer(answer) for *_, answer in example.data]
    for example in examples:
        current[:] = ["no" if answer == "yes" else "yes" for *_, answer in example.data]
        row = task.run(bench, baseline, example, None)
        assert row["yes_no_correct"] == 0 and row["n"] == len(example.data)


def test_attention_share_equals_a_hand_computation(tiny):
    _, model, processor, bench = tiny
    question = "Is there a red shape in the image?"
    image = easy_vqa_picture()
    inputs = processor_inputs(processor, [image], [question])
    shares = attention_shares(model, inputs)  # the model runs SDPA; the task switches to eager and back
    assert model.config.get_text_config()._attn_implementation == "sdpa"

    ids = inputs["input_ids"][0]
    visual = ids == model.config.image_token_id
    first = int(visual.nonzero()[0])
    rows = [i for i in range(first + 1, len(ids)) if not visual[i]]
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**_to_model(inputs, model), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    layers = model.config.get_text_config().num_hidden_layers
    assert shares.shape == (1, layers)
    for layer, probs in enumerate(out.attentions):
        per_row = [float(probs[0, :, r][:, visual].sum(-1).mean()) for r in rows]
        assert shares[0, layer].item() == pytest.approx(sum(per_row) / len(per_row), abs=1e-5)

    # ToDRE's stage 2 reads the same α in the layer before its relevance layer
    for layer in range(1, layers):
        with tokenlean.patch(model, "todre", retain_ratio=1.0, relevance_layer=layer, tau=0.0):
            with torch.inference_mode():
                model(**_to_model(inputs, model))
            alpha = visual_token_stats(model)["text_to_visual_attention"][0]
        assert alpha == pytest.approx(shares[0, layer - 1].item(), abs=1e-5)


def easy_vqa_picture():
    from tokenlean.eval.vision import load_images

    return load_images("easy-vqa", 1)[0]


def test_attention_share_task_aggregate_and_extra(tiny):
    _, _, _, bench = tiny
    task = get_task("vlm_attention_share:m=6,batch=4")
    examples, rows = _rows(task, bench, ["random_prune:retain_ratio=0.25"])
    assert list(rows) == ["baseline"]  # the unpatched model only
    values = task.aggregate(rows["baseline"])
    assert values["prompts"] == 6 and values["layers"] == 3
    assert 0 <= values["stage2_would_fire"] <= 1
    extra = task.extra(rows)
    assert extra["stage2_layer"] == 2 and extra["read_layer"] == 1  # round(0.875 * 3) = 3 -> capped at L - 1
    assert all(lo <= med <= hi for lo, med, hi in zip(extra["q25"], extra["median"], extra["q75"]))


def test_kept_patches_figure(tiny, tmp_path):
    _, model, _, bench = tiny
    task = get_task("vlm_kept_patches:retain=0.25,images=3")
    specs = ["random_prune:retain_ratio=0.25", "fastv:retain_ratio=0.25", "pool_prune:retain_ratio=0.25",
             "divprune:retain_ratio=0.5"]  # fmt: skip
    _, rows = _rows(task, bench, specs)
    extra = task.extra(rows)
    at_quarter = [
        v.name for v in make_variants(specs, [], []) if v.method and v.method.params()["retain_ratio"] == 0.25
    ]
    assert sorted(extra["variants"]) == sorted(at_quarter) and len(at_quarter) == 3  # not divprune at 0.5
    assert len(extra["pictures"]) == 3 and extra["tokens"] == TOKENS
    for name, cell in extra["variants"].items():
        assert cell["source"] == ("decoder" if name.startswith("fastv") else "stage1")
        assert [len(k) for k in cell["kept"]] == [TOKENS // 4] * 3
        assert all(0 <= i < TOKENS for k in cell["kept"] for i in k)
    divprune = next(name for name in rows if name.startswith("divprune"))
    assert task.aggregate(rows[divprune])["kept_tokens"] is None
    record = {"variants": [v.record() for v in make_variants(specs, [], [])], "model": {"name": "tiny"}}
    png = _plot_kept(record, json.loads(json.dumps(extra)))  # as read back from report.json
    assert png.startswith(b"\x89PNG")
    (tmp_path / "kept.png").write_bytes(png)


def test_image_blocks_render_in_markdown_and_html():
    block = Image(b"\x89PNG-not-really", "a_plot.png", "a caption")
    markdown = "\n".join(_md_blocks([block]))
    assert "![a plot](a_plot.png)" in markdown and "_a caption_" in markdown
    assert 'src="data:image/png;base64,' in "\n".join(_html_blocks([block]))
    for bad in ("../x.png", "x.jpg", "latency.png"):
        with pytest.raises(ValueError, match="filename"):
            Image(b"", bad)


def test_bench_writes_the_vqa_report(tiny, tmp_path):
    folder, model, processor, _ = tiny
    config = BenchConfig(
        model=str(folder),
        methods=["random_prune:retain_ratio=0.25"],
        tasks=["vqa:n=16,batch=8", "vlm_attention_share:m=4", "vlm_kept_patches:retain=0.25,images=2"],
        workload="vision",
        new_tokens=2,
        repeats=1,
        warmup=0,
    )
    record = run_bench(config, tmp_path / "run", model=model, tokenizer=processor, progress=False)
    assert record["quality"]["vqa:n=16,batch=8"]["variants"]["random_prune"]["visual_tokens"] == TOKENS // 4
    out = tmp_path / "run"
    markdown = (out / "report.md").read_text()
    assert "## Quality: vqa:n=16,batch=8" in markdown and "accuracy ↑" in markdown
    assert "would fire on" in markdown  # the information-migration verdict
    pictures = (
        "vqa_n_16_batch_8_accuracy_vs_tokens.png",
        "vqa_n_16_batch_8_ttft.png",
        "vlm_attention_share_m_4.png",
        "vlm_kept_patches_retain_0_25_images_2.png",
    )
    for name in pictures:
        assert f"]({name})" in markdown
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6  # 4 section pictures + speedup + latency
    # re-rendering from the record alone (no model, no easy-vqa pictures needed) gives the same tables
    record = json.loads((out / "report.json").read_text())
    assert render_markdown(record) == markdown
    assert "vqa" in render_html(record, {})
