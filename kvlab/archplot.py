"""The layer stack drawn as architecture diagrams are read.

One strip per layer (layer 0 at the top), coloured by attention kind: full, sliding window, MLA, CCA,
CSA, HCA, SWA-only; written on it: query heads / KV heads, head dims, the window, the compression ratio, the MLP.
KV-shared layers are drawn pale, with an arrow from the layer whose K/V they read. Beside the stack, a bar per layer: K/V bytes per
cached token (one sequence, the K/V dtype), hatched where the layer holds at most ``window`` positions. Several
configs are drawn side by side (``kvlab compare A B --arch-plot``). Everything comes from
``kvlab.costs(...).per_layer`` and the config's own layer specs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvlab import kinds as kind_table
from kvlab.costs import costs, resolve_config

PLAIN = {"full": "#0072B2", "window": "#56B4E9"}  # kinds without a colour of their own (gqa): full / sliding window
PLAIN_LABELS = {"full": "full attention", "window": "sliding window"}


def colours() -> dict[str, str]:
    """Colour by key: ``full`` / ``window`` and every kind of the table that has a ``Kind.colour``."""
    return {**PLAIN, **{k.name: k.colour for k in kind_table.KINDS.values() if k.colour}}


COLOURS = colours()  # the built-in kinds' (a kind registered later is drawn through colours())


def _label(key: str) -> str:
    return PLAIN_LABELS.get(key) or kind_table.get(key).label


def _dark(colour: str) -> bool:
    """White text reads better on it (relative luminance below 0.35, WCAG formula)."""
    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(int(colour[i:i + 2], 16) / 255) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.35


def _kind(x: Any) -> str:
    """The colour key of a layer (a shared layer: the kind it would be, drawn pale)."""
    if kind_table.get(x.attention).colour:
        return x.attention
    return "full" if x.window is None else "window"


def _text(x: Any, spec: Any) -> str:
    hd = str(x.head_dim) if x.head_dim == x.v_head_dim else f"{x.head_dim}/{x.v_head_dim}"
    parts = [f"{x.index:>2}", f"{x.heads}q/{x.kv_heads}kv x {hd}"]
    detail = kind_table.get(spec.attention).detail
    if detail is not None and detail(spec):
        parts.append(detail(spec))
    if x.window is not None:
        parts.append(f"win {x.window}")
    if x.kv_source is not None:
        parts.append(f"<- {x.kv_source}")
    parts.append(x.mlp)
    return "  ".join(parts)


def _draw(ax: Any, bar: Any, cfg: Any, context: int, dtype: str, title: str | None) -> set[str]:
    from matplotlib.patches import FancyArrowPatch, Rectangle

    c = costs(cfg, context=context, kv_dtype=dtype)
    n = len(c.per_layer)
    palette = colours()
    kinds: set[str] = set()
    for x, spec in zip(c.per_layer, cfg.layers):
        k = _kind(x)
        shared = x.kv_source is not None
        kinds.add("shared" if shared else k)
        kinds.add(k)
        y = n - 1 - x.index
        ax.add_patch(Rectangle((0, y + 0.08), 1, 0.84, facecolor=palette[k], alpha=0.35 if shared else 1.0, lw=0))
        dark = _dark(palette[k]) and not shared
        ax.text(0.02, y + 0.5, _text(x, spec), va="center", ha="left", fontsize=6.2, family="monospace",
                color="white" if dark else "black")
        b = x.kv_bytes_per_token
        capped = k == "window" and b > 0  # holds at most `window` positions
        bar.barh(y + 0.5, b, height=0.84, facecolor=palette[k], hatch="////" if capped else None,
                 edgecolor="white" if capped else palette[k], lw=0)
        if shared:
            src = n - 1 - x.kv_source
            ax.add_patch(FancyArrowPatch((-0.01, src + 0.5), (-0.01, y + 0.5), connectionstyle="arc3,rad=0.35",
                                         arrowstyle="-|>", mutation_scale=6, lw=0.7, alpha=0.8,
                                         color=palette[_kind(c.per_layer[x.kv_source])]))
    ax.set_xlim(-0.22, 1)
    ax.set_ylim(0, n)
    ax.axis("off")
    total = c.kv_bytes_per_token + c.kv_bytes_per_token_window
    ax.set_title(title or cfg.name, fontsize=9, loc="left")
    bar.set_ylim(0, n)
    bar.set_yticks([])
    bar.set_xlabel(f"K/V B/token/layer, {c.kv_dtype}", fontsize=7)
    bar.tick_params(axis="x", labelsize=6)
    for side in ("top", "right", "left"):
        bar.spines[side].set_visible(False)
    bar.set_title(f"{total:,} B/token in all", fontsize=7, loc="left")
    return kinds


def plot_architecture(models: Any, path: str | Path, context: int | None = None, dtype: str = "bfloat16",
                      titles: list[str] | None = None) -> Path:
    """Draw one or more layer stacks (preset names, checkpoint dirs or ModelConfigs) side by side into ``path``."""
    import matplotlib.pyplot as plt

    fig = architecture_figure(models, context, dtype, titles)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def architecture_figure(models: Any, context: int | None = None, dtype: str = "bfloat16",
                        titles: list[str] | None = None) -> Any:
    """The matplotlib figure of :func:`plot_architecture` (axes in pairs: stack, bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    models = models if isinstance(models, (list, tuple)) else [models]
    cfgs = [resolve_config(m) for m in models]
    rows = max(len(c.layers) for c in cfgs)
    height = 1.7 + 0.2 * rows
    fig = plt.figure(figsize=(6.4 * len(cfgs), height), dpi=110)
    grid = fig.add_gridspec(1, 2 * len(cfgs), width_ratios=[4.4, 1.3] * len(cfgs), wspace=0.08,
                            left=0.02, right=0.98, top=1 - 0.85 / height, bottom=0.5 / height)
    kinds: set[str] = set()
    bars = []
    for i, cfg in enumerate(cfgs):
        ax = fig.add_subplot(grid[0, 2 * i])
        bar = fig.add_subplot(grid[0, 2 * i + 1], sharex=bars[0] if bars else None)  # one scale for every stack
        bars.append(bar)
        kinds |= _draw(ax, bar, cfg, context or cfg.max_positions, dtype, titles[i] if titles else None)
    palette = colours()
    handles = [Patch(facecolor=palette[k], label=_label(k)) for k in palette if k in kinds and k != "shared"]
    if "shared" in kinds:
        handles.append(Patch(facecolor="#999999", alpha=0.35, label="pale: reads an earlier layer's K/V (arrow)"))
    if "window" in kinds:
        handles.append(Patch(facecolor=palette["window"], hatch="////", edgecolor="white",
                             label="hatched bar: held for <= window positions"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 2 * len(cfgs)), fontsize=7, frameon=False)
    return fig


__all__ = ["COLOURS", "architecture_figure", "plot_architecture"]
