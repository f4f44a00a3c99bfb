"""Per-layer embeddings (PLE; Gemma 3n, Gemma 4 E2B/E4B).

Every layer ``l`` gets a small token-specific input ``p_l`` of ``ple_dim`` (P) channels, built once per
forward for all L layers from two packed ``[.., L * P]`` sources:

    table   = E_ple[token] * sqrt(P)                          (a lookup: ple_vocab x L*P table)
    context = RMSNorm_P( (W_proj @ e) / sqrt(hidden) )        (e = the scaled main embedding)
    p       = (table + context) / sqrt(2)                     -> [B, T, L, P]

and layer ``l`` adds, after its MLP, ``RMSNorm_hidden( W_up_l @ (act(W_gate_l @ x) * p_l) )`` to its
residual stream ``x``. The table is large (262144 x 35 x 256 for E2B) but is read one row per token:
it costs memory, not compute.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear
from .mlp import activation
from .norm import RMSNorm


class PLEInput(nn.Module):
    """The per-layer inputs ``[B, T, L, P]`` from token ids and the (scaled) main embeddings."""

    def __init__(self, rows: int, hidden: int, layers: int, dim: int, eps: float = 1e-6,
                 norm_offset: bool = False) -> None:
        super().__init__()
        self.layers, self.dim = layers, dim
        self.table = nn.Embedding(rows, layers * dim)
        self.proj = Linear(hidden, layers * dim, bias=False)
        self.norm = RMSNorm(dim, eps, norm_offset)
        self.table_scale = dim ** 0.5
        self.proj_scale = hidden ** -0.5

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape  # ids checked against the table's rows where input enters (Model.check_ids)
        w = self.table.weight
        # the scale rounded to the table's dtype as the reference does; torch.full, not torch.tensor: no host copy
        tab = self.table(input_ids) * torch.full((), self.table_scale, dtype=w.dtype, device=w.device)
        ctx = self.norm((self.proj(embeds) * self.proj_scale).view(b, t, self.layers, self.dim))
        return (ctx + tab.view(b, t, self.layers, self.dim)) * (2.0 ** -0.5)


class PLELayer(nn.Module):
    """One layer's gate: ``x -> RMSNorm(up(act(gate(x)) * p_l))``, added to the residual by the block."""

    def __init__(self, hidden: int, dim: int, act: str, eps: float = 1e-6, norm_offset: bool = False) -> None:
        super().__init__()
        self.gate = Linear(hidden, dim, bias=False)
        self.proj = Linear(dim, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps, norm_offset)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.act(self.gate(x)) * p))
