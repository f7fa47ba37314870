"""Prefill engine: admits prompts into its mesh's pages and runs them in chunks.

Each call to `step` runs one batch of chunks (at most `chunk_size` tokens per sequence and
`max_batch_tokens` in all); a sequence whose last chunk ran gets its first token and is returned.
Blocks already in the prefix cache are skipped; full blocks are entered into it as they complete.
"""

from __future__ import annotations

from jaxpd.engine.buckets import pow2_bucket
from jaxpd.engine.request import Sequence
from jaxpd.engine.runner import ModelRunner, Slice
from jaxpd.kv.manager import KVCacheManager


class PrefillEngine:
    def __init__(self, runner: ModelRunner, *, chunk_size: int = 256, max_batch_tokens: int = 2048,
                 max_seqs: int = 16):
        if chunk_size & (chunk_size - 1):
            raise ValueError(f"{chunk_size=} must be a power of two (it is a shape bucket)")
        self.runner = runner
        self.manager: KVCacheManager = runner.manager
        self.chunk_size, self.max_batch_tokens, self.max_seqs = chunk_size, max_batch_tokens, max_seqs
        self.eos_ids = tuple(runner.config.eos_token_ids)

    def admit(self, seq: Sequence, *, keep_free: int = 0) -> bool:
        """Reserve pages for everything `seq` has so far; False if they don't fit while leaving
        `keep_free` pages (headroom for sequences already decoding on the same pool)."""
        pages = self.manager.allocate_prompt(seq.tokens, keep_free=keep_free)
        if pages is None:
            return False
        seq.pages = pages
        seq.num_computed = pages.num_cached
        seq.prompt_tokens_cached = max(seq.prompt_tokens_cached, pages.num_cached)
        return True

    def precompile(self) -> int:
        """Compile every (batch, chunk) bucket a step can use: batches up to `max_seqs`, chunks
        from the runner's minimum to `chunk_size`, and chunk 1 (a batch whose chunks are all one
        token runs as a decode-shaped step). Returns how many shapes were new."""
        batches = sorted({pow2_bucket(n) for n in range(1, self.max_seqs + 1)})
        longest = min(self.chunk_size, self.max_batch_tokens)
        chunks = sorted({1} | {pow2_bucket(n, self.runner.min_chunk) for n in range(2, longest + 1)})
        return sum(self.runner.precompile(b, c) for b in batches for c in chunks)

    def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """Run one chunk batch over admitted sequences; return those whose prefill completed."""
        slices, budget = [], self.max_batch_tokens
        for seq in seqs[:self.max_seqs]:
            remaining = len(seq.tokens) - seq.num_computed
            length = min(remaining, self.chunk_size, budget)
            if length <= 0:
                break
            slices.append(Slice(seq, seq.num_computed, length))
            budget -= length
        if not slices:
            return []
        tokens, logprobs = self.runner.run(slices)
        done = []
        for s, tok, lp in zip(slices, tokens, logprobs):
            seq = s.seq
            seq.num_computed += s.length
            self.manager.commit_full_blocks(seq.pages, seq.tokens, seq.num_computed)
            if seq.num_computed == len(seq.tokens):
                seq.append(int(tok), float(lp), self.eos_ids)
                done.append(seq)
        return done
