"""kvlab/hugepages.py: big CPU buffers (cache stores, loaded weights) in memory advised MADV_HUGEPAGE, 2 MiB aligned;
the same values as without; the fallback to torch.empty."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import tiny_config

from kvlab import hugepages
from kvlab.cache.storage import Rows
from kvlab.model import Model

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here (not Linux, or never)")


def _mapping(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``addr``."""
    out: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                if inside:
                    break
                inside = int(head[1], 16) <= addr < int(head[2], 16)
            elif inside:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    return out


def test_the_card_says_where_big_buffers_go(monkeypatch):
    monkeypatch.setattr(hugepages, "_mode", "madvise")
    monkeypatch.setattr(hugepages, "ENABLED", False)
    assert hugepages.describe() == ("off (KVLAB_HUGEPAGES=0)" if hugepages.available() else "unavailable")
    monkeypatch.setattr(hugepages, "ENABLED", True)
    assert hugepages.describe() == ("on (THP madvise)" if hugepages.available() else "unavailable")


def _thp_defrag() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/defrag") as f:
        return re.search(r"\[(\S+)\]", f.read())[1]


@needs_thp
def test_big_buffer_is_aligned_advised_and_backed_by_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "ENABLED", True)
    t = hugepages.empty((3, 1024, 1024), torch.float32)  # 12 MiB
    assert t.shape == (3, 1024, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.untyped_storage().nbytes() == 12 << 20  # the slack before the boundary is no part of it (torch.save)
    assert t.data_ptr() % hugepages.HUGE == 0
    assert "hg" in _mapping(t.data_ptr())["VmFlags"].split()
    t.fill_(1.0)
    if _thp_defrag() in ("always", "madvise", "defer+madvise"):  # the fault waits for a huge page
        assert hugepages.huge_bytes(t) >= 2 * hugepages.HUGE
    assert torch.equal(t, torch.ones(3, 1024, 1024))
    rows = Rows((1, 2), 64, torch.float32, "cpu")  # a cache store's buffer, grown to 4 MiB
    rows.resize(8192, 0)
    assert rows.t.data_ptr() % hugepages.HUGE == 0 and "hg" in _mapping(rows.t.data_ptr())["VmFlags"].split()
    assert not rows.t.any()  # grown capacity reads as zeros


def test_small_other_device_or_off_fall_back_to_torch_empty(monkeypatch):
    maps = []
    real = hugepages.mmap.mmap
    monkeypatch.setattr(hugepages.mmap, "mmap", lambda *a, **k: maps.append(a) or real(*a, **k))
    monkeypatch.setattr(hugepages, "ENABLED", True)
    monkeypatch.setattr(hugepages, "_mode", "madvise")
    small = hugepages.empty((16, 16), torch.float32)
    meta = hugepages.empty((1024, 1024), torch.float32, device="meta")
    assert small.shape == (16, 16) and meta.device.type == "meta" and meta.shape == (1024, 1024)
    assert maps == []  # under MIN_BYTES, another device: torch.empty
    monkeypatch.setattr(hugepages, "ENABLED", False)
    assert hugepages.empty((1024, 1024), torch.float32).shape == (1024, 1024) and maps == []
    monkeypatch.setattr(hugepages, "ENABLED", True)
    monkeypatch.setattr(hugepages, "_mode", "never")  # THP never (another OS: no mode at all)
    assert not hugepages.available() and hugepages.describe() == "unavailable"
    assert hugepages.empty((1024, 1024), torch.float32).shape == (1024, 1024) and maps == []
    m = Model.from_config(tiny_config(), seed=0)
    before = {n: p.data_ptr() for n, p in m.named_parameters()}
    hugepages.adopt(m)
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == before and maps == []
    if hugepages.sys.platform.startswith("linux") and hasattr(hugepages.mmap, "MADV_HUGEPAGE"):
        monkeypatch.setattr(hugepages, "_mode", "madvise")  # the counter sees the mapped path
        assert hugepages.empty((1024, 1024), torch.float32).untyped_storage().nbytes() == 4 << 20 and len(maps) == 1


@needs_thp
@pytest.mark.parametrize("max_length", [40, None])  # preallocated, grown by doubling (small: all in small pages)
def test_cache_and_weights_in_huge_pages_decode_the_same(monkeypatch, max_length):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)  # every buffer of the tiny model through the mapping (aligned)
    cfg = tiny_config(window=8)  # full, window ring and shared layers
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for on in (False, True):
        monkeypatch.setattr(hugepages, "ENABLED", on)
        m = Model.from_config(cfg, seed=0).eval()
        assert (m.embed.weight.data_ptr() % hugepages.HUGE == 0) == on
        ptrs = [p.data_ptr() for p in m.parameters()]
        assert [p.data_ptr() for p in hugepages.adopt(m).parameters()] == ptrs  # nothing moved twice (or when off)
        cache = m.new_cache(2, max_length=max_length)
        with torch.inference_mode():
            logits = [m(ids, cache=cache)[:, -1]]
            for _ in range(6):
                logits.append(m.decode_step(logits[-1].argmax(-1, keepdim=True), cache)[:, -1])
        held = [t for s in cache.layers if s is not None for t in s.tensors() if t.numel()]
        assert held and all((t.data_ptr() % hugepages.HUGE == 0) == on for t in held)
        out[on] = torch.stack(logits)
    assert torch.equal(out[True], out[False])
