"""Whole eager decode steps with the dense decode-attention kernel (kvlab/layers/dense_attend.py) on and off, in one
process, stepping in turns (outside CI); ``--kernel f32``: the float32 weight-product kernel (kvlab/layers/f32_kernel.py)
on and off instead, ``rows``: the RoPE rows kernel (kvlab/layers/rows_kernel.py), ``route``: the MoE router in
the MoE kernel's call (kvlab/layers/moe_kernel.py ``ROUTE``), ``compressed``: DeepSeek V4's CSA / HCA / SWA step
(kvlab/layers/compressed_kernel.py), ``grouped``: the per-head / per-group products of MLA's absorbed decode and
DeepSeek V4's output groups (kvlab/layers/f32_kernel.py ``GROUPED``), several comma-separated: together.
``--huge cache|weights|all``: every kernel on in both lanes, which differ in memory instead: the "on" lane's K/V
cache and/or weights in transparent huge pages (kvlab/hugepages.py: the prefilled cache and the loaded model as kvlab
makes them), the "off" lane's a copy of them in torch's ordinary allocations (``copy.deepcopy``: 4 KiB pages under
THP ``madvise``), the lane that steps first alternating from step to step; and the copy bandwidth in both kinds of
memory (``copy_gb_s``: 4 KiB pages, as runs G-J; ``copy_gb_s_huge``: huge pages). Either way each lane's share of its
cache / weight bytes in huge pages is reported (``AnonHugePages``; a kernel A/B's second cache is a copy in the same
kind of memory as the first).

Per benchmark shape (``benchmarks/*.json``, random weights scaled as ``kvlab bench`` scales them) and context: one
prefill (chunks of 512), its cache copied, then two lanes decode the same tokens in turns, step by step, the kernel
on (``dense_attend.ENABLED``, or the ``--kernel``'s) in one and off (SDPA, or ``F.linear``) in the other; the copy bandwidth before and after. Reports each
lane's median step, the off / on ratio per step pair (median), the largest logit difference between the lanes, and
the share of the copy bandwidth (the calculator's bytes read per step, as ``kvlab bench``). The JSON (``--out``) and
a last JSON line.

    PYTHONPATH=$PWD nice -n 10 flock /tmp/kvlab-heavy.lock .venv/bin/python benchmarks/dense_steps.py \\
        benchmarks/laguna-small.json:16k benchmarks/qwen3-100m.json:16k --steps 12 --threads 1 --out <json>
    ... benchmarks/dense_steps.py benchmarks/laguna-small.json:16k --huge all --steps 12 --threads 1 --out <json>
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
from kv_quant_speed import fill

from kvlab import hugepages
from kvlab.bench import TORCH_DTYPES, copy_bandwidth, save_random_hf
from kvlab.costs import costs
from kvlab.layers import compressed_kernel, dense_attend, f32_kernel, moe_kernel, rows_kernel
from kvlab.loading import load
from kvlab.resolve import resolve_spec
from kvlab.shrink import scale_to_fit
from kvlab.units import parse_context, table

# --kernel: the module and its switch the lanes set
KERNELS = {"dense": (dense_attend, "ENABLED"), "f32": (f32_kernel, "ENABLED"), "rows": (rows_kernel, "ENABLED"),
           "route": (moe_kernel, "ROUTE"), "compressed": (compressed_kernel, "ENABLED"),
           "grouped": (f32_kernel, "GROUPED")}


def huge_share(tensors: list[torch.Tensor]) -> float:
    """The share of the bytes of ``tensors`` (those of 2 MiB and more: the rest stay in small pages) that sit in
    huge pages (``AnonHugePages`` of their mappings, capped at each tensor's size)."""
    big = {t.data_ptr(): t for t in tensors if t.numel() * t.element_size() >= hugepages.MIN_BYTES}.values()
    total = sum(t.numel() * t.element_size() for t in big)
    return sum(min(hugepages.huge_bytes(t), t.numel() * t.element_size()) for t in big) / max(total, 1)


def huge_copy(obj):
    """``copy.deepcopy(obj)`` (a cache) with its tensors of 2 MiB and more moved into huge pages (kvlab/hugepages.py;
    a deepcopy alone lands in torch's allocations); a tensor held twice stays one."""
    out = copy.deepcopy(obj)
    moved: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(o) -> None:
        if id(o) in seen or isinstance(o, (str, bytes, int, float, torch.dtype, torch.device)):
            return
        seen.add(id(o))
        slots = o if isinstance(o, dict) else dict(enumerate(o)) if isinstance(o, list) else getattr(o, "__dict__", {})
        for k, v in list(slots.items()):
            if isinstance(v, torch.Tensor):
                if v.numel() * v.element_size() >= hugepages.MIN_BYTES:
                    moved.setdefault(id(v), hugepages.like(v))
                    if isinstance(o, (dict, list)):
                        o[k] = moved[id(v)]
                    else:
                        setattr(o, k, moved[id(v)])
            else:
                walk(v)

    walk(out)
    return out


def huge_copy_bandwidth(nbytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """:func:`kvlab.bench.copy_bandwidth` with both buffers in huge pages (kvlab/hugepages.py)."""
    src = hugepages.like(torch.ones(nbytes // 4))
    dst = hugepages.like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def run(spec: str, ctx: int, steps: int, dtype: str, kernel: str = "dense", fill_cache: bool = False,
        huge: str | None = None) -> dict:
    """One shape and context: the two lanes' step times, their logits' largest difference, the bandwidth shares;
    ``huge``: the lanes differ in the memory of the cache, the weights or both (see the module), not a kernel."""
    cfg, _ = scale_to_fit(resolve_spec(spec))
    hugepages.ENABLED = huge is not None or hugepages.ENABLED
    with tempfile.TemporaryDirectory(prefix="dense-steps-") as tmp:
        save_random_hf(cfg, tmp)
        model = load(tmp, dtype=TORCH_DTYPES[dtype], device="cpu").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()[0]
    extra = {}
    with torch.inference_mode():
        cache = model.new_cache(1, max_length=ctx + steps + 2)
        if fill_cache:  # random K/V, no prefill (benchmarks/kv_quant_speed.py)
            fill(cache, cfg, ctx, TORCH_DTYPES[dtype])
            logits = model.decode_step(ids[:, -1:], cache)
        for s in range(0, 0 if fill_cache else ctx, 512):
            logits = model(ids[:, s:s + 512], cache=cache, last_only=True)
        if huge is None:
            twin = huge_copy(cache) if hugepages.ENABLED and hugepages.available() else copy.deepcopy(cache)
            models, caches = {True: model, False: model}, {True: cache, False: twin}  # the same kind of memory
            switch = kernel.split(",")
        else:  # deepcopy: torch's allocator (small pages); "weights" alone: both caches copies, in small pages
            models = {True: model, False: copy.deepcopy(model) if huge in ("weights", "all") else model}
            caches = {True: cache if huge in ("cache", "all") else copy.deepcopy(cache), False: copy.deepcopy(cache)}
            switch = []
        for on in (True, False):  # where each lane's bytes sit
            extra[f"{'on' if on else 'off'}_huge_share"] = {
                "cache": huge_share([t for st in caches[on].layers if st is not None for t in st.tensors()]),
                "weights": huge_share([*models[on].parameters(), *models[on].buffers()])}
        times: dict[bool, list[float]] = {True: [], False: []}
        diff = 0.0
        bw0 = copy_bandwidth()
        hb0 = huge_copy_bandwidth() if huge else None
        for i in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # both lanes decode the on lane's tokens
            out = {}
            for on in (True, False) if huge is None or i % 2 == 0 else (False, True):  # --huge: turns alternate
                for k in switch:
                    setattr(*KERNELS[k], on)
                t = time.perf_counter()
                out[on] = models[on].decode_step(nxt, caches[on])
                times[on].append(time.perf_counter() - t)
            for k in switch:
                setattr(*KERNELS[k], True)
            diff = max(diff, (out[True].float() - out[False].float()).abs().max().item())
            logits = out[True]
        bw1 = copy_bandwidth()
        if huge:
            extra["copy_gb_s_huge"] = [hb0 / 1e9, huge_copy_bandwidth() / 1e9]
    c = costs(cfg, context=ctx + steps // 2, dtype=dtype)
    read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    return {"shape": spec, "kernel": kernel if huge is None else None, "fill": fill_cache, "huge": huge, "context": ctx, "dtype": dtype, "steps": steps, "threads": torch.get_num_threads(),
            "on_ms": on_s * 1e3, "off_ms": off_s * 1e3,
            "off_over_on": statistics.median(b / a for a, b in zip(times[True], times[False], strict=True)),
            "on_steps_s": times[True], "off_steps_s": times[False], "max_logit_diff": diff,
            "read_bytes_per_step": read, "kv_read_bytes_per_step": c.kv_read_bytes_per_step,
            "copy_gb_s": [bw0 / 1e9, bw1 / 1e9], "on_of_copy_bw": read / on_s / min(bw0, bw1),
            "off_of_copy_bw": read / off_s / min(bw0, bw1), "load": [load0, os.getloadavg()[0]], **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="SHAPE:CONTEXT")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per lane")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernel", default="dense", help=f"the kernel(s) the two lanes switch, comma-separated: {sorted(KERNELS)}")
    ap.add_argument("--fill", action="store_true", help="a cache of random K/V instead of a prefill (faster at 16K)")
    ap.add_argument("--huge", choices=["cache", "weights", "all"],
                    help="the lanes differ in whether the cache, the weights or both sit in huge pages (not a kernel)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.huge and not hugepages.available():
        raise SystemExit("--huge: no transparent huge pages here (Linux with THP always or madvise)")
    torch.set_num_threads(a.threads)
    for k in a.kernel.split(","):
        if k not in KERNELS:
            raise SystemExit(f"--kernel: {k!r} is not one of {sorted(KERNELS)}")
        if KERNELS[k][0].library() is None:
            raise SystemExit(f"the {k} kernel is off (its KVLAB_*_KERNEL=0) or did not build")
    rows = []
    for r in a.runs:
        spec, ctx = r.rsplit(":", 1)
        rows.append(run(spec, parse_context(ctx), a.steps, a.dtype, a.kernel, a.fill, a.huge))
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    def huge_cols(r: dict) -> list[str]:  # --huge: the copy bandwidth in huge pages, each lane's cache / weights share
        if not a.huge:
            return []
        return ["-".join(f"{x:.1f}" for x in r["copy_gb_s_huge"]),
                *("{:.0%} / {:.0%}".format(r[f"{lane}_huge_share"]["cache"], r[f"{lane}_huge_share"]["weights"])
                  for lane in ("on", "off"))]

    print(table(["shape", "context", "on ms", "off ms", "off / on", "on of copy bw", "off of copy bw", "copy GB/s",
                 "max |logit diff|", "load"] + (["huge copy GB/s", "on huge c/w", "off huge c/w"] if a.huge else []),
                [[r["shape"], str(r["context"]), f"{r['on_ms']:.2f}", f"{r['off_ms']:.2f}", f"{r['off_over_on']:.2f}x",
                  f"{r['on_of_copy_bw']:.0%}", f"{r['off_of_copy_bw']:.0%}",
                  "-".join(f"{x:.1f}" for x in r["copy_gb_s"]), f"{r['max_logit_diff']:.1e}",
                  "-".join(f"{x:.1f}" for x in r["load"]), *huge_cols(r)] for r in rows]))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if not k.endswith("steps_s")} for r in rows]}))


if __name__ == "__main__":
    main()
