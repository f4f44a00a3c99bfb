"""The decoder assembled from a :class:`~kvlab.config.ModelConfig`, one block per LayerSpec."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from . import hugepages
from .cache import Cache
from .config import WEIGHT_DTYPES, LayerSpec, ModelConfig
from .layers import attention_module
from .layers.block_parts import feed_forward, outputs, post_norm
from .layers.cast import as_dtype
from .layers.core import Step
from .layers.linear import linear
from .layers.mhc import HyperHead, expand
from .layers.moe import MoE, hash_table
from .layers.norm import RMSNorm
from .layers.ple import PLEInput
from .layers.residual import residuals
from .layers.rope import Rotary
from .preflight import check_memory


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``, assembled from pieces.

    The pieces (kvlab/layers/block_parts.py) hold the block-level techniques: sandwich norms normalise the attention
    and MLP outputs too (``h = x + norm(attn(norm(x)))``); the MLP side is a dense MLP, an MoE, or both side by side
    (``mlp='dense+moe'``), each with its own pre-norm (and post-norm with sandwich norms); the output pieces add PLE
    (``out += ple(out, ple_input)``) and multiply by the layer scalar. The residual adds follow the layer's residual
    strategy (kvlab/layers/residual.py): plain, ``residual_scaling`` (``(h + b_h) * s_h + (x + b_x) * s_x``, ZAYA1)
    or, with the model's ``mhc_streams``, an mHC read-in / write-out of the streams ``[B, T, n, D]`` around attention
    and around the MLP (kvlab/layers/mhc.py).
    The attention module is the one the kinds table (kvlab/kinds) names for ``spec.attention``. With the
    model's ``residual_fp32`` the stream ``x`` stays fp32 and each norm reads it in the weights' dtype.
    """

    param_init: ClassVar[dict[str, str]] = {"layer_scalar": "ones"}  # not drawn at random by Model.from_config

    def __init__(self, spec: LayerSpec, config: ModelConfig) -> None:
        super().__init__()
        hidden, eps, off = config.hidden_size, config.norm_eps, config.norm_offset
        self.spec = spec
        self.attn_norm = RMSNorm(hidden, eps, off)
        self.attn = attention_module(spec, hidden, eps, off)
        self.post_attn_norm = post_norm(spec, config)
        # the pieces (kvlab/layers/block_parts.py), registered under their checkpoint names: the MLP side (dense, MoE
        # or both), the MLP's post-norm, then what is applied to the output stream (PLE, layer scalar)
        self._ffn = feed_forward(self, spec, config)
        self.post_mlp_norm = post_norm(spec, config)
        self._outputs = outputs(self, spec, config)
        # how the attention and MLP outputs join the stream: plain, scaled or mHC (kvlab/layers/residual.py);
        # a tuple, so the strategies' modules stay registered once, under their checkpoint names
        self._residuals = residuals(self, spec, config)
        self.residual_fp32 = config.residual_fp32

    def forward(self, x: torch.Tensor, step: Step, index: int, store=None,
                ple_input: torch.Tensor | None = None) -> torch.Tensor:
        attn_res, mlp_res = self._residuals
        low = self.attn_norm.weight.dtype if self.residual_fp32 else x.dtype  # what the norms read
        xin, ctx = attn_res.read(x)  # with mHC, x holds the streams [B, T, n, D] and xin their learned mix
        h = self.post_attn_norm(self.attn(self.attn_norm(as_dtype(xin, low)), step, index, store))
        x = attn_res.write(ctx, h, x)
        xin, ctx = mlp_res.read(x)
        x = mlp_res.write(ctx, self.post_mlp_norm(self._ffn(self, as_dtype(xin, low), step.carry)), x)
        for piece in self._outputs:  # PLE, layer scalar
            x = piece(self, x, ple_input)
        return x


def _init_rule(module: nn.Module, name: str) -> str:
    """How :meth:`Model.from_config` initialises ``module``'s parameter ``name``: what the module declares in its
    ``param_init`` (``"ones"`` / ``"zeros"``: scales, gates, sinks, norm weights), zeros for a ``bias``, ones for a
    LayerNorm weight, else ``"normal"`` (drawn from normal(0, std))."""
    declared = getattr(module, "param_init", {})
    if name in declared:
        return declared[name]
    if name == "bias":
        return "zeros"
    if isinstance(module, nn.LayerNorm):
        return "ones"
    return "normal"


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-pad counts ``[B]`` from a 0/1 mask ``[B, T]``; any other padding layout is an error."""
    m = attention_mask.to(torch.long)
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {tuple(m.shape)}")
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    pad = (m == 0).sum(-1)
    pos = torch.arange(m.shape[1], device=m.device)[None]
    if bool((m != (pos >= pad[:, None]).long()).any()):
        raise ValueError("attention_mask: only left padding is supported (zeros before the tokens of each row)")
    if bool((pad == m.shape[1]).any()):
        raise ValueError("attention_mask: a row has no tokens")
    return pad


class Model(nn.Module):
    """A decoder-only LM. ``model(input_ids [B, T]) -> logits [B, T, vocab]``.

    With ``cache`` the call appends the T new positions to it (chunked prefill or decode).
    ``attention_mask`` (1 = token, 0 = left padding) is read on the first call of a cache, or on
    an uncached call.
    """

    param_init: ClassVar[dict[str, str]] = {"embed_affine_scale": "ones", "embed_affine_bias": "zeros"}  # not drawn at random

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # its own copy (``dtype`` follows the weights), not re-validated: ``config`` was when it was built
        self.config = copy.copy(config)
        self.config.layers = list(config.layers)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.ple_dim is not None:
            self.ple = PLEInput(config.ple_rows, config.hidden_size, config.num_layers, config.ple_dim,
                                config.norm_eps, config.norm_offset)
        if config.embed_affine:
            self.embed_affine_scale = nn.Parameter(torch.ones(config.hidden_size))
            self.embed_affine_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(Block(spec, config) for spec in config.layers)
        # from this layer on every layer reads another's K/V: only the positions whose logits are
        # wanted need to pass through them (nothing they compute is stored)
        self._shared_suffix = config.num_layers
        while self._shared_suffix > 0 and config.layers[self._shared_suffix - 1].kv_source is not None:
            self._shared_suffix -= 1
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.norm_offset)
        if config.mhc_streams is not None:
            self.mhc_head = HyperHead(config.mhc_streams, config.hidden_size, config.mhc_eps, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rotary: list[Rotary | None] = []
        shared: dict[tuple, Rotary] = {}
        for spec in config.layers:
            if spec.rope is None:
                self._rotary.append(None)
                continue
            key = (repr(spec.rope), spec.head_dim)
            self._rotary.append(shared.setdefault(key, Rotary(spec.rope, spec.head_dim)))

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    seed: int | None = 0, std: float = 0.02) -> Model:
        """A randomly initialised model (normal(0, std) weights, unit norms; big CPU weights in huge pages:
        kvlab/hugepages.py)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        owner = {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}
        with torch.no_grad():
            for p in model.parameters():
                rule = _init_rule(*owner[id(p)])
                if rule == "normal":
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                else:
                    p.fill_(1.0 if rule == "ones" else 0.0)
            for mod in model.modules():
                if isinstance(mod, MoE) and mod.spec.hash_routing:
                    mod.tid2eid.copy_(hash_table(config.vocab_size, mod.spec.top_k, mod.spec.num_experts))
        return hugepages.adopt(model.to(dtype))

    def _apply(self, fn: Any, recurse: bool = True) -> Model:
        """``.to()``, ``.half()``, ``.float()``...: then ``config.dtype`` names the dtype the weights are in, so
        ``kvlab.costs(model.config, n)`` prices what ``new_cache`` allocates."""
        out = super()._apply(fn, recurse)
        dt = str(self.embed.weight.dtype).removeprefix("torch.")
        self.config.dtype = dt if dt in WEIGHT_DTYPES else None
        return out

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.config.tie_embeddings else self.lm_head.weight

    def new_cache(self, batch_size: int = 1, max_length: int | None = None, kv_quant=None, fused: bool = False
                  ) -> Cache:
        """Storage sized by each layer's spec; preallocated to ``max_length`` when given, after a memory preflight
        (InsufficientMemoryError when it cannot fit, unless inside ``kvlab.preflight.forced()``); ``kv_quant``:
        quantized K/V (``"int8"``, ``"int4-g32-r64"``, a QuantSpec...; kvlab/costs/quant.py; on the CPU its int8 / int4
        per-token buffers are attended by a C++ kernel, kvlab/layers/cpu_attend.py); ``fused``: decode attention over
        those codes by the torch.compile kernel instead (kvlab/layers/fused.py: a GPU, or to compare;
        docs/kv-quantization.md)."""
        p = self.embed.weight
        if isinstance(max_length, int) and 0 < max_length <= self.config.max_positions and isinstance(batch_size, int) \
                and batch_size > 0:
            check_memory(self.config, batch_size, max_length, p.dtype, p.device, what=f"{self.config.name} cache",
                         kv_quant=kv_quant)
        return Cache(self.config, batch_size, max_length, dtype=p.dtype, device=p.device, kv_quant=kv_quant,
                     fused=fused)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """A ValueError unless every id lies in ``[0, vocab_size)`` (two host reads: done where input enters)."""
        cfg = self.config
        if not input_ids.numel():
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size})")
        if cfg.ple_dim is not None and hi >= cfg.ple_rows:
            raise ValueError(f"input_ids must lie in [0, ple_vocab_size={cfg.ple_rows}) for the per-layer embeddings")

    def decode_step(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One step of ids the caller already checked (e.g. tokens it sampled): ``[B, T]`` -> logits ``[B, T, vocab]``.

        No host read for any kind (tests/test_compile.py compiles it as one graph): what ``generate`` and the
        benchmark call per token, and what ``torch.compile`` wraps."""
        return self(input_ids, cache=cache, check=False)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False, check: bool = True) -> torch.Tensor:
        """input_ids ``[B, T]`` int64 -> logits ``[B, T, vocab]`` (``[B, 1, vocab]`` with ``last_only``).

        ``check``: validate the ids' range (:meth:`check_ids`, a host read); False where they were checked on entry."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t == 0:
            raise ValueError("input_ids is empty")
        start = cache.seq_len if cache is not None else 0
        if start + t > cfg.max_positions:
            raise ValueError(f"sequence of {start + t} positions exceeds the model's max_positions={cfg.max_positions}")
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"cache was built for batch_size={cache.batch_size}, input has batch {b}")
        if check:
            self.check_ids(input_ids)
        pad = None
        if attention_mask is not None and (cache is None or start == 0):
            pad = left_padding(attention_mask[:, -t:] if cache is None else attention_mask[:, :t])
            pad = pad if bool(pad.any()) else None
            if cache is not None:
                cache.set_padding(pad)
        elif cache is not None:
            pad = cache.pad
        device = input_ids.device
        qpos = torch.arange(start, start + t, device=device)
        positions = qpos[None].expand(b, t) if pad is None else (qpos[None] - pad[:, None]).clamp(min=0)
        step = Step(start=start, qpos=qpos, pad=pad, dtype=self.embed.weight.dtype)
        step.carry["input_ids"] = input_ids  # per-token state layers may read (hash-routed MoE: DeepSeek V4)
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, rot in enumerate(self._rotary):
            if rot is not None:
                key = id(rot)
                if key not in tables:
                    tables[key] = rot(positions)
                step.rope[i] = tables[key]
        x = self.embed(input_ids)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if cfg.embed_affine:
            x = (x + self.embed_affine_bias) * self.embed_affine_scale
        ple = self.ple(input_ids, x) if cfg.ple_dim is not None else None
        if cfg.residual_fp32:
            x = x.float()
        if cfg.mhc_streams is not None:
            x = expand(x, cfg.mhc_streams)
        for i, block in enumerate(self.layers):
            if i == self._shared_suffix and last_only and x.shape[1] > 1:
                x, step = x[:, -1:], step.last_position()
                ple = ple[:, -1:] if ple is not None else None
            x = block(x, step, i, cache.layers[i] if cache is not None else None,
                      ple[:, :, i] if ple is not None else None)
        if cache is not None:
            cache.seq_len = start + t
        if last_only:
            x = x[:, -1:]
        if cfg.mhc_streams is not None:
            x = self.mhc_head(x)
        logits = linear(self.norm(x.to(self.norm.weight.dtype) if cfg.residual_fp32 else x), self.head_weight)
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
