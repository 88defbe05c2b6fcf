"""The wheel and the editable install both expose tokenlean and its three subpackages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"src/tokenlean": "tokenlean", "compressors": "tokenlean/compressors", "attention": "tokenlean/attention",
           "eval": "tokenlean/eval"}  # fmt: skip


def _expected_members() -> set[str]:
    members = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            members.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return members


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy so that the build/ and *.egg-info folders never land in the checkout
    source = tmp_path_factory.mktemp("source") / "tokenlean"
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("tokenlean-*.whl")
    return built


def test_wheel_contains_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_members() - names
    assert not missing, (
        f"modules missing from the wheel (list new subpackages in pyproject): {sorted(missing)}"
    )
    assert not [n for n in names if n.startswith(("tests/", "src/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tokenlean = tokenlean.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_all_subpackages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import tokenlean, tokenlean.eval, tokenlean.attention, tokenlean.compressors, tokenlean.eval.report;"
        "print(tokenlean.__file__); print(tokenlean.eval.__file__);"
        "print([m.name for m in tokenlean.methods()])"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    assert "sink_window" in lines[2]


def test_editable_install_maps_the_root_folders():
    import tokenlean.attention
    import tokenlean.compressors
    import tokenlean.eval

    if not Path(tokenlean.__file__).resolve().is_relative_to(ROOT):
        pytest.skip("reason: tokenlean is installed from a wheel here, not editable from this checkout")
    assert Path(tokenlean.eval.__file__).resolve() == ROOT / "eval" / "__init__.py"
    assert Path(tokenlean.attention.__file__).resolve() == ROOT / "attention" / "__init__.py"
    assert Path(tokenlean.compressors.__file__).resolve() == ROOT / "compressors" / "__init__.py"
