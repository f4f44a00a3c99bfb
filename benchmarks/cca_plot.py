"""ZAYA1's compressed convolutional attention against GQA and MHA: KV bytes and attention FLOPs vs context.

Prints the calculator's table for ``zaya1-8b`` (CCA 8/2 x 128), ``zaya1-8b-gqa`` (GQA 16/2 x 128) and
``zaya1-8b-mha`` (MHA 16 x 128), all else equal (bf16, batch 1); runs a scaled-down ZAYA-shaped random
model of each kind (prefill in chunks + a few decode steps, fp32) and checks the measured cache bytes
(per-position part and constant state) against the calculator; writes ``docs/img/cca-kv-flops.png`` and
prints one JSON line last. Speed is left to ``kvlab bench``.

    .venv/bin/python benchmarks/cca_plot.py [--plot docs/img/cca-kv-flops.png] [--measure-context 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from kv_flops_plot import plot_kv_and_flops

import kvlab
from kvlab.config import ModelConfig
from kvlab.model import Model
from kvlab.units import fmt_bytes, fmt_context, fmt_flops, table

PRESETS = ["zaya1-8b", "zaya1-8b-gqa", "zaya1-8b-mha"]
CONTEXTS = [2**k for k in range(10, 18)]  # 1K .. 128K


def scaled(name: str, layers: int = 4, hidden: int = 256, head_dim: int = 32) -> ModelConfig:
    """The preset with 4 layers, hidden 256, head dim 32, 4 experts x 128, vocab 1024 (heads kept)."""
    cfg = kvlab.presets.get_preset(name)

    def shrink(_i: int, x):
        x.head_dim = head_dim
        x.moe = dataclasses.replace(x.moe, num_experts=4, expert_size=128, router_hidden=32)
        return x

    cfg = cfg.replace_layers(shrink)
    return dataclasses.replace(cfg, vocab_size=1024, hidden_size=hidden, layers=cfg.layers[:layers],
                               max_positions=32768, name=f"{name}-scaled")


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
    state = sum(s.state_nbytes() for s in cache.layers if hasattr(s, "state_nbytes"))
    return {"cache_bytes": cache.nbytes(), "calculated_bytes": calc.kv_cache_bytes, "state_bytes": state,
            "calculated_state_bytes": calc.kv_state_bytes, "attn_flops_per_token": calc.attn_flops_per_token}


def plot(data: dict, path: Path) -> Path:
    styles = {"zaya1-8b": ("-", "o", "CCA 8q/2kv x 128 (zaya1-8b)"),
              "zaya1-8b-gqa": ("--", "s", "GQA 16q/2kv x 128"),
              "zaya1-8b-mha": (":", "^", "MHA 16 x 128")}
    return plot_kv_and_flops(data, CONTEXTS, styles,
                             "ZAYA1-8B (40 layers, hidden 2048): CCA vs GQA vs MHA, all else equal", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", default="docs/img/cca-kv-flops.png")
    p.add_argument("--measure-context", type=int, default=1024, help="prompt length of the measured runs (0: skip)")
    args = p.parse_args()

    data = {}
    for name in PRESETS:
        cs = [kvlab.costs(name, context=c, dtype="bf16") for c in CONTEXTS]
        data[name] = {"kv_cache_bytes": [c.kv_cache_bytes for c in cs],
                      "kv_state_bytes": cs[0].kv_state_bytes,
                      "attn_flops_per_token": [c.attn_flops_per_token for c in cs],
                      "flops_per_token": [c.flops_per_token for c in cs],
                      "prefill_attn_flops": [c.prefill_attn_flops for c in cs],
                      "params_total": cs[0].params_total, "params_active": cs[0].params_active}
    heads = ["context"] + [f"{n} {q}" for n in ("cca", "gqa", "mha") for q in ("KV", "attn/tok")]
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
        print(f"\nmeasured: scaled-down ZAYA shape (4 layers, hidden 256, head dim 32), fp32, prompt {n} + 4 decode "
              "steps")
        mrows = []
        for name in PRESETS:
            m = measured[name] = measure(scaled(name), n)
            assert m["cache_bytes"] == m["calculated_bytes"], (name, m)
            assert m["state_bytes"] == m["calculated_state_bytes"], (name, m)
            mrows.append([name, f"{m['cache_bytes']:,}", f"{m['calculated_bytes']:,}", f"{m['state_bytes']:,}",
                          fmt_flops(m["attn_flops_per_token"])])
        print(table(["model", "cache bytes", "calculated", "of which state", "attn FLOP/tok"], mrows))
    out = {"contexts": CONTEXTS, "presets": data, "measured": measured}
    if args.plot:
        out["plot"] = str(plot(data, Path(args.plot)))
        print(f"\nplot: {out['plot']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
