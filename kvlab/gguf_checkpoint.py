"""GGUF checkpoints (llama.cpp's one-file format): header -> ModelConfig, tensors dequantised -> the family's weights.

The file's metadata becomes the ``config.json`` dict of the matching transformers architecture and goes through the
same family reader as a checkpoint directory (kvlab/families), so a GGUF and its safetensors original give the same
ModelConfig. The header is parsed here (GGUF v2/v3, ggml-org/ggml docs/gguf.md); tensor types, block sizes and
dequantisation to fp32 come from the ``gguf`` package (llama.cpp's own). Tensors are renamed to the family's HF
names and handed to the family's weight map, with llama.cpp's layout changes undone (as its convert_hf_to_gguf.py
makes them):
- ``llama``: the rows of ``attn_q`` / ``attn_k`` are permuted per head from rotate-half to interleaved pairs
  (``qwen2`` and ``qwen3`` files keep them as they are);
- ``gemma3``: every ``*norm.weight`` is stored as ``1 + w`` (Gemma applies ``1 + w``; kvlab stores ``w``).
:func:`weight_bytes` (and kvlab.families.config_from_gguf) read the header only (nothing is dequantised). Nothing in the file
is executed. A truncated or corrupt file raises a ValueError naming the file (and the tensor where one is at fault).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# the tensor types kvlab dequantises (those ``gguf.dequantize`` implements and llama.cpp's common files use)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


class GGUFFileError(ValueError):
    """A GGUF file kvlab cannot read; the message names the file (and the tensor or key at fault)."""


def is_gguf(spec: Any) -> bool:
    """``spec`` names a ``.gguf`` file (that it exists is checked when it is read)."""
    return isinstance(spec, (str, Path)) and str(spec).lower().endswith(".gguf")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class _Header:
    """A little-endian GGUF v2/v3 header parser (struct.unpack_from over a memory map of the file).

    gguf's own ``GGUFReader`` builds numpy views for every element of every array (Gemma 3's 262,144-token
    vocabulary: tens of seconds on a busy machine); this reads the same layout and skips what it is not asked for.
    """

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFileError(f"truncated or corrupt: a string of {n:,} bytes at byte {self.pos:,} runs past the "
                                "end of the file")
        v = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return v

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind == 6:  # float32: the shortest decimal that reads back as the same float32 (1e-06, not 9.99999997e-07)
            import numpy as np

            return float(np.format_float_positional(np.float32(self.take("<f")), unique=True, trim="0"))
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise GGUFFileError(f"truncated or corrupt: unknown metadata value type {kind} at byte {self.pos:,}")
        sub, n = self.take("<I"), self.take("<Q")
        if sub in _SCALARS:  # fixed size: read at once (floats as stored), or jump over it
            fmt = _SCALARS[sub]
            size = n * struct.calcsize(fmt)
            if self.pos + size > len(self.buf):
                raise GGUFFileError(f"truncated or corrupt: an array of {n:,} values at byte {self.pos:,} runs past "
                                    "the end of the file")
            out = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos)) if keep else None
            self.pos += size
            return out
        out = [self.value(sub, keep) for _ in range(n)]
        return out if keep else None


def _parse(path: Path, arrays: bool) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, [(name, dims innermost first, ggml type id, relative offset)], data start) of a GGUF file."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFFileError("the file is empty") from None
    h = _Header(buf)
    try:
        if h.take("<I") != 0x46554747:
            raise GGUFFileError("not a GGUF file (it does not start with 'GGUF')")
        version = h.take("<I")
        if version not in (2, 3):
            raise GGUFFileError(f"GGUF version {version} is not supported (2 and 3 are; a big-endian file reads as "
                                "a huge version)")
        n_tensors, n_kv = h.take("<Q"), h.take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            keep = arrays or not key.startswith("tokenizer.ggml.")  # the vocabulary and merges: only when asked
            meta[key] = h.value(h.take("<I"), keep)
        infos = []
        for _ in range(n_tensors):
            name = h.string()
            dims = tuple(h.take("<Q") for _ in range(h.take("<I")))
            infos.append((name, dims, h.take("<I"), h.take("<Q")))
    except struct.error:
        raise GGUFFileError(f"truncated or corrupt: the header runs past the end of the file (byte {h.pos:,})") from None
    finally:
        buf.close()
    align = int(meta.get("general.alignment", 32))
    return meta, infos, (h.pos + align - 1) // align * align


@dataclass
class GGUFTensorInfo:
    """One tensor's header entry; ``shape`` is the torch order (GGUF lists dims innermost first)."""

    name: str
    kind: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class GGUFFile:
    """A GGUF file's header: metadata (the tokenizer's arrays only when read with ``arrays=True``) and tensor infos."""

    path: Path
    arch: str
    meta: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    def get(self, key: str, default: Any = ...) -> Any:
        """Metadata ``<arch>.<key>``; a missing key without a default is a named error."""
        full = f"{self.arch}.{key}"
        if full in self.meta:
            return self.meta[full]
        if default is ...:
            raise GGUFFileError(f"GGUF file {str(self.path)!r}: metadata {full!r} is missing")
        return default

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor's data as stored (quantized) in the file."""
        return sum(t.n_bytes for t in self.tensors.values())

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.kind.name for t in self.tensors.values()).most_common())

    def data(self, name: str) -> Any:
        """The tensor's stored data as the numpy array ``gguf.dequantize`` takes (memory-mapped, read-only)."""
        import numpy as np
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quant_shape_to_byte_shape

        t = self.tensors[name]
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))
        if t.kind == Q.F32:
            return mm.view(np.float32).reshape(t.shape)
        if t.kind == Q.F16:
            return mm.view(np.float16).reshape(t.shape)
        return mm.reshape(quant_shape_to_byte_shape(t.shape, t.kind))


def read_gguf(path: str | Path, arrays: bool = False) -> GGUFFile:
    """Read a GGUF file's header (metadata and tensor infos; the tokenizer's arrays with ``arrays``); no tensor data.

    Every tensor's type and extent are checked: an unknown type or a tensor running past the end of the file (a
    truncated download) is a GGUFFileError naming the file and the tensor.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    if not p.is_file():
        raise GGUFFileError(f"GGUF file {str(p)!r} does not exist")
    try:
        meta, infos, start = _parse(p, arrays)
    except GGUFFileError as e:
        raise GGUFFileError(f"GGUF file {str(p)!r}: {e}") from None
    size = p.stat().st_size
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, kind_id, offset in infos:
        try:
            kind = GGMLQuantizationType(kind_id)
        except ValueError:
            raise GGUFFileError(f"GGUF file {str(p)!r}: tensor {name!r} has an unknown ggml type id {kind_id}") from None
        block, type_size = GGML_QUANT_SIZES[kind]
        info = GGUFTensorInfo(name, kind, tuple(int(d) for d in reversed(dims)), start + offset,
                              math.prod(dims) * type_size // block)
        if info.offset + info.n_bytes > size:
            raise GGUFFileError(f"GGUF file {str(p)!r} is truncated or corrupt: tensor {name!r} ({kind.name}, shape "
                                f"{list(info.shape)}) ends at byte {info.offset + info.n_bytes:,}, the file has "
                                f"{size:,} bytes")
        if name in tensors:
            raise GGUFFileError(f"GGUF file {str(p)!r}: tensor {name!r} appears twice")
        tensors[name] = info
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFFileError(f"GGUF file {str(p)!r}: metadata 'general.architecture' is missing")
    return GGUFFile(p, arch, meta, tensors)


# -- architectures --------------------------------------------------------------------------------------------------
def _int(g: GGUFFile, key: str, default: Any = ...) -> int:
    v = g.get(key, default)
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise GGUFFileError(f"GGUF file {str(g.path)!r}: {g.arch}.{key} varies per layer ({v}); "
                                "kvlab reads one value for every layer")
        v = v[0]
    return int(v)


def _common(g: GGUFFile, hf_arch: str) -> dict[str, Any]:
    if "token_embd.weight" not in g.tensors:
        raise GGUFFileError(f"GGUF file {str(g.path)!r}: tensor 'token_embd.weight' is missing")
    vocab, hidden = g.shape("token_embd.weight")
    heads = _int(g, "attention.head_count")
    d: dict[str, Any] = {
        "architectures": [hf_arch], "vocab_size": vocab, "hidden_size": _int(g, "embedding_length"),
        "intermediate_size": _int(g, "feed_forward_length"), "num_hidden_layers": _int(g, "block_count"),
        "num_attention_heads": heads, "num_key_value_heads": _int(g, "attention.head_count_kv", heads),
        "max_position_embeddings": _int(g, "context_length"),
        "rms_norm_eps": float(g.get("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
    }
    if d["hidden_size"] != hidden:
        raise GGUFFileError(f"GGUF file {str(g.path)!r}: token_embd.weight is {hidden} wide, "
                            f"{g.arch}.embedding_length says {d['hidden_size']}")
    kind = g.get("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise GGUFFileError(f"GGUF file {str(g.path)!r}: {g.arch}.rope.scaling.type={kind!r} is not supported; "
                            "allowed: none, linear")
    if kind == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(g.get("rope.scaling.factor"))}
    return d


def _llama_config(g: GGUFFile) -> dict[str, Any]:
    d = _common(g, "LlamaForCausalLM")
    key_length, rope_dim = g.get("attention.key_length", None), g.get("rope.dimension_count", None)
    d["head_dim"] = int(key_length) if key_length is not None else int(rope_dim) if rope_dim is not None else None
    d["rope_theta"] = float(g.get("rope.freq_base", 10000.0))
    return d


def _qwen_config(hf_arch: str) -> Callable[[GGUFFile], dict[str, Any]]:
    """Qwen2 / Qwen3: Llama's keys, no q/k permutation (llama.cpp's Qwen converters keep the rotate-half rows)."""
    def config(g: GGUFFile) -> dict[str, Any]:
        d = _common(g, hf_arch)
        d["head_dim"] = _int(g, "attention.key_length", d["hidden_size"] // d["num_attention_heads"])
        d["rope_theta"] = float(g.get("rope.freq_base", 10000.0))
        return d
    return config


def _gemma3_config(g: GGUFFile) -> dict[str, Any]:
    d = _common(g, "Gemma3ForCausalLM")
    d["head_dim"] = _int(g, "attention.key_length", 256)
    d["sliding_window"] = _int(g, "attention.sliding_window")
    # llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3): global layers use rope.freq_base and the file's scaling,
    # sliding layers theta 1e4 unscaled; 1 global layer in 6; query scale 1/sqrt(head_dim), except the 62-layer
    # 27B: 1/sqrt(hidden / heads) (= its query_pre_attn_scalar 168)
    d["rope_theta"] = float(g.get("rope.freq_base", 1_000_000.0))
    d["rope_local_base_freq"] = 10_000.0
    pattern = g.get("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # newer files: one flag per layer, true = sliding
        d["layer_types"] = ["sliding_attention" if x else "full_attention" for x in pattern]
    d["query_pre_attn_scalar"] = (d["hidden_size"] // d["num_attention_heads"] if d["num_hidden_layers"] == 62
                                  else d["head_dim"])
    for key, hf in (("final_logit_softcapping", "final_logit_softcapping"),
                    ("attn_logit_softcapping", "attn_logit_softcapping")):
        if g.get(key, None) is not None:
            d[hf] = float(g.get(key))
    return d


def _permute_qk(name: str, w: torch.Tensor, d: dict[str, Any]) -> torch.Tensor:
    """Undo llama.cpp's permute of Llama q/k rows: per head, rows ``[pair, 2]`` -> ``[2, pair]`` (rotate-half)."""
    if ".attn_q." in name:
        heads = d["num_attention_heads"]
    elif ".attn_k." in name:
        heads = d["num_key_value_heads"]
    else:
        return w
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unshift_norm(name: str, w: torch.Tensor, d: dict[str, Any]) -> torch.Tensor:
    return w - 1.0 if name.endswith("norm.weight") else w


def _as_stored(name: str, w: torch.Tensor, d: dict[str, Any]) -> torch.Tensor:
    return w


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF architecture: its metadata -> config.json dict, its per-layer tensor names, its layout fix."""

    config: Callable[[GGUFFile], dict[str, Any]]
    layer_names: dict[str, str]
    fix: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor]


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch(_llama_config, {**LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}, _permute_qk),
    "qwen2": GGUFArch(_qwen_config("Qwen2ForCausalLM"), {**LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
                      _as_stored),
    "qwen3": GGUFArch(_qwen_config("Qwen3ForCausalLM"), {**LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
                      _as_stored),
    "gemma3": GGUFArch(_gemma3_config, {**LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                                        "post_attention_norm": "post_attention_layernorm",
                                        "post_ffw_norm": "post_feedforward_layernorm"}, _unshift_norm),
}


def _arch(g: GGUFFile) -> GGUFArch:
    if g.arch not in ARCHS:
        raise GGUFFileError(f"GGUF file {str(g.path)!r}: architecture {g.arch!r} is not supported; "
                            f"supported: {', '.join(ARCHS)}")
    return ARCHS[g.arch]


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """The transformers ``config.json`` dict the file's metadata describes."""
    return _arch(g).config(g)


def hf_name(g: GGUFFile, name: str) -> str:
    """The transformers name of GGUF tensor ``name``; an unknown one is a named error."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    names = _arch(g).layer_names
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names and parts[3] in (
            "weight", "bias"):
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    raise GGUFFileError(f"GGUF file {str(g.path)!r}: tensor {name!r} of architecture {g.arch!r} is not supported "
                        f"(known: {', '.join(TOP_NAMES)}, blk.N.{{{', '.join(names)}}}.weight/bias)")


class GGUFTensors(Mapping[str, "torch.Tensor"]):
    """HF name -> tensor over a GGUF file: dequantised to fp32 on access, layout fixed, cast to ``dtype``."""

    def __init__(self, g: GGUFFile, dtype: torch.dtype | None = None) -> None:
        self.g, self.dtype = g, dtype
        self.cfg = hf_config(g)
        self.arch = _arch(g)
        bad = {n: t.kind.name for n, t in g.tensors.items() if t.kind.name not in SUPPORTED_TYPES}
        if bad:
            first = next(iter(bad))
            raise GGUFFileError(f"GGUF file {str(g.path)!r}: tensor {first!r} has type {bad[first]} "
                                f"({len(bad)} tensor(s) of types {sorted(set(bad.values()))}); kvlab dequantises "
                                f"{', '.join(SUPPORTED_TYPES)}")
        self.names = {hf_name(g, n): n for n in g.tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        import numpy as np
        import torch  # only when tensors are read: the header side (config, weight bytes) runs without torch
        from gguf import dequantize

        src = self.names[name]
        kind = self.g.tensors[src].kind
        try:
            arr = np.array(dequantize(self.g.data(src), kind), dtype=np.float32)  # a copy: the file is mapped read-only
        except (ValueError, IndexError, OSError) as e:
            raise GGUFFileError(f"GGUF file {str(self.g.path)!r}: cannot dequantise tensor {src!r} ({kind.name}): "
                                f"{e}") from e
        if not np.isfinite(arr).all():
            raise GGUFFileError(f"GGUF file {str(self.g.path)!r}: tensor {src!r} holds non-finite values (corrupt?)")
        w = self.arch.fix(src, torch.from_numpy(arr.reshape(self.g.shape(src))), self.cfg)
        return w if self.dtype is None else w.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def weight_bytes(path: str | Path) -> dict[str, Any]:
    """The file's own (quantized) weight bytes, its parameter count and tensor types, from the header."""
    g = read_gguf(path)
    params = sum(math.prod(t.shape) for t in g.tensors.values())
    return {"file": str(g.path), "file_bytes": g.path.stat().st_size, "weight_bytes": g.weight_bytes,
            "params": params, "bits_per_weight": 8 * g.weight_bytes / params if params else 0.0,
            "tensor_types": g.type_counts()}
