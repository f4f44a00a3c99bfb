"""Two-panel log-log plot shared by the technique benchmarks: KV-cache bytes and attention FLOPs per
decoded token against context, one line per model."""

from __future__ import annotations

from pathlib import Path

from kvlab.units import fmt_context


def plot_kv_and_flops(data: dict, contexts: list[int], styles: dict[str, tuple[str, str, str]], title: str,
                      path: Path) -> Path:
    """``data[name]`` holds ``kv_cache_bytes`` and ``attn_flops_per_token`` per context;
    ``styles[name] = (linestyle, marker, label)``. Writes ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for name, row in data.items():
        ls, mk, label = styles[name]
        a.plot(contexts, [x / 2**30 for x in row["kv_cache_bytes"]], linestyle=ls, marker=mk, label=label)
        b.plot(contexts, [x / 1e9 for x in row["attn_flops_per_token"]], linestyle=ls, marker=mk, label=label)
    for ax, panel, unit in ((a, "KV cache (bf16, batch 1)", "GiB"),
                            (b, "attention FLOPs per decoded token", "GFLOP")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(contexts, [fmt_context(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(panel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
