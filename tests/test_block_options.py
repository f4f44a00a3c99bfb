"""Block options added for Gemma 4 (sandwich norms, v norm, K = V, layer scalar, dense+MoE, PLE,
proportional RoPE): validation, JSON round trip, and the formulas against direct re-computations."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

from kvlab.config import LayerSpec, ModelConfig, MoESpec, RopeSpec
from kvlab.layers.rope import Rotary


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def one(**kw) -> ModelConfig:
    base = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 32}
    return ModelConfig(vocab_size=50, hidden_size=32, layers=[LayerSpec(**{**base, **kw})])


@pytest.mark.parametrize("kw,message", [
    ({"gqa": {"k_eq_v": True}, "v_head_dim": 8},
     r"layers\[0\]\.gqa\.k_eq_v=True: V is the K projection: needs v_head_dim=8"),
    ({"sandwich_norm": 1}, r"layers\[0\]\.sandwich_norm=1: must be true or false"),
    ({"layer_scalar": "yes"}, r"layers\[0\]\.layer_scalar='yes': must be true or false"),
    ({"mlp": "dense+moe"}, r"layers\[0\]\.moe=None: required when mlp='dense\+moe'"),
    ({"mlp": "dense+moe", "intermediate_size": 0, "moe": MoESpec(num_experts=2, top_k=1, expert_size=8)},
     r"layers\[0\]\.intermediate_size=0: must be a positive integer"),
    ({"mlp": "moe", "moe": MoESpec(num_experts=2, top_k=1, expert_size=8, router_norm=None)},
     r"layers\[0\]\.moe\.router_norm=None: must be true or false"),
    ({"rope": RopeSpec(scaling="proportional", partial=0.05)}, r"layers\[0\]\.rope\.partial=0\.05"),
    ({"rope": RopeSpec(scaling="nope")}, r"layers\[0\]\.rope\.scaling='nope': allowed: .*proportional"),
])
def test_new_fields_are_validated(kw, message) -> None:
    with pytest.raises(ValueError, match=message):
        one(**kw)


def test_ple_fields_are_validated() -> None:
    with pytest.raises(ValueError, match=r"ple_dim=0: must be a positive integer"):
        ModelConfig(vocab_size=50, hidden_size=32, layers=one().layers, ple_dim=0)
    with pytest.raises(ValueError, match=r"ple_vocab_size=10: only meaningful with ple_dim set"):
        ModelConfig(vocab_size=50, hidden_size=32, layers=one().layers, ple_vocab_size=10)


def test_every_new_field_round_trips_through_json(tmp_path) -> None:
    moe = MoESpec(num_experts=4, top_k=2, expert_size=8, router_norm=True, expert_scale=True)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, ple_dim=4, ple_vocab_size=40, layers=[
        LayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=32, gqa={"v_norm": True, "k_eq_v": True},
                  sandwich_norm=True, layer_scalar=True, mlp="dense+moe", moe=moe,
                  rope=RopeSpec(theta=1e6, scaling="proportional", partial=0.25)),
        LayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64, kv_source=0)])
    cfg.save(tmp_path / "c.json")
    back = ModelConfig.load(tmp_path / "c.json")
    assert back == cfg and back.layers[0].moe.router_norm and back.layers[0].rope.scaling == "proportional"


def test_proportional_rope_matches_transformers() -> None:
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Gemma4TextConfig(head_dim=16, global_head_dim=64, num_hidden_layers=6)
    want, _ = ROPE_INIT_FUNCTIONS["proportional"](hf, "cpu", layer_type="full_attention")
    rot = Rotary(RopeSpec(theta=1e6, scaling="proportional", partial=0.25), 64)
    assert rot.rot_dim == 64
    torch.testing.assert_close(rot._inv, want.float(), rtol=0, atol=0)
    assert int((rot._inv > 0).sum()) == 8  # 0.25 * 64 / 2 rotated pairs, the rest untouched


def test_block_formula_by_hand() -> None:
    """One layer recomputed from its weights: sandwich norms, K = V, v norm, layer scalar, PLE."""
    cfg = ModelConfig(vocab_size=50, hidden_size=32, ple_dim=4, embed_scale=2.0, layers=[
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=24,
                  gqa={"qk_norm": True, "v_norm": True, "k_eq_v": True}, sandwich_norm=True, layer_scalar=True, attn_scale=1.0, rope=None, activation="gelu")])
    m = random_model(cfg, seed=1)
    with torch.no_grad():
        m.layers[0].layer_scalar.fill_(0.7)
    ids = torch.tensor([[3, 7, 11]])
    got = m(ids)

    def rms(x, w=None, eps=1e-6):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if w is None else y * w

    L, P = m.layers[0], m.ple
    x = m.embed.weight[ids] * 2.0
    tab = P.table.weight[ids] * 2.0  # sqrt(ple_dim = 4)
    ctx = rms((x @ P.proj.weight.T) / 32 ** 0.5, P.norm.weight)
    p = (tab + ctx) / 2 ** 0.5
    h = rms(x, L.attn_norm.weight)
    q = rms((h @ L.attn.q_proj.weight.T).view(1, 3, 2, 16), L.attn.q_norm.weight).transpose(1, 2)
    kraw = (h @ L.attn.k_proj.weight.T).view(1, 3, 1, 16)
    k = rms(kraw, L.attn.k_norm.weight).transpose(1, 2)
    v = rms(kraw).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, 3, 32) @ L.attn.o_proj.weight.T
    x = x + rms(a, L.post_attn_norm.weight)
    g = L.mlp
    hm = rms(x, L.mlp_norm.weight)
    mlp = (torch.nn.functional.gelu(hm @ g.gate_proj.weight.T) * (hm @ g.up_proj.weight.T)) @ g.down_proj.weight.T
    x = x + rms(mlp, L.post_mlp_norm.weight)
    e = L.ple
    x = x + rms((torch.nn.functional.gelu(x @ e.gate.weight.T) * p) @ e.proj.weight.T, e.norm.weight)
    x = x * 0.7
    want = rms(x, m.norm.weight) @ m.lm_head.weight.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
