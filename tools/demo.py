"""`make demo`: start the local disaggregated deployment, stream a few prompts, shut it down.

    python tools/demo.py [--config configs/local.yaml] [--max-tokens 40]

Starts `jaxpd serve --config ...` (router, a prefill worker and a decode worker, each its own
process), streams each prompt's completion as it arrives with its time to first token (TTFT)
and time per output token (TPOT) as the client measured them, then stops every process. Exits 0
when all of that worked; otherwise prints what the server said and exits non-zero.
"""

from __future__ import annotations

import argparse
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Mr. Darcy looked at Elizabeth and said",
    "The ball at Netherfield was",
]


def start(config: str, timeout: float) -> tuple[subprocess.Popen, str, list[str]]:
    """Launch `jaxpd serve` and wait for its address; its output is kept for error reports."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxpd.cli", "serve", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    found: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            match = re.search(r"serving on (\S+)", line)
            if match:
                found.put(match.group(1))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        address = found.get(timeout=timeout)
    except queue.Empty:
        address = None
    if address is None:
        stop(proc)
        raise SystemExit("jaxpd serve did not start:\n" + "\n".join(lines[-30:]))
    return proc, address, lines


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--startup-timeout", type=float, default=240)
    args = parser.parse_args()

    from jaxpd.serving.client import Chunk, Client, collect

    began = time.monotonic()
    print(f"starting {args.config} ...", flush=True)
    proc, address, lines = start(args.config, args.startup_timeout)
    print(f"serving on {address} after {time.monotonic() - began:.1f} s\n", flush=True)
    try:
        with Client(address, timeout=120) as client:
            for prompt in PROMPTS:
                print(prompt, end="", flush=True)
                events = []
                for event in client.generate(prompt, max_tokens=args.max_tokens, temperature=0.7,
                                             top_p=0.9, seed=0):
                    events.append(event)
                    if isinstance(event, Chunk):
                        print(event.text, end="", flush=True)
                done = collect(events)
                tpot = f"{done.tpot_s * 1000:.1f} ms" if done.tpot_s is not None else "n/a"
                print(f"\n  [{done.usage.completion_tokens} tokens, {done.finish_reason}; "
                      f"TTFT {done.ttft_s * 1000:.0f} ms, TPOT {tpot}]\n", flush=True)
    finally:
        code = stop(proc)
    if code != 0:
        print("\n".join(lines[-30:]), file=sys.stderr)
        return code
    print(f"stopped every process; {time.monotonic() - began:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
