"""TTFT and TPOT of a served deployment beside the in-process engine, on the same requests.

    python tools/bench_serving.py --config configs/local.yaml --requests 16

Both sides get one fixed workload (seeded random prompts of `--prompt-len` tokens, exactly
`--output-len` tokens out, greedy, EOS ignored), all requests at once. Each side runs it
`--warmup` times with other tokens first (compiling the shape buckets) and reports the last run:
- `in_process`: the engine of `jaxpd generate` in this process, on the config's meshes
  (disaggregated: KV moved with device_put), timed from the engine's step outputs;
- `served`: `jaxpd serve --config` (router, workers and KV over gRPC, each its own process),
  measured once every worker has compiled all its step programs (the steady state), timed by
  the client as vLLM's benchmark does (TTFT from sending to the first token; TPOT =
  (last - first) / (tokens - 1)).
Prints one JSON object: p50/p90/mean of TTFT and TPOT, wall time and output tokens/s per side.

    python tools/bench_serving.py --workload chatbot --rate 2 --requests 32 --simulate

`--workload chatbot|code|summarization|FILE` takes the lengths and arrival times (`--rate`
requests/s, Poisson) from the placer's workload generator instead (lengths clipped to the
model's context); each request is sent at its arrival time and TTFT counts from it. With
`--simulate`, the placer's simulator replays the same requests on the same deployment with the
cost model calibrated from `--profile`, so predicted and measured figures sit side by side.

    python tools/bench_serving.py --backend openai                      # jaxpd's HTTP API
    python tools/bench_serving.py --backend openai --base-url http://host:8000/v1 --model NAME

`--backend openai` sends the same requests to an OpenAI-compatible server's streaming
`/v1/completions` (token-id prompts, `ignore_eos`, `stream_options.include_usage`): jaxpd's own
HTTP API (started from `--config` with `serving.http` on), or, with `--base-url`, any running
server (vLLM, SGLang, TGI...; `--api-key` if it wants one), so servers compare by one tool with
the same definitions: TTFT from sending to the first streamed text, TPOT = (last - first) /
(tokens - 1), and ITL, the gaps between streamed chunks (each chunk counted as one token, as
vLLM's benchmark counts them).

    python tools/bench_serving.py --conversations 8 --turns 3,6 [--reuse both]

`--conversations N` is a multi-turn chat workload (generated locally, seeded): each
conversation has 3 to 6 turns (`--turns`); turn 1 is a prompt of `--prompt-len` tokens, and
each later turn sends the whole history (every earlier prompt and the reply the server gave)
plus `--new-len` new tokens, as a chat client does. Conversations run concurrently, turns in
order. It runs on the served deployment with prefix reuse on (prefix caching, and
`serving.local_prefill_max_tokens` at `--local-prefill` so a short new turn is prefilled where
the conversation's KV is) and off (prefix caching off), and reports TTFT of first and later
turns and the prompt tokens served from cache (`usage.cached_tokens`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
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
    return [[([rng.randrange(2, vocab) for _ in range(p)], o, 0.0) for p, o in lengths]
            for _ in range(runs)]


def generated_workload(kind: str, rate: float, n: int, max_context: int, vocab: int, seed: int,
                       runs: int):
    """Requests of the placer's workload generator: (prompt ids, output tokens, arrival s),
    lengths clipped so prompt + output fit in `max_context`. Warm-up runs share the lengths
    (so their shapes compile) but not the tokens."""
    from jaxpd.placement.place import Workload

    source = Workload.from_trace(kind) if Path(kind).is_file() else Workload(kind)
    rng = random.Random(seed)
    shaped = []
    for r in source.requests(rate, n, seed):
        out = max(1, min(r.output_tokens, max_context // 4))
        shaped.append((max(1, min(r.prompt_tokens, max_context - out - 1)), out, r.arrival_s))
    return [[([rng.randrange(2, vocab) for _ in range(p)], o, t) for p, o, t in shaped]
            for _ in range(runs)]


def simulated(deployment, model_cfg, profiles: list[str], requests, kv_link: float) -> dict:
    """The simulator's TTFT/TPOT for these requests on this deployment, built as `jaxpd
    simulate` builds it (router limits, chunked prefill, the request path), each group priced
    by the profile taken at its TP."""
    from jaxpd.placement.place_cli import DEFAULT_PROFILES
    from jaxpd.placement.simulate_cli import sim_of_config
    from jaxpd.placement.simulator import simulate
    from jaxpd.placement.workload import SimRequest

    dep = sim_of_config(deployment, model_cfg, profiles=str(DEFAULT_PROFILES), profile=profiles,
                        kv_link=kv_link)
    reqs = [SimRequest(t, len(p), o) for p, o, t in requests]
    res = simulate(dep, reqs)
    tokens = sum(o for _, o, _ in requests)
    wall = float(res.finish_s.max() - min(r.arrival_s for r in reqs))
    return {**summary(list(res.ttft_s), [x for x, (_, o, _) in zip(res.tpot_s, requests) if o > 1],
                      wall, tokens), "profiles": profiles, "kv_link_bytes_per_s": kv_link,
            "request_path_s": dep.request_path_s}


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

    model = load_model(deployment.model.checkpoint, None, deployment.model.dtype,
                       weight_dtype=deployment.model.weight_dtype)
    engine = build_engine(model.config, model.params, deployment)

    def once(tag: str, requests) -> dict:
        start = time.perf_counter()
        pending = sorted(enumerate(requests), key=lambda item: item[1][2])
        sent: dict[str, float] = {}
        first, last, count = {}, {}, {}
        while pending or engine.has_work():
            now = time.perf_counter() - start
            while pending and pending[0][1][2] <= now:  # arrived: hand it to the engine
                i, (prompt, out, at) = pending.pop(0)
                sent[f"{tag}{i}"] = start + at
                engine.add_request(Request(f"{tag}{i}", tuple(prompt),
                                           SamplingParams(max_tokens=out, ignore_eos=True)))
            if not engine.has_work():
                time.sleep(max(0.0, pending[0][1][2] - now))
                continue
            for o in engine.step():
                now = time.perf_counter()
                if o.token_ids and o.id not in first:
                    first[o.id] = now
                last[o.id], count[o.id] = now, len(o.token_ids)
        wall = time.perf_counter() - start
        ttft = [first[k] - sent[k] for k in first]
        tpot = [(last[k] - first[k]) / (count[k] - 1) for k in first if count[k] > 1]
        return summary(ttft, tpot, wall, sum(count.values()))

    for i, warm in enumerate(runs[:-1]):
        once(f"warm{i}-", warm)
    return once("run", runs[-1])


def stream_completion(base_url: str, model: str, prompt: list[int], max_tokens: int,
                      api_key: str | None) -> tuple[float, float | None, list[float], int]:
    """One streamed /v1/completions call: (TTFT, TPOT, chunk gaps, completion tokens), timed
    from sending. Plain HTTP and server-sent events, so any OpenAI-compatible server works."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(base_url.rstrip("/") + "/completions")
    conn_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(url.netloc, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    sent = time.perf_counter()
    conn.request("POST", url.path, body, headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url.geturl()}: HTTP {response.status}: {response.read()[:500]!r}")
    chunks, tokens = [], 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("choices") and event["choices"][0].get("text"):
            chunks.append(time.perf_counter())
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    if not chunks:
        raise RuntimeError(f"{url.geturl()}: the stream carried no text")
    tokens = tokens or len(chunks)
    tpot = (chunks[-1] - chunks[0]) / (tokens - 1) if tokens > 1 else None
    return chunks[0] - sent, tpot, [b - a for a, b in zip(chunks, chunks[1:])], tokens


def run_openai(base_url: str, model: str, runs, api_key: str | None) -> dict:
    """The workload against an OpenAI-compatible server at `base_url` (…/v1)."""
    def once(requests) -> dict:
        start_t = time.perf_counter()

        def send(r):
            time.sleep(max(0.0, start_t + r[2] - time.perf_counter()))
            return stream_completion(base_url, model, r[0], r[1], api_key)
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            done = list(pool.map(send, requests))
        wall = time.perf_counter() - start_t
        result = summary([d[0] for d in done], [d[1] for d in done if d[1] is not None], wall,
                         sum(d[3] for d in done))
        gaps = [g for d in done for g in d[2]]
        if gaps:
            result["itl_s"] = summary(gaps, gaps, 1.0, 0)["ttft_s"]
        return result
    for warm in runs[:-1]:
        once(warm)
    return once(runs[-1])


@contextlib.contextmanager
def steady_server(cfg: dict, *, warm=None):
    """`jaxpd serve` of config `cfg` (a dict) in the steady state: serving, and every worker's
    background compilation done (the launcher says so); yields (the process, the router's
    address) and stops it on leaving. `warm(address)`, if given, runs as soon as the router
    serves, while the workers still compile (warm-up traffic overlaps the compilation)."""
    import yaml

    from jaxpd.serving.background import ServeProcess

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        # roles set their own XLA flags, and compile every program as a deployment does (a
        # test session's JAXPD_PRECOMPILE=first would pad every step up to its first programs)
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXPD_PRECOMPILE")}
        server = ServeProcess(path, env=env, cwd=REPO)
        try:
            address = server.wait_serving(300)
            if warm is not None:
                warm(address)
            deadline = time.monotonic() + 600
            while not any(line.startswith("jaxpd: compiled ") for line in server.lines) \
                    and server.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            yield server, address
        finally:
            server.stop()


def run_jaxpd_openai(config_path: Path, runs) -> dict:
    """jaxpd serve with its HTTP API on a free port, benchmarked through it."""
    import yaml

    from jaxpd.config import parse_config
    from jaxpd.serving.process import served_model_name

    cfg = yaml.safe_load(config_path.read_text())
    serving = cfg.setdefault("serving", {})
    serving.setdefault("router", {})["port"] = 0
    serving["http"] = {**(serving.get("http") or {}), "port": 0}
    with steady_server(cfg) as (server, _):
        return run_openai(server.http_url, served_model_name(parse_config(cfg)), runs,
                          os.environ.get("JAXPD_API_TOKEN"))


def run_conversations(config_path: Path, conversations: int, turns: tuple[int, int],
                      prompt_len: tuple[int, int], new_len: tuple[int, int], output: int,
                      vocab: int, seed: int, reuse: bool, local_prefill: int) -> dict:
    """The multi-turn workload on `jaxpd serve`, prefix reuse on or off (see the docstring)."""
    import yaml

    from jaxpd.serving.client import Client

    cfg = yaml.safe_load(config_path.read_text())
    serving = cfg.setdefault("serving", {})
    serving.setdefault("router", {})["port"] = 0
    serving["local_prefill_max_tokens"] = local_prefill if reuse else 0
    cfg.setdefault("scheduler", {})["prefix_caching"] = reuse
    rng = random.Random(seed)
    plans = [(rng.randint(*turns), [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))],
              random.Random(seed * 1000 + c)) for c in range(conversations)]
    with steady_server(cfg) as (_, address):
        with Client(address, timeout=600) as client:
            def converse(plan):  # turns in order; each sends the whole history
                n, history, local = plan
                out = []
                for turn in range(n):
                    if turn:
                        history += [local.randrange(3, vocab)
                                    for _ in range(local.randint(*new_len))]
                    d = client.complete(prompt_token_ids=history, max_tokens=output,
                                        ignore_eos=True, temperature=0.0)
                    out.append((turn, d.ttft_s, d.usage.prompt_tokens, d.usage.cached_tokens))
                    history = history + list(d.token_ids)
                return out

            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(conversations) as pool:
                done = [t for conv in pool.map(converse, plans) for t in conv]
            wall = time.perf_counter() - start

    def stats(xs):
        xs = sorted(xs)
        return {"p50": round(statistics.median(xs), 5), "p90": round(xs[int(0.9 * (len(xs) - 1))], 5),
                "mean": round(statistics.fmean(xs), 5)} if xs else None

    later = [d for d in done if d[0] > 0]
    return {"reuse": reuse, "turns": len(done), "wall_s": round(wall, 3),
            "ttft_first_turn_s": stats([d[1] for d in done if d[0] == 0]),
            "ttft_later_turns_s": stats([d[1] for d in later]),
            "prompt_tokens": sum(d[2] for d in done),
            "cached_tokens": sum(d[3] for d in done),
            "later_turns_cached_fraction": round(sum(d[3] for d in later)
                                                 / max(1, sum(d[2] for d in later)), 3)}


def run_served(config_path: Path, runs) -> dict:
    """The last of `runs` on `jaxpd serve --config` (the ones before warm it up)."""
    return next(served_runs(config_path, runs))


def served_runs(config_path: Path, runs, measured: int = 1):
    """Each of the last `measured` of `runs` on one `jaxpd serve --config`, as measured. The
    runs before warm it up: the first while its workers compile, the others once they have
    (the first requests through a newly compiled program run slower). The server stops when
    the caller stops iterating."""
    import yaml

    from jaxpd.serving.client import Client

    cfg = yaml.safe_load(config_path.read_text())
    cfg.setdefault("serving", {}).setdefault("router", {})["port"] = 0
    warm_ups = runs[:-measured]

    def warm(address: str) -> None:
        with Client(address, timeout=600) as client:
            for requests in warm_ups[:1]:
                _served_once(client, requests)

    with steady_server(cfg, warm=warm) as (_, address):
        with Client(address, timeout=600) as client:
            for requests in warm_ups[1:]:
                _served_once(client, requests)
            for requests in runs[-measured:]:
                yield _served_once(client, requests)


def _served_once(client, requests) -> dict:
    """`requests` sent at their arrival times; TTFT/TPOT as the client saw them, and where
    TTFT went by the workers' own clocks."""
    start_t = time.perf_counter()

    def send(r):  # at its arrival time; the client times TTFT from sending
        time.sleep(max(0.0, start_t + r[2] - time.perf_counter()))
        return client.complete(prompt_token_ids=r[0], max_tokens=r[1], ignore_eos=True,
                               temperature=0.0)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        done = list(pool.map(send, requests))
    wall = time.perf_counter() - start_t
    out = summary([d.ttft_s for d in done], [d.tpot_s for d in done if d.tpot_s], wall,
                  sum(d.usage.completion_tokens for d in done))
    # the request path: what TTFT holds beyond the workers' own queue and prefill (router,
    # gRPC hops, tokenization, streaming back)
    path = sorted(d.ttft_s - d.timings.queue_s - d.timings.prefill_s
                  for d in done if d.ttft_s is not None)
    out["request_path_s"] = {"p50": round(statistics.median(path), 5),
                             "mean": round(statistics.fmean(path), 5)}
    for name in ("queue_s", "prefill_s", "transfer_s"):
        xs = sorted(getattr(d.timings, name) for d in done)
        out[f"worker_{name}"] = {"p50": round(statistics.median(xs), 5),
                                 "mean": round(statistics.fmean(xs), 5)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=0,
                    help="multi-turn chat workload: this many conversations (see above)")
    ap.add_argument("--turns", type=_range, default=(3, 6), metavar="LO,HI")
    ap.add_argument("--new-len", type=_range, default=(16, 48), metavar="LO,HI",
                    help="--conversations: new tokens each later turn adds")
    ap.add_argument("--reuse", choices=("on", "off", "both"), default="both",
                    help="--conversations: prefix reuse on, off, or both side by side")
    ap.add_argument("--local-prefill", type=int, default=128,
                    help="--conversations: serving.local_prefill_max_tokens with reuse on")
    ap.add_argument("--prompt-len", type=_range, default=(64, 256), metavar="LO,HI")
    ap.add_argument("--output-len", type=_range, default=(32, 64), metavar="LO,HI")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3,
                    help="warm-up runs before the measured one (served batches vary run to run, "
                         "so several are needed to compile their shapes)")
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--workload", metavar="KIND|FILE",
                    help="chatbot, code, summarization or a trace: lengths and arrivals from the "
                         "placer's workload generator (instead of --prompt-len/--output-len)")
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s with --workload")
    ap.add_argument("--simulate", action="store_true",
                    help="also replay the requests in the placer's simulator")
    ap.add_argument("--profile", action="append", metavar="JSON",
                    help="cost-model profile for --simulate; repeat it for several TP degrees, "
                         "each group using the one of its TP (default: this CPU's, taken "
                         "through the engine at TP 1 and 2)")
    ap.add_argument("--kv-link", type=float, default=1.0e9, metavar="BYTES_PER_S",
                    help="KV hand-off rate for --simulate (default 1e9: tools/bench_transfer.py's "
                         "loopback gRPC figure)")
    ap.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                    help="grpc: jaxpd's Generate API (default); openai: the streaming "
                         "/v1/completions of an OpenAI-compatible server")
    ap.add_argument("--base-url", metavar="URL",
                    help="--backend openai: a running server's base URL (…/v1); default: start "
                         "jaxpd serve --config with its HTTP API")
    ap.add_argument("--model", help="--base-url: the model name to ask for")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="--base-url: bearer token (default $OPENAI_API_KEY)")
    args = ap.parse_args()
    if args.base_url and (args.backend != "openai" or not args.model):
        ap.error("--base-url needs --backend openai and --model")

    from jaxpd.config import load_config
    from jaxpd.model.checkpoint import load_config as load_model_config

    deployment = load_config(args.config)
    model_cfg = load_model_config(deployment.model.checkpoint)
    vocab = model_cfg.vocab_size
    if args.workload:
        runs = generated_workload(args.workload, args.rate, args.requests,
                                  model_cfg.max_position_embeddings, vocab, args.seed,
                                  args.warmup + 1)
    else:
        runs = workload(args.requests, args.prompt_len, args.output_len, vocab, args.seed,
                        args.warmup + 1)
    if args.conversations:
        output = args.output_len[0]
        result = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                  "host": {"nproc": os.cpu_count(), "platform": platform.platform()},
                  "config": args.config, "mode": deployment.mode, "workload": "multi-turn",
                  "conversations": args.conversations, "turns": args.turns,
                  "output_tokens_per_turn": output}
        for reuse in {"on": [True], "off": [False], "both": [True, False]}[args.reuse]:
            result["reuse_on" if reuse else "reuse_off"] = run_conversations(
                Path(args.config), args.conversations, args.turns, args.prompt_len,
                args.new_len, output, vocab, args.seed, reuse, args.local_prefill)
        if args.reuse == "both":
            on, off = result["reuse_on"], result["reuse_off"]
            result["later_turn_ttft_p50_on_over_off"] = round(
                on["ttft_later_turns_s"]["p50"] / off["ttft_later_turns_s"]["p50"], 3)
        print(json.dumps(result, indent=2))
        return 0
    requests = runs[-1]
    result = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "host": {"nproc": os.cpu_count(), "platform": platform.platform()},
              "config": args.config, "mode": deployment.mode, "requests": len(requests),
              "workload": args.workload or "uniform", "rate": args.rate if args.workload else None,
              "prompt_tokens": sum(len(p) for p, _, _ in requests),
              "output_tokens": sum(o for _, o, _ in requests)}
    result["backend"] = args.backend
    if args.base_url:
        result["base_url"], result["model"] = args.base_url, args.model
        result["served"] = run_openai(args.base_url, args.model, runs, args.api_key)
        args.skip_in_process = True
    elif args.backend == "openai":
        result["served"] = run_jaxpd_openai(Path(args.config), runs)
    else:
        result["served"] = run_served(Path(args.config), runs)
    if not args.skip_in_process:
        result["in_process"] = run_in_process(deployment, runs)
        s, i = result["served"], result["in_process"]
        result["served_over_in_process"] = {
            "ttft_p50": round(s["ttft_s"]["p50"] / i["ttft_s"]["p50"], 3),
            "tpot_p50": round(s["tpot_s"]["p50"] / i["tpot_s"]["p50"], 3),
            "throughput": round(s["output_tokens_per_s"] / i["output_tokens_per_s"], 3)}
    if args.simulate:
        from jaxpd.placement.simulate_cli import DEFAULT_PROFILE

        sim = result["simulated"] = simulated(deployment, model_cfg,
                                              args.profile or DEFAULT_PROFILE, requests,
                                              args.kv_link)
        s = result["served"]
        result["simulated_over_served"] = {
            k: round(sim[m][q] / s[m][q], 3) for k, m, q in (
                ("ttft_p50", "ttft_s", "p50"), ("ttft_p90", "ttft_s", "p90"),
                ("tpot_p50", "tpot_s", "p50"), ("tpot_p90", "tpot_s", "p90"))}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
