"""Variants of a loaded model that share its weights: the same model under another cache policy.

``with_window(model, 512)`` gives every attention layer a sliding window of 512 positions (``None``: all layers
global); ``with_kv_quant(model, "int4-g32")`` keeps the layers and quantizes the K/V cache (kvlab/costs/quant.py);
the weights are the reference's own tensors, not copies, so a variant costs no memory but its cache.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools

import torch

from .. import kinds
from ..config import ModelConfig
from ..costs.quant import quant_name, resolve_kv_quant
from ..model import Model


class VariantError(ValueError):
    """A variant that cannot be built on this model."""


def share_weights(config: ModelConfig, model: Model) -> Model:
    """A Model built from ``config`` whose parameters and buffers are ``model``'s own tensors (same shapes)."""
    with torch.device("meta"):
        out = Model(config)
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        mod_name, _, attr = name.rpartition(".")
        try:
            mod = out.get_submodule(mod_name)
            old = getattr(mod, attr)
        except AttributeError as e:
            raise VariantError(f"the variant has no tensor {name!r}: it changes the model's structure") from e
        if old.shape != t.shape:
            raise VariantError(f"the variant changes tensor {name!r} from {tuple(t.shape)} to {tuple(old.shape)}")
        (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = t
    left = [n for n, t in itertools.chain(out.named_parameters(), out.named_buffers()) if t.is_meta]
    if left:
        raise VariantError(f"the variant has tensors the model lacks: {', '.join(left[:5])}")
    return out.eval()


def with_window(model: Model, window: int | None, sink_tokens: int = 0) -> Model:
    """Every layer's attention limited to a sliding ``window`` (None: every layer global), same weights;
    ``sink_tokens``: each window layer also keeps its first that many positions visible (StreamingLLM's attention
    sinks, arXiv 2309.17453; ``GQASpec.sink_tokens``)."""
    if window is not None and (not isinstance(window, int) or window < 1):
        raise VariantError(f"window={window!r}: must be a positive integer or None (all layers global)")
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise VariantError(f"sink_tokens={sink_tokens!r}: must be a non-negative integer")
    if sink_tokens and window is None:
        raise VariantError(f"sink_tokens={sink_tokens}: needs a window (global layers already see every position)")
    cfg = copy.deepcopy(model.config)
    for spec in cfg.layers:
        if "window" not in kinds.get(spec.attention).options:
            raise VariantError(f"a window variant needs layers with a sliding-window option; layer kind "
                               f"{spec.attention!r} has none")
        if sink_tokens and spec.gqa is None:
            raise VariantError(f"sink_tokens={sink_tokens}: layer kind {spec.attention!r} has no sink-token option "
                               f"(GQASpec.sink_tokens: kinds {', '.join(kinds.with_spec(kinds.GQASpec))})")
        spec.window = window
        if spec.gqa is not None:
            spec.gqa = dataclasses.replace(spec.gqa, sink_tokens=sink_tokens)
    label = "all global" if window is None else f"window {window}" + (f" + {sink_tokens} sink tokens"
                                                                      if sink_tokens else "")
    cfg.name = f"{cfg.name} ({label})"
    cfg.validate()
    return share_weights(cfg, model)


def with_kv_quant(model: Model, kv_quant) -> Model:
    """The same model whose caches (``new_cache``) hold K/V quantized as ``kv_quant`` (``"int8"``,
    ``"int4-g32-r64-rot"``, a QuantSpec...; kvlab/costs/quant.py), same weights."""
    q = resolve_kv_quant(kv_quant)  # a named error now
    out = share_weights(copy.deepcopy(model.config), model)
    out.config.name = f"{out.config.name} (KV {quant_name(q)})"
    out.new_cache = functools.partial(Model.new_cache, out, kv_quant=q)  # this instance's caches are quantized
    return out
