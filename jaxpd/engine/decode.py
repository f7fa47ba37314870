"""Decode engine: one token for every running sequence per step (continuous batching).

Sequences join and leave between steps; the batch is padded to a power-of-two bucket. Before a
step each sequence gets a page for its next token; when the pool is exhausted the newest
sequences are preempted (their pages freed, to be recomputed later), as in vLLM. With a sliding
window, pages that have left every future query's window are freed first.
"""

from __future__ import annotations

from jaxpd.engine.buckets import pow2_bucket
from jaxpd.engine.request import Sequence
from jaxpd.engine.runner import ModelRunner, Slice
from jaxpd.kv.manager import KVCacheManager


class DecodeEngine:
    def __init__(self, runner: ModelRunner, *, max_batch: int = 64):
        self.runner = runner
        self.manager: KVCacheManager = runner.manager
        self.max_batch = max_batch
        self.eos_ids = tuple(runner.config.eos_token_ids)
        self.window = runner.config.sliding_window

    def bucket_shapes(self) -> list[tuple[int, int]]:
        """Every (batch, chunk) bucket a decode step can use: batches up to `max_batch`."""
        return sorted({(pow2_bucket(n), 1) for n in range(1, self.max_batch + 1)})

    def reserve(self, running: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """(this step's batch, preempted): the oldest sequences, each with room for its next
        token, at most `max_batch` of them. When pages run out, the newest sequences give theirs
        back (and will be recomputed later)."""
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
        return ready, preempted

    def step(self, batch: list[Sequence]) -> None:
        """Generate one token for each sequence of `batch` (from `reserve`)."""
        if not batch:
            return
        if len(batch) > self.max_batch:
            raise ValueError(f"{len(batch)} sequences exceed max_batch={self.max_batch}")
        slices = [Slice(seq, seq.num_computed, 1) for seq in batch]
        tokens, logprobs = self.runner.run(slices)
        for seq, tok, lp in zip(batch, tokens, logprobs):
            seq.num_computed += 1
            seq.append(int(tok), float(lp), self.eos_ids)
