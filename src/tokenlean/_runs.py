"""Run folders of the training commands (``train-vlm``, ``train-landmark``): checks, checkpoints, logs.

A run folder holds ``run.json`` (the settings), ``checkpoints/checkpoint.pt`` (written atomically)
and, at the end, the trained files and ``log.txt``. A folder holding another run is refused unless
``overwrite``; ``resume`` continues a run with the same settings from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_json
from .errors import OutputDirError

__all__ = [
    "CHECKPOINT_NAME",
    "RUN_FILE",
    "RunLog",
    "atomic_torch_save",
    "install_dir",
    "machine_description",
    "prepare_run_dir",
    "step_rows",
]

logger = logging.getLogger("tokenlean")

RUN_FILE = "run.json"
CHECKPOINT_NAME = "checkpoint.pt"


def machine_description() -> str:
    """CPU model, core count, torch version and threads, for run logs."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait})"
    )


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename (never half-written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _share_permissions(folder: Path) -> None:
    """Usual permissions for a finished folder (temp folders and files are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def install_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` at ``target`` by renames, replacing an old one."""
    _share_permissions(tmp)
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    try:
        os.replace(target, old / "entry")
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old / "entry", target)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def prepare_run_dir(
    out: Path,
    config: dict[str, Any],
    *,
    overwrite: bool,
    resume: bool,
    command: str,
    product: str,
    error: type[Exception],
) -> dict[str, Any] | None:
    """Check the run folder ``out`` of a ``command`` run; return the checkpoint to resume from (or None).

    ``product`` is the name of the folder a finished run leaves in ``out`` (``"model"``); a
    folder with neither it nor ``run.json`` is never deleted.
    """
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {str(out)!r} exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and overwrite:
        if resume:
            raise error("give --resume or --overwrite, not both")
        if not run_file.is_file() and not (out / product).exists():
            raise OutputDirError(
                f"refusing to overwrite {str(out)!r}: it does not look like a {command} run folder"
            )
        shutil.rmtree(out)
        occupied = False
    if occupied:
        if not run_file.is_file():
            raise OutputDirError(
                f"--out {str(out)!r} is not empty and holds no {command} run; pick another folder"
            )
        previous = json.loads(run_file.read_text())
        if not resume:
            raise OutputDirError(
                f"--out {str(out)!r} holds another run (seed {previous.get('config', {}).get('seed')}); "
                "pass --resume to continue it or --overwrite to replace it"
            )
        if previous.get("config") != config:
            raise OutputDirError(
                f"--out {str(out)!r} holds a run with other settings {previous.get('config')}; "
                "--resume needs the same settings (or pass --overwrite)"
            )
        ckpt = out / "checkpoints" / CHECKPOINT_NAME
        if ckpt.is_file():
            return torch.load(ckpt, map_location="cpu", weights_only=False)
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    atomic_write_json(run_file, {"config": config, "command": " ".join(sys.argv)})
    return None


def step_rows(seed: int, step: int, per_step: int, n: int, stream: int) -> list[int]:
    """The rows of training step ``step``: epochs of permutations seeded by (seed, epoch, stream)."""
    import numpy as np

    steps_per_epoch = max(1, n // per_step)
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch, stream]).permutation(n)
    return order[k * per_step : (k + 1) * per_step].tolist()


class RunLog:
    """Timestamped log lines, kept for the run's ``log.txt`` and echoed above the progress bar."""

    def __init__(self, verbose: bool) -> None:
        self.lines: list[str] = []
        self.verbose = verbose
        self.start = time.time()

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {message}"
        self.lines.append(line)
        logger.info(message)
        if self.verbose:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)
