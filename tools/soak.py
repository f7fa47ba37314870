"""Soak a deployment: N concurrent streams for M minutes, random cancels and deadlines, and a
worker SIGKILLed every K seconds; prints JSON with requests by outcome, greedy streams whose
tokens differ from the offline engine's (must be 0), KV pages in use once idle (must be 0) and
each process's RSS growth.

    python tools/soak.py --config configs/local-2x2.yaml --streams 16 --minutes 10 --kill-every 60

It starts the deployment itself (`jaxpd serve --config`), on a free router port, and stops it at
the end. Exit status 1 when a stream was lost or differed, or pages stayed in use.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxpd.serving.background import ServeProcess  # noqa: E402
from jaxpd.v1 import generation_pb2 as pb, generation_pb2_grpc  # noqa: E402

PROMPTS = 24


def _prompts(seed: int, vocab: int) -> list[tuple[tuple[int, ...], int]]:
    """(prompt ids, max_tokens) pairs the streams draw from."""
    rng = random.Random(seed)
    return [(tuple(rng.randrange(2, vocab) for _ in range(rng.choice((8, 40, 120, 300)))),
             rng.choice((16, 48, 96))) for _ in range(PROMPTS)]


def _references(config, prompts) -> list[list[int]]:
    """Greedy tokens of every prompt from the in-process engine on the same model."""
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint

    model = load_model(config["model"].get("checkpoint"))
    mc = merge_tokenizer_eos(model.config, tokenizer_for_checkpoint(model.folder))
    engine = build_engine(mc, model.params, parse_config({"kv": {"num_pages": 2048}}))
    engine.prepare_programs("first")
    out = engine.run_to_completion([Request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True))
                                    for i, (p, n) in enumerate(prompts)])
    engine.stop_compiling()
    return [list(out[str(i)].token_ids) for i in range(len(prompts))]


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _router_pid(launcher: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == launcher and \
                        b"serve\0router" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, ValueError):
                continue
    return None


class Soak:
    def __init__(self, address: str, prompts, references, args):
        self.stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
        self.prompts, self.references, self.args = prompts, references, args
        self.outcomes: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.differing: list[dict] = []
        self.kills: list[str] = []
        self.migrations = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def stream(self, worker: int) -> None:
        rng = random.Random(self.args.seed * 1000 + worker)
        while not self.stop.is_set():
            i = rng.randrange(len(self.prompts))
            prompt, max_tokens = self.prompts[i]
            req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            req.prompt_token_ids.ids.extend(prompt)
            roll = rng.random()
            mode = "cancel" if roll < 0.1 else "deadline" if roll < 0.2 else "full"
            timeout = rng.uniform(0.2, 2.0) if mode == "deadline" else 300
            cancel_after = rng.randrange(1, 6)
            tokens, chunks = [], 0
            try:
                call = self.stub.Generate(req, timeout=timeout)
                for response in call:
                    if response.HasField("chunk"):
                        tokens += response.chunk.token_ids
                        chunks += 1
                        if mode == "cancel" and chunks >= cancel_after:
                            call.cancel()
                            break
                    else:
                        with self.lock:
                            self.migrations += response.complete.migrations
                outcome = "cancelled" if mode == "cancel" and chunks >= cancel_after else "completed"
                if outcome == "completed" and tokens != self.references[i]:
                    with self.lock:
                        self.differing.append({"prompt": i, "got": len(tokens),
                                               "first_difference": next(
                                                   (k for k, (a, b) in enumerate(zip(tokens, self.references[i]))
                                                    if a != b), min(len(tokens), len(self.references[i])))})
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and mode == "deadline":
                    outcome = "deadline (asked for)"
                elif e.code() == grpc.StatusCode.CANCELLED and mode == "cancel":
                    outcome = "cancelled"
                else:
                    outcome = "lost"
                    with self.lock:
                        self.errors[f"{e.code().name}: {e.details()[:120]}"] += 1
            with self.lock:
                self.outcomes[outcome] += 1

    def killer(self, rng: random.Random) -> None:
        roles = ["decode", "prefill"]
        n = 0
        while not self.stop.wait(self.args.kill_every):
            info = self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            role = roles[n % 2]
            live = [w for w in info.workers if w.state == "serving" and w.role in (role, "colocated")]
            if not live:
                continue
            victim = rng.choice(live)
            try:
                os.kill(victim.pid, signal.SIGKILL)
                self.kills.append(f"{victim.role}-{victim.replica} (pid {victim.pid}) at "
                                  f"{time.strftime('%H:%M:%S')}")
            except ProcessLookupError:
                pass
            n += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="deployment YAML (its router port is replaced)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument("--kill-every", type=float, default=60.0, metavar="S",
                   help="SIGKILL a worker every S seconds, decode and prefill in turn (default 60)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg.setdefault("serving", {}).setdefault("router", {})["port"] = 0
    prompts = _prompts(args.seed, 4096)
    print(f"soak: offline references for {len(prompts)} prompts ...", file=sys.stderr, flush=True)
    references = _references(cfg, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.yaml"
        config.write_text(yaml.safe_dump(cfg))
        # every program compiled before serving (restarts load them from the persistent cache), so
        # RSS growth measures leaks, not programs compiled in the background
        env = {**os.environ, "JAXPD_PRECOMPILE": os.environ.get("JAXPD_PRECOMPILE", "all")}
        with ServeProcess(config, env=env, cwd=REPO) as served:
            address = served.wait_serving(600)
            soak = Soak(address, prompts, references, args)
            router = _router_pid(served.process.pid)
            threads = [threading.Thread(target=soak.stream, args=(i,), daemon=True)
                       for i in range(args.streams)]
            for t in threads:
                t.start()
            time.sleep(min(30.0, args.minutes * 60 / 4))  # warm: every shape seen once
            start_info = soak.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).workers
            pids = {"router": router, **{f"{w.role}-{w.replica}": w.pid for w in start_info}}
            rss_start = {name: _rss(pid) for name, pid in pids.items()}
            killer = threading.Thread(target=soak.killer, args=(random.Random(args.seed),), daemon=True)
            killer.start()
            began = time.monotonic()
            time.sleep(max(0.0, args.minutes * 60 - (time.monotonic() - began)))
            soak.stop.set()
            for t in threads:
                t.join(330)
            time.sleep(3.0)  # idle
            loads = soak.stub.GetLoads(pb.GetLoadsRequest(), timeout=10).workers
            info = soak.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            now = {"router": router, **{f"{w.role}-{w.replica}": w.pid for w in info.workers}}
            # growth of the processes that lived through the whole soak (not restarted)
            rss_end = {name: _rss(pid) if now.get(name) == pid else None
                       for name, pid in pids.items()}
            workers_rss = {f"{w.role}-{w.replica}": _rss(w.pid) for w in info.workers}
    pages = {f"{w.role}-{w.replica}": w.kv_pages_used for w in loads}
    growth = {name: round(rss_end[name] / rss_start[name] - 1, 4)
              for name in rss_start if rss_start[name] and rss_end[name]}
    summary = {
        "minutes": args.minutes, "streams": args.streams, "kill_every_s": args.kill_every,
        "requests": dict(soak.outcomes), "lost": soak.outcomes.get("lost", 0),
        "errors": dict(soak.errors), "differing_greedy_streams": len(soak.differing),
        "differing": soak.differing[:5], "migrations": soak.migrations, "kills": soak.kills,
        "kv_pages_in_use_after_idle": pages, "rss_growth": growth,
        "worker_rss_mb_at_end": {k: round(v / 2**20) for k, v in workers_rss.items() if v},
        "states_at_end": {f"{w.role}-{w.replica}": w.state for w in info.workers}}
    print(json.dumps(summary, indent=2))
    failed = summary["lost"] or soak.differing or any(pages.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
