"""What a request with a shape that has no compiled program costs: waiting for its compilation,
running trimmed to the first programs, or running padded up to a larger ready program.

    python tools/bench_cold_shapes.py [--prompt-tokens 200] [--batch 4]

On the embedded default model (colocated, TP 1, chunk 256, `configs/local.yaml`'s pool), each
case builds a fresh engine, makes the named programs ready, then times `--batch` concurrent
requests of `--prompt-tokens` tokens and 16 output tokens from submission to the first token of
every request (TTFT, the engine's own clock) and to the end:
- `wait`: nothing but the first programs ready, compile on demand (`--precompile off`);
- `trim`: the first programs only, every step fitted to them (what a worker serves with while
  its background compiles run);
- `pad`: the largest prefill and decode programs ready (batch 16, chunk 256; decode 64), every
  step padded up to them;
- `exact`: the programs the requests want ready (the steady state).
Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import numpy as np

    from jaxpd import compile_cache
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model

    compile_cache.enable("off")
    model = load_model()
    deployment = parse_config({"kv": {"page_size": 16, "num_pages": 512},
                               "scheduler": {"chunk_size": 256, "max_decode_batch": 64}})
    rng = np.random.default_rng(0)

    def requests(tag):
        return [Request(f"{tag}{i}", tuple(int(t) for t in rng.integers(3, 4000, args.prompt_tokens)),
                        SamplingParams(max_tokens=16, ignore_eos=True)) for i in range(args.batch)]

    def timed(engine, reqs):
        for r in reqs:
            engine.add_request(r)
        start, first = time.perf_counter(), {}
        while engine.has_work():
            for out in engine.step():
                first.setdefault(out.id, time.perf_counter() - start)
        return max(first.values()), time.perf_counter() - start

    for case in ("wait", "trim", "pad", "exact"):
        results = []
        for _ in range(args.repeats):
            engine = build_engine(model.config, model.params, deployment)
            runner = engine.prefill.runner
            if case == "exact":  # the wanted shapes: run once to compile them, then time
                timed(engine, requests("warm"))
            else:
                first = [engine.prefill.shapes()[0], engine.decode.shapes()[0]]
                largest = [engine.prefill.shapes()[-1], engine.decode.shapes()[-1]]
                runner.programs.compile_all(largest if case == "pad" else first)
                runner.compile_on_demand = case == "wait"
            programs = len(runner.programs)
            ttft, total = timed(engine, requests(case))
            results.append({"ttft_s": ttft, "total_s": total,
                            "compiled_on_request_path": len(runner.programs) - programs})
        # `wait` counts its first run only: later ones may find the programs in JAX's memory
        best = results[0] if case == "wait" else min(results, key=lambda r: r["total_s"])
        print(json.dumps({"case": case, "prompt_tokens": args.prompt_tokens, "batch": args.batch,
                          **{k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()}}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
