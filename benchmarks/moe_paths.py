"""Eager MoE expert paths side by side per token count (outside CI): the grouped matmuls (``Experts.grouped``,
``torch.nn.functional.grouped_mm``) against the path ``Experts.forward`` takes without them (a decode step's few
choices gather the chosen experts' weights; up to ``4 E`` choices run every expert; more loop over the experts).

The expert shapes of ``benchmarks/*.json`` (experts, top-k, hidden, expert width) with 8 layers' worth of experts
cycled, so a step reads its weights from memory as a model's step does, not from the cache; random routing;
``--trials`` interleaved trials of both paths, the best of each kept (the machine is shared). ``--compiled``: both
paths compiled (inductor, ``fullgraph``; bf16 only, ``grouped_mm`` does not trace in fp32), as a compiled decode
step would run them. Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/moe_paths.py --tokens 1,8,64,512,4096 --dtypes float32,bfloat16
    PYTHONPATH=$PWD .venv/bin/python benchmarks/moe_paths.py --tokens 1,8 --dtypes bfloat16 --compiled
"""

from __future__ import annotations

import argparse
import time

import torch

from kvlab.layers.moe import Experts

SHAPES = {"laguna-small": (8, 2, 512, 256), "deepseek-v4-small": (8, 2, 512, 512), "zaya-small": (4, 1, 1024, 1024)}


def other(ex: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Experts.forward`` as it runs without grouped matmuls (compiled, autograd, CUDA)."""
    if torch.compiler.is_compiling():  # forward takes the other paths there
        return ex(x, idx, w)
    ex.can_group = lambda x: False
    try:
        return ex(x, idx, w)
    finally:
        del ex.can_group


def grouped(ex: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ex.grouped(x, idx, w)


def timed(fn, layers: list[Experts], x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, reps: int) -> float:
    """Microseconds per layer call."""
    t = time.perf_counter()
    for _ in range(reps):
        for ex in layers:
            fn(ex, x, idx, w)
    return (time.perf_counter() - t) / reps / len(layers) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8,64,512,4096", help="token counts N (comma-separated)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="both paths compiled (bf16 only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = [other, grouped]
    if args.compiled:
        if args.dtypes != "bfloat16":
            ap.error("--compiled: grouped_mm traces in bf16 only (--dtypes bfloat16)")
        paths = [torch.compile(f, fullgraph=True, dynamic=False) for f in paths]
    print("| shape | dtype | tokens | choices / expert | without grouped_mm (us) | grouped (us) | ratio | max diff |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    with torch.inference_mode():
        for dname in args.dtypes.split(","):
            dt = getattr(torch, dname)
            for name, (num, k, hidden, width) in SHAPES.items():
                layers = [Experts(num, hidden, width, "silu").to(dt) for _ in range(8)]
                for n in (int(v) for v in args.tokens.split(",")):
                    g = torch.Generator().manual_seed(n)
                    x = torch.randn(n, hidden, generator=g).to(dt)
                    idx = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(n)])
                    w = torch.rand(n, k, generator=g)
                    reps = max(1, 64 // n)
                    best = dict.fromkeys(paths, float("inf"))
                    for fn in best:
                        timed(fn, layers, x, idx, w, 1)
                    for _ in range(args.trials):
                        for fn, b in best.items():
                            best[fn] = min(b, timed(fn, layers, x, idx, w, reps))
                    a, b = (best[f] for f in paths)
                    diff = (paths[0](layers[0], x, idx, w).float() - paths[1](layers[0], x, idx, w).float()).abs().max()
                    print(f"| {name} | {dname} | {n} | {n * k / num:g} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {diff:.1e} |",
                          flush=True)


if __name__ == "__main__":
    main()
