"""Generation: greedy == step-by-step argmax, sampling, stop tokens, padding, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config

import kvlab
from kvlab.engine import sample


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """Inference only, without leaking the global grad mode into other test modules."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(window=6), seed=5)


def naive_greedy(model, ids, n):
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), 1)
    return ids


@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_greedy_equals_naive_full_forward_loop(model, chunk):
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    out = kvlab.generate(model, ids, max_new_tokens=12, prefill_chunk=chunk)
    assert torch.equal(out, naive_greedy(model, ids, 12))


def test_left_padded_batch_equals_rows_alone(model):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 97, (1, 10), generator=g)
    b = torch.randint(0, 97, (1, 4), generator=g)
    batch = torch.cat((a, torch.cat((torch.zeros(1, 6, dtype=torch.long), b), 1)))
    out = kvlab.generate(model, batch, max_new_tokens=8, lengths=[10, 4], prefill_chunk=3)
    assert torch.equal(out[0, 10:], kvlab.generate(model, a, max_new_tokens=8)[0, 10:])
    assert torch.equal(out[1, 10:], kvlab.generate(model, b, max_new_tokens=8)[0, 4:])
    mask = (torch.arange(10)[None] >= torch.tensor([[0], [6]])).long()
    assert torch.equal(out, kvlab.generate(model, batch, max_new_tokens=8, attention_mask=mask))


def test_stop_tokens_and_callback(model):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    free = kvlab.generate(model, ids, max_new_tokens=10)
    stop = int(free[0, 7])  # the 3rd generated token of row 0
    seen = []
    out = kvlab.generate(model, ids, max_new_tokens=10, stop_tokens=[stop], pad_token_id=96, callback=seen.append)
    row0 = out[0, 5:].tolist()
    assert row0[:3] == free[0, 5:8].tolist() and all(t == 96 for t in row0[3:])
    assert len(seen) == out.shape[1] - 5 and torch.equal(torch.stack(seen, 1), out[:, 5:])


def test_sampling_is_seeded_and_respects_top_k(model):
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    a = kvlab.generate(model, ids, max_new_tokens=16, temperature=1.0, seed=7)
    b = kvlab.generate(model, ids, max_new_tokens=16, temperature=1.0, seed=7)
    c = kvlab.generate(model, ids, max_new_tokens=16, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert picks == {1}  # token 1 alone holds > 50% of the mass
    assert int(sample(logits)) == 1


def test_too_long_prompt_is_a_clear_error(model):
    ids = torch.zeros(1, 500, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompt of 500 tokens \+ max_new_tokens=20 = 520 positions exceeds "
                                         r"the model's max_positions=512"):
        kvlab.generate(model, ids, max_new_tokens=20)
    with pytest.raises(ValueError, match="exceeds the model's max_positions=512"):
        model(torch.zeros(1, 513, dtype=torch.long))


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature=-1.0"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_k": 0}, "top_k=0"),
    ({"lengths": [0]}, "lengths must give"), ({"max_new_tokens": -1}, "max_new_tokens=-1"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kvlab.generate(model, torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_bad_inputs_to_the_model(model):
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=97\)"):
        model(torch.tensor([[5, 97]]))
    with pytest.raises(ValueError, match="only left padding"):
        model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1]]))
    cache = model.new_cache(1, max_length=4)
    model(torch.ones(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_length=4"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)
