#!/usr/bin/env python3
"""How much a narrower KV cache changes a model's predictions, and what it saves.

For each checkpoint: prompts (the checkpoint's tokenizer on a fixed passage, else seeded random
ids) are continued greedily at full precision; then the whole sequence is run again
teacher-forced (the full-precision tokens fed in) with attention over K/V as a pool of each
`--kv-dtype` stores them (`jaxpd.model.forward.prefill(kv_dtype=...)`: stored, read back). At
every position of the continuation it compares the top-1 token with full precision's and the
logits' error. Bytes per token are those of the pool (all layers, K and V, model KV heads;
int8 rows include their 4-byte scales).

    python tools/kv_accuracy.py [--checkpoint DIR ...] [--kv-dtype float8_e4m3fn ...]
                                [--prompts 8] [--prompt-tokens 48] [--tokens 48]

Prints one JSON object: per checkpoint and dtype, `top1_agreement`, `mean_abs_logit_error`,
`max_abs_logit_error` (both relative to the logits' standard deviation too) and
`bytes_per_token`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PASSAGE = ("It is a truth universally acknowledged, that a single man in possession of a good "
           "fortune, must be in want of a wife. However little known the feelings or views of "
           "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
           "in the minds of the surrounding families, that he is considered the rightful "
           "property of some one or other of their daughters.")


def measure(folder: str | None, kv_dtypes: list[str], *, prompts: int, prompt_tokens: int,
            tokens: int, seed: int = 0) -> dict:
    """{dtype: figures} for one checkpoint (None: the embedded default model)."""
    import jax.numpy as jnp

    from jaxpd.kv.dtypes import HOST_DTYPES, row_width
    from jaxpd.model.checkpoint import load_model
    from jaxpd.model.forward import prefill
    from jaxpd.tokenizer import tokenizer_for_checkpoint

    model = load_model(folder)
    config = model.config
    rng = np.random.default_rng(seed)
    tok = tokenizer_for_checkpoint(model.folder)
    base = list(tok.encode(PASSAGE)) if tok is not None else []
    rows = []
    for i in range(prompts):  # different windows of the passage, or random ids
        if len(base) > prompt_tokens:
            start = int(rng.integers(0, len(base) - prompt_tokens))
            rows.append(base[start:start + prompt_tokens])
        else:
            rows.append(rng.integers(3, config.vocab_size, prompt_tokens).tolist())
    seqs = np.zeros((prompts, prompt_tokens + tokens), np.int32)
    seqs[:, :prompt_tokens] = rows
    for n in range(prompt_tokens, prompt_tokens + tokens):  # greedy, at full precision
        lengths = jnp.full((prompts,), n, jnp.int32)  # one width: one compiled program
        out = prefill(model.params, jnp.asarray(seqs), lengths, config=config)
        seqs[:, n] = np.asarray(out.logits).argmax(-1)
    lengths = jnp.full((prompts,), seqs.shape[1], jnp.int32)
    window = slice(prompt_tokens - 1, seqs.shape[1] - 1)  # logits that chose the continuation

    def logits(kv_dtype):
        out = prefill(model.params, jnp.asarray(seqs), lengths, config=config, all_logits=True,
                      kv_dtype=kv_dtype)
        return np.asarray(out.logits, np.float32)[:, window]

    full = logits(None)
    spread = float(full.std())
    figures = {"model_dtype": config.dtype, "positions": int(full.shape[0] * full.shape[1])}
    for name in kv_dtypes:
        got = logits(name)
        err = np.abs(got - full)
        figures[name] = {
            "top1_agreement": float((got.argmax(-1) == full.argmax(-1)).mean()),
            "mean_abs_logit_error": float(err.mean()),
            "max_abs_logit_error": float(err.max()),
            "mean_error_over_logit_std": float(err.mean() / spread),
            "bytes_per_token": 2 * config.num_layers * config.num_kv_heads
                               * row_width(name, config.head_dim) * HOST_DTYPES[name].itemsize,
        }
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="HF or orbax checkpoint folder (repeatable; default: the embedded "
                             "model)")
    parser.add_argument("--kv-dtype", action="append", default=None,
                        help="KV dtype to compare with full precision (repeatable; default "
                             "bfloat16 and float8_e4m3fn)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=48, help="continuation compared")
    args = parser.parse_args(argv)
    dtypes = args.kv_dtype or ["bfloat16", "float8_e4m3fn"]
    report = {}
    for folder in args.checkpoint or [None]:
        report[folder or "embedded"] = measure(folder, dtypes, prompts=args.prompts,
                                               prompt_tokens=args.prompt_tokens,
                                               tokens=args.tokens)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
