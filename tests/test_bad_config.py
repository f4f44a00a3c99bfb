"""Hostile config values: a string where a number belongs, NaN, infinity, negative scales — in a kvlab ModelConfig
(kvlab/validate.py, run by ModelConfig.validate) and in a checkpoint's config.json (run by read_config). Every error
names the field by its path and what is allowed."""

from __future__ import annotations

import json
import math

import pytest
from helpers import tiny_config

from kvlab.checkpoint import read_config
from kvlab.cli import main
from kvlab.config import ModelConfig
from kvlab.errors import ConfigError
from kvlab.validate import Range, check_fields


def _dict(**top) -> dict:
    d = tiny_config(shared=False, layers=4).to_dict()
    d.update(top)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][3].update(num_heads="4"), "layers[3].num_heads='4': must be a positive integer"),
    (lambda d: d["layers"][1].update(attn_scale=float("nan")), "layers[1].attn_scale=nan: must be a finite number > 0"),
    (lambda d: d["layers"][0].update(attn_scale=-0.125), "layers[0].attn_scale=-0.125: must be a finite number > 0"),
    (lambda d: d["layers"][0].update(attn_scale=0.0), "layers[0].attn_scale=0.0: must be a finite number > 0"),
    (lambda d: d.update(embed_scale=float("-inf")), "embed_scale=-inf: must be a finite number > 0"),
    (lambda d: d.update(embed_scale=-8.0), "embed_scale=-8.0: must be a finite number > 0"),
    (lambda d: d.update(norm_eps="abc"), "norm_eps='abc': must be a finite number in (0, 1)"),
    (lambda d: d.update(final_logit_softcap=float("nan")), "final_logit_softcap=nan"),
    (lambda d: d["layers"][2]["rope"].update(partial="0.5"), "layers[2].rope.partial='0.5': must be a finite number"),
    (lambda d: d["layers"][2]["rope"].update(factor="x"), "layers[2].rope.factor='x': must be a finite number > 0"),
    (lambda d: d["layers"][2]["rope"].update(theta=float("inf")), "layers[2].rope.theta=inf"),
    (lambda d: d["layers"][1]["gqa"].update(qk_norm="yes"), "layers[1].gqa.qk_norm='yes': must be true or false"),
    (lambda d: d["layers"][1].update(window=4.0), "layers[1].window=4.0: must be a positive integer or None"),
    (lambda d: d["layers"][0].update(rope="default"), "layers[0].rope='default': must be a RopeSpec or None"),
    (lambda d: d.update(vocab_size=True), "vocab_size=True: must be a positive integer"),
])
def test_model_config_values_are_checked_by_type_and_range_naming_the_field(edit, message):
    d = _dict()
    edit(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert message in str(e.value)


def test_moe_fields_are_checked_with_their_path():
    cfg = tiny_config(shared=False, moe=True).to_dict()
    cfg["layers"][0]["moe"]["routed_scaling"] = float("nan")
    with pytest.raises(ConfigError, match=r"layers\[0\]\.moe\.routed_scaling=nan"):
        ModelConfig.from_dict(cfg)


def test_ranges_print_and_contain_as_declared():
    r = Range(0, 1, lo_open=True)
    assert (0 in r, 1e-9 in r, 1 in r, 1.5 in r) == (False, True, True, False) and str(r) == "in (0, 1]"
    assert str(Range(1)) == ">= 1" and str(Range(0, lo_open=True)) == "> 0" and 5 in Range(1)


def test_a_field_range_declared_in_its_metadata_wins():
    import dataclasses

    @dataclasses.dataclass
    class Spec:
        width: int = dataclasses.field(default=4, metadata={"range": Range(2, 8)})
        pairs: tuple[float, float] = (0.5, 0.5)

    check_fields(Spec())
    with pytest.raises(ConfigError, match=r"^width=9: must be an integer in \[2, 8\]$"):
        check_fields(Spec(width=9))
    with pytest.raises(ConfigError, match=r"^pairs=\(0.5, nan\): must be two finite numbers >= 0$"):
        check_fields(Spec(pairs=(0.5, math.nan)))


HF = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
      "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_attention_heads="4"), "num_attention_heads='4': must be an integer"),
    (lambda c: c.update(rms_norm_eps="abc"), "rms_norm_eps='abc': must be a finite number"),
    (lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": "x"}),
     "rope_parameters.factor='x': must be a finite number"),
    (lambda c: c.update(partial_rotary_factor=float("nan")), "partial_rotary_factor=nan"),
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings='false': must be true or false"),
    (lambda c: c.update(hidden_size=-64), "hidden_size=-64: must be an integer >= 0"),
])
def test_checkpoint_config_json_values_are_checked_naming_file_and_key(tmp_path, capsys, edit, message):
    cfg = json.loads(json.dumps(HF))
    edit(cfg)
    f = tmp_path / "config.json"
    f.write_text(json.dumps(cfg))  # NaN is written as the non-standard NaN token, which Python's json reads
    with pytest.raises(ConfigError) as e:
        read_config(tmp_path)
    assert str(f) in str(e.value) and message in str(e.value)
    assert main(["calc", str(tmp_path), "--context", "1k"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("field, value, message", [
    ("weight_decay", float("nan"), "train.weight_decay=nan: must be a finite number >= 0"),
    ("grad_clip", float("nan"), "train.grad_clip=nan: must be a finite number >= 0 or None"),
    ("steps", "10", "train.steps='10': must be an integer"),
    ("betas", [0.9, float("inf")], "train.betas=[0.9, inf]: must be two finite numbers >= 0"),
])
def test_training_settings_are_checked_by_the_same_layer(field, value, message):
    from kvlab.train import parse_config

    raw = {"model": {"hidden_size": 32, "layers": [{"num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
                                                     "intermediate_size": 64}]},
           "task": {"kind": "copy", "seq_len": 16, "vocab": 16, "span": 6}, "train": {"steps": 2, field: value}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert message in str(e.value)
