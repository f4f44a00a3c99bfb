"""What CUDA graphs would give a decode step on a GPU: one step captured and replayed (``torch.cuda.CUDAGraph``).

kvlab's compiled step (kvlab/compiled.py) does not use CUDA graphs yet: the number of positions written is a Python
int, so torch would record one graph per step. This script measures the bound they would reach: after a prefill of
``--context`` tokens it times the eager step, the compiled step (inductor), and each of them captured once as a CUDA
graph and replayed (a replay rewrites the same cache slot: the step's work and bytes, without the Python and the
kernel launches). A capture also proves the step issues no host synchronisation (one would fail the capture).
Figures: median step time, achieved bandwidth (the calculator's weight + K/V bytes read per step / step time)
against the device's copy bandwidth. Needs a CUDA GPU; prints one JSON object.

  python benchmarks/cuda_graph_bound.py benchmarks/qwen3-100m.json --context 4k,16k --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvlab.bench import TORCH_DTYPES, copy_bandwidth
from kvlab.compiled import CompiledStep
from kvlab.costs import costs
from kvlab.model import Model
from kvlab.resolve import resolve_spec
from kvlab.shrink import scale_to_fit
from kvlab.units import parse_contexts, parse_dtype


def timed(fn, n: int) -> float:
    """Median seconds of ``n`` calls of ``fn``, each waited for."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def graphed(step, ids: torch.Tensor, cache) -> torch.cuda.CUDAGraph:
    """``step(ids, cache)`` captured once (warmed on a side stream first, as torch's docs ask)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(ids, cache)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(ids, cache)
    return g


def run(spec: str, context: int, dtype: str, steps: int) -> dict:
    cfg, notes = scale_to_fit(resolve_spec(spec), 4 * 1024**3, TORCH_DTYPES[dtype].itemsize)
    model = Model.from_config(cfg, dtype=TORCH_DTYPES[dtype], device="cuda", seed=0).eval()
    spare = 4 * steps + 16
    ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")
    c = costs(cfg, context=context + steps, dtype=dtype)
    read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
    row: dict = {"context": context, "dtype": dtype, "scaled": notes, "bytes_read_per_step": read}
    with torch.inference_mode():
        for name, make in (("eager", lambda: model.decode_step), ("compiled", lambda: CompiledStep(model))):
            cache = model.new_cache(1, max_length=context + spare)
            for s in range(0, context, 512):
                model(ids[:, s:s + 512], cache=cache, last_only=True)
            step = make()
            one = ids[:, -1:].clone()
            t0 = time.perf_counter()
            step(one, cache)  # a compile for the compiled step
            torch.cuda.synchronize()
            row[f"{name}_first_s"] = time.perf_counter() - t0
            row[f"{name}_ms"] = 1e3 * timed(lambda f=step, x=one, c=cache: f(x, c), steps)
            try:
                g = graphed(step, one, cache)
                row[f"{name}_graph_ms"] = 1e3 * timed(g.replay, steps)
            except Exception as e:  # noqa: BLE001 - reported, not hidden: a capture that fails says why
                row[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            del cache
    for k in [k for k in row if k.endswith("_ms")]:
        row[k.removesuffix("_ms") + "_gb_s"] = read / (row[k] / 1e3) / 1e9
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--context", default="4k,16k")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    bw = copy_bandwidth(1024**3, device="cuda")
    rows = [run(a.spec, n, parse_dtype(a.dtype), a.steps) for n in parse_contexts(a.context)]
    for r in rows:
        r.update({k.removesuffix("_gb_s") + "_of_copy_bw": r[k] * 1e9 / bw for k in list(r) if k.endswith("_gb_s")})
    print(json.dumps({"spec": a.spec, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "copy_bandwidth_gb_s": bw / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
