"""The synthetic tasks and the byte-level text: deterministic, independent of batching, well formed."""

from __future__ import annotations

import pytest
import torch

from kvlab.train.data import IGNORE, Bytes, Copy, Passkey, Recall, make_task


@pytest.mark.parametrize("spec", [
    {"kind": "recall", "seq_len": 40, "vocab": 32, "num_pairs": 6, "num_queries": 4, "gap": 5},
    {"kind": "passkey", "seq_len": 50, "digits": 4, "depth": 0.5},
    {"kind": "copy", "seq_len": 30, "span": 8},
])
def test_deterministic_and_independent_of_batching(spec):
    task = make_task(spec)
    a_ids, a_t, _ = task.batch(seed=3, split="train", start=0, size=6)
    b_ids, b_t, _ = task.batch(seed=3, split="train", start=2, size=2)  # samples 2, 3 alone
    assert a_ids.shape == (6, task.seq_len) and a_t.shape == (6, task.seq_len)
    torch.testing.assert_close(a_ids[2:4], b_ids, rtol=0, atol=0)
    torch.testing.assert_close(a_t[2:4], b_t, rtol=0, atol=0)
    assert int(a_ids.max()) < task.vocab_size and int(a_ids.min()) >= 0
    other, _, _ = task.batch(seed=4, split="train", start=0, size=6)
    assert not torch.equal(other, a_ids)
    ev, _, _ = task.batch(seed=3, split="eval", start=0, size=6)
    assert not torch.equal(ev, a_ids)
    # targets are the next tokens where scored
    m = a_t != IGNORE
    assert m.any()
    assert torch.equal(a_t[:, :-1][m[:, :-1]], a_ids[:, 1:][m[:, :-1]])


def test_recall_answers_are_the_paired_values_and_distances_are_right():
    task = Recall(seq_len=48, vocab=32, num_pairs=8, num_queries=5, gap=7)
    task.validate()
    ids, tgt, info = task.example(seed=0, split="train", index=11)
    seq = ids.tolist() + [int(tgt[-1])]
    sep = seq.index(task.special("SEP"))
    pairs_start = sep - task.gap - 2 * task.num_pairs
    pairs = {seq[pairs_start + 2 * j]: seq[pairs_start + 2 * j + 1] for j in range(task.num_pairs)}
    scored = (tgt != IGNORE).nonzero().flatten().tolist()
    assert len(scored) == 5 == len(info["distances"])
    for pos, dist in zip(scored, info["distances"]):
        key, answer = seq[pos], int(tgt[pos])
        assert pairs[key] == answer
        value_pos = pairs_start + 2 * [seq[pairs_start + 2 * j] for j in range(8)].index(key) + 1
        assert pos - value_pos == dist


def test_passkey_depth_controls_the_key_position():
    shallow = Passkey(seq_len=64, digits=3, depth=0.0)
    deep = Passkey(seq_len=64, digits=3, depth=1.0)
    for t in (shallow, deep):
        t.validate()
    s, st, si = shallow.example(1, "train", 0)
    d, _, di = deep.example(1, "train", 0)
    key_tok = shallow.special("KEY")
    assert s.tolist().index(key_tok) == 0
    assert d.tolist().index(key_tok) > 50
    assert si["distance"] > di["distance"]
    # the scored answer is the key
    k = s.tolist().index(key_tok)
    assert st[st != IGNORE].tolist() == s[k + 1:k + 4].tolist()


def test_copy_scores_the_copy():
    t = Copy(seq_len=20, vocab=16, span=6)
    ids, tgt, _ = t.example(0, "train", 5)
    seq = ids.tolist() + [int(tgt[-1])]
    sep = seq.index(t.special("SEP"))
    assert seq[sep + 1:] == seq[sep - 6:sep]
    assert (tgt != IGNORE).sum() == 6


def test_bytes_defaults_to_the_stdlib_and_holds_out_eval(tmp_path):
    t = Bytes(seq_len=32, max_bytes=200_000)
    t.validate()
    ids, tgt, _ = t.example(0, "train", 0)
    assert ids.shape == (32,) and torch.equal(ids[1:], tgt[:-1]) and int(ids.max()) < 256
    data = t.corpus()
    cut = int(len(data) * (1 - t.eval_fraction))
    text = bytes(data[:cut].to(torch.uint8).tolist())
    assert b"def " in text  # Python source
    f = tmp_path / "a.txt"
    f.write_text("hello world " * 200)
    local = Bytes(seq_len=16, paths=[str(tmp_path)], pattern="*.txt")
    x, _, _ = local.example(0, "eval", 3)
    assert set(bytes(x.to(torch.uint8).tolist())) <= set(b"hello world ")


@pytest.mark.parametrize("spec, message", [
    ({"seq_len": 10}, "missing field 'kind'"),
    ({"kind": "nope"}, "task.kind='nope'"),
    ({"kind": "recall", "pairs": 3}, "unknown field(s) ['pairs']"),
    ({"kind": "recall", "seq_len": 10, "num_pairs": 8}, "task.seq_len=10"),
    ({"kind": "copy", "span": 0}, "task.span=0"),
    ({"kind": "passkey", "depth": 2}, "task.depth=2"),
    ({"kind": "recall", "gap": [5, 2]}, "task.gap=[5, 2]"),
    ({"kind": "recall", "seq_len": 40, "num_pairs": 4, "gap": [0, 40]}, "with the largest gap"),
])
def test_bad_task_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError) as e:
        make_task(spec)
    assert message in str(e.value)


def test_recall_gap_range_spreads_distances_and_stretches_with_the_length():
    t = make_task({"kind": "recall", "seq_len": 48, "vocab": 16, "num_pairs": 4, "num_queries": 4, "gap": [0, 20]})
    dists = set()
    for i in range(40):
        ids, tgt, info = t.example(0, "eval", i)
        assert ids.shape == (48,)
        scored = (tgt != IGNORE).nonzero().flatten().tolist()
        assert t.token_distances(info, len(scored)) == info["distances"]
        for p, d in zip(scored, info["distances"]):  # the answer's pair: key at p - d - 1, value at p - d
            assert ids[p] == ids[p - d - 1] and tgt[p] == ids[p - d]
        dists |= set(info["distances"])
    assert min(dists) < 10 and max(dists) > 25
    longer = t.at_length(96)
    assert longer.gap == [0, 68] and longer.example(0, "eval", 0)[0].shape == (96,)
    assert make_task({"kind": "passkey", "seq_len": 32}).at_length(64).seq_len == 64
