"""What a serving engine reserves for the K/V cache, beside the physical figure of :func:`kvlab.costs`.

Each engine turns the per-layer costs (``costs(...).per_layer``: kind, window, KV source, bytes per position)
into the bytes it reserves for ``batch`` sequences of ``context`` tokens, following rules read in its
source; every rule is stated, with the file it comes from, in :attr:`Engine.rules`. Layers whose rules were not
transcribed (CCA layers in SGLang, CCA state in transformers) are charged their physical bytes, and the rules say so
by name. vLLM prices DeepSeek V4's fp8_ds_mla pages and CCA's state pages by its own rules, llama.cpp its
per-sequence V4 streams, SGLang its V4 pools per full token; llama.cpp has no CCA (the model is refused).

Sources (read 2026-11; the commits are those of the stored snapshots):
- vLLM: vllm/v1/kv_cache_interface.py (FullAttentionSpec / SlidingWindowSpec / MLAAttentionSpec /
  SlidingWindowMLASpec ``max_memory_usage_bytes`` and page sizes, ``_apply_alignment_padding``),
  vllm/model_executor/layers/deepseek_v4_attention.py (fp8_ds_mla head bytes, DeepseekV4IndexerCache),
  vllm/model_executor/models/zaya.py + layers/mamba/cca.py (CCA state as MambaSpec),
  vllm/platforms/interface.py (``_align_hybrid_block_size``), vllm/v1/core/kv_cache_utils.py (``unify_kv_cache_spec_page_size``,
  ``_get_kv_cache_groups_uniform_page_size``, ``get_max_concurrency_for_kv_cache_config``),
  docs/design/hybrid_kv_cache_manager.md, vllm/engine/arg_utils.py (max_num_batched_tokens defaults),
  vllm/config/cache.py (gpu_memory_utilization 0.9, block_size 16).
- llama.cpp: src/llama-context.cpp (``n_ctx = GGML_PAD(n_ctx, 256)``), src/llama-kv-cache-iswa.cpp
  (SWA cache ``GGML_PAD(min(n_ctx, n_swa * n_seq + n_ubatch), 256)`` cells), src/llama-kv-cache.cpp (K and V
  tensors of ``kv_size`` cells per layer with KV; MLA: K only, ``has_v = !is_mla``; shared layers get none),
  src/llama-kv-cache-dsv4.cpp + src/llama-model.cpp ``create_memory`` (DeepSeek V4: per-sequence window, compressed,
  indexer-key caches and fp32 compressor states; ggml-org/llama.cpp#24162); ZAYA1: no mainline support (#23112).
- SGLang: python/sglang/srt/model_executor/model_runner_kv_cache_mixin.py (``get_cell_size_per_token``,
  ``set_num_tokens_hybrid_swa``), python/sglang/srt/server_args.py (page_size 1, swa_full_tokens_ratio 0.8),
  python/sglang/srt/model_executor/pool_configurator.py (``DSV4PoolConfigurator``: DeepSeek V4 bytes per full token,
  HCA state per request slot), python/sglang/srt/mem_cache/deepseek_v4_memory_pool.py.
- transformers 5.23.0: src/transformers/cache_utils.py (DynamicLayer grows by torch.cat;
  DynamicSlidingWindowLayer keeps ``sliding_window - 1`` tokens), models/deepseek_v3 (caches the MLA latent),
  models/gemma4 (KV-shared layers reuse an earlier layer's cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

from kvlab import kinds
from kvlab.costs.dtypes import DTYPE_BYTES
from kvlab.errors import FitError
from kvlab.kinds.base import DEEPSEEK_V4, PAGED, PAGED_STATE

ENGINES = ("vllm", "llamacpp", "sglang", "transformers")

# A layer's kind enters the rules below only through its record (kvlab/kinds): ``Kind.serving`` (how engines lay its
# cache out: PAGED, PAGED_STATE, DEEPSEEK_V4 or unmodelled) and ``Kind.tp_split`` (K/V split by KV head under TP).
PAGES = (PAGED, PAGED_STATE)  # K/V in attention pages (PAGED_STATE: plus a per-sequence state)


def _tp_factor(split: bool, kv_heads: int, tp: int, index: int) -> tuple[float, str | None]:
    """Fraction of one layer's K/V on one device of ``tp``, and the replication it implies (or None); ``split``:
    TP splits the layer's K/V by KV head (else one shared latent / K=V head, replicated)."""
    if tp == 1:
        return 1.0, None
    if not split:
        return 1.0, "latent"
    if tp >= kv_heads:
        if tp % kv_heads:
            raise FitError(f"tp={tp}: layer {index} has {kv_heads} KV heads; vLLM needs tp to be a multiple of the KV "
                           f"heads when it exceeds them (QKVParallelLinear: num_kv_head_replicas = tp / kv_heads)")
        return 1.0 / kv_heads, f"{tp // kv_heads}x" if tp > kv_heads else None
    if kv_heads % tp:
        raise FitError(f"tp={tp}: layer {index} has {kv_heads} KV heads, not divisible by tp (vLLM splits KV heads "
                       "evenly: num_kv_heads = kv_heads / tp)")
    return 1.0 / tp, None


def layer_tp_factor(layer_costs: Any, tp: int) -> tuple[float, str | None]:
    """:func:`_tp_factor` of one ``costs(...).per_layer`` entry, its split read from its kind's record."""
    return _tp_factor(kinds.get(layer_costs.attention).tp_split, layer_costs.kv_heads, tp, layer_costs.index)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fmt_int(n: int) -> str:
    return f"{n:,}"


@dataclass
class Reservation:
    """Bytes an engine reserves for K/V (and per-sequence state) of ``batch`` x ``context``, one device."""

    kv_bytes: int
    details: list[str] = field(default_factory=list)


@dataclass
class _Layer:
    index: int
    kind: str  # its record's Kind.serving: PAGED, PAGED_STATE, DEEPSEEK_V4 or unmodelled ("")
    window: int | None
    per_token: int  # bytes per cached position of one sequence on this device
    physical: int  # the calculator's bytes for the whole batch on this device (fallback for unmodelled kinds)
    state: int  # constant per-sequence state, whole batch, this device
    spec: Any = None  # the layer's LayerSpec (DeepSeek V4 layers: head dims, ratio, indexer)


def _layers(c: Any, tp: int, cfg: Any = None) -> list[_Layer]:
    """The storing layers of a Costs (shared layers dropped), scaled to one device of ``tp``."""
    out = []
    for x in c.per_layer:
        if x.kv_source is not None:
            continue
        f, _ = layer_tp_factor(x, tp)
        out.append(_Layer(x.index, kinds.get(x.attention).serving, x.window, round(x.kv_bytes_per_token * f), round(x.kv_bytes * f),
                          round(x.kv_state_bytes * f), cfg.layers[x.index] if cfg is not None else None))
    return out


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def v4_entry_bytes(spec: Any) -> int:
    """Bytes of one DeepSeek V4 K=V entry in vLLM's fp8_ds_mla layout: fp8 no-rope channels, bf16 rotary channels,
    one ue8m0 scale per 64 no-rope channels and 1 pad byte (584 for V4's 448 + 64; deepseek_v4_attention.py
    ``head_bytes``)."""
    rot = int(spec.head_dim * spec.rope.partial) if spec.rope is not None else 0
    nope = spec.head_dim - rot
    return nope + 2 * rot + nope // 64 + 1


def v4_index_bytes(spec: Any) -> int:
    """Bytes of one CSA indexer key in vLLM: fp8 channels + one fp32 scale per 128 (132 for 128 channels;
    DeepseekV4Indexer ``k_cache_head_dim``)."""
    d = spec.compress.index_head_dim
    return d + d // 128 * 4


class Engine:
    """An engine's reservation rules. ``memory_fraction``: the part of device memory it lets itself use."""

    name = ""
    memory_fraction = 1.0
    rules: ClassVar[list[str]] = []

    def reserve(self, cfg: Any, c: Any, context: int, batch: int, tp: int = 1) -> Reservation:
        raise NotImplementedError


class VLLM(Engine):
    """vLLM V1 with the hybrid KV cache manager (the default for full + sliding-window models)."""

    name = "vllm"
    memory_fraction = 0.9

    def __init__(self, block_size: int = 16, max_num_batched_tokens: int = 8192, v4_block_size: int = 256,
                 v4_swa_block_size: int = 64) -> None:
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.v4_block_size = v4_block_size
        self.v4_swa_block_size = v4_swa_block_size
        self.rules = [
            ("vllm: uses gpu_memory_utilization = 0.9 of device memory (default, vllm/config/cache.py); weights, the "
            "profiled activation peak and the KV pool share it"),
            (f"vllm: pages of block_size = {block_size} tokens (default on CUDA); full-attention and MLA layers reserve "
            "cdiv(max_model_len, block_size) pages per request (FullAttentionSpec.max_memory_usage_bytes, "
            "vllm/v1/kv_cache_interface.py); an MLA page holds the latent only (MLAAttentionSpec: block_size x "
            "head_size, no separate V)"),
            ("vllm: sliding-window layers reserve cdiv(min(window - 1 + max_num_batched_tokens, max_model_len), "
            f"block_size) + 1 pages (SlidingWindowSpec), max_num_batched_tokens = {max_num_batched_tokens} (vllm serve "
            "default on >= 70 GiB GPUs other than A100; 2048 below, vllm/engine/arg_utils.py)"),
            ("vllm: page sizes are unified across layer groups: a layer with a smaller page gets a proportionally larger "
            "block_size so every page has the largest layer's bytes (unify_kv_cache_spec_page_size, "
            "vllm/v1/core/kv_cache_utils.py); layers are grouped by spec in groups of min(layers per type) (max if "
            "max < 1.5 min), the last group of a type padded with empty layers, and a request is charged group_size x "
            "the pages of every group (_get_kv_cache_groups_uniform_page_size, "
            "get_max_concurrency_for_kv_cache_config; docs/design/hybrid_kv_cache_manager.md)"),
            ("vllm: KV-shared layers (kv_sharing_target_layer) get no pages (hybrid_kv_cache_manager.md, case 5); "
            "the 'GPU KV cache size: N tokens' log line divides the pool by num_blocks / groups x block_size, so its "
            "implied bytes/token is page bytes x group_size x groups / block_size"),
            (f"vllm: DeepSeek V4 layers (csa/hca/swa) store every K=V entry in the fp8_ds_mla layout whatever the K/V "
            "dtype ('DeepseekV4 only supports fp8 kv-cache format'): no-rope channels fp8, rotary channels bf16, one "
            "scale byte per 64 channels + 1 pad byte = 584 B for V4's 448 + 64 (head_bytes, "
            "vllm/model_executor/layers/deepseek_v4_attention.py); compressed entries: MLAAttentionSpec(compress_ratio, "
            f"alignment=576), a page of block_size = {v4_block_size} tokens holds block_size / ratio entries, padded "
            "to a multiple of 576 B (_apply_alignment_padding, vllm/v1/kv_cache_interface.py), cdiv(max_model_len, "
            "block_size) pages per request; CSA indexer keys: 132 B each (128 fp8 + 4 B scale, DeepseekV4IndexerCache) "
            "in the same kind of pages; the window: DeepseekV4SWACache's SlidingWindowMLASpec (584 B per token, "
            f"alignment 576) with the sliding-window rule above, block_size {v4_swa_block_size}"),
            (f"vllm: DeepSeek V4 assumptions: block_size {v4_block_size} for the compressed/indexer pages and "
            f"{v4_swa_block_size} for the window pages (the values of the V4 backends' specs as reproduced from the "
            "source, not a documented default); the compressor's partial/overlap state is charged kvlab's physical "
            "bytes (vLLM keeps it in its own fp32 state pages, not priced here); page sizes are not unified across "
            "V4's cache types"),
            ("vllm: CCA layers (ZAYA1, vllm/model_executor/models/zaya.py): K/V in full-attention pages like any "
            "layer, the conv/value state as a Mamba-style state (vllm/model_executor/layers/mamba/cca.py, MambaSpec): "
            "the attention block_size is raised to 16 x cdiv(state, 16 x attention bytes/token) when one page cannot "
            "hold the state, and the state page padded to the attention page (Platform._align_hybrid_block_size, "
            "vllm/platforms/interface.py); one state page per layer per request (mamba_cache_mode 'none', no "
            "speculative blocks, MambaSpec.max_memory_usage_bytes); the state bytes are kvlab's"),
        ]

    def _block_size(self, layers: list[_Layer]) -> int:
        """block_size, raised for a hybrid with a per-sequence state (CCA) so one attention page holds the state
        (Platform._align_hybrid_block_size: kernel alignment 16, FlashAttention's MultipleOf(16))."""
        states = [x.state // max(1, self._batch) for x in layers if x.kind == PAGED_STATE and x.state]
        paged = [x.per_token for x in layers if x.kind in PAGES and x.per_token]
        if not states or not paged:
            return self.block_size
        align = max(16, self.block_size)
        need = align * cdiv(max(states), align * max(paged))
        return max(self.block_size, need)

    def _groups(self, layers: list[_Layer]) -> tuple[int, list[tuple[_Layer, int, int]], int]:
        """(unified page bytes, [(representative layer, block_size, layers in group)], group_size); a CCA state
        type is a group whose layers hold one page each per request (block_size 0 marks it)."""
        paged = [x for x in layers if x.kind in PAGES and x.per_token]  # CCA's K/V: attention pages
        if not paged:
            return 0, [], 0
        bsz = self._block_size(layers)
        page = max(x.per_token for x in paged) * bsz
        types: dict[tuple[Any, ...], list[_Layer]] = {}
        for x in layers:
            if x.kind == PAGED_STATE and x.state:
                types.setdefault(("state",), []).append(x)
        for x in paged:
            if page % (x.per_token * self.block_size):
                raise ValueError(f"vllm: layer {x.index}'s page ({x.per_token * self.block_size} B) does not divide "
                                 f"the largest page ({page} B): vLLM raises NotImplementedError "
                                 "(unify_kv_cache_spec_page_size)")
            key = ("sliding" if x.window is not None else "full", x.window, x.per_token)
            types.setdefault(key, []).append(x)
        counts = [len(v) for v in types.values()]
        size = min(counts)
        if max(counts) < size * 1.5:
            size = max(counts)
        groups = []
        for key, members in types.items():
            rep = members[0]
            bs = 0 if key == ("state",) else page // rep.per_token
            groups += [(rep, bs, size)] * cdiv(len(members), size)
        return page, groups, size

    _batch = 1

    def bytes_per_token_logged(self, c: Any, tp: int = 1) -> float:
        """The bytes/token implied by vLLM's 'GPU KV cache size: N tokens' line (pool bytes / logged tokens)."""
        self._batch = c.batch
        page, groups, size = self._groups(_layers(c, tp))
        if not groups:
            return 0.0
        min_bs = min(bs for _, bs, _ in groups if bs)
        return page * size * len(groups) / min_bs

    def _v4(self, x: _Layer, context: int) -> tuple[int, str]:
        """One DeepSeek V4 layer's pages for one request: (bytes, what)."""
        spec, e = x.spec, v4_entry_bytes(x.spec)
        bw = self.v4_swa_block_size
        win = cdiv(min(spec.window - 1 + self.max_num_batched_tokens, context), bw) + 1
        total = win * round_up(bw * e, 576)
        what = f"window {win} pages of {round_up(bw * e, 576):,} B"
        ratio = spec.compress.ratio
        if ratio:
            if self.v4_block_size % ratio:
                raise FitError(f"vllm: layer {x.index}: block_size {self.v4_block_size} is not a multiple of the "
                               f"compression ratio {ratio} (MLAAttentionSpec.storage_block_size = block_size / ratio)")
            pages = cdiv(context, self.v4_block_size)
            per = self.v4_block_size // ratio
            total += pages * round_up(per * e, 576)
            what += f", compressed {pages} pages of {round_up(per * e, 576):,} B"
            if spec.compress.indexed:
                total += pages * round_up(per * v4_index_bytes(spec), 576)
                what += f", indexer keys {pages} pages of {round_up(per * v4_index_bytes(spec), 576):,} B"
        return total, what

    def reserve(self, cfg: Any, c: Any, context: int, batch: int, tp: int = 1) -> Reservation:
        layers = _layers(c, tp, cfg)
        self._batch = batch
        page, groups, size = self._groups(layers)
        pages = state_pages = 0
        for rep, bs, _ in groups:
            if bs == 0:  # a CCA state group: one page per layer per request
                state_pages += 1
            elif rep.window is None:
                pages += cdiv(context, bs)
            else:
                pages += cdiv(min(rep.window - 1 + self.max_num_batched_tokens, context), bs) + 1
        per_request = (pages + state_pages) * page * size
        v4 = [x for x in layers if x.kind == DEEPSEEK_V4]
        v4_bytes, v4_what = 0, ""
        for x in v4:
            b, what = self._v4(x, context)
            v4_bytes += b
            v4_what = v4_what or what
        other = sum(x.physical for x in layers if x.kind not in (*PAGES, DEEPSEEK_V4)
                    or (x.kind in PAGES and not x.per_token))
        if other and page:
            other = cdiv(other, page) * page
        states = sum(x.state for x in layers if x.kind in (PAGED, DEEPSEEK_V4))  # V4 compressor state: kvlab's bytes
        details = [(f"{len(groups)} KV cache groups of {size} layers, page {page:,} B x {size} layers per block, "
                   f"{pages} blocks per request" + (f" + {state_pages} state page(s) (CCA), block_size raised to "
                                                    f"{self._block_size(layers)}" if state_pages else ""))] if groups else []
        if v4:
            details.append(f"{len(v4)} DeepSeek V4 layers in fp8_ds_mla ({v4_entry_bytes(v4[0].spec)} B/entry), per "
                           f"request {fmt_int(v4_bytes)} B (first layer: {v4_what})")
        return Reservation(batch * (per_request + v4_bytes) + other + states, details)


class LlamaCpp(Engine):
    """llama.cpp (llama-server / llama-cli) with n_seq_max = batch and a unified KV cache (``kv_unified=False``: one
    stream per sequence, as ``llama-server -np B`` without ``--kv-unified``)."""

    name = "llamacpp"

    def __init__(self, n_ubatch: int = 512, kv_unified: bool = True) -> None:
        self.n_ubatch = n_ubatch
        self.kv_unified = kv_unified
        mode = ("kv_unified (llama-server's default with -np auto): one cache shared by the batch's sequences, "
                "n_ctx_seq = n_ctx" if kv_unified else "not kv_unified (llama-server -np B): one stream per sequence "
                "of n_ctx_seq = GGML_PAD(n_ctx / batch, 256) cells")
        self.rules = [
            (f"llamacpp: n_ctx = batch x context cells, padded up to a multiple of 256 (cparams.n_ctx = "
            f"GGML_PAD(n_ctx, 256), src/llama-context.cpp); {mode}"),
            ("llamacpp: every layer with K/V holds K and V tensors of n_ctx_seq cells a stream in the cache type (f16 by default: "
            "2 B, like bf16) (src/llama-kv-cache.cpp); MLA layers hold K only (kv_lora_rank + rope dims, "
            "has_v = !is_mla); KV-shared layers hold none"),
            (f"llamacpp: sliding-window layers hold GGML_PAD(min(n_ctx_seq, n_swa x (batch if unified else 1) + "
            f"n_ubatch), 256) cells per stream, n_ubatch = {n_ubatch} (default) (src/llama-kv-cache-iswa.cpp; "
            "--swa-full gives them n_ctx_seq)"),
            ("llamacpp: DeepSeek V4 (src/llama-kv-cache-dsv4.cpp, created for LLM_ARCH_DEEPSEEK4 in "
             "llama_model::create_memory, src/llama-model.cpp; ggml-org/llama.cpp#24162) keeps one stream per "
             "sequence even with kv_unified, each sized for kv_size = n_ctx_seq cells (with kv_unified that is the "
             "whole n_ctx = batch x context per sequence): every "
             "layer a K-only window cache (llama_kv_cache_iswa with all layers sliding, head_dim x 1 KV head) of "
             "GGML_PAD(min(kv_size, n_swa + n_ubatch), 256) cells; ratio-4 (CSA) layers a K-only compressed cache of "
             "GGML_PAD(max(1, cdiv(kv_size, 4)), 256) cells and an indexer-key cache of as many cells x "
             "index_head_dim; ratio-128 (HCA) layers a compressed cache of GGML_PAD(max(1, cdiv(kv_size, 128)), 256) "
             "cells; all in the cache type (f16 by default); plus fp32 compressor states per sequence "
             "(llama_dsv4_comp_state: kv and score rows, CSA 2 x 4 rows x 2 x head_dim, its indexer 8 rows x "
             "2 x index_head_dim, HCA 128 rows x head_dim); no rollback planes (n_rs_seq = 0: no MTP drafting); "
             "only ratios 0, 4 and 128 load (src/models/deepseek4.cpp)"),
            ("llamacpp: ZAYA1's CCA does not run in mainline llama.cpp (the draft ggml-org/llama.cpp#23112 was "
             "closed unmerged, 2026-09): a model with CCA layers has no llama.cpp reservation and is refused"),
            "llamacpp: the whole n_ctx is allocated at start: what is reserved does not depend on what is used",
        ]

    def reserve(self, cfg: Any, c: Any, context: int, batch: int, tp: int = 1) -> Reservation:
        n_ctx = round_up(batch * context, 256)
        n_ctx_seq, streams, swa_seqs = (n_ctx, 1, batch) if self.kv_unified else (round_up(n_ctx // batch, 256), batch, 1)
        total = 0
        swa_cells = None
        v4 = []
        for x in _layers(c, tp, cfg):
            if x.kind == PAGED:
                if x.window is None:
                    total += streams * n_ctx_seq * x.per_token
                else:
                    swa_cells = round_up(min(n_ctx_seq, x.window * swa_seqs + self.n_ubatch), 256)
                    total += streams * swa_cells * x.per_token
                total += x.state
            elif x.kind == DEEPSEEK_V4:
                v4.append(x)
            elif x.kind == PAGED_STATE:
                raise FitError(f"llamacpp: layer {x.index} is a CCA layer (ZAYA1): mainline llama.cpp has no CCA "
                               "support (draft ggml-org/llama.cpp#23112 closed unmerged); choose another engine")
            else:
                total += x.physical
        details = [f"n_ctx = {n_ctx:,} cells" + (f" in {streams} streams of {n_ctx_seq:,}" if streams > 1 else "")
                   + (f", SWA cache {swa_cells:,} cells" if swa_cells else "")]
        if v4:
            cells = self.v4_cells(v4[0].spec, n_ctx_seq)
            per_seq = sum(self.v4_stream_bytes(x.spec, n_ctx_seq, DTYPE_BYTES[c.kv_dtype]) for x in v4)
            total += batch * per_seq
            details = [(f"n_ctx_seq = {n_ctx_seq:,}; {batch} DeepSeek V4 stream(s) of {per_seq:,} B: window "
                        f"{cells['window']:,} cells, CSA {cells['ratio4']:,}, HCA {cells['ratio128']:,} cells a layer")]
        return Reservation(total, details)

    def v4_cells(self, spec: Any, kv_size: int) -> dict[str, int]:
        """Cells per sequence stream of llama.cpp's DeepSeek V4 caches (llama_kv_cache_dsv4 constructor)."""
        return {"window": round_up(min(kv_size, spec.window + self.n_ubatch), 256),
                "ratio4": round_up(max(1, cdiv(kv_size, 4)), 256), "ratio128": round_up(max(1, cdiv(kv_size, 128)), 256)}

    def v4_stream_bytes(self, spec: Any, kv_size: int, elt: int) -> int:
        """Bytes one sequence's stream of one DeepSeek V4 layer holds: the K-only window cache, the compressed and
        indexer-key caches (``elt`` bytes a value) and the fp32 compressor states."""
        if spec is None:
            raise FitError("llamacpp: DeepSeek V4 layers are priced from the model's layer specs: pass the config")
        ratio, d = spec.compress.ratio, spec.head_dim * spec.num_kv_heads
        cells = self.v4_cells(spec, kv_size)
        held = cells["window"] * d * elt
        if ratio == 4:  # CSA: overlapping compressor (2 x ratio rows of 2 x head_dim), indexer keys and their state
            di = spec.compress.index_head_dim
            held += cells["ratio4"] * (d + di) * elt + 2 * (2 * ratio) * (2 * d + 2 * di) * 4
        elif ratio == 128:  # HCA: ratio rows of head_dim for kv and score
            held += cells["ratio128"] * d * elt + 2 * ratio * d * 4
        elif ratio:
            raise FitError(f"llamacpp: compression ratio {ratio}: llama.cpp's DeepSeek V4 loader takes 0, 4 and 128 "
                           "only (src/models/deepseek4.cpp)")
        return held


class SGLang(Engine):
    """SGLang: a token pool (page_size 1); hybrid SWA models split the pool by swa_full_tokens_ratio; DeepSeek V4
    gets its own pools sized from one count of full tokens (pages of ``v4_page_size``)."""

    name = "sglang"

    def __init__(self, swa_full_tokens_ratio: float = 0.8, page_size: int = 1, v4_page_size: int = 256) -> None:
        self.ratio = swa_full_tokens_ratio
        self.page_size = page_size
        self.v4_page_size = v4_page_size
        self.rules = [
            (f"sglang: a pool of token slots, page_size = {page_size} (default, python/sglang/srt/server_args.py); "
            "per token: full layers kv_heads x (head_dim + v_head_dim) x bytes, MLA layers (kv_lora_rank + rope dims) "
            "x bytes (get_cell_size_per_token, model_runner_kv_cache_mixin.py); KV-shared layers are not counted"),
            (f"sglang: hybrid sliding-window models get a full pool and a SWA pool with swa_tokens = "
            f"{self.ratio} x full_tokens (swa_full_tokens_ratio default, set_num_tokens_hybrid_swa): B sequences of N "
            "tokens need full_tokens >= B x N and swa_tokens >= B x min(N, window), and the SWA pool is reserved at "
            "the ratio whether used or not"),
            ("sglang: mem_fraction_static is chosen at start from the GPU memory (server_args.py); not applied here: "
            "give the memory SGLang may use"),
            ("sglang: DeepSeek V4 (python/sglang/srt/models/deepseek_v4.py) is sized by DSV4PoolConfigurator "
             "(python/sglang/srt/model_executor/pool_configurator.py) from one count of full tokens F, in pages of "
             f"{self.v4_page_size} tokens (compressed attention needs a multiple of 128; "
             "mem_cache/deepseek_v4_memory_pool.py): SWA pool floor(F x swa_full_tokens_ratio) tokens on every layer, "
             "CSA pool F / 4, HCA pool F / 128, indexer keys F / 4 on CSA layers, CSA compressor-state rings of 8 rows "
             "per window-size block of the SWA pool; priced per full token as _get_bytes_per_full_token does: "
             "584 B a K=V entry (fp8_ds_mla: 448 fp8 + 64 bf16 rotary + 8 scale bytes), 132 B an indexer key, fp32 "
             "states (2 x 2 x head_dim, indexer 2 x 2 x index_head_dim); plus the HCA compressor state fixed per "
             "request slot (_get_c128_state_fixed_bytes: ceil((slots x 128 + 129) / 128) x 128 rows x 2 x head_dim "
             "x 4 B per HCA layer, slots = max_running_requests + 1, taken as batch + 1, i.e. --max-running-requests "
             "B). B sequences of N tokens need F >= B x pages(N) and the SWA pool >= B x min(N, window); the bytes "
             "are what the configurator charges for F (the pools it allocates add page padding, not counted); "
             "SGLang may set a V4-specific swa_full_tokens_ratio or page_size at start (not read here)"),
            ("sglang: ZAYA1's CCA (python/sglang/srt/models/zaya.py, sgl-project/sglang#26347) runs in SGLang with "
             "K/V in the token pool and the conv state in the MambaPool (python/sglang/srt/configs/zaya.py "
             "mamba2_cache_params: (heads + kv_heads) x head_dim x 2 conv rows + hidden_size prev_hs values per CCA "
             "layer per slot), but the MambaPool's slot count (handle_max_mamba_cache: radix cache, overlap buffers, "
             "max_mamba_cache_size) was not transcribed: CCA layers (K/V and state) are charged kvlab's physical "
             "bytes"),
        ]

    def reserve(self, cfg: Any, c: Any, context: int, batch: int, tp: int = 1) -> Reservation:
        layers = _layers(c, tp, cfg)
        v4 = [x for x in layers if x.kind == DEEPSEEK_V4]
        if v4:
            if len(v4) != len(layers):
                raise FitError("sglang: a model mixing DeepSeek V4 layers with others has no SGLang pool rule")
            return self._v4(v4, context, batch)
        full = sum(x.per_token for x in layers if x.kind == PAGED and x.window is None)
        swa = [x for x in layers if x.kind == PAGED and x.window is not None]
        other = sum(x.physical for x in layers if x.kind != PAGED) + sum(x.state for x in layers if x.kind == PAGED)
        tokens = cdiv(batch * context, self.page_size) * self.page_size
        if not swa:
            return Reservation(tokens * full + other, [f"{tokens:,} token slots"])
        s = sum(x.per_token for x in swa)
        if full == 0:  # all layers sliding: one SWA pool
            need = batch * min(context, max(x.window for x in swa))
            return Reservation(need * s + other, [f"{need:,} SWA token slots"])
        need_swa = batch * min(context, max(x.window for x in swa))
        full_tokens = max(tokens, cdiv(need_swa * 10**6, round(self.ratio * 10**6)))
        swa_tokens = int(full_tokens * self.ratio)
        return Reservation(full_tokens * full + swa_tokens * s + other,
                           [f"full pool {full_tokens:,} tokens, SWA pool {swa_tokens:,} tokens"])


    def v4_bytes_per_full_token(self, specs: list[Any]) -> Fraction:
        """Bytes DSV4PoolConfigurator charges per full token (``_get_bytes_per_full_token``, offline C128 state,
        fp32 compressor states, no HiSparse, no speculative decoding)."""
        d = specs[0].head_dim
        rot = int(d * specs[0].rope.partial) if specs[0].rope is not None else 0
        entry = (d - rot) + 2 * rot + 8  # 584 for 448 + 64
        di = max(x.compress.index_head_dim for x in specs)
        index = di + di // 128 * 4  # 132 for 128
        n4 = sum(1 for x in specs if x.compress.ratio == 4)
        n128 = sum(1 for x in specs if x.compress.ratio == 128)
        r, ring_per_token = Fraction(str(self.ratio)), Fraction(8, specs[0].window)  # 8-row rings per window block
        return (r * entry * len(specs) + Fraction(entry, 4) * n4 + Fraction(entry, 128) * n128 + Fraction(index, 4) * n4
                + r * ring_per_token * (2 * 2 * d * 4 + 2 * 2 * di * 4) * n4)

    def _v4(self, layers: list[_Layer], context: int, batch: int) -> Reservation:
        specs = [x.spec for x in layers]
        if any(s is None for s in specs):
            raise FitError("sglang: DeepSeek V4 layers are priced from the model's layer specs: pass the config")
        if any(s.compress.ratio not in (0, 4, 128) for s in specs):
            raise FitError("sglang: DeepSeek V4 pools exist for compression ratios 0, 4 and 128 only "
                           "(get_compress_state_ring_size)")
        page, window = self.v4_page_size, specs[0].window
        need_swa = batch * min(context, window)
        full = max(batch * round_up(context, page), round_up(cdiv(need_swa * 10**6, round(self.ratio * 10**6)), page))
        while int(full * self.ratio) // page * page < need_swa:
            full += page
        per_token = self.v4_bytes_per_full_token(specs)
        n128 = sum(1 for s in specs if s.compress.ratio == 128)
        rows = round_up((batch + 1) * 128 + 128 + 1, 128)
        c128 = rows * 2 * specs[0].head_dim * 4 * n128
        total = -(-full * per_token.numerator // per_token.denominator) + c128
        swa = int(full * self.ratio) // page * page
        return Reservation(total, [(f"DeepSeek V4 pools: {full:,} full tokens ({float(per_token):,.2f} B each), SWA "
                                    f"{swa:,} tokens, HCA state {c128:,} B for {batch + 1} request slots")])

class Transformers(Engine):
    """transformers 5.23 ``DynamicCache`` (what ``generate`` uses by default)."""

    name = "transformers"

    def __init__(self) -> None:
        self.rules = [
            ("transformers: DynamicCache grows by torch.cat, no pages: full layers hold every token "
            "(src/transformers/cache_utils.py DynamicLayer); the concatenation briefly holds old + new copies of one "
            "layer (not counted)"),
            ("transformers: sliding layers keep the last sliding_window - 1 tokens (DynamicSlidingWindowLayer), one "
            "fewer than kvlab's window ring"),
            ("transformers: MLA layers cache the latent (kv_lora_rank and rope parts as two one-head tensors, "
            "models/deepseek_v3), KV-shared layers reuse an earlier layer's cache (models/gemma4)"),
            ("transformers: DeepSeek V4 (models/deepseek_v4, DeepseekV4CSACache / DeepseekV4HCACache): csa/hca "
             "layers keep the last sliding_window - 1 K=V rows once (keys and values share storage), swa layers "
             "(a plain DynamicSlidingWindowLayer) keep them as separate K and V; compressed entries (and CSA indexer "
             "keys) grow by torch.cat, one per ratio tokens; the compressor's buffer holds the context mod ratio "
             "newest projected rows and their gates (CSA: two series, 2 x head_dim wide, and the indexer's); CSA "
             "keeps the last window's overlap rows and gates (ratio x head_dim, and the indexer's) once a window "
             "closed; all in the model's dtype"),
            "transformers: CCA state (models/zaya) is charged kvlab's physical bytes (its cache rule was not read)",
        ]

    def reserve(self, cfg: Any, c: Any, context: int, batch: int, tp: int = 1) -> Reservation:
        total = 0
        elt = DTYPE_BYTES[c.kv_dtype]
        for x in _layers(c, tp, cfg):
            if x.kind == PAGED:
                held = context if x.window is None else min(context, x.window - 1)
                total += batch * held * x.per_token + x.state
            elif x.kind == DEEPSEEK_V4 and x.spec is not None:
                total += batch * elt * self._v4_values(x.spec, context)
            else:
                total += x.physical
        return Reservation(total)

    @staticmethod
    def _v4_values(spec: Any, n: int) -> int:
        """Values one sequence's DeepSeek V4 layer holds in transformers' cache after ``n`` tokens."""
        d, r = spec.head_dim, spec.compress.ratio
        held = min(n, spec.window - 1) * d * (1 if r else 2)  # ratio 0 (swa): a plain sliding layer, K and V apart
        if not r:
            return held
        csa = spec.compress.indexed
        di = spec.compress.index_head_dim if csa else 0
        m = n % r  # the buffer: projected rows and gates not yet pooled
        held += (n // r) * (d + di) + 2 * m * (2 if csa else 1) * (d + di)
        if csa and n >= r:  # the last closed window's overlap rows and gates
            held += 2 * r * (d + di)
        return held


_CLASSES = {"vllm": VLLM, "llamacpp": LlamaCpp, "llama.cpp": LlamaCpp, "sglang": SGLang,
            "transformers": Transformers}


def get_engine(engine: Any) -> Engine:
    """An :class:`Engine` from itself or its name (vllm, llamacpp, sglang, transformers)."""
    if isinstance(engine, Engine):
        return engine
    cls = _CLASSES.get(str(engine).strip().lower()) if isinstance(engine, str) else None
    if cls is None:
        raise ValueError(f"engine={engine!r}: allowed: {', '.join(ENGINES)}")
    return cls()


__all__ = ["ENGINES", "VLLM", "Engine", "LlamaCpp", "Reservation", "SGLang", "Transformers", "get_engine"]
