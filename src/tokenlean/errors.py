"""Exceptions raised by tokenlean.

Every error tokenlean raises on bad input derives from :class:`TokenleanError` and from the
closest built-in type (``ValueError``, ``TypeError``...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TokenleanError(Exception):
    """Base class of all tokenlean errors."""


class MethodConfigError(TokenleanError, ValueError):
    """A method name is unknown or a method parameter is invalid."""


class PatchError(TokenleanError, RuntimeError):
    """A patch cannot be applied or removed (applied twice, removed twice...)."""


class UnsupportedModelError(TokenleanError, TypeError):
    """The model's architecture is not one the adapters know."""


class ZooError(TokenleanError, ValueError):
    """A zoo name is unknown, or fetching a zoo entry failed."""


class CacheCorruptError(ZooError):
    """A cache entry is incomplete or damaged; fetch it again with ``force=True``."""


class OutputDirError(TokenleanError, OSError):
    """An output folder cannot be written, or holds a different run."""


class EvalError(TokenleanError, ValueError):
    """Bad settings for a bench or evaluation run (variants, tasks, workloads), or bad task data."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" Did you mean 'a', 'b'?"`` for the choices that look like a misspelling of ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
