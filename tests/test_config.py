"""ModelConfig validation: every bad field names the layer, the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import tiny_config

from kvlab.config import CCASpec, GQASpec, LayerSpec, ModelConfig, uniform_layers


def layers(n=4, **kw):
    base = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 64}
    base.update(kw)
    return uniform_layers(n, **base)


def make(specs, **kw):
    return ModelConfig(**{"vocab_size": 100, "hidden_size": 64, "layers": specs, **kw})


def test_kv_source_must_be_earlier():
    specs = layers()
    specs[3].kv_source = 5
    with pytest.raises(ValueError, match=r"layers\[3\]\.kv_source=5: a layer can only read K/V from an earlier layer"):
        make(specs)
    specs[3].kv_source = 3
    with pytest.raises(ValueError, match=r"layers\[3\]\.kv_source=3"):
        make(specs)


def test_kv_source_layout_mismatch_names_both_layers():
    specs = layers()
    specs[1].head_dim = 32
    specs[3].kv_source = 1
    with pytest.raises(ValueError, match=r"layers\[3\]\.head_dim=16 differs from layers\[1\]\.head_dim=32"):
        make(specs)


def test_kv_source_chain_is_rejected():
    specs = layers()
    specs[2].kv_source = 1
    specs[3].kv_source = 2
    with pytest.raises(ValueError, match=r"layers\[3\]\.kv_source=2: layers\[2\] reads its K/V from layers\[1\]"):
        make(specs)


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 0, r"layers\[0\]\.num_heads=0: must be a positive integer"),
    ("num_kv_heads", 3, r"layers\[0\]\.num_kv_heads=3: must divide num_heads=4"),
    ("window", -2, r"layers\[0\]\.window=-2: must be a positive integer"),
    ("attention", "flash", r"layers\[0\]\.attention='flash': allowed kinds: gqa"),
    ("output_gate", "tanh", r"layers\[0\]\.output_gate='tanh'"),
    ("mlp", "moe", r"layers\[0\]\.moe=None: required when mlp='moe'"),
    ("activation", "relu", r"layers\[0\]\.activation='relu': allowed: silu"),
])
def test_bad_layer_field(field, value, message):
    specs = layers()
    setattr(specs[0], field, value)
    with pytest.raises(ValueError, match=message):
        make(specs)


def test_bad_rope_and_moe_fields():
    specs = layers(rope={"theta": 1e4, "scaling": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"layers\[0\]\.rope\.original_max_positions=None: required"):
        make(specs)
    specs = layers(rope={"partial": 1.5})
    with pytest.raises(ValueError, match=r"layers\[0\]\.rope\.partial=1\.5: must be in \(0, 1\]"):
        make(specs)
    specs = layers(mlp="moe", moe={"num_experts": 4, "top_k": 5, "expert_size": 8})
    with pytest.raises(ValueError, match=r"layers\[0\]\.moe\.top_k=5: must be an integer in \[1, num_experts=4\]"):
        make(specs)


@pytest.mark.parametrize("field,value", [("vocab_size", 0), ("hidden_size", -1), ("norm_eps", 0.0),
                                         ("final_logit_softcap", -3.0)])
def test_bad_model_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}={value!r}"):
        make(layers(), **{field: value})


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown LayerSpec field\(s\) \['heads'\]"):
        ModelConfig.from_dict({"vocab_size": 10, "hidden_size": 8, "layers": [{"heads": 2}]})
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['depth'\]"):
        ModelConfig.from_dict({"vocab_size": 10, "hidden_size": 8, "layers": [], "depth": 3})


def test_json_round_trip(tmp_path):
    cfg = tiny_config(moe=True, window=5, rope={"theta": 1e5, "scaling": "yarn", "factor": 4.0,
                                                  "original_max_positions": 64})
    cfg.save(tmp_path / "c.json")
    back = ModelConfig.load(tmp_path / "c.json")
    assert back == cfg
    assert back.layers[0].moe.num_experts == 4 and back.layers[1].rope.scaling == "yarn"


def test_layerspec_defaults():
    s = LayerSpec(num_heads=8, num_kv_heads=2, head_dim=64)
    assert s.value_dim == 64 and s.stores_kv and s.scale == pytest.approx(0.125)
    assert dataclasses.replace(s, kv_source=0).stores_kv is False


def test_a_config_saved_with_the_old_flat_conv_kernels_still_loads(tmp_path):
    """kvlab before CCASpec wrote ``conv_kernels`` on every layer (CCA's option, (2, 2) on the others): such a
    config.json loads, the value moving into ``cca`` on a cca layer; a non-default value on another kind is refused."""
    cfg = ModelConfig(vocab_size=11, hidden_size=16, layers=[
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8),
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8, attention="cca",
                  cca=CCASpec(conv_kernels=(3, 2)))])
    old = cfg.to_dict()
    for x, kernels in zip(old["layers"], ([2, 2], [3, 2])):  # as the old to_dict() + json wrote them
        del x["cca"]
        x["conv_kernels"] = kernels
    (tmp_path / "config.json").write_text(json.dumps(old))
    back = ModelConfig.load(tmp_path / "config.json")
    assert back == cfg and back.layers[1].cca.conv_kernels == (3, 2) and back.layers[0].cca is None
    assert ModelConfig.from_dict(old) == cfg
    old["layers"][0]["conv_kernels"] = [9, 9]
    with pytest.raises(ValueError, match=r"layers\[0\]\.conv_kernels=\(9, 9\): not supported by gqa \(an option of "
                                         r"cca\); leave it at \(2, 2\)"):
        ModelConfig.from_dict(old)
    old["layers"][0]["conv_kernels"] = [2, 2]
    old["layers"][1]["cca"] = {"conv_kernels": [2, 3]}  # both forms, disagreeing
    with pytest.raises(ValueError, match=r"layers\[1\]\.conv_kernels=\(3, 2\): differs from cca\.conv_kernels"):
        ModelConfig.from_dict(old)


def test_an_unknown_sub_spec_field_is_named():
    with pytest.raises(ValueError, match=r"cca: unknown CCASpec field\(s\) \['kernels'\]; allowed: \['conv_kernels'\]"):
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, attention="cca", cca={"kernels": (2, 2)})


def test_a_config_saved_with_the_old_flat_gqa_options_still_loads(tmp_path):
    """kvlab before GQASpec wrote ``qk_norm``, ``v_norm``, ``k_eq_v`` and ``sink_tokens`` on every layer (gqa's
    options, at their defaults on the others): such a config.json loads, the values moving into ``gqa`` on a gqa
    layer; a non-default value on another kind, or the two forms disagreeing, is a named error."""
    cfg = ModelConfig(vocab_size=11, hidden_size=16, layers=[
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8, window=4,
                  gqa=GQASpec(qk_norm=True, v_norm=True, k_eq_v=True, sink_tokens=2)),
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=8, attention="cca")])
    old = cfg.to_dict()
    flat = ({"qk_norm": True, "v_norm": True, "k_eq_v": True, "sink_tokens": 2},
            {"qk_norm": False, "v_norm": False, "k_eq_v": False, "sink_tokens": 0})
    for x, values in zip(old["layers"], flat):  # as the old to_dict() + json wrote them
        del x["gqa"]
        x.update(values)
    (tmp_path / "config.json").write_text(json.dumps(old))
    back = ModelConfig.load(tmp_path / "config.json")
    assert back == cfg and back.layers[0].gqa == GQASpec(True, True, True, 2) and back.layers[1].gqa is None
    assert ModelConfig.from_dict(old) == cfg
    old["layers"][1]["qk_norm"] = True
    with pytest.raises(ValueError, match=r"layers\[1\]\.qk_norm=True: not supported by cca \(an option of gqa\); "
                                         r"leave it at False"):
        ModelConfig.from_dict(old)
    old["layers"][1]["qk_norm"] = False
    old["layers"][0]["gqa"] = {"sink_tokens": 3}  # both forms, disagreeing
    with pytest.raises(ValueError, match=r"layers\[0\]\.sink_tokens=2: differs from gqa\.sink_tokens=3"):
        ModelConfig.from_dict(old)
    old["layers"][0]["gqa"] = {"sink_tokens": 2, "qk_norm": True}  # both forms, agreeing: one value
    assert ModelConfig.from_dict(old) == cfg


def test_an_unknown_gqa_spec_field_is_named():
    with pytest.raises(ValueError, match=r"gqa: unknown GQASpec field\(s\) \['qknorm'\]; allowed: \['k_eq_v', "
                                         r"'qk_norm', 'sink_tokens', 'v_norm'\]"):
        LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8, gqa={"qknorm": True})
    with pytest.raises(ValueError, match=r"layers\[0\]\.gqa\.qk_norm='yes': must be true or false"):
        ModelConfig(vocab_size=11, hidden_size=16, layers=[LayerSpec(num_heads=2, num_kv_heads=1, head_dim=8,
                                                                     intermediate_size=8, gqa={"qk_norm": "yes"})])
