"""One attention layer's K/V for the per-call benchmarks (kv_quant_attend.py, kv_quant_fused.py): the shared
arguments (context, KV heads, query heads, head dim, timed calls, threads) and the tensors they describe."""

from __future__ import annotations

import argparse

import torch

from kvlab.cache.quant import QuantRows
from kvlab.costs.quant import Buffer, parse_quant
from kvlab.units import parse_context


def add_layer_args(ap: argparse.ArgumentParser, calls: int) -> None:
    """The layer shape (default: qwen3-100m's, 4 KV heads x 12 query heads x 64 channels at 16K), ``--calls`` timed
    calls per path after one warm-up, ``--threads``."""
    ap.add_argument("--context", default="16k")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=calls, help="timed calls per path after one warm-up")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def layer_tensors(a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``--threads`` applied; ``q [1, heads, 1, dim]``, ``k``, ``v [1, kv_heads, context, dim]``: unit normal, seed 0."""
    if a.threads:
        torch.set_num_threads(a.threads)
    n, hkv, d = parse_context(a.context), a.kv_heads, a.dim
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)
    return torch.randn(1, a.heads, 1, d, generator=gen), k, v


def quantized(fmt: str, k: torch.Tensor, v: torch.Tensor) -> tuple[QuantRows, QuantRows]:
    """``k``, ``v`` written once into kvlab's quantized buffers of format ``fmt`` (kvlab/cache/quant.py)."""
    _, hkv, n, d = k.shape
    rows = [QuantRows(Buffer("kv", name, hkv, 0, d, key=name == "k"), parse_quant(fmt), (1, hkv), torch.float32,
                      "cpu") for name in "kv"]
    for r, x in zip(rows, (k, v), strict=True):
        r.resize(n, 0)
        r.write(0, x)
    return rows[0], rows[1]
