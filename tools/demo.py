"""`make demo`: start the local disaggregated deployment, stream a few prompts, shut it down.

    python tools/demo.py [--config configs/local.yaml] [--max-tokens 40] [--setup-began EPOCH]

Starts `jaxpd serve --config ...` (router, a prefill worker and a decode worker, each its own
process), streams each prompt's completion as it arrives with its time to first token (TTFT)
and time per output token (TPOT) as the client measured them, then stops every process. Exits 0
when all of that worked; otherwise prints what the server said and exits non-zero.

It prints how long the first streamed token took from the start of `jaxpd serve` (compiling
included: the workers serve once their smallest step programs are ready and compile the rest in
the background) and, given `--setup-began` (what `make demo` passes), how long setting up the
virtual environment took before that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Mr. Darcy looked at Elizabeth and said",
    "The ball at Netherfield was",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--startup-timeout", type=float, default=240)
    parser.add_argument("--setup-began", type=float, metavar="EPOCH",
                        help="when the set-up (venv) began, as seconds since the epoch")
    args = parser.parse_args()
    if args.setup_began is not None:
        print(f"set-up (virtual environment): {time.time() - args.setup_began:.1f} s", flush=True)

    from jaxpd.errors import JaxpdError
    from jaxpd.serving.background import ServeProcess
    from jaxpd.serving.client import Chunk, Client, collect

    began = time.monotonic()
    print(f"starting {args.config} ...", flush=True)

    def show_progress(line: str) -> None:  # the launcher's compile progress line
        if line.startswith("jaxpd: compil"):
            print(f"  {line.removeprefix('jaxpd: ')}", flush=True)

    server = ServeProcess(args.config, cwd=REPO, on_line=show_progress)
    first_token_s = None
    try:
        address = server.wait_serving(args.startup_timeout)
    except JaxpdError as e:
        print(e, file=sys.stderr)
        return 1
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
                        if first_token_s is None:
                            first_token_s = time.monotonic() - began
                        print(event.text, end="", flush=True)
                done = collect(events)
                tpot = f"{done.tpot_s * 1000:.1f} ms" if done.tpot_s is not None else "n/a"
                print(f"\n  [{done.usage.completion_tokens} tokens, {done.finish_reason}; "
                      f"TTFT {done.ttft_s * 1000:.0f} ms, TPOT {tpot}]\n", flush=True)
        if server.http_url:
            _chat_over_http(server.http_url, args.max_tokens)
    finally:
        code = server.stop()
    if code != 0:
        print("\n".join(server.lines[-30:]), file=sys.stderr)
        return code
    first = f"{first_token_s:.1f} s" if first_token_s is not None else "never"
    print(f"first streamed token: {first} after starting jaxpd serve; stopped every process; "
          f"{time.monotonic() - began:.1f} s in all")
    return 0


def _chat_over_http(base_url: str, max_tokens: int) -> None:
    """One chat completion through the OpenAI-compatible API (what `curl` or the `openai`
    package would send)."""
    import json
    import urllib.request

    body = {"model": "jaxpd-default", "max_tokens": max_tokens, "temperature": 0.7, "seed": 0,
            "messages": [{"role": "user", "content": "Will you dance, Mr. Darcy?"}]}
    request = urllib.request.Request(f"{base_url}/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    print(f"POST {base_url}/chat/completions (the OpenAI API):\n"
          f"  {answer['choices'][0]['message']['content']!r}\n"
          f"  [{answer['usage']['completion_tokens']} tokens, "
          f"{answer['choices'][0]['finish_reason']}]\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
