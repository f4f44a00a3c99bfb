"""Quantized KV-cache formats: the :class:`QuantSpec` a cache is built with, its parser, and its price.

A quantized per-position buffer (kvlab/cache/quant.py) of ``C`` slots x ``D`` channels holds:

- codes: ``C x Dq`` values of ``bits`` each (int4 / fp4: two per byte), ``Dq = D - tail``;
- scales (and zero points when asymmetric) in ``scale_dtype``: per token, one per ``group`` channels
  (``C x Dq / group``); K per channel (KIVI, arXiv 2402.02750), one per ``group`` positions and channel
  (``ceil(C / group) x Dq``: the last group padded);
- a full-precision residual of ``R + span - 1`` slots x ``Dq`` (``span`` = group for K per channel, else 1): the
  most recent ``R`` positions and the incomplete group, flushed into codes as they leave it;
- ``tail`` channels kept in the cache dtype (``rope_exact``: the rotary channels, as DeepSeek V4 keeps its 64).

:func:`buffer_bytes` prices one such buffer; the calculator (calculator.py) prices each kind's buffers (its
record's ``buffers``) with it, so ``Cache.nbytes()`` equals ``costs(..., kv_quant=...)`` byte for byte.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from kvlab import kinds
from kvlab.kinds import Buffer

from .dtypes import dtype_bytes

# format -> (bits per code, kind); fp formats have no zero points
FORMATS: dict[str, tuple[int, str]] = {"int8": (8, "int"), "int4": (4, "int"), "fp8": (8, "fp"),
                                       "fp8_e5m2": (8, "fp"), "fp4": (4, "fp")}
# bytes of one scale (or zero point) by scale dtype; e8m0: a power-of-two scale stored as its 8-bit exponent (the OCP
# MX formats' E8M0: MXFP4 / MXFP8, DeepSeek V4's FlashMLA FP8 cache), for fp codes only
SCALE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "e8m0": 1}
# buffer names a kv_quant mapping may override (besides "*"), by the kinds that hold them
COMPONENTS = ("k", "v", "c_kv", "k_pe", "index_keys", "window", "compressed")


class QuantError(ValueError):
    """A kv_quant format, option or combination that is not allowed (names it and what is allowed)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one K/V buffer is quantized.

    fmt: ``int8``, ``int4`` (two codes per byte), ``fp8`` (e4m3), ``fp8_e5m2``, ``fp4`` (e2m1, two per byte).
    group: channels sharing a scale (per token; capped at the row's channels), or positions sharing one per channel
        (``k_per_channel``). residual: the most recent positions kept in full precision (KIVI's R).
    k_per_channel: keys quantized per channel in groups of ``group`` positions (KIVI); values stay per token.
    scale_dtype: dtype of the scales and zero points: float16, bfloat16, float32, or e8m0 (fp codes: a power-of-two
        scale, one byte, rounded up from absmax / max so no value clips; OCP MX, DeepSeek V4's cache). symmetric: int
        codes around zero (no zero point).
    rotate: keys rotated by a block Hadamard matrix before quantizing, undone exactly after dequantizing
        (equivalently on the query side: ``q.k = (qH).(kH)``; QuaRot arXiv 2404.00456, llama.cpp's 2026 rotation).
    rope_exact: the rotary channels (MLA's ``k_pe``, CSA/HCA/SWA's rotated tail) kept in the cache dtype.
    """

    fmt: str = "int8"
    group: int = 32
    residual: int = 0
    k_per_channel: bool = False
    scale_dtype: str = "float16"
    symmetric: bool = True
    rotate: bool = False
    rope_exact: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise QuantError(f"kv_quant format={self.fmt!r}: allowed: {', '.join(FORMATS)}")
        for name in ("group",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise QuantError(f"kv_quant {name}={v!r}: must be a positive integer")
        if not isinstance(self.residual, int) or isinstance(self.residual, bool) or self.residual < 0:
            raise QuantError(f"kv_quant residual={self.residual!r}: must be a non-negative integer")
        allowed = "float16, bfloat16, float32, e8m0 (fp codes)"
        if isinstance(self.scale_dtype, str) and self.scale_dtype.lower() in ("e8m0", "ue8m0", "float8_e8m0fnu"):
            name = "e8m0"
        else:
            try:
                name, _ = dtype_bytes(self.scale_dtype)
            except ValueError:
                raise QuantError(f"kv_quant scale_dtype={self.scale_dtype!r}: allowed: {allowed}") from None
            if name not in SCALE_BYTES:
                raise QuantError(f"kv_quant scale_dtype={self.scale_dtype!r}: allowed: {allowed}")
        if name == "e8m0" and self.kind != "fp":
            raise QuantError(f"kv_quant scale_dtype='e8m0': power-of-two scales are for fp8 / fp8_e5m2 / fp4 codes "
                             f"(OCP MX); {self.fmt} takes float16, bfloat16 or float32 scales")
        object.__setattr__(self, "scale_dtype", name)
        if not self.symmetric and self.kind == "fp":
            raise QuantError(f"kv_quant symmetric=False: {self.fmt} codes are signed floats (no zero point); "
                             "asymmetric is for int8 / int4")

    @property
    def bits(self) -> int:
        return FORMATS[self.fmt][0]

    @property
    def kind(self) -> str:
        return FORMATS[self.fmt][1]

    @property
    def name(self) -> str:
        """The canonical text form, parsed back by :func:`parse_quant`: ``int4-g32-r64-kc-rot``."""
        parts = [self.fmt, f"g{self.group}"]
        parts += [f"r{self.residual}"] if self.residual else []
        parts += ["kc"] if self.k_per_channel else []
        parts += ["rot"] if self.rotate else []
        parts += ["asym"] if not self.symmetric else []
        parts += ["rope"] if self.rope_exact else []
        parts += [SCALE_NAMES[self.scale_dtype]] if self.scale_dtype != "float16" else []
        return "-".join(parts)


SCALE_NAMES = {"float16": "s16", "bfloat16": "sbf16", "float32": "s32", "e8m0": "se8m0"}


def parse_quant(text: str) -> QuantSpec:
    """``"int4-g32-r64-kc-rot"`` -> QuantSpec: a format then options: ``gN`` group, ``rN`` residual, ``kc`` K per
    channel, ``rot`` Hadamard rotation of K, ``asym`` zero points, ``rope`` rotary channels exact, ``s16`` /
    ``sbf16`` / ``s32`` / ``se8m0`` scale dtype."""
    if not isinstance(text, str) or not text:
        raise QuantError(f"kv_quant={text!r}: a format name such as int8, int4-g32-r64, fp8 or a preset "
                         f"({', '.join(PRESETS)})")
    fmt, *opts = text.strip().lower().split("-")
    fmt = {"q8": "int8", "q4": "int4", "fp8_e4m3": "fp8", "e4m3": "fp8", "e5m2": "fp8_e5m2"}.get(fmt, fmt)
    kw: dict[str, Any] = {"fmt": fmt}
    flags = {"kc": ("k_per_channel", True), "rot": ("rotate", True), "asym": ("symmetric", False),
             "rope": ("rope_exact", True), **{v: ("scale_dtype", k) for k, v in SCALE_NAMES.items()}}
    for o in opts:
        if o in flags:
            kw[flags[o][0]] = flags[o][1]
        elif o[:1] in ("g", "r") and o[1:].isdigit():
            kw["group" if o[0] == "g" else "residual"] = int(o[1:])
        else:
            raise QuantError(f"kv_quant={text!r}: option {o!r} unknown; allowed: gN (group), rN (residual), "
                             "kc, rot, asym, rope, s16, sbf16, s32, se8m0")
    return QuantSpec(**kw)


# named storage presets: component -> spec ("*": every other buffer)
PRESETS: dict[str, dict[str, QuantSpec | None]] = {
    # DeepSeek V4 (model card / inference code): K/V entries in FP8 with the 64 rotary channels kept in bf16,
    # the lightning indexer's keys in FP4. FlashMLA's V4 ("MODEL1") FP8 cache: the 448 non-rotary channels of a 512
    # entry in FP8 e4m3 with a power-of-two (E8M0) scale per 64, the 64 rotary in bf16: 448 + 128 + 7 B (FlashMLA
    # pads the entry to 584 B; the pad byte is not priced); indexer keys in MXFP4 (e2m1, an E8M0 scale per 32
    # values): 64 + 4 B per 128-channel key
    "deepseek-v4": {"*": QuantSpec("fp8", group=64, rope_exact=True, scale_dtype="e8m0"),
                    "index_keys": QuantSpec("fp4", group=32, scale_dtype="e8m0")},
    # DeepSeek V3.2's FlashMLA FP8 cache: c_kv in FP8 with an fp32 scale per 128 channels (512 + 16 B), k_pe in the
    # cache dtype (bf16: 128 B) = 656 B per token; the indexer keys in FP8 with one fp32 scale (132 B)
    "flashmla-fp8": {"c_kv": QuantSpec("fp8", group=128, scale_dtype="float32"), "k_pe": None,
                     "index_keys": QuantSpec("fp8", group=128, scale_dtype="float32")},
}


def resolve_kv_quant(kv_quant: Any) -> dict | None:
    """``kv_quant`` as given -> ``{component: QuantSpec | None}`` (plus ``{layer index: overrides}``); None: no
    quantization.

    Given as None, a format name, a preset name, a QuantSpec, or a mapping: components (``"*"`` for the rest,
    :data:`COMPONENTS`) to a format / QuantSpec / None (kept in the cache dtype), and layer indices to that layer's
    overrides: None (the layer unquantized), a format (its ``"*"``) or a mapping of components, laid over the rest of
    the mapping for that layer only, e.g. ``{"*": "fp8-g64", "k_pe": None, 0: None, 5: {"c_kv": "int8"}}``."""
    if kv_quant is None or kv_quant in ("", "none", "off"):
        return None
    if isinstance(kv_quant, QuantSpec):
        return {"*": kv_quant}
    if isinstance(kv_quant, str):
        if kv_quant in PRESETS:
            return dict(PRESETS[kv_quant])
        if "+" in kv_quant or "=" in kv_quant:
            return parse_kv_quant(kv_quant)
        return {"*": parse_quant(kv_quant)}
    if isinstance(kv_quant, dict):
        out: dict = {}
        for k, v in kv_quant.items():
            if isinstance(k, int) and not isinstance(k, bool):
                if k < 0:
                    raise QuantError(f"kv_quant[{k}]: a layer index must be 0 or more")
                out[k] = None if v is None else _components(v, f"kv_quant[{k}]")
                continue
            out.update(_components({k: v}, "kv_quant"))
        return out
    raise QuantError(f"kv_quant={kv_quant!r}: a format name, a preset ({', '.join(PRESETS)}), a QuantSpec or a "
                     "mapping component -> format (and layer index -> format or mapping)")


MAX_LAYER = 4095  # the highest layer index the text form takes (a model's own count is checked with its config)
_KEY = re.compile(r"(\d+)(?:-(\d+))?(?:\.([a-z_]+|\*))?")


def parse_kv_quant(text: str) -> dict | None:
    """The compact text form of a kv_quant mapping (the CLI's ``--kv-quant``), items joined by ``+``: an optional
    first item without ``=``, the default of every buffer (a format, a preset or ``none``), then ``KEY=VALUE`` items
    laid over it in order. KEY: a component (``k_pe``, ``index_keys``... :data:`COMPONENTS`) for every layer; a layer
    ``N`` or a range ``N-M`` (inclusive), VALUE a format, a preset or ``none`` (the layer unquantized); a layer's
    component ``N.c_kv`` (``N-M.c_kv``), VALUE a format or ``none``. E.g. ``int4-g32+0-1=int8+k_pe=none`` is
    ``{"*": "int4-g32", "k_pe": None, 0: "int8", 1: "int8"}``; :func:`quant_name` prints a mapping back this way."""
    out: dict = {}
    for i, item in enumerate(x.strip() for x in text.strip().lower().split("+")):
        if not item:
            raise QuantError(f"kv_quant={text!r}: an empty item; items are joined by '+', e.g. int4-g32+0=int8")
        if "=" not in item:
            if i:
                raise QuantError(f"kv_quant={text!r}: {item!r}: only the first item may be a bare format (every "
                                     "buffer's default); the others are KEY=VALUE with KEY a component, a layer N, "
                                 "layers N-M or a layer's component N.c_kv")
            try:
                out.update(resolve_kv_quant(item) or {"*": None})
            except QuantError as e:
                raise QuantError(f"kv_quant={text!r}: {e}") from None
            continue
        try:
            _lay_over(out, item)
        except QuantError as e:
            raise QuantError(f"kv_quant={text!r}: {item}: {e}") from None
    return out


def _lay_over(out: dict, item: str) -> None:
    """One ``KEY=VALUE`` item of :func:`parse_kv_quant` laid over the mapping ``out``."""
    key, val = (x.strip() for x in item.split("=", 1))
    none = val in ("none", "off")
    if key == "*" or key in COMPONENTS:
        out.update(_components({key: None if none else val}, "kv_quant"))
        return
    m = _KEY.fullmatch(key)
    if not m:
        raise QuantError(f"{key!r} is not a component ({', '.join(COMPONENTS)}), a layer N, layers N-M or a layer's "
                         "component N.c_kv")
    a, b, comp = int(m[1]), int(m[2] if m[2] is not None else m[1]), m[3]
    if b < a or b > MAX_LAYER:
        raise QuantError(f"layers {a}-{b}: the first layer must not be after the last, nor the last above {MAX_LAYER}")
    for layer in range(a, b + 1):
        where = f"kv_quant[{layer}]"
        if comp is None:
            out[layer] = None if none else _components(val, where)
        elif layer in out and out[layer] is None:
            raise QuantError(f"layer {layer} is unquantized ({layer}=none) and {key}={val} quantizes one of its "
                             "buffers: give one or the other")
        else:
            out[layer] = {**(out.get(layer) or {}), **_components({comp: None if none else val}, where)}


def _components(v: Any, where: str) -> dict[str, QuantSpec | None]:
    """A format, preset, QuantSpec or mapping component -> format as ``{component: QuantSpec | None}``."""
    if not isinstance(v, dict):
        return resolve_kv_quant(v) or {"*": None}
    out: dict[str, QuantSpec | None] = {}
    for k, x in v.items():
        if k != "*" and k not in COMPONENTS:
            raise QuantError(f"{where}[{k!r}]: allowed components: *, {', '.join(COMPONENTS)}"
                             + (" (a layer index only at the top level)" if isinstance(k, int) else ""))
        out[k] = None if x is None else x if isinstance(x, QuantSpec) else parse_quant(x)
    return out


def for_layer(q: dict | None, index: int) -> dict[str, QuantSpec | None] | None:
    """The components of layer ``index`` (the mapping's components with that layer's overrides laid over them);
    None when none of its buffers is quantized."""
    if not q or (index in q and q[index] is None):
        return None
    out = {k: v for k, v in q.items() if isinstance(k, str)}
    out.update(q.get(index) or {})
    return out if any(v is not None for v in out.values()) else None


def quant_name(q: dict | None) -> str:
    """A resolved kv_quant as text that :func:`resolve_kv_quant` reads back (:func:`parse_kv_quant`): ``int4-g32``,
    a preset name, or ``fp8-g64-rope+index_keys=fp4-g32+0-1=int8+5.c_kv=none``."""
    if not q:
        return "none"
    for name, preset in PRESETS.items():
        if q == preset:
            return name

    def fmt(v):
        return v.name if v else "none"

    comps = {k: v for k, v in q.items() if isinstance(k, str)}
    preset = next((n for n, p in PRESETS.items() if comps == p), None)
    if preset:
        items = [preset]
    else:
        items = [fmt(q["*"])] if "*" in q else []
        items += [f"{k}={fmt(v)}" for k, v in comps.items() if k != "*"]
    layers = sorted(k for k in q if isinstance(k, int))
    runs: list[list] = []  # [first, last, override]: consecutive layers with the same override
    for k in layers:
        if runs and runs[-1][1] == k - 1 and q[k] == runs[-1][2]:
            runs[-1][1] = k
        else:
            runs.append([k, k, q[k]])
    for a, b, v in runs:
        key = str(a) if a == b else f"{a}-{b}"
        preset = next((n for n, p in PRESETS.items() if v == p), None)
        if v is None or preset or (list(v) == ["*"] and v["*"] is not None):
            items.append(f"{key}={'none' if v is None else preset or fmt(v['*'])}")
        else:
            items += [f"{key}.{c}={fmt(x)}" for c, x in v.items()]
    return "+".join(items)


def for_buffer(q: dict[str, QuantSpec | None] | None, component: str) -> QuantSpec | None:
    """The spec of buffer ``component`` (its own entry, else ``"*"``) in one layer's components (:func:`for_layer`)."""
    if not q:
        return None
    return q[component] if component in q else q.get("*")


def layout(spec: QuantSpec, buf: Buffer) -> dict[str, int]:
    """What a quantized buffer is made of: ``tail`` exact channels, ``dq`` quantized channels, ``group`` (channels
    per scale, per token), ``span`` (positions per scale: ``group`` for K per channel, else 1), ``slots`` of the
    residual (before capping at the capacity)."""
    tail = buf.rope if spec.rope_exact else 0
    dq = buf.dim - tail
    span = spec.group if spec.k_per_channel and buf.key and buf.residual else 1
    group = dq if span > 1 else min(spec.group, dq)
    slots = spec.residual + span - 1 if buf.residual else 0
    return {"tail": tail, "dq": dq, "group": max(group, 1), "span": span, "slots": slots}


def check(spec: QuantSpec, buf: Buffer, where: str) -> None:
    """A QuantError naming the layer, the option and what is allowed, for a combination the buffer cannot hold."""
    lay = layout(spec, buf)
    dq, group, span = lay["dq"], lay["group"], lay["span"]
    if dq and dq % group:
        divisors = [g for g in range(1, dq + 1) if dq % g == 0]
        raise QuantError(f"{where}.kv_quant[{buf.name}].group={spec.group}: must divide the {dq} quantized channels "
                         f"(allowed: {', '.join(map(str, divisors))}, or at least {dq}: one group per row)")
    if spec.bits == 4 and dq % 2:
        raise QuantError(f"{where}.kv_quant[{buf.name}]: {spec.fmt} packs two channels per byte and this buffer has "
                         f"{dq} quantized channels, an odd count (allowed here: int8, fp8 or fp8_e5m2, e.g. "
                         f"{buf.name}=int8 for this buffer alone)")
    if spec.bits == 4 and span == 1 and group % 2:
        evens = [g for g in range(2, dq + 1, 2) if dq % g == 0]
        raise QuantError(f"{where}.kv_quant[{buf.name}].group={spec.group}: {spec.fmt} packs two channels per byte, "
                         f"so a group of channels must be even (allowed: {', '.join(map(str, evens))})")
    if buf.ring is not None:
        if lay["slots"] > buf.ring:
            raise QuantError(f"{where}.kv_quant[{buf.name}].residual={spec.residual}: the residual"
                             + (f" plus a group of {span} - 1" if span > 1 else "")
                             + f" must fit the sliding window of {buf.ring} positions")
        if span > 1 and buf.ring % span:
            raise QuantError(f"{where}.kv_quant[{buf.name}].group={spec.group}: keys per channel in groups of "
                             f"{span} positions need a window that is a multiple of it (window={buf.ring})")


def buffer_bytes(spec: QuantSpec | None, buf: Buffer, batch: int, elt: int) -> int:
    """Bytes of ``buf`` for ``batch`` sequences: ``spec`` None prices it unquantized at ``elt`` B/value."""
    n = batch * buf.rows
    if spec is None:
        return n * buf.capacity * buf.dim * elt
    lay = layout(spec, buf)
    c, dq, span = buf.capacity, lay["dq"], lay["span"]
    se = SCALE_BYTES[spec.scale_dtype] * (1 if spec.symmetric else 2)
    scales = (math.ceil(c / span) * dq) if span > 1 else c * (dq // lay["group"])
    residual = min(lay["slots"], c)
    return n * (c * dq * spec.bits // 8 + scales * se + residual * dq * elt + c * lay["tail"] * elt)


def bytes_per_token(spec: QuantSpec | None, buf: Buffer, elt: int) -> Fraction:
    """Bytes one more position adds to ``buf`` (one sequence; the residual excluded: it does not grow)."""
    if spec is None:
        return Fraction(buf.rows * buf.dim * elt)
    lay = layout(spec, buf)
    dq = lay["dq"]
    se = SCALE_BYTES[spec.scale_dtype] * (1 if spec.symmetric else 2)
    scales = Fraction(dq, lay["span"]) if lay["span"] > 1 else Fraction(dq // lay["group"])
    return buf.rows * (Fraction(dq * spec.bits, 8) + scales * se + lay["tail"] * elt)


def bits_per_value(spec: QuantSpec, dim: int = 128, key: bool = False) -> float:
    """Average stored bits per value of a long cache (codes + scales; residual and exact tail excluded)."""
    buf = Buffer("kv", "k" if key else "v", 1, 1, dim, key=key)
    return float(bytes_per_token(dataclasses.replace(spec, rope_exact=False), buf, 2) * 8 / dim)


def quantized_price(buffers: list[Buffer], q: dict[str, QuantSpec | None], batch: int, elt: int,
                    where: str) -> tuple[dict[str, int], int]:
    """``(quantized - unquantized)`` bytes of a layer's buffers, by component and in total (each buffer checked)."""
    delta: dict[str, int] = {}
    total = 0
    for b in buffers:
        spec = for_buffer(q, b.name)
        if spec is not None:
            check(spec, b, where)
        d = buffer_bytes(spec, b, batch, elt) - buffer_bytes(None, b, batch, elt)
        delta[b.component] = delta.get(b.component, 0) + d
        total += d
    return delta, total


def layer_buffers(layer: Any, context: int, where: str) -> list[Buffer]:
    """The per-position buffers of a storing layer (its kind's record), or a QuantError when it has none."""
    fn = kinds.get(layer.attention).buffers
    if fn is None:
        raise QuantError(f"{where}.attention={layer.attention!r}: this kind's store has no quantizable buffers "
                         "(its record names none): kv_quant is not supported")
    return fn(layer, context)


def check_layers(config: Any, q: dict, context: int) -> None:
    """Check every storing layer's buffers against its components (:func:`for_layer`), and every layer override:
    QuantError naming the layer, the option and what is allowed."""
    n = len(config.layers)
    for k, ov in q.items():
        if not isinstance(k, int):
            continue
        if k >= n:
            raise QuantError(f"kv_quant[{k}]: layer {k} unknown: the model has {n} layers (0..{n - 1})")
        layer = config.layers[k]
        if not layer.stores_kv:
            raise QuantError(f"kv_quant[{k}]: layers[{k}] reads layer {layer.kv_source}'s cache (kv_source) and "
                             f"stores nothing: override layer {layer.kv_source} instead")
        names = sorted({b.name for b in layer_buffers(layer, context, f"layers[{k}]")})
        for c in ov or {}:
            if c != "*" and c not in names:
                raise QuantError(f"kv_quant[{k}][{c!r}]: layers[{k}] ({layer.attention}) holds no {c!r} buffer; its "
                                 f"buffers: {', '.join(names)}")
    for i, layer in enumerate(config.layers):
        lq = for_layer(q, i)
        if layer.stores_kv and lq:
            where = f"layers[{i}]"
            for b in layer_buffers(layer, context, where):
                spec = for_buffer(lq, b.name)
                if spec is not None:
                    check(spec, b, where)


__all__ = ["COMPONENTS", "FORMATS", "PRESETS", "SCALE_BYTES", "SCALE_NAMES", "Buffer", "QuantError", "QuantSpec", "bits_per_value", "buffer_bytes",
           "bytes_per_token", "check", "check_layers", "for_buffer", "for_layer", "layer_buffers", "layout",
           "parse_kv_quant", "parse_quant", "quant_name", "quantized_price", "resolve_kv_quant"]
