"""The tokenizer interface the serving stack codes against.

Engines, samplers and servers depend only on this Protocol, so a Hugging Face tokenizer and the
dependency-free byte tokenizer (tests, smoke runs without model files) are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, plus the special ids generation needs (BOS to start, EOS to stop)."""

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (may be below the model's padded vocab)."""
        ...

    @property
    def bos_token_id(self) -> int | None:
        """Id prepended by `encode(..., add_special_tokens=True)` when the model expects one."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (chat models often have several, e.g. Llama 3)."""
        ...

    @property
    def pad_token_id(self) -> int | None:
        """Id used to pad batches, if the tokenizer defines one."""
        ...

    @property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token covers: a text longer than the context
        times this cannot fit, and is refused before it is tokenized."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the model's BOS comes first, once."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 come back as U+FFFD.

        Negative ids raise ValueError. Ids at or past `vocab_size` raise ValueError or decode to
        nothing, depending on the implementation (a model's padded vocab can exceed the
        tokenizer's, so HF ids in that gap decode to nothing).
        """
        ...
