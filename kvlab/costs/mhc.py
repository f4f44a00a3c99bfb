"""The price of mHC (manifold-constrained hyper-connections, DeepSeek V4; kvlab/layers/mhc.py)."""

from __future__ import annotations


def mhc_cost(streams: int, hidden: int, num_layers: int, iters: int) -> dict[str, int]:
    """Extra parameters and per-token FLOPs of mHC over a plain residual model.

    Per block two hyper-connections (attention, MLP), each ``(2 + n) n x n D`` matmul weights, ``(2 + n) n``
    biases and 3 scales; the head ``n x n D`` + ``n`` + 1. FLOPs per token: the map projections
    (2 x matmul params), the stream mixing ``M^T X`` (2 n^2 D), read-in and write-out (2 n D each), per
    hyper-connection; the head's read-in; Sinkhorn (``iters`` x 2 normalisations of n^2 elements, 2 FLOPs
    each: sum and divide) is counted too.
    """
    n, d = streams, hidden
    hc_mat = (2 + n) * n * n * d
    head_mat = n * n * d
    params = num_layers * 2 * (hc_mat + (2 + n) * n + 3) + head_mat + n + 1
    matmul = num_layers * 2 * hc_mat + head_mat
    mixing = num_layers * 2 * (2 * n * n * d + 4 * n * d + iters * 4 * n * n) + 2 * n * d
    return {"params": params, "matmul_params": matmul, "flops_per_token": 2 * matmul + mixing,
            "mixing_flops_per_token": mixing}


def assumption(streams: int) -> str:
    return (f"mHC with {streams} streams: params_mhc = per layer 2 x ((2+n)n x nD + (2+n)n + 3), head "
            "n x nD + n + 1; held in fp32 (weight_read_bytes counts them at 4 B); mhc_flops_per_token = 2 x their "
            "matmul params + stream mixing 2n^2 D + read/write 4nD per hyper-connection + Sinkhorn; the residual "
            "stream is n x wider (activations only, no cache)")
