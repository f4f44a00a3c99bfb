"""How far a bf16 chunked prefill's last logits are from the fp32 model's on the same weights, with the widened
float32 products (kvlab/layers/bf16_widen.py, kvlab/layers/chunk_attend.py) on and off (outside CI).

The lane of ``benchmarks/prefill_side_by_side.py`` (random weights of a benchmark shape scaled as ``kvlab bench``
scales them, seed 0; the same ids; chunks of 512 into a preallocated cache, ``last_only=True``; one thread): the fp32
model's last logits are the reference; the bf16 copy of the same weights (rounded once) prefills with
``bf16_widen.ENABLED`` on, then off (``--widened-only``: on only). Per lane: max and relative L2 error of the last logits, KL(fp32 || bf16) of
their softmax, whether the argmax agrees, the seconds. Prints one JSON line.

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/bf16_prefill_error.py \\
        benchmarks/qwen3-100m.json 1k
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time

import torch

from kvlab.bench import save_random_hf
from kvlab.layers import bf16_widen
from kvlab.loading import load
from kvlab.resolve import resolve_spec
from kvlab.shrink import scale_to_fit
from kvlab.units import parse_contexts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", help="a benchmark JSON (benchmarks/*.json)")
    ap.add_argument("context", help="tokens to prefill (1k)")
    ap.add_argument("--widened-only", action="store_true", help="skip the lane with torch's bf16 products (slow)")
    args = ap.parse_args(argv)
    ctx = parse_contexts(args.context)[0]
    torch.set_num_threads(1)
    cfg, _ = scale_to_fit(resolve_spec(args.shape))
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf(cfg, tmp)
        fp32 = load(tmp, dtype=torch.float32, device="cpu").eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    def prefill(model) -> tuple[torch.Tensor, float]:
        cache = model.new_cache(1, max_length=ctx)
        t0 = time.perf_counter()
        for s in range(0, ctx, 512):
            out = model(ids[:, s:s + 512], cache=cache, last_only=True)
        return out[0, -1].double(), time.perf_counter() - t0

    rec = {"shape": args.shape, "context": ctx, "lanes": {}}
    with torch.inference_mode():
        ref, rec["fp32_s"] = prefill(fp32)
        for name, on in (("bf16_widened", True), ("bf16_torch", False))[:1 if args.widened_only else 2]:
            bf16_widen.ENABLED = on
            got, s = prefill(bf16)
            lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
            rec["lanes"][name] = {"s": s, "max_abs": (got - ref).abs().max().item(),
                                  "rel_l2": ((got - ref).norm() / ref.norm()).item(),
                                  "kl": (lp.exp() * (lp - lq)).sum().item(),
                                  "argmax_agrees": bool(got.argmax() == ref.argmax())}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
