"""``kvlab presets``: the built-in published configurations."""

from __future__ import annotations

import argparse

from kvlab.cli.common import add_json, emit_json
from kvlab.presets import get_preset, presets
from kvlab.units import fmt_context, table

NAME = "presets"
HELP = "list the built-in published configurations"
EXAMPLE = "kvlab presets"


def add_arguments(q: argparse.ArgumentParser) -> None:
    add_json(q)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in presets():
        cfg = get_preset(name)
        rows.append({"name": name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                     "max_positions": cfg.max_positions, "source": cfg.source})
    if args.json:
        emit_json({"presets": rows})
        return 0
    print(table(["preset", "layers", "hidden", "max positions", "source"],
                [[r["name"], r["layers"], r["hidden"], fmt_context(r["max_positions"]), r["source"][:70]]
                 for r in rows], align="lrrrl"))
    return 0
