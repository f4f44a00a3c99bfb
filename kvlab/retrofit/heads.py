"""Query-head pruning by measured importance: Laguna XS.2's per-layer head budget applied after the fact.

Importance of head ``h`` in layer ``l`` is the mean, over the tokens of a real text, of the L2 norm of what the
head adds to the residual stream: ``|| W_o[:, h] · out_h ||`` (the attention output of the head, after any output
gate, through its slice of ``o_proj``) — the "contribution norm" of Kobayashi et al. 2020 (arXiv 2004.10102),
cheaper than the gradient score of Michel et al. 2019 (arXiv 1905.10650) and measured in the same forward pass.

Pruning keeps, in every KV-head group, the same number of its most important query heads (GQA needs equal
groups), and slices ``q_proj`` rows, ``o_proj`` columns, the gate and sink entries of the kept heads. K/V are
untouched: pruning saves weights and attention FLOPs, not cache bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from .. import kinds
from ..config import ModelConfig
from ..model import Model
from .core import Converted, Derived, RetrofitError, convert


def _gqa_layers(config: ModelConfig, what: str) -> None:
    for i, x in enumerate(config.layers):
        if not kinds.takes(x.attention, "prune-heads"):
            raise RetrofitError(f"{what}: layers[{i}] is a {x.attention!r} layer; head pruning applies to "
                                f"{kinds.taking('prune-heads')} layers")


@torch.no_grad()
def head_importance(model: Model, ids: torch.Tensor | Sequence[int], chunk: int = 1024) -> torch.Tensor:
    """``[num_layers, max_heads]`` fp32 mean contribution norm of every query head over ``ids`` (``[T]`` or
    ``[B, T]``), read in windows of ``chunk`` tokens; entries past a layer's head count are NaN."""
    _gqa_layers(model.config, "head importance")
    cfg = model.config
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.embed.weight.device)
    ids = ids[None] if ids.dim() == 1 else ids
    hmax = max(x.num_heads for x in cfg.layers)
    total = torch.zeros(cfg.num_layers, hmax, dtype=torch.float64)
    count = 0
    hooks = []

    def hook(i: int):
        spec, o = cfg.layers[i], model.layers[i].attn.o_proj

        def pre(_mod, args):
            x = args[0].float()  # [B, T, H * Dv]
            b, t, _ = x.shape
            w = o.weight.float().view(-1, spec.num_heads, spec.value_dim)  # [hidden, H, Dv]
            contrib = torch.einsum("bthd,ohd->btho", x.view(b, t, spec.num_heads, spec.value_dim), w)
            total[i, :spec.num_heads] += contrib.norm(dim=-1).sum(dim=(0, 1)).double().cpu()
        return pre

    for i in range(cfg.num_layers):
        hooks.append(model.layers[i].attn.o_proj.register_forward_pre_hook(hook(i)))
    try:
        for s in range(0, ids.shape[1], chunk):
            part = ids[:, s:s + chunk]
            model(part)
            count += part.numel()
    finally:
        for h in hooks:
            h.remove()
    out = (total / max(count, 1)).float()
    for i, x in enumerate(cfg.layers):
        out[i, x.num_heads:] = float("nan")
    return out


def _keep_counts(config: ModelConfig, keep: float | Mapping[str, int | float] | Sequence[int]) -> list[int]:
    """Query heads kept per layer: an int (heads), a float in (0, 1] (fraction), a {"global": .., "sliding": ..}
    map of either (a kind left out keeps all), or a per-layer list of ints."""
    cfg = config
    if isinstance(keep, Sequence) and not isinstance(keep, str):
        if len(keep) != cfg.num_layers:
            raise RetrofitError(f"prune heads: keep has {len(keep)} entries, the model has {cfg.num_layers} layers")
        values = list(keep)
    elif isinstance(keep, Mapping):
        bad = set(keep) - {"global", "sliding"}
        if bad:
            raise RetrofitError(f"prune heads: keep keys {sorted(bad)}: allowed 'global' and 'sliding'")
        values = [keep.get("global" if x.window is None else "sliding", 1.0) for x in cfg.layers]
    else:
        values = [keep] * cfg.num_layers
    out = []
    for i, (v, x) in enumerate(zip(values, cfg.layers)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RetrofitError(f"prune heads: keep for layers[{i}] is {v!r}: a head count or a fraction in (0, 1]")
        n = round(v * x.num_heads) if isinstance(v, float) else v
        if isinstance(v, float) and not 0 < v <= 1:
            raise RetrofitError(f"prune heads: keep fraction {v} for layers[{i}] must lie in (0, 1]")
        g = x.num_kv_heads
        if n < g or n > x.num_heads or n % g:
            allowed = list(range(g, x.num_heads + 1, g))
            raise RetrofitError(f"prune heads: layers[{i}] would keep {n} of its {x.num_heads} query heads; with "
                                f"{g} KV heads it can keep {allowed} (equal GQA groups)")
        out.append(n)
    return out


def check_prune(config: ModelConfig, keep: float | Mapping[str, int | float] | Sequence[int]) -> list[int]:
    """The query heads each layer keeps, from the config alone: RetrofitError naming the layer that cannot keep them
    (equal GQA groups) or cannot be pruned."""
    _gqa_layers(config, "prune heads")
    return _keep_counts(config, keep)


def prune_heads(model: Model, keep: float | Mapping[str, int | float] | Sequence[int],
                scores: torch.Tensor | None = None, ids: torch.Tensor | Sequence[int] | None = None) -> Converted:
    """``model`` keeping, per layer, ``keep`` query heads (see :func:`_keep_counts`), chosen by ``scores``
    (``[layers, heads]``, higher = more important) or by :func:`head_importance` measured on ``ids``."""
    counts = check_prune(model.config, keep)
    if scores is None:
        if ids is None:
            raise RetrofitError("prune heads: give scores=[layers, heads] or ids= (text to measure importance on)")
        scores = head_importance(model, ids)
    cfg = model.config
    layers, derived, kept_all = [], {}, []
    for i, (x, n) in enumerate(zip(cfg.layers, counts)):
        h, g, d, dv = x.num_heads, x.num_kv_heads, x.head_dim, x.value_dim
        per = h // g
        s = scores[i, :h].float().view(g, per)  # heads of KV group j are j*per .. (j+1)*per - 1
        top = s.topk(n // g, dim=1).indices.sort(dim=1).values
        kept = (top + torch.arange(g)[:, None] * per).flatten().tolist()
        kept_all.append(kept)
        layers.append(dataclasses.replace(x, num_heads=n))
        if n == h:
            continue
        attn = model.layers[i].attn
        p = f"layers.{i}.attn."
        idx = torch.tensor(kept, device=attn.q_proj.weight.device)
        rows = (idx[:, None] * d + torch.arange(d, device=idx.device)).flatten()
        vcols = (idx[:, None] * dv + torch.arange(dv, device=idx.device)).flatten()
        how = f"heads {kept} of {h}"
        parts = [("q_proj.weight", attn.q_proj.weight[rows], "rows"), ("o_proj.weight", attn.o_proj.weight[:, vcols],
                                                                        "columns")]
        if attn.q_proj.bias is not None:
            parts.append(("q_proj.bias", attn.q_proj.bias[rows], "entries"))
        if x.output_gate:
            parts.append(("g_proj.weight", attn.g_proj.weight[idx if x.gate_per_head else vcols], "rows"))
        if x.sinks:
            parts.append(("sinks", attn.sinks[idx], "entries"))
        for name, value, what in parts:  # each from the source tensor of the same name
            derived[p + name] = Derived(value, f"{p}{name} {what} of {how}", (p + name,))
    new = dataclasses.replace(cfg, layers=layers, name=f"{cfg.name} (heads {sum(counts)}/"
                              f"{sum(x.num_heads for x in cfg.layers)})")
    out = convert(model, new, derived=derived, technique=f"prune-heads:{sum(counts)}/"
                  f"{sum(x.num_heads for x in cfg.layers)}")
    out.report.notes.append(f"query heads kept per layer (by contribution norm): {kept_all}")
    return out
