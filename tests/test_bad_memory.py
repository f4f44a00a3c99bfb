"""Memory preflight: a cache or model larger than the available memory is refused before anything is allocated,
with both figures and options that fit; --force tries anyway. The available memory is a fake figure here
(monkeypatched); nothing large is ever allocated."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from kvlab import preflight
from kvlab.cli import main
from kvlab.costs import costs
from kvlab.errors import InsufficientMemoryError
from kvlab.model import Model
from kvlab.presets import get_preset
from kvlab.units import fmt_bytes

GIB = 1024**3


@pytest.fixture
def available(monkeypatch):
    """Set the available memory the preflight sees: ``available(n_bytes)``."""
    def set_to(n: int) -> None:
        monkeypatch.setattr(preflight, "available_bytes", lambda device="cpu": n)
    return set_to


def test_the_issue_case_llama_8b_130000_tokens_batch_8_is_refused_with_both_figures(available, capsys):
    available(64 * GIB)
    cfg = get_preset("llama-3.1-8b")
    kv = costs(cfg, context=130000 + 32, dtype="float32", batch=8).kv_cache_bytes
    assert kv > 64 * GIB
    assert main(["bench", "llama-3.1-8b", "--context", "130000", "--batch", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "kvlab: error:" in err and "64.00 GiB is available" in err and "Traceback" not in err
    assert "batch 8" in err and "--batch " in err and "--context " in err and "--force" in err


def test_every_suggested_option_fits_and_the_next_step_up_does_not(available):
    cfg = get_preset("llama-3.1-8b")
    budget = 70 * GIB
    available(budget)
    with pytest.raises(InsufficientMemoryError) as e:
        preflight.check_memory(cfg, batch=8, context=131072, dtype="bfloat16")
    msg = str(e.value)
    need = costs(cfg, context=131072, dtype="bfloat16", batch=8).kv_cache_bytes
    assert fmt_bytes(need) in msg and fmt_bytes(budget) in msg and "llama-3.1-8b" in msg
    b = int(msg.split("--batch ")[1].split()[0])
    assert preflight.kv_bytes(cfg, b, 131072, "bfloat16") <= budget < preflight.kv_bytes(cfg, b + 1, 131072, "bfloat16")
    ctx = msg.split("--context ")[1].split()[0]
    from kvlab.units import parse_context

    c = parse_context(ctx)
    assert preflight.kv_bytes(cfg, 8, c, "bfloat16") <= budget < preflight.kv_bytes(cfg, 8, c + 1024, "bfloat16")
    assert "sliding window of" in msg and "8-bit quantized KV cache, kv_quant='int8'" in msg


def test_new_cache_is_refused_before_allocating_and_forced_allocates(available):
    model = Model.from_config(tiny_config(shared=False, layers=2), seed=0)
    need = costs(model.config, context=512, dtype="float32", batch=2).kv_cache_bytes
    available(need - 1)
    with pytest.raises(InsufficientMemoryError, match=fmt_bytes(need)):
        model.new_cache(2, max_length=512)
    with preflight.forced():
        cache = model.new_cache(2, max_length=512)
    assert cache.nbytes() == need
    available(need)
    assert model.new_cache(2, max_length=512).nbytes() == need  # exactly enough is enough


def test_a_quantized_cache_is_priced_as_quantized_by_the_preflight(available):
    model = Model.from_config(tiny_config(shared=False, layers=2), seed=0)
    plain = costs(model.config, context=512, dtype="float32", batch=2).kv_cache_bytes
    int8 = costs(model.config, context=512, dtype="float32", batch=2, kv_quant="int8").kv_cache_bytes
    assert int8 < plain
    available(int8)
    with pytest.raises(InsufficientMemoryError, match="kv_quant='int8'"):  # offered as the option that fits
        model.new_cache(2, max_length=512)
    assert model.new_cache(2, max_length=512, kv_quant="int8").nbytes() == int8


def test_generate_checks_weights_and_cache_before_loading(available, tmp_path, capsys, monkeypatch):
    from parity.hf_tiny import save, tiny_hf

    import kvlab

    d = save(tiny_hf("LlamaForCausalLM"), tmp_path / "llama")
    available(1000)
    loaded = []
    monkeypatch.setattr(kvlab, "load", lambda *a, **k: loaded.append(a))
    assert main(["generate", str(d), "--ids", "1,2,3", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "of weights" in err and "1000 B is available" in err and "the weights alone do not fit" in err
    assert loaded == []  # refused before loading


def test_force_flag_lets_bench_try_anyway(available, capsys):
    available(1)
    args = ["bench", "llama-3.1-8b", "--context", "64", "--decode-tokens", "2", "--max-weight-gib", "0.05",
            "--bandwidth-mib", "1", "--no-progress", "--json"]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_available_bytes_reads_the_machine():
    n = preflight.available_bytes("cpu")
    import psutil

    assert 0 < n <= psutil.virtual_memory().total
    assert torch.device("cpu").type == "cpu"
