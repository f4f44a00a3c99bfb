"""Manifold-constrained hyper-connections (mHC; DeepSeek V4, Xie et al. 2026) as a residual technique.

The residual stream is widened into ``n`` streams ``X [B, T, n, D]`` (the embedding copied ``n`` times).
Around each sub-layer ``f`` (attention, MLP) of any block, with ``x = rms(flatten(X))`` (no weight) and
one linear map ``W [(2 + n) n, n D]`` plus a static bias ``b`` and three scales ``s``::

    pre  = sigmoid(s0 * (W_pre x) + b_pre) + eps          [n]       read-in:  f's input = sum_j pre_j X_j
    post = 2 * sigmoid(s1 * (W_post x) + b_post)          [n]       write-out of f's output
    M    = Sinkhorn(softmax_rows(s2 * (W_res x) + b_res) + eps)   [n, n] doubly stochastic
    X'_k = post_k * f(sum_j pre_j X_j) + sum_j M_jk X_j

Sinkhorn-Knopp (``iters`` alternating column / row normalisations, each ``/ (sum + eps)``, ending on a
column normalisation) runs in fp32 whatever the model's dtype; the mHC parameters are kept in fp32 too.
Before the head the streams collapse with the same ``pre`` form (its own ``W [n, n D]``, bias, scale).
Parameter layout and arithmetic follow transformers' ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import mhc_kernel
from .cast import as_dtype, as_fp32


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``[..., n, n]`` logits -> doubly stochastic (fp32): row softmax + eps, then Sinkhorn-Knopp.

    Eager: six operators per iteration on the whole matrix; without autograd on the CPU one C++ loop
    (kvlab/layers/mhc_kernel.py, within 3e-7 of this form), else four operators, in place
    (:func:`sinkhorn_in_place`, within 3e-7). Compiled (inductor): :func:`sinkhorn_by_rows`, the same
    arithmetic written so that one iteration is one loop (equal to this form to the last bit for ``n <= 4``, V4's 4
    streams, where torch adds a column's ``n`` values in order; within a few ulp for more)."""
    if torch.compiler.is_compiling():
        return sinkhorn_by_rows(logits, iters, eps)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        if mhc_kernel.applies(logits, logits.shape[-1]):
            return mhc_kernel.sinkhorn(logits, iters, eps)
        return sinkhorn_in_place(logits, iters, eps)
    m = torch.softmax(logits.float(), dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def sinkhorn_in_place(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """:func:`sinkhorn` without autograd, in place: 4 operators per iteration instead of 6 and no allocation but the
    sums (an eager decode step runs 16 Sinkhorns of ``[1, 1, 4, 4]``, each a chain of tiny operators: their dispatch
    is the cost). The matrix lives in a buffer with one more row and one more column holding ``eps``, so a row or
    column sum over the buffer is ``sum + eps`` in one operator. A column sum adds the rows in order, as the
    autograd form does; a row sum of ``n + 1`` values does not (torch adds the eps second), so the result is within
    a unit or two in the last place of the autograd form's (<= 2e-7 for 4 streams: tests/test_mhc.py)."""
    n = logits.shape[-1]
    lead = logits.shape[:-2]
    ext = torch.full((*lead, n + 1, n + 1), eps, dtype=torch.float32, device=logits.device)  # row n, column n: eps
    m = ext[..., :n, :n]
    torch.softmax(as_fp32(logits), dim=-1, out=m).add_(eps)
    rows, cols = ext[..., :n, :], ext[..., :, :n]  # each row / column with eps appended
    m.div_(cols.sum(-2, True))  # positional arguments: parsed faster than keywords (a microsecond matters here)
    for _ in range(iters - 1):
        m.div_(rows.sum(-1, True))
        m.div_(cols.sum(-2, True))
    return m


def sinkhorn_by_rows(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """:func:`sinkhorn` with the matrix held as its ``n`` rows ``[..., n]``: a column sum is a sum of rows (elementwise,
    in row order as ``sum(dim=-2)`` adds them), a row sum a reduction over one row's last dim. Inductor then fuses a
    column normalisation with the next row normalisation into one loop over the ``n`` columns (a reduction has to
    finish before its quotient is used, so each iteration ends one loop); on the whole matrix the row and column
    normalisations reduce over different dims and each is its own loop (``2 iters + 1`` loops, tests/test_mhc.py).
    One loop for all iterations would need every entry as its own ``[...]`` tensor (no reduction left): about 1,300
    operators for 20 iterations of 4 streams, which inductor cuts at its fusion limit (64 nodes) into 13 loops and
    compiles in about a minute per Sinkhorn (docs/performance.md)."""
    m = torch.softmax(logits.float(), dim=-1) + eps
    rows = list(m.unbind(-2))

    def normalise_columns() -> None:
        total = rows[0]
        for r in rows[1:]:
            total = total + r
        total = total + eps
        rows[:] = [r / total for r in rows]

    normalise_columns()
    for _ in range(iters - 1):
        rows[:] = [r / (r.sum(dim=-1, keepdim=True) + eps) for r in rows]
        normalise_columns()
    return torch.stack(rows, dim=-2)


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one operator, the same arithmetic to the bit
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


READ_ROWS = 16  # tokens a read takes through the C++ kernel's own W x (decode); more: torch's matrix product


class _Fp32Params(nn.Module):
    """A module whose floating parameters stay fp32 when the model is cast (``model.to(bfloat16)``)."""

    def _apply(self, fn, recurse=True):
        def keep(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
                return t.detach().to(out.device)  # keep the fp32 values, follow the device
            return out
        return super()._apply(keep, recurse)


class HyperConnection(_Fp32Params):
    """mHC around one sub-layer: ``read(X) -> (f's input, (post, M))``, ``write((post, M), out, X) -> X'`` (the
    residual-strategy interface of kvlab/layers/residual.py)."""

    param_init: ClassVar[dict[str, str]] = {"hc_scale": "ones", "hc_bias": "zeros"}  # not drawn at random by Model.from_config

    def __init__(self, streams: int, hidden: int, iters: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        n = self.streams = streams
        self.iters, self.eps, self.norm_eps = iters, eps, norm_eps
        self.hc_fn = nn.Parameter(torch.zeros((2 + n) * n, n * hidden))
        self.hc_bias = nn.Parameter(torch.zeros((2 + n) * n))
        self.hc_scale = nn.Parameter(torch.ones(3))
        at = torch.tensor([0] * n + [1] * n + [2] * n * n, device="cpu")  # which of the 3 scales each map takes
        self._scale_at: dict[torch.device, torch.Tensor] = {at.device: at}  # per device used (CPU's from the start:
        # a compiled step's first call then writes no Python state, whose guard would recompile at its second call)

    def _scales(self) -> torch.Tensor:
        """The scale of each of the ``(2 + n) n`` outputs ``[(2 + n) n]``: ``hc_scale`` spread by an index built once
        per device (not a buffer: a model built on the meta device keeps it)."""
        s = as_fp32(self.hc_scale)
        at = self._scale_at.get(s.device)
        if at is None:
            at = self._scale_at.setdefault(s.device, self._scale_at[torch.device("cpu")].to(s.device))
        return s.index_select(0, at)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre ``[B, T, n]``, post ``[B, T, n]``, M ``[B, T, n, n]`` (all fp32) from the streams ``[B, T, n, D]``.

        The three maps' scales and biases are applied to the ``(2 + n) n`` outputs at once, pre and post through one
        sigmoid: elementwise, the same arithmetic as map by map (an eager decode step is many tiny operators), to a
        unit in the last place (torch's vectorised and strided sigmoid may differ by one). Without autograd on the CPU
        all of it after ``W x`` is one C++ call, eager and traced (kvlab/layers/mhc_kernel.py, within 1e-6)."""
        n = self.streams
        flat = _unit_rms(as_fp32(x.flatten(2)), self.norm_eps)
        lin = F.linear(flat, as_fp32(self.hc_fn))  # [B, T, (2 + n) n]
        if mhc_kernel.applies(lin, n):  # one C++ call for the rest (kvlab/layers/mhc_kernel.py)
            out = mhc_kernel.maps(lin, as_fp32(self.hc_scale), as_fp32(self.hc_bias), n, self.iters, self.eps)
            return out[..., :n], out[..., n:2 * n], out[..., 2 * n:].unflatten(-1, (n, n))
        z = lin * self._scales() + as_fp32(self.hc_bias)
        gates = torch.sigmoid(z[..., :2 * n])
        pre, post = gates[..., :n] + self.eps, 2 * gates[..., n:]
        m = sinkhorn(z[..., 2 * n:].unflatten(-1, (n, n)), self.iters, self.eps)
        return pre, post, m

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """A float32 call without autograd on the CPU with the C++ kernel loaded (kvlab/layers/mhc_kernel.py; traced:
        its custom ops)."""
        return (x.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or self.hc_fn.requires_grad))
                and mhc_kernel.applies(x, self.streams))

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, T, n, D]`` -> f's input ``sum_j pre_j X_j [B, T, D]`` and ``(post, M)`` for :meth:`write`. Float32
        on the CPU without autograd: up to :data:`READ_ROWS` tokens in one C++ call (norm, ``W x``, maps, mix), more
        with torch's ``W x`` and the kernel's maps; the context then carries the packed maps too, and :meth:`write`
        is one call (compiled: the ops ``kvlab::mhc_read`` / ``kvlab::mhc_write``, the same calls)."""
        n = self.streams
        if self._kernel_takes(x):
            if x.shape[0] * x.shape[1] <= READ_ROWS:
                mix, packed = mhc_kernel.read(x, self.hc_fn, self.hc_scale, self.hc_bias, self.iters, self.eps,
                                              self.norm_eps)
            else:
                flat = _unit_rms(x.flatten(2), self.norm_eps)
                packed = mhc_kernel.maps(F.linear(flat, as_fp32(self.hc_fn)), as_fp32(self.hc_scale),
                                         as_fp32(self.hc_bias), n, self.iters, self.eps)
                mix = (packed[..., :n, None] * x).sum(dim=2)
            return mix, _Maps(packed, n)
        pre, post, m = self.maps(x)
        mix = (pre[..., None] * x).sum(dim=2)
        return as_dtype(mix, x.dtype), (post, m)

    @staticmethod
    def write(ctx: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(ctx, _Maps) and out.dtype == torch.float32:  # read by the kernel: one call
            return mhc_kernel.write(ctx.packed, out, x)
        post, m = ctx
        post, m = as_dtype(post, x.dtype), as_dtype(m, x.dtype)
        return post[..., None] * out[..., None, :] + m.transpose(-1, -2) @ x


class _Maps:
    """The context of a read by the C++ kernel: its packed maps ``packed [B, T, (2 + n) n]`` (pre, post, M
    row-major), which :meth:`HyperConnection.write` passes it; unpacks as the torch form's ``(post, M)``."""

    __slots__ = ("n", "packed")

    def __init__(self, packed: torch.Tensor, n: int) -> None:
        self.packed, self.n = packed, n

    def __iter__(self):
        n = self.n
        return iter((self.packed[..., n:2 * n], self.packed[..., 2 * n:].unflatten(-1, (n, n))))


class HyperHead(_Fp32Params):
    """The final collapse of the streams ``[B, T, n, D] -> [B, T, D]`` before the final norm."""

    param_init: ClassVar[dict[str, str]] = {"hc_scale": "ones", "hc_bias": "zeros"}  # not drawn at random by Model.from_config

    def __init__(self, streams: int, hidden: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(streams, streams * hidden))
        self.hc_bias = nn.Parameter(torch.zeros(streams))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _unit_rms(as_fp32(x.flatten(2)), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, as_fp32(self.hc_fn)) * as_fp32(self.hc_scale) + as_fp32(self.hc_bias))
        return as_dtype(((pre + self.eps)[..., None] * x).sum(dim=2), x.dtype)


def expand(x: torch.Tensor, streams: int) -> torch.Tensor:
    """The embedding ``[B, T, D]`` copied into ``streams`` streams ``[B, T, n, D]``."""
    return x[:, :, None].expand(-1, -1, streams, -1).contiguous()
