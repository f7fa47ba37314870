"""Turns generated token ids into text per request, and applies stop strings.

Stop strings are matched on text, so they live here and not in the engine: when one appears,
the text is cut before it and the caller ends the request (freeing its pages). Text that could
still turn out to be the start of a stop string is held back from the stream.

`TextStream` works on token deltas alone (a router receiving tokens from another process uses
it directly); `drive_engine` is the one loop that feeds an in-process `Engine`'s outputs through
the streams, for `jaxpd generate` and batch mode alike.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from jaxpd.engine.request import RequestOutput
from jaxpd.errors import CapacityError
from jaxpd.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from jaxpd.engine.orchestrator import Engine


class TextStream:
    """One request's text: detokenized incrementally, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer, context=prompt_ids)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._streamed = 0  # chars of `text` already returned by `push`
        self._searched = 0  # chars of `text` already searched for stop strings
        self.stopped = False
        self.matched_stop: str | None = None  # the stop string that ended the text, if one did
        self.num_tokens = 0  # tokens consumed; after a stop, the one that completed the match

    def push(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Add newly generated tokens; return the text now safe to show.

        Once a stop string matched, the rest of `token_ids` (and later pushes) are ignored.
        """
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
        """Search only the new text (plus a stop string's length of overlap): O(new) per token."""
        if not self._stop:
            return False
        start = max(0, self._searched - self._hold)
        self._searched = len(self.text)
        hits = [(pos, i) for i, s in enumerate(self._stop) if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        pos, i = min(hits)  # earliest match; on a tie, the first listed stop string
        self.text = self.text[:pos]
        self.matched_stop = self._stop[i]
        self.stopped = True
        return True

    def _release(self, final: bool) -> str:
        end = len(self.text) if (final or self.stopped) else max(self._streamed, len(self.text) - self._hold)
        out = self.text[self._streamed:end]
        self._streamed = end
        return out


OnOutput = Callable[[RequestOutput, "TextStream | None", str], None]
OnCapacityError = Callable[[str, CapacityError], None]


def drive_engine(engine: Engine, streams: Mapping[str, TextStream], on_output: OnOutput, *,
                 on_capacity_error: OnCapacityError | None = None) -> None:
    """Step `engine` until it has no work, calling `on_output(output, stream, new_text)` for
    every request that changed (`stream` is None for requests without one).

    A stop string ends its request here: the engine aborts it with reason "stop" (freeing its
    pages) and the output's tokens end at the one that completed the match. A `CapacityError`
    (a request that fits no page pool) propagates, unless `on_capacity_error` is given: then
    that request is dropped, the callback told, and the others go on.
    """
    seen: dict[str, int] = {}
    while engine.has_work():
        try:
            outputs = engine.step()
        except CapacityError as e:
            if on_capacity_error is None or e.request_id is None:
                raise
            engine.abort(e.request_id)
            on_capacity_error(e.request_id, e)
            continue
        for o in outputs:
            new = o.token_ids[seen.get(o.id, 0):]
            seen[o.id] = len(o.token_ids)
            o, text = _apply_stream(engine, o, new, streams.get(o.id))
            if o.finished:
                seen.pop(o.id, None)
            on_output(o, streams.get(o.id), text)


def _apply_stream(engine: Engine, o: RequestOutput, new: Sequence[int],
                  stream: TextStream | None) -> tuple[RequestOutput, str]:
    """Push `new` tokens through the stream; end the request if a stop string matched."""
    if stream is None:
        return o, ""
    was_stopped = stream.stopped
    text = stream.push(new, final=o.finished)
    if not stream.stopped or was_stopped:
        return o, text
    if not o.finished:
        o = engine.abort(o.id, reason="stop") or o
    return _cut_at_stop(o, stream.num_tokens), text


def _cut_at_stop(o: RequestOutput, num_tokens: int) -> RequestOutput:
    """The output as a stop string ended it: tokens up to the match, reason "stop"."""
    return dataclasses.replace(
        o, token_ids=o.token_ids[:num_tokens], finish_reason="stop", matched_token_id=None,
        logprobs=None if o.logprobs is None else o.logprobs[:num_tokens])
