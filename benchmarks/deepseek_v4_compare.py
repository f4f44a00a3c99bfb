"""DeepSeek V4 (CSA/HCA) against V3 (MLA) and V3.2 (MLA + sparse attention): where the KV bytes and FLOPs go.

Prints, from the calculator (batch 1), per component at 128K and 1M: the KV cache (window ring, compressed entries,
indexer keys, MLA latent...) and the attention FLOPs per decoded token (window, compressed entries, indexer, MLA
latent), then V4's totals as a percentage of V3.2's under two storage assumptions:

- ``bf16``: every cached value in bf16 (what kvlab allocates with a bf16 cache, and what transformers holds);
- ``deepseek``: the formats DeepSeek's kernels use, as kvlab's named ``kv_quant`` presets (kvlab/costs/quant.py
  ``PRESETS``, priced byte for byte as a cache holds them): ``deepseek-v4`` for V4 (entries, window ring and
  compressed, in FP8 with a power-of-two scale per 64 channels and the 64 rotary channels in bf16: 583 B of
  FlashMLA's 584-byte entry; indexer keys in MXFP4, 68 B per key), ``flashmla-fp8`` for V3 / V3.2 (latent in FP8 +
  4 fp32 scales with k_pe in bf16: 656 B per token per layer; indexer keys in FP8 + one fp32 scale, 132 B).
  Compressor state (partial and overlap blocks) stays bf16. Indexer FLOPs are FLOPs whatever their precision.

Writes ``docs/img/deepseek-v4-kv-flops.png`` (KV bytes and attention FLOPs per decoded token vs context) and prints
one JSON line last.

    .venv/bin/python benchmarks/deepseek_v4_compare.py [--plot docs/img/deepseek-v4-kv-flops.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kv_flops_plot import plot_kv_and_flops

import kvlab
from kvlab.costs import Costs
from kvlab.units import fmt_bytes, fmt_context, fmt_flops, table

MODELS = ["deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro"]
REPORT = [131072, 1048576]
CONTEXTS = [2**k for k in range(12, 21)]  # 4K .. 1M
PUBLISHED = {"deepseek-v4-pro": (0.10, 0.27), "deepseek-v4-flash": (0.07, 0.10)}  # (KV, FLOPs) vs V3.2 at 1M


FORMATS = {"deepseek-v3": "flashmla-fp8", "deepseek-v3.2": "flashmla-fp8", "deepseek-v4-flash": "deepseek-v4",
           "deepseek-v4-pro": "deepseek-v4"}  # each model's deployed K/V storage, as a kvlab kv_quant preset


def deepseek_format_bytes(name: str, c: Costs) -> int:
    """KV bytes of preset ``name`` (batch 1, at ``c``'s context and dtype) in DeepSeek's storage formats: the
    calculator with the model's ``kv_quant`` preset (:data:`FORMATS`)."""
    return kvlab.costs(name, context=c.context, dtype=c.dtype, kv_quant=FORMATS[name]).kv_cache_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plot", default="docs/img/deepseek-v4-kv-flops.png")
    args = ap.parse_args()
    out: dict = {"models": {}, "vs_v32": {}}
    for ctx in REPORT:
        rows = []
        for name in MODELS:
            c = kvlab.costs(name, context=ctx, dtype="bfloat16")
            out["models"].setdefault(name, {})[ctx] = {
                "kv_cache_bytes": c.kv_cache_bytes, "kv_components": c.kv_components,
                "kv_cache_bytes_deepseek_format": deepseek_format_bytes(name, c),
                "flops_per_token": c.flops_per_token, "attn_flops_per_token": c.attn_flops_per_token,
                "attn_flops_components": c.attn_flops_components, "other_flops_per_token": c.other_flops_per_token}
            rows.append([name, fmt_bytes(c.kv_cache_bytes),
                         ", ".join(f"{k} {fmt_bytes(v)}" for k, v in c.kv_components.items() if v > 2**20),
                         fmt_flops(c.flops_per_token), fmt_flops(c.other_flops_per_token),
                         ", ".join(f"{k} {fmt_flops(v)}" for k, v in c.attn_flops_components.items())])
        print(f"\n{fmt_context(ctx)} context, bf16, batch 1")
        print(table(["model", "KV cache", "KV by component (> 1 MiB)", "FLOPs/token", "matmuls",
                     "attention FLOPs by component"], rows))
    ref = out["models"]["deepseek-v3.2"][1048576]
    rows = []
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        r = out["models"][name][1048576]
        kv = r["kv_cache_bytes"] / ref["kv_cache_bytes"]
        kv_ds = r["kv_cache_bytes_deepseek_format"] / ref["kv_cache_bytes_deepseek_format"]
        fl = r["flops_per_token"] / ref["flops_per_token"]
        pub_kv, pub_fl = PUBLISHED[name]
        out["vs_v32"][name] = {"kv_bf16": kv, "kv_deepseek_format": kv_ds, "flops": fl, "published_kv": pub_kv,
                               "published_flops": pub_fl}
        rows.append([name, f"{100 * kv:.1f}%", f"{100 * kv_ds:.1f}%", f"{100 * pub_kv:.0f}%", f"{100 * fl:.1f}%",
                     f"{100 * pub_fl:.0f}%"])
    print("\nV4 as a fraction of V3.2 at 1M tokens (single sequence)")
    print(table(["model", "KV (bf16)", "KV (DeepSeek formats)", "KV published", "FLOPs/token", "FLOPs published"],
                rows))
    data = {name: {"kv_cache_bytes": [], "attn_flops_per_token": []} for name in MODELS}
    for ctx in CONTEXTS:
        for name in MODELS:
            c = kvlab.costs(name, context=ctx, dtype="bfloat16")
            data[name]["kv_cache_bytes"].append(c.kv_cache_bytes)
            data[name]["attn_flops_per_token"].append(c.attn_flops_per_token)
    styles = {"deepseek-v3": ("--", "o", "V3 (MLA)"), "deepseek-v3.2": ("-.", "s", "V3.2 (MLA + DSA top-2048)"),
              "deepseek-v4-flash": ("-", "^", "V4-Flash (CSA/HCA)"), "deepseek-v4-pro": ("-", "D", "V4-Pro (CSA/HCA)")}
    path = plot_kv_and_flops(data, CONTEXTS, styles, "DeepSeek V4 vs V3 / V3.2 (kvlab calculator, bf16, batch 1)",
                             Path(args.plot))
    out["plot"] = str(path)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
