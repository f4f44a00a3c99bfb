"""GQA/MHA -> MLA as a retrofit: partial RoPE plus a joint low-rank factorisation of the K/V projections
(MHA2MLA, Ji et al. 2025, arXiv 2502.14837; TransMLA, Meng et al. 2025, arXiv 2502.07864), decoded in kvlab's
absorbed latent form (kvlab/layers/mla.py, kvlab/cache/latent.py).

For a gqa layer with ``H`` query heads, ``G`` KV heads of dim ``D`` (``rot`` of them rotary: pairs
``(j, j + rot/2)``, frequency ``theta^(-2j/rot)``) and values of dim ``Dv``, keeping ``n = rope_dims / 2`` pairs:

- **partial RoPE**: the kept pairs ``S`` keep their rotation; every other channel of K and Q becomes non-rotary.
  ``S`` is the arithmetic progression of pair indices ``{j0 + k i}`` with the largest MHA2MLA "2-norm" score
  ``sum_h ||q_h,j|| ||k_g(h),j||`` (summed over layers; norms from ``E[x x^T]`` of the attention inputs over ``ids``,
  or from the weights alone without ``ids``): DeepSeek's RoPE rotates ``d_rope`` channels with geometric
  frequencies, which expresses exactly those sets (``theta' = theta^(2kn/rot)``, linear scaling
  ``factor = theta^(2 j0/rot)``), one set for the whole model as ``DeepseekV3Config`` has one RoPE.
  ``select='high'`` / ``'uniform'`` take MHA2MLA's fixed sets (the ``n`` highest frequencies / every ``rot/2n``-th).
- **one shared rotary key**: DeepSeek MLA caches one ``k_pe`` for all heads. For each kept pair, ``k_pe`` is the
  principal component across the ``G`` KV heads of that pair's key channels (the top eigenvector ``u`` of their
  ``G x G`` Gram matrix under ``E[x x^T]``; TransMLA's RoRoPE idea), and query head ``h`` of group ``g`` reads it
  with ``u_g q_h``. Exact for one KV head (MQA) or KV heads whose kept rotary rows are equal; otherwise the
  components orthogonal to ``u`` are dropped.
- **joint SVD**: ``M = [W_k_nope (G (D - 2n) rows); W_v (G Dv rows)] = U S V^T``; at latent rank ``r``
  ``W_down = S_r^(1/2) V_r^T`` (``kv_a_proj_with_mqa``'s first ``r`` rows, with the ``k_pe`` rows after them) and
  ``W_up = U_r S_r^(1/2)`` (``kv_b_proj``: per query head the up rows of its group's ``k_nope`` and ``v``). Full
  rank (``r = rank M``) reproduces ``M`` to float rounding.
- the latent has no RMSNorm (``MLASpec.latent_norm=False``): DeepSeek's ``kv_a_layernorm`` would rescale every
  token's K/V by ``1/rms(c_kv)``, which no factorisation of a linear K/V can reproduce.

The softmax scale stays ``D^-0.5`` (``qk_nope + qk_rope = D``). Cache per token: ``r + 2n`` values instead of
``G (D + Dv)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..config import LayerSpec, MLASpec, RopeSpec
from ..model import Model
from .convert import Converted, RetrofitError, convert

SELECT = ("2norm", "high", "uniform")


@dataclasses.dataclass(frozen=True)
class RopePairs:
    """The kept rotary pairs: ``pairs`` (source pair indices ``j0 + k i``), ``rot`` (the source's rotary channels)
    and the RopeSpec of the MLA layers that rotates them with the source's frequencies."""

    pairs: tuple[int, ...]
    rot: int
    rope: RopeSpec


def _check(model: Model, rank: int, rope_dims: int | None, select: str) -> tuple[int, int]:
    """Every layer a plain gqa layer of one shape and rope; (rot, rope_dims). RetrofitError before any work."""
    cfg = model.config
    first = cfg.layers[0]
    if select not in SELECT:
        raise RetrofitError(f"mla: select={select!r}; allowed: {', '.join(SELECT)}")
    for i, x in enumerate(cfg.layers):
        where = f"mla: layers[{i}]"
        if x.attention != "gqa":
            raise RetrofitError(f"{where} is a {x.attention!r} layer; the MLA retrofit converts gqa layers")
        bad = [n for n, v in (("kv_source", x.kv_source is not None), ("window", x.window is not None),
                              ("sinks", x.sinks), ("qk_norm", x.qk_norm), ("qkv_bias", x.qkv_bias),
                              ("output_gate", x.output_gate is not None), ("v_norm", x.v_norm), ("k_eq_v", x.k_eq_v))
               if v]
        if bad:
            raise RetrofitError(f"{where} sets {', '.join(bad)}; the MLA retrofit factorises a plain linear K/V "
                                "(no shared K/V, window, sinks, q/k norm, K/V bias, output gate, v norm or k_eq_v)")
        if x.rope is None or x.rope.scaling == "proportional":
            raise RetrofitError(f"{where}.rope is {'absent (NoPE)' if x.rope is None else 'proportional'}; the MLA "
                                "retrofit needs a rotate-half RoPE to keep a rotary part of")
        if (x.num_heads, x.num_kv_heads, x.head_dim, x.value_dim, repr(x.rope)) != (
                first.num_heads, first.num_kv_heads, first.head_dim, first.value_dim, repr(first.rope)):
            raise RetrofitError(f"{where} has other heads / head dims / rope than layers[0]; the MLA retrofit needs "
                                "one attention shape (one DeepSeek MLA config)")
    d, rot = first.head_dim, int(first.head_dim * first.rope.partial)
    if rot < 2:
        raise RetrofitError(f"mla: layers[0].rope rotates {rot} channels; nothing to keep as the rotary key")
    rope_dims = (rot // 2 // 2 * 2 or 2) if rope_dims is None else rope_dims
    if not isinstance(rope_dims, int) or isinstance(rope_dims, bool) or rope_dims < 2 or rope_dims % 2 \
            or rope_dims > rot or rope_dims >= d:
        raise RetrofitError(f"mla: rope_dims={rope_dims!r} must be an even number of rotary channels in [2, {rot}] "
                            f"and below head_dim={d} (the MLA key needs a non-rotary part)")
    if rope_dims < rot and first.rope.scaling != "default":
        raise RetrofitError(f"mla: rope_dims={rope_dims} < {rot} keeps some rotary pairs, which needs the source's "
                            f"plain RoPE frequencies; layers[0].rope.scaling={first.rope.scaling!r} (keep all "
                            f"{rot} rotary channels, rope_dims={rot})")
    width = first.num_kv_heads * (d - rope_dims + first.value_dim)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > min(width, cfg.hidden_size):
        raise RetrofitError(f"mla: rank={rank!r} must be an integer in [1, {min(width, cfg.hidden_size)}]: the joint "
                            f"K/V width is {first.num_kv_heads} KV heads x ({d - rope_dims} non-rotary key + "
                            f"{first.value_dim} value channels) = {width}" +
                            (f" and hidden_size={cfg.hidden_size}" if cfg.hidden_size < width else ""))
    return rot, rope_dims


@torch.no_grad()
def input_moments(model: Model, ids: torch.Tensor | Sequence[int] | None, chunk: int = 1024) -> list[torch.Tensor]:
    """Per layer ``E[x x^T] [hidden, hidden]`` (fp64) of the attention inputs over ``ids`` (``[T]`` or ``[B, T]``,
    read in windows of ``chunk`` tokens); the identity for every layer without ``ids`` (weights-only scores)."""
    cfg = model.config
    h = cfg.hidden_size
    if ids is None:
        return [torch.eye(h, dtype=torch.float64) for _ in cfg.layers]
    dev = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
    ids = ids[None] if ids.dim() == 1 else ids
    sums = [torch.zeros(h, h, dtype=torch.float64, device=dev) for _ in cfg.layers]

    def hook(i: int):
        def pre(_mod, args):
            x = args[0].reshape(-1, h).double()
            sums[i].add_(x.T @ x)
        return pre

    hooks = [model.layers[i].attn.register_forward_pre_hook(hook(i)) for i in range(cfg.num_layers)]
    try:
        for s in range(0, ids.shape[1], chunk):
            model(ids[:, s:s + chunk])
    finally:
        for k in hooks:
            k.remove()
    return [(c / ids.numel()).cpu() for c in sums]


def _pair_rows(j: int, rot: int) -> list[int]:
    return [j, j + rot // 2]


@torch.no_grad()
def select_pairs(model: Model, rope_dims: int, select: str = "2norm",
                 moments: list[torch.Tensor] | None = None) -> RopePairs:
    """The kept rotary pairs (one arithmetic progression for the whole model, see the module doc) and their RoPE."""
    cfg = model.config
    x0 = cfg.layers[0]
    d, g, hq, rot = x0.head_dim, x0.num_kv_heads, x0.num_heads, int(x0.head_dim * x0.rope.partial)
    half, n = rot // 2, rope_dims // 2
    if select == "high":
        cands = [(0, 1)]
    elif select == "uniform":
        cands = [(0, max(1, half // n))]
    else:
        cands = [(j0, k) for k in range(1, half) for j0 in range(half) if j0 + k * (n - 1) < half] or [(0, 1)]
    if len(cands) > 1:
        moments = moments or input_moments(model, None)
        score = torch.zeros(half, dtype=torch.float64)
        for i, c in enumerate(moments):
            attn = model.layers[i].attn
            wq = attn.q_proj.weight.double().cpu().view(hq, d, -1)
            wk = attn.k_proj.weight.double().cpu().view(g, d, -1)
            for j in range(half):
                rows = _pair_rows(j, rot)
                qn = torch.einsum("hcx,xy,hcy->h", wq[:, rows], c, wq[:, rows]).clamp_min(0).sqrt()  # [H]
                kn = torch.einsum("gcx,xy,gcy->g", wk[:, rows], c, wk[:, rows]).clamp_min(0).sqrt()  # [G]
                score[j] += (qn * kn.repeat_interleave(hq // g)).sum()
        best = max(cands, key=lambda c: (float(score[[c[0] + c[1] * i for i in range(n)]].sum()), -c[0], -c[1]))
    else:
        best = cands[0]
    j0, k = best
    pairs = tuple(j0 + k * i for i in range(n))
    src = x0.rope
    if rope_dims == rot:
        rope = RopeSpec(**vars(src))
    else:
        theta = src.theta ** (2 * k * n / rot)
        factor = src.theta ** (2 * j0 / rot)
        rope = RopeSpec(theta=theta, scaling="linear", factor=factor) if j0 else RopeSpec(theta=theta)
    return RopePairs(pairs, rot, rope)


def factorise(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``M [rows, hidden] ~= up [rows, rank] @ down [rank, hidden]`` by truncated SVD (fp64), the singular values
    split evenly (``up = U_r S_r^(1/2)``, ``down = S_r^(1/2) V_r^T``); exact to rounding at ``rank >= rank(M)``."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _shared_key(wk_pair: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``u [G]``: the top eigenvector of the KV heads' Gram matrix ``tr(W_g C W_g'^T)`` for one rotary pair
    (``wk_pair [G, 2, hidden]``), signed to sum >= 0 (the mean direction when the heads agree)."""
    gram = torch.einsum("gcx,xy,kcy->gk", wk_pair, c, wk_pair)
    u = torch.linalg.eigh(gram)[1][:, -1]
    return u if u.sum() >= 0 else -u


@torch.no_grad()
def to_mla(model: Model, rank: int, rope_dims: int | None = None, select: str = "2norm",
           ids: torch.Tensor | Sequence[int] | None = None) -> Converted:
    """``model`` (gqa layers, one shape) converted to DeepSeek-style MLA with latent rank ``rank`` and ``rope_dims``
    rotary key channels (default: half the source's rotary channels); ``select`` the kept pairs (``2norm``,
    ``high``, ``uniform``); ``ids``: real text the 2-norm scores and shared-key directions are measured on (without
    it: the weights alone). Checks everything before any work (RetrofitError naming the layer and option)."""
    rot, rope_dims = _check(model, rank, rope_dims, select)
    cfg = model.config
    x0 = cfg.layers[0]
    d, dv, g, hq = x0.head_dim, x0.value_dim, x0.num_kv_heads, x0.num_heads
    per = hq // g
    moments = input_moments(model, ids)
    kept = select_pairs(model, rope_dims, select, moments)
    rope_rows = list(kept.pairs) + [j + rot // 2 for j in kept.pairs]  # rotate-half order of q_pe / k_pe
    nope_rows = [c for c in range(d) if c not in set(rope_rows)]
    dn = len(nope_rows)
    m = MLASpec(kv_lora_rank=rank, qk_nope_head_dim=dn, qk_rope_head_dim=rope_dims, v_head_dim=dv,
                rope_interleave=False, latent_norm=False)
    rope = dataclasses.replace(kept.rope, partial=m.rope_partial)
    scale = x0.attn_scale
    if scale is None and x0.rope.mscale_all_dim:  # MLA would square YaRN's mscale into the softmax scale
        scale = d ** -0.5
    layers: list[LayerSpec] = [dataclasses.replace(x, attention="mla", num_kv_heads=1, head_dim=m.qk_head_dim,
                                                   v_head_dim=dv, rope=rope, mla=dataclasses.replace(m),
                                                   attn_scale=scale) for x in cfg.layers]
    what = f"mla:rank={rank},rope={rope_dims}" + (f",select={select}" if select != "2norm" else "")
    new = dataclasses.replace(cfg, layers=layers, name=f"{cfg.name} ({what})", family=None)
    try:
        new.validate()
    except ValueError as e:
        raise RetrofitError(f"mla: {e}") from e
    derived: dict[str, tuple[torch.Tensor, str]] = {}
    residual = []
    for i in range(cfg.num_layers):
        attn, p = model.layers[i].attn, f"layers.{i}.attn"
        dtype = attn.q_proj.weight.dtype
        wq = attn.q_proj.weight.double().cpu().view(hq, d, -1)
        wk = attn.k_proj.weight.double().cpu().view(g, d, -1)
        wv = attn.v_proj.weight.double().cpu().view(g, dv, -1)
        u = torch.stack([_shared_key(wk[:, _pair_rows(j, rot)], moments[i]) for j in kept.pairs], dim=1)  # [G, n]
        u_rows = torch.cat((u, u), dim=1)  # [G, 2n] per rotary channel, rotate-half order
        k_pe = torch.einsum("gc,gcx->cx", u_rows, wk[:, rope_rows])  # [2n, hidden]
        q_pe = wq[:, rope_rows] * u_rows.repeat_interleave(per, 0)[:, :, None]  # [H, 2n, hidden]
        q = torch.cat((wq[:, nope_rows], q_pe), dim=1).reshape(hq * m.qk_head_dim, -1)
        joint = torch.cat((wk[:, nope_rows].reshape(g * dn, -1), wv.reshape(g * dv, -1)))  # [G (dn + dv), hidden]
        up, down = factorise(joint, rank)
        residual.append(float((joint - up @ down).norm() / joint.norm().clamp_min(1e-30)))
        up_k, up_v = up[:g * dn].view(g, dn, rank), up[g * dn:].view(g, dv, rank)
        kv_b = torch.cat((up_k, up_v), dim=1).repeat_interleave(per, 0).reshape(hq * (dn + dv), rank)
        kv = f"{p}.k_proj.weight {p}.v_proj.weight"
        how_q = (f"{p}.q_proj.weight rows permuted to [non-rotary, kept rotary pairs {list(kept.pairs)}], the rotary "
                 "rows times the shared-key weights")
        how_a = (f"joint SVD (rank {rank}) of {kv} (non-rotary K rows and V): down-projection; then the shared "
                 "rotary key: principal component over the KV heads of each kept pair")
        how_b = f"joint SVD (rank {rank}) of {kv}: up-projection, per query head its group's rows"
        derived[f"{p}.q_proj.weight"] = (q.to(dtype), how_q)
        derived[f"{p}.kv_a_proj_with_mqa.weight"] = (torch.cat((down, k_pe)).to(dtype), how_a)
        derived[f"{p}.kv_b_proj.weight"] = (kv_b.to(dtype), how_b)
    out = convert(model, new, derived=derived, technique=what)
    exact = g == 1 and rope_dims == rot
    out.report.notes += [
        f"kept rotary pairs {list(kept.pairs)} of {rot // 2} (select={select}, scored on "
        f"{'text' if ids is not None else 'weights'}); the others lose their rotation" if rope_dims < rot else
        f"all {rot // 2} rotary pairs kept",
        "one shared rotary key: " + ("the single KV head's (exact)" if g == 1 else
                                     f"principal component of the {g} KV heads per kept pair (approximate)"),
        f"joint K/V SVD at rank {rank}: relative Frobenius residual max {max(residual):.3g} over layers",
        "latent without RMSNorm (mla.latent_norm=false)",
        "nothing approximated: reproduces the source to float rounding" if exact and max(residual) < 1e-6 else
        "approximate: recover by distillation",
    ]
    return out


def _mla_technique(model, value, opts, ids):
    from .techniques import _int, _no_options

    _no_options("mla", opts, ("rank", "rope", "select"))
    if value is not None and "rank" in opts:
        raise RetrofitError("mla: give the rank once (mla:128 or mla:rank=128)")
    rank = opts.get("rank", value)
    if rank is None:
        raise RetrofitError("mla: needs a latent rank, e.g. mla:rank=128,rope=32")
    rope = opts.get("rope")
    return to_mla(model, _int("mla", "rank", rank), None if rope is None else _int("mla", "rope", rope),
                  opts.get("select", "2norm"), ids=ids)


def _register() -> None:
    from .techniques import Technique, register

    register(Technique("mla", "GQA/MHA -> DeepSeek MLA: partial RoPE (rope= kept rotary channels, 2-norm selected) "
                       "and a joint SVD of K/V at latent rank (MHA2MLA / TransMLA)", "mla:rank=128,rope=32",
                       _mla_technique))


_register()
__all__ = ["RopePairs", "factorise", "input_moments", "select_pairs", "to_mla"]
