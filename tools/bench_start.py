"""Time from process start to ready, cold (empty compilation cache) and warm (the persistent
cache filled by the cold run), side by side in one run.

    .venv/bin/python tools/bench_start.py                       # configs/local.yaml
    .venv/bin/python tools/bench_start.py --config configs/local-colocated.yaml --repeats 2

Measures `jaxpd serve --config FILE` until it prints its address (every worker loaded, warmed
up and SERVING), and `jaxpd generate` of one short prompt end to end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXPD_CACHE_DIR"] = str(cache)
    return env


def serve_ready_s(config: str, cache: Path) -> float:
    from jaxpd.serving.background import ServeProcess

    start = time.perf_counter()
    server = ServeProcess(config, env=_env(cache), cwd=REPO)
    try:
        server.wait_serving(600)
        return time.perf_counter() - start
    finally:
        server.stop()


def generate_s(cache: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxpd.cli", "generate", "--prompt", "It is a truth",
                    "--max-tokens", "8", "--json"], env=_env(cache), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    ap.add_argument("--repeats", type=int, default=1, help="cold/warm pairs (median reported)")
    args = ap.parse_args(argv)
    rows = {"serve_cold_s": [], "serve_warm_s": [], "generate_cold_s": [], "generate_warm_s": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "xla"
            rows["serve_cold_s"].append(serve_ready_s(args.config, cache))
            rows["serve_warm_s"].append(serve_ready_s(args.config, cache))
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "xla"
            rows["generate_cold_s"].append(generate_s(cache))
            rows["generate_warm_s"].append(generate_s(cache))
    result = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "config": args.config, "nproc": os.cpu_count(),
              **{k: round(statistics.median(v), 2) for k, v in rows.items()}}
    result["serve_cold_over_warm"] = round(result["serve_cold_s"] / result["serve_warm_s"], 2)
    result["generate_cold_over_warm"] = round(result["generate_cold_s"] / result["generate_warm_s"], 2)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
