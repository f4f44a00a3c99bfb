"""RMSNorm (Zhang & Sennrich 2019) computed in fp32, with the Gemma ``1 + w`` offset as an option."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rows_kernel


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` over the last dim; ``offset=True`` applies ``1 + w`` (weights stored as w).

    Computed in fp32 whatever the input dtype. Without the offset the normalised value is cast back
    to the input dtype before the weight is applied (Llama/Qwen order), unless the weight itself is kept in
    fp32 (DeepSeek V4 loads its norms so); with the offset the product is taken in fp32 and cast last (Gemma
    order). ``scale=False``: no learned weight (Gemma 4's v norm). A float32 decode step's rows (eager, CPU): one C++
    call (kvlab/layers/rows_kernel.py), equal to the bit.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False, scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.scale = scale
        if scale:
            self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.param_init = {"weight": "zeros" if offset else "ones"}  # identity at initialisation (Model.from_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and rows_kernel.norm_applies(x, self.weight if self.scale else None):
            return rows_kernel.rms_norm(x, self.weight if self.scale else None, self.eps, self.offset)  # decode rows
        if dtype == torch.float32 and self.scale and self.weight.dtype == torch.float32:  # fp32: the weight inside
            w = 1.0 + self.weight if self.offset else self.weight  # rms_norm's one pass, the same arithmetic
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x / rms(x) in fp32: one operator
        if not self.scale:
            return h.to(dtype)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        if self.weight.dtype == torch.float32 and dtype != torch.float32:
            return (self.weight * h).to(dtype)  # a weight kept in fp32 (DeepSeek V4): multiply in fp32, cast last
        return self.weight * h.to(dtype)
