"""One token's routed experts and shared expert (kvlab/layers/moe.py) as one hand-written C++ call
(kvlab/layers/moe_kernel.cpp) on the CPU: an eager decode step of batch 1.

Why: torch's CPU ``grouped_mm`` (the path :meth:`kvlab.layers.moe.Experts.grouped` takes for a few tokens) loops over
all E experts' groups per call, each a few dispatched operators even for an expert no token chose (about 2,300 of
DeepSeek V4's MoE's 3,224 aten events a step, 0.15 ms), and the token's experts took 16 more operators a layer
around it (the sort, the group ends, the repeat, the clamps, the activation, the combine), the shared expert 7:
their dispatch, not their bytes, was the cost (docs/performance.md). Here, for the token's k experts (the router's
indices, read where they lie: no host read, no copy of the weights) and the shared expert: the matrix-vector
products (four rows a pass), the SwiGLU / GeGLU with the optional clip (``gate <= limit``, ``|up| <= limit``), and
``shared(x) + alpha sum_j w_j expert_j(x)`` (``alpha`` the routed scaling) — the bytes the grouped path reads, in one
call. A chosen index ``E`` (ZAYA1's skip expert) adds nothing. Numerics: float32, the products summed in another
order than torch's GEMV (within 1e-5 of the torch path: tests/test_moe_kernel.py). bf16 weights (and input) are read
as bf16 (kvlab/layers/bf16.h: widened by a shift, float32 FMAs), every intermediate float32 and only the output
rounded to bf16 (the torch path rounds each product and the activation to bf16: within bf16 rounding of it).

Taken when (:func:`applies`): one token, one torch thread (the kernel runs on one; with more, torch's products split
their rows over them: not measured against it), float32 or bf16 weights and input on the CPU, contiguous, no
autograd, no biases on the shared expert. Otherwise, and when the kernel cannot be built (one warning) or
``KVLAB_MOE_KERNEL=0``, the torch paths. A plain float32 router (:func:`route_applies`: softmax, sigmoid or
sqrt-softplus scores, an optional choice bias, DeepSeek V3's group limit or DeepSeek V4's hash table, top-k,
renormalised or not) is computed in the same call in an eager step (:func:`route_step`):
its logits, scores, choice and weights as ``MoE.choose`` computes them, the ties of the choice to the lower index,
instead of about ten small torch operators a layer. Build: kvlab/layers/cpp_build.py. Compiled (kvlab/compiled.py): the custom op
``kvlab::moe_step`` (with a fake implementation), one opaque call in the traced graph; a trace cannot read the thread
count, so the op checks it at run time and on more than one thread computes the token's experts by torch's
operations (:func:`_torch_step`: the chosen experts' weights gathered, as the compiled torch path does).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from . import cpp_build
from .mlp import activation

SOURCE = Path(__file__).with_name("moe_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
ENABLED = cpp_build.switch("KVLAB_MOE_KERNEL")
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # the kernel's codes (kvlab/layers/mlp.py's names)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float

def kernel() -> cpp_build.Library:
    """The kernel's library (built and loaded at first use)."""
    args = [_P, _I, _P, _P, _I, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I, _I, _F, _F, _P]
    route = [_P, _I, _P, _P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I, _I, _F, _F, _P]
    return cpp_build.Library(SOURCE, FLAGS, ("kvlab_moe_version", 5), {
        "kvlab_moe_step": (args, _I), "kvlab_moe_step_bf16": (args, _I), "kvlab_moe_route_step": (route, _I),
    }, "MoE runs its torch paths")


KERNEL = kernel()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use); None when it cannot be (warned once) or :data:`ENABLED` is off."""
    return KERNEL.get() if ENABLED else None


DTYPES = (torch.float32, torch.bfloat16)  # the weights' (and input's) dtypes the kernel takes


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.is_cpu and t.is_contiguous()  # eager and traced alike (kvlab/layers/cpp_build.py)


def applies(x: torch.Tensor, experts: nn.Module, shared: nn.Module | None, act: str) -> bool:
    """The kernel takes this call: one token ``x [1, H]``, eager, one torch thread, no autograd, ``x``, the experts' and the shared
    expert's weights float32 (or all bf16) contiguous on the CPU (no biases), an activation it knows, the kernel on and
    loaded. Once per MoE call: cheap attribute reads only."""
    if not (ENABLED and x.shape[0] == 1 and act in ACTIVATIONS and x.dtype in DTYPES and _fits(x, x.dtype)):
        return False
    gate = experts.gate_proj
    if torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad):
        return False
    if not (_fits(gate, x.dtype) and _fits(experts.up_proj, x.dtype) and _fits(experts.down_proj, x.dtype)):
        return False
    if shared is not None:
        lin = (shared.gate_proj, shared.up_proj, shared.down_proj)
        if any(m.bias is not None or not _fits(m.weight, x.dtype) for m in lin) or shared.limit != experts.limit:
            return False
    if torch.compiler.is_compiling():
        return KERNEL.lib is not None  # loaded by an eager call or kvlab/compiled.py; the thread count: the op's
    return torch.get_num_threads() == 1 and (KERNEL.lib is not None or library() is not None)


SCORINGS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}  # the router scorings the routing call computes
ROUTE = True  # False: the routing in torch, the experts in the call (benchmarks/dense_steps.py --kernel route)


def route_applies(x: torch.Tensor, moe: nn.Module, token_ids: torch.Tensor | None = None) -> bool:
    """:func:`route_step` takes ``moe``'s (kvlab/layers/moe.py ``MoE``) routing of ``x [1, H]`` too: float32, a plain
    router (its linear weight, no bias, the optional choice bias; softmax, sigmoid or sqrt-softplus scores; DeepSeek
    V3's group limit; DeepSeek V4's hash table with the token's id ``token_ids`` (one int64 on the CPU) and an int64
    table; no router norm, router MLP, expert scales or skip expert), the weights float32 contiguous (call after
    :func:`applies`); eager only (the compiled step routes in torch, the experts in the custom op)."""
    s = moe.spec
    if not ROUTE or torch.compiler.is_compiling() or x.dtype != torch.float32 or s.scoring not in SCORINGS:
        return False
    if s.router_norm or s.router_hidden is not None or s.expert_scale or s.skip_expert:
        return False
    if s.hash_routing and not (token_ids is not None and token_ids.numel() == 1 and _fits(token_ids, torch.int64)
                               and _fits(moe.tid2eid, torch.int64)):
        return False
    r = moe.router
    if r.bias is not None or not _fits(r.weight, torch.float32) or r.weight.shape[0] != moe.experts.gate_proj.shape[0]:
        return False
    return not s.bias_correction or _fits(moe.router_bias, torch.float32)


def route_step(x: torch.Tensor, moe: nn.Module, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``x [1, H]`` -> ``moe(x)`` ``[1, H]``: the router's choice (``MoE.choose``) and :func:`step`'s sum in one call
    (:func:`applies` and :func:`route_applies` first)."""
    s, experts, shared = moe.spec, moe.experts, moe.shared
    num, width, hidden = experts.gate_proj.shape
    out = x.new_empty(1, hidden)
    g = shared.gate_proj.weight if shared is not None else None
    limit = experts.limit
    groups = s.n_group if s.n_group > 1 and (s.topk_group or s.n_group) < s.n_group else 1
    hashed = s.hash_routing
    rc = KERNEL.lib.kvlab_moe_route_step(
        x.data_ptr(), hidden, moe.router.weight.data_ptr(), moe.router_bias.data_ptr() if s.bias_correction else None,
        SCORINGS[s.scoring], s.top_k, int(s.norm_topk), groups, s.topk_group or groups,
        moe.tid2eid.data_ptr() if hashed else None, token_ids.data_ptr() if hashed else None, num, width,
        experts.gate_proj.data_ptr(), experts.up_proj.data_ptr(), experts.down_proj.data_ptr(),
        0 if g is None else g.shape[0], None if g is None else g.data_ptr(),
        None if g is None else shared.up_proj.weight.data_ptr(), None if g is None else shared.down_proj.weight.data_ptr(),
        ACTIVATIONS[experts.act_name], limit is not None, 0.0 if limit is None else limit, s.routed_scaling,
        out.data_ptr())
    if rc:
        raise ValueError(f"kvlab moe route step: arguments refused (x {tuple(x.shape)}, experts {num} x {width} x "
                         f"{hidden}, top_k {s.top_k}, scoring {s.scoring!r}, n_group {s.n_group})")
    return out


def step(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: nn.Module, shared: nn.Module | None,
         act: str, alpha: float) -> torch.Tensor:
    """``x [1, H]``, the router's ``idx [1, k]`` (int64) and ``weights [1, k]`` (before ``alpha``) -> ``[1, H]``:
    ``shared(x) + alpha sum_j weights_j expert_{idx_j}(x)`` (:func:`applies` first). Traced: the custom op; eager: one
    call of the kernel."""
    lin = (None, None, None) if shared is None else (shared.gate_proj.weight, shared.up_proj.weight,
                                                     shared.down_proj.weight)
    args = (x, idx, weights, experts.gate_proj, experts.up_proj, experts.down_proj, *lin, ACTIVATIONS[act],
            experts.limit, float(alpha))
    return moe_step_op(*args) if torch.compiler.is_compiling() else _kernel_step(*args)


def _kernel_step(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor, s_gate: torch.Tensor | None, s_up: torch.Tensor | None,
                 s_down: torch.Tensor | None, act: int, limit: float | None, alpha: float) -> torch.Tensor:
    """:func:`step` by one call of the loaded kernel: the experts' ``gate``, ``up [E, I, H]``, ``down [E, H, I]``, the
    shared expert's ``s_gate``, ``s_up [S, H]``, ``s_down [H, S]`` (or None), ``act`` an :data:`ACTIVATIONS` code."""
    num, width, hidden = gate.shape
    idx = idx if idx.dtype == torch.int64 and idx.is_contiguous() else idx.long().contiguous()
    weights = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
    out = x.new_empty(1, hidden)
    call = KERNEL.lib.kvlab_moe_step if x.dtype == torch.float32 else KERNEL.lib.kvlab_moe_step_bf16
    rc = call(
        x.data_ptr(), hidden, idx.data_ptr(), weights.data_ptr(), idx.shape[-1], num, width,
        gate.data_ptr(), up.data_ptr(), down.data_ptr(), 0 if s_gate is None else s_gate.shape[0],
        None if s_gate is None else s_gate.data_ptr(), None if s_up is None else s_up.data_ptr(),
        None if s_down is None else s_down.data_ptr(), act, limit is not None, 0.0 if limit is None else limit, alpha,
        out.data_ptr())
    if rc:
        raise ValueError(f"kvlab moe step: arguments refused (x {tuple(x.shape)}, idx {tuple(idx.shape)}, experts "
                         f"{num} x {width} x {hidden}, activation {act})")
    return out


def _torch_step(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, s_gate: torch.Tensor | None, s_up: torch.Tensor | None,
                s_down: torch.Tensor | None, act: int, limit: float | None, alpha: float) -> torch.Tensor:
    """:func:`_kernel_step` by torch's operations (the op on more than one thread): the chosen experts' weights
    gathered (a skip expert's index ``E``: weight 0), products in ``x``'s dtype."""
    fn = activation(next(name for name, code in ACTIVATIONS.items() if code == act))

    def mlp(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if limit is not None:
            g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        return fn(g) * u

    num = gate.shape[0]
    i = idx[0]
    chosen = i.clamp(max=num - 1)
    h = mlp(gate[chosen] @ x[0], up[chosen] @ x[0])  # [k, I]
    y = (down[chosen] @ h[..., None])[..., 0]  # [k, H]
    w = torch.where(i < num, weights[0].float(), 0.0) * alpha
    out = (y.float() * w[:, None]).sum(0)
    if s_gate is not None:
        out = out + (s_down @ mlp(s_gate @ x[0], s_up @ x[0])).float()
    return out[None].to(x.dtype)


def _moe_step(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
              down: torch.Tensor, s_gate: torch.Tensor | None, s_up: torch.Tensor | None, s_down: torch.Tensor | None,
              act: int, limit: float | None, alpha: float) -> torch.Tensor:
    """The op ``kvlab::moe_step``: :func:`_kernel_step` on one torch thread, :func:`_torch_step` on more."""
    args = (x, idx, weights, gate, up, down, s_gate, s_up, s_down, act, limit, alpha)
    if torch.get_num_threads() == 1 and (KERNEL.lib is not None or library() is not None):
        return _kernel_step(*args)
    return _torch_step(*args)


moe_step_op = torch.library.custom_op("kvlab::moe_step", _moe_step, mutates_args=())


@moe_step_op.register_fake
def _(x, idx, weights, gate, up, down, s_gate, s_up, s_down, act, limit, alpha):
    return x.new_empty(1, gate.shape[-1])


__all__ = ["ACTIVATIONS", "ENABLED", "ROUTE", "SCORINGS", "applies", "library", "moe_step_op", "route_applies",
           "route_step", "step"]
