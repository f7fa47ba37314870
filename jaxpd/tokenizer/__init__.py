"""Tokenizers: the `Tokenizer` interface, its Hugging Face and byte-level implementations,
incremental detokenization for streaming, `load_tokenizer` for model folders, and what a
checkpoint's tokenizer adds to its model config (`tokenizer_for_checkpoint`, `merge_tokenizer_eos`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jaxpd.errors import ConfigError
from jaxpd.tokenizer.base import Tokenizer
from jaxpd.tokenizer.byte import ByteTokenizer
from jaxpd.tokenizer.hf import TOKENIZER_FILE, HFTokenizer
from jaxpd.tokenizer.streaming import IncrementalDetokenizer

if TYPE_CHECKING:
    from jaxpd.model.config import ModelConfig

__all__ = ["ByteTokenizer", "HFTokenizer", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer",
           "merge_tokenizer_eos", "tokenizer_for_checkpoint"]


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer of a model folder (one holding `tokenizer.json`), or that file itself.

    Raises ConfigError rather than falling back to `ByteTokenizer`: whether bytes are an
    acceptable stand-in (random-weight smoke runs) or a mistake (a real checkpoint) is the
    caller's call.
    """
    if path is None:
        raise ConfigError(
            f"no tokenizer path given: pass a model folder containing {TOKENIZER_FILE}")
    path = Path(path)
    if path.is_file() and path.name == TOKENIZER_FILE:
        return HFTokenizer(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer folder {path} does not exist "
                          f"(expected a folder containing {TOKENIZER_FILE})")
    if not (path / TOKENIZER_FILE).is_file():
        hint = ""
        if (path / "tokenizer.model").is_file():
            hint = (" (found tokenizer.model, a SentencePiece file, which is not supported: "
                    "convert it with transformers, e.g. "
                    "AutoTokenizer.from_pretrained(path).save_pretrained(path))")
        raise ConfigError(f"tokenizer folder {path} has no {TOKENIZER_FILE}{hint}")
    return HFTokenizer(path)


def tokenizer_for_checkpoint(folder: str | Path | None) -> Tokenizer | None:
    """The tokenizer a checkpoint folder ships, or None when it has no `tokenizer.json`.

    No fallback to bytes: guessing a tokenizer would turn ids into confident nonsense, so callers
    without one work in token ids.
    """
    if folder is None or not (Path(folder) / TOKENIZER_FILE).is_file():
        return None
    return load_tokenizer(folder)


def merge_tokenizer_eos(config: ModelConfig, tokenizer: Tokenizer | None) -> ModelConfig:
    """`config` with the tokenizer's EOS ids added to its own (config.json's first, in order).

    Tokenizer files can declare more EOS ids than config.json (Llama-3 instruct ends turns with
    <|eot_id|>, listed only in generation_config.json). Merging them once at load time makes the
    engine's EOS set complete, so a request's `stop_token_ids` only ever adds stops and
    `ignore_eos` ignores every EOS.
    """
    if tokenizer is None:
        return config
    merged = tuple(dict.fromkeys((*config.eos_token_ids, *tokenizer.eos_token_ids)))
    return config if merged == tuple(config.eos_token_ids) else config.replace(eos_token_ids=merged)
