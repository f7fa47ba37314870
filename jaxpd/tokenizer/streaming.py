"""Turn a stream of generated token ids into a stream of text, one `push` per token.

Decoding each token on its own is wrong twice over: a byte-level token may hold part of a
multi-byte character, and SentencePiece-style decoders drop the leading space of whatever token
comes first, so "▁world" decoded alone loses its space. Decoding the whole sequence each step is
right but O(n) per token. The prefix/read-offset technique (vLLM, HF TextStreamer) decodes only a
short window: the tokens of the previous emission (context, already shown) plus the new ones, and
emits the text beyond what was already emitted from that window.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxpd.tokenizer.base import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens kept as decoding context, as in vLLM
MAX_WINDOW = 128  # past this many tokens the window is cut regardless (bounds cost per token)
_TRIM_AT = 64  # drop ids before the window once this many pile up (amortised O(1))


class IncrementalDetokenizer:
    """Text of one sequence's tokens, released as soon as it is final.

    Text that ends in U+FFFD may be a character whose remaining bytes are still to come, so it
    is held until a later token completes it or `flush` is called. `"".join(pushes) + flush()`
    equals `tokenizer.decode(all_ids)` for byte-level and SentencePiece-style decoders.

    `context` (e.g. the prompt ids) is decoded for context only, never emitted, so the first
    generated token gets the leading space it would have in the full text. It should end at a
    character boundary, which any prompt produced by `encode` does.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True,
                 context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(i) for i in list(context)[-CONTEXT_TOKENS:]]
        self._prefix = 0  # window start: ids[prefix:read] are emitted, kept only as context
        self._read = len(self._ids)  # ids[read:] are not fully emitted yet
        self._text = self._decode(self._ids)  # decode(ids[prefix:]) as of the last push
        self._emitted = len(self._text)  # chars of self._text already returned (or context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Append one token; return the text it completes (often '', never a partial character)."""
        tid = int(token_id)
        self._ids.append(tid)
        text = self._decode(self._ids[self._prefix:])
        if text == self._text and text and self._decode([tid]) == "":
            # Invisible (a skipped special, an unused id): forget it so runs of them cannot grow
            # the window. Kept while the window text is empty: a lone "▁" also decodes to ""
            # there, yet it decides whether the next word gets a space.
            self._ids.pop()
            return ""
        self._text = text
        complete = not text.endswith(REPLACEMENT)
        stable = len(text) if complete else len(text.rstrip(REPLACEMENT))
        out = text[self._emitted:stable]
        self._emitted = max(self._emitted, stable)
        if len(self._ids) - self._prefix > MAX_WINDOW:
            return out + self.flush()  # only garbage streams get here (endless invalid bytes)
        if complete and out:
            # Only after visible output: a window that decodes to "" would make a
            # SentencePiece decoder strip the next token's leading space.
            self._advance()
        return out

    def flush(self) -> str:
        """Return whatever is still held (an incomplete character comes out as U+FFFD)."""
        out = self._text[self._emitted:]
        self._emitted = len(self._text)
        if out or len(self._ids) - self._prefix > MAX_WINDOW:
            self._advance()
        return out

    def _advance(self) -> None:
        """Everything decoded is emitted: the unread tokens become the next window's context."""
        if self._read < len(self._ids):
            self._prefix, self._read = self._read, len(self._ids)
            if self._prefix >= _TRIM_AT:
                del self._ids[:self._prefix]
                self._read -= self._prefix
                self._prefix = 0
        self._text = self._decode(self._ids[self._prefix:])
        self._emitted = len(self._text)
