"""The tokenizer and chat template built from GGUF metadata vs transformers' conversion of the same file."""

from __future__ import annotations

import json

import pytest
from real_models import real_model_path, share_gguf_parsing
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from kvlab.chat import ChatTemplateError, render
from kvlab.tokenizer import TokenizerError, load_tokenizer

MIXED = ["Hello world! The capital of France is Paris.",
         "def f(x):\n    return x ** 2  # square\n\tprint(f'{x=}')\n",
         "Привет, мир! Ελληνικά. 你好，世界。こんにちは。مرحبا بالعالم. हिन्दी 한국어",
         "emoji 🙂🚀👩‍💻 and naïve café, ﬁ ligature,  two  spaces,   three, trailing ",
         " leading space\n\n\nnewlines <|im_end|> <end_of_turn> <bos>"]

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Say 🙂 in Greek: καλημέρα"}]]

# the template of google/gemma-3-*-it (tokenizer_config.json): the 270M GGUF here is the base model and has none
GEMMA3_IT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def _hf(path):
    transformers = pytest.importorskip("transformers")
    with share_gguf_parsing():  # transformers' reading of the file done once: tests/real_models.py
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2():
    path = real_model_path("smollm2-135m")
    return load_tokenizer(path), _hf(path)


@pytest.fixture(scope="module")
def gemma3():
    path = real_model_path("gemma-3-270m")
    return load_tokenizer(path), _hf(path)


def _check_same_ids(ours, ref):
    for text in MIXED:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special=True) == text.replace("<bos>", "") or "<" in text


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(smollm2):
    ours, ref = smollm2
    _check_same_ids(ours, ref)
    assert ours.decode(ours.encode(MIXED[3])) == MIXED[3]  # byte-level: an exact round trip
    assert ours.special_tokens == {k: v for k, v in ref.special_tokens_map.items() if isinstance(v, str)}
    assert ours.token_id("<|im_end|>") in ours.stop_ids


@pytest.mark.slow
def test_gemma3_tokenizer_equals_transformers(gemma3):
    ours, ref = gemma3
    _check_same_ids(ours, ref)
    ids = ours.encode(MIXED[2])
    assert ids[0] == ours.token_id("<bos>")  # the file asks for BOS (tokenizer.ggml.add_bos_token)
    assert ours.decode(ids[1:]) == MIXED[2]
    assert ours.token_id("<end_of_turn>") in ours.stop_ids and ours.token_id("<eos>") in ours.stop_ids


@pytest.mark.slow
def test_smollm2_chat_template_equals_transformers(smollm2):
    ours, ref = smollm2
    assert ours.chat_template == ref.chat_template
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        ids = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert ours.encode_chat(chat) == list(ids)


@pytest.mark.slow
def test_gemma3_chat_template_equals_transformers(gemma3):
    ours, ref = gemma3
    assert ours.chat_template is None and ref.chat_template is None  # a base model: no template in the file
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.apply_chat_template(CHATS[0])
    ours.chat_template = GEMMA3_IT_TEMPLATE  # the instruct models' template, with Gemma's special tokens
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref.apply_chat_template(
                chat, chat_template=GEMMA3_IT_TEMPLATE, add_generation_prompt=gen, tokenize=False)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.apply_chat_template(bad)


@pytest.mark.slow
def test_directory_tokenizer_matches_gguf(smollm2, tmp_path):
    """transformers' save of the GGUF tokenizer (tokenizer.json, tokenizer_config.json, chat template) loads the same."""
    ours, ref = smollm2
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    d = load_tokenizer(tmp_path)
    for text in MIXED:
        assert d.encode(text) == ours.encode(text)
    assert d.chat_template == ours.chat_template
    assert d.apply_chat_template(CHATS[2]) == ours.apply_chat_template(CHATS[2])
    assert set(d.stop_ids) == set(ours.stop_ids)


def _word_tokenizer(tmp_path):
    vocab = {"[UNK]": 0, "h": 1, "e": 2, "l": 3, "o": 4, " ": 5}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]"}))
    return load_tokenizer(tmp_path)


def test_unencodable_characters_are_named(tmp_path):
    tok = _word_tokenizer(tmp_path)
    assert tok.encode("hello") == [1, 2, 3, 3, 4]
    with pytest.raises(TokenizerError, match=r"'é' \(U\+00E9\).*'🙂' \(U\+1F642\)"):
        tok.encode("héllo 🙂")


def test_ids_outside_the_vocabulary_are_an_error(tmp_path):
    tok = _word_tokenizer(tmp_path)
    assert tok.decode([1, 2]) == "he"
    with pytest.raises(TokenizerError, match=r"token id\(s\) \[6, 99\] outside the vocabulary"):
        tok.decode([1, 99, 6])


def test_no_tokenizer_and_bad_paths(tmp_path):
    assert load_tokenizer(tmp_path) is None
    with pytest.raises(TokenizerError, match="neither a .gguf file nor a checkpoint directory"):
        load_tokenizer(tmp_path / "missing.gguf")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 4)
    with pytest.raises(ValueError, match="truncated"):
        load_tokenizer(bad)


def test_chat_template_globals_and_errors():
    tpl = ("{% for m in messages %}{{ bos_token }}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}"
           "{% if add_generation_prompt %}<gen>{% endif %}{% if messages|length > 2 %}"
           "{{ raise_exception('too long') }}{% endif %}")
    msgs = [{"role": "user", "content": "é<b>"}]
    assert render(tpl, msgs, bos_token="<s>") == '<s>[user]"é<b>"<gen>'
    assert render(tpl, msgs, add_generation_prompt=False, bos_token="") == '[user]"é<b>"'
    with pytest.raises(ChatTemplateError, match="too long"):
        render(tpl, msgs * 3)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for %}", msgs)
    with pytest.raises(ChatTemplateError):  # the sandbox: no reaching Python internals
        render("{{ messages.__class__.__mro__ }}", msgs)


@pytest.mark.slow
def test_smollm2_answers_and_stops_at_the_end_of_its_turn(capsys):
    """kvlab generate --chat on the real file: the template, greedy decoding and the <|im_end|> stop together."""
    from kvlab.cli import main

    path = real_model_path("smollm2-135m")
    rc = main(["generate", str(path), "--chat", "What is the capital of France?", "--max-new-tokens", "40", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = json.loads(out)
    tok = load_tokenizer(path)
    assert got["stopped"] and got["output_ids"][-1] == tok.token_id("<|im_end|>")
    assert "Paris" in got["text"] and "<|im_end|>" not in got["text"]
