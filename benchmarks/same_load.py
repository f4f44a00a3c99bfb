"""Issue 17's targets under one load: kvlab eager, kvlab compiled and transformers decode in turns (outside CI).

``kvlab bench --vs transformers --compile`` runs transformers' loop after kvlab's, minutes later, so on a shared
machine its kvlab / transformers ratio carries the load's swings. Here, per benchmark shape (``benchmarks/*.json``,
random weights scaled as ``kvlab bench`` scales them, one transformers checkpoint loaded by both) and context (each
record with its ground: command, commit, UTC and load, as benchmarks/roofline.py's, whose ``--add-same-load`` plots
it beside the roofline's runs):

1. after a 16-token warm-up forward of each engine (so neither prefill pays the process's first-call costs), kvlab
   prefills the context (chunks of 512, eager), timed, peak RSS over the prefill; its cache is copied for the
   compiled lane (the same state, no second prefill); transformers prefills the same ids, timed, peak RSS;
2. the copy bandwidth is measured; then three lanes decode ``--decode-tokens`` greedy tokens taking turns step by
   step: kvlab eager (``Model.decode_step``), kvlab compiled (kvlab/compiled.py, inductor; its first step, the
   compile, reported apart), transformers (``DynamicCache``); the copy bandwidth is measured again after;
3. each lane's step is profiled (torch.profiler, ``--profile-steps`` steps): self CPU time by operator, split into
   weight matmuls (``aten::mm`` / ``addmm``), attention (SDPA, ``bmm``) and the rest.

``SHAPE:CONTEXT:fp32+bf16`` builds both dtypes of the same checkpoint and decodes all six lanes in turns (fp32's
then bf16's, each step), so the bf16 / fp32 ratio shares one load too (a table of its own; each dtype's record says
``interleaved``); with ``--tf-bf16-cache cast`` transformers' bf16 lane decodes from its fp32 lane's prefilled
cache cast to bf16 instead of a bf16 prefill of its own (on a CPU without native bf16 that prefill takes minutes at
16K; the decode step it times reads the same bytes), its prefill columns then empty. Bytes read per step and the bandwidth share are the calculator's (kvlab/costs), as in
``kvlab bench``. The load average is recorded around every part. The JSON (``--out``) is rewritten after each
shape; ``--budget-min`` stops before a shape that would start past it (the skipped ones are listed).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/same_load.py benchmarks/qwen3-100m.json:16k \\
        benchmarks/qwen3-100m.json:4k:fp32+bf16 benchmarks/laguna-small.json:16k:eager --out same_load.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/same_load.py --table same_load.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.roofline import ground

DTYPE_FLAGS = {"bf16": ["bfloat16"], "fp32+bf16": ["float32", "bfloat16"]}  # else fp32 alone


def _load() -> float:
    return os.getloadavg()[0]


def _breakdown(prof: Any, steps: int, top: int = 10) -> dict[str, Any]:
    ev = {e.key: e.self_cpu_time_total / steps / 1e6 for e in prof.key_averages()}  # seconds per step
    total = sum(ev.values())
    mm = sum(ev.get(k, 0.0) for k in ("aten::mm", "aten::addmm"))
    attn = sum(v for k, v in ev.items() if "scaled_dot_product" in k or k == "aten::bmm")
    return {"step_s": total, "weight_mm_s": mm, "attention_s": attn, "rest_s": total - mm - attn,
            "top": sorted(([k, v] for k, v in ev.items()), key=lambda kv: -kv[1])[:top]}


def _profile(step: Any, logits: torch.Tensor, steps: int) -> tuple[dict[str, Any], torch.Tensor]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            logits = step(logits[:, -1].argmax(-1, keepdim=True))
    return _breakdown(prof, steps), logits


def _models(cfg: Any, tmp: str, td: torch.dtype, out: dict[str, Any]) -> tuple[Any, Any]:
    """kvlab's and transformers' model of the checkpoint in ``tmp`` in dtype ``td``, warmed up as kvlab bench does."""
    import transformers as tf

    from kvlab.bench import WARMUP
    from kvlab.loading import load

    model = load(tmp, dtype=td, device="cpu").eval()
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=td).eval()
    warm = torch.zeros(1, WARMUP, dtype=torch.long)
    with torch.inference_mode():  # warm-up, as kvlab bench: allocator and kernel set-up
        c = model.new_cache(1, max_length=WARMUP + 2)
        model(warm, cache=c)
        try:
            hf(input_ids=warm, past_key_values=tf.DynamicCache(config=hf.config), use_cache=True)
        except RuntimeError as err:  # transformers' grouped_mm experts fail on the CPU for some shapes
            if "stride" not in str(err):
                raise
            hf = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=td, experts_implementation="eager").eval()
            out["transformers_experts"] = "eager"
            hf(input_ids=warm, past_key_values=tf.DynamicCache(config=hf.config), use_cache=True)
    return model, hf


def cast_cache(cache: Any, dtype: torch.dtype) -> Any:
    """A copy of a transformers cache whose floating tensors (K/V, compressor buffers: attributes of its layers,
    in dicts or lists too) are ``dtype``; tensors that were one object (``values is keys``) stay one."""
    memo: dict[int, Any] = {}

    def cast(x: Any) -> Any:
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, torch.Tensor):
            y = x.to(dtype) if x.is_floating_point() else x
        elif isinstance(x, dict):
            y = {k: cast(v) for k, v in x.items()}
        elif isinstance(x, (list, tuple)):
            y = type(x)(cast(v) for v in x)
        else:
            return x
        memo[id(x)] = y
        return y

    out = copy.deepcopy(cache)
    for layer in out.layers:
        for name, value in vars(layer).items():
            setattr(layer, name, cast(value))
        if hasattr(layer, "dtype"):
            layer.dtype = dtype
    return out


def run_shape(shape: Path, ctx: int, decode_tokens: int, dtypes: list[str], profile_steps: int,
              compile: bool = True, tf_bf16_cache: str = "prefill") -> list[dict[str, Any]]:
    """One record per dtype; with several dtypes (fp32 and bf16) every lane of every dtype decodes in turns, so
    their ratios share one load (each record then names the others in ``interleaved``). ``tf_bf16_cache="cast"``:
    transformers' bf16 lane decodes from its fp32 lane's prefilled cache cast to bf16 (its bf16 prefill not run)."""
    import transformers as tf

    from kvlab.bench import TORCH_DTYPES, copy_bandwidth, rss_sampler, save_random_hf
    from kvlab.compiled import CompiledStep
    from kvlab.costs import costs
    from kvlab.resolve import resolve_spec
    from kvlab.shrink import scale_to_fit

    cfg, notes = scale_to_fit(resolve_spec(str(shape)))
    recs: dict[str, dict[str, Any]] = {}
    for dtype in dtypes:
        recs[dtype] = {"shape": shape.stem, "context": ctx, "dtype": dtype, "decode_tokens": decode_tokens,
                       "threads": torch.get_num_threads(), "scaled": notes, "load": {"start": _load()}}
        if len(dtypes) > 1:
            recs[dtype]["interleaved"] = list(dtypes)
    with tempfile.TemporaryDirectory(prefix="same-load-") as tmp:
        save_random_hf(cfg, tmp)  # one checkpoint: every dtype's models hold the same weights
        models = {dtype: _models(cfg, tmp, TORCH_DTYPES[dtype], recs[dtype]) for dtype in dtypes}
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    spare = decode_tokens + 2 * profile_steps + 2
    lanes: dict[tuple[str, str], Any] = {}  # (dtype, lane) -> step(ids [1, 1]) -> logits
    logits: dict[tuple[str, str], torch.Tensor] = {}
    compiled: dict[str, Any] = {}
    fp32_tf: tuple[Any, torch.Tensor] | None = None  # transformers' fp32 cache and logits, for tf_bf16_cache="cast"
    with torch.inference_mode():
        for dtype, (model, hf) in models.items():
            out = recs[dtype]
            model(ids[:, :16], cache=model.new_cache(1, max_length=16), last_only=True)  # warm-up (as transformers')
            hf(input_ids=ids[:, :16], past_key_values=tf.DynamicCache(config=hf.config), use_cache=True,
               logits_to_keep=1)
            gc.collect()
            with rss_sampler() as mem:
                cache = model.new_cache(1, max_length=ctx + spare)
                t0 = time.perf_counter()
                for s in range(0, ctx, 512):
                    k_logits = model(ids[:, s:s + 512], cache=cache, last_only=True)
                k_pre = time.perf_counter() - t0
            out["kvlab_prefill"] = {"s": k_pre, "tok_s": ctx / k_pre, "rss_delta": mem["peak"] - mem["start"]}
            out["load"]["after_kvlab_prefill"] = _load()
            other = copy.deepcopy(cache) if compile else None
            gc.collect()
            if dtype == "bfloat16" and tf_bf16_cache == "cast":  # the fp32 lane prefilled first (DTYPE_FLAGS order)
                hcache, h_logits = cast_cache(fp32_tf[0], torch.bfloat16), fp32_tf[1].to(torch.bfloat16)
                out["transformers_prefill"] = None
                out["transformers_cache"] = "its fp32 prefill cast to bf16"
            else:
                with rss_sampler() as mem:
                    hcache = tf.DynamicCache(config=hf.config)
                    t0 = time.perf_counter()
                    for s in range(0, ctx, 512):
                        h_logits = hf(input_ids=ids[:, s:s + 512], past_key_values=hcache, use_cache=True,
                                      logits_to_keep=1).logits
                    h_pre = time.perf_counter() - t0
                out["transformers_prefill"] = {"s": h_pre, "tok_s": ctx / h_pre,
                                               "rss_delta": mem["peak"] - mem["start"]}
            out["load"]["after_prefills"] = _load()
            if dtype == "float32":
                fp32_tf = (hcache, h_logits)
            lanes[dtype, "eager"] = lambda x, m=model, c=cache: m.decode_step(x, c)
            if compile:
                compiled[dtype] = CompiledStep(model, "inductor")
                lanes[dtype, "compiled"] = lambda x, f=compiled[dtype], c=other: f(x, c)
            lanes[dtype, "transformers"] = (lambda x, h=hf, c=hcache:
                                            h(input_ids=x, past_key_values=c, use_cache=True).logits)
            logits.update({(dtype, "eager"): k_logits, (dtype, "compiled"): k_logits,
                           (dtype, "transformers"): h_logits})
        times: dict[tuple[str, str], list[float]] = {k: [] for k in lanes}
        bw_before = copy_bandwidth()
        for _ in range(decode_tokens):
            for key, step in lanes.items():
                nxt = logits[key][:, -1].argmax(-1, keepdim=True)
                t1 = time.perf_counter()
                logits[key] = step(nxt)
                times[key].append(time.perf_counter() - t1)
        bw_after, after_decode = copy_bandwidth(), _load()
        for dtype, out in recs.items():
            out.update(copy_bandwidth_before=bw_before, copy_bandwidth_after=bw_after)
            out["load"]["after_decode"] = after_decode
            c = costs(cfg, context=ctx + decode_tokens // 2, dtype=dtype)
            read = c.weight_read_bytes_per_step + c.kv_read_bytes_per_step
            step = compiled.get(dtype)
            out.update(weight_read_bytes_per_step=c.weight_read_bytes_per_step,
                       kv_read_bytes_per_step=c.kv_read_bytes_per_step,
                       compiles=step.compiles if step else None,
                       first_compiled_step_s=times[dtype, "compiled"][0] if step else None)
            for (dt, name), st in times.items():
                if dt != dtype:
                    continue
                timed = st[1:] if name == "compiled" else st
                med = statistics.median(timed)
                out[name] = {"steps_s": st, "median_s": med, "tok_s": 1 / med}
                if name != "transformers":
                    out[name]["achieved_bandwidth"] = read / med
        if profile_steps:
            for (dtype, name), step in lanes.items():
                recs[dtype][name]["profile"], logits[dtype, name] = _profile(step, logits[dtype, name],
                                                                             profile_steps)
            after_profile = _load()
            for out in recs.values():
                out["load"]["after_profile"] = after_profile
    return list(recs.values())  # the models and caches go with this frame


def table(data: dict[str, Any]) -> str:
    """Markdown: one line per shape, dtype and context."""
    lines = [("| shape | dtype | context | kvlab eager tok/s | kvlab compiled tok/s | transformers tok/s | "
              "eager / tf | compiled / tf | compiled / eager | eager of copy bw | compiled of copy bw | "
              "prefill kvlab / tf tok/s | prefill peak RSS kvlab / tf | first compiled step | load |"),
             "|" + "---|" * 15]
    for r in data["runs"]:
        bw = min(r["copy_bandwidth_before"], r["copy_bandwidth_after"])
        e, c, h = r["eager"], r.get("compiled"), r["transformers"]
        kp, hp = r["kvlab_prefill"], r["transformers_prefill"]
        pre = (f"{kp['tok_s']:.0f} / {hp['tok_s']:.0f} ({kp['tok_s'] / hp['tok_s']:.2f}x) | "
               f"{kp['rss_delta'] / 2**20:.0f} / {hp['rss_delta'] / 2**20:.0f} MiB" if hp else
               f"{kp['tok_s']:.0f} / - (tf cache cast) | {kp['rss_delta'] / 2**20:.0f} / - MiB")
        loads = list(r["load"].values())

        def rate(x):
            return f"{x['tok_s']:.2f}" if x else "-"

        def ratio(a, b):
            return f"{a['tok_s'] / b['tok_s']:.2f}x" if a and b else "-"

        def share(x, bw=bw):
            return f"{100 * x['achieved_bandwidth'] / bw:.0f}%" if x else "-"

        first = f"{r['first_compiled_step_s']:.0f} s" if c else "-"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['context']} | {rate(e)} | {rate(c)} | {rate(h)} | {ratio(e, h)} | "
            f"{ratio(c, h)} | {ratio(c, e)} | {share(e)} | {share(c)} | {pre} | {first} | "
            f"{min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def profile_table(data: dict[str, Any]) -> str:
    lines = [("| shape | dtype | context | lane | step ms | weight matmuls | attention (SDPA, bmm) | the rest | "
              "top operators (ms per step) |"), "|" + "---|" * 9]
    for r in data["runs"]:
        for lane in ("eager", "compiled", "transformers"):
            p = r.get(lane, {}).get("profile")
            if not p:
                continue
            t = p["step_s"]
            top = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in p["top"][:5])
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['context']} | {lane} | {1e3 * t:.1f} | "
                         f"{100 * p['weight_mm_s'] / t:.0f}% | {100 * p['attention_s'] / t:.0f}% | "
                         f"{100 * p['rest_s'] / t:.0f}% | {top} |")
    return "\n".join(lines)


def dtype_table(data: dict[str, Any]) -> str:
    """Markdown: bf16 against fp32 per lane, for the shapes whose dtypes decoded in turns (``SHAPE:CTX:fp32+bf16``)."""
    lines = ["| shape | context | lane | fp32 tok/s | bf16 tok/s | bf16 / fp32 | bf16 of copy bw | fp32 of copy bw |",
             "|" + "---|" * 8]
    pairs: dict[tuple[str, int], dict[str, Any]] = {}
    for r in data["runs"]:
        if "interleaved" in r:
            pairs.setdefault((r["shape"], r["context"]), {})[r["dtype"]] = r
    for (shape, ctx), by in pairs.items():
        f, b = by.get("float32"), by.get("bfloat16")
        if not (f and b):
            continue
        bw = min(f["copy_bandwidth_before"], f["copy_bandwidth_after"])
        for lane in ("eager", "compiled", "transformers"):
            if lane not in f or lane not in b:
                continue
            share = [f"{100 * x['achieved_bandwidth'] / bw:.0f}%" if "achieved_bandwidth" in x else "-"
                     for x in (b[lane], f[lane])]
            lines.append(f"| {shape} | {ctx} | {lane} | {f[lane]['tok_s']:.2f} | {b[lane]['tok_s']:.2f} | "
                         f"{b[lane]['tok_s'] / f[lane]['tok_s']:.2f}x | {share[0]} | {share[1]} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def parse_run(run: str) -> tuple[Path, int, list[str], bool]:
    """``SHAPE:CONTEXT[:bf16|:fp32+bf16][:eager]`` -> (shape, context, dtypes, compiled lane)."""
    from kvlab.units import parse_contexts

    shape, ctx, *flags = run.split(":")
    bad = [f for f in flags if f not in DTYPE_FLAGS and f != "eager"]
    if bad:
        raise ValueError(f"{run}: {bad[0]!r} is not one of {sorted(DTYPE_FLAGS)} or eager")
    dtypes = [DTYPE_FLAGS[f] for f in flags if f in DTYPE_FLAGS]
    if len(dtypes) > 1:
        raise ValueError(f"{run}: give one of {sorted(DTYPE_FLAGS)}, not several")
    return Path(shape), parse_contexts(ctx)[0], dtypes[0] if dtypes else ["float32"], "eager" not in flags


def report(data: dict[str, Any]) -> str:
    """The run's tables: per shape, bf16 against fp32 (interleaved shapes only), the profiles."""
    return "\n\n".join(t for t in (table(data), dtype_table(data), profile_table(data)) if t)


def main(argv: list[str] | None = None) -> int:
    from kvlab import threads as threads_mod

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="SHAPE:CONTEXT[:bf16|:fp32+bf16][:eager]",
                    help="one run each, in this order: a benchmark JSON, a context (16k), bf16 (else fp32; "
                         "fp32+bf16: both, their lanes in turns), eager (no compiled lane)")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--budget-min", type=float, default=30.0, help="start no run after this many minutes")
    ap.add_argument("--out", type=Path, default=Path("same_load.json"))
    ap.add_argument("--tf-bf16-cache", choices=("prefill", "cast"), default="prefill",
                    help="with fp32+bf16: transformers' bf16 lane prefills in bf16 (timed), or decodes from its fp32 "
                         "lane's cache cast to bf16 (no bf16 transformers prefill: minutes at 16K on a CPU without "
                         "native bf16)")
    ap.add_argument("--table", action="store_true", help="the runs are one JSON of a finished run: print its tables")
    args = ap.parse_args(argv)
    if args.table:
        data = json.loads(Path(args.runs[0]).read_text())
        print(report(data))
        return 0
    threads_mod.apply(args.threads)
    try:
        plan = [parse_run(run) for run in args.runs]
    except ValueError as err:
        ap.error(str(err))
    if args.tf_bf16_cache == "cast" and any(dtypes != ["float32", "bfloat16"] for _, _, dtypes, _ in plan):
        ap.error("--tf-bf16-cache cast casts the fp32 lane's cache: give every run as SHAPE:CONTEXT:fp32+bf16")
    data: dict[str, Any] = {"runs": [], "skipped": [], "threads": torch.get_num_threads(),
                            "command": " ".join(sys.argv)}
    t0 = time.time()
    for shape, ctx, dtypes, compile in plan:
        dtype = "+".join(dtypes)
        if time.time() - t0 > 60 * args.budget_min:
            data["skipped"].append(f"{shape.stem} {dtype} {ctx}")
            continue
        print(f"{shape.stem} {dtype} {ctx} (load {_load():.1f}, {time.time() - t0:.0f} s in) ...", file=sys.stderr,
              flush=True)
        try:
            start = ground()
            runs = run_shape(shape, ctx, args.decode_tokens, dtypes, args.profile_steps, compile, args.tf_bf16_cache)
            data["runs"] += [{**r, "ground": ground(start)} for r in runs]
        except Exception as err:  # noqa: BLE001 - a failed shape is recorded, the others still run
            data["failed"] = data.get("failed", []) + [f"{shape.stem} {dtype} {ctx}: {type(err).__name__}: {err}"]
            print(data["failed"][-1], file=sys.stderr, flush=True)
            continue
        finally:
            gc.collect()
        data["wall_s"] = time.time() - t0
        args.out.write_text(json.dumps(data, indent=1))
        print("\n".join(table({"runs": data["runs"][-len(dtypes):]}).splitlines()[2:]), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(report(data))
    for f in data.get("failed", []):
        print(f"failed: {f}")
    if data["skipped"]:
        print("skipped (budget): " + ", ".join(data["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
