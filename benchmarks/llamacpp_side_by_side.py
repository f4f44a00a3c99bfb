"""kvlab beside llama.cpp on the same GGUF file and the same token ids (not part of CI; needs llama-cpp-python).

    pip install "kvlab[llamacpp]"     # or: CMAKE_ARGS="-DGGML_CUDA=OFF" pip install llama-cpp-python==0.3.36
    PYTHONPATH=. .venv/bin/python benchmarks/llamacpp_side_by_side.py smollm2-135m --tokens 2048 --threads 1 \\
        --json out/llamacpp-smollm2.json

Quality: the first ``--tokens`` tokens of kvlab eval's default corpus, tokenized by kvlab's tokenizer of the model
(BOS prefix when the model's tokenizer adds one), one window. kvlab runs them through its cache (fp32 weights
dequantised from the file; fp32 cache, then its quantized formats) and llama.cpp evaluates the SAME ids
(``Llama.eval``, ``logits_all=True``) with each K/V cache type. Perplexity, KL divergence and top-1 agreement come
from kvlab.eval (``kl_from_logits``, ``summarize``): llama.cpp's cache types against llama.cpp f16 (its own
reference) and against kvlab fp32; kvlab's formats against kvlab fp32.

Speed: a ``--prompt``-token prompt from the same text, then ``--rounds`` rounds of ``--decode`` single-token steps
(teacher-forced with the text's next tokens: a decode step costs the same whatever token it reads), the engines
taking turns within every round (the order rotates) with the same thread count; tok/s is the inverse of the median
step time. Achieved GB/s = (weight bytes + K/V bytes read per step) / median step: llama.cpp's weight bytes are
its file's tensor bytes (the embedding matrix counted once as the output head when tied, else one row), kvlab's
from ``kvlab.costs``; K/V bytes from ``kvlab.costs`` of the same layer description at the middle context, with
llama.cpp's cache types priced per value (f16: 2 B; q8_0: 34 B per 32; q4_0: 18 B per 32). ``--speed-kv-quant
int8-g32,int4-g32`` times kvlab's quantized caches too (fp32 model; their K/V bytes from ``kvlab.costs`` with
``kv_quant``), beside ``--speed-kv f16,q8_0,q4_0``: the same cache formats in both engines.
The last line of standard output is one JSON object (also written to ``--json``); the tables go to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# llama.cpp's K/V cache types: ggml type id and bytes per value (blocks of 32 values with an fp16 scale)
LLAMA_KV = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32), "q4_1": (3, 20 / 32), "q5_0": (6, 22 / 32),
            "q5_1": (7, 24 / 32), "f32": (0, 4.0)}


def need_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llamacpp_side_by_side: llama-cpp-python is not installed; it is an optional benchmark peer, never "
                 "a kvlab dependency. Install it with:  pip install \"kvlab[llamacpp]\"  (it compiles llama.cpp "
                 "from source, several minutes; CPU only: CMAKE_ARGS=\"-DGGML_CUDA=OFF -DLLAMA_CURL=OFF\")")
    return llama_cpp


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table (pasted into docs/ as it is)."""
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(n) for x, n in zip(r, w, strict=True)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(fmt, rows)])


# -- llama.cpp ---------------------------------------------------------------------------------------------------
EXTRA_BUFTS = False  # --llama-extra-bufts


def llama(path: Path, n_ctx: int, kv: str, threads: int, logits_all: bool, flash_attn: bool,
          rotate: bool = True) -> Any:
    """A llama.cpp context on ``path``. llama.cpp rotates quantized K and V by a Hadamard matrix (K over the largest
    power-of-two block of the head dims, V in blocks of 64; llama-kv-cache.cpp ``attn_rot_k/v``) unless
    ``LLAMA_ATTN_ROT_DISABLE=1`` (``rotate=False``: set while the context is made). Without EXTRA_BUFTS, loaded with ``use_extra_bufts=false`` (llama-cli's
    ``--no-repack``): no AMX and no repacked weight layouts. This machine's AMX kernels (a ``-DGGML_NATIVE=ON``
    build on a CPU with amx_int8) crash in ``ggml_backend_amx_mul_mat``; Q4_1 (SmolLM2's file) is never repacked."""
    import llama_cpp.llama as module
    from llama_cpp import Llama

    default = module.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = EXTRA_BUFTS
        return p

    t = LLAMA_KV[kv][0]
    module.llama_cpp.llama_model_default_params = params  # Llama() has no argument for it
    if not rotate:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    try:
        return Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=logits_all, type_k=t, type_v=t,
                     flash_attn=flash_attn, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0,
                     swa_full=False)  # sliding-window layers hold their window (+ one batch), not the context
    finally:
        module.llama_cpp.llama_model_default_params = default
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)


def gguf_weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes one decode step reads of the file's tensors, all tensor bytes): the token embedding counts once
    when it is also the output head (no ``output.weight``), else one row of it."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    emb = tensors["token_embd.weight"]
    if "output.weight" in tensors:
        rows = int(emb.shape[-1])  # gguf shapes are fastest-first: [hidden, vocab]
        return total - int(emb.n_bytes) + int(emb.n_bytes) // rows, total
    return total, total


# -- quality -----------------------------------------------------------------------------------------------------
def ppl_row(logits, targets, window: int) -> dict[str, float]:
    import torch

    from kvlab.eval.perplexity import summarize

    nll = torch.cat([torch.nn.functional.cross_entropy(logits[i:i + 256].float(), targets[i:i + 256],
                                                       reduction="none") for i in range(0, len(targets), 256)])
    p = summarize(nll, 1, window, window - 1)
    return {"ppl": p.ppl, "ppl_se": p.ppl_se, "mean_nll": p.mean_nll}


def kl_row(ref, var, targets) -> dict[str, float]:
    from kvlab.eval import kl_from_logits

    r = kl_from_logits((ref[i:i + 256], var[i:i + 256], targets[i:i + 256]) for i in range(0, len(targets), 256))
    return {"kl_mean": r.mean_kl, "kl_se": r.kl_se, "kl_median": r.median_kl, "kl_p99": r.p99_kl, "kl_max": r.max_kl,
            "top1": r.top1, "top1_se": r.top1_se}


def quality(args, name: str, path: Path, seq: list[int], first: int, model) -> list[dict[str, Any]]:
    import torch

    from kvlab.eval import with_kv_quant
    from kvlab.eval.perplexity import scored_logits

    window, prefix_len = len(seq), args._prefix_len
    targets = torch.tensor(seq[first + 1:])
    text = seq[prefix_len:]
    rows: list[dict[str, Any]] = []

    def run_kvlab(m) -> Any:
        t0 = time.perf_counter()
        out = [lg for lg, _ in scored_logits(m, text, window, None, seq[:prefix_len], args.chunk)]
        lg = torch.cat(out)
        assert lg.shape[0] == len(targets), (lg.shape, len(targets))
        return lg, time.perf_counter() - t0

    ref_kv, s = run_kvlab(model)
    rows.append({"engine": "kvlab", "cache": "fp32", "weights": "fp32 (dequantised)", **ppl_row(ref_kv, targets,
                 window), "vs": {"kvlab fp32": kl_row(ref_kv, ref_kv, targets)}, "seconds": s})
    log(f"kvlab fp32: ppl {rows[-1]['ppl']:.4f} ({s:.0f} s)")
    for fmt in args.kv_quant:
        lg, s = run_kvlab(with_kv_quant(model, fmt))
        rows.append({"engine": "kvlab", "cache": fmt, "weights": "fp32 (dequantised)", **ppl_row(lg, targets, window),
                     "vs": {"kvlab fp32": kl_row(ref_kv, lg, targets)}, "seconds": s})
        log(f"kvlab {fmt}: ppl {rows[-1]['ppl']:.4f} KL {rows[-1]['vs']['kvlab fp32']['kl_mean']:.5f} ({s:.0f} s)")
        del lg
        gc.collect()
    ref_ll = None
    for kv, fa, rot in args._llama_quality:
        t0 = time.perf_counter()
        llm = llama(path, window, kv, args.threads, logits_all=True, flash_attn=fa, rotate=rot)
        llm.eval(seq)
        lg = torch.from_numpy(llm.scores[first:window - 1].copy())
        s = time.perf_counter() - t0
        del llm
        gc.collect()
        label = kv_label(kv, fa, rot)
        row = {"engine": "llama.cpp", "cache": label, "weights": "the file's (quantized kernels)",
               **ppl_row(lg, targets, window), "vs": {}, "seconds": s}
        if ref_ll is None:  # the first llama.cpp run (f16, flash attention) is llama.cpp's own reference
            ref_ll, ref_label = lg, f"llama.cpp {label}"
        row["vs"][ref_label] = kl_row(ref_ll, lg, targets)
        row["vs"]["kvlab fp32"] = kl_row(ref_kv, lg, targets)
        rows.append(row)
        log(f"llama.cpp {label}: ppl {row['ppl']:.4f} KL vs {ref_label} {row['vs'][ref_label]['kl_mean']:.5f}, "
            f"vs kvlab fp32 {row['vs']['kvlab fp32']['kl_mean']:.5f} ({s:.0f} s)")
        if lg is not ref_ll:
            del lg
        gc.collect()
    return rows


# -- speed -------------------------------------------------------------------------------------------------------
class KvlabEngine:
    def __init__(self, model, label: str, dtype: str, max_length: int, kv_quant: str | None = None) -> None:
        self.model, self.label, self.dtype, self.kv_quant = model, label, dtype, kv_quant
        self.cache = model.new_cache(1, max_length=max_length, kv_quant=kv_quant)

    def prefill(self, ids: list[int]) -> None:
        import torch

        x = torch.tensor([ids])
        self.model.check_ids(x)
        with torch.inference_mode():
            for s in range(0, x.shape[1], 512):
                self.model(x[:, s:s + 512], cache=self.cache, last_only=True, check=False)

    def step(self, tok: int) -> None:
        import torch

        with torch.inference_mode():
            self.model(torch.tensor([[tok]]), cache=self.cache, last_only=True, check=False)


class LlamaEngine:
    def __init__(self, path: Path, kv: str, fa: bool, rot: bool, threads: int, n_ctx: int) -> None:
        self.kv, self.label = kv, f"llama.cpp {kv_label(kv, fa, rot)} KV"
        self.llm = llama(path, n_ctx, kv, threads, logits_all=False, flash_attn=fa, rotate=rot)

    def prefill(self, ids: list[int]) -> None:
        self.llm.eval(ids)

    def step(self, tok: int) -> None:
        self.llm.eval([tok])


def speed(args, path: Path, seq_all: list[int], model, w_llama: int) -> list[dict[str, Any]]:
    import torch

    import kvlab
    from kvlab.costs import costs

    need = args.prompt + 2 + args.rounds * args.decode
    if len(seq_all) < need:
        raise SystemExit(f"the corpus has {len(seq_all)} tokens, the speed run needs {need}")
    prompt, rest = seq_all[:args.prompt], seq_all[args.prompt:need]
    engines: list[Any] = []
    for kv, fa, rot in args._llama_speed:
        engines.append(LlamaEngine(path, kv, fa, rot, args.threads, need + 8))
    for d in args.speed_dtypes:
        m = model if d == "fp32" else kvlab.load(args.model, dtype={"bf16": torch.bfloat16}[d]).eval()
        engines.append(KvlabEngine(m, f"kvlab {d}", {"fp32": "float32", "bf16": "bfloat16"}[d], need + 8))
    for q in args.speed_kv_quant:  # kvlab's quantized caches (fp32 model), timed beside llama.cpp's q8_0 / q4_0
        engines.append(KvlabEngine(model, f"kvlab fp32, {q} KV", "float32", need + 8, kv_quant=q))
    rows = []
    for e in engines:
        t0 = time.perf_counter()
        e.prefill(prompt)
        e.prefill_s = time.perf_counter() - t0
        for tok in rest[:2]:  # warm-up steps (excluded), the same two for every engine
            e.step(tok)
        e.steps = []
        log(f"{e.label}: prefill {len(prompt)} tokens in {e.prefill_s:.2f} s")
    for r in range(args.rounds):
        toks = rest[2 + r * args.decode: 2 + (r + 1) * args.decode]
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            for tok in toks:
                t1 = time.perf_counter()
                e.step(tok)
                e.steps.append(time.perf_counter() - t1)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{e.label} {1 / statistics.median(e.steps):.1f} tok/s"
                                                           for e in engines))
    mid = args.prompt + 2 + args.rounds * args.decode // 2  # the middle context of the timed steps
    for e in engines:
        med = statistics.median(e.steps)
        if isinstance(e, LlamaEngine):
            c = costs(model.config, context=mid, dtype="float16")
            weights = w_llama
            kv = round(c.kv_read_bytes_per_step * LLAMA_KV[e.kv][1] / 2)
        else:
            c = costs(e.model.config, context=mid, dtype=e.dtype, kv_quant=e.kv_quant)
            weights, kv = c.weight_read_bytes_per_step, c.kv_read_bytes_per_step
        rows.append({"engine": e.label, "prefill_tok_s": len(prompt) / e.prefill_s, "decode_tok_s": 1 / med,
                     "step_ms_median": med * 1e3, "step_ms_p10": 1e3 * statistics.quantiles(e.steps, n=10)[0],
                     "step_ms_p90": 1e3 * statistics.quantiles(e.steps, n=10)[-1], "steps": len(e.steps),
                     "weight_bytes_per_step": weights, "kv_bytes_per_step": kv,
                     "achieved_GBps": (weights + kv) / med / 1e9})
    for e in engines:
        if isinstance(e, LlamaEngine):
            del e.llm
    return rows


# -- main --------------------------------------------------------------------------------------------------------
def parse_kv(text: str) -> list[tuple[str, bool, bool]]:
    """``f16,q4_0-norot,f16-nofa`` -> [(type, flash_attn, rotate)]: flash attention on unless ``-nofa``,
    llama.cpp's Hadamard rotation of quantized K/V on unless ``-norot``."""
    out = []
    for x in filter(None, text.split(",")):
        kv, *opts = x.split("-")
        if kv not in LLAMA_KV or not set(opts) <= {"nofa", "norot"}:
            raise SystemExit(f"llama.cpp cache type {x!r}: one of {', '.join(LLAMA_KV)}, with -nofa (no flash "
                             "attention; a quantized V needs it) and/or -norot (no Hadamard rotation)")
        out.append((kv, "nofa" not in opts, "norot" not in opts))
    return out


def kv_label(kv: str, fa: bool, rot: bool) -> str:
    return kv + ("" if fa else " (no flash-attn)") + ("" if rot or not kv.startswith("q") else " (no rotation)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a named model (smollm2-135m, gemma-3-270m) or a .gguf file")
    ap.add_argument("--tokens", type=int, default=2048, help="text tokens scored for quality (one window)")
    ap.add_argument("--threads", type=int, default=1, help="threads for both engines (torch and llama.cpp)")
    ap.add_argument("--kv-quant", default="int8-g32,int4-g32,int4-g32-r64-kc-asym", help="kvlab cache formats (kvlab/costs/quant.py)")
    ap.add_argument("--llama-kv", default="f16,q8_0,q4_0,f16-nofa",
                    help="llama.cpp cache types for quality; the first is llama.cpp's reference")
    ap.add_argument("--speed-kv", default="f16,q8_0,f16-nofa", help="llama.cpp cache types timed")
    ap.add_argument("--speed-dtypes", default="fp32,bf16", help="kvlab dtypes timed (fp32, bf16)")
    ap.add_argument("--speed-kv-quant", default="", help="kvlab quantized caches timed too (fp32 model), e.g. "
                    "int8-g32,int4-g32 beside --speed-kv f16,q8_0,q4_0 (default: none)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens before the timed decode")
    ap.add_argument("--decode", type=int, default=24, help="decode steps per engine per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=256, help="kvlab prefill chunk in the quality runs")
    ap.add_argument("--llama-extra-bufts", action="store_true",
                    help="let llama.cpp use its AMX / repacked weight buffers (crashes on this machine's AMX)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", help="also write the JSON object here")
    args = ap.parse_args()
    llama_cpp = need_llama_cpp()
    global EXTRA_BUFTS
    EXTRA_BUFTS = args.llama_extra_bufts
    args.kv_quant = [x for x in args.kv_quant.split(",") if x]
    args._llama_quality, args._llama_speed = parse_kv(args.llama_kv), parse_kv(args.speed_kv)
    args.speed_dtypes = [x for x in args.speed_dtypes.split(",") if x]
    args.speed_kv_quant = [x for x in args.speed_kv_quant.split(",") if x]
    from kvlab.costs.quant import QuantError, resolve_kv_quant

    for q in args.kv_quant + args.speed_kv_quant:
        try:
            resolve_kv_quant(q)
        except QuantError as e:
            raise SystemExit(f"kvlab cache format {q!r}: {e}") from None
    if bad := [d for d in args.speed_dtypes if d not in ("fp32", "bf16")]:
        raise SystemExit(f"--speed-dtypes {bad[0]!r}: fp32 or bf16")

    import torch

    import kvlab
    from kvlab.eval import default_corpus
    from kvlab.models import resolve_file
    from kvlab.threads import apply
    from kvlab.tokenizer import load_tokenizer

    plan = apply(args.threads)
    torch.manual_seed(0)
    path = Path(str(resolve_file(args.model)))
    tok = load_tokenizer(args.model)
    corpus = default_corpus()
    text_ids = tok.encode(corpus.text, special=False)
    prefix = tok.encode("", special=True)
    args._prefix_len = len(prefix)
    seq = prefix + text_ids[:args.tokens]
    first = len(prefix) - 1 if prefix else 0  # position `first` predicts the first scored token
    # llama.cpp's own tokenizer on the same text: the ids are kvlab's either way, this says whether they agree
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ll_ids = vocab.tokenize(corpus.text.encode("utf-8"), add_bos=False, special=False)
    n_cmp = min(len(ll_ids), len(text_ids))
    diff = next((i for i in range(n_cmp) if ll_ids[i] != text_ids[i]), None)
    del vocab
    w_read, w_file = gguf_weight_bytes(path)
    model = kvlab.load(args.model, dtype=torch.float32).eval()
    ground = {
        "model": args.model, "file": path.name, "file_bytes": path.stat().st_size, "tensor_bytes": w_file,
        "text": corpus.describe(len(text_ids)), "text_sha256": corpus.sha256, "tokens_scored": len(seq) - 1 - first,
        "window": len(seq), "bos_prefix": prefix, "tokenizer": "kvlab's (ids fed to both engines)",
        "llama_cpp_tokenizer_agrees": diff is None and len(ll_ids) == len(text_ids),
        "llama_cpp_tokenizer_first_difference": diff, "llama_cpp_tokens": len(ll_ids), "kvlab_tokens": len(text_ids),
        "threads": plan.describe(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_extra_bufts": EXTRA_BUFTS, "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(), "torch": torch.__version__, "kvlab_weights": "float32",
        "speed": {"prompt": args.prompt, "decode_per_round": args.decode, "rounds": args.rounds,
                  "warmup_steps": 2, "kvlab_prefill_chunk": 512, "llama_n_batch": 512},
    }
    log(f"{args.model}: {path} ({path.stat().st_size / 1e6:.1f} MB), {ground['text']}")
    log(f"llama.cpp's tokenizer agrees with kvlab's on the corpus: {ground['llama_cpp_tokenizer_agrees']} "
        f"(first difference at token {diff}); {ground['threads']}")
    out: dict[str, Any] = {"ground": ground}
    if not args.skip_quality:
        out["quality"] = quality(args, args.model, path, seq, first, model)
        gc.collect()
    if not args.skip_speed:
        from kvlab.bench import copy_bandwidth

        out["ground"]["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9  # kvlab bench's roof: torch copy of 256 MiB
        out["speed"] = speed(args, path, prefix + text_ids, model, w_read)
    out["ground"]["load_avg_end"] = os.getloadavg()
    report(out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


def report(out: dict[str, Any]) -> None:
    g = out["ground"]
    log(f"\n{g['model']} ({g['file']}), {g['text']}; {g['threads']}")
    if "quality" in out:
        log(f"quality: {g['tokens_scored']} tokens scored, one window of {g['window']} positions")
        refs = sorted({k for r in out["quality"] for k in r["vs"]}, key=lambda k: k != "kvlab fp32")
        head = ["engine", "K/V cache", "ppl"] + [h for k in refs for h in (f"KL vs {k}", f"top-1 vs {k}")]
        rows = []
        for r in out["quality"]:
            cells = [r["engine"], r["cache"], f"{r['ppl']:.4f} ± {r['ppl_se']:.4f}"]
            for k in refs:
                v = r["vs"].get(k)
                cells += [f"{v['kl_mean']:.5f} ± {v['kl_se']:.5f}", f"{100 * v['top1']:.2f}%"] if v else ["", ""]
            rows.append(cells)
        log(table(head, rows))
    if "speed" in out:
        sp = g["speed"]
        log(f"speed: {sp['prompt']}-token prompt, {sp['rounds']} rounds x {sp['decode_per_round']} steps per engine; "
            f"copy bandwidth (torch, 256 MiB, {g['threads']}): {g['copy_bandwidth_GBps']:.2f} GB/s")
        rows = [[r["engine"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                 f"{r['step_ms_median']:.2f} ({r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f})",
                 f"{r['weight_bytes_per_step'] / 1e6:.1f}", f"{r['kv_bytes_per_step'] / 1e6:.2f}",
                 f"{r['achieved_GBps']:.2f}"] for r in out["speed"]]
        log(table(["engine", "prefill tok/s", "decode tok/s", "step ms median (p10-p90)", "weights MB/step",
                   "K/V MB/step", "achieved GB/s"], rows))


if __name__ == "__main__":
    main()
