"""Chat messages to prompt token ids: the model's own chat template, or a plain fallback format.

The template comes from `chat_template.jinja` or the `chat_template` field of
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used) and
is rendered the way transformers' `apply_chat_template` renders it: a sandboxed Jinja environment
with `trim_blocks`/`lstrip_blocks`, the tokenizer's special tokens as variables,
`add_generation_prompt=True`, and the `raise_exception`, `strftime_now` and `tojson` helpers. The
rendered text already holds any BOS token, so it is tokenized without adding special tokens.

Without a template, each message becomes "<role>: <content>\\n" and the prompt ends with
"assistant:"; that text is tokenized like a completion prompt.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..errors import MoespecError

Message = dict[str, str]  # {"role": ..., "content": ...}


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: object, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _special_tokens(config: dict) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... from tokenizer_config.json (plain strings or AddedToken dicts)."""
    out = {}
    for key, value in config.items():
        if key.endswith("_token") and isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def _find_template(model_dir: Path, config: dict) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatFormat:
    """Turns a list of chat messages into prompt token ids for one model."""

    def __init__(self, template: str | None, special_tokens: dict[str, str]):
        self.special_tokens = special_tokens
        self._template: jinja2.Template | None = None
        if template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateError as e:
                raise MoespecError(f"the model's chat template does not compile: {e}") from None

    @classmethod
    def load(cls, model_dir: Path) -> ChatFormat:
        path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as e:
            raise MoespecError(f"{path} is not valid JSON: {e}") from None
        return cls(_find_template(model_dir, config), _special_tokens(config))

    def render(self, messages: list[Message]) -> str:
        """The prompt text, ending where the assistant's reply should begin."""
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise MoespecError(f"the chat template rejected the messages: {e}") from None

    def encode(self, messages: list[Message], tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode(self.render(messages), add_special_tokens=self._template is None).ids
