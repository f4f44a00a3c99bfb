"""Each step of kvlab's compiled decode step (kvlab/compiled.py, inductor) over a quantized cache: its wall time and
the graphs compiled so far, to see recompiles (not part of CI; docs/performance.md "Does compiling help the
quantized decode?").

The cache is filled with random K/V (benchmarks/kv_quant_speed.py ``fill``, no prefill), then ``--steps`` decode
steps run one after the other; ``--fused``: the cache is made with ``fused=True`` (kvlab/layers/fused.py);
``--layers N``: only the first N layers of the shape (the compile time grows with the layers).

    PYTHONPATH=. .venv/bin/python benchmarks/compiled_quant_steps.py benchmarks/qwen3-100m.json --layers 2 \\
        --context 16k --kv-quant int8 --fused --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from kv_quant_speed import fill

from kvlab.compiled import CompiledStep
from kvlab.model import Model
from kvlab.resolve import resolve_spec
from kvlab.units import parse_context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape")
    ap.add_argument("--layers", type=int, help="keep the first N layers")
    ap.add_argument("--context", default="16k")
    ap.add_argument("--kv-quant", default="int8")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = resolve_spec(a.shape)
    if a.layers:
        cfg = dataclasses.replace(cfg, layers=cfg.layers[:a.layers])
    ctx = parse_context(a.context)
    model = Model.from_config(cfg, dtype=torch.float32, seed=0).eval()
    cache = model.new_cache(1, ctx + a.steps + 8, kv_quant=a.kv_quant, fused=a.fused)
    fill(cache, cfg, ctx, torch.float32)
    step, tok, rows = CompiledStep(model, "inductor"), torch.tensor([[1]]), []
    with torch.inference_mode():
        for i in range(a.steps):
            t = time.perf_counter()
            step(tok, cache)
            rows.append({"step": i, "s": time.perf_counter() - t, "graphs": step.compiles})
            print(f"step {i}: {rows[-1]['s']:.3f} s, graphs compiled so far {step.compiles}", flush=True)
    print(json.dumps({"shape": a.shape, "layers": len(cfg.layers), "context": ctx, "kv_quant": a.kv_quant,
                      "fused": a.fused, "load": os.getloadavg(), "steps": rows}))


if __name__ == "__main__":
    main()
