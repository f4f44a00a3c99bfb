"""Laguna XS.2's attention budget against its counterparts: KV bytes and attention FLOPs vs context.

Prints the calculator's table for ``laguna-xs.2``, ``laguna-xs.2-all-global`` and
``laguna-xs.2-uniform-heads`` (bf16, batch 1), runs a scaled-down Laguna-shaped random model of each
kind (prefill + a few decode steps) and checks its measured cache bytes against the calculator, writes
the plot ``docs/img/laguna-budget.png`` and prints one JSON line last. Speed is left to ``kvlab bench``.

    .venv/bin/python benchmarks/laguna_budget.py [--plot docs/img/laguna-budget.png] [--measure-context 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from kv_flops_plot import plot_kv_and_flops

import kvlab
from kvlab.budget import budget, describe_pattern
from kvlab.config import GQASpec, LayerSpec, ModelConfig, MoESpec, RopeSpec
from kvlab.model import Model
from kvlab.units import fmt_bytes, fmt_context, fmt_flops, table

PRESETS = ["laguna-xs.2", "laguna-xs.2-all-global", "laguna-xs.2-uniform-heads"]
CONTEXTS = [2**k for k in range(10, 18)]  # 1K .. 128K


def scaled_laguna(layers: int = 8, hidden: int = 256, window: int = 64) -> ModelConfig:
    """XS.2's shape scaled down: 1 global : 3 sliding, 6/8 query heads over 2 KV heads of 32, dense + MoE."""
    specs = []
    for i in range(layers):
        g = i % 4 == 0
        moe = None if i == 0 else MoESpec(num_experts=8, top_k=2, expert_size=64, scoring="sigmoid",
                                          bias_correction=True, routed_scaling=2.5, shared_experts=1)
        specs.append(LayerSpec(
            num_heads=6 if g else 8, num_kv_heads=2, head_dim=32, window=None if g else window,
            gqa=GQASpec(qk_norm=True), output_gate="softplus", rope=RopeSpec(theta=5e5, partial=0.5, scaling="yarn", factor=32.0,
                                                  original_max_positions=1024, beta_fast=64.0, attention_factor=1.0)
            if g else RopeSpec(theta=1e4), mlp="moe" if moe else "dense", intermediate_size=0 if moe else 512,
            moe=moe))
    return ModelConfig(vocab_size=1024, hidden_size=hidden, layers=specs, max_positions=32768,
                       name="laguna-scaled")


def counterparts(cfg: ModelConfig) -> dict[str, ModelConfig]:
    glob = cfg.layers[0].rope
    return {"xs2-shape": cfg,
            "all-global": budget(cfg, "global", rope={"global": glob}, name="all-global"),
            "uniform-heads": budget(cfg, heads=8, name="uniform-heads")}


@torch.no_grad()
def measure(cfg: ModelConfig, context: int, decode: int = 4) -> dict:
    model = Model.from_config(cfg, seed=0).eval()
    cache = model.new_cache(1, max_length=context + decode)
    ids = torch.randint(0, cfg.vocab_size, (1, context + decode), generator=torch.Generator().manual_seed(0))
    for s in range(0, context, 512):
        model(ids[:, s:min(s + 512, context)], cache=cache, last_only=True)
    for t in range(context, context + decode):
        model(ids[:, t:t + 1], cache=cache)
    calc = kvlab.costs(cfg, context=context + decode, dtype=torch.float32)
    return {"cache_bytes": cache.nbytes(), "calculated_bytes": calc.kv_cache_bytes,
            "attn_flops_per_token": calc.attn_flops_per_token}


def plot(data: dict, path: Path) -> Path:
    styles = {name: (ls, mk, name) for name, ls, mk in (("laguna-xs.2", "-", "o"), ("laguna-xs.2-all-global", "--", "s"),
                                                         ("laguna-xs.2-uniform-heads", ":", "^"))}
    return plot_kv_and_flops(data, CONTEXTS, styles,
                             "Laguna XS.2: 1 global (48 heads) : 3 sliding (64 heads, window 512)", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", default="docs/img/laguna-budget.png")
    p.add_argument("--measure-context", type=int, default=1024, help="prompt length of the measured runs (0: skip)")
    args = p.parse_args()

    data = {}
    for name in PRESETS:
        cs = [kvlab.costs(name, context=c, dtype="bf16") for c in CONTEXTS]
        data[name] = {"pattern": describe_pattern(kvlab.presets.get_preset(name)),
                      "kv_cache_bytes": [c.kv_cache_bytes for c in cs],
                      "attn_flops_per_token": [c.attn_flops_per_token for c in cs],
                      "prefill_attn_flops": [c.prefill_attn_flops for c in cs],
                      "params_total": cs[0].params_total, "params_active": cs[0].params_active}
    heads = ["context"] + [f"{n} {q}" for n in ("xs.2", "all-global", "uniform") for q in ("KV", "attn/tok")]
    rows = []
    for i, c in enumerate(CONTEXTS):
        row = [fmt_context(c)]
        for name in PRESETS:
            row += [fmt_bytes(data[name]["kv_cache_bytes"][i]), fmt_flops(data[name]["attn_flops_per_token"][i])]
        rows.append(row)
    print("calculator, bf16, batch 1")
    print(table(heads, rows))

    measured = {}
    if args.measure_context:
        n = args.measure_context
        print(f"\nmeasured: scaled-down Laguna shape (8 layers, hidden 256, window 64), fp32, prompt {n} + 4 decode "
              "steps")
        mrows = []
        for name, cfg in counterparts(scaled_laguna()).items():
            m = measured[name] = measure(cfg, n)
            assert m["cache_bytes"] == m["calculated_bytes"], (name, m)
            mrows.append([name, describe_pattern(cfg), f"{m['cache_bytes']:,}", f"{m['calculated_bytes']:,}",
                          fmt_flops(m["attn_flops_per_token"])])
        print(table(["model", "pattern", "cache bytes", "calculated", "attn FLOP/tok"], mrows))
    out = {"contexts": CONTEXTS, "presets": data, "measured": measured}
    if args.plot:
        out["plot"] = str(plot(data, Path(args.plot)))
        print(f"\nplot: {out['plot']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
