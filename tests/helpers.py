"""Small random model descriptions shared by the tests."""

from __future__ import annotations

import torch

from kvlab.config import LayerSpec, ModelConfig, MoESpec, uniform_layers
from kvlab.model import Model

# every attention kind/option the core supports, as LayerSpec keyword overrides
ATTENTION_VARIANTS: dict[str, dict] = {
    "mha": {"num_kv_heads": 4},
    "gqa": {},
    "mqa": {"num_kv_heads": 1, "qk_norm": True},
    "window": {"window": 5},
    "sinks": {"sinks": True},
    "window+sinks": {"window": 4, "sinks": True},
    "gate-sigmoid-head": {"output_gate": "sigmoid"},
    "gate-softplus-elem": {"output_gate": "softplus", "gate_per_head": False},
    "bias": {"qkv_bias": True, "o_bias": True},
    "partial-rope": {"rope": {"theta": 500.0, "partial": 0.5}},
    "nope": {"rope": None},
    "cca": {"attention": "cca"},  # compressed convolutional attention (cannot share K/V: no shared layer)
    "cca-window": {"attention": "cca", "window": 4, "conv_kernels": (3, 2), "rope": {"theta": 500.0, "partial": 0.5}},
}


def tiny_config(shared: bool = True, moe: bool = False, layers: int = 3, **overrides) -> ModelConfig:
    """A 3-layer model; with ``shared`` the last layer reads layer 1's K/V (not for cca: it cannot share)."""
    base = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 64}
    base.update(overrides)
    specs = uniform_layers(layers, **base)
    if shared and base.get("attention") != "cca":
        specs[-1].kv_source = layers - 2
    if moe:
        specs[0].mlp = "moe"
        specs[0].moe = MoESpec(num_experts=4, top_k=2, expert_size=32, shared_experts=1)
    return ModelConfig(vocab_size=97, hidden_size=64, layers=specs, max_positions=512)


def random_model(cfg: ModelConfig, seed: int = 0) -> Model:
    model = Model.from_config(cfg, seed=seed, std=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial sinks, norms and biases so they matter in the comparisons
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias", "norm.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def train_steps(model: Model, ids: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    """``steps`` AdamW steps of next-token cross-entropy on ``ids [B, T]``; the losses, one per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_sweep_fails_before_training(raw: dict, message: str, tmp_path) -> None:
    """``kvlab ablate`` on the sweep ``raw`` exits with 2 and creates no run directory, and parsing it raises a
    ValueError containing ``message``."""
    import json
    import re

    import pytest

    from kvlab.cli import main
    from kvlab.train.ablate import parse_sweep

    f = tmp_path / "sweep.json"
    f.write_text(json.dumps(raw))
    assert main(["ablate", str(f), "--out", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_sweep(raw)


__all__ = ["ATTENTION_VARIANTS", "LayerSpec", "assert_sweep_fails_before_training", "random_model", "tiny_config",
           "train_steps"]
