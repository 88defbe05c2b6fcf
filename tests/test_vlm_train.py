"""``tokenlean train-vlm`` and the shipped ``easyvqa-llava``: packing, training, resume, loading, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("easy_vqa")

from safetensors.torch import load_file  # noqa: E402

from tokenlean import cli, zoo  # noqa: E402
from tokenlean import vlm_train as V  # noqa: E402
from tokenlean.errors import CacheCorruptError  # noqa: E402

# Fixed easy-vqa test questions (split index) with their answers: shape, colour and yes/no ones.
FIXED_QUESTIONS = (0, 1, 2, 3, 4, 5, 6, 7, 8)
TINY = [
    "--max-steps",
    "3",
    "--images-per-step",
    "2",
    "--vision-pretrain-steps",
    "2",
    "--final-eval",
    "none",
    "--quiet",
]


@pytest.fixture(scope="module")
def processor():
    return V.build_processor()


@pytest.fixture(scope="module")
def test_split():
    return V.load_easyvqa("test")


def _chat(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _answer(model, processor, image, question: str) -> str:
    inputs = processor(images=image, text=_chat(processor, question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# Processor and packing
# --------------------------------------------------------------------------------------------


def test_processor_prompt_tokens_and_image_tokens(processor):
    tok = processor.tokenizer
    assert tok.tokenize("What is the blue shape? circle?")[-2:] == ["circle", "?"]
    for name in V.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(name) != tok.unk_token_id or name == V.UNK
    assert _chat(processor, "what shape is it?") == "<image>\nwhat shape is it?\nanswer:"
    from PIL import Image

    inputs = processor(
        images=Image.new("RGB", (64, 64)), text=_chat(processor, "is it red?"), return_tensors="pt"
    )
    image_id = tok.convert_tokens_to_ids(V.IMAGE)
    assert int((inputs["input_ids"] == image_id).sum()) == V.NUM_PATCHES == 144
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 60, 60)


def test_packed_logits_equal_separate_sequences(processor, test_split):
    from PIL import Image

    torch.set_num_threads(2)
    model = V.build_model(processor.tokenizer, seed=0).eval()
    prep = V.prepare(test_split, processor, list(range(40)))
    rows = [0, 1, 2]
    batch, pixels = V._batch_for(prep, rows, processor.tokenizer)
    with torch.no_grad():
        packed = V.answer_logits(model, batch, pixels)
        # the training path (own vision pass + scatter) equals LLaVA's own forward on the packed rows
        full = model(
            input_ids=batch["input_ids"],
            pixel_values=pixels,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[batch["answer_row"], batch["answer_pos"]]
        assert torch.allclose(packed, full, atol=1e-5, rtol=0)
        questions = [q for r in rows for q in prep.items[r].labels]
        assert len(questions) == packed.shape[0] >= 6
        for k, q in enumerate(questions):
            image = Image.open(test_split.image_paths[test_split.image_ids[q]])
            text = _chat(processor, test_split.questions[q])
            alone = model(**processor(images=image, text=text, return_tensors="pt")).logits[0, -1]
            assert torch.allclose(packed[k], alone, atol=1e-5, rtol=0), (k, (packed[k] - alone).abs().max())


# --------------------------------------------------------------------------------------------
# Training: CLI run, resume, occupied folders
# --------------------------------------------------------------------------------------------


def test_cli_run_writes_a_loadable_model(tmp_path, processor, test_split):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "run"
    assert cli.main(["train-vlm", "--out", str(out), "--seed", "1", *TINY]) == 0
    report = json.loads((out / "log.json").read_text())
    assert report["steps"] == 3 and report["config"]["seed"] == 1
    assert (out / "checkpoints" / V.CHECKPOINT_NAME).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left
    model = LlavaForConditionalGeneration.from_pretrained(out / "model").eval()
    loaded = AutoProcessor.from_pretrained(out / "model")
    assert model.config.text_config.num_hidden_layers >= 8
    assert model.config.vision_feature_layer == -1
    image = Image.open(test_split.image_paths[test_split.image_ids[0]])
    answer = _answer(model, loaded, image, test_split.questions[0])
    assert isinstance(answer, str)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = V.TrainConfig(seed=3, max_steps=4, images_per_step=2, vision_pretrain_steps=2)
    V.train_vlm(tmp_path / "straight", cfg, final_eval="none", progress=False)
    part = V.train_vlm(tmp_path / "resumed", cfg, final_eval="none", progress=False, stop_after=2)
    assert part["interrupted"] and not (tmp_path / "resumed" / "model").exists()
    with pytest.raises(OSError, match="--resume"):  # the half-done folder is not silently reused
        V.train_vlm(tmp_path / "resumed", cfg, final_eval="none", progress=False)
    V.train_vlm(tmp_path / "resumed", cfg, final_eval="none", progress=False, resume=True)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "resumed" / "log.json").read_text())["steps"] == 4


def test_occupied_folder_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's files")
    assert cli.main(["train-vlm", "--out", str(out), *TINY]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["train-vlm", "--out", str(out), "--overwrite", *TINY]) == 2  # not a run folder
    assert (out / "notes.txt").exists()

    other = tmp_path / "other"
    (other).mkdir()
    from dataclasses import asdict

    from tokenlean._runs import prepare_run_dir

    prepare_run_dir(  # another run's folder
        other, asdict(V.TrainConfig(seed=5)), overwrite=False, resume=False, command="train-vlm", product="model",
        error=V.VLMTrainError,
    )  # fmt: skip
    assert cli.main(["train-vlm", "--out", str(other), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["train-vlm", "--out", str(other), "--overwrite", *TINY]) == 0
    assert json.loads((other / "run.json").read_text())["config"]["seed"] == 0


# --------------------------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return zoo.load("easyvqa-llava")


def test_shipped_model_answers_test_questions(shipped, test_split):
    from PIL import Image

    model, processor = shipped
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers >= 8
    entry = zoo.get_entry("easyvqa-llava")
    assert entry.is_cached and entry.kind == "vlm"
    manifest = json.loads((entry.path / zoo.PACKAGED_MANIFEST_NAME).read_text())
    # issue 12 asks for >= 0.97; the shipped run (seed 0, 3,800 steps) reached 0.996 on the full test split
    assert manifest["test_accuracy"] >= 0.97
    assert sum(f["size"] for f in manifest["files"].values()) <= 20e6
    types = set()
    for q in FIXED_QUESTIONS:
        image = Image.open(test_split.image_paths[test_split.image_ids[q]])
        assert _answer(model, processor, image, test_split.questions[q]) == test_split.answers[q], q
        types.add(V.answer_types(test_split.answers[q]))
    assert types == set(V.QUESTION_TYPES)


def test_shipped_model_is_at_least_97_percent_right_on_test_questions(shipped, test_split):
    """The manifest's figure, checked independently on 600 seeded test questions (greedy answer word)."""
    model, processor = shipped
    picks = torch.randperm(len(test_split.questions), generator=torch.Generator().manual_seed(7))[:600]
    result = V.evaluate(model, processor, V.prepare(test_split, processor, sorted(picks.tolist())))
    assert result["questions"] == 600
    assert result["accuracy"] >= 0.97, result


def test_shipped_model_takes_images_of_any_size_and_mode(shipped, test_split):
    from PIL import Image

    model, processor = shipped
    q = FIXED_QUESTIONS[0]
    image = Image.open(test_split.image_paths[test_split.image_ids[q]]).convert("RGBA").resize((100, 80))
    inputs = processor(images=image, text=_chat(processor, test_split.questions[q]), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 60, 60)
    assert _answer(model, processor, image, test_split.questions[q]) == test_split.answers[q]
    gray = Image.open(test_split.image_paths[test_split.image_ids[q]]).convert("L")
    assert tuple(processor(images=gray, text="<image>", return_tensors="pt")["pixel_values"].shape) == (
        1,
        3,
        60,
        60,
    )


def test_shipped_model_honours_dtype():
    model, _ = zoo.load("easyvqa-llava", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    zoo.verify("easyvqa-llava")
    assert zoo.fetch("easyvqa-llava") == zoo.get_entry("easyvqa-llava").path
    assert zoo.remove("easyvqa-llava") is False


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    source = zoo.get_entry("easyvqa-llava").path
    copy = tmp_path / "zoo_data" / source.name
    shutil.copytree(source, copy)
    monkeypatch.setattr(zoo, "_ZOO_DATA", copy.parent)
    assert zoo.get_entry("easyvqa-llava").path == copy
    return copy


def test_corrupt_shipped_weights_raise(shipped_copy):
    weights = shipped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="model.safetensors"):
        zoo.load("easyvqa-llava")
    with pytest.raises(CacheCorruptError, match="sha256"):
        zoo.verify("easyvqa-llava")


def test_missing_shipped_file_raises(shipped_copy):
    (shipped_copy / "tokenizer.json").unlink()
    with pytest.raises(CacheCorruptError, match="tokenizer.json"):
        zoo.load("easyvqa-llava")
    (shipped_copy / zoo.PACKAGED_MANIFEST_NAME).unlink()
    with pytest.raises(CacheCorruptError, match="manifest.json"):
        zoo.load("easyvqa-llava")


def test_image_labels_read_negated_questions():
    assert V._image_labels(["does the image not contain a gray shape?"], ["yes"]) == (-100, -100)
    assert V._image_labels(["is there not a circle?"], ["no"]) == (0, -100)
    assert V._image_labels(["what color is the triangle?"], ["blue"]) == (2, 2)
    assert V._image_labels(["is no red shape present?"], ["no"]) == (-100, 0)
    assert V._image_labels(["what is the blue shape?"], ["rectangle"]) == (1, 2)


def test_yes_no_groups_and_balanced_answer_weights():
    assert V.yes_no_group("is there not a red shape?", "no") == "neg color no"
    assert V.yes_no_group("does this image contain a circle?", "yes") == "pos shape yes"
    assert V.yes_no_group("what color is the shape?", "red") is None
    questions = ["is there a red shape?"] * 9 + ["is there a blue shape?"]
    answers = ["no"] * 8 + ["yes", "yes"]
    questions += [
        "is there not a circle?",
        "is there not a circle?",
        "does the image not contain a triangle?",
    ]
    answers += ["yes", "no", "no"]
    questions.append("what shape is in the image?")
    answers.append("circle")
    w = V.answer_loss_weights(questions, answers)
    # pos colour: 8 no and 2 yes share 10 units equally; neg shape: 1 yes and 2 no share 3; open: 1
    assert w[:8] == [10 / 16] * 8 and w[8:10] == [2.5, 2.5]
    assert w[10] == 1.5 and w[11:13] == [0.75, 0.75]
    assert w[13] == 1.0
    assert sum(w[:8]) == sum(w[8:10]) and w[10] == sum(w[11:13])


def test_balanced_answer_loss_changes_the_training_and_ramps_in(tmp_path):
    plain = V.TrainConfig(seed=3, max_steps=2, images_per_step=2, vision_pretrain_steps=0)
    balanced = V.TrainConfig(
        **{**plain.__dict__, "balance_yes_no": True, "balance_from": 0.0, "balance_until": 0.0}
    )
    a = V.train_vlm(tmp_path / "plain", plain, final_eval="none", progress=False)
    b = V.train_vlm(tmp_path / "balanced", balanced, final_eval="none", progress=False)
    assert a["steps"] == b["steps"] == 2
    wa = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "balanced" / "model" / "model.safetensors")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    ramp = V.TrainConfig(max_steps=10, balance_yes_no=True, balance_from=0.2, balance_until=0.6)
    assert [V._balance_share(s, ramp) for s in (0, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert V._balance_share(9, plain) == 0.0
    with pytest.raises(V.VLMTrainError, match="balance_from"):
        V.train_vlm(tmp_path / "bad", V.TrainConfig(balance_from=0.7, balance_until=0.6), progress=False)


def test_color_templates_and_contrast_pairs_are_minimal_and_correct(processor):
    import numpy as np

    train = V.load_easyvqa("train")
    templates = V.color_templates(train.questions)
    assert len(templates) == 8 and sum(neg for _, neg in templates) == 4
    assert ("is there not a {} shape?", True) in templates and ("is a {} shape present?", False) in templates
    prep = V.prepare(train, processor, list(range(600)))  # about 60 pictures
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    rng = np.random.default_rng(0)
    checked = 0
    for row in range(len(prep.items)):
        color = int(prep.aux_color[row])
        if color < 0:
            continue
        qs, ans = V.contrast_questions(prep, color, 3, rng, yes, no)
        assert len(qs) == len(ans) == 6
        for k in range(0, 6, 2):
            own, other = tok.decode(qs[k]), tok.decode(qs[k + 1])
            assert V.COLORS[color] in own.split() and V.COLORS[color] not in other.split()
            assert own.split()[:2] == other.split()[:2] and len(own.split()) == len(other.split())
            negated = "not" in own.split() or "no" in own.split()
            # the picture's own colour: yes unless negated; another colour: the opposite
            assert ans[k] == (no if negated else yes) and ans[k + 1] == (yes if negated else no)
        checked += 1
    assert checked > 30


def test_contrast_pairs_add_questions_and_are_validated(tmp_path):
    plain = V.TrainConfig(seed=3, max_steps=1, images_per_step=2, vision_pretrain_steps=0, contrast_pairs=0)
    paired = V.TrainConfig(**{**plain.__dict__, "contrast_pairs": 2})
    a = V.train_vlm(tmp_path / "plain", plain, final_eval="none", progress=False)
    b = V.train_vlm(tmp_path / "paired", paired, final_eval="none", progress=False)
    extra = b["questions_seen"] - a["questions_seen"]
    assert extra in (0, 4, 8) and extra > 0  # 2 pairs per picture whose colour the labels tell
    with pytest.raises(V.VLMTrainError, match="contrast_pairs"):
        V.train_vlm(tmp_path / "bad", V.TrainConfig(contrast_pairs=-1), progress=False)


def test_decoder_word_matrices_untied_by_default_and_tied_on_request(processor):
    untied = V.build_model(processor.tokenizer, seed=0)
    assert untied.lm_head.weight is not untied.model.language_model.embed_tokens.weight
    tied = V.build_model(processor.tokenizer, seed=0, tie_embeddings=True)
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    parser = V.add_train_vlm_arguments(__import__("argparse").ArgumentParser())
    assert parser.parse_args(["--out", "x", "--tie-embeddings"]).tie_embeddings
    assert not parser.parse_args(["--out", "x"]).tie_embeddings
    with pytest.raises(V.VLMTrainError, match="tie_embeddings"):
        V.train_vlm("unused", V.TrainConfig(tie_embeddings="yes"), progress=False)
