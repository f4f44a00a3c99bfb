"""Tiny random transformers models (built offline from their own config classes) saved as checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

SIZES: dict[str, Any] = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {  # architecture -> (config class, model class, extra kwargs)
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                            {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                             "head_dim": 16}),
}


Rule = Callable[[str, torch.Tensor, torch.Generator], "torch.Tensor | None"]


def random_hf(cfg: Any, model_cls: str, seed: int = 0, rules: tuple[Rule, ...] = (),
              buffers: tuple[str, ...] = ()) -> transformers.PreTrainedModel:
    """``transformers.<model_cls>(cfg)`` (eager attention, fp32, plain generation config) with non-trivial random
    weights: every parameter, then every buffer whose name ends with one of ``buffers``, in order, from one generator
    seeded with ``seed``. The first of ``rules`` that returns a tensor for ``(name, tensor, generator)`` sets it;
    otherwise norms get ``1 + 0.2 N(0, 1)`` and the rest ``0.1 N(0, 1)``."""
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if buffers and n.endswith(buffers)]
    with torch.no_grad():
        for name, p in tensors:
            value = next((v for r in rules if (v := r(name, p, gen)) is not None), None)
            if value is None:
                noise = torch.randn(p.shape, generator=gen)
                value = 1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise
            p.copy_(value)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
    return model.eval()


def scaled(suffixes: str | tuple[str, ...], scale: float, offset: float = 0.0) -> Rule:
    """A rule: tensors whose names end with ``suffixes`` get ``offset + scale N(0, 1)``."""
    def rule(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
        return offset + scale * torch.randn(p.shape, generator=gen) if name.endswith(suffixes) else None
    return rule


def tiny_hf(arch: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A 3-layer fp32 model of ``arch`` with non-trivial random weights (norms and biases too)."""
    cfg_cls, model_cls, extra = ARCHS[arch]
    return random_hf(getattr(transformers, cfg_cls)(**{**SIZES, **extra, **overrides}), model_cls, seed)


def save(model: transformers.PreTrainedModel, path: Path, **kw: Any) -> Path:
    model.save_pretrained(path, **kw)
    return path


def hf_json(model: transformers.PreTrainedModel) -> dict[str, Any]:
    """The model's config as config.json would hold it (with its ``architectures`` entry)."""
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


def left_padded_batch(vocab: int, lengths: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, max(lengths)]`` with row i's last ``lengths[i]`` tokens real, pads (id 0) before."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t), generator=gen)
    mask = (torch.arange(t)[None] >= torch.tensor([t - n for n in lengths])[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def max_diff(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest absolute difference over the non-pad positions of ``[B, T, ...]`` tensors."""
    real = mask.bool()
    return (got[real] - want[real]).abs().max().item()


def assert_padded_logits_match(model: Any, ids: torch.Tensor, mask: torch.Tensor, got: torch.Tensor,
                               want: torch.Tensor, row_alone: int | None = 1) -> None:
    """kvlab's logits ``got`` of the left-padded batch equal transformers' ``want`` to 1e-4 over the non-pad
    positions; row ``row_alone`` (None: skip) run alone, without its padding, gives its padded logits."""
    assert got.shape == want.shape
    diff = max_diff(got, want, mask)
    assert diff <= 1e-4, f"max |logits diff| {diff:.2e} over non-pad positions"
    if row_alone is not None:
        n = int(mask[row_alone].sum())
        alone = model(ids[row_alone:row_alone + 1, -n:])
        assert (alone[0] - got[row_alone, -n:]).abs().max().item() <= 1e-4


def hf_logits(hf: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' logits for a left-padded batch, with the positions its ``generate`` uses."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def assert_greedy_matches(hf: transformers.PreTrainedModel, model: Any, ids: torch.Tensor, mask: torch.Tensor,
                          new: int, **generate_kw: Any) -> None:
    """``kvlab.generate`` gives transformers' greedy tokens, ``new`` of them for every row."""
    import kvlab

    want = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                       eos_token_id=None, pad_token_id=0)
    got = kvlab.generate(model, ids, max_new_tokens=new, temperature=0.0, attention_mask=mask, **generate_kw)
    assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + new)
    assert torch.equal(got, want), f"first differing step: {(got != want).any(0).nonzero()[0].item()}"
