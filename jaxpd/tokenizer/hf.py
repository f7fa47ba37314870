"""A Hugging Face `tokenizer.json` behind the `Tokenizer` interface, via the `tokenizers` package.

Only the fast-tokenizer file is read, so no `transformers` dependency. The one piece of
`transformers` behaviour reproduced is Llama's `add_bos_token`: older Llama/Mistral folders
leave BOS to the Python tokenizer class rather than the tokenizer.json post-processor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from jaxpd.errors import ConfigError
from jaxpd.tokenizer.base import Tokenizer
from jaxpd.tokenizer.specials import read_special_tokens

TOKENIZER_FILE = "tokenizer.json"


class HFTokenizer(Tokenizer):
    """`tokenizer.json` plus the special ids declared by its sibling config files.

    `path` is a model folder holding `tokenizer.json`, or that file itself.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no {TOKENIZER_FILE} at {file}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ConfigError(f"cannot load {file}: {e}") from e
        # Some tokenizer.json files ship with truncation/padding on; serving wants neither.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.path = file
        specials = read_special_tokens(file.parent, self._tok.token_to_id)
        self._bos = specials.bos_token_id
        self._eos = specials.eos_token_ids
        self._pad = specials.pad_token_id
        self._template_adds_bos = self._bos is not None and self._post_processor_adds_bos()
        # Prepend BOS ourselves only when the config asks for it and the template would not.
        self._prepend_bos = (bool(specials.add_bos) and self._bos is not None
                             and not self._template_adds_bos)

    def _post_processor_adds_bos(self) -> bool:
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        without = self._tok.encode("a", add_special_tokens=False).ids
        return with_specials[:1] == [self._bos] and without[:1] != [self._bos]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest vocabulary entry in UTF-8 bytes (byte-level and SentencePiece spellings
        are at least as long as the text they stand for, so this bounds it from above)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max((len(t.encode("utf-8")) for t in vocab), default=1)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry (e.g. a stop token named in a request), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; with `add_special_tokens` they start with one BOS if the model uses BOS.

        A text that already begins with the literal BOS token (a rendered chat template) does not
        get a second one, whether BOS comes from the post-processor or from `add_bos_token`.
        """
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._bos is not None:
            if self._prepend_bos and ids[:1] != [self._bos]:
                ids.insert(0, self._bos)
            elif self._template_adds_bos and ids[:2] == [self._bos, self._bos]:
                del ids[0]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids past the vocabulary decode to nothing (as in `tokenizers`)."""
        try:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        except OverflowError as e:  # a negative id (or one past u32) reaching the Rust side
            raise ValueError(f"token ids must be in [0, 2**32): {e}") from e
