"""The distillation loss against a frozen teacher (kvlab/train/distill.py runs recoveries with it).

The loss of a scored token is ``kl_weight * T^2 * KL(p_teacher,T || p_student,T) + lm_weight * CE(student)``, the
softmaxes at temperature ``T`` taken in fp32 (Hinton et al. 2015, arXiv 1503.02531; the KL direction of
llama.cpp's ``--kl-divergence`` and of kvlab eval). The teacher runs under the same autocast as the student, under
``no_grad``, with frozen weights that are never written to a checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .data import IGNORE

if TYPE_CHECKING:
    from kvlab.model import Model


def kl_sum(teacher: Model, ids: torch.Tensor, targets: torch.Tensor, student_logits: torch.Tensor, ctx,
           temperature: float = 1.0, agreement: bool = False) -> Any:
    """Sum over the scored positions (``targets != IGNORE``) of KL(teacher || student) at ``temperature``.

    ids, targets ``[B, T]``; student_logits ``[B, T, V]`` (fp32, with its graph). With ``agreement`` also the count of
    scored positions where both models' argmax agree: ``(kl, agree)``.
    """
    with torch.no_grad(), ctx:
        t_logits = teacher(ids)
    mask = (targets != IGNORE).reshape(-1)
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)[mask].float()
    t = t_logits.reshape(-1, v)[mask].float()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    if agreement:
        return kl, (s.argmax(-1) == t.argmax(-1)).sum()
    return kl


__all__ = ["kl_sum"]
