"""kvlab generate --chat, kvlab chat (piped stdin) and kvlab eval on a tiny checkpoint with a real tokenizer."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import save_text_checkpoint

import kvlab
from kvlab.cli import main
from kvlab.eval import kl_divergence, perplexity, with_kv_quant, with_window
from kvlab.tokenizer import load_tokenizer

QUESTION = "What is the capital of France?"
TEXT = "\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(40))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_text_checkpoint(tmp_path_factory.mktemp("text-ckpt"))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_chat_applies_the_template_and_stops_at_the_models_eos(capsys, ckpt, tmp_path):
    tok = load_tokenizer(ckpt)
    ids = tok.encode_chat([{"role": "user", "content": QUESTION}])
    assert tok.decode(ids) == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    rc, out, err = run(capsys, "generate", ckpt, "--chat", QUESTION, "--max-new-tokens", "6", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["prompt_ids"] == ids and len(got["output_ids"]) == 6 and not got["stopped"]
    # the same checkpoint whose generation_config names the first greedy token as EOS stops right there
    first = got["output_ids"][0]
    d = save_text_checkpoint(tmp_path / "eos", eos_token_id=first)
    rc, out, err = run(capsys, "generate", d, "--chat", QUESTION, "--max-new-tokens", "6", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["output_ids"] == [first] and got["stopped"] and got["text"] == ""
    rc, out, _ = run(capsys, "generate", d, "--chat", QUESTION, "--max-new-tokens", "3", "--stop", "none", "--json")
    assert len(json.loads(out)["output_ids"]) == 3


def test_generate_prompt_arguments_are_checked(capsys, ckpt):
    rc, _, err = run(capsys, "generate", ckpt, "--ids", "1,2", "--prompt", "hi")
    assert rc == 2 and "kvlab: error: --prompt and --ids together" in err
    rc, _, err = run(capsys, "generate", ckpt, "--chat", "hi", "--prompt", "hi")
    assert rc == 2 and "--prompt and --chat together" in err
    rc, _, err = run(capsys, "generate", ckpt, "--system", "be brief", "--prompt", "hi")
    assert rc == 2 and "--system goes with --chat" in err
    rc, _, err = run(capsys, "generate", ckpt, "--prompt", "hi", "--max-new-tokens", "1100")
    assert rc == 2 and "max_positions=1024" in err


def test_chat_keeps_the_history_turn_by_turn(capsys, monkeypatch, ckpt):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\nName a colour.\n"))
    rc, out, err = run(capsys, "chat", ckpt, "--system", "Be brief.", "--max-new-tokens", "4", "--json")
    assert rc == 0, err
    got = json.loads(out)
    turns = got["turns"]
    assert [t["user"] for t in turns] == ["Hello there", "Name a colour."]  # the empty line is skipped
    tok = load_tokenizer(ckpt)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
               {"role": "assistant", "content": turns[0]["assistant"]}, {"role": "user", "content": "Name a colour."}]
    assert turns[1]["prompt_tokens"] == len(tok.encode_chat(history))
    assert got["messages"] == [*history, {"role": "assistant", "content": turns[1]["assistant"]}]
    # streamed: each reply on standard output, in order
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nName a colour.\n"))
    rc, out, _ = run(capsys, "chat", ckpt, "--system", "Be brief.", "--max-new-tokens", "4")
    assert rc == 0 and out == turns[0]["assistant"] + "\n" + turns[1]["assistant"] + "\n"


def test_chat_needs_a_template(capsys, monkeypatch, ckpt, tmp_path):
    import shutil

    d = tmp_path / "no-template"
    shutil.copytree(ckpt, d)
    (d / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    rc, _, err = run(capsys, "chat", d)
    assert rc == 2 and "no chat template" in err


def test_eval_perplexity_and_variant_kl_equal_the_library(capsys, ckpt, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    rc, out, err = run(capsys, "eval", ckpt, "--text", f, "--tokens", "300", "--window", "128", "--chunk", "50",
                       "--json")
    assert rc == 0, err
    got = json.loads(out)
    model, tok = kvlab.load(str(ckpt)), load_tokenizer(ckpt)
    ids = tok.encode(TEXT, special=False)
    assert got["text_tokens"] == len(ids) and got["provenance"].startswith("file ")
    want = perplexity(model, ids[:300], 128)
    assert got["perplexity"]["tokens"] == 299 and got["perplexity"]["ppl"] == pytest.approx(want.ppl, rel=1e-6)
    rc, out, err = run(capsys, "eval", ckpt, "--text", f, "--tokens", "200", "--window", "200", "--variant", "window=16",
                       "--json")
    assert rc == 0, err
    kl = json.loads(out)["kl"]
    assert kl["mean_kl"] == pytest.approx(kl_divergence(model, with_window(model, 16), ids[:200], 200).mean_kl,
                                          rel=1e-5)
    assert kl["mean_kl"] > 0
    rc, out, err = run(capsys, "eval", ckpt, "--text", f, "--tokens", "200", "--window", "200")
    assert rc == 0 and f"{perplexity(model, ids[:200], 200).ppl:.4f}" in out and "stdlib" not in out
    # --kv-quant FORMAT (or --kv-dtype FORMAT) is --variant kv=FORMAT: the quantized cache against the unquantized
    rc, out, err = run(capsys, "eval", ckpt, "--text", f, "--tokens", "200", "--window", "200", "--kv-dtype", "int4-g4",
                       "--json")
    assert rc == 0, err
    kl = json.loads(out)["kl"]["mean_kl"]
    assert kl > 0 and kl == pytest.approx(kl_divergence(model, with_kv_quant(model, "int4-g4"), ids[:200], 200).mean_kl,
                                          rel=1e-5)
    rc, _, err = run(capsys, "eval", ckpt, "--kv-quant", "int8", "--variant", "global")
    assert rc == 2 and "kvlab: error: --kv-quant int8 with --variant: give one" in err


def test_eval_needle_table_json_and_plot(capsys, ckpt, tmp_path):
    plot = tmp_path / "needle.png"
    rc, out, err = run(capsys, "eval", ckpt, "--needle", "--lengths", "200,300", "--depths", "0,1", "--plot", plot,
                       "--json")
    assert rc == 0, err
    got = json.loads(out)
    r = got["needle"][str(ckpt)]
    assert r["lengths"] == [200, 300] and r["depths"] == [0.0, 1.0] and len(r["answers"]) == 4
    assert r["accuracy"] == [[float(a["correct"]) for a in r["answers"][i:i + 2]] for i in (0, 2)]
    assert plot.stat().st_size > 1000 and got["provenance"].startswith("docstrings of")
    rc, _, err = run(capsys, "eval", ckpt, "--needle", "--depths", "0,1.5")
    assert rc == 2 and "depth 1.5" in err


def test_eval_bad_variant_is_named(capsys, ckpt):
    rc, _, err = run(capsys, "eval", ckpt, "--variant", "sliding")
    assert rc == 2 and "expected 'window=N', 'global' or 'kv=FORMAT'" in err


def test_text_stream_decodes_whole_characters():
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    from kvlab.tokenizer import TextStream, Tokenizer, _bytes_to_unicode
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    backend = HF(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = Tokenizer(backend, "bytes")
    pieces = []
    stream = TextStream(tok, pieces.append, stop_ids=[0])
    for i in tok.encode("é🙂a"):
        stream(torch.tensor([i]))
    stream(torch.tensor([0]))
    assert pieces == ["é", "🙂", "a"] and stream.text == "é🙂a"


def test_eval_at_lengths(capsys, ckpt):
    rc, out, err = run(capsys, "eval", ckpt, "--at", "100,200", "--json")
    assert rc == 0, err
    got = json.loads(out)["perplexity_at"]
    model, tok = kvlab.load(str(ckpt)), load_tokenizer(ckpt)
    from kvlab.eval import default_corpus

    ids = tok.encode(default_corpus().text, special=False)
    assert [g["length"] for g in got] == [100, 200]
    assert got[1]["ppl"] == pytest.approx(perplexity(model, ids[:200], 200).ppl, rel=1e-6)
    rc, _, err = run(capsys, "eval", ckpt, "--at", "100", "--variant", "global")
    assert rc == 2 and "--at measures one window" in err


def test_generate_and_chat_decode_through_a_quantized_cache(capsys, monkeypatch, ckpt):
    """``--kv-quant`` / ``--kv-dtype`` on generate and chat: the cache kvlab.generate builds holds the format asked for
    (its bytes are the calculator's, not the unquantized cache's), the tokens are ``kvlab.generate(...,
    kv_quant=...)``'s, and a bad format or a float --kv-dtype other than --dtype is a named error (exit 2)."""
    from kvlab.costs import costs
    from kvlab.model import Model

    built = []
    new_cache = Model.new_cache

    def spy(self, *args, **kwargs):
        cache = new_cache(self, *args, **kwargs)
        built.append((cache.nbytes(), costs(self.config, context=cache.max_length, dtype="float32",
                                            kv_quant=kwargs.get("kv_quant")).kv_cache_bytes, cache.max_length))
        return cache

    monkeypatch.setattr(Model, "new_cache", spy)
    model = kvlab.load(str(ckpt), dtype=torch.float32)
    ids = load_tokenizer(ckpt).encode_chat([{"role": "user", "content": QUESTION}])
    want = kvlab.generate(model, torch.tensor([ids]), max_new_tokens=6, kv_quant="int4-g4-r2")[0, len(ids):].tolist()
    rc, out, err = run(capsys, "generate", ckpt, "--chat", QUESTION, "--max-new-tokens", "6", "--stop", "none",
                       "--kv-quant", "int4-g4-r2", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["output_ids"] == want and got["kv_quant"] == "int4-g4-r2"
    plain = costs(model.config, context=len(ids) + 6, dtype="float32").kv_cache_bytes
    held, priced, length = built[-1]
    assert length == len(ids) + 6 and held == priced and held < plain / 3  # int4 codes + fp16 scales + 2 exact
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
    rc, out, err = run(capsys, "chat", ckpt, "--max-new-tokens", "2", "--stop", "none", "--kv-dtype", "int8", "--json")
    assert rc == 0, err
    held, priced, length = built[-1]
    assert held == priced == costs(model.config, context=length, dtype="float32", kv_quant="int8").kv_cache_bytes
    rc, _, err = run(capsys, "generate", ckpt, "--ids", "1,2", "--kv-quant", "int4-g3")
    assert rc == 2 and "kvlab: error: layers[0].kv_quant[k].group=3: must divide the 8 quantized channels" in err
    rc, _, err = run(capsys, "chat", ckpt, "--kv-dtype", "bf16")
    assert rc == 2 and "kvlab: error: --kv-dtype bf16: kvlab chat's cache holds the model's dtype (--dtype fp32)" in err
    assert "Traceback" not in err
