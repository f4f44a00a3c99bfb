"""Host reads and kernels of one decode step, per tiny preset (issue 17's table; outside CI).

A host read is a tensor value copied to Python (``.item()``, ``int()``, ``bool()``, ``float()`` of a tensor: the
aten op ``_local_scalar_dense``; ``.tolist()`` counted separately): on a GPU each one waits for the device.
Kernels: aten ops dispatched by the step, per layer. Usage::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/host_reads.py [--pad] [preset ...]

(``PYTHONPATH`` at another checkout measures that one: the decode step is ``Model.decode_step`` where it exists,
else the forward.)
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvlab.model import Model
from kvlab.presets import get_preset
from kvlab.shrink import tiny as shrink_tiny

PRESETS = ["qwen3-8b", "gemma-4-e2b", "laguna-xs.2", "zaya1-8b", "deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash"]


# under inference mode the reads reach the dispatcher as item / is_nonzero, else as _local_scalar_dense
READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default)


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def decode_step_counts(name: str, pad: bool = False, prompt: int = 40) -> tuple[int, int, int, int]:
    """(host reads, tolist calls, kernels, layers) of one decode step of the tiny ``name`` after ``prompt`` tokens."""
    cfg = shrink_tiny(get_preset(name))
    model = Model.from_config(cfg, seed=0).eval()
    b = 2
    ids = torch.randint(0, cfg.vocab_size, (b, prompt + 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(b, max_length=prompt + 8)
        if pad:
            cache.set_padding(torch.tensor([0, 5]))
        model(ids[:, :prompt], cache=cache)
        tolist = [0]
        orig = torch.Tensor.tolist

        def counted(self):
            tolist[0] += 1
            return orig(self)

        torch.Tensor.tolist = counted
        try:
            step = getattr(model, "decode_step", None)  # what generate calls per token (before it: the forward)
            with Count() as c:
                step(ids[:, prompt:], cache) if step is not None else model(ids[:, prompt:], cache=cache)
        finally:
            torch.Tensor.tolist = orig
    return c.reads, tolist[0], c.ops, cfg.num_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*", default=PRESETS)
    ap.add_argument("--pad", action="store_true", help="a left-padded batch (rows padded 0 and 5)")
    a = ap.parse_args()
    print(f"| preset (tiny{', left-padded' if a.pad else ''}) | host reads | tolist | kernels / layer |")
    print("|---|---|---|---|")
    for name in a.presets:
        reads, tl, ops, layers = decode_step_counts(name, a.pad)
        print(f"| {name} | {reads} | {tl} | {ops / layers:.0f} |")


if __name__ == "__main__":
    main()
