#!/usr/bin/env python3
"""Offline batch generation: the fastest path through the engine (no gRPC, every request in flight).

    python tools/batch_generate.py --input prompts.jsonl --output out.jsonl \\
        [--checkpoint DIR] [--config configs/cpu-disaggregated.yaml] [--max-tokens 64]

Same as `jaxpd generate --input ... --output ...`; see `--help` for every option. Input records:
{"id": "a1", "prompt": "text"} or {"id": "a2", "prompt_token_ids": [1, 2]}, optionally with
max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids (added to the model's EOS ids,
which include the tokenizer's), ignore_eos, logprobs. Resumable: rerun the same command after an
interruption and only the missing ids are generated. Bad records (and any that fit no KV page
pool) are reported as `file:LINE: ...` and skipped.
"""

import sys

from jaxpd.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "-h" not in argv and "--help" not in argv and ("--input" not in argv or "--output" not in argv):
        print("usage: batch_generate.py --input IN.jsonl --output OUT.jsonl [jaxpd generate options]",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["generate", *argv]))
