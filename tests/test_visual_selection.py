"""Diverse visual-token selection (ToDRE Stage 1 / DivPrune) against an independent transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenlean.compressors.visual import selection as sel
from tokenlean.compressors.visual.selection import select_diverse, select_diverse_reference

CRITERIA = ("max_sum", "k_center")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the fused CUDA-graph path"
)


# --------------------------------------------------------------------------------------------------
# an independent transcription: numpy, float64, full n×n matrices (tiny n only)


def np_greedy(features: np.ndarray, k: int, pivot: int | None, criterion: str) -> list[int]:
    """Selection *order* (pivot first), straight from the algorithm statements."""
    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    sim = x @ x.T
    if pivot is None:
        if criterion == "max_sum":  # "center": nearest (max cos) to the mean (∝ sum) normalised feature
            pivot = int(np.argmax(x @ x.sum(axis=0)))
        elif n == 1:
            pivot = 0
        else:  # DivPrune: column-wise 2nd-smallest distance (the smallest is the self-distance 0)
            pivot = int(np.argmax(np.sort(1.0 - sim, axis=0)[1]))
    chosen = [pivot]
    for _ in range(k - 1):  # each step recomputed from the definition (no running scores)
        block = sim[:, chosen]  # (n, |chosen|) similarities of every token to the chosen set
        if criterion == "max_sum":  # least summed similarity; chosen excluded; first minimum wins
            chosen.append(int(np.argmin(np.where(taken(n, chosen), np.inf, block.sum(axis=1)))))
        else:  # largest distance to the nearest chosen token
            chosen.append(int(np.argmax(np.where(taken(n, chosen), -np.inf, (1.0 - block).min(axis=1)))))
    return chosen


def taken(n: int, chosen: list[int]) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


def order_of(features: torch.Tensor, k: int, pivot: int | None, criterion: str) -> list[int]:
    """The fast path's selection order for a 2-D input (the device loop, unsorted)."""
    x = features.unsqueeze(0)
    if pivot is None:
        p = sel._default_pivot(sel._normalise(x), criterion)
    else:
        p = torch.tensor([pivot])
    return sel._greedy_order(x, p, k, criterion)[0].tolist()


def assert_valid(out: torch.Tensor, shape: tuple[int, ...], n: int) -> None:
    assert out.dtype == torch.int64
    assert tuple(out.shape) == shape
    rows = out.reshape(-1, shape[-1])
    assert bool((rows[:, 1:] > rows[:, :-1]).all()), "not sorted ascending / not unique"
    assert bool((rows >= 0).all()) and bool((rows < n).all())


def ks_for(n: int) -> list[int]:
    return sorted({1, max(1, n // 2), n})


# --------------------------------------------------------------------------------------------------
# agreement with the transcription


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("d", [3, 16, 64])
def test_matches_transcription_gaussian(criterion, d):
    for seed in range(3):
        gen = torch.Generator().manual_seed(1000 * d + seed)
        for n in (1, 2, 3, 7, 40, 200):
            feats = torch.randn(n, d, generator=gen)
            for k in ks_for(n):
                for pivot in (None, (7 * seed + n) % n):
                    if n == 2 and pivot is None and criterion == "max_sum":
                        # two unit vectors are exactly equally close to their mean: a true tie that
                        # only rounding decides; any answer is a valid center
                        assert select_diverse(feats, k, pivot, criterion).numel() == k
                        continue
                    want = np_greedy(feats.numpy(), k, pivot, criterion)
                    got_order = order_of(feats, k, pivot, criterion)
                    assert got_order == want, (seed, n, k, pivot)
                    expect = torch.tensor(sorted(want))
                    assert torch.equal(select_diverse(feats, k, pivot, criterion), expect)
                    assert torch.equal(select_diverse_reference(feats, k, pivot, criterion), expect)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("d", [4, 16, 64])
def test_matches_transcription_exact_ties(criterion, d):
    # ±1 rows of a square-number width normalise to ±1/sqrt(d) exactly, so every cosine, sum and
    # distance is exact in float32 and float64 alike: massive exact ties, all broken by lowest index.
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for n in (5, 33, 120):
            feats = torch.from_numpy(rng.choice([-1.0, 1.0], size=(n, d)).astype(np.float32))
            for k in ks_for(n):
                for pivot in (None, n - 1):
                    want = np_greedy(feats.numpy(), k, pivot, criterion)
                    assert order_of(feats, k, pivot, criterion) == want, (seed, n, k, pivot)
                    expect = torch.tensor(sorted(want))
                    assert torch.equal(select_diverse(feats, k, pivot, criterion), expect)
                    assert torch.equal(select_diverse_reference(feats, k, pivot, criterion), expect)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("pivot_kind", ["none", "int", "per_row"])
def test_batched_rows_equal_unbatched(criterion, pivot_kind):
    gen = torch.Generator().manual_seed(7)
    batch, n, d = 5, 60, 16
    feats = torch.randn(batch, n, d, generator=gen)
    feats[2] = feats[0]  # identical rows must give identical answers
    pivots = torch.tensor([3, 59, 0, 17, 41])
    pivot = {"none": None, "int": 11, "per_row": pivots}[pivot_kind]
    for k in (1, 9, 30, n):
        out = select_diverse(feats, k, pivot, criterion)
        ref = select_diverse_reference(feats, k, pivot, criterion)
        assert_valid(out, (batch, k), n)
        assert torch.equal(out, ref)
        for b in range(batch):
            row_pivot = pivots[b] if pivot_kind == "per_row" else pivot
            assert torch.equal(out[b], select_diverse(feats[b], k, row_pivot, criterion))
        if pivot_kind == "per_row":
            assert bool((out == pivots[:, None]).any(dim=1).all())


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_equals_float32_of_same_values(criterion, dtype):
    gen = torch.Generator().manual_seed(3)
    for n, d in ((50, 3), (150, 64)):
        feats = torch.randn(2, n, d, generator=gen).to(dtype)
        for k in (1, n // 3, n):
            for pivot in (None, 4):
                out = select_diverse(feats, k, pivot, criterion)
                assert torch.equal(out, select_diverse(feats.float(), k, pivot, criterion))
                assert torch.equal(out, select_diverse_reference(feats, k, pivot, criterion))
                assert_valid(out, (2, k), n)


# --------------------------------------------------------------------------------------------------
# pivots, output form, degenerate inputs


@pytest.mark.parametrize("criterion", CRITERIA)
def test_pivot_is_first_pick_and_always_kept(criterion):
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(80, 8, generator=gen)
    for pivot in (0, 13, 79):
        assert order_of(feats, 10, pivot, criterion)[0] == pivot
        for k in (1, 2, 10):
            out = select_diverse(feats, k, pivot, criterion)
            assert pivot in out.tolist()
            assert select_diverse(feats, k, torch.tensor(pivot), criterion).tolist() == out.tolist()
            assert select_diverse(feats, k, torch.tensor([pivot]), criterion).tolist() == out.tolist()
    assert select_diverse(feats, 1, 13, criterion).tolist() == [13]


def test_default_pivot_rules():
    # center rule: token 2 lies exactly on the mean direction of the normalised features
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -0.2]])
    x = sel._normalise(feats.unsqueeze(0))
    assert int(sel._center_pivot(x)[0]) == int(np.argmax(x[0].numpy() @ x[0].numpy().mean(0)))
    # DivPrune rule: the isolated token (index 3) has the farthest nearest neighbour
    feats = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [-1.0, 0.05], [0.97, 0.2]])
    assert select_diverse(feats, 1, criterion="k_center").tolist() == [3]
    assert select_diverse_reference(feats, 1, criterion="k_center").tolist() == [3]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_divprune_pivot_blocks_match_full_matrix(criterion, monkeypatch):
    # force many small row blocks (and a ragged last one) in the n×n-free nearest-neighbour pass
    monkeypatch.setattr(sel, "_PIVOT_BLOCK_MIN_ELEMS", 1)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 97, 2, generator=gen)  # block = 2 rows: 49 blocks
    got = sel._divprune_pivot(sel._normalise(feats))
    for b in range(3):
        assert int(got[b]) == np_greedy(feats[b].numpy(), 1, None, "k_center")[0]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_duplicates_and_zero_rows(criterion):
    # ±1 rows (d = 16) and copies scaled by powers of two normalise to bit-identical rows, so every
    # duplicate tie is exact and must go to the lowest index, in all three implementations.
    rng = np.random.default_rng(4)
    base = torch.from_numpy(rng.choice([-1.0, 1.0], size=(6, 16)).astype(np.float32))
    feats = torch.cat([base, 4.0 * base, torch.zeros(4, 16), 0.5 * base[:3]])  # n = 19
    n = feats.shape[0]
    for pivot in (None, 0, 12, 17):
        for k in range(1, n + 1):
            out = select_diverse(feats, k, pivot, criterion)
            assert_valid(out, (k,), n)
            want = np_greedy(feats.numpy(), k, pivot, criterion)
            assert order_of(feats, k, pivot, criterion) == want, (pivot, k)
            assert out.tolist() == sorted(want)
            assert torch.equal(out, select_diverse_reference(feats, k, pivot, criterion))
    # all-identical and all-zero inputs: pure ties, lowest indices win after the pivot
    for same in (torch.ones(10, 4), torch.zeros(10, 4)):
        assert select_diverse(same, 4, None, criterion).tolist() == [0, 1, 2, 3]
        assert select_diverse(same, 4, 7, criterion).tolist() == [0, 1, 2, 7]
        assert select_diverse_reference(same, 4, 7, criterion).tolist() == [0, 1, 2, 7]
    # near-duplicates (Gaussian rows scaled by 5: equal only up to rounding): valid and deterministic
    gauss = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    feats = torch.cat([gauss, 5.0 * gauss, torch.zeros(3, 8)])
    for k in (1, 6, 10, 15):
        out = select_diverse(feats, k, None, criterion)
        assert_valid(out, (k,), 15)
        assert torch.equal(out, select_diverse(feats, k, None, criterion))
    if criterion == "k_center":  # zero rows (distance 1) and one of each original/copy pair first
        out = set(select_diverse(feats, 9, 0, criterion).tolist())
        assert {12, 13, 14} <= out and all(len(out & {i, i + 6}) == 1 for i in range(6))


def test_k_equals_n_and_empty_batch():
    feats = torch.randn(2, 9, 5)
    assert torch.equal(select_diverse(feats, 9), torch.arange(9).expand(2, 9))
    assert torch.equal(select_diverse(feats[0], 9, 4, "k_center"), torch.arange(9))
    out = select_diverse(torch.randn(0, 9, 5), 3)
    assert out.shape == (0, 3) and out.dtype == torch.int64


def test_device_loop_never_reads_back_to_host():
    # Meta tensors carry no values: any .item(), bool(tensor) or data-dependent Python branch raises.
    # So passing here means the loop is free of host syncs, i.e. capturable into a CUDA graph as is.
    feats = torch.empty(3, 50, 8, device="meta")
    for criterion in CRITERIA:
        order = sel._greedy_order(feats, torch.zeros(3, dtype=torch.long, device="meta"), 12, criterion)
        assert order.shape == (3, 12) and order.device.type == "meta"
        for pivot in (None, 5):  # the whole public path, default pivot rules included
            out = select_diverse(feats, 12, pivot, criterion)
            assert out.shape == (3, 12) and out.device.type == "meta"
    with pytest.raises(RuntimeError):  # the probe works: a host read on meta does fail
        bool((feats > 0).any())


def _largest_alloc(fn) -> int:
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_no_n_by_n_matrix(criterion):
    n, d, k = 30000, 4, 4
    feats = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    # An n×n float32 matrix would be n*n*4 = 3.6 GB in one allocation. The detector is shown to fire
    # on a 2000×2000 similarity matrix first (16 MB), so it is able to fail.
    small = feats[:2000]
    assert _largest_alloc(lambda: small @ small.T) >= 2000 * 2000 * 4
    for pivot in (None, 123):
        biggest = _largest_alloc(lambda p=pivot: select_diverse(feats, k, p, criterion))
        assert biggest < n * n * 4
        # tighter: the row blocks of DivPrune's first pick stay within max(2**22, n·d) float32 values
        assert biggest <= 4 * 2**22 + (1 << 20), biggest


# --------------------------------------------------------------------------------------------------
# errors


def test_errors():
    feats = torch.randn(10, 4)
    with pytest.raises(ValueError, match="2-D"):
        select_diverse(torch.randn(10), 2)
    with pytest.raises(ValueError, match="2-D"):
        select_diverse(torch.randn(2, 3, 10, 4), 2)
    with pytest.raises(ValueError, match="n == 0"):
        select_diverse(torch.randn(0, 4), 1)
    with pytest.raises(ValueError, match="n == 0"):
        select_diverse(torch.randn(2, 0, 4), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_diverse(feats, 0)
    with pytest.raises(ValueError, match="exceeds"):
        select_diverse(feats, 11)
    for bad in (10, -1):
        with pytest.raises(ValueError, match="out of range"):
            select_diverse(feats, 3, bad)
    with pytest.raises(ValueError, match="out of range"):
        select_diverse(feats, 3, torch.tensor(10))
    with pytest.raises(ValueError, match="out of range"):
        select_diverse(feats.expand(3, 10, 4), 3, torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match="shape"):
        select_diverse(feats.expand(3, 10, 4), 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        select_diverse(feats, 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer dtype"):
        select_diverse(feats, 3, torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown criterion"):
        select_diverse(feats, 3, criterion="max_min")
    with pytest.raises(ValueError, match="floating"):
        select_diverse(torch.ones(10, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="floating"):
        select_diverse(torch.ones(10, 4, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="fused=True needs a CUDA tensor"):
        select_diverse(feats, 3, fused=True)
    with pytest.raises(TypeError):
        select_diverse(feats.numpy(), 3)
    with pytest.raises(TypeError):
        select_diverse(feats, 2.5)
    with pytest.raises(TypeError):
        select_diverse(feats, 3, True)
    # the reference validates the same way
    with pytest.raises(ValueError, match="exceeds"):
        select_diverse_reference(feats, 11)
    with pytest.raises(ValueError, match="out of range"):
        select_diverse_reference(feats, 3, 10)
    with pytest.raises(ValueError, match="unknown criterion"):
        select_diverse_reference(feats, 3, criterion="nope")
    with pytest.raises(ValueError, match="floating"):
        select_diverse_reference(torch.ones(10, 4, dtype=torch.int32), 3)
    assert select_diverse(feats, 3, fused=False).shape == (3,)  # fused=False is always allowed


# --------------------------------------------------------------------------------------------------
# GPU only: the fused CUDA-graph path


@needs_cuda
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cuda_graph_matches_reference(criterion, dtype):
    sel._clear_graph_cache()
    gen = torch.Generator().manual_seed(0)
    batch, n, d, k = 3, 700, 64, 70
    for trial in range(3):  # trial 0 captures, later trials replay with new features and pivots
        feats_cpu = torch.randn(batch, n, d, generator=gen).to(dtype)
        feats = feats_cpu.cuda()
        for pivot in (None, 5 + trial, torch.tensor([1, 2 + trial, n - 1])):
            fused = select_diverse(feats, k, pivot, criterion, fused=True)
            plain = select_diverse(feats, k, pivot, criterion, fused=False)
            assert fused.is_cuda and fused.dtype == torch.int64 and fused.shape == (batch, k)
            assert torch.equal(fused, plain)
            assert torch.equal(fused.cpu(), select_diverse(feats_cpu, k, pivot, criterion))
            assert torch.equal(fused.cpu(), select_diverse_reference(feats_cpu, k, pivot, criterion))
    assert len(sel._GRAPHS) == 1  # one graph per shape key, reused across features and pivots
    # the exact-tie case on the GPU too
    signs = (torch.randint(0, 2, (n, 16), generator=gen) * 2 - 1).float()
    assert torch.equal(
        select_diverse(signs.cuda(), k, None, criterion).cpu(), select_diverse(signs, k, None, criterion)
    )


@needs_cuda
def test_fused_cache_is_bounded_and_loop_never_syncs():
    sel._clear_graph_cache()
    feats = torch.randn(64, 8, device="cuda")
    for k in range(2, 2 + sel._GRAPH_CACHE_SIZE + 4):
        assert select_diverse(feats, k).shape == (k,)
    assert len(sel._GRAPHS) == sel._GRAPH_CACHE_SIZE
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sel._greedy_order(feats[None], torch.zeros(1, dtype=torch.long, device="cuda"), 20, "max_sum")
        sel._greedy_order(feats[None], torch.zeros(1, dtype=torch.long, device="cuda"), 20, "k_center")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.inference_mode():  # graphs captured or replayed under inference mode still refill later
        a = select_diverse(feats, 5, 3)
    assert torch.equal(a, select_diverse(feats, 5, 3))
    sel._clear_graph_cache()
