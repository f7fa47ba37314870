"""A checkpoint's chat template, rendered the way transformers' `apply_chat_template` renders it.

Where the template comes from, in transformers' order: `chat_template.jinja` beside the
tokenizer, else `chat_template` in `tokenizer_config.json` (a string, or a list of named
templates of which `default` is used), else a file given with `--chat-template`, which wins
over both. How it is rendered: jinja2's immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception(message)`,
`strftime_now(format)`, a `tojson` filter that keeps non-ASCII text, and in the context the
messages, `add_generation_prompt` and the tokenizer's special tokens as strings (`bos_token`,
`eos_token`, ...). The text is then tokenized without adding special tokens (the template
writes them), which is what `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxpd.errors import ConfigError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (`raise_exception`) or could not render it: the
    message says why, for the client."""


def _content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def find_template(folder: str | Path | None) -> str | None:
    """The checkpoint's chat template source, or None when it has none."""
    if folder is None:
        return None
    folder = Path(folder)
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text()
    template = _read_config(folder).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def special_tokens(folder: str | Path | None) -> dict[str, Any]:
    """The special tokens a template sees, as strings (what transformers passes as
    `special_tokens_map`)."""
    if folder is None:
        return {}
    config = _read_config(Path(folder))
    out: dict[str, Any] = {}
    for key in SPECIAL_KEYS:
        text = _content(config.get(key))
        if text is not None:
            out[key] = text
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t for t in map(_content, extra) if t is not None]
    return out


def _raise(message: str) -> None:
    raise ChatTemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class ChatTemplate:
    """One compiled template with the special tokens it renders with."""

    def __init__(self, source: str, specials: dict[str, Any] | None = None, *,
                 where: str = "chat template"):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{where}: not a valid jinja2 template (line {e.lineno}: "
                              f"{e.message})") from None
        self.specials = dict(specials or {})
        self.source = source

    @classmethod
    def for_checkpoint(cls, folder: str | Path | None,
                       override: str | Path | None = None) -> ChatTemplate | None:
        """The template a served model uses: `override` (a file) if given, else the
        checkpoint's; None when there is neither."""
        specials = special_tokens(folder)
        if override is not None:
            path = Path(override)
            try:
                source = path.read_text()
            except OSError as e:
                raise ConfigError(f"--chat-template: cannot read {path} ({e.strerror})") from None
            return cls(source, specials, where=str(path))
        source = find_template(folder)
        return None if source is None else cls(source, specials, where=f"{folder} chat template")

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text of a conversation. ChatTemplateError when the template refuses it."""
        context = {**self.specials, **extra, "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**context)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template cannot render these messages: "
                                    f"{e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            raise ChatTemplateError(f"the chat template cannot render these messages "
                                    f"({type(e).__name__}: {e})") from None
