"""A compiled decode step: ``Model.decode_step`` through ``torch.compile``, traced once per model.

The step reads nothing back to the host (tests/test_compile.py), so it compiles as one graph (``fullgraph``).
The cache is preallocated (``max_length``), so its tensors keep their shapes; the one thing that changes per step
is the number of positions written (``cache.seq_len``, a Python int), traced as a symbol
(``torch.compiler.config.dynamic_sources``) instead of a constant: decoding N tokens compiles once, not N times.
More graphs only where the step's Python branches (docs/performance.md): a new cache size, a window ring before
and after it first wraps, a CSA/HCA compressor's regime, a quantized cache's number of decode blocks; never one
per step. The backend is inductor (C++ kernels on the CPU, Triton on CUDA). Not CUDA graphs
(``mode="reduce-overhead"``): torch records one CUDA graph per value of the graph's int inputs
(torch/_inductor/cudagraph_trees.py), so with the position count an int it would record one per step; CUDA
graphs need the position as a device tensor (not done; no GPU here to measure it).
"""

from __future__ import annotations

import functools
import time
import types
from typing import Any

import torch
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental import proxy_tensor
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from kvlab.cache.storage import positions
from kvlab.layers import bf16_kernel, compressed_kernel, cpu_attend, dense_attend, f32_kernel, mhc_kernel, moe_kernel
from kvlab.model import Model

SEQ_LEN = "L['cache'].seq_len"  # the decode step's argument ``cache``, its attribute ``seq_len``
DEFAULT_BACKEND = "inductor"  # what compile=True means (tests set "eager": the same trace, no code generation)
RECOMPILE_LIMIT = 32  # graphs per model: one per cache size and window regime, never one per step
BACKENDS = ("inductor", "aot_eager", "eager")  # eager / aot_eager: the trace without code generation (tests)


class _NoContiguityQuery:
    """While a step compiles: AOT autograd's trace (make_fx ``set_meta``) does not record whether each graph tensor
    is contiguous (``tensor_meta.memory_format``; inductor reads the fake tensor ``val``, not that). Asked of a view
    ``[.., n, ..]`` of a cache buffer ``[.., cap, ..]`` with ``n`` the position symbol, the question added the guard
    ``n != cap`` (the view is contiguous exactly at ``n = cap``, with more than one batch row or head before the
    position axis), so the step that filled a buffer's last slot compiled once more; and ``n != 1``."""

    quiet = functools.partial(_extract_tensor_metadata, include_contiguity=False)

    def __enter__(self) -> None:
        proxy_tensor._extract_tensor_metadata = self.quiet

    def __exit__(self, *exc: object) -> None:
        proxy_tensor._extract_tensor_metadata = _extract_tensor_metadata


class CompileError(ValueError):
    """A compiled decode step was asked for with something it does not support, or torch.compile failed."""


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (``torch._dynamo`` counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_backend(compile: bool | str) -> str | None:
    """``compile`` as given to ``generate`` / the benchmark -> the backend name (None: eager, not compiled)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return DEFAULT_BACKEND
    if isinstance(compile, str) and compile in BACKENDS:
        return compile
    raise CompileError(f"compile={compile!r}: give True (inductor), False, or a backend name in {list(BACKENDS)}")


class CompiledStep:
    """``step(ids [B, 1], cache) -> logits [B, 1, vocab]``: ``model.decode_step`` compiled.

    ``first_call_s``: wall time of the first call (trace + compile + one step); ``compiles``: graphs compiled
    by this step's calls so far (1 for a decode that never crosses a window's wrap-around)."""

    def __init__(self, model: Any, backend: str = "inductor") -> None:
        device = next(model.parameters()).device
        # a fresh code object per model: torch.compile keeps its graphs (and its limit of 8 recompiles) per code
        # object, so models compiled in one process (fp32 and bf16, or one per test) do not share one budget
        fn = Model.decode_step
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
        self.backend, self.device = backend, device
        self.dtypes = {p.dtype for p in model.parameters()}  # its products may take the bf16 / float32 kernel
        layers = model.config.layers
        self.kernels = tuple(k for k, used in (  # what the step's blocks may call besides attention and products
            (moe_kernel, any(s.moe is not None for s in layers)),  # a batch-1 step: the MoE kernel
            (mhc_kernel, model.config.mhc_streams is not None),  # hyper-connections' reads and writes
            (compressed_kernel, any(s.compress is not None for s in layers))) if used)  # CSA / HCA / SWA
        self._fn = torch.compile(types.MethodType(fresh, model), backend=backend, fullgraph=True)
        self.first_call_s: float | None = None
        self.compiles = 0

    def __call__(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        if cache.max_length:  # the shared position vector (kvlab/cache/storage.py) grown for the whole cache now:
            positions(cache.max_length + 1, ids.device)  # its growth mid-decode would change a traced tensor
        if ids.device.type == "cpu":
            _load_kernels(cache, self.dtypes, self.kernels)  # before the trace reads whether they are loaded
        before = graphs_compiled()
        t0 = time.perf_counter() if self.first_call_s is None else 0.0
        try:
            # the position count is a symbol from the first trace on (else: a constant, then a second compile);
            # no duck sizing: a count that happens to equal a buffer's size must not become a guard
            with torch.compiler.config.patch(dynamic_sources=SEQ_LEN), fx_config.patch(use_duck_shape=False), \
                    torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), _NoContiguityQuery():
                out = self._fn(ids, cache)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise  # the model's own error (a ValueError naming the input) as eager raises it
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CompileError(f"torch.compile ({self.backend}) failed on the decode step: {type(e).__name__}: "
                               f"{first} (run without compile)") from e
        self.compiles += graphs_compiled() - before
        if self.first_call_s is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once, for the compile time; no sync in the steps after
            self.first_call_s = time.perf_counter() - t0
        return out


def _load_kernels(cache: Any, dtypes: set[torch.dtype], kernels: tuple = ()) -> None:
    """The C++ kernels a CPU decode step over ``cache`` may call, built and loaded (once; then an attribute read) before
    the trace reads whether they are (a trace neither builds nor loads one): the quantized attention (a ``kv_quant``
    cache), the plain one (kvlab/layers/dense_attend.py) and the products of the weights' ``dtypes`` (bf16:
    kvlab/layers/bf16_kernel.py, float32: kvlab/layers/f32_kernel.py) and the other ``kernels`` the model's blocks
    call (modules with ``library()``: kvlab/layers/moe_kernel.py, mhc_kernel.py, compressed_kernel.py). Switched
    off: nothing; a failed build warns once and the step takes torch's path."""
    if getattr(cache, "kv_quant", None):
        cpu_attend.available()
    dense_attend.library()
    for dtype, kernel in ((torch.bfloat16, bf16_kernel), (torch.float32, f32_kernel)):
        if dtype in dtypes:
            kernel.library()
    for kernel in kernels:
        kernel.library()


def compiled_step(model: Any, backend: str = "inductor") -> CompiledStep:
    """The model's compiled decode step for ``backend``, built on first use and kept on the model (so a second
    ``generate`` reuses the graphs)."""
    steps = model.__dict__.setdefault("_compiled_steps", {})
    if backend not in steps:
        steps[backend] = CompiledStep(model, backend)
    return steps[backend]
