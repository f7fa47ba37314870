"""A tokenizer with no vocabulary files: one id per UTF-8 byte plus three special ids.

It lets the whole stack (engines, streaming, servers) run with random-weight models and in
tests, where no Hugging Face tokenizer is available.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxpd.errors import ConfigError
from jaxpd.tokenizer.base import Tokenizer

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
_SPECIAL_TEXT = {BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>"}
MIN_VOCAB_SIZE = 259


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are raw bytes; 256/257/258 are <bos>/<eos>/<pad>; ids above decode to nothing.

    `vocab_size` may exceed 259 so it can match a model's embedding table: a random model then
    samples any id in range and decoding never fails.
    """

    def __init__(self, vocab_size: int = MIN_VOCAB_SIZE) -> None:
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"ByteTokenizer needs vocab_size >= {MIN_VOCAB_SIZE} (256 bytes + bos/eos/pad), "
                f"got {vocab_size}")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return BOS_ID

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (EOS_ID,)

    @property
    def pad_token_id(self) -> int | None:
        return PAD_ID

    @property
    def max_token_bytes(self) -> int:
        return 1  # specials are never parsed out of text

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes of `text`, after <bos> when `add_special_tokens`."""
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Bytes decoded with errors='replace'; specials render as <bos>/<eos>/<pad> unless skipped.

        Skipped ids (specials, ids >= 259) do not split the bytes around them, so a character
        whose bytes straddle one still decodes whole.
        """
        out: list[str] = []
        buf = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                buf.append(i)
            elif not 0 <= i < self._vocab_size:
                raise ValueError(
                    f"token id {i} is outside ByteTokenizer vocab [0, {self._vocab_size})")
            elif i in _SPECIAL_TEXT and not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(_SPECIAL_TEXT[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)
