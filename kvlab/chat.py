"""Chat templates rendered with jinja2 the way transformers renders them (``apply_chat_template``).

Same environment as transformers 5.23 (``utils/chat_template_utils.py``): a sandboxed, immutable jinja2
environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` filter that does
not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``. The template
sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...). Templates are data: the sandbox keeps them from reaching Python internals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that refused the conversation (``raise_exception``)."""


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render(template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
           tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
           **special_tokens: Any) -> str:
    """The conversation ``messages`` (``[{"role": ..., "content": ...}, ...]``) rendered by ``template``.

    Keys whose value is None are dropped from each message, as transformers does.
    """
    import jinja2

    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e
