"""Serve a converted model elsewhere: :func:`export_hf` writes a transformers checkpoint (``config.json`` +
``model.safetensors`` with HF tensor names) for the configs an existing transformers 5.23 architecture expresses,
so vLLM / SGLang can serve it (TransMLA ships its MLA conversions the same way, as ``DeepseekV3ForCausalLM``).

- **MLA** (kvlab/retrofit/mla.py) -> ``DeepseekV3ForCausalLM`` (dense MLP on every layer: ``first_k_dense_replace``
  = layers). Two things DeepSeek's layer fixes that the retrofit changes are folded into the weights:
  the softmax scale (DeepSeek: ``qk_head_dim^-0.5``; a pinned ``attn_scale`` multiplies ``q_proj``), and the latent
  RMSNorm DeepSeek always applies (``kv_a_layernorm``, eps 1e-6) where kvlab's layer has none
  (``latent_norm=false``): the latent rows of ``kv_a_proj_with_mqa`` are scaled by a tiny ``s`` so that
  ``mean(c^2) <= 1e-10 eps`` for every input the attention norm can produce, where the norm is linear to 5e-11
  (``c / sqrt(mean(c^2) + eps) ~= c / sqrt(eps)``), and its weight ``sqrt(eps) / s`` undoes the scale. The latent is
  then ~1e-8 in magnitude: exact in fp32 and bf16 (8-bit exponents), not for fp16 (it underflows there).
- **sliding windows** (kvlab/retrofit/window.py): the source family writes its own ``layer_types`` where it can
  (Qwen3, Gemma 3; Mistral when every layer slides). A Llama-layout model (SmolLM2) with a per-layer pattern
  becomes ``SmolLM3ForCausalLM``: transformers' Llama-layout decoder with per-layer ``layer_types`` (sliding or
  full), no biases and a per-layer RoPE switch (``no_rope_layers``, all ones here) — exactly Llama plus windows,
  where Qwen2 would need zero q/k/v biases and Mistral has one window for every layer.
- anything else (sink tokens, sharing, MLA with a q rank or several attention shapes, ...) is an :class:`ExportError`
  naming what no architecture expresses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from .. import kinds
from ..config import ModelConfig
from ..families import FAMILIES, to_hf_config
from ..families.base import Family, hf_config, llama_names
from ..families.deepseek_v3 import ARCH
from ..layers.mla import LATENT_NORM_EPS
from ..model import Model
from .core import RetrofitError

SMOLLM3 = "SmolLM3ForCausalLM"
LINEAR_MARGIN = 1e-10  # mean(c^2) / eps bound of the latent fed to DeepSeek's kv_a_layernorm


class ExportError(RetrofitError):
    """A model no transformers architecture expresses exactly (names what would be needed)."""


def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def export_hf(model: Model, path: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` as a transformers checkpoint directory ``path`` (``config.json``, ``model.safetensors``,
    the tokenizer when given); ``AutoModelForCausalLM.from_pretrained(path)`` gives the same logits. An existing
    non-empty ``path`` is refused. ExportError when no transformers architecture expresses the model."""
    from safetensors.torch import save_file

    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if any(x.attention == "mla" for x in cfg.layers):
        hf, state, family = _mla(model, cfg, state)
    else:
        hf, family = _gqa(cfg)
    names = {}
    for k in state:
        n = family.hf_name(k) if family is not None else _llama_name(k)
        if n is None:
            raise ExportError(f"export: tensor {k!r} has no {hf['architectures'][0]} name")
        names[k] = n
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export: {str(out)!r} already exists and is not an empty directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    hf["dtype"] = _dtype_name(next(model.parameters()).dtype)
    weights = {names[k]: v.to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    if tokenizer is not None:
        from ..tokenizer import save_tokenizer

        save_tokenizer(tokenizer, out)
    return out


def _llama_name(k: str) -> str | None:
    return Family("", lambda c: c, lambda s, c: s, llama_names()).hf_name(k)


def _gqa(cfg: ModelConfig) -> tuple[dict[str, Any], Any]:
    sinks = [i for i, x in enumerate(cfg.layers) if kinds.gqa.sink_tokens(x)]
    if sinks:
        raise ExportError(f"export: layers {sinks} keep sink tokens in their sliding window (StreamingLLM); no "
                          "transformers architecture has that attention (it would need a sliding-window mask that "
                          "keeps the first positions visible, e.g. a custom attention function)")
    try:
        d = to_hf_config(cfg)
        return d, FAMILIES[d["architectures"][0]]
    except ValueError as e:
        first = str(e)
    plain = all(x.attention == "gqa" and x.kv_source is None and x.gqa == kinds.GQASpec()
                and not (x.qkv_bias or x.o_bias or x.sinks or x.output_gate or x.sandwich_norm or x.layer_scalar
                         or x.mlp != "dense")
                and x.rope is not None and repr(x.rope) == repr(cfg.layers[0].rope) for x in cfg.layers)
    windows = {x.window for x in cfg.layers if x.window is not None}
    same_shape = len({(x.num_heads, x.num_kv_heads, x.head_dim, x.value_dim, x.intermediate_size, x.activation)
                      for x in cfg.layers}) == 1
    if plain and same_shape and len(windows) == 1 and not (cfg.norm_offset or cfg.embed_scale or cfg.ple_dim
                                                           or cfg.final_logit_softcap or cfg.mhc_streams):
        return _smollm3(cfg, windows.pop()), None
    raise ExportError(f"export: {cfg.name}: {first}; a Llama-layout decoder with one sliding window on some layers "
                      f"exports as {SMOLLM3}, an MLA conversion as DeepseekV3ForCausalLM; this model needs an "
                      "architecture with its other features (shared K/V, several windows or attention shapes, ...)")


def _smollm3(cfg: ModelConfig, window: int) -> dict[str, Any]:
    n = cfg.num_layers
    types = ["sliding_attention" if x.window else "full_attention" for x in cfg.layers]
    return hf_config(cfg, SMOLLM3, "smollm3", layer_types=types, use_sliding_window=True, sliding_window=window,
                     no_rope_layers=[1] * n, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _mla(model: Model, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict, Any]:
    layers = []
    state = dict(state)
    for i, x in enumerate(cfg.layers):
        if x.attention != "mla":
            raise ExportError(f"export: layers[{i}] is a {x.attention!r} layer; DeepseekV3ForCausalLM has MLA on "
                              "every layer")
        m = x.mla
        p = f"layers.{i}.attn"
        if x.attn_scale is not None:  # DeepSeek scales by qk_head_dim^-0.5 (no YaRN mscale here): fold the rest in q
            if x.rope is not None and x.rope.mscale_all_dim:
                raise ExportError(f"export: layers[{i}] pins attn_scale with a YaRN mscale_all_dim rope; "
                                  "DeepseekV3ForCausalLM would square the mscale into it")
            f = x.attn_scale / m.qk_head_dim ** -0.5
            for k in (f"{p}.q_proj.weight", f"{p}.q_b_proj.weight"):
                if k in state:
                    state[k] = state[k] * f
        if not m.latent_norm:
            w = state[f"{p}.kv_a_proj_with_mqa.weight"]
            b = state.get(f"{p}.kv_a_proj_with_mqa.bias")
            norm = model.layers[i].attn_norm.weight.detach().float()
            g = float((norm + 1 if cfg.norm_offset else norm).abs().max())
            lat = w[:m.kv_lora_rank].double()
            sigma = float(torch.linalg.matrix_norm(lat, ord=2)) * g * math.sqrt(cfg.hidden_size)
            if b is not None:
                sigma += float(b[:m.kv_lora_rank].double().norm())
            bound = sigma * sigma / m.kv_lora_rank  # >= mean(c^2) for every normalised input
            s = math.sqrt(LATENT_NORM_EPS * LINEAR_MARGIN / max(bound, 1e-30))
            scale = torch.ones(w.shape[0], 1, dtype=torch.float64)
            scale[:m.kv_lora_rank] = s
            state[f"{p}.kv_a_proj_with_mqa.weight"] = (w.double() * scale).to(w.dtype)
            if b is not None:
                state[f"{p}.kv_a_proj_with_mqa.bias"] = (b.double() * scale[:, 0]).to(b.dtype)
            state[f"{p}.kv_a_layernorm.weight"] = torch.full((m.kv_lora_rank,), math.sqrt(LATENT_NORM_EPS) / s
                                                             - (1.0 if cfg.norm_offset else 0.0), dtype=w.dtype)
        layers.append(dataclasses.replace(x, attn_scale=None, mla=dataclasses.replace(m, latent_norm=True)))
    new = dataclasses.replace(cfg, layers=layers, family=ARCH)
    try:
        d = to_hf_config(new)
    except ValueError as e:
        raise ExportError(f"export: {cfg.name}: {e}") from e
    return d, state, FAMILIES[ARCH]
