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


# The test files that take longest, longest first (seconds of a 2-worker run on a loaded 2-core machine, commit
# 47859ef): `make test` hands whole files to its two workers in this order (pytest-xdist ``--dist loadfile
# --no-loadscope-reorder``), so the long ones start early and the short ones fill in at the end, and the two workers
# finish together. xdist's own order (most tests first) put the slow files with few tests (the real models, the
# torchrun runs) last. The rest run after these, in collection order. An estimate for scheduling, never asserted.
SLOW_FILES = ["tests/test_compile.py",  # 592 s
              "tests/test_cpu_attend.py", "tests/test_contract.py", "tests/test_train.py", "tests/test_quant.py",
              "tests/test_quant_decode.py", "tests/parity/test_gguf_real.py", "tests/test_retrofit.py",  # 179-95 s
              "tests/test_compressed.py", "tests/test_sink_tokens.py", "tests/test_shrink.py", "tests/test_cca.py",
              "tests/test_distill.py", "tests/test_quant_kernel.py", "tests/test_fit.py", "tests/test_mhc.py",
              "tests/test_tokenizer.py", "tests/test_ablate.py", "tests/test_mhc_kernel.py", "tests/test_imports.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of :data:`SLOW_FILES` first, in its order; each file's tests stay together and in their order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


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
