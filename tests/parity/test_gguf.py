"""GGUF checkpoints on tiny files written in the test (tests/gguf_tiny.py, as llama.cpp writes them): kvlab's logits
equal the original transformers model's (llama.cpp's q/k permutation and Gemma's ``1 + w`` norms undone exactly) and
transformers' own GGUF loading, for every tensor type gguf can write; ``kvlab calc`` reads the header only; bad files
get named errors. The real files (SmolLM2, Gemma 3 270M) are in tests/parity/test_gguf_real.py."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_tiny import Q, from_hf, write

import kvlab
from kvlab.cli import main
from kvlab.gguf_checkpoint import GGUFFileError, read_gguf

LLAMA = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "rope_theta": 5000.0, "tie_word_embeddings": True}
GEMMA3 = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 7,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
          "sliding_window": 4, "max_position_embeddings": 128,
          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
QUANT = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def hf_model(kind: str, seed: int = 0, **kw: object) -> transformers.PreTrainedModel:
    from hf_tiny import random_hf

    if kind == "llama":
        return random_hf(transformers.LlamaConfig(**{**LLAMA, **kw}), "LlamaForCausalLM", seed)
    if kind == "qwen2":
        return random_hf(transformers.Qwen2Config(**{**LLAMA, **kw}), "Qwen2ForCausalLM", seed)
    if kind == "qwen3":  # head_dim 24 != hidden / heads, as Qwen3 models have
        return random_hf(transformers.Qwen3Config(**{**LLAMA, "head_dim": 24, **kw}), "Qwen3ForCausalLM", seed)
    return random_hf(transformers.Gemma3TextConfig(**{**GEMMA3, **kw}), "Gemma3ForCausalLM", seed)


def ids(n: int = 21, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
@pytest.mark.parametrize(("kind", "tied"), [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False),
                                           ("gemma3", True)])
def test_f32_gguf_equals_the_original_model(kind: str, tied: bool, tmp_path: Path) -> None:
    hf = hf_model(kind, tie_word_embeddings=tied)
    path = from_hf(hf, tmp_path / f"{kind}.gguf", tied=tied)
    model = kvlab.load(path)
    assert model.config.tie_embeddings == tied
    x = ids()
    diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logits diff| {diff:.2e}"
    # transformers' own GGUF reading as a second oracle, where it reads these tiny shapes: it gives a gemma3 file
    # query_pre_attn_scalar 256 (its default; 16 here) and a qwen3 file its default head_dim 128 (attention.key_length
    # is not read; 24 here)
    if kind in ("llama", "qwen2"):
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4
    out = kvlab.generate(model, x, max_new_tokens=8, temperature=0.0)
    want = hf.generate(x, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(out, want)


@torch.no_grad()
def test_every_writable_tensor_type_matches_transformers_gguf_loading(tmp_path: Path) -> None:
    """The 2-D tensors cycle through F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; transformers dequantises the same
    file with the same gguf package: logits equal."""
    hf = hf_model("llama", seed=1, tie_word_embeddings=False)
    names = iter(range(10**6))
    path = from_hf(hf, tmp_path / "q.gguf", types=lambda n, a: QUANT[next(names) % len(QUANT)], tied=False)
    kinds = {t.kind.name for t in read_gguf(path).tensors.values()}
    assert {q.name for q in QUANT} <= kinds
    model = kvlab.load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    x = ids()
    diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logits diff| {diff:.2e}"
    assert (model(x) - hf(x).logits).abs().max().item() > 1e-3  # quantisation did change the weights


def test_calc_reads_the_header_only_and_reports_the_files_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = from_hf(hf_model("llama"), tmp_path / "t.gguf", types=lambda n, a: Q.Q8_0)
    stored = sum(t.n_bytes for t in read_gguf(path).tensors.values())

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("calc dequantised a tensor")

    monkeypatch.setattr(gguf, "dequantize", refuse)
    assert main(["calc", str(path), "--context", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gguf"]["weight_bytes"] == stored and out["gguf"]["tensor_types"] == {"Q8_0": 2 * 7 + 1, "F32": 2 * 2 + 1}
    assert out["params_total"] == out["gguf"]["params"] == sum(p.numel() for p in hf_model("llama").parameters())
    assert main(["calc", str(path), "--context", "64"]) == 0
    assert "weights in the GGUF file" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="dequantised"):
        kvlab.load(path)


def _gguf(tmp_path: Path, **over: object) -> Path:
    return from_hf(hf_model("llama"), tmp_path / "m.gguf", **over)


def test_truncated_file_names_the_file_and_the_tensor(tmp_path: Path) -> None:
    path = _gguf(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 3000])
    with pytest.raises(GGUFFileError, match=r"cut\.gguf' is truncated or corrupt: tensor 'blk\.1\.\w+\.weight'"):
        kvlab.load(cut)
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFFileError, match=r"head\.gguf': truncated or corrupt"):
        kvlab.load(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    assert main(["calc", str(tmp_path / "junk.gguf")]) == 2


def test_unsupported_architecture_and_tensor_type_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "mamba.gguf", "mamba", {"block_count": 1}, {"token_embd.weight": np.zeros((8, 32))})
    with pytest.raises(GGUFFileError, match=r"architecture 'mamba' is not supported; supported: llama, qwen2, qwen3, "
                                            r"gemma3"):
        kvlab.load(path)
    # a tensor stored as IQ4_NL (gguf cannot write it: raw bytes of the right size)
    g = read_gguf(_gguf(tmp_path))
    meta = {k.removeprefix("llama."): v for k, v in g.meta.items() if k.startswith("llama.")}
    tensors = {n: np.asarray(gguf.dequantize(g.data(n), g.tensors[n].kind)) for n in g.tensors}
    bad = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    for k, v in meta.items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(f"llama.{k}", v)
    for n, a in tensors.items():
        if n == "blk.0.ffn_up.weight":
            rows = np.zeros((a.shape[0], a.shape[1] // 32 * 18), np.uint8)  # IQ4_NL: 32 weights in 18 bytes
            w.add_tensor(n, rows, raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(n, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFileError, match=r"tensor 'blk\.0\.ffn_up\.weight' has type IQ4_NL .* kvlab dequantises"):
        kvlab.load(bad)
    assert main(["calc", str(bad), "--context", "64"]) == 0  # the header alone is fine
    assert "IQ4_NL x1" in capsys.readouterr().out


def test_unknown_tensor_and_missing_key_are_named(tmp_path: Path) -> None:
    g = read_gguf(_gguf(tmp_path))
    meta = {k.removeprefix("llama."): v for k, v in g.meta.items() if k.startswith("llama.")}
    tensors = {n: np.asarray(gguf.dequantize(g.data(n), g.tensors[n].kind)) for n in g.tensors}
    extra = write(tmp_path / "extra.gguf", "llama", meta, {**tensors, "blk.0.attn_gate.weight": np.zeros((4, 64))})
    with pytest.raises(GGUFFileError, match=r"tensor 'blk\.0\.attn_gate\.weight' of architecture 'llama' is not "
                                            r"supported"):
        kvlab.load(extra)
    no_heads = write(tmp_path / "noheads.gguf", "llama", {k: v for k, v in meta.items()
                                                          if k != "attention.head_count"}, tensors)
    with pytest.raises(GGUFFileError, match=r"metadata 'llama\.attention\.head_count' is missing"):
        kvlab.costs(str(no_heads), context=16)
    with pytest.raises(GGUFFileError, match=r"nothere\.gguf' does not exist"):
        kvlab.load(tmp_path / "nothere.gguf")


def test_generate_cli_runs_a_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = hf_model("llama")
    path = from_hf(hf, tmp_path / "g.gguf")
    assert main(["generate", str(path), "--ids", "1,2,3", "--max-new-tokens", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["output_ids"]
    want = hf.generate(torch.tensor([[1, 2, 3]]), do_sample=False, max_new_tokens=5, min_new_tokens=5)[0, 3:]
    assert got == want.tolist()


def test_training_starts_from_a_gguf(tmp_path: Path) -> None:
    """``[model] init = "<file>.gguf"``: kvlab train starts from the GGUF's dequantised weights (its first loss is the
    loaded model's loss on the first batch) under the GGUF's own config, and the run loads like any model."""
    import torch.nn.functional as F

    from kvlab.train import parse_config, train

    path = from_hf(hf_model("llama"), tmp_path / "tiny.gguf")
    cfg = parse_config({"model": {"init": str(path)}, "task": {"kind": "copy", "seq_len": 16, "vocab": 16, "span": 6},
                        "train": {"steps": 2, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "threads": 1,
                                  "eval_batches": 1}})
    r = train(cfg, out=tmp_path / "run", progress=False)
    loaded = kvlab.load(path, dtype=torch.float32)
    batch, target, _ = cfg.task.batch(cfg.train.seed, "train", 0, cfg.train.batch_size)
    with torch.no_grad():
        ref = F.cross_entropy(loaded(batch).reshape(-1, loaded.config.vocab_size), target.reshape(-1)).item()
    assert r.summary["losses"][0] == pytest.approx(ref, rel=1e-5)
    assert r.summary["losses"][1] != pytest.approx(ref, rel=1e-4)  # the weights moved
    assert r.model.config.layers == loaded.config.layers
    back = kvlab.load(tmp_path / "run")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in r.model.state_dict().items())
