"""Small statistics used by the harness: binomial and bootstrap intervals, paired differences, F1.

Everything takes plain sequences or NumPy arrays and returns floats, so per-example rows read
back from a run's ``samples.jsonl`` can be summarised the same way on every resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from tokenlean.errors import EvalError

__all__ = ["binary_f1", "bootstrap_ci", "paired_bootstrap_diff", "prf", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95 % for ``z = 1.96``).

    Returns ``(nan, nan)`` for ``n == 0``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise EvalError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (the mean by default) over the rows of ``values``.

    ``values`` may be 2-D (rows resampled together, e.g. per-document counts); ``stat`` then
    receives the resampled array. Returns ``(nan, nan)`` for no rows.
    """
    arr = np.asarray(values, dtype=float)
    if arr.shape[0] == 0:
        return float("nan"), float("nan")
    stat = stat or (lambda a: float(np.mean(a)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    stats = np.array([stat(arr[i]) for i in idx], dtype=float)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items, with a percentile bootstrap interval.

    Returns ``(mean, low, high)``.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape:
        raise EvalError(f"paired samples differ in shape: {a_arr.shape} vs {b_arr.shape}")
    diff = a_arr - b_arr
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    return float(diff.mean()), low, high


def binary_f1(pred: Sequence[bool] | np.ndarray, gold: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of ``pred`` against ``gold`` with "keep" (True) the positive class.

    Returns a dict with ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``, ``n``; an
    undefined ratio (no positives) is NaN.
    """
    p, g = np.asarray(pred, dtype=bool), np.asarray(gold, dtype=bool)
    if p.shape != g.shape:
        raise EvalError(f"pred and gold differ in length: {p.shape} vs {g.shape}")
    tp, fp, fn = int(np.sum(p & g)), int(np.sum(p & ~g)), int(np.sum(~p & g))
    return {**prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "n": int(p.size)}


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1}
