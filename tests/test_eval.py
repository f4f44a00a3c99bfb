"""kvlab.eval on tiny random models: perplexity through the cache, KL divergence, window variants, needle prompts."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_model, tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from kvlab.eval import (
    EvalError,
    VariantError,
    default_corpus,
    kl_divergence,
    kl_from_logits,
    load_corpus,
    perplexity,
    perplexity_at,
    plan_windows,
    token_nll,
    with_window,
)
from kvlab.eval.corpus import CorpusError
from kvlab.eval.needle import NEEDLE, build_prompt
from kvlab.tokenizer import Tokenizer

IDS = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(0)).tolist()


def reference_nll(model, seq: list[int]) -> torch.Tensor:
    """Per-token NLL of ``seq[1:]`` from one forward pass without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(seq[1:]), reduction="none")


@pytest.mark.parametrize(("n", "window", "stride", "prefix"), [(70, 16, None, 0), (70, 16, 5, 0), (70, 16, 7, 1),
                                                               (16, 16, None, 0), (17, 16, 15, 1), (5, 32, 3, 0)])
def test_windows_score_every_token_once(n, window, stride, prefix):
    plan = plan_windows(n, window, stride, prefix)
    scored = [i for w in plan for i in range(w.score_from, w.end)]
    assert scored == list(range(0 if prefix else 1, n))
    assert all(w.end - w.start + prefix <= window for w in plan)


@pytest.mark.parametrize("variant", ["plain", "window", "shared"])
def test_perplexity_through_the_cache_equals_the_forward_pass(variant):
    cfg = tiny_config(shared=variant == "shared", window=5 if variant == "window" else None)
    model = random_model(cfg)
    nll = token_nll(model, IDS, window=len(IDS), chunk=9)  # one window, prefilled in chunks of 9
    ref = reference_nll(model, IDS)
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)
    p = perplexity(model, IDS, window=len(IDS), chunk=9)
    assert p.tokens == len(IDS) - 1 and math.isclose(p.ppl, math.exp(float(ref.double().mean())), rel_tol=1e-6)
    assert math.isclose(p.nll_se, float(ref.double().std()) / math.sqrt(len(ref)), rel_tol=1e-5)


def test_strided_windows_with_a_bos_prefix():
    model = random_model(tiny_config())
    nll = token_nll(model, IDS, window=20, stride=8, prefix=[3], chunk=6)
    expected = []
    for w in plan_windows(len(IDS), 20, 8, 1):
        seq = [3, *IDS[w.start:w.end]]
        per = reference_nll(model, seq)  # per[k] scores seq[k + 1] = IDS[w.start + k]
        expected.append(per[w.score_from - w.start:])
    torch.testing.assert_close(nll, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_bad_settings_are_named():
    model = random_model(tiny_config())
    with pytest.raises(EvalError, match="stride=30"):
        perplexity(model, IDS, window=20, stride=30)
    with pytest.raises(EvalError, match="window=1"):
        perplexity(model, IDS, window=1)
    with pytest.raises(EvalError, match="max_positions=512"):
        perplexity(model, list(range(90)) * 7, window=600)


def test_kl_of_a_model_against_itself_is_zero_and_against_a_perturbed_copy_positive():
    model = random_model(tiny_config())
    same = kl_divergence(model, model, IDS, window=32, chunk=7)
    assert same.tokens == len(IDS) - 1 and same.mean_kl < 1e-7 and same.max_kl < 1e-6 and same.top1 == 1.0
    assert same.ref_nll == same.variant_nll
    other = random_model(tiny_config())
    with torch.no_grad():
        other.layers[0].attn.q_proj.weight.add_(torch.randn_like(other.layers[0].attn.q_proj.weight) * 0.3)
    diff = kl_divergence(model, other, IDS, window=32, chunk=7)
    assert diff.mean_kl > 1e-4 and diff.max_kl >= diff.p99_kl >= diff.median_kl >= 0 and diff.kl_se > 0
    # the per-token KL by hand, on one window holding the whole text
    with torch.no_grad():
        lp, lq = (m(torch.tensor([IDS]))[0, :-1].log_softmax(-1) for m in (model, other))
    by_hand = (lp.exp() * (lp - lq)).sum(-1)
    one = kl_divergence(model, other, IDS, window=len(IDS), chunk=5)
    assert math.isclose(one.mean_kl, float(by_hand.double().mean()), rel_tol=1e-4)
    assert one.top1 == float((lp.argmax(-1) == lq.argmax(-1)).double().mean())


def test_kl_from_logits_of_two_known_distributions_and_their_targets():
    # two-token vocabulary: P = (0.5, 0.5) against Q = (0.8, 0.2): KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    ref = torch.zeros(3, 2)
    var = torch.log(torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8]]))
    tgt = torch.tensor([0, 1, 1])
    chunks = [(ref[:2], var[:2], tgt[:2]), (ref[2:], var[2:], tgt[2:])]  # chunk boundaries do not matter
    r = kl_from_logits(iter(chunks))
    expect = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert r.tokens == 3 and math.isclose(r.mean_kl, expect, rel_tol=1e-6) and r.kl_se < 1e-6
    assert math.isclose(r.ref_nll, math.log(2), rel_tol=1e-6)
    assert math.isclose(r.variant_nll, -(math.log(0.8) + math.log(0.2) + math.log(0.8)) / 3, rel_tol=1e-6)
    # ties in the reference pick index 0, the variant picks 0, 0, 1
    assert math.isclose(r.top1, 2 / 3)
    with pytest.raises(EvalError, match="one shape"):
        kl_from_logits([(ref, var[:, :1], tgt)])
    with pytest.raises(EvalError, match="at least one"):
        kl_from_logits([])


def test_window_variant_shares_weights_and_changes_only_the_attention_span():
    model = random_model(tiny_config(shared=False))
    v = with_window(model, 8)
    assert v.embed.weight.data_ptr() == model.embed.weight.data_ptr()
    assert all(s.window == 8 for s in v.config.layers) and all(s.window is None for s in model.config.layers)
    wide = with_window(model, 512)  # a window longer than the text changes nothing
    torch.testing.assert_close(token_nll(wide, IDS, 70), token_nll(model, IDS, 70), atol=1e-6, rtol=1e-6)
    built = random_model(tiny_config(shared=False, window=8))  # the same weights in a model built with windows
    built.load_state_dict(model.state_dict())
    torch.testing.assert_close(token_nll(v, IDS, 70, chunk=11), reference_nll(built, IDS), atol=1e-5, rtol=1e-5)
    assert kl_divergence(model, v, IDS, 70).mean_kl > 1e-4
    with pytest.raises(VariantError, match="window=0"):
        with_window(model, 0)


def _char_tokenizer() -> Tokenizer:
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!'\n"))
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(["<unk>", *chars])}, merges=[],
                                     unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, "chars", {"unk_token": "<unk>"})


def test_needle_prompt_has_the_length_and_the_needle_at_a_line_break():
    tok = _char_tokenizer()
    text = "\n".join(f"Line {i} of the haystack says nothing." for i in range(200))
    hay = tok.encode(text, special=False)
    for depth in (0.0, 0.3, 1.0):
        ids = build_prompt(tok, hay, 600, depth, "the orchard", "1234567")
        assert len(ids) == 600
        prompt = tok.decode(ids)
        needle = NEEDLE.format(name="the orchard", number="1234567")
        at = prompt.index(needle)
        assert at == 0 or prompt[at - 1] == "\n"
        room = 600 - len(tok.encode(needle + "\n")) - len(tok.encode(
            "\n\nWhat is the secret number of the orchard? The secret number of the orchard is"))
        assert abs(at - depth * room) <= 64
        assert prompt.endswith("The secret number of the orchard is")
    with pytest.raises(EvalError, match="give a longer text"):
        build_prompt(tok, hay[:100], 600, 0.5, "the orchard", "1")


def test_default_corpus_is_fixed_and_files_are_read(tmp_path):
    a, b = default_corpus(), default_corpus()
    assert a.text == b.text and len(a.text) > 200_000
    import argparse
    assert a.text.startswith(argparse.__doc__.strip()[:200])
    assert "Python" in a.provenance and a.sha256[:16] in a.describe(1234) and "1,234 tokens" in a.describe(1234)
    f = tmp_path / "t.txt"
    f.write_text("some text\n")
    assert load_corpus(f).text == "some text\n"
    f.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(f)
    with pytest.raises(CorpusError, match="cannot read"):
        load_corpus(tmp_path / "missing.txt")


def test_perplexity_at_lengths_equals_separate_windows():
    model = random_model(tiny_config(window=6))
    got = perplexity_at(model, IDS, [10, 25, 40], prefix=[5], chunk=7)
    for n, p in zip([10, 25, 40], got):
        want = perplexity(model, IDS[:n - 1], n, prefix=[5])
        assert p.tokens == want.tokens == n - 1 and math.isclose(p.mean_nll, want.mean_nll, rel_tol=1e-6)
    with pytest.raises(EvalError, match="the text has 70"):
        perplexity_at(model, IDS, [100])
