#!/usr/bin/env python3
"""The Hugging Face side of tools/bench_vs_hf.py: transformers `generate` on CPU, as its users run it.

Runs under the tool venv (torch + transformers), never imports jaxpd. Reads a workload JSON
({"latency": {...}, "offline": {...}}), prints one JSON object of timings.

    .toolvenv/bin/python tools/hf_reference_generate.py --checkpoint DIR --workload w.json
"""

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def generate(model, batch_ids, new_tokens):
    """Left-padded batch, greedy, exactly `new_tokens` tokens (EOS never stops it)."""
    width = max(len(p) for p in batch_ids)
    ids = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    work = json.load(open(args.workload))
    result = {"torch": torch.__version__, "threads": args.threads}

    lat = work["latency"]
    generate(model, [lat["prompt"][:16]], 4)  # warm-up
    t = time.perf_counter()
    out = generate(model, [lat["prompt"]], lat["max_tokens"])
    elapsed = time.perf_counter() - t
    result["latency"] = {"seconds": elapsed, "output_tokens": lat["max_tokens"],
                         "tokens_per_s": lat["max_tokens"] / elapsed, "token_ids": out[0]}

    off = work["offline"]
    size = off["batch_size"]
    prompts, outs = off["prompts"], off["max_tokens"]
    t = time.perf_counter()
    first_tokens = []
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        longest = max(outs[start:start + size])
        result_ids = generate(model, batch, longest)
        first_tokens += [r[:4] for r in result_ids]
        print(f"hf offline batch {start // size + 1}/{-(-len(prompts) // size)} "
              f"({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t
    useful = sum(outs)
    result["offline"] = {"seconds": elapsed, "output_tokens": useful,
                         "tokens_per_s": useful / elapsed, "first_tokens": first_tokens}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
