"""TTFT and TPOT of a served deployment beside the in-process engine, on the same requests.

    python tools/bench_serving.py --config configs/local.yaml --requests 16

Both sides get one fixed workload (seeded random prompts of `--prompt-len` tokens, exactly
`--output-len` tokens out, greedy, EOS ignored), all requests at once. Each side runs it
`--warmup` times with other tokens first (compiling the shape buckets) and reports the last run:
- `in_process`: the engine of `jaxpd generate` in this process, on the config's meshes
  (disaggregated: KV moved with device_put), timed from the engine's step outputs;
- `served`: `jaxpd serve --config` (router, workers and KV over gRPC, each its own process),
  timed by the client as vLLM's benchmark does (TTFT from sending to the first token; TPOT =
  (last - first) / (tokens - 1)).
Prints one JSON object: p50/p90/mean of TTFT and TPOT, wall time and output tokens/s per side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def workload(n: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int,
             runs: int):
    """`runs` request lists with the same lengths and different tokens: warm-up runs compile the
    measured run's shapes, and their prompts leave nothing in the prefix cache that the
    measured (last) run could hit."""
    rng = random.Random(seed)
    lengths = [(rng.randint(*prompt), rng.randint(*output)) for _ in range(n)]
    return [[([rng.randrange(2, vocab) for _ in range(p)], o) for p, o in lengths]
            for _ in range(runs)]


def summary(ttft: list[float], tpot: list[float], wall: float, tokens: int) -> dict:
    def stats(xs):
        xs = sorted(xs)
        return {"p50": round(statistics.median(xs), 5), "p90": round(xs[int(0.9 * (len(xs) - 1))], 5),
                "mean": round(statistics.fmean(xs), 5)}
    return {"ttft_s": stats(ttft), "tpot_s": stats(tpot), "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1)}


def run_in_process(deployment, runs) -> dict:
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model

    model = load_model(deployment.model.checkpoint, None, deployment.model.dtype)
    engine = build_engine(model.config, model.params, deployment)

    def once(tag: str, requests) -> dict:
        start = time.perf_counter()
        for i, (prompt, out) in enumerate(requests):
            engine.add_request(Request(f"{tag}{i}", tuple(prompt),
                                       SamplingParams(max_tokens=out, ignore_eos=True)))
        first, last, count = {}, {}, {}
        while engine.has_work():
            for o in engine.step():
                now = time.perf_counter()
                if o.token_ids and o.id not in first:
                    first[o.id] = now
                last[o.id], count[o.id] = now, len(o.token_ids)
        wall = time.perf_counter() - start
        ttft = [first[k] - start for k in first]
        tpot = [(last[k] - first[k]) / (count[k] - 1) for k in first if count[k] > 1]
        return summary(ttft, tpot, wall, sum(count.values()))

    for i, warm in enumerate(runs[:-1]):
        once(f"warm{i}-", warm)
    return once("run", runs[-1])


def run_served(config_path: Path, runs) -> dict:
    import yaml

    from jaxpd.serving.background import ServeProcess
    from jaxpd.serving.client import Client

    cfg = yaml.safe_load(config_path.read_text())
    cfg.setdefault("serving", {}).setdefault("router", {})["port"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # roles set their own
        server = ServeProcess(path, env=env, cwd=REPO)
        address = server.wait_serving(300)
        try:
            with Client(address, timeout=600) as client:
                def once(requests) -> dict:
                    start_t = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
                        done = list(pool.map(lambda r: client.complete(
                            prompt_token_ids=r[0], max_tokens=r[1], ignore_eos=True,
                            temperature=0.0), requests))
                    wall = time.perf_counter() - start_t
                    return summary([d.ttft_s for d in done], [d.tpot_s for d in done if d.tpot_s],
                                   wall, sum(d.usage.completion_tokens for d in done))
                for warm in runs[:-1]:
                    once(warm)
                return once(runs[-1])
        finally:
            server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=_range, default=(64, 256), metavar="LO,HI")
    ap.add_argument("--output-len", type=_range, default=(32, 64), metavar="LO,HI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3,
                    help="warm-up runs before the measured one (served batches vary run to run, "
                         "so several are needed to compile their shapes)")
    ap.add_argument("--skip-in-process", action="store_true")
    args = ap.parse_args()

    from jaxpd.config import load_config
    from jaxpd.model.checkpoint import load_config as load_model_config

    deployment = load_config(args.config)
    vocab = load_model_config(deployment.model.checkpoint).vocab_size
    runs = workload(args.requests, args.prompt_len, args.output_len, vocab, args.seed,
                    args.warmup + 1)
    requests = runs[-1]
    result = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "host": {"nproc": os.cpu_count(), "platform": platform.platform()},
              "config": args.config, "mode": deployment.mode, "requests": len(requests),
              "prompt_tokens": sum(len(p) for p, _ in requests),
              "output_tokens": sum(o for _, o in requests)}
    result["served"] = run_served(Path(args.config), runs)
    if not args.skip_in_process:
        result["in_process"] = run_in_process(deployment, runs)
        s, i = result["served"], result["in_process"]
        result["served_over_in_process"] = {
            "ttft_p50": round(s["ttft_s"]["p50"] / i["ttft_s"]["p50"], 3),
            "tpot_p50": round(s["tpot_s"]["p50"] / i["tpot_s"]["p50"], 3),
            "throughput": round(s["output_tokens_per_s"] / i["output_tokens_per_s"], 3)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
