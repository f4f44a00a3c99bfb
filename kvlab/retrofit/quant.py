"""KV-cache quantization as a training-free retrofit point (kvlab/costs/quant.py formats: ``int8``, ``int4-g32-r64``,
``fp8``, ...): the weights are the source's own tensors, the caches the model makes hold K/V quantized.

A cache format is a run-time option, not a checkpoint change: ``kvlab.load(...)`` then ``new_cache(...,
kv_quant=...)`` or ``--kv-quant`` on the verbs; the model returned here carries ``kv_quant`` so the report prices
and measures the quantized cache.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..costs import costs
from ..costs.quant import quant_name, resolve_kv_quant
from ..model import Model
from .core import Converted, Report, RetrofitError


def check_kv_quant(config: ModelConfig, fmt: str) -> None:
    """RetrofitError unless the cache format applies to every layer of ``config`` (the calculator prices it)."""
    try:
        costs(config, context=1, kv_quant=resolve_kv_quant(fmt))
    except ValueError as e:
        raise RetrofitError(f"kv-quant: {e}") from e


def to_kv_quant(model: Model, fmt: str) -> Converted:
    """``model`` whose caches are quantized as ``fmt`` (same weights, no copy)."""
    from ..eval.variant import with_kv_quant  # kvlab.eval reads text (tokenizers): only when converting

    check_kv_quant(model.config, fmt)  # a layer the format names that the model lacks: refused now, not at new_cache
    try:
        q = resolve_kv_quant(fmt)
        out = with_kv_quant(model, q)
    except ValueError as e:
        raise RetrofitError(f"kv-quant: {e}") from e
    out.kv_quant = q
    name = quant_name(q)
    report = Report(f"kv-quant:{name}", model.config.name, out.config.name,
                    carried=list(model.state_dict()),
                    notes=[(f"weights unchanged; K/V cached as {name} (a run-time cache format: pass kv_quant / "
                           "--kv-quant when running the saved checkpoint)")])
    return Converted(out, report)
