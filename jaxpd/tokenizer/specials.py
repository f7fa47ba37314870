"""Which ids are BOS / EOS / PAD, read from the JSON files a Hugging Face model folder ships.

The answer is spread over three files that disagree in format: `tokenizer_config.json` names
tokens as strings (or AddedToken dicts), `generation_config.json` and `config.json` give ids (EOS
as an int or a list). Generation must stop on every EOS any of them declares (Llama 3 instruct
ends turns with <|eot_id|>, which only generation_config lists), so EOS ids are the union.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxpd.errors import ConfigError

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Special ids of one tokenizer; `add_bos` is tokenizer_config's `add_bos_token` or None."""

    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool | None = None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, field: str, path: Path) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` -> "<s>"; null -> None."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise ConfigError(
            f"{path}: {field} must be a string or an object with 'content', got {value!r}")
    return value


def _ids(value: Any, field: str, path: Path) -> tuple[int, ...]:
    """An id field that may be null, an int or a list of ints."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ConfigError(
                f"{path}: {field} must be a non-negative int or a list of them, got {value!r}")
    return tuple(items)


def _id_fields(path: Path) -> dict[str, tuple[int, ...]]:
    """bos/eos/pad ids of a generation_config.json or config.json (top level, else text_config)."""
    data = _read_json(path)
    nested = data.get("text_config")
    out = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = data.get(name)
        if value is None and isinstance(nested, dict):
            value = nested.get(name)
        out[name] = _ids(value, name, path)
    return out


def _dedup(ids: list[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


def read_special_tokens(folder: Path, token_to_id: Callable[[str], int | None]) -> SpecialTokens:
    """Special ids for the tokenizer in `folder`; `token_to_id` resolves tokenizer_config's names.

    BOS and PAD come from the first file that sets them (tokenizer_config, then
    generation_config, then config); EOS ids are the union of all three, in that order.
    """
    tc_path = folder / TOKENIZER_CONFIG
    tc = _read_json(tc_path)

    def resolve(field: str, required: bool) -> tuple[int, ...]:
        name = _token_content(tc.get(field), field, tc_path)
        if name is None:
            return ()
        tid = token_to_id(name)
        if tid is None:
            if required:
                raise ConfigError(f"{tc_path}: {field} {name!r} is not in the vocabulary of "
                                  f"{folder / 'tokenizer.json'}")
            return ()  # transformers would add a missing pad token; we just leave pad unset
        return (tid,)

    sources = [
        {"bos_token_id": resolve("bos_token", True), "eos_token_id": resolve("eos_token", True),
         "pad_token_id": resolve("pad_token", False)},
        _id_fields(folder / GENERATION_CONFIG),
        _id_fields(folder / MODEL_CONFIG),
    ]

    def first(name: str) -> int | None:
        return next((s[name][0] for s in sources if s[name]), None)

    add_bos = tc.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ConfigError(f"{tc_path}: add_bos_token must be true or false, got {add_bos!r}")
    return SpecialTokens(
        bos_token_id=first("bos_token_id"),
        eos_token_ids=_dedup([i for s in sources for i in s["eos_token_id"]]),
        pad_token_id=first("pad_token_id"),
        add_bos=add_bos,
    )
