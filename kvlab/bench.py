"""Prefill/decode benchmark: throughput, memory, measured vs calculated cache bytes, bandwidth use.

``run_bench(spec, contexts)`` builds or loads a model, prefills each context (random ids, chunked) into
a cache preallocated to ``context + decode_tokens``, decodes token by token, and returns one dict of
figures per context plus machine information. ``kv_dtypes`` runs it once per K/V cache format (a float dtype:
the model and its cache in that dtype; a quantized format such as ``int8``: the model in ``dtype``, its cache
quantized, kvlab/costs/quant.py). ``--vs transformers`` runs the same loop in transformers. ``device``: where the
model, its cache and the copy-bandwidth measurement run (``cpu``, ``cuda``...); on a GPU the harness waits for the
device (``torch.cuda.synchronize``) before reading the clock after each timed call — the decode step itself issues
no synchronisation — and device memory (``torch.cuda.max_memory_allocated``) is reported beside the RSS.
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from kvlab import hugepages
from kvlab import threads as threads_mod
from kvlab.compiled import CompiledStep, check_backend, graphs_compiled
from kvlab.config import ModelConfig
from kvlab.costs import costs
from kvlab.costs.quant import QuantError, quant_name, resolve_kv_quant
from kvlab.families import to_hf_config
from kvlab.layers import cpu_attend
from kvlab.loading import load
from kvlab.model import Model
from kvlab.models import resolve_file
from kvlab.native import native_checkpoint
from kvlab.preflight import check_memory
from kvlab.resolve import is_checkpoint, resolve_spec
from kvlab.shrink import scale_to_fit, weight_bytes
from kvlab.threads import chosen
from kvlab.units import fmt_bytes, fmt_context, fmt_count, fmt_rate, parse_dtype, table

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_WEIGHT_BUDGET = 4 * 1024**3  # bytes of weights a preset may take before it is scaled down
WARMUP = 16  # tokens of the untimed warm-up run


# -- measurements ------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 256 * 1024**2, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Memory bandwidth in bytes/s of ``device``: ``dst.copy_(src)`` of ``nbytes``, read + written, best of
    ``repeats``."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    wait = waiter(src.device)
    best = float("inf")
    for _ in range(repeats):
        wait()
        t0 = time.perf_counter()
        dst.copy_(src)
        wait()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def waiter(device: torch.device) -> Callable[[], None]:
    """What the harness calls before reading the clock: waits for ``device``'s queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextmanager
def device_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak device memory (``torch.cuda.max_memory_allocated``) over the block: ``start``, ``peak`` in bytes; empty
    on the CPU (the RSS sampler covers it)."""
    out: dict[str, int] = {}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out["start"] = torch.cuda.memory_allocated(device)
    try:
        yield out
    finally:
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage`` ru_maxrss; KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@contextmanager
def rss_sampler(interval: float = 0.002) -> Iterator[dict[str, int]]:
    """Samples RSS in a thread; yields a dict whose ``start`` and ``peak`` (bytes) are filled on exit."""
    proc = psutil.Process()
    out = {"start": proc.memory_info().rss, "peak": 0}
    out["peak"] = out["start"]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], proc.memory_info().rss)
            stop.wait(interval)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        out["peak"] = max(out["peak"], proc.memory_info().rss)


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    vm = psutil.virtual_memory()
    dev = torch.device(device)
    gpu = {"device_name": torch.cuda.get_device_name(dev), "device_memory_bytes":
           torch.cuda.get_device_properties(dev).total_memory, "cuda": torch.version.cuda} if dev.type == "cuda" else {}
    return {"device": str(dev), **gpu, "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "threads_chosen": _threads_line(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "huge_pages": hugepages.describe() if dev.type == "cpu" else None, "cpu_count": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_total_bytes": vm.total}


def _threads_line() -> str:
    plan = chosen()
    return plan.describe() if plan is not None and plan.threads == torch.get_num_threads() else "torch's own"


# -- the loops ---------------------------------------------------------------------------------------
Forward = Callable[[torch.Tensor, bool], torch.Tensor]  # (ids, last_only) -> logits: the prefill's calls
Step = Callable[[torch.Tensor], torch.Tensor]  # ids [B, 1] -> logits: one decode step


def _timed_loop(forward: Forward, ids: torch.Tensor, chunk: int, decode_tokens: int, desc: str, progress: bool
                ) -> dict[str, Any]:
    """Chunked prefill of ``ids`` then ``decode_tokens`` greedy steps through ``forward(ids, last_only)``."""
    return _timed_lanes([(forward, lambda x: forward(x, False), False)], ids, chunk, decode_tokens, desc,
                        progress)[0]


def _timed_lanes(lanes: list[tuple[Forward, Step, bool]], ids: torch.Tensor, chunk: int, decode_tokens: int,
                 desc: str, progress: bool) -> list[dict[str, Any]]:
    """Each lane ``(forward, step, first_apart)`` (its own cache) prefills ``ids`` in chunks through ``forward``,
    one lane after the other; then the lanes decode ``decode_tokens`` greedy tokens through ``step`` taking turns
    step by step, so that on a shared machine they meet the same load. ``first_apart``: the lane's first step (a
    compile) is reported as ``first_step_s`` and left out of its step statistics. ``ids`` lives on the models'
    device; on a GPU each timed call is waited for before the clock is read (:func:`waiter`)."""
    t = ids.shape[1]
    wait = waiter(ids.device)
    bar = tqdm(total=len(lanes) * (t + decode_tokens), desc=desc, unit="tok", file=sys.stderr,
               disable=not progress, leave=False)
    logits: list[torch.Tensor] = []
    prefill: list[float] = []
    for forward, _step, _first in lanes:
        wait()
        t0 = time.perf_counter()
        for s in range(0, t, chunk):
            out = forward(ids[:, s:s + chunk], True)
            bar.update(min(chunk, t - s))
        wait()
        prefill.append(time.perf_counter() - t0)
        logits.append(out)
    steps: list[list[float]] = [[] for _ in lanes]
    for _ in range(decode_tokens):
        for i, (_forward, step, _first) in enumerate(lanes):
            nxt = logits[i][:, -1].argmax(-1, keepdim=True)
            wait()
            t1 = time.perf_counter()
            logits[i] = step(nxt)
            wait()
            steps[i].append(time.perf_counter() - t1)
            bar.update(1)
    bar.close()
    rows = []
    for (_forward, _step, first_apart), pre, st in zip(lanes, prefill, steps):
        timed = st[1:] if first_apart and len(st) > 1 else st
        med = statistics.median(timed) if timed else float("nan")
        rows.append({"prefill_s": pre, "prefill_tok_s": ids.numel() / pre,
                     "decode_step_median_s": med, "decode_steps_s": st, "first_step_s": st[0] if st else None,
                     "decode_tok_s": ids.shape[0] / med if timed else float("nan"),
                     "decode_tok_s_mean": ids.shape[0] * len(timed) / sum(timed) if timed else float("nan")})
    return rows


def kv_formats(kv_dtypes: list[str] | None, dtype: str) -> list[tuple[str, str, str | None]]:
    """``--kv-dtype`` entries -> ``(label, model dtype, kv_quant or None)`` each: a float dtype (``fp32``,
    ``bf16``, ``fp16``) runs the model and its cache in it (a kvlab cache holds the model's dtype); a quantized
    format (``int8``, ``int4-g32``, ``fp8``, a preset...) runs the model in ``dtype`` with that cache. None: one
    run, the unquantized cache in ``dtype``. A bad entry is a ValueError naming it and what is allowed."""
    if not kv_dtypes:
        return [(dtype, dtype, None)]
    out = []
    for text in kv_dtypes:
        try:
            d = parse_dtype(text)
        except ValueError:
            d = None
        if d is not None:
            out.append((d, d, None))
            continue
        try:
            resolve_kv_quant(text)
        except QuantError as e:
            raise ValueError(f"--kv-dtype {text!r}: a float dtype (fp32, bf16, fp16) or a quantized format: {e}"
                             ) from None
        out.append((text, dtype, text))
    return out


def bench_kvlab(model: Any, contexts: list[int], decode_tokens: int, dtype: str, batch: int = 1,
                prefill_chunk: int = 512, seed: int = 0, bandwidth: float | None = None,
                progress: bool = True, kv_quant: str | None = None, compile: str | None = None,
                fused: bool = False) -> list[dict[str, Any]]:
    """Prefill + decode ``model`` at each context; figures per context (see the module docstring); ``kv_quant``:
    a quantized cache format (kvlab/costs/quant.py), priced with it. Each step is ``model.decode_step`` (the ids
    were checked on entry, as in ``generate``). ``compile``: a torch.compile backend (kvlab/compiled.py): each
    context then has two rows, eager and compiled (``compiled``), decoded in turns on two caches of the same
    size; the compiled row's first step (a compile, at a new cache size) is reported apart as ``first_step_s``,
    with ``compiles``, the graphs it compiled; the RSS figures are the pair's. On the CPU a quantized cache's int8 /
    int4 buffers are attended by the C++ kernel (kvlab/layers/cpu_attend.py; a row's ``cpp_kernel``), eager and
    compiled (a custom op in the graph); where it is unavailable (a GPU, no compiler) the compiled lane is made with
    ``fused=True`` (kvlab/layers/fused.py: one graph for the whole decode; the blocked compiled step compiles for
    minutes and runs several times slower, docs/performance.md). ``fused`` (a quantized ``kv_quant``): an eager lane
    on a cache made with ``fused=True`` (the torch.compile kernel) too, and the other compiled one (a row's
    ``fused`` says which), all decoded in turns; an eager fused lane's first step (its kernels' compiles) is
    reported apart too."""
    fused = bool(fused and kv_quant)
    last_only = "last_only" in inspect.signature(model.forward).parameters
    compiled = CompiledStep(model, compile) if compile else None
    eager = getattr(model, "decode_step", None)
    device = next(model.parameters()).device
    rows = []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # warm-up: first calls pay for allocator and kernel set-up
        n = max(1, min(WARMUP, model.config.max_positions - 2))
        warm = model.new_cache(batch, max_length=n + 2, kv_quant=kv_quant)
        _timed_loop(lambda x, _last, c=warm: model(x, cache=c), torch.zeros(batch, n, dtype=torch.long, device=device),
                    n, 2, "warm-up", False)
        del warm
    for ctx in contexts:
        # compiled: one spare position, so the last step does not write a buffer's last slot (a quantized buffer
        # traces that slot differently: one more graph, compiled inside the timed steps)
        max_length = ctx + decode_tokens + (1 if compile else 0)
        ids = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=gen).to(device)
        gc.collect()
        with torch.inference_mode(), rss_sampler() as mem, device_memory(device) as dmem:
            caches, lanes, kinds, graphs = [], [], [], [0] * 4  # graphs compiled by each lane's decode steps
            # lanes: eager (and fused with --fused); compiled: without the C++ kernel a quantized cache fused (its
            # blocked compiled step costs minutes of compiling and ~8x the step; docs/performance.md), the other
            # one too with --fused
            # the C++ kernel (kvlab/layers/cpu_attend.py) attends a plain quantized cache on the CPU: then the
            # compiled lane is that cache (the kernel a custom op in the graph) and --fused adds a fused one
            cpp = bool(kv_quant) and device.type == "cpu" and cpu_attend.available()
            pairs = [(eager, False)] + ([(eager, True)] if fused else [])
            if compiled:
                pairs += [(compiled, False)] if fused or not kv_quant or cpp else []  # plain caches: the only one
                pairs += [(compiled, True)] if kv_quant and (fused or not cpp) else []
            for step, fuse in pairs:
                cache = model.new_cache(batch, max_length=max_length, kv_quant=kv_quant, fused=fuse)

                def fwd(x: torch.Tensor, last: bool, cache: Any = cache) -> torch.Tensor:
                    return model(x, cache=cache, last_only=last) if last_only else model(x, cache=cache)

                def one(x: torch.Tensor, cache: Any = cache, fwd: Forward = fwd, step: Any = step,
                        lane: int = len(lanes), graphs: list[int] = graphs) -> torch.Tensor:
                    before = graphs_compiled()
                    out = step(x, cache) if step is not None else fwd(x, False)
                    graphs[lane] += graphs_compiled() - before
                    return out

                caches.append(cache)
                lanes.append((fwd, one, step is compiled or fuse))
                kinds.append((step is compiled, fuse, bool(kv_quant) and cpu_attend.takes(cache)))
            how = (" eager + compiled" if compiled else "") + (" (blocked + fused)" if fused else "")
            timed = _timed_lanes(lanes, ids, prefill_chunk, decode_tokens,
                                 f"kvlab {kv_quant or dtype}{how} {fmt_context(ctx)}", progress)
            measured = [c.nbytes() for c in caches]
            del lanes, caches
        for r, nbytes, (is_compiled, fuse, cpp), n_graphs in zip(timed, measured, kinds, graphs):
            r.update(compiled=is_compiled, backend=compile if is_compiled else None, fused=fuse, cpp_kernel=cpp,
                     compiles=n_graphs)
            rows.append(_figures(r, model.config, ctx, max_length, decode_tokens, dtype, batch, kv_quant, nbytes,
                                 mem, bandwidth, dmem))
    return rows


def _figures(r: dict[str, Any], cfg: ModelConfig, ctx: int, max_length: int, decode_tokens: int, dtype: str,
             batch: int, kv_quant: str | None, measured: int, mem: dict[str, int], bandwidth: float | None,
             dmem: dict[str, int] | None = None) -> dict[str, Any]:
    """A timed row completed with the cache bytes (measured and calculated), bytes read per step, bandwidth, RSS
    (and device memory on a GPU)."""
    c_alloc = costs(cfg, context=max_length, dtype=dtype, batch=batch, kv_quant=kv_quant)
    c_mid = costs(cfg, context=ctx + decode_tokens // 2, dtype=dtype, batch=batch, kv_quant=kv_quant)
    read = c_mid.weight_read_bytes_per_step + c_mid.kv_read_bytes_per_step
    r.update(context=ctx, max_length=max_length, batch=batch, dtype=dtype,
             kv_dtype=kv_quant or dtype, kv_quant=quant_name(resolve_kv_quant(kv_quant)),
             cache_bytes_measured=measured, cache_bytes_calculated=c_alloc.kv_cache_bytes,
             cache_bytes_match=measured == c_alloc.kv_cache_bytes,
             bytes_read_per_step=read, weight_read_bytes_per_step=c_mid.weight_read_bytes_per_step,
             kv_read_bytes_per_step=c_mid.kv_read_bytes_per_step,
             achieved_bandwidth=read / r["decode_step_median_s"],
             rss_start_bytes=mem["start"], rss_peak_bytes=mem["peak"],
             rss_delta_bytes=mem["peak"] - mem["start"], ru_maxrss_bytes=peak_rss_bytes())
    if dmem:
        r.update(_device_figures(dmem))
    if bandwidth:
        r["bandwidth_utilisation"] = r["achieved_bandwidth"] / bandwidth
    return r


def _device_figures(dmem: dict[str, int]) -> dict[str, int]:
    return {"device_mem_start_bytes": dmem["start"], "device_mem_peak_bytes": dmem["peak"],
            "device_mem_delta_bytes": dmem["peak"] - dmem["start"]}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ValueError("--vs transformers needs transformers: pip install transformers==5.23.0") from e
    return transformers


def bench_transformers(path: str | Path, contexts: list[int], decode_tokens: int, dtype: str, batch: int = 1,
                       prefill_chunk: int = 512, seed: int = 0, progress: bool = True,
                       device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """The same prefill + decode loop in transformers (``DynamicCache``, manual loop, inference mode)."""
    tf = _transformers()
    p = Path(path)
    # a GGUF file: transformers dequantises it itself (it needs the gguf package)
    where = (str(p.parent), {"gguf_file": p.name}) if p.is_file() and p.suffix.lower() == ".gguf" else (str(p), {})
    device = torch.device(device)
    hf = tf.AutoModelForCausalLM.from_pretrained(where[0], dtype=TORCH_DTYPES[dtype], **where[1]).to(device)
    hf.eval()
    vocab = hf.config.get_text_config(decoder=True).vocab_size
    rows = []
    gen = torch.Generator().manual_seed(seed)
    experts = None

    def warm_up() -> None:  # as for kvlab
        with torch.inference_mode():
            warm = tf.DynamicCache(config=hf.config)
            _timed_loop(lambda x, _last, c=warm: hf(input_ids=x, past_key_values=c, use_cache=True).logits,
                        torch.zeros(batch, WARMUP, dtype=torch.long, device=device), WARMUP, 2, "warm-up", False)

    try:
        warm_up()
    except RuntimeError as err:  # transformers' default grouped_mm experts fail on the CPU for some shapes
        if "stride" not in str(err):
            raise
        experts = "eager"
        hf = tf.AutoModelForCausalLM.from_pretrained(where[0], dtype=TORCH_DTYPES[dtype], experts_implementation=experts,
                                                     **where[1]).to(device)
        hf.eval()
        warm_up()
    for ctx in contexts:
        ids = torch.randint(0, vocab, (batch, ctx), generator=gen).to(device)
        gc.collect()
        with torch.inference_mode(), rss_sampler() as mem, device_memory(device) as dmem:
            cache = tf.DynamicCache(config=hf.config)

            def fwd(x: torch.Tensor, last: bool, cache: Any = cache) -> torch.Tensor:
                return hf(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1 if last else 0).logits

            r = _timed_loop(fwd, ids, prefill_chunk, decode_tokens, f"transformers {fmt_context(ctx)}", progress)
            held = sum(t.numel() * t.element_size() for layer in cache.layers
                       for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                       if isinstance(t, torch.Tensor))
            del fwd, cache
        if experts is not None:
            r["experts_implementation"] = experts  # the default (grouped_mm) failed for this shape
        r.update(context=ctx, batch=batch, cache_bytes_measured=held, rss_start_bytes=mem["start"],
                 rss_peak_bytes=mem["peak"], rss_delta_bytes=mem["peak"] - mem["start"],
                 ru_maxrss_bytes=peak_rss_bytes(), **(_device_figures(dmem) if dmem else {}))
        rows.append(r)
    return rows


def save_random_hf(cfg: ModelConfig, out: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised transformers checkpoint of ``cfg``'s shape to ``out``."""
    tf = _transformers()
    d = to_hf_config(cfg)
    model_type = d.pop("model_type")
    hf_cfg = tf.AutoConfig.for_model(model_type, **d)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.save_pretrained(str(out))
    del model
    gc.collect()
    return Path(out)


def _check_lengths(cfg: ModelConfig, contexts: list[int], decode_tokens: int) -> None:
    too_long = [c for c in contexts if c + decode_tokens > cfg.max_positions]
    if too_long:
        raise ValueError(f"context {fmt_context(too_long[0])} + {decode_tokens} decode tokens exceeds the "
                         f"model's max_positions={cfg.max_positions}")


# -- the whole run -----------------------------------------------------------------------------------
def run_bench(spec: str | Path | ModelConfig, contexts: list[int], decode_tokens: int = 32, dtype: str = "float32",
              threads: int | None = None, vs: str | None = None, batch: int = 1, prefill_chunk: int = 512,
              weight_budget: int = DEFAULT_WEIGHT_BUDGET, bandwidth_bytes: int = 256 * 1024**2,
              progress: bool = True, log: Callable[[str], None] | None = None,
              kv_dtypes: list[str] | None = None, compile: bool | str = False,
              device: str | torch.device = "cpu", fused: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns ``{"model", "config", "scaled", "results", "transformers", "ratios", ...}``.

    ``kv_dtypes``: one run per K/V cache format (:func:`kv_formats`), ``results`` holding a row per format and
    context (each names its ``kv_dtype``, ``kv_quant`` and model ``dtype``). ``compile``: each format is run
    eager, then with the decode step compiled (kvlab/compiled.py; a row's ``compiled`` says which), and
    ``compile_speedup`` pairs them. ``device``: where the models run (``cpu``, ``cuda``, ``cuda:N``). ``fused``: each
    quantized format's lanes also on a cache made with ``fused=True`` (kvlab/layers/fused.py), decoded in turns with
    the blocked ones; ``fused_speedup`` pairs them (a ValueError when no format is quantized)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    dtype = parse_dtype(dtype)
    if vs not in (None, "transformers"):
        raise ValueError(f"--vs {vs!r}: the only comparison is 'transformers'")
    formats = kv_formats(kv_dtypes, dtype)
    backend = check_backend(compile)
    if vs == "transformers" and formats != [(dtype, dtype, None)]:
        raise ValueError("--vs transformers compares the unquantized cache in --dtype: drop --kv-dtype")
    if fused and not any(q for _label, _d, q in formats):
        raise ValueError("--fused attends quantized caches: give a quantized --kv-dtype (int8, int4, ...)")
    if decode_tokens < 1 or batch < 1 or prefill_chunk < 1:
        raise ValueError("decode tokens, batch and prefill chunk must be positive integers")

    done = threads_mod.chosen()  # the CLI set --threads or the default already
    if threads is not None or done is None or done.threads != torch.get_num_threads():
        threads_mod.apply(threads)  # --threads, else the default from the CPUs left idle
    torch_dtype = TORCH_DTYPES[dtype]
    device = torch.device(device)
    checkpoint = is_checkpoint(spec)
    notes: list[str] = []
    tmp: tempfile.TemporaryDirectory | None = None
    try:
        if checkpoint:
            if vs == "transformers" and native_checkpoint(spec) is not None:
                raise ValueError(f"{spec}: a kvlab train checkpoint has no transformers counterpart; --vs transformers "
                                 "needs a transformers checkpoint directory, a .gguf file or a named model")
            check_memory(resolve_spec(spec), batch, max(contexts) + decode_tokens, torch_dtype, device, weights=True,
                         what=str(spec))
            log(f"loading {spec} ...")
            model = load(str(spec), dtype=torch_dtype, device=device)
            source_dir: Path | None = Path(resolve_file(spec))  # a named model: its GGUF file
        else:
            cfg = resolve_spec(spec)
            elt = torch.tensor([], dtype=torch_dtype).element_size()
            cfg, notes = scale_to_fit(cfg, weight_budget, elt)
            _check_lengths(cfg, contexts, decode_tokens)
            for n in notes:
                log(f"scaled: {n}")
            check_memory(cfg, batch, max(contexts) + decode_tokens, torch_dtype, device, weights=True)
            source_dir = None
            if vs == "transformers":
                tmp = tempfile.TemporaryDirectory(prefix="kvlab-bench-")
                save_random_hf(cfg, tmp.name)
                model = load(tmp.name, dtype=torch_dtype, device=device)
                model.config.name = cfg.name
                if model.num_parameters() != weight_bytes(cfg, 1):  # transformers read the twin's config otherwise
                    raise ValueError(f"{cfg.name}: the transformers twin has {model.num_parameters():,} parameters, "
                                     f"the description {weight_bytes(cfg, 1):,}: its config.json was misread")
                source_dir = Path(tmp.name)
            else:
                log(f"building a random {cfg.name} ...")
                model = Model.from_config(cfg, dtype=torch_dtype, device=device, seed=0)
        model.eval()
        cfg = model.config
        _check_lengths(cfg, contexts, decode_tokens)
        bw = copy_bandwidth(bandwidth_bytes, device=device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rows = []
        for _label, d, q in formats:
            if d != dtype:  # a float cache format: the model and its cache in that dtype (same weights, rounded)
                if checkpoint:
                    m = load(str(spec), dtype=TORCH_DTYPES[d], device=device)
                else:
                    m = Model.from_config(cfg, dtype=TORCH_DTYPES[d], device=device, seed=0)
                m.eval()
            else:
                m = model
            rows += bench_kvlab(m, contexts, decode_tokens, d, batch, prefill_chunk, bandwidth=bw,
                                progress=progress, kv_quant=q, compile=backend, fused=fused)
            del m
            gc.collect()
        result: dict[str, Any] = {
            "model": cfg.name, "source": str(spec) if not isinstance(spec, ModelConfig) else cfg.name,
            "checkpoint": checkpoint, "scaled": notes, "dtype": dtype, "batch": batch, "decode_tokens": decode_tokens,
            "prefill_chunk": prefill_chunk, "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weights, "copy_bandwidth_bytes_s": bw, "kv_dtypes": [f[0] for f in formats],
            "results": rows, "machine": machine_info(device), "compile": backend, "device": str(device),
        }
        if backend:
            result["compile_speedup"] = compile_speedup(rows)
        if fused:
            result["fused_speedup"] = fused_speedup(rows)
        del model
        gc.collect()
        if vs == "transformers":
            assert source_dir is not None
            hf_rows = bench_transformers(source_dir, contexts, decode_tokens, dtype, batch, prefill_chunk,
                                         progress=progress, device=device)
            result["transformers"] = hf_rows
            compiled = {x["context"]: x for x in rows if x["compiled"]}
            result["ratios"] = [{
                "context": a["context"],
                "decode_tok_s": a["decode_tok_s"] / b["decode_tok_s"],
                "prefill_tok_s": a["prefill_tok_s"] / b["prefill_tok_s"],
                "rss_delta": a["rss_delta_bytes"] / b["rss_delta_bytes"] if b["rss_delta_bytes"] else None,
                **({"device_mem_delta": a["device_mem_delta_bytes"] / b["device_mem_delta_bytes"]}
                   if b.get("device_mem_delta_bytes") else {}),
                "cache_bytes": a["cache_bytes_measured"] / b["cache_bytes_measured"]
                if b["cache_bytes_measured"] else None,
                **({"decode_tok_s_compiled": compiled[a["context"]]["decode_tok_s"] / b["decode_tok_s"]}
                   if a["context"] in compiled else {}),
            } for a, b in zip([x for x in rows if not x["compiled"]], hf_rows)]
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def compile_speedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Eager and compiled rows of the same cache format and context side by side: decode tok/s, bandwidth use,
    the compiled / eager ratio and the first compiled step (the compile)."""
    eager = {(x["kv_dtype"], x["context"], x.get("fused", False)): x for x in rows if not x["compiled"]}
    out = []
    for c in rows:
        e = eager.get((c["kv_dtype"], c["context"], c.get("fused", False))) or eager.get(
            (c["kv_dtype"], c["context"], False)) if c["compiled"] else None  # compiled fused vs eager blocked
        if e is None:
            continue
        out.append({"kv_dtype": c["kv_dtype"], "dtype": c["dtype"], "context": c["context"],
                    "fused": c.get("fused", False),
                    "eager_decode_tok_s": e["decode_tok_s"], "compiled_decode_tok_s": c["decode_tok_s"],
                    "speedup": c["decode_tok_s"] / e["decode_tok_s"],
                    "eager_bandwidth_utilisation": e.get("bandwidth_utilisation"),
                    "compiled_bandwidth_utilisation": c.get("bandwidth_utilisation"),
                    "first_step_s": c["first_step_s"], "compiles": c["compiles"]})
    return out


def fused_speedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Default and fused rows (``--fused``) of the same cache format, context and step (eager or compiled) side by
    side: decode tok/s, the fused / default ratio and the fused lane's first step (its compiles). The default lane
    (``blocked_decode_tok_s``, named before the C++ kernel) is the C++ kernel where its rows say ``cpp_kernel``."""
    blocked = {(x["kv_dtype"], x["context"], x["compiled"]): x for x in rows if not x.get("fused")}
    out = []
    for f in rows:
        b = blocked.get((f["kv_dtype"], f["context"], f["compiled"])) if f.get("fused") else None
        if b is None:
            continue
        out.append({"kv_dtype": f["kv_dtype"], "context": f["context"], "compiled": f["compiled"],
                    "blocked_decode_tok_s": b["decode_tok_s"], "fused_decode_tok_s": f["decode_tok_s"],
                    "speedup": f["decode_tok_s"] / b["decode_tok_s"], "first_step_s": f["first_step_s"],
                    "compiles": f["compiles"]})
    return out


def format_card(r: dict[str, Any]) -> str:
    """A readable card of a :func:`run_bench` result."""
    m = r["machine"]
    lines = [(f"kvlab bench: {r['model']}  ({fmt_count(r['params'])} params, {fmt_bytes(r['weight_bytes'])} "
              f"{r['dtype']} weights, batch {r['batch']}, {r['decode_tokens']} decode tokens, "
              f"prefill chunk {r['prefill_chunk']})"),
             (f"machine: {m.get('device_name', m.get('device', 'cpu'))}, "
              f"torch {m['torch']}, {m.get('threads_chosen') or str(m['threads']) + ' threads'}, "
              f"{m['cpu_count']} CPUs, OMP_WAIT_POLICY {m.get('omp_wait_policy') or 'unset'}, "
              + (f"huge pages {m['huge_pages']}, " if m.get("huge_pages") else "") +
              f"copy bandwidth {fmt_rate(r['copy_bandwidth_bytes_s'], 'B/s')}")]
    for n in r["scaled"]:
        lines.append(f"scaled: {n}")
    gpu = any("device_mem_delta_bytes" in x for x in r["results"])  # on a GPU: device memory, not RSS
    mem_added, mem_peak = ("device_mem_delta_bytes", "device_mem_peak_bytes") if gpu else ("rss_delta_bytes",
                                                                                           "ru_maxrss_bytes")
    rows = []
    for x in r["results"]:
        step = ("compiled" if x.get("compiled") else "eager") + (" fused" if x.get("fused") else "") + (
            f" (+{x['first_step_s']:.1f} s)" if x.get("compiles") else "")
        rows.append([x.get("kv_dtype", r["dtype"]), x.get("dtype", r["dtype"]), fmt_context(x["context"]), step,
                     f"{x['prefill_tok_s']:.1f}", f"{x['decode_tok_s']:.2f}",
                     f"{x['decode_step_median_s'] * 1e3:.2f}", fmt_bytes(x["cache_bytes_measured"]),
                     fmt_bytes(x["cache_bytes_calculated"]), "yes" if x["cache_bytes_match"] else "NO",
                     fmt_rate(x["achieved_bandwidth"], "B/s"),
                     f"{100 * x.get('bandwidth_utilisation', float('nan')):.0f}%",
                     fmt_bytes(x[mem_added]), fmt_bytes(x[mem_peak])])
    lines += ["", table(["KV cache", "model", "context", "decode step", "prefill tok/s", "decode tok/s", "step ms (median)", "cache measured",
                         "cache calculated", "equal", "bytes/step / step", "of copy bw",
                         "GPU mem added" if gpu else "RSS added", "peak GPU mem" if gpu else "peak RSS"], rows)]
    if r.get("compile_speedup"):
        sp = [[q["kv_dtype"] + (" fused" if q.get("fused") else ""), fmt_context(q["context"]),
               f"{q['eager_decode_tok_s']:.2f}",
               f"{q['compiled_decode_tok_s']:.2f}", f"{q['speedup']:.2f}x",
               f"{100 * (q['eager_bandwidth_utilisation'] or float('nan')):.0f}%",
               f"{100 * (q['compiled_bandwidth_utilisation'] or float('nan')):.0f}%",
               f"{q['first_step_s']:.1f} s", str(q["compiles"])] for q in r["compile_speedup"]]
        lines += ["", f"eager and compiled decode (torch.compile, {r['compile']}), same run:",
                  table(["KV cache", "context", "eager tok/s", "compiled tok/s", "compiled/eager", "eager of copy bw",
                         "compiled of copy bw", "first compiled step", "graphs compiled"], sp)]
    if r.get("fused_speedup"):
        fs = [[q["kv_dtype"], fmt_context(q["context"]), "compiled" if q["compiled"] else "eager",
               f"{q['blocked_decode_tok_s']:.2f}", f"{q['fused_decode_tok_s']:.2f}", f"{q['speedup']:.2f}x",
               f"{q['first_step_s']:.1f} s", str(q["compiles"])] for q in r["fused_speedup"]]
        lines += ["", ("quantized attention by default (the C++ kernel where it applies, else block by block) and "
                       "fused (torch.compile, kvlab/layers/fused.py), same run:"),
                  table(["KV cache", "context", "decode step", "default tok/s", "fused tok/s", "fused/default",
                         "first fused step", "graphs compiled"], fs)]
    if "transformers" in r:
        hf_rows = []
        ratio = "device_mem_delta" if gpu else "rss_delta"
        for b, q in zip(r["transformers"], r["ratios"]):
            hf_rows.append([fmt_context(q["context"]), f"{b['prefill_tok_s']:.1f}", f"{b['decode_tok_s']:.2f}",
                            fmt_bytes(b["cache_bytes_measured"]), fmt_bytes(b.get(mem_added, b["rss_delta_bytes"])),
                            f"{q['prefill_tok_s']:.2f}x", f"{q['decode_tok_s']:.2f}x",
                            "-" if q.get(ratio) is None else f"{q[ratio]:.2f}x"]
                           + ([f"{q['decode_tok_s_compiled']:.2f}x"] if "decode_tok_s_compiled" in q else []))
        lines += ["", "transformers (same loop, DynamicCache) and kvlab/transformers ratios:",
                  table(["context", "prefill tok/s", "decode tok/s", "cache held",
                         "GPU mem added" if gpu else "RSS added", "prefill ratio", "decode ratio",
                         "GPU mem ratio" if gpu else "RSS ratio"]
                        + (["compiled decode ratio"] if r.get("compile") else []), hf_rows)]
    lines += ["", ("KV cache = the cache's format (a float dtype: the model and cache in it; a quantized format: "
                   "codes + scales, residual in the model's dtype); model = weights' dtype. "
                   "bytes/step = calculated weight + K/V bytes read by one decode step at the middle of the decode;"
                   " of copy bw = that / median step / measured copy_ bandwidth (read + write)."
                   " RSS added = peak RSS during the run minus RSS before it (sampled every 2 ms); on a GPU, GPU mem"
                   " added = peak torch.cuda.max_memory_allocated minus what was allocated before, and the clock is"
                   " read after torch.cuda.synchronize (the harness's, not the step's)."
                   " decode step: eager, or compiled (+ the first step's seconds when it compiled a graph: at a new"
                   " cache size; that step is left out of the median); a context's eager and compiled steps run in"
                   " turns, on two caches (so they meet the same load; RSS figures are the pair's). On the CPU a"
                   " quantized cache's int8/int4 codes are attended by kvlab's C++ kernel (JSON: cpp_kernel), eager"
                   " and compiled; fused: the cache made with fused=True (the codes attended by one torch.compile"
                   " kernel; its first step, the kernels' compiles, left out of the median), the compiled lane of a"
                   " quantized cache where the C++ kernel is unavailable.")]
    return "\n".join(lines)
