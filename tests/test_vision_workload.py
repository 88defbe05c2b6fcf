"""Vision-language models in the harness: tiny VLM folders, the vision workload, the vlm_fidelity task."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import tokenlean
from tokenlean import OutputDirError
from tokenlean.errors import EvalError
from tokenlean.eval import BenchConfig, BenchContext, make_variants, measure_generation, run_bench
from tokenlean.eval.tasks import get_task
from tokenlean.eval.variants import CompressorPool
from tokenlean.eval.vision import VisionWorkload, load_images, vlm_inputs
from tokenlean.testing import tiny_model
from tokenlean.tiny_vlm import TINY_VLM_FAMILIES, save_tiny_vlm

#: image tokens of one 64×64 easy-vqa picture per tiny family (see tokenlean.tiny_vlm)
IMAGE_TOKENS = {"llava": 16, "llava_next": 36, "qwen2_vl": 16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {family: save_tiny_vlm(family, root / family) for family in TINY_VLM_FAMILIES}


@pytest.fixture(scope="module")
def tiny_llava(folders):
    model, processor = tokenlean.zoo.load(str(folders["llava"]))
    return folders["llava"], model, processor


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_saved_tiny_vlm_loads_with_a_processor_the_model_accepts(folders, family):
    model, processor = tokenlean.zoo.load(str(folders[family]))
    assert model.config.model_type == family
    assert getattr(processor, "image_processor", None) is not None
    assert len(processor.tokenizer) == model.config.get_text_config().vocab_size
    (image,) = load_images("easy-vqa", 1)
    inputs = vlm_inputs(processor, [image], ["What shape is in the image?"], model)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == IMAGE_TOKENS[family]
    with torch.inference_mode():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    text = processor.decode(out[0, : inputs["input_ids"].shape[1]], skip_special_tokens=True)
    assert "What shape is in the image?" in text
    processor.chat_template = None  # the plain "<image>\n{question}" prompt marks the image alike
    plain = vlm_inputs(processor, [image], ["What shape is in the image?"], model)
    assert plain["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    assert int((plain["input_ids"] == model.config.image_token_id).sum()) == IMAGE_TOKENS[family]
    with torch.inference_mode():
        model(**plain)


def test_save_tiny_vlm_is_atomic(tmp_path, monkeypatch, folders):
    target = tmp_path / "tiny"

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    model_class = type(tiny_model("llava"))
    monkeypatch.setattr(model_class, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_tiny_vlm("llava", target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either
    monkeypatch.undo()

    with pytest.raises(OutputDirError, match="already exists"):
        save_tiny_vlm("llava", folders["llava"])
    with pytest.raises(ValueError, match="family"):
        save_tiny_vlm("gpt2", target)


def test_measure_generation_passes_extra_inputs_and_grows_the_mask(tiny_llava):
    _, model, processor = tiny_llava
    inputs = vlm_inputs(processor, load_images("easy-vqa", 1), ["What colour?"], model)
    input_ids = inputs.pop("input_ids")
    masks = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"].shape[1]), with_kwargs=True
    )
    try:
        sample = measure_generation(model, input_ids, 4, extra_inputs=inputs)
    finally:
        hook.remove()
    prompt = input_ids.shape[1]
    assert masks == [prompt, prompt + 1, prompt + 2, prompt + 3]
    assert 0 < sample.prefill_s <= sample.ttft_s <= sample.e2e_s


def test_vision_workload_and_vlm_fidelity_write_a_report(tiny_llava, tmp_path):
    folder, model, processor = tiny_llava
    config = BenchConfig(
        model=str(folder),
        workload="vision",
        tasks=["vlm_fidelity:n=4"],
        repeats=2,
        warmup=0,
        new_tokens=4,
    )
    record = run_bench(config, tmp_path, model=model, tokenizer=processor, progress=False)
    for name in ("report.json", "report.md", "report.html", "latency.png", "run.json"):
        assert (tmp_path / name).stat().st_size > 0
    latency = record["latency"]["baseline"]
    for metric in ("visual_tokens_input", "visual_tokens_decoder", "visual_tokens_per_layer"):
        assert latency[metric]["median"] == IMAGE_TOKENS["llava"]
        assert record["workload"]["metrics"][metric] == ["tokens", False]
    assert latency["e2e_s"]["n"] == 2 and latency["prefill_s"]["median"] > 0
    assert record["workload"]["options"]["images"] == "easy-vqa"
    fidelity = record["quality"]["vlm_fidelity:n=4"]
    assert fidelity["primary"] == "answer_agreement" and fidelity["n_examples"] == 4
    baseline = fidelity["variants"]["baseline"]
    assert baseline["answer_agreement"] == 1.0 and baseline["top1_agreement"] == 1.0
    assert baseline["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < baseline["answer_agreement_low"] < 1.0 == baseline["answer_agreement_high"]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Workload: vision" in markdown and "same answer" in markdown
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["metrics"]["visual_tokens"] == 16 for s in samples)


def test_random_prune_feeds_the_decoder_fewer_visual_tokens(tiny_llava, tmp_path):
    folder, model, processor = tiny_llava
    config = BenchConfig(
        model=str(folder),
        methods=["random_prune:retain_ratio=0.5"],
        workload="vision",
        tasks=["vlm_fidelity:n=2"],
        repeats=1,
        warmup=0,
        new_tokens=2,
    )
    record = run_bench(config, tmp_path, model=model, tokenizer=processor, progress=False)
    baseline, pruned = record["latency"]["baseline"], record["latency"]["random_prune"]
    assert pruned["visual_tokens_input"]["median"] == baseline["visual_tokens_input"]["median"] == 16
    assert pruned["visual_tokens_decoder"]["median"] < baseline["visual_tokens_decoder"]["median"]
    assert pruned["visual_tokens_decoder"]["median"] == 8
    fidelity = record["quality"]["vlm_fidelity:n=2"]["variants"]
    assert fidelity["random_prune"]["visual_tokens"] == 8 < fidelity["baseline"]["visual_tokens"]
    assert tokenlean.active_patches(model) == []


def test_vision_workload_batches_photographs_on_qwen2_vl(folders):
    model, processor = tokenlean.zoo.load(str(folders["qwen2_vl"]))
    bench = BenchContext(model, processor, "tiny-qwen2-vl", CompressorPool())
    workload = VisionWorkload(bench, new_tokens=3, batch_size=2, images="skimage", question="What is this?")
    assert workload.inputs["input_ids"].shape[0] == 2
    assert workload.options()["question"] == "What is this?"
    sample = workload.measure(make_variants([], [], [])[0])
    expected = (workload.inputs["input_ids"] == model.config.image_token_id).sum(-1).float().mean().item()
    assert sample["visual_tokens_input"] == sample["visual_tokens_decoder"] == expected > 0
    assert sample["decode_tokens_per_s"] > 0
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in load_images("skimage", 2))


def test_vision_needs_a_vision_language_model_and_its_processor(tiny_llava, tmp_path):
    _, vlm, processor = tiny_llava
    text_model = tiny_model("llama")
    for model, tokenizer in ((text_model, processor.tokenizer), (text_model, processor)):
        config = BenchConfig(model="tiny-llama", workload="vision", tasks=[], repeats=1, warmup=0)
        with pytest.raises(EvalError, match="needs a vision-language model loaded with its processor"):
            run_bench(
                config, tmp_path / "run", model=model, tokenizer=tokenizer, progress=False, overwrite=True
            )
    with pytest.raises(EvalError, match="vision-language model"):
        get_task("vlm_fidelity").examples(processor.tokenizer)
    bench = BenchContext(vlm, processor, "tiny-llava", CompressorPool())
    with pytest.raises(EvalError, match="image set"):
        VisionWorkload(bench, images="imagenet")
    with pytest.raises(EvalError, match="batch_size"):
        VisionWorkload(bench, batch_size=0)
    with pytest.raises(ValueError, match="positive integer"):
        get_task("vlm_fidelity:n=0")
