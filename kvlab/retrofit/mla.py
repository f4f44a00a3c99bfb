"""GQA/MHA -> MLA as a retrofit: partial RoPE plus a joint low-rank factorisation of the K/V projections
(MHA2MLA, Ji et al. 2025, arXiv 2502.14837; TransMLA, Meng et al. 2025, arXiv 2502.07864), decoded in kvlab's
absorbed latent form (kvlab/layers/mla.py, kvlab/cache/latent.py).

For a gqa layer with ``H`` query heads, ``G`` KV heads of dim ``D`` (``rot`` of them rotary: pairs
``(j, j + rot/2)``, frequency ``theta^(-2j/rot)``) and values of dim ``Dv``, keeping ``n = rope_dims / 2`` pairs:

- **partial RoPE**: the kept pairs ``S`` keep their rotation; every other channel of K and Q becomes non-rotary.
  DeepSeek's RoPE rotates ``d_rope`` channels with geometric frequencies and one RoPE serves the whole model
  (``DeepseekV3Config`` has one), so ``S`` is one arithmetic progression of pair indices ``{j0 + k i}``: then
  ``theta' = theta^(2kn/rot)`` and a linear scaling ``factor = theta^(2 j0/rot)`` give kept pair ``i`` exactly the
  source's frequency. ``select='high'`` (default): the ``n`` highest frequencies (MHA2MLA's S_high; measured best
  without training on SmolLM2-135M, docs/retrofit.md); ``'2norm'``: the progression with the largest MHA2MLA
  "2-norm" score ``sum_h ||q_h,j|| ||k_g(h),j||`` (summed over layers; norms under ``E[x x^T]`` of the attention
  inputs over ``ids``, or the weights alone without ``ids``); ``'uniform'``: every ``rot/2n``-th pair (S_uniform).
- **one shared rotary key**: DeepSeek MLA caches one ``k_pe`` for all heads. For each kept pair, ``k_pe`` is the
  principal component across the ``G`` KV heads of that pair's key channels (the top eigenvector ``u`` of their
  ``G x G`` Gram matrix under ``E[x x^T]``; TransMLA's RoRoPE idea), and query head ``h`` of group ``g`` reads it
  with ``u_g q_h``. What ``k_pe`` misses of each head's kept channels (``k_g - u_g k_pe``) stays in the key as
  non-rotary channels (``G > 1``: ``qk_nope_head_dim = D``, the softmax scale kept at ``D^-0.5``), so only its
  rotation is lost. Exact for one KV head (MQA) or KV heads whose kept rotary rows are equal.
- **joint SVD**: ``M = [W_k_nope (G dn rows); W_v (G Dv rows)] = U S V^T``; at latent rank ``r``
  ``W_down = S_r^(1/2) V_r^T`` (``kv_a_proj_with_mqa``'s first ``r`` rows, with the ``k_pe`` rows after them) and
  ``W_up = U_r S_r^(1/2)`` (``kv_b_proj``: per query head the up rows of its group's ``k_nope`` and ``v``). With
  ``ids`` the SVD minimises the K/V error on the measured inputs (of ``M C^(1/2)``, ``C = E[x x^T]``). Full rank
  (``r = rank M``) reproduces ``M`` to float rounding.
- the latent has no RMSNorm (``MLASpec.latent_norm=False``): DeepSeek's ``kv_a_layernorm`` would rescale every
  token's K/V by ``1/rms(c_kv)``, which no factorisation of a linear K/V can reproduce.

Cache per token and layer: ``r + 2n`` values instead of ``G (D + Dv)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .. import kinds
from ..config import LayerSpec, MLASpec, ModelConfig, RopeSpec
from ..errors import RetrofitError
from ..model import Model
from .core import Converted, Derived, convert
from .techniques import SELECT, SVD


@dataclasses.dataclass(frozen=True)
class RopePairs:
    """The kept rotary pairs: ``pairs`` (source pair indices ``j0 + k i``), ``rot`` (the source's rotary channels)
    and the RopeSpec of the MLA layers that rotates them with the source's frequencies."""

    pairs: tuple[int, ...]
    rot: int
    rope: RopeSpec


def _check(cfg: ModelConfig, rank: int, rope_dims: int | None, select: str, svd: str, text: bool) -> tuple[int, int]:
    """Every layer a plain gqa layer of one shape and rope; (rot, rope_dims). RetrofitError before any work; ``text``:
    calibration text will be given."""
    first = cfg.layers[0]
    if select not in SELECT:
        raise RetrofitError(f"mla: select={select!r}; allowed: {', '.join(SELECT)}")
    if svd not in SVD:
        raise RetrofitError(f"mla: svd={svd!r}; allowed: {', '.join(SVD)}")
    if svd == "activations" and not text:
        raise RetrofitError("mla: svd='activations' measures the inputs on text: give ids=...")
    for i, x in enumerate(cfg.layers):
        where = f"mla: layers[{i}]"
        if not kinds.takes(x.attention, "mla"):
            raise RetrofitError(f"{where} is a {x.attention!r} layer; the MLA retrofit converts {kinds.taking('mla')} "
                                "layers")
        g = kinds.gqa.options_of(x)
        bad = [n for n, v in (("kv_source", x.kv_source is not None), ("window", x.window is not None),
                              ("sinks", x.sinks), ("gqa.qk_norm", g.qk_norm), ("qkv_bias", x.qkv_bias),
                              ("output_gate", x.output_gate is not None), ("gqa.v_norm", g.v_norm),
                              ("gqa.k_eq_v", g.k_eq_v), ("gqa.sink_tokens", g.sink_tokens))
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
            or rope_dims > rot:
        raise RetrofitError(f"mla: rope_dims={rope_dims!r} must be an even number of rotary channels in [2, {rot}]")
    if rope_dims < rot and first.rope.scaling != "default":
        raise RetrofitError(f"mla: rope_dims={rope_dims} < {rot} keeps some rotary pairs, which needs the source's "
                            f"plain RoPE frequencies; layers[0].rope.scaling={first.rope.scaling!r} (keep all "
                            f"{rot} rotary channels, rope_dims={rot})")
    g = first.num_kv_heads
    dn = d if g > 1 else d - rope_dims
    if dn < 1:
        raise RetrofitError(f"mla: rope_dims={rope_dims} makes every channel of the single KV head rotary; MLA keys "
                            f"need a non-rotary part: rope_dims must be below head_dim={d}")
    width = g * (dn + first.value_dim)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or rank > min(width, cfg.hidden_size):
        raise RetrofitError(f"mla: rank={rank!r} must be an integer in [1, {min(width, cfg.hidden_size)}]: the joint "
                            f"K/V width is {g} KV heads x ({dn} non-rotary key + {first.value_dim} value channels) = "
                            f"{width}" +
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


def _stats(attn, c: torch.Tensor, hq: int, g: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[q_c^2] [H, D]`` per query channel and the key Gram ``E[k_(g,c) k_(g',c')] [G, D, G, D]`` under the input
    moments ``c``."""
    wq = attn.q_proj.weight.double().cpu()
    wk = attn.k_proj.weight.double().cpu()
    q2 = ((wq @ c) * wq).sum(-1).view(hq, d)
    return q2, (wk @ c @ wk.T).view(g, d, g, d)


@torch.no_grad()
def select_pairs(model: Model, rope_dims: int, select: str = "high",
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
            q2, kg = _stats(model.layers[i].attn, c, hq, g, d)
            k2 = torch.stack([kg[h, :, h, :].diagonal() for h in range(g)])  # [G, D]
            qn = (q2[:, :half] + q2[:, half:rot]).clamp_min(0).sqrt()  # [H, half]
            kn = (k2[:, :half] + k2[:, half:rot]).clamp_min(0).sqrt().repeat_interleave(hq // g, 0)
            score += (qn * kn).sum(0)
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


def factorise(m: torch.Tensor, rank: int, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``M [rows, hidden] ~= up [rows, rank] @ down [rank, hidden]`` by truncated SVD (fp64), the singular values
    split evenly (``up = U_r S_r^(1/2)``, ``down = S_r^(1/2) V_r^T``); exact to rounding at ``rank >= rank(M)``.
    ``c``: the inputs' ``E[x x^T]``: minimise ``E||M x - up down x||^2`` instead (SVD of ``M C^(1/2)``, then
    ``down C^(-1/2)``; eigenvalues below 1e-10 of the largest are floored there)."""
    m = m.double()
    if c is None:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]
    lam, q = torch.linalg.eigh(c.double())
    lam = lam.clamp_min(float(lam.max()) * 1e-10)
    up, down = factorise(m @ (q * lam.sqrt()) @ q.T, rank)
    return up, down @ (q * lam.rsqrt()) @ q.T


def _shared_key(kg: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``u [G]``: the top eigenvector of the KV heads' Gram matrix ``E[k_g . k_g']`` over one rotary pair's channels
    ``rows`` (``kg``: :func:`_stats`' key Gram), signed to sum >= 0 (the mean direction when the heads agree)."""
    gram = sum(kg[:, r, :, r] for r in rows)
    u = torch.linalg.eigh(gram)[1][:, -1]
    return u if u.sum() >= 0 else -u


def check_mla(config: ModelConfig, rank: int, rope_dims: int | None = None, select: str = "high",
              svd: str = "auto") -> None:
    """RetrofitError (naming the layer and option) unless the MLA conversion applies to a model of ``config``, from the
    config alone; calibration text is taken as given (``kvlab retrofit`` gives it)."""
    _check(config, rank, rope_dims, select, svd, True)


@torch.no_grad()
def to_mla(model: Model, rank: int, rope_dims: int | None = None, select: str = "high",
           svd: str = "auto", ids: torch.Tensor | Sequence[int] | None = None) -> Converted:
    """``model`` (gqa layers, one shape) converted to DeepSeek-style MLA with latent rank ``rank`` and ``rope_dims``
    rotary key channels (default: half the source's rotary channels); ``select`` the kept pairs (:data:`SELECT`, see
    the module doc); ``svd``: ``weights`` (plain SVD of the projections), ``activations`` (the SVD that minimises the
    K/V error on ``ids``' attention inputs), ``auto`` (activations when ``ids`` are given); ``ids``: real text the
    scores, shared-key directions and activation SVD are measured on (without it: the weights alone, ``E[x x^T] =
    I``). Checks everything before any work (RetrofitError naming the layer and option)."""
    rot, rope_dims = _check(model.config, rank, rope_dims, select, svd, ids is not None)
    aware = svd == "activations" or (svd == "auto" and ids is not None)
    cfg = model.config
    x0 = cfg.layers[0]
    d, dv, g, hq = x0.head_dim, x0.value_dim, x0.num_kv_heads, x0.num_heads
    per = hq // g
    moments = input_moments(model, ids)
    kept = select_pairs(model, rope_dims, select, moments)
    rope_rows = list(kept.pairs) + [j + rot // 2 for j in kept.pairs]  # rotate-half order of q_pe / k_pe
    nope_rows = [c for c in range(d) if c not in set(rope_rows)]
    dn = d if g > 1 else d - rope_dims  # non-rotary channels (+ the kept channels' residual off the shared key)
    m = MLASpec(kv_lora_rank=rank, qk_nope_head_dim=dn, qk_rope_head_dim=rope_dims, v_head_dim=dv,
                rope_interleave=False, latent_norm=False)
    rope = dataclasses.replace(kept.rope, partial=m.rope_partial)
    scale = x0.attn_scale
    if scale is None and (dn + rope_dims != d or x0.rope.mscale_all_dim):  # keep the source's D ** -0.5
        scale = d ** -0.5
    layers: list[LayerSpec] = [dataclasses.replace(x, attention="mla", num_kv_heads=1, head_dim=m.qk_head_dim,
                                                   v_head_dim=dv, rope=rope, mla=dataclasses.replace(m),
                                                   attn_scale=scale) for x in cfg.layers]
    what = f"mla:rank={rank},rope={rope_dims}" + (f",select={select}" if select != "high" else "") \
        + (f",svd={svd}" if svd != "auto" else "")
    new = dataclasses.replace(cfg, layers=layers, name=f"{cfg.name} ({what})", family=None)
    try:
        new.validate()
    except ValueError as e:
        raise RetrofitError(f"mla: {e}") from e
    derived: dict[str, Derived] = {}
    residual = []
    for i in range(cfg.num_layers):
        attn, p = model.layers[i].attn, f"layers.{i}.attn"
        dtype = attn.q_proj.weight.dtype
        wq = attn.q_proj.weight.double().cpu().view(hq, d, -1)
        wk = attn.k_proj.weight.double().cpu().view(g, d, -1)
        wv = attn.v_proj.weight.double().cpu().view(g, dv, -1)
        kg = _stats(attn, moments[i], hq, g, d)[1]
        u = torch.stack([_shared_key(kg, _pair_rows(j, rot)) for j in kept.pairs], dim=1)  # [G, n]
        u_rows = torch.cat((u, u), dim=1)  # [G, 2n] per rotary channel, rotate-half order
        k_pe = torch.einsum("gc,gcx->cx", u_rows, wk[:, rope_rows])  # [2n, hidden]
        q_pe = wq[:, rope_rows] * u_rows.repeat_interleave(per, 0)[:, :, None]  # [H, 2n, hidden]
        k_res = wk[:, rope_rows] - u_rows[:, :, None] * k_pe  # [G, 2n, hidden]: what k_pe misses, made non-rotary
        if g > 1:
            q = torch.cat((wq[:, nope_rows], wq[:, rope_rows], q_pe), dim=1).reshape(hq * m.qk_head_dim, -1)
            k_nope = torch.cat((wk[:, nope_rows], k_res), dim=1)  # [G, D, hidden]
        else:  # one KV head: k_pe is its key, nothing is left over
            q = torch.cat((wq[:, nope_rows], q_pe), dim=1).reshape(hq * m.qk_head_dim, -1)
            k_nope = wk[:, nope_rows]
        joint = torch.cat((k_nope.reshape(g * dn, -1), wv.reshape(g * dv, -1)))  # [G (dn + Dv), hidden]
        up, down = factorise(joint, rank, moments[i] if aware else None)
        residual.append(float((joint - up @ down).norm() / joint.norm().clamp_min(1e-30)))
        up_k, up_v = up[:g * dn].view(g, dn, rank), up[g * dn:].view(g, dv, rank)
        kv_b = torch.cat((up_k, up_v), dim=1).repeat_interleave(per, 0).reshape(hq * (dn + dv), rank)
        kv_src = (f"{p}.k_proj.weight", f"{p}.v_proj.weight")
        kv = " ".join(kv_src)
        how_q = (f"{p}.q_proj.weight rows permuted to [non-rotary, kept rotary pairs {list(kept.pairs)}], the rotary "
                 "rows times the shared-key weights")
        how_a = (f"joint SVD (rank {rank}) of {kv} (non-rotary K rows and V): down-projection; then the shared "
                 "rotary key: principal component over the KV heads of each kept pair")
        how_b = f"joint SVD (rank {rank}) of {kv}: up-projection, per query head its group's rows"
        derived[f"{p}.q_proj.weight"] = Derived(q.to(dtype), how_q, (f"{p}.q_proj.weight",))
        derived[f"{p}.kv_a_proj_with_mqa.weight"] = Derived(torch.cat((down, k_pe)).to(dtype), how_a, kv_src)
        derived[f"{p}.kv_b_proj.weight"] = Derived(kv_b.to(dtype), how_b, kv_src)
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


__all__ = ["RopePairs", "factorise", "input_moments", "select_pairs", "to_mla"]
