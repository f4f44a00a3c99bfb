"""KV-cache bytes of Gemma 4 E2B and E4B against context, with and without cross-layer KV sharing.

Writes docs/img/kv-sharing.png and prints a table and one final JSON line. Calculator only (the
measured == calculated equality is what tests/test_sharing.py checks), so it runs in seconds.
    python benchmarks/kv_sharing_plot.py [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kvlab.costs import kv_sharing_report
from kvlab.units import fmt_bytes, fmt_context, table

CONTEXTS = [2**k for k in range(9, 18)]  # 512 .. 128K


def main(out: str = "docs/img/kv-sharing.png") -> dict:
    data: dict = {"contexts": CONTEXTS, "models": {}}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colours = {"gemma-4-e2b": "tab:blue", "gemma-4-e4b": "tab:orange"}
    rows = []
    for name, colour in colours.items():
        reps = [kv_sharing_report(name, c, "bf16") for c in CONTEXTS]
        stored_off = [r["rows"][0]["without_sharing"] for r in reps]
        stored_on = [r["rows"][0]["with_sharing"] for r in reps]
        simple_off = [r["rows"][1]["without_sharing"] for r in reps]
        simple_on = [r["rows"][1]["with_sharing"] for r in reps]
        data["models"][name] = {"stored_without": stored_off, "stored_with": stored_on,
                                "simplified_without": simple_off, "simplified_with": simple_on}
        ax.plot(CONTEXTS, stored_off, "-", color=colour, marker="o", ms=3, label=f"{name}: no sharing (stored)")
        ax.plot(CONTEXTS, stored_on, "-", color=colour, marker="s", ms=3, alpha=0.6,
                label=f"{name}: sharing (stored)")
        ax.plot(CONTEXTS, simple_off, ":", color=colour, label=f"{name}: no sharing (simplified: no window, hd 256)")
        ax.plot(CONTEXTS, simple_on, "-.", color=colour, alpha=0.6, label=f"{name}: sharing (simplified)")
        for c, a, b in zip(CONTEXTS, stored_off, stored_on):
            rows.append([name, fmt_context(c), fmt_bytes(a), fmt_bytes(b), f"{100 * (a - b) / a:.1f}%"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(CONTEXTS, [fmt_context(c) for c in CONTEXTS])
    ticks = [2**k for k in range(22, 36, 2)]
    ax.set_yticks(ticks, [fmt_bytes(t).replace(".00", "") for t in ticks])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache (bf16, batch 1)")
    ax.set_title("Gemma 4 cross-layer KV sharing: cache bytes against context")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(table(["model", "context", "no sharing", "sharing", "saved"], rows, left=2))
    data["plot"] = out
    print(json.dumps(data))
    return data


if __name__ == "__main__":
    main(*sys.argv[1:])
