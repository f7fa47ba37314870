"""Decode engine: new tokens for every running sequence per dispatch (continuous batching).

Sequences join and leave between dispatches; the batch is padded to a power-of-two bucket.
Before a dispatch each sequence gets a page for its next token; when the pool is exhausted the
newest sequences are preempted (their pages freed, to be recomputed later), as in vLLM. With a
sliding window, pages that have left every future query's window are freed first.

With `steps_per_dispatch` k > 1, one call runs up to k decode steps on device
(`multistep.decode_steps`): each sequence also gets pages for up to k tokens where free pages
allow (never preempting for them), and stops on device at its stop ids, its max_tokens or the
end of its pages. Every call is compiled for k steps and ends early once every row has used
its budget, so there is one program per batch bucket. Pages reserved
past where a sequence stopped stay with it for its next dispatch, or go back with the rest of
its pages when it finishes, is aborted or preempted.

With `overlap`, a call is dispatched before the previous call's tokens reach the host (the
overlap schedulers of vLLM v1 and SGLang): the host prepares call N+1 while the device runs
call N. Call N+1 starts each sequence where it will be once call N is collected (a call that
does not end a sequence runs its whole budget, so that position is known), takes its input
token from call N's results on device, and draws nothing for a sequence call N ended on a stop
id. Stop checks on the host (stop strings, aborts) run one call behind; the extra call's tokens
for a sequence that ended are dropped, and its pages were already given back (the device runs
calls in order, so a page's next owner writes it only after). Preempting needs every call
collected first, so `reserve` raises `CollectFirst` when it would preempt with calls pending.

Until a program for the batch's bucket is compiled (a serving worker compiles them in the
background; `ModelRunner.decode_rows`), a dispatch runs as many sequences as a compiled program
holds, and the sequences take turns from one dispatch to the next.
"""

from __future__ import annotations

import collections

from jaxpd.engine.buckets import pow2_sizes
from jaxpd.engine.programs import StepShape
from jaxpd.engine.request import Sequence
from jaxpd.engine.runner import LaunchedSteps, ModelRunner, Slice
from jaxpd.kv.manager import KVCacheManager


class CollectFirst(Exception):
    """`reserve` would preempt a sequence while decode calls are in flight: collect them (the
    sequence's pages must not be reused with its tokens still coming), then reserve again."""


class DecodeEngine:
    def __init__(self, runner: ModelRunner, *, max_batch: int = 64, steps_per_dispatch: int = 8,
                 overlap: bool = False, batch_sizes: list[int] | None = None):
        """`batch_sizes`: the decode batch buckets that get compiled programs (default: powers of
        two up to `max_batch`)."""
        if steps_per_dispatch < 1:
            raise ValueError(f"{steps_per_dispatch=} must be >= 1")
        self.overlap = overlap
        self.pending: collections.deque[LaunchedSteps] = collections.deque()
        self._stepped: list[Sequence] = []  # updated by a single-step call, for `collect`
        self._turn = 0  # where the next trimmed dispatch starts (rows take turns)
        self.runner = runner
        self.manager: KVCacheManager = runner.manager
        self.max_batch = max_batch
        runner.decode_batch_sizes = list(batch_sizes or pow2_sizes(max_batch))
        if runner.decode_batch_sizes[-1] < max_batch:
            raise ValueError(f"the largest decode batch size {runner.decode_batch_sizes[-1]} "
                             f"must hold {max_batch=}")
        self.steps_per_dispatch = steps_per_dispatch
        self.eos_ids = tuple(runner.config.eos_token_ids)
        self.window = runner.config.sliding_window

    def shapes(self) -> list[StepShape]:
        """Every program a decode dispatch can use, likeliest first (small batches first: a
        service starts with few requests). Until a batch's program is ready, a dispatch runs as
        many sequences as the widest ready one holds (`ModelRunner.decode_rows`)."""
        batches = self.runner.decode_batch_sizes
        if self._single_step:
            return self.runner.step_shapes(batches, [1])
        return self.runner.decode_shapes(batches, self.steps_per_dispatch)

    @property
    def _single_step(self) -> bool:
        """One token per call through the single-step program (k = 1, no overlap)."""
        return self.steps_per_dispatch == 1 and not self.overlap

    def reserve(self, running: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """(this dispatch's batch, preempted): the oldest sequences, each with room for its next
        token (and for up to `steps_per_dispatch` tokens where free pages allow), at most
        `max_batch` of them. When pages run out, the newest sequences give theirs back (and
        will be recomputed later)."""
        order, ready, preempted = list(running), [], []
        i = 0
        if self.window is not None:  # pages every future query's window has passed go back
            for seq in order:
                self.manager.drop_outside_window(seq.pages, seq.num_computed, self.window)
        while i < len(order) and len(ready) < self.max_batch:
            seq = order[i]
            if self.manager.ensure_capacity(seq.pages, seq.expected_computed + 1):
                ready.append(seq)
                i += 1
                continue
            if self.pending:
                raise CollectFirst()
            victim = order.pop()  # the newest; may be `seq` itself, never one already ready
            self.manager.release(victim.pages)
            victim.pages, victim.num_computed = None, 0
            preempted.append(victim)
        for seq in ready:
            self._look_ahead(seq)
        return ready, preempted

    def _look_ahead(self, seq: Sequence) -> None:
        """Grow `seq`'s pages towards the tokens one dispatch may draw, as far as free pages
        go: the next token's page is already there, so this never preempts anyone."""
        at = seq.expected_computed
        want = at + min(self.steps_per_dispatch, seq.remaining - seq.in_flight)
        fits = (len(seq.pages.pages) + self.manager.allocator.num_free) * self.manager.page_size
        self.manager.ensure_capacity(seq.pages, max(at + 1, min(want, fits)))

    def _budget(self, seq: Sequence) -> int:
        """Tokens `seq` may draw this dispatch: up to k, its max_tokens and its pages (0 when
        the calls in flight use up its max_tokens)."""
        at = seq.expected_computed
        room = len(seq.pages.pages) * self.manager.page_size - at
        return max(0, min(self.steps_per_dispatch, seq.remaining - seq.in_flight, room))

    def step(self, batch: list[Sequence]) -> None:
        """Generate up to `steps_per_dispatch` tokens for each sequence of `batch` (from
        `reserve`), one dispatch, and collect it; a sequence that finishes has
        `finish_reason` set."""
        self.dispatch(batch)
        self.collect(keep=0)

    def dispatch(self, batch: list[Sequence], max_steps: int | None = None) -> bool:
        """Start one decode call for `batch` (from `reserve`); without `overlap`, a one-step
        call runs the single-step program and is collected at once. `max_steps` caps every
        row's budget (the same program runs; its loop just ends sooner). Sequences whose
        remaining tokens are all in flight sit this call out. Returns whether a call was
        started."""
        if len(batch) > self.max_batch:
            raise ValueError(f"{len(batch)} sequences exceed max_batch={self.max_batch}")
        cap = self.steps_per_dispatch if max_steps is None else max_steps
        budgets = [min(self._budget(seq), cap) for seq in batch]
        batch = [seq for seq, n in zip(batch, budgets) if n > 0]
        budgets = [n for n in budgets if n > 0]
        if not batch:
            return False
        if self._single_step:
            slices = [Slice(seq, seq.num_computed, 1) for seq in batch]
            rows = len(self.runner.fit(slices, decode=True))
        else:
            rows = self.runner.decode_rows(batch, self.steps_per_dispatch, self.eos_ids)
        if rows < len(batch):  # no ready program holds them all yet: they take turns
            start, self._turn = self._turn % len(batch), self._turn + rows
            chosen = sorted((start + i) % len(batch) for i in range(rows))
            batch, budgets = [batch[i] for i in chosen], [budgets[i] for i in chosen]
        if self._single_step:
            self._step_once(batch)
            return True
        # always k steps: the loop ends once every row has used its budget, so one program per
        # batch bucket serves every budget, and a smaller k would buy nothing but compilations
        previous = self.pending[-1] if self.pending else None
        launched = self.runner.launch_steps(batch, budgets, self.steps_per_dispatch,
                                            self.eos_ids, previous)
        for seq, n in zip(batch, budgets):
            seq.in_flight += n
        self.pending.append(launched)
        return True

    def collect(self, keep: int = 0) -> list[Sequence]:
        """Fetch calls in flight, oldest first, until `keep` remain, and give their tokens to
        their sequences (not to those that ended meanwhile). Returns the sequences that got
        tokens, in order."""
        updated: dict[int, Sequence] = {id(seq): seq for seq in self._stepped}
        self._stepped = []
        while len(self.pending) > keep:
            launched = self.pending.popleft()
            tokens, logprobs, valid = self.runner.collect_steps(launched)
            for seq, budget, toks, lps, n in zip(launched.seqs, launched.budgets, tokens,
                                                   logprobs, valid):
                seq.in_flight -= budget
                if seq.finish_reason is not None or seq.pages is None:
                    continue  # ended (stop string, abort) while this call ran
                for tok, lp in zip(toks[:n], lps[:n]):
                    seq.num_computed += 1
                    seq.append(int(tok), float(lp), self.eos_ids)
                    if seq.finish_reason is not None:
                        break
                updated[id(seq)] = seq
        return list(updated.values())

    def discard_pending(self) -> None:
        """Drop calls in flight whose sequences have all ended (nothing waits for them)."""
        for launched in self.pending:
            for seq, budget in zip(launched.seqs, launched.budgets):
                seq.in_flight -= budget
        self.pending.clear()

    def _step_once(self, batch: list[Sequence]) -> None:
        """One token per sequence through the single-step program, collected at once."""
        slices = [Slice(seq, seq.num_computed, 1) for seq in batch]
        tokens, logprobs = self.runner.run(slices, decode=True)
        for s, tok, lp in zip(slices, tokens, logprobs):
            s.seq.num_computed += 1
            s.seq.append(int(tok), float(lp), self.eos_ids)
            self._stepped.append(s.seq)
