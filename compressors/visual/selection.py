"""Diversity-driven selection of visual tokens (ToDRE Stage 1, DivPrune).

Two greedy criteria on cosine geometry, both O(k·n·d) time and O(n·d) extra memory, never an
n×n matrix (``n`` reaches tens of thousands of tokens on AnyRes images and video):

``"max_sum"`` (ToDRE v2, greedy max-sum diversification)
    Keep adding the token whose *summed* cosine similarity to the tokens chosen so far is smallest.
``"k_center"`` (ToDRE v1, DivPrune's max-min)
    Keep adding the token whose cosine distance ``1 - cos`` to its *nearest* chosen token is largest.

:func:`select_diverse` is the fast path: one vectorised device loop over the ``k - 1`` greedy steps
that never synchronises with the host, replayed from a CUDA graph on GPUs. :func:`select_diverse_reference`
is the plain transcription the fast path is tested against.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["select_diverse", "select_diverse_reference"]

_CRITERIA = ("max_sum", "k_center")
_EPS = 1e-12  # row norms are clamped to this, so zero rows normalise to zero (cos = 0 with everything)
# DivPrune's first pick needs every token's nearest-neighbour distance. It is computed in row blocks of
# at most max(_PIVOT_BLOCK_MIN_ELEMS, batch·n·d) similarities, so its memory stays O(n·d).
_PIVOT_BLOCK_MIN_ELEMS = 1 << 22
_GRAPH_CACHE_SIZE = 16  # captured CUDA graphs kept (least recently used evicted first)
_GRAPH_WARMUP = 3  # eager runs on a side stream before capture, as torch.cuda.graphs asks


# --------------------------------------------------------------------------------------------------
# validation


def _check_features(features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(
            f"features must be 2-D (n, d) or 3-D (batch, n, d), got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"features must have a floating dtype, got {features.dtype}")
    if features.shape[-2] == 0:
        raise ValueError("features has no tokens (n == 0): nothing to select from")


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of tokens n={n}")
    return k


def _check_criterion(criterion: str) -> None:
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {_CRITERIA}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _pivot_tensor(
    pivot: int | torch.Tensor, batch: int, n: int, batched: bool, device: torch.device
) -> torch.Tensor:
    """Validate an explicit pivot and return it as a ``(batch,)`` int64 tensor on ``device``."""
    if isinstance(pivot, torch.Tensor):
        if pivot.is_floating_point() or pivot.is_complex() or pivot.dtype == torch.bool:
            raise ValueError(f"a pivot tensor must have an integer dtype, got {pivot.dtype}")
        if pivot.dim() == 0:
            p = pivot.reshape(1).expand(batch)
        elif pivot.dim() == 1 and pivot.shape[0] == batch:  # batch == 1 for 2-D features
            p = pivot
        else:
            want = f"() or ({batch},)" if batched else "() or (1,)"
            raise ValueError(f"pivot tensor must have shape {want}, got {tuple(pivot.shape)}")
        p = p.to(device=device, dtype=torch.long)
        # One host read, outside the greedy loop. It is skipped while a CUDA graph is being captured
        # around this call, where reading values is impossible: the caller then vouches for the range.
        if not _capturing(device) and bool(((p < 0) | (p >= n)).any()):
            raise ValueError(f"pivot out of range [0, {n}): {p.tolist()}")
        return p.contiguous()
    if isinstance(pivot, bool):
        raise TypeError("pivot must be an int, an integer tensor or None, got bool")
    try:
        p_int = operator.index(pivot)
    except TypeError:
        raise TypeError(
            f"pivot must be an int, an integer tensor or None, got {type(pivot).__name__}"
        ) from None
    if not 0 <= p_int < n:
        raise ValueError(f"pivot {p_int} out of range [0, {n})")
    return torch.full((batch,), p_int, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------
# shared numerics


def _normalise(features: torch.Tensor) -> torch.Tensor:
    """Row-L2-normalise in float32; rows with norm below ``_EPS`` (zero rows) stay (near) zero."""
    x = features.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_EPS)


def _center_pivot(x: torch.Tensor) -> torch.Tensor:
    """``(batch, n, d)`` normalised -> ``(batch,)``: the token nearest (max cos) to the mean feature.

    Scored against the *sum* of the features: the same argmax as the mean (a positive multiple), one
    rounding step fewer.
    """
    total = x.sum(dim=1, keepdim=True)  # (batch, 1, d)
    return torch.bmm(x, total.transpose(1, 2)).squeeze(-1).argmax(dim=1)


def _divprune_pivot(x: torch.Tensor) -> torch.Tensor:
    """``(batch, n, d)`` normalised -> ``(batch,)``: DivPrune's first pick.

    The token whose nearest *other* token is farthest away in cosine distance: argmax over ``j`` of
    ``min_{i != j} (1 - cos(x_i, x_j))``. Computed in row blocks, so no ``n×n`` matrix; the cost is
    O(n²·d) time, once per call.
    """
    batch, n, d = x.shape
    rows = max(1, min(n, max(_PIVOT_BLOCK_MIN_ELEMS, batch * n * d) // (batch * n)))
    nearest = torch.empty((batch, n), dtype=x.dtype, device=x.device)
    xt = x.transpose(1, 2)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        dist = torch.bmm(x[:, r0:r1], xt).neg_().add_(1.0)  # (batch, r1 - r0, n) cosine distances
        self_idx = torch.arange(r0, r1, device=x.device).view(1, r1 - r0, 1).expand(batch, -1, 1)
        dist.scatter_(2, self_idx, float("inf"))  # exclude each token's distance to itself
        nearest[:, r0:r1] = dist.amin(dim=2)
    return nearest.argmax(dim=1)  # n == 1: the lone token's distance is +inf, index 0 wins


def _default_pivot(x: torch.Tensor, criterion: str) -> torch.Tensor:
    return _center_pivot(x) if criterion == "max_sum" else _divprune_pivot(x)


def _greedy_order(features: torch.Tensor, pivot: torch.Tensor, k: int, criterion: str) -> torch.Tensor:
    """The device loop: ``(batch, n, d)`` features, ``(batch,)`` pivots -> ``(batch, k)`` picks in order.

    Column 0 is the pivot; column ``i`` is the ``i``-th greedy pick. Every index stays a device
    tensor and every op has a shape fixed by ``(batch, n, d, k)``, so the loop never waits for the
    host and can be captured into a CUDA graph as it is (:func:`_fused_order` does exactly that).
    Ties go to the lowest index (``torch.argmin``/``argmax`` return the first extremum).
    """
    x = _normalise(features)
    batch, _, d = x.shape
    maximise = criterion == "k_center"
    done = float("-inf") if maximise else float("inf")  # score of chosen tokens: never picked again

    def cos_to(idx: torch.Tensor) -> torch.Tensor:  # (batch, 1) -> (batch, n) cosine to x[idx]
        row = x.gather(1, idx.unsqueeze(-1).expand(batch, 1, d))
        return torch.bmm(x, row.transpose(1, 2)).squeeze(-1)

    order = torch.empty((batch, k), dtype=torch.long, device=x.device)
    idx = pivot.view(batch, 1)
    order[:, 0:1] = idx
    score = cos_to(idx)  # max_sum: summed cosine similarity to the chosen set
    if maximise:
        score.neg_().add_(1.0)  # k_center: cosine distance to the nearest chosen token
    score.scatter_(1, idx, done)
    for i in range(1, k):
        idx = score.argmax(dim=1, keepdim=True) if maximise else score.argmin(dim=1, keepdim=True)
        order[:, i : i + 1] = idx
        if maximise:
            torch.minimum(score, cos_to(idx).neg_().add_(1.0), out=score)
        else:
            score.add_(cos_to(idx))
        score.scatter_(1, idx, done)
    return order


# --------------------------------------------------------------------------------------------------
# fused CUDA path: the device loop captured once per shape, replayed afterwards


@dataclass
class _GraphEntry:
    graph: torch.cuda.CUDAGraph
    features: torch.Tensor  # static input, (batch, n, d) in the caller's dtype
    pivot: torch.Tensor  # static input, (batch,) int64 on the device: any pivot reuses the graph
    order: torch.Tensor  # static output, (batch, k) int64


_GRAPHS: OrderedDict[tuple, _GraphEntry] = OrderedDict()
_GRAPHS_LOCK = threading.Lock()


def _capture(features: torch.Tensor, pivot: torch.Tensor, k: int, criterion: str) -> _GraphEntry:
    static_features = torch.empty_like(features, memory_format=torch.contiguous_format)
    static_features.copy_(features)
    static_pivot = pivot.clone()
    # Warm up on a side stream (lazy init, cuBLAS handles, allocator), then capture on it.
    side = torch.cuda.Stream(device=features.device)
    side.wait_stream(torch.cuda.current_stream(features.device))
    with torch.cuda.stream(side):
        for _ in range(_GRAPH_WARMUP):
            _greedy_order(static_features, static_pivot, k, criterion)
    torch.cuda.current_stream(features.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_order = _greedy_order(static_features, static_pivot, k, criterion)
    return _GraphEntry(graph, static_features, static_pivot, static_order)


def _fused_order(features: torch.Tensor, pivot: torch.Tensor, k: int, criterion: str) -> torch.Tensor:
    """Same result as :func:`_greedy_order`, replayed from a cached CUDA graph (one launch for k steps)."""
    key = (*features.shape, k, features.dtype, features.device, criterion)
    # Static buffers must be ordinary tensors: an inference tensor could not be refilled outside
    # inference mode on a later call.
    with torch.inference_mode(False), torch.cuda.device(features.device), _GRAPHS_LOCK:
        entry = _GRAPHS.get(key)
        if entry is None:
            entry = _capture(features, pivot, k, criterion)
            _GRAPHS[key] = entry
            while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
                _GRAPHS.popitem(last=False)
        else:
            _GRAPHS.move_to_end(key)
            entry.features.copy_(features)
            entry.pivot.copy_(pivot)
        entry.graph.replay()
        return entry.order.clone()


def _clear_graph_cache() -> None:
    """Drop every captured graph and its memory pool."""
    with _GRAPHS_LOCK:
        _GRAPHS.clear()


# --------------------------------------------------------------------------------------------------
# public API


def select_diverse(
    features: torch.Tensor,
    k: int,
    pivot: int | torch.Tensor | None = None,
    criterion: str = "max_sum",
    *,
    fused: bool | None = None,
) -> torch.LongTensor:
    """Pick ``k`` mutually diverse tokens by greedy cosine diversification.

    Parameters
    ----------
    features : torch.Tensor
        ``(n, d)`` or ``(batch, n, d)`` token features, any floating dtype. Rows are L2-normalised
        and all similarities are computed in float32, so float16/bfloat16 inputs select exactly
        what their float32 upcast selects. Zero rows are allowed (cosine 0 with every token).
    k : int
        Number of tokens kept, ``1 <= k <= n``. ``k == n`` returns ``arange(n)``.
    pivot : int, torch.Tensor or None
        The first token chosen, honoured exactly. An int applies to every batch row; a tensor
        is ``()`` or ``(1,)`` for 2-D input, ``()`` or ``(batch,)`` (one pivot per row) for 3-D
        input. ``None`` selects the criterion's default rule:

        * ``"max_sum"``: the *center* token, whose normalised feature has the largest cosine
          with the mean of the normalised features (one of ToDRE's pivot ablations; ToDRE's own
          default, the [CLS]-attention argmax, is passed in as an explicit pivot).
        * ``"k_center"``: DivPrune's first pick, the token whose nearest other token is farthest
          away in cosine distance. DivPrune reads it off its full n×n distance matrix; here it is
          computed in row blocks (memory O(n·d), no n×n matrix) but costs O(n²·d) time, the only
          part above O(k·n·d). Pass an explicit pivot to avoid it.
    criterion : {"max_sum", "k_center"}
        ``"max_sum"`` (ToDRE v2): ``s = X @ X[p]``; repeat ``c = argmin(s)``, ``s += X @ X[c]``,
        chosen scores set to +inf. ``"k_center"`` (ToDRE v1 / DivPrune): ``m = 1 - X @ X[p]``;
        repeat ``c = argmax(m)``, ``m = minimum(m, 1 - X @ X[c])``, chosen scores set to -inf.
        Ties go to the lowest index.
    fused : bool or None, keyword-only
        Run the ``k - 1`` greedy steps as one replay of a captured CUDA graph instead of ~5 kernel
        launches per step. ``None`` (default): fused on CUDA tensors, not elsewhere; ``True`` on a
        non-CUDA tensor raises ``ValueError``. The first call for a given ``(batch, n, d, k, dtype,
        device, criterion)`` captures the graph (a few ms plus warm-up runs); later calls copy the
        features and pivot into its static buffers and replay. Up to 16 graphs are cached, least
        recently used evicted first; each holds its own memory pool (about ``batch·n·d`` float32).
        Calls sharing a key must not run concurrently on different streams. Inside an enclosing
        CUDA-graph capture the plain device loop is used (it is capturable itself).

    Returns
    -------
    torch.LongTensor
        ``(k,)`` for 2-D input or ``(batch, k)`` for 3-D input: int64 indices into the ``n``
        axis, sorted ascending, unique, on ``features.device``. Each row is the same as an
        unbatched call on that row.

    Raises
    ------
    ValueError
        ``features`` not 2-D/3-D, not floating, or with ``n == 0``; ``k < 1`` or ``k > n``; a pivot
        out of ``[0, n)`` or of the wrong shape/dtype; an unknown ``criterion``; ``fused=True``
        on a non-CUDA tensor.
    TypeError
        ``features`` not a tensor, ``k`` or ``pivot`` of a non-integer type.

    Notes
    -----
    Extra memory is O(batch·n·d) (the float32 normalised copy) plus O(batch·n) scores; time is
    O(k·batch·n·d). The loop never reads a value back to the host; validating a *tensor* pivot
    reads it once before the loop.
    """
    _check_features(features)
    _check_criterion(criterion)
    batched = features.dim() == 3
    feats = features if batched else features.unsqueeze(0)
    batch, n, _ = feats.shape
    k = _check_k(k, n)
    if fused is None:
        fused = feats.is_cuda
    elif fused and not feats.is_cuda:
        raise ValueError(f"fused=True needs a CUDA tensor (the CUDA-graph path), got device {feats.device}")
    p = None if pivot is None else _pivot_tensor(pivot, batch, n, batched, feats.device)

    with torch.no_grad():
        if k == n or batch == 0:
            out = torch.arange(k, device=feats.device).expand(batch, k).clone()
        else:
            if p is None:
                p = _default_pivot(_normalise(feats), criterion)
            if fused and not _capturing(feats.device):
                order = _fused_order(feats.detach(), p, k, criterion)
            else:
                order = _greedy_order(feats.detach(), p, k, criterion)
            out = order.sort(dim=1).values
    return out if batched else out[0]


def select_diverse_reference(
    features: torch.Tensor,
    k: int,
    pivot: int | torch.Tensor | None = None,
    criterion: str = "max_sum",
) -> torch.LongTensor:
    """Plain transcription of :func:`select_diverse`, one Python step per pick (for testing).

    Parameters
    ----------
    features : torch.Tensor
        ``(n, d)`` or ``(batch, n, d)``, any floating dtype (computed in float32). 3-D input is
        handled by a Python loop over the rows.
    k : int
        Number of tokens kept, ``1 <= k <= n``.
    pivot : int, torch.Tensor or None
        As in :func:`select_diverse`. With ``pivot=None`` and ``criterion="k_center"`` this
        reference builds the full n×n distance matrix (as DivPrune does): small ``n`` only.
    criterion : {"max_sum", "k_center"}
        As in :func:`select_diverse`.

    Returns
    -------
    torch.LongTensor
        ``(k,)`` or ``(batch, k)`` int64 indices, sorted ascending, on ``features.device``.
    """
    _check_features(features)
    _check_criterion(criterion)
    batched = features.dim() == 3
    feats = features if batched else features.unsqueeze(0)
    batch, n, _ = feats.shape
    k = _check_k(k, n)
    pivots = None if pivot is None else _pivot_tensor(pivot, batch, n, batched, feats.device).tolist()
    rows = []
    with torch.no_grad():
        for b in range(batch):
            x = _normalise(feats[b])  # (n, d)
            if pivots is not None:
                p = pivots[b]
            elif criterion == "max_sum":
                p = int(torch.argmax(x @ x.sum(dim=0)))
            else:
                dist = 1.0 - x @ x.T
                dist.fill_diagonal_(float("inf"))
                p = int(torch.argmax(dist.min(dim=1).values))
            chosen = [p]
            if criterion == "max_sum":
                s = x @ x[p]
                s[p] = float("inf")
                for _ in range(k - 1):
                    c = int(torch.argmin(s))
                    chosen.append(c)
                    s = s + x @ x[c]
                    s[c] = float("inf")
            else:
                m = 1.0 - x @ x[p]
                m[p] = float("-inf")
                for _ in range(k - 1):
                    c = int(torch.argmax(m))
                    chosen.append(c)
                    m = torch.minimum(m, 1.0 - x @ x[c])
                    m[c] = float("-inf")
            rows.append(sorted(chosen))
    out = torch.tensor(rows, dtype=torch.long, device=feats.device).view(batch, k)
    return out if batched else out[0]
