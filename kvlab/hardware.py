"""Hardware and the roofline: decode and prefill time from the calculator's bytes and FLOPs.

A decode step of ``batch`` sequences at ``context`` reads every active weight once and each sequence's K/V
(``weight_read_bytes_per_step + kv_read_bytes_per_step``) and computes ``batch x flops_per_token``; its time is
the larger of bytes / bandwidth and FLOPs / peak FLOP/s (Williams et al., "Roofline", CACM 2009), and that names
the bound. Peak figures are the vendors' datasheet numbers (dense, no sparsity); real kernels reach a fraction of
them, so the roofline is an upper bound on speed. ``measured()`` measures this machine instead: ``copy_``
bandwidth as ``kvlab bench`` measures it and a matmul's FLOP/s.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from kvlab.costs import costs, dtype_bytes, resolve_config
from kvlab.engines import layer_tp_factor


@dataclass
class Hardware:
    """One device: ``bandwidth`` in bytes/s, ``flops`` peak dense FLOP/s by dtype, ``memory`` in bytes."""

    name: str
    label: str
    bandwidth: float
    flops: dict[str, float]
    memory: int
    source: str
    notes: list[str] = field(default_factory=list)

    def peak_flops(self, dtype: str) -> tuple[float | None, str]:
        """FLOP/s for weights in ``dtype`` and the dtype whose figure is used (bf16's for fp16/fp32 if absent)."""
        for d in (dtype, "bfloat16"):
            if self.flops.get(d):
                return self.flops[d], d
        return None, dtype


GiB = 1024**3
T = 1e12
HARDWARE: dict[str, Hardware] = {h.name: h for h in [
    Hardware("h100", "NVIDIA H100 SXM5 80GB", 3.35e12, {"bfloat16": 989.4 * T, "float8": 1978.9 * T}, 80 * GiB,
             "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): 3.35 TB/s HBM3, BF16 "
             "1,979 / FP8 3,958 TFLOPS with sparsity (half without)"),
    Hardware("h200", "NVIDIA H200 SXM 141GB", 4.8e12, {"bfloat16": 989.4 * T, "float8": 1978.9 * T}, 141 * GiB,
             "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): 4.8 TB/s HBM3e, 141 GB, "
             "BF16 1,979 / FP8 3,958 TFLOPS with sparsity (half without)"),
    Hardware("a100", "NVIDIA A100 SXM4 80GB", 2.039e12, {"bfloat16": 312 * T}, 80 * GiB,
             "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): 2,039 GB/s HBM2e, BF16 312 "
             "TFLOPS dense; no FP8 tensor cores (fp8 weights priced at the bf16 rate)"),
    Hardware("l40s", "NVIDIA L40S 48GB", 864e9, {"bfloat16": 362.05 * T, "float8": 733 * T}, 48 * GiB,
             "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): 864 GB/s GDDR6, BF16 362.05 / FP8 733 TFLOPS "
             "dense (733 / 1,466 with sparsity)"),
    Hardware("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 1008e9, {"bfloat16": 165.2 * T, "float8": 330.3 * T},
             24 * GiB,
             "NVIDIA Ada Lovelace architecture whitepaper, appendix table (RTX 4090): 1,008 GB/s GDDR6X, BF16 165.2 "
             "TFLOPS dense with FP32 accumulate, FP8 330.3 TFLOPS dense with FP32 accumulate"),
    Hardware("mi300x", "AMD Instinct MI300X 192GB", 5.3e12, {"bfloat16": 1307.4 * T, "float8": 2614.9 * T},
             192 * GiB,
             "AMD Instinct MI300X data sheet (amd.com/en/products/accelerators/instinct/mi300/mi300x.html): 5.3 TB/s "
             "HBM3, 192 GB, BF16 1,307.4 / FP8 2,614.9 TFLOPS dense"),
    Hardware("m3-max", "Apple M3 Max (16-core CPU, 40-core GPU) 128GB", 400e9, {}, 128 * GiB,
             "Apple M3 Max press release and tech specs (apple.com, 2023-10-30): 400 GB/s unified memory bandwidth "
             "(300 GB/s for the 14-core CPU part), up to 128 GB",
             [("Apple publishes no bf16/fp16 FLOP/s for the M3 Max GPU: only the memory bound is priced; prefill "
              "time is not given")]),
]}
HARDWARE_NAMES = tuple(HARDWARE) + ("measured",)


def matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` torch matmul on the CPU in ``dtype``, best of ``repeats`` (2 n^3 per product)."""
    import torch  # only when this machine is measured: kvlab fit prices the named hardware without torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"measured hardware: dtype {dtype!r} cannot be timed here; allowed: fp32, bf16, fp16")
    a = torch.randn(n, n, dtype=torch_dtype)
    b = torch.randn(n, n, dtype=torch_dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measured(dtype: str = "float32", bandwidth_bytes: int = 256 * 1024**2) -> Hardware:
    """This machine: ``kvlab.bench.copy_bandwidth`` (read + write bytes / s), a matmul's FLOP/s, total RAM."""
    import psutil

    from kvlab.bench import copy_bandwidth  # the benchmark (torch) only when this machine is measured

    name, _ = dtype_bytes(dtype)
    bw = copy_bandwidth(bandwidth_bytes)
    fl = matmul_flops(name)
    return Hardware("measured", "this machine (measured)", bw, {name: fl}, psutil.virtual_memory().total,
                    f"measured now: torch copy_ of {bandwidth_bytes // 1024**2} MiB (bytes read + written, best of 5, "
                    f"as kvlab bench), a 1024 x 1024 {name} matmul (best of 5)")


def get_hardware(name: str | Hardware, dtype: str = "float32") -> Hardware:
    """A :class:`Hardware` from the table by name, or ``"measured"`` (measures now, ``dtype`` for the matmul)."""
    if isinstance(name, Hardware):
        return name
    key = str(name).strip().lower()
    if key == "measured":
        return measured(dtype)
    if key not in HARDWARE:
        raise ValueError(f"hardware={name!r}: allowed: {', '.join(HARDWARE_NAMES)}")
    return HARDWARE[key]


@dataclass
class Roofline:
    """Predicted decode and prefill times of one configuration on one device (of ``tp``)."""

    hardware: str
    context: int
    batch: int
    tp: int
    decode_bytes: int  # per step, one device
    decode_flops: int  # per step, one device
    decode_step_s: float
    decode_bound: str  # "memory" or "compute"
    decode_tok_s_per_sequence: float
    decode_tok_s_aggregate: float
    prefill_flops: int
    prefill_bytes: int
    prefill_s: float | None
    prefill_bound: str | None
    flops_dtype: str
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def roofline(model: Any, hardware: str | Hardware, context: int, batch: int = 1, weights_dtype: Any = "bfloat16",
             kv_dtype: Any = None, tp: int = 1, chunk: int = 512, weights_bytes: int | None = None,
             kv_quant: Any = None) -> Roofline:
    """Decode tokens/s (per sequence and aggregate) and prefill seconds at ``context`` x ``batch`` on ``hardware``.

    Per device of ``tp``: weight bytes and FLOPs divided by ``tp``, K/V bytes as :func:`kvlab.fit.footprint` splits
    or replicates them; communication is not priced. Prefill: ``prefill_flops`` (whole batch) against the bytes of
    reading the weights once per chunk of ``chunk`` tokens and writing the K/V once. ``weights_bytes``: the whole
    model's stored weight bytes when known (a GGUF file): weight traffic is scaled by it / (params x dtype bytes).
    """
    cfg = resolve_config(model)
    w_name, _ = dtype_bytes(weights_dtype)
    hw = get_hardware(hardware, w_name)
    c = costs(cfg, context=context, dtype=weights_dtype, batch=batch, kv_dtype=kv_dtype, kv_quant=kv_quant)
    w_read = c.weight_read_bytes_per_step
    if weights_bytes is not None:
        w_read = round(w_read * weights_bytes / (c.params_total * dtype_bytes(weights_dtype)[1]))
    kv_read = 0.0
    kv_store = 0.0
    for x in c.per_layer:
        f, _ = layer_tp_factor(x, tp)
        kv_read += x.kv_read_bytes * f
        kv_store += x.kv_bytes * f
    dec_bytes = int(w_read / tp + kv_read)
    dec_flops = batch * c.flops_per_token // tp
    peak, fdt = hw.peak_flops(w_name)
    t_mem = dec_bytes / hw.bandwidth
    t_cmp = dec_flops / peak if peak else 0.0
    step = max(t_mem, t_cmp)
    pre_flops = c.prefill_flops // tp
    chunks = -(-context // chunk)
    pre_bytes = int(w_read / tp * chunks + kv_store)
    pre_s = max(pre_flops / peak, pre_bytes / hw.bandwidth) if peak else None
    pre_bound = None if pre_s is None else ("compute" if pre_flops / peak >= pre_bytes / hw.bandwidth else "memory")
    assumptions = [
        f"{hw.label}: {hw.bandwidth / 1e9:,.0f} GB/s, "
        + (f"{peak / 1e12:,.1f} TFLOP/s dense {fdt}" if peak else "no published FLOP/s") + f"; {hw.source}",
        ("decode step time = max(bytes read / bandwidth, FLOPs / peak FLOP/s): bytes = weight_read_bytes_per_step "
        "(every active weight once; MoE: the distinct experts of the batch) + kv_read_bytes_per_step; FLOPs = batch x "
        "flops_per_token; peaks are reached by no real kernel, so these are upper bounds on speed"),
        f"prefill = max(prefill_flops / peak, (weights x ceil(context / {chunk}) chunks + K/V written) / bandwidth)",
    ]
    if w_name != fdt and peak:
        assumptions.append(f"{hw.name} has no {w_name} figure: the {fdt} peak is used")
    if tp > 1:
        assumptions.append(f"tp={tp}: weights and FLOPs divided evenly, K/V split or replicated per layer; "
                           "all-reduce traffic not priced")
    assumptions += hw.notes
    return Roofline(
        hardware=hw.name, context=context, batch=batch, tp=tp, decode_bytes=dec_bytes, decode_flops=dec_flops,
        decode_step_s=step, decode_bound="compute" if t_cmp > t_mem else "memory",
        decode_tok_s_per_sequence=1 / step, decode_tok_s_aggregate=batch / step, prefill_flops=pre_flops,
        prefill_bytes=pre_bytes, prefill_s=pre_s, prefill_bound=pre_bound, flops_dtype=fdt, assumptions=assumptions)


__all__ = ["HARDWARE", "HARDWARE_NAMES", "Hardware", "Roofline", "get_hardware", "matmul_flops", "measured",
           "roofline"]
