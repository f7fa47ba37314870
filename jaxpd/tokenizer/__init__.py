"""Tokenizers: the `Tokenizer` interface, its Hugging Face and byte-level implementations,
incremental detokenization for streaming, and `load_tokenizer` for model folders."""

from __future__ import annotations

from pathlib import Path

from jaxpd.errors import ConfigError
from jaxpd.tokenizer.base import Tokenizer
from jaxpd.tokenizer.byte import ByteTokenizer
from jaxpd.tokenizer.hf import TOKENIZER_FILE, HFTokenizer
from jaxpd.tokenizer.streaming import IncrementalDetokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]


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
