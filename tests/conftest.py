import gc
import os
import sys
from pathlib import Path

import pytest
import torch

from kvlab.layers import fused

sys.path.insert(0, str(Path(__file__).parent))

# The suite runs tiny models: one thread avoids OpenMP oversubscription on small, shared machines.
torch.set_num_threads(1)
os.environ["KVLAB_THREADS"] = "1"  # and the CLI verbs called in-process keep it (kvlab/threads.py)


@pytest.fixture(autouse=True, scope="module")
def _settle_the_heap():
    """After each test module: drop torch.compile's caches (dynamo's and the fused kernels'), collect, and freeze what
    survives (``gc.freeze``). The suite builds hundreds of compiled graphs whose objects stay alive in one process; a
    full collection then walks millions of objects, and ``kvlab bench`` collects before each measured lane (its RSS
    figures): tests calling it took minutes instead of seconds late in the suite. Frozen objects are still freed by
    reference counting; only the cycle collector skips them."""
    yield
    torch._dynamo.reset()
    fused._COMPILED.clear()
    gc.collect()
    gc.freeze()
