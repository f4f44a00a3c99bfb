"""The model's own tokenizer: a ``tokenizers`` tokenizer from a GGUF file's metadata or a checkpoint's tokenizer.json.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, scores, token types and special ids
under ``tokenizer.ggml.*``. Two kinds are rebuilt here, the same way transformers 5.23 converts them
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so both give the same ids:

- ``gpt2`` (SmolLM2, Llama 3, Qwen): byte-level BPE with the file's merges;
- ``llama`` vocabulary of a Gemma file (SentencePiece pieces with scores, no merges): BPE with byte fallback
  whose merges are recovered from the vocabulary, ranked by the order of the tokens in the file.

Tokens the file marks CONTROL (3) are added as special tokens, USER_DEFINED (4) as plain added tokens, so
neither is cut into pieces. Stop tokens follow llama.cpp: the file's EOS / EOT / EOM ids plus the control tokens
that end a turn by name (``<|im_end|>``, ``<end_of_turn>``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from .chat import render
from .gguf_checkpoint import read_gguf
from .models import resolve_file

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (gguf.TokenType)
# the control tokens llama.cpp treats as "end of generation" by their text (src/llama-vocab.cpp)
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
               "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
# llama.cpp's pre-tokenizer names whose split differs from GPT-2's (transformers' GGUF_PRE_TOKENIZER_SPLITS)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
              "deepseek-r1-qwen": _QWEN2_SPLIT}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, or text / ids it cannot encode or decode."""


@dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` with what generation needs: special tokens, stop ids and the chat template.

    ``encode`` adds the model's BOS when its tokenizer says so; ``encode(..., special=False)`` does not (a rendered
    chat template writes its own). ``source`` names the file the tokenizer came from, for error messages.
    """

    backend: _HFTokenizer
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, unk_token, pad_token ...
    stop_ids: tuple[int, ...] = ()
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; raises TokenizerError naming the characters the vocabulary cannot encode."""
        enc = self.backend.encode(text, add_special_tokens=special)
        unk = self.token_id(self.special_tokens.get("unk_token", "")) if self.special_tokens.get("unk_token") else None
        if unk is not None and unk in enc.ids:
            bad = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk and text[a:b] != self.id_to_text(unk)]
            if bad:
                chars = sorted({c for piece in bad for c in piece})
                shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)
                raise TokenizerError(f"the tokenizer of {self.source} cannot encode character(s) {shown}: "
                                     "they are not in its vocabulary and it has no byte fallback")
        return list(enc.ids)

    def id_to_text(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; an id outside the vocabulary is an error (not an empty string)."""
        ids = [int(i) for i in ids]
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise TokenizerError(f"token id(s) {bad[:8]} outside the vocabulary of {self.source} "
                                 f"(ids 0..{self.vocab_size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The conversation rendered by the model's chat template, as transformers renders it (kvlab/chat.py)."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.source} has no chat template (a base model?): give a plain prompt instead")
        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      **{**self.special_tokens, **kwargs})

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation (the template writes any BOS itself: none is added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), special=False)


# -- GGUF ------------------------------------------------------------------------------------------------------------
def _field(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    return meta.get(key, default)


@lru_cache(maxsize=4)
def _gguf_cached(path: str, mtime: float, size: int) -> Tokenizer:
    reader = read_gguf(path, arrays=True).meta
    arch = _field(reader, "general.architecture")
    kind = _field(reader, "tokenizer.ggml.model")
    tokens: list[str] | None = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{path!r} holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens absent)")
    types = list(_field(reader, "tokenizer.ggml.token_type", []) or [])
    if kind == "gpt2":
        backend = _byte_level(tokens, _field(reader, "tokenizer.ggml.merges") or [], _field(reader, "tokenizer.ggml.pre"))
    elif kind == "llama" and arch in GEMMA_ARCHS:
        backend = _gemma(tokens)
    else:
        raise TokenizerError(f"{path!r}: tokenizer model {kind!r} of architecture {arch!r} is not supported "
                             f"(supported: 'gpt2' byte-level BPE; 'llama' SentencePiece vocabulary of {GEMMA_ARCHS})")
    _add_typed_tokens(backend, tokens, types, byte_level=kind == "gpt2")
    special: dict[str, str] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            special[name] = tokens[int(i)]
    if arch in GEMMA_ARCHS and "<mask>" in tokens:
        special["mask_token"] = "<mask>"  # GemmaTokenizer's own default, which its templates may read
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = kind == "llama"  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    bos = special.get("bos_token")
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tokens.index(bos))])
    ids = {int(i) for key in ("eos", "eot", "eom")
           if (i := _field(reader, f"tokenizer.ggml.{key}_token_id")) is not None}
    ids |= {i for i, t in enumerate(tokens) if t in END_OF_TURN and i < len(types) and types[i] == CONTROL}
    return Tokenizer(backend, path, special, tuple(sorted(ids)), _field(reader, "tokenizer.chat_template"))


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> _HFTokenizer:
    """GPT-2 style byte-level BPE; tokens not already spelled in the byte alphabet are respelled into it."""
    table = _bytes_to_unicode()
    spelling = set(table.values())
    vocab = {t if set(t) <= spelling else "".join(table[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = _HFTokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False))
    split = PRE_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2, encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gemma(tokens: list[str]) -> _HFTokenizer:
    """Gemma's SentencePiece vocabulary as BPE with byte fallback.

    Tokens of two or more spaces are stored as spaces and respelled with U+2581 as the model's pieces are; the file
    has no merges, so every split of a token into two vocabulary pieces is a merge, ranked by the token's position in
    the file (Gemma's scores do not follow its merge order; the order does), ties broken by the pieces' lengths.
    """
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    # in file order; within a token, the longer left piece first
    merges = [(t[:k], t[k:]) for t in tokens for k in range(len(t) - 1, 0, -1) if t[:k] in vocab and t[k:] in vocab]
    tok = _HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>",
                           dropout=None, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _add_typed_tokens(tok: _HFTokenizer, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens (matched whole in text).

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp mislabel and is
    skipped, as transformers does (adding it would grow the vocabulary past the model's).
    """
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


# -- checkpoint directory ----------------------------------------------------------------------------------------------
def _read_json(f: Path) -> dict[str, Any]:
    try:
        out = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {str(f)!r}: {e}") from e
    if not isinstance(out, dict):
        raise TokenizerError(f"{str(f)!r} must hold a JSON object")
    return out


def _token_text(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _ids(v: Any) -> set[int]:
    if isinstance(v, int):
        return {v}
    if isinstance(v, list):
        return {int(x) for x in v if isinstance(x, int)}
    return set()


def _from_dir(d: Path) -> Tokenizer | None:
    f = d / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        backend = _HFTokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise TokenizerError(f"cannot read tokenizer {str(f)!r}: {e}") from e
    cfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
               if (t := _token_text(cfg.get(k))) is not None}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in template if isinstance(x, dict)}
        template = named.get("default")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        if (d / name).is_file():
            ids |= _ids(_read_json(d / name).get("eos_token_id"))
            if ids:
                break
    if not ids and "eos_token" in special and backend.token_to_id(special["eos_token"]) is not None:
        ids.add(backend.token_to_id(special["eos_token"]))
    added = backend.get_added_tokens_decoder()
    ids |= {i for i, t in added.items() if t.special and t.content in END_OF_TURN}
    return Tokenizer(backend, str(f), special, tuple(sorted(ids)), template if isinstance(template, str) else None)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a ``.gguf`` file, a named installed model (``smollm2-135m``) or a checkpoint directory (its
    tokenizer.json); None when a directory has none."""
    p = Path(_resolve(path))
    if p.is_file() and p.suffix == ".gguf":
        st = p.stat()
        return _gguf_cached(str(p.resolve()), st.st_mtime, st.st_size)
    if p.is_dir():
        return _from_dir(p)
    raise TokenizerError(f"{str(p)!r} is neither a .gguf file nor a checkpoint directory")


def _resolve(spec: str | Path) -> str | Path:
    """A named real model (kvlab/models.py) -> its file; anything else as given."""
    return resolve_file(spec) if isinstance(spec, str) else spec


class TextStream:
    """Decodes generated ids as they come and hands ``write`` each new piece of text (whole characters only).

    ``__call__(next_ids [B])`` is a :func:`kvlab.generate` callback (row 0 is streamed); ``text`` is all so far.
    """

    def __init__(self, tok: Tokenizer, write: Any, stop_ids: Iterable[int] = ()) -> None:
        self.tok, self.write, self.stop = tok, write, set(stop_ids)
        self.ids: list[int] = []
        self.text = ""

    def __call__(self, nxt: Any) -> None:
        i = int(nxt.reshape(-1)[0])  # one host sync per token: printing needs the id
        if i in self.stop:
            return
        self.ids.append(i)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.write(text[len(self.text):])
            self.text = text


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tok`` into directory ``path`` as a checkpoint carries it: ``tokenizer.json``, ``tokenizer_config.json``
    (special tokens, chat template) and ``generation_config.json`` (stop ids), read back by :func:`load_tokenizer`
    with the same ids, specials, stop ids and template."""
    d = Path(path)
    tok.backend.save(str(d / "tokenizer.json"))
    cfg: dict[str, Any] = dict(tok.special_tokens)
    if tok.chat_template is not None:
        cfg["chat_template"] = tok.chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": list(tok.stop_ids)}, indent=1))
