"""The architecture picture and the comparison plot: what is drawn matches the model, not just a file written."""

from __future__ import annotations

import json

import matplotlib
import pytest
from matplotlib.patches import FancyArrowPatch, Rectangle

from kvlab.archplot import COLOURS, architecture_figure, plot_architecture
from kvlab.cli import main
from kvlab.cli.compare import compare_data, compare_figure, plot_labels
from kvlab.costs import costs
from kvlab.presets import get_preset

matplotlib.use("Agg")


def _strips(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_gemma_4_e2b_stack_colours_arrows_and_bars_follow_the_config() -> None:
    cfg = get_preset("gemma-4-e2b")
    c = costs(cfg, context=131072)
    fig = architecture_figure(cfg)
    stack, bars = fig.axes[0], fig.axes[1]
    strips = _strips(stack)
    assert len(strips) == 35
    full = matplotlib.colors.to_rgba(COLOURS["full"])
    window = matplotlib.colors.to_rgba(COLOURS["window"])
    n = len(strips)
    for x, strip in zip(c.per_layer, strips):
        assert strip.get_y() == pytest.approx(n - 1 - x.index + 0.08)  # layer 0 at the top
        rgb = strip.get_facecolor()[:3]
        assert rgb == pytest.approx((full if x.window is None else window)[:3])
        assert strip.get_alpha() == (0.35 if x.kv_source is not None else 1.0)  # shared layers pale
    arrows = [p for p in stack.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == sum(x.kv_source is not None for x in c.per_layer) == 20
    widths = [p.get_width() for p in bars.patches]
    assert widths == [x.kv_bytes_per_token for x in c.per_layer]
    texts = [t.get_text() for t in stack.texts]
    assert texts[15].split()[:6] == ["15", "8q/1kv", "x", "256", "win", "512"] and "<- 13" in texts[15]
    assert "dense 12288" in texts[15]


def test_compressed_and_mla_stacks_name_ratio_and_latent_and_share_one_bar_scale() -> None:
    fig = architecture_figure(["deepseek-v4-flash", "deepseek-v3"])
    v4, v4_bars, v3, v3_bars = fig.axes[:4]
    texts = [t.get_text() for t in v4.texts]
    assert "/4 +index" in texts[2] and "/128" in texts[3] and "win 128" in texts[3]
    assert "latent 512+64" in v3.texts[0].get_text()
    assert v4_bars.get_xlim() == v3_bars.get_xlim()  # one scale: V4's bars read against V3's


def test_architecture_png_is_written(tmp_path) -> None:
    out = plot_architecture("zaya1-8b", tmp_path / "z.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plot_marks_points_past_max_positions_hollow_and_legend_outside() -> None:
    data = compare_data(["llama-3.1-8b", "gemma-4-e2b", "deepseek-v3"], [8192, 131072, 1048576], "bfloat16")
    fig = compare_figure(data)
    ax = fig.axes[0]
    hollow = [ln for ln in ax.lines if ln.get_markerfacecolor() == "white"]
    past = sorted(x for ln in hollow for x in ln.get_xdata())
    assert past == [1048576, 1048576, 1048576]  # every model's max positions is below 1m
    colours = {matplotlib.colors.to_hex(ln.get_color()) for ln in ax.lines if ln.get_label() in plot_labels(data)}
    markers = {ln.get_marker() for ln in ax.lines if ln.get_label() in plot_labels(data)}
    assert len(colours) == len(markers) == 3
    legend = ax.get_legend()
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert box.x0 >= ax.get_window_extent().x1  # the legend is beside the axes, over no data


def test_same_name_models_are_labelled_by_their_spec(tmp_path) -> None:
    cfg = get_preset("llama-3.1-8b")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cfg.save(a)
    cfg.save(b)
    data = compare_data([str(a), str(b)], [1024], "bfloat16")
    assert plot_labels(data) == [str(a), str(b)]


def test_cli_inspect_and_compare_write_plots(tmp_path, capsys) -> None:
    assert main(["inspect", "gemma-4-e2b", "--plot", str(tmp_path / "a.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(tmp_path / "a.png")
    assert main(["compare", "gemma-4-e2b", "laguna-xs.2", "--context", "8k,32k", "--arch-plot",
                 str(tmp_path / "b.png"), "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
