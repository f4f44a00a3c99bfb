"""Attention sinks as a logit: a softmax whose denominator has one more term (gpt-oss, DeepSeek V4); read by the
attention of kvlab/layers/core.py and by the blocked decode of kvlab/layers/blocked.py."""

from __future__ import annotations

import torch

from .cast import as_fp32


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``scores [..., L]`` with an extra logit ``sink [..., 1]`` in the denominator
    (gpt-oss / DeepSeek V4 attention sinks); the sink's own probability is dropped. Computed in fp32."""
    scores = as_fp32(scores)
    if sink is None:
        return scores.softmax(dim=-1)
    return torch.cat((scores, as_fp32(sink).expand(*scores.shape[:-1], 1)), dim=-1).softmax(dim=-1)[..., :-1]
