"""Decode engine: one token for every running sequence per step (continuous batching).

Sequences join and leave between steps; the batch is padded to a power-of-two bucket. Before a
step each sequence gets a page for its next token; when the pool is exhausted the newest
sequences are preempted (their pages freed, to be recomputed later), as in vLLM.
"""

from __future__ import annotations

from jaxpd.engine.request import Sequence
from jaxpd.engine.runner import ModelRunner, Slice
from jaxpd.kv.manager import KVCacheManager


class DecodeEngine:
    def __init__(self, runner: ModelRunner, *, max_batch: int = 64):
        self.runner = runner
        self.manager: KVCacheManager = runner.manager
        self.max_batch = max_batch
        self.eos_ids = tuple(runner.config.eos_token_ids)

    def reserve(self, running: list[Sequence]) -> list[Sequence]:
        """Give each sequence room for its next token; return the ones preempted to make room."""
        preempted = []
        active = list(running[:self.max_batch])
        i = 0
        while i < len(active):
            seq = active[i]
            if self.manager.ensure_capacity(seq.pages, seq.num_computed + 1):
                i += 1
                continue
            victim = active.pop()  # newest first
            self.manager.release(victim.pages)
            victim.pages, victim.num_computed = None, 0
            preempted.append(victim)
        return preempted

    def step(self, running: list[Sequence]) -> None:
        """Generate one token for each of the first `max_batch` sequences (pages reserved)."""
        batch = running[:self.max_batch]
        if not batch:
            return
        slices = [Slice(seq, seq.num_computed, 1) for seq in batch]
        tokens, logprobs = self.runner.run(slices, batch_bucket_max=None)
        for seq, tok, lp in zip(batch, tokens, logprobs):
            seq.num_computed += 1
            seq.append(int(tok), float(lp), self.eos_ids)
