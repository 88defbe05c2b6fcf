"""The fused landmark-attention kernel against PyTorch SDPA (flash and cuDNN backends) on a GPU.

One call on a lent GPU (``bash benchmarks/gpu_run.sh landmark``, under 5 minutes):

1. **Correctness** at a small size: the kernel's forward and backward against the float64
   reference (:func:`grouped_softmax_attention`) in float16 and bfloat16 (and float32), batch 2,
   8 query heads over 2 key/value heads, 1,000 tokens (an open last block), head dim 64 and 128.
2. **Speed**: bfloat16, batch 1, 16 heads (``heads × seq`` kept so each point is a full GPU), at
   4k / 8k / 16k / 32k tokens, head dim 64 and 128, forward and forward+backward; median of
   ``--repeats`` CUDA-event timings after warm-up; TFLOP/s counted as causal attention
   (``2 × 2 × b × h × n² × d / 2`` forward; the backward 2.5× that, so forward+backward 3.5×), the same count for
   every row, so the ratio is a ratio of times. The goal (issue 11): the kernel at ≥ 50 % of cuDNN
   SDPA's causal throughput at 16k tokens.

Writes ``results.json`` and ``results.md`` into ``--out``. ``--tiny`` runs a CPU smoke test under
``TRITON_INTERPRET=1`` (correctness only, small shapes), which is what CI exercises.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _tflops(batch: int, heads: int, n: int, dim: int, backward: bool, seconds: float) -> float:
    flops = 2 * 2 * batch * heads * n * n * dim / 2
    return flops * (3.5 if backward else 1.0) / seconds / 1e12


def _time(fn, repeats: int, warmup: int, cuda: bool) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    if not cuda:
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return times


def correctness(device: str, dtypes, dims, seq: int, block: int) -> list[dict]:
    import torch

    from tokenlean.attention.landmark import fused_landmark_attention, grouped_softmax_attention

    rows = []
    for dtype in dtypes:
        for dim in dims:
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(2, 8, seq, dim, generator=g).to(device, dtype).requires_grad_()
            k = torch.randn(2, 2, seq, dim, generator=g).to(device, dtype).requires_grad_()
            v = torch.randn(2, 2, seq, dim, generator=g).to(device, dtype).requires_grad_()
            out = fused_landmark_attention(q, k, v, block_size=block)
            grad = torch.randn(out.shape, generator=g).to(device, dtype)
            out.backward(grad)
            q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
            lm = (torch.arange(seq, device=device) % block) == block - 1
            ref = grouped_softmax_attention(q2, k2, v2, lm)
            ref.backward(grad.double())
            errs = {}
            for name, a, b in (
                ("out", out, ref),
                ("dq", q.grad, q2.grad),
                ("dk", k.grad, k2.grad),
                ("dv", v.grad, v2.grad),
            ):
                errs[name] = float(
                    (a.double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-12)
                )
            rows.append({"dtype": str(dtype).removeprefix("torch."), "head_dim": dim, "seq": seq, **errs})
            print(f"correctness {rows[-1]}", flush=True)
    return rows


def speed(lengths, dims, repeats: int, warmup: int, block: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenlean.attention.landmark import fused_landmark_attention

    rows = []
    for dim in dims:
        for n in lengths:
            heads, batch = 16, 1
            dtype = torch.bfloat16
            q = torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype, requires_grad=True)
            do = torch.randn_like(q)
            impls = {
                "landmark (fused)": lambda q=q, k=k, v=v: fused_landmark_attention(q, k, v, block_size=block),
            }
            for name, backend in (
                ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa flash", SDPBackend.FLASH_ATTENTION),
            ):

                def run(backend=backend, q=q, k=k, v=v):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                impls[name] = run
            for name, fn in impls.items():
                for backward in (False, True):

                    def step(fn=fn, backward=backward, q=q, k=k, v=v, do=do):
                        if backward:
                            q.grad = k.grad = v.grad = None
                            fn().backward(do)
                        else:
                            with torch.no_grad():
                                fn()

                    try:
                        times = _time(step, repeats, warmup, cuda=True)
                    except Exception as exc:  # a backend missing on this GPU / build
                        rows.append(
                            {
                                "impl": name,
                                "seq": n,
                                "head_dim": dim,
                                "pass": "fwd+bwd" if backward else "fwd",
                                "error": repr(exc)[:200],
                            }
                        )
                        print(f"speed {rows[-1]}", flush=True)
                        continue
                    med = statistics.median(times)
                    rows.append(
                        {
                            "impl": name,
                            "seq": n,
                            "head_dim": dim,
                            "pass": "fwd+bwd" if backward else "fwd",
                            "ms": med * 1e3,
                            "ms_p25": statistics.quantiles(times, n=4)[0] * 1e3,
                            "ms_p75": statistics.quantiles(times, n=4)[2] * 1e3,
                            "tflops": _tflops(batch, heads, n, dim, backward, med),
                        }
                    )
                    print(f"speed {rows[-1]}", flush=True)
            impls.clear()
            torch.cuda.empty_cache()
    return rows


def _markdown(meta: dict, corr: list[dict], rows: list[dict]) -> str:
    lines = [
        f"# Landmark attention kernel vs SDPA ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; block size {meta['block']}.",
        "",
    ]
    lines += [
        "## Correctness (max |error| / max |reference|, against float64)",
        "",
        "| dtype | head dim | out | dq | dk | dv |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r['dtype']} | {r['head_dim']} | {r['out']:.1e} | {r['dq']:.1e} | {r['dk']:.1e} | {r['dv']:.1e} |"
        for r in corr
    ]
    if rows:
        lines += [
            "",
            "## Speed (bfloat16, batch 1, 16 heads; median [p25-p75] ms; TFLOP/s as causal attention)",
            "",
        ]
        lines += [
            "| seq | head dim | pass | impl | ms | TFLOP/s | vs cuDNN |",
            "|--:|--:|---|---|--:|--:|--:|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['seq']} | {r['head_dim']} | {r['pass']} | {r['impl']} | error | — | — |")
                continue
            ref = next(
                (
                    x
                    for x in rows
                    if x["impl"] == "sdpa cudnn"
                    and x["seq"] == r["seq"]
                    and x["head_dim"] == r["head_dim"]
                    and x["pass"] == r["pass"]
                    and "tflops" in x
                ),
                None,
            )
            ratio = f"{r['tflops'] / ref['tflops']:.0%}" if ref else "—"
            lines.append(
                f"| {r['seq']} | {r['head_dim']} | {r['pass']} | {r['impl']} | {r['ms']:.2f} [{r['ms_p25']:.2f}-{r['ms_p75']:.2f}] | {r['tflops']:.0f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test under TRITON_INTERPRET=1")
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.tiny
    meta = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (TRITON_INTERPRET=1)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "block": args.block if cuda else 16,
    }
    if cuda:
        corr = correctness(
            "cuda", [torch.float16, torch.bfloat16, torch.float32], [64, 128], 1000, args.block
        )
        rows = speed(
            [int(x) for x in args.lengths.split(",")],
            [int(x) for x in args.dims.split(",")],
            args.repeats,
            args.warmup,
            args.block,
        )
    else:
        corr = correctness("cpu", [torch.float32], [16], 70, 16)
        rows = []
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "correctness": corr, "speed": rows}, indent=2)
    )
    (out / "results.md").write_text(_markdown(meta, corr, rows))
    print(_markdown(meta, corr, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
