"""Storage of a CCA layer (``attention='cca'``): compressed K/V per position plus a constant recurrent state.

Per position: the normed, rotated compressed keys and values, in a :class:`FullKV` (full layers) or a
:class:`WindowKV` ring (window layers). Per sequence, allocated once whatever ``max_length``: the
convolution tail ``conv [B, (H + Hkv) * head_dim, k0 + k1 - 2]`` (the last raw ``[q, k]`` input
columns) and the delayed value row ``v_prev [B, Hkv * v_head_dim / 2]``. ``nbytes()`` counts both;
``token_nbytes()`` and ``state_nbytes()`` split them.
"""

from __future__ import annotations

import torch

from ..config import LayerSpec
from ..kinds.cca import conv_channels, conv_tail, value_half
from .storage import FullKV, KVStore, WindowKV


class CCAStore(KVStore):
    """Compressed K/V (``inner``) plus the convolution tail and the delayed value row of each sequence."""

    def __init__(self, inner: KVStore, batch: int, channels: int, tail: int, v_half: int, dtype: torch.dtype,
                 device) -> None:
        self.inner = inner
        self.conv = torch.zeros(batch, channels, tail, dtype=dtype, device=device)
        self.v_prev = torch.zeros(batch, v_half, dtype=dtype, device=device)

    @property
    def buf(self):
        """The per-position K/V buffers (as on FullKV / WindowKV)."""
        return self.inner.buf

    def tensors(self) -> list[torch.Tensor]:
        return [*self.inner.tensors(), self.conv, self.v_prev]

    def rows(self) -> list:
        return self.inner.rows()  # the conv tail and the delayed value row stay plain tensors

    def token_nbytes(self) -> int:
        """Bytes of the per-position K/V."""
        return self.inner.nbytes()

    def state_nbytes(self) -> int:
        """Bytes of the constant per-sequence state (conv tail and delayed value row)."""
        return sum(t.numel() * t.element_size() for t in (self.conv, self.v_prev))

    def append(self, k, v, start):
        return self.inner.append(k, v, start)

    def conv_input(self, qk: torch.Tensor, start: int) -> torch.Tensor:
        """Raw ``[q, k]`` columns ``[B, C, T]`` -> ``[B, C, tail + T]``: the carried tail prepended (zeros at a
        sequence start); the last ``tail`` columns are kept for the next call."""
        tail = self.conv.shape[-1]
        if not tail:
            return qk
        prev = self.conv if start > 0 else qk.new_zeros(qk.shape[0], qk.shape[1], tail)
        out = torch.cat((prev, qk), dim=-1)
        self.conv.copy_(out[..., -tail:])
        return out

    def previous_values(self, start: int) -> torch.Tensor | None:
        """The delayed value row ``[B, 1, Hkv Dv / 2]`` carried from the last call (None at a sequence start); a
        view, valid until :meth:`keep_values`."""
        return self.v_prev[:, None] if start > 0 else None

    def keep_values(self, last: torch.Tensor) -> None:
        """Keep the delayed value row ``[B, Hkv Dv / 2]`` of this call's last token."""
        self.v_prev.copy_(last)


def cca_store(spec: LayerSpec, batch: int, max_length: int | None, dtype: torch.dtype, device, quant=None) -> CCAStore:
    """The compressed K/V (quantized per ``quant``, the resolved kv_quant) and the full-precision conv state."""
    if spec.window is not None:
        inner: KVStore = WindowKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, spec.window, max_length,
                                  dtype, device, quant)
    else:
        inner = FullKV(batch, spec.num_kv_heads, spec.head_dim, spec.value_dim, max_length, dtype, device, quant)
    return CCAStore(inner, batch, conv_channels(spec), conv_tail(spec), value_half(spec), dtype, device)
