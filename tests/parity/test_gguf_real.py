"""The real GGUF files of the installed model packages (kvlab/models.py) against transformers 5.23's own GGUF loading
(``from_pretrained(dir, gguf_file=...)``, fp32): logits within 1e-4 on a few dozen tokens (Gemma 3 270M: also on
600 tokens, past its 512-token window, through kvlab's chunked prefill: as close to transformers' float64 forward as
transformers' fp32 one is), greedy generations identical.

Each model is loaded once per module by both libraries (transformers' Gemma 3 load is the slow part: its GGUF
reading, done once by tests/real_models.py). Print the figures with ``pytest -q -s tests/parity/test_gguf_real.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers
from real_models import share_gguf_parsing

import kvlab
from kvlab.models import MODELS, model_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, kvlab.Model]]:
    try:
        path = model_file(request.param)
    except ValueError as e:  # the package is not installed: `make test` installs it
        pytest.skip(str(e))
    with share_gguf_parsing():  # transformers' reading of the file done once: tests/real_models.py
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    yield request.param, hf, kvlab.load(request.param)
    del hf


def prompt(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` token ids drawn from the ordinary part of the vocabulary (past the control tokens)."""
    return torch.randint(300, min(vocab, 40000), (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair: tuple[str, Any, kvlab.Model]) -> None:
    name, hf, model = pair
    ids = prompt(model.config.vocab_size, 40)
    diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"\n{name}: max |logit diff| vs transformers GGUF, 40 tokens, fp32: {diff:.3g}")
    assert diff <= 1e-4


def error(x: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of ``|x - exact|``, in float64 (one temporary the size of the logits)."""
    d = (x.double() - exact).abs_()
    return d.max().item(), d.mean().item()


@torch.no_grad()
def test_past_the_window_through_the_cache(pair: tuple[str, Any, kvlab.Model]) -> None:
    name, hf, model = pair
    windows = [x.window for x in model.config.layers if x.window is not None]
    if not windows:
        pytest.skip(f"{name} has no sliding-window layers")
    n = max(windows) + 88
    ids = prompt(model.config.vocab_size, n, seed=1)
    want = hf(ids).logits
    exact = copy.deepcopy(hf).double()(ids).logits  # the ground both fp32 forwards are measured against
    cache = model.new_cache(1, max_length=n)
    got = torch.cat([model(ids[:, s:s + 256], cache=cache) for s in range(0, n, 256)], 1)
    diff = (got - want).abs().max().item()
    ours, theirs = error(got, exact), error(want, exact)
    print(f"\n{name}: max |logit diff| vs transformers GGUF, {n} tokens (chunked prefill of 256), fp32: {diff:.3g}; "
          f"from transformers' float64 forward (max, mean): kvlab {ours[0]:.3g}, {ours[1]:.3g}; transformers fp32 "
          f"{theirs[0]:.3g}, {theirs[1]:.3g}")
    # Gemma's logits reach 128 here and transformers' own fp32 forward is 3.9e-4 from its float64 one, so two fp32
    # forwards that sum in different orders (the chunks, the prefill's attention pieces: kvlab/layers/chunk_attend.py)
    # differ by more than 1e-4 (1.3e-4 whole vs chunked, 3.1e-4 with the pieces, on an AVX2 machine). The claim is
    # therefore against the float64 forward: kvlab's fp32 logits are as close to it as transformers' fp32 ones
    # (max and mean within 1.25x), and within twice transformers' own fp32 error of them.
    assert ours[0] <= 1.25 * theirs[0] and ours[1] <= 1.25 * theirs[1]
    torch.testing.assert_close(got, want, atol=2 * theirs[0], rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair: tuple[str, Any, kvlab.Model]) -> None:
    _, hf, model = pair
    ids = prompt(model.config.vocab_size, 24, seed=2)
    want = hf.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    got = kvlab.generate(model, ids, max_new_tokens=8, temperature=0.0)
    assert torch.equal(got, want)


def test_named_model_config_is_the_preset() -> None:
    """The Gemma 3 270M file's metadata describes exactly the published config the preset cites."""
    from kvlab.families import config_from_gguf
    from kvlab.presets import get_preset

    try:
        path = model_file("gemma-3-270m")
    except ValueError as e:
        pytest.skip(str(e))
    a, b = config_from_gguf(path).to_dict(), get_preset("gemma-3-270m").to_dict()
    for d in (a, b):
        d.pop("name")
        d.pop("source")
    assert a == b
