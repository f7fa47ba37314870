"""Prefill engine: admits prompts into its mesh's pages and runs them in chunks.

Each call to `step` runs one batch of chunks (at most `chunk_size` tokens per sequence and
`max_batch_tokens` in all, counted as the step computes them: every row padded to the longest
chunk's bucket, and the rows to the batch bucket); a sequence whose last chunk ran gets its first
token and is returned.
Blocks already in the prefix cache are skipped; full blocks are entered into it as they complete.
"""

from __future__ import annotations

from jaxpd.engine.buckets import DEFAULT_PREFILL_BATCH, bucket_for, pow2_sizes
from jaxpd.engine.programs import StepShape
from jaxpd.engine.request import Sequence
from jaxpd.engine.runner import ModelRunner, Slice
from jaxpd.kv.manager import KVCacheManager


class PrefillEngine:
    def __init__(self, runner: ModelRunner, *, chunk_size: int = 256, max_batch_tokens: int = 2048,
                 batch_sizes: list[int] | None = None, chunk_sizes: list[int] | None = None):
        """`batch_sizes` and `chunk_sizes` are the bucket sizes that get compiled programs
        (default: powers of two up to 16 sequences, and from the runner's smallest chunk to
        `chunk_size`); a step holds at most the largest batch size."""
        chunks = list(chunk_sizes or pow2_sizes(chunk_size, min(runner.min_chunk, chunk_size)))
        if chunks[-1] != chunk_size:
            raise ValueError(f"the largest chunk size {chunks[-1]} must be {chunk_size=}")
        self.runner = runner
        self.manager: KVCacheManager = runner.manager
        self.chunk_size, self.max_batch_tokens = chunk_size, max_batch_tokens
        runner.prefill_batch_sizes = list(batch_sizes or pow2_sizes(DEFAULT_PREFILL_BATCH))
        runner.chunk_sizes = chunks
        self.max_seqs = runner.prefill_batch_sizes[-1]
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

    def shapes(self) -> list[StepShape]:
        """Every program a prefill step can use, likeliest first: one sequence at each chunk
        bucket (short prompts first), then larger batches. The first is what a worker compiles
        before it serves; the rest can come in the background (`ModelRunner.fit` trims a step
        to the ready ones meanwhile). A step whose chunks are all one token pads up to the
        smallest chunk rather than having programs of its own."""
        runner = self.runner
        longest = bucket_for(min(self.chunk_size, self.max_batch_tokens), runner.chunk_sizes)
        return runner.step_shapes(runner.prefill_batch_sizes,
                                  [c for c in runner.chunk_sizes if c <= longest])

    def padded_tokens(self, rows: int, longest: int) -> int:
        """Tokens a step of `rows` chunks, the longest `longest`, computes: its program's
        shape (batch bucket x chunk bucket)."""
        runner = self.runner
        return (bucket_for(rows, runner.prefill_batch_sizes)
                * bucket_for(min(longest, runner.chunk_sizes[-1]), runner.chunk_sizes))

    def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """Run one chunk batch over admitted sequences (in order); return those whose prefill
        completed. A sequence joins the step only while the padded step stays within the
        token budget: a short chunk beside a long one would be computed at the long one's
        length (1,800 tokens and 248 run as 2 x 2,048), so it waits for the next step."""
        slices, budget, longest = [], self.max_batch_tokens, 0
        for seq in seqs[:self.max_seqs]:
            remaining = len(seq.tokens) - seq.num_computed
            length = min(remaining, self.chunk_size, budget)
            if length <= 0:
                break
            if slices and self.padded_tokens(len(slices) + 1, max(longest, length)) > \
                    self.max_batch_tokens:
                break
            slices.append(Slice(seq, seq.num_computed, length))
            budget -= length
            longest = max(longest, length)
        slices = self.runner.fit(slices)
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
