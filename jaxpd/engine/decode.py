"""Decode engine: new tokens for every running sequence per dispatch (continuous batching).

Sequences join and leave between dispatches; the batch is padded to a power-of-two bucket.
Before a dispatch each sequence gets a page for its next token; when the pool is exhausted the
newest sequences are preempted (their pages freed, to be recomputed later), as in vLLM. With a
sliding window, pages that have left every future query's window are freed first.

With `steps_per_dispatch` k > 1, one call runs up to k decode steps on device
(`multistep.decode_steps`): each sequence also gets pages for up to k tokens where free pages
allow (never preempting for them), and stops on device at its stop ids, its max_tokens or the
end of its pages. k is bucketed to powers of two, so compilations stay bounded. Pages reserved
past where a sequence stopped stay with it for its next dispatch, or go back with the rest of
its pages when it finishes, is aborted or preempted.
"""

from __future__ import annotations

from jaxpd.engine.buckets import pow2_bucket
from jaxpd.engine.request import Sequence
from jaxpd.engine.runner import ModelRunner, Slice
from jaxpd.kv.manager import KVCacheManager


class DecodeEngine:
    def __init__(self, runner: ModelRunner, *, max_batch: int = 64, steps_per_dispatch: int = 8):
        if steps_per_dispatch < 1:
            raise ValueError(f"{steps_per_dispatch=} must be >= 1")
        self.runner = runner
        self.manager: KVCacheManager = runner.manager
        self.max_batch = max_batch
        self.steps_per_dispatch = steps_per_dispatch
        self.eos_ids = tuple(runner.config.eos_token_ids)
        self.window = runner.config.sliding_window

    def precompile(self) -> int:
        """Compile every decode program shape this engine can use: one step and each bucketed
        number of steps, for every batch bucket up to `max_batch`. Returns how many were new."""
        batches = sorted({pow2_bucket(n) for n in range(1, self.max_batch + 1)})
        steps = sorted({pow2_bucket(n) for n in range(2, self.steps_per_dispatch + 1)})
        return sum(self.runner.precompile(b, 1) for b in batches) + \
            sum(self.runner.precompile_steps(b, k) for b in batches for k in steps)

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
            if self.manager.ensure_capacity(seq.pages, seq.num_computed + 1):
                ready.append(seq)
                i += 1
                continue
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
        want = seq.num_computed + min(self.steps_per_dispatch, seq.remaining)
        fits = (len(seq.pages.pages) + self.manager.allocator.num_free) * self.manager.page_size
        self.manager.ensure_capacity(seq.pages, min(want, fits))

    def _budget(self, seq: Sequence) -> int:
        """Tokens `seq` may draw this dispatch: up to k, its max_tokens and its pages."""
        room = len(seq.pages.pages) * self.manager.page_size - seq.num_computed
        return min(self.steps_per_dispatch, seq.remaining, room)

    def step(self, batch: list[Sequence]) -> None:
        """Generate up to `steps_per_dispatch` tokens for each sequence of `batch` (from
        `reserve`), one dispatch; a sequence that finishes has `finish_reason` set."""
        if not batch:
            return
        if len(batch) > self.max_batch:
            raise ValueError(f"{len(batch)} sequences exceed max_batch={self.max_batch}")
        budgets = [self._budget(seq) for seq in batch]
        num_steps = pow2_bucket(max(budgets), 1, self.steps_per_dispatch)
        if num_steps == 1:
            self._step_once(batch)
            return
        tokens, logprobs, valid = self.runner.run_steps(batch, budgets, num_steps, self.eos_ids)
        for seq, toks, lps, n in zip(batch, tokens, logprobs, valid):
            for tok, lp in zip(toks[:n], lps[:n]):
                assert seq.finish_reason is None, f"{seq.id}: tokens drawn after it finished"
                seq.num_computed += 1
                seq.append(int(tok), float(lp), self.eos_ids)

    def _step_once(self, batch: list[Sequence]) -> None:
        """One token per sequence through the single-step program."""
        slices = [Slice(seq, seq.num_computed, 1) for seq in batch]
        tokens, logprobs = self.runner.run(slices)
        for seq, tok, lp in zip(batch, tokens, logprobs):
            seq.num_computed += 1
            seq.append(int(tok), float(lp), self.eos_ids)
