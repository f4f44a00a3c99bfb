"""Hostile command lines: numbers (a context of hundreds of digits or past 2^53, NaN budgets), output paths whose
parent is a file, a checkpoint's config.json given for its directory, empty prompts, devices that do not exist,
non-integer stop ids. Every one exits with 2 and one line naming the argument; --debug / KVLAB_DEBUG show the
traceback, and errors kvlab did not expect exit with 2 too."""

from __future__ import annotations

import shutil

import pytest
from helpers import tiny_config

from kvlab.cli import main
from kvlab.units import MAX_CONTEXT, parse_context


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(err: str) -> str:
    assert err.startswith("kvlab: error:") and "Traceback" not in err, err
    return err.splitlines()[0]


@pytest.mark.parametrize("context, needle", [
    ("9" * 300, "9999999999999999999...(300 digits) is larger than the largest supported"),
    (str(2**63 + 1), f"'{2**63 + 1}' is larger than the largest supported {MAX_CONTEXT:,} tokens"),
    ("1e5", "context length '1e5'"),
    ("nan", "context length 'nan'"),
    ("-4k", "context length '-4k'"),
])
def test_context_numbers(capsys, context, needle):
    rc, err = run(capsys, "calc", "llama-3.1-8b", f"--context={context}")
    assert rc == 2 and needle in one_line_error(err)


def test_contexts_are_parsed_exactly_without_a_float():
    assert parse_context(str(MAX_CONTEXT)) == 2**53 and parse_context(str(2**53 - 1)) == 2**53 - 1
    assert parse_context("1.5k") == 1536 and parse_context("0.25m") == 262144
    with pytest.raises(ValueError, match="larger than"):
        parse_context(str(2**53 + 1))  # a float would round it to 2^53 and accept it


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "x"])
def test_max_weight_gib_must_be_a_finite_positive_number(capsys, value):
    rc, err = run(capsys, "bench", "llama-3.1-8b", "--max-weight-gib", value)
    assert rc == 2 and f"--max-weight-gib {value!r}" in err and "Traceback" not in err


def test_an_impossible_weight_budget_is_refused_not_shrunk_to_one_layer(capsys):
    rc, err = run(capsys, "bench", "llama-3.1-8b", "--max-weight-gib", "0.001", "--context", "16", "--no-progress")
    assert rc == 2 and "does not fit even scaled down to one layer" in one_line_error(err)


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    return f


@pytest.mark.parametrize("argv", [
    lambda f, t: ["compare", "llama-3.1-8b", "--context", "1k", "--plot", f / "plot.png"],
    lambda f, t: ["train", "cfg.toml", "--out", f / "run"],
    lambda f, t: ["ablate", "sweep.toml", "--markdown", f / "sub" / "t.md"],
    lambda f, t: ["ablate", "sweep.toml", "--out", f],
    lambda f, t: ["compare", "llama-3.1-8b", "--plot", t],
])
def test_output_paths_whose_parent_is_a_file_are_refused_naming_it(capsys, a_file, tmp_path, argv):
    rc, err = run(capsys, *argv(a_file, tmp_path))
    assert rc == 2 and ("is a file" in err or "is a directory" in err) and str(tmp_path) in err
    assert not (tmp_path / "plot.png").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kvlab.bench import save_random_hf

    d = tmp_path_factory.mktemp("ckpt")
    save_random_hf(tiny_config(shared=False, layers=1), d)
    words = ["[unk]"] + [f"w{i}" for i in range(96)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("verb", ["generate", "calc", "inspect"])
def test_a_config_json_given_for_its_directory_says_pass_the_directory(capsys, checkpoint, verb):
    argv = [verb, checkpoint / "config.json"] + (["--ids", "1"] if verb == "generate" else [])
    rc, err = run(capsys, *argv)
    assert rc == 2 and f"pass the directory {str(checkpoint)!r}" in one_line_error(err)


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", ""], "--prompt '' encodes to no tokens"),
    (["--prompt", "   "], "--prompt '   ' encodes to no tokens"),
    (["--ids", "1,2", "--device", "cuda:7"], "--device 'cuda:7'"),
    (["--ids", "1,2", "--device", "tpu"], "--device 'tpu': not a device name"),
    (["--ids", "1,2", "--stop", "a,b"], "--stop 'a,b'"),
    (["--ids", "1,2", "--prompt", "w1"], "--prompt and --ids together"),
    (["--ids", "1,x"], "--ids '1,x'"),
])
def test_generate_bad_arguments(capsys, checkpoint, extra, needle):
    rc, err = run(capsys, "generate", checkpoint, "--max-new-tokens", "2", *extra)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_debug_flag_and_environment_show_the_traceback(capsys, monkeypatch):
    rc, err = run(capsys, "calc", "no-such-model", "--debug")
    assert rc == 2 and "Traceback" in err and "kvlab: error: unknown model 'no-such-model'" in err
    monkeypatch.setenv("KVLAB_DEBUG", "1")
    rc, err = run(capsys, "calc", "no-such-model")
    assert rc == 2 and "Traceback" in err
    monkeypatch.setenv("KVLAB_DEBUG", "0")
    rc, err = run(capsys, "calc", "no-such-model")
    assert rc == 2 and "Traceback" not in err


def test_errors_kvlab_did_not_expect_exit_2_with_one_line(capsys, monkeypatch, checkpoint, tmp_path):
    from kvlab.cli import build_parser

    def boom(args):
        raise RuntimeError("something deep inside torch")

    monkeypatch.setattr("kvlab.cli.build_parser", lambda: _with(build_parser(), "calc", boom))
    rc, err = run(capsys, "calc", "llama-3.1-8b")
    assert rc == 2 and err.startswith("kvlab: error: RuntimeError: something deep inside torch")
    assert "--debug" in err and "Traceback" not in err
    ro = tmp_path / "ro"
    shutil.copytree(checkpoint, ro)

    def denied(args):
        raise PermissionError(13, "Permission denied", str(ro / "config.json"))

    monkeypatch.setattr("kvlab.cli.build_parser", lambda: _with(build_parser(), "calc", denied))
    rc, err = run(capsys, "calc", "llama-3.1-8b")
    assert rc == 2 and f"{str(ro / 'config.json')!r}: Permission denied" in err


def _with(parser, verb, fn):
    """``parser`` with ``verb`` running ``fn``."""
    sub = next(a for a in parser._actions if a.dest == "verb")
    sub.choices[verb].set_defaults(func=fn)
    return parser


@pytest.mark.parametrize("verb", ["calc", "inspect", "fit"])
@pytest.mark.parametrize("flags", [["--kv-quant", "int8,int4"], ["--kv-dtype", "int8", "--kv-quant", "int4"]])
def test_verbs_that_price_one_kv_format_refuse_several_naming_the_verb(capsys, verb, flags):
    """calc, inspect and fit share one check (kvlab/cli/common.py one_kv_format); compare takes several."""
    extra = ["--memory", "24GiB"] if verb == "fit" else []
    rc, err = run(capsys, verb, "llama-3.1-8b", *flags, *extra)
    assert rc == 2 and one_line_error(err) == (f"kvlab: error: --kv-quant=int8,int4: {verb} prices one format at a "
                                               "time (kvlab compare takes several)")
    rc, _ = run(capsys, "compare", "llama-3.1-8b", *flags, "--context", "4k")
    assert rc == 0
