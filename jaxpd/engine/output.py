"""Turns generated token ids into text per request, and applies stop strings.

Stop strings are matched on text, so they live here and not in the engine: when one appears,
the text is cut before it and the caller ends the request (freeing its pages). Text that could
still turn out to be the start of a stop string is held back from the stream.
"""

from __future__ import annotations

from typing import Sequence

from jaxpd.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer, context=prompt_ids)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._streamed = 0
        self.stopped = False
        self.num_tokens = 0

    def push(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Add newly generated tokens; return the text now safe to show."""
        if self.stopped:
            return ""
        for t in token_ids:
            self.num_tokens += 1
            self.text += self._detok.push(t)
            if self._check_stop():
                return self._release(final=True)
        if final:
            self.text += self._detok.flush()
            self._check_stop()
        return self._release(final)

    def _check_stop(self) -> bool:
        if not self._stop:
            return False
        window = self.text[-(self._hold + 64):]
        offset = len(self.text) - len(window)
        hits = [window.find(s) for s in self._stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return False
        self.text = self.text[:offset + min(hits)]
        self.stopped = True
        return True

    def _release(self, final: bool) -> str:
        end = len(self.text) if (final or self.stopped) else max(self._streamed, len(self.text) - self._hold)
        out = self.text[self._streamed:end]
        self._streamed = end
        return out
