"""What every checkpoint family shares: the :class:`Family` record and the HF decoder conventions.

Most families store weights under the same Hugging Face names (``model.layers.{i}.self_attn.q_proj``
...). A family lists its names as template pairs ``HF name -> kvlab name`` with ``{i}`` for the layer
index; :func:`rename` applies them, stacks per-expert MoE weights into kvlab's 3-D expert tensors and
passes unknown names through untouched so the shape check reports them by their HF name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import RopeSpec

if TYPE_CHECKING:
    from torch import Tensor
else:
    Tensor = "torch.Tensor"  # annotations only: a family's config side (what the calculator reads) needs no torch
HFState = Mapping[str, Tensor]

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # non-persistent buffer some old checkpoints hold


@dataclass(frozen=True)
class Family:
    """One checkpoint family: ``config.json`` <-> ModelConfig, HF tensor names -> kvlab names.

    ``to_hf_config(cfg) -> dict`` writes the transformers ``config.json`` of ``cfg``'s shape (with
    ``architectures`` and ``model_type``) or raises ValueError when the family cannot hold that shape;
    ``kvlab.families.to_hf_config`` checks that the family reads it back as the same layers.
    """

    architecture: str
    config_from_hf: Callable[[dict[str, Any]], Any]
    map_weights: Callable[[HFState, Any], dict[str, Tensor]]
    names: dict[str, str] = field(default_factory=dict)  # HF template -> kvlab template, for messages
    keep_fp32: Callable[[str], bool] | None = None  # checkpoint names loaded in fp32 whatever the dtype
    to_hf_config: Callable[[Any], dict[str, Any]] | None = None  # ModelConfig -> config.json; None: not written

    def hf_name(self, kvlab_name: str) -> str | None:
        """The HF name a kvlab tensor comes from (best effort, for error messages)."""
        key, idx = _template(kvlab_name)
        for hf, kv in self.names.items():
            if kv == key:
                return hf.format(i=idx)
        return None


def _template(name: str) -> tuple[str, str]:
    """``model.layers.3.x`` -> (``model.layers.{i}.x``, ``3``); names without an index are unchanged."""
    m = re.match(r"^(.*?\.)(\d+)(\..*)?$", name)
    if not m:
        return name, ""
    return f"{m.group(1)}{{i}}{m.group(3) or ''}", m.group(2)


def llama_names(qk_norm: bool = False, moe: bool = False) -> dict[str, str]:
    """HF -> kvlab name templates of a Llama-layout decoder (Llama, Mistral, Qwen2/3, Qwen3-MoE)."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight",
             "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
             "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight"}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for s in ("weight", "bias"):
            names[f"model.layers.{{i}}.self_attn.{p}.{s}"] = f"layers.{{i}}.attn.{p}.{s}"
    if qk_norm:
        for p in ("q_norm", "k_norm"):
            names[f"model.layers.{{i}}.self_attn.{p}.weight"] = f"layers.{{i}}.attn.{p}.weight"
    for p in ("gate_proj", "up_proj", "down_proj"):
        for s in ("weight", "bias"):
            names[f"model.layers.{{i}}.mlp.{p}.{s}"] = f"layers.{{i}}.mlp.{p}.{s}"
    if moe:
        names["model.layers.{i}.mlp.gate.weight"] = "layers.{i}.mlp.router.weight"
        for p in ("gate_proj", "up_proj", "down_proj"):
            names[f"model.layers.{{i}}.mlp.experts.*.{p}.weight"] = f"layers.{{i}}.mlp.experts.{p}"
            names[f"model.layers.{{i}}.mlp.shared_expert.{p}.weight"] = f"layers.{{i}}.mlp.shared.{p}.weight"
    return names


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def rename(hf_state: HFState, names: dict[str, str]) -> dict[str, Tensor]:
    """Apply ``names`` to every tensor; stack per-expert weights ``[E, ...]``; split fused gate_up.

    Unknown names pass through unchanged (the shape check then reports them as unexpected).
    """
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in hf_state:
        if IGNORED.search(name):
            continue
        if m := _EXPERT.match(name):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = name
            continue
        if m := _FUSED.match(name):
            i, kind = m.groups()
            t = hf_state[name]
            if kind == "down_proj":
                out[f"layers.{i}.mlp.experts.down_proj"] = t
            else:  # [E, 2I, H]: gate rows first, then up (transformers' chunk(2, dim=-1) of the output)
                gate, up = t.chunk(2, dim=1)
                out[f"layers.{i}.mlp.experts.gate_proj"] = gate.contiguous()
                out[f"layers.{i}.mlp.experts.up_proj"] = up.contiguous()
            continue
        key, idx = _template(name)
        target = names.get(key)
        out[target.format(i=idx) if target else name] = hf_state[name]
    import torch  # weight work: the config side of a family (what the calculator reads) imports without torch

    for (i, proj), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            for n in by_index.values():  # a gap: leave them unstacked so the check names them
                out[n] = hf_state[n]
            continue
        out[f"layers.{i}.mlp.experts.{proj}"] = torch.stack([hf_state[by_index[e]] for e in range(len(by_index))])
    return out


def drop_tied_head(state: dict[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """With tied embeddings kvlab has no lm_head: drop a stored copy equal to the embedding.

    A stored lm_head that differs from the embedding contradicts ``tie_word_embeddings`` and is an error.
    """
    if tied and "lm_head.weight" in state:
        head, emb = state["lm_head.weight"], state.get("embed.weight")
        if emb is not None and head.shape == emb.shape and not head.equal(emb):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight although config.json sets "
                             "tie_word_embeddings=true; refusing to guess which one the model uses")
        if emb is not None:
            del state["lm_head.weight"]
    return state


# -- config.json helpers ----------------------------------------------------------------------------


def with_defaults(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``defaults`` filled in for absent keys (the family's config-class defaults)."""
    return {**defaults, **cfg}


def text_part(cfg: dict[str, Any], defaults: dict[str, Any], arch: str, cg_arch: str) -> tuple[dict[str, Any], str]:
    """The defaults-filled text config of a causal-LM config or of the ``text_config`` of a multimodal
    ``...ForConditionalGeneration`` config (whose own ``tie_word_embeddings`` decides the lm head's tie; Gemma 3/4),
    and the architecture it came from."""
    if cg_arch in (cfg.get("architectures") or []) or "text_config" in cfg:
        text = dict(cfg.get("text_config") or {})
        if "tie_word_embeddings" in cfg:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return {**defaults, **text}, cg_arch
    return {**defaults, **cfg}, arch


def rope_dict(r: RopeSpec) -> dict[str, Any]:
    """One RoPE as transformers' ``rope_parameters`` (the inverse of :func:`rope_from_hf`)."""
    d: dict[str, Any] = {"rope_type": r.scaling, "rope_theta": r.theta}
    if r.partial != 1.0:
        d["partial_rotary_factor"] = r.partial
    if r.scaling != "default":
        d["factor"] = r.factor
    if r.scaling in ("llama3", "yarn"):
        d["original_max_position_embeddings"] = r.original_max_positions
    if r.scaling == "llama3":
        d.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.scaling == "yarn":
        d.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, attention_factor=r.attention_factor,
                 mscale=r.mscale, mscale_all_dim=r.mscale_all_dim, truncate=r.truncate)
    return d


def hf_config(config: Any, arch: str, model_type: str, **extra: Any) -> dict[str, Any]:
    """The Llama-layout ``config.json`` keys of ``config`` (first layer's heads, widest MLP), then ``extra``.

    Every family's ``to_hf_config`` starts from these and adds or overrides its own keys.
    """
    x = config.layers[0]
    acts = {v: k for k, v in reversed(list(ACTIVATIONS.items()))}
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": x.num_heads, "num_key_value_heads": x.num_kv_heads, "head_dim": x.head_dim,
        "intermediate_size": max([layer.intermediate_size for layer in config.layers] + [1]),
        "max_position_embeddings": config.max_positions, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": acts.get(x.activation, x.activation),
        "attention_bias": x.qkv_bias, "mlp_bias": x.mlp_bias,
        "rope_parameters": rope_dict(x.rope) if x.rope is not None else None,
        **extra, "architectures": [arch], "model_type": model_type,
    }


def single_window(config: Any, arch: str) -> int | None:
    """The one sliding window of ``config``'s window layers (None without any); ValueError for several."""
    windows = sorted({x.window for x in config.layers if x.window is not None})
    if len(windows) > 1:
        raise ValueError(f"{arch} has one sliding window; {config.name} has {windows}")
    return windows[0] if windows else None


def activation(cfg: dict[str, Any], arch: str) -> str:
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{arch} config.json: hidden_act={act!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def kv_heads(cfg: dict[str, Any]) -> int:
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


def rope_from_hf(cfg: dict[str, Any], arch: str, partial: bool = True) -> RopeSpec:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (older).

    As in transformers: ``rope_scaling`` wins over ``rope_parameters``; ``rope_theta`` and
    ``partial_rotary_factor`` may sit at top level; llama3/yarn fall back to ``max_position_embeddings``
    for ``original_max_position_embeddings``; a yarn ``factor`` of null means max / original.
    ``partial=False``: ignore ``partial_rotary_factor`` (the model rotates the whole head regardless).
    """
    p = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    if p and all(isinstance(v, dict) for v in p.values()):
        raise ValueError(f"{arch} config.json: per-layer-type rope_parameters ({', '.join(p)}) are not supported "
                         "for this family")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{arch} config.json: rope_type={kind!r} is not supported; allowed: {', '.join(ROPE_TYPES)}")
    theta = p.get("rope_theta", cfg.get("rope_theta", 10000.0))
    frac = (p.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0) if partial else 1.0
    spec = RopeSpec(theta=float(theta), partial=float(frac), scaling=kind)
    if kind == "default":
        return spec
    orig = p.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn"):
        orig = orig or cfg.get("max_position_embeddings")
        spec.original_max_positions = int(orig) if orig else None
    factor = p.get("factor")
    if factor is None and kind == "yarn" and orig:
        factor = cfg["max_position_embeddings"] / orig
    if factor is None:
        raise ValueError(f"{arch} config.json: rope_type={kind!r} needs a 'factor'")
    spec.factor = float(factor)
    if kind == "llama3":
        spec.low_freq_factor = float(p.get("low_freq_factor", 1.0))
        spec.high_freq_factor = float(p.get("high_freq_factor", 4.0))
    if kind == "yarn":
        spec.beta_fast = float(p.get("beta_fast") or 32.0)
        spec.beta_slow = float(p.get("beta_slow") or 1.0)
        spec.attention_factor = p.get("attention_factor")
        spec.mscale = p.get("mscale")
        spec.mscale_all_dim = p.get("mscale_all_dim")
        spec.truncate = bool(p.get("truncate", True))
    return spec
