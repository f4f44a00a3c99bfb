"""Parity with transformers: logits of a left-padded batch and greedy generation, per family.

Each case builds a tiny random transformers model from its own config class (fp32, eager attention),
saves it with ``save_pretrained``, loads it with ``kvlab.load`` and compares. Offline; no downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import assert_greedy_matches, assert_padded_logits_match, hf_logits, left_padded_batch, save, tiny_hf

import kvlab

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {"partial_rotary_factor": 0.5}),  # ignored by transformers' Llama
    "llama-bias-llama3rope": ("LlamaForCausalLM", {
        "attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "llama-yarn-tied": ("LlamaForCausalLM", {
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 64}}),  # 4 * 64 = max_position_embeddings
    "qwen3": ("Qwen3ForCausalLM", {}),
    "qwen3-sliding": ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 4,
                                           "layer_types": ["sliding_attention", "full_attention",
                                                           "sliding_attention"]}),
    "mistral-sliding": ("MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"mlp_only_layers": [1], "norm_topk_prob": True}),
}
LENGTHS = (20, 13)  # unequal rows, left-padded; 20 tokens cross a window of 4 several times
NEW = 32


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, kvlab.Model]:
    arch, kw = CASES[request.param]
    hf = tiny_hf(arch, **kw)
    path: Path = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, kvlab.load(path)


@torch.no_grad()
def test_logits_match(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    want = hf_logits(hf, ids, mask)  # positions as transformers' generate uses them
    # rows are independent of their padding: the short row alone gives the same logits
    assert_padded_logits_match(model, ids, mask, model(ids, attention_mask=mask), want)


@torch.no_grad()
def test_greedy_generation_matches(pair: tuple[Any, kvlab.Model]) -> None:
    hf, model = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, LENGTHS)
    assert_greedy_matches(hf, model, ids, mask, NEW)
