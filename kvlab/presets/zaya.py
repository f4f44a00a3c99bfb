"""ZAYA1-8B (Zyphra) and two counterparts that differ only in attention, to show what CCA saves.

``zaya1-8b``: 40 layers, hidden 2048, every layer CCA (compressed convolutional GQA) with 8 query heads and
2 KV heads of dim 128 in the compressed space (query width 1024 = hidden / 2, K/V width 256 = hidden / 8 of a
16-head MHA), convolution kernels 2 and 2, partial RoPE 0.5 with theta 5e6; MoE in every layer: 16 SwiGLU
experts of 2048, top-1, with a router MLP (256 wide) that carries the previous layer's router state, a skip
expert and balancing biases; fp32 residual stream, an affine embedding and per-channel residual scaling;
vocab 262272, tied head, 131072 positions. 8.84B parameters (0.76B active without the embedding). K/V per
token per layer 1 KiB in bf16 (5.0 GiB at 128K) plus 5,376 B of constant state per layer and sequence.

``zaya1-8b-gqa``: the same model with plain GQA of 16 query heads over the same 2 KV heads of 128 (the same
K/V per token, no convolution state, twice the attention FLOPs per token). ``zaya1-8b-mha``: plain MHA with 16
heads of 128 (8x the K/V: 40 GiB at 128K in bf16).
"""

from __future__ import annotations

from kvlab.config import LayerSpec, ModelConfig, MoESpec, RopeSpec
from kvlab.presets.registry import preset

ZAYA1_8B = ("Zyphra/ZAYA1-8B config.json (ZayaForCausalLM) as encoded by the transformers 5.23 ZayaConfig defaults: "
            "hidden 2048, 40 layers (all 'hybrid' = full CCA), 8 heads, 2 KV heads x 128, cca_time0/1 = 2/2, "
            "rope theta 5e6 partial 0.5, 16 experts x 2048 top-1, router_hidden_size 256, vocab 262272, tied, "
            "context 131072, rms_norm_eps 1e-5; CCA: arXiv 2510.04476 (8x smaller KV cache than MHA)")
GQA = "kvlab counterpart of zaya1-8b: plain GQA 16 query heads / 2 KV heads x 128, all else equal (base: " + ZAYA1_8B + ")"
MHA = "kvlab counterpart of zaya1-8b: plain MHA 16 heads x 128, all else equal (base: " + ZAYA1_8B + ")"


def _layers(attention: str, heads: int, kv_heads: int) -> list[LayerSpec]:
    layers = []
    for i in range(40):
        moe = MoESpec(num_experts=16, top_k=1, expert_size=2048, scoring="softmax", norm_topk=False,
                      bias_correction=True, router_hidden=256, router_carry=i > 0, skip_expert=True)
        layers.append(LayerSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=128, attention=attention,
                                rope=RopeSpec(theta=5_000_000.0, partial=0.5),  # cca: CCASpec() = kernels (2, 2)
                                residual_scaling=True, mlp="moe", moe=moe))
    return layers


def _model(name: str, source: str, attention: str, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=262272, hidden_size=2048, layers=_layers(attention, heads, kv_heads),
                       max_positions=131072, norm_eps=1e-5, tie_embeddings=True, embed_affine=True,
                       residual_fp32=True, name=name, source=source)


@preset("zaya1-8b", ZAYA1_8B)
def zaya1_8b() -> ModelConfig:
    """ZAYA1-8B: CCA 8/2 x 128 in every layer; 5.0 GiB K/V at 128K in bf16 plus 210 KiB of conv/value state."""
    return _model("zaya1-8b", ZAYA1_8B, "cca", 8, 2)


@preset("zaya1-8b-gqa", GQA)
def zaya1_8b_gqa() -> ModelConfig:
    """ZAYA1-8B with GQA 16/2 x 128: the same 5.0 GiB K/V at 128K, twice CCA's attention FLOPs."""
    return _model("zaya1-8b-gqa", GQA, "gqa", 16, 2)


@preset("zaya1-8b-mha", MHA)
def zaya1_8b_mha() -> ModelConfig:
    """ZAYA1-8B with MHA 16 x 128: 40 GiB K/V at 128K in bf16 (8x CCA's)."""
    return _model("zaya1-8b-mha", MHA, "gqa", 16, 16)


__all__ = ["zaya1_8b", "zaya1_8b_gqa", "zaya1_8b_mha"]
