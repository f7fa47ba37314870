"""`jaxpd client`: send prompts to a running `jaxpd serve` and print what comes back.

`add_parser(subparsers)` registers the subcommand on the `jaxpd` parser and `run(args)` runs
it, so `jaxpd/cli.py` stays a thin dispatcher. Failures a user can fix (a gRPC error, a server
that is not there) print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import concurrent.futures
import json
import sys
from typing import Any, Iterable, Iterator, TextIO

from jaxpd.cli_types import prompt_ids
from jaxpd.serving.client import (DEFAULT_ADDRESS, Chunk, Client, ClientError, Completion,
                                  StreamEvent, collect)

EXIT_ERROR = 2
CONNECT_TIMEOUT_S = 5.0

DESCRIPTION = """\
Send prompts to a running jaxpd server (`jaxpd serve`) over gRPC and print the completions.

Without --json the text is streamed to stdout as it arrives (after the prompt, with --prompt),
and a summary line goes to stderr. Repeated --prompt/--prompt-ids are sent concurrently and
printed in order. Sampling flags left out are not sent: the server's defaults apply
(max_tokens 16, greedy, top-p 1, top-k off, random seed)."""

EPILOG = """\
examples:
  jaxpd client --prompt "It is a truth universally acknowledged, that" --max-tokens 32
  jaxpd client --address 10.0.0.5:50051 --prompt-ids 1,2,3 --max-tokens 8 --json
  jaxpd client --prompt "Mr. Darcy" --prompt "Elizabeth" --max-tokens 16 --json
  jaxpd client --prompt "She said" --temperature 0.8 --top-p 0.95 --seed 3 --stop . --logprobs

summary line (stderr, without --json):
  finish_reason=length prompt_tokens=9 completion_tokens=32 ttft=0.041s tpot=0.0062s
  ttft and tpot are measured here, as vLLM's benchmark does: ttft from sending the request to
  the first token; tpot = (last token - first token) / (completion tokens - 1).

--json prints one object per prompt:
  {"request_id", "prompt_token_ids" (with --prompt-ids), "token_ids", "text", "finish_reason",
   "matched_stop", "usage", "timings" (the server's), "ttft_s", "tpot_s", "logprobs"?}

exit status: 0 on success, 2 on a gRPC error or an unreachable server."""


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"--seed takes an integer in [0, 2**32), got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `jaxpd client` on the `jaxpd` parser's subparsers."""
    p = subparsers.add_parser(
        "client", help="send prompts to a running `jaxpd serve` over gRPC",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tls", action="store_true",
                   help="talk TLS to the router (a certificate from a public CA)")
    p.add_argument("--tls-ca", metavar="PEM",
                   help="talk TLS, trusting this CA certificate (serving.tls.ca_file)")
    p.add_argument("--token", metavar="TOKEN",
                   help="bearer token (serving.auth_token_file); also $JAXPD_API_TOKEN")
    p.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                   help=f"the router's address (default {DEFAULT_ADDRESS})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--info", action="store_true",
                     help="print the deployment (every worker's role, state, pid, metrics URL) "
                          "and its loads as JSON, and exit")
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text, tokenized by the server (repeat to send several)")
    src.add_argument("--prompt-ids", action="append", type=prompt_ids, metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (server default 16)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="0 = greedy (server default); > 0 samples from softmax(logits / T)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest (0 = off)")
    p.add_argument("--seed", type=_seed, metavar="S", help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable; cut from the output)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens")
    p.add_argument("--logprobs", action="store_true",
                   help="ask for each token's log-probability (shown with --json)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--timeout", type=_seconds, metavar="S",
                   help="deadline for each request, in seconds (default: none)")
    p.add_argument("--connect-timeout", type=_seconds, default=CONNECT_TIMEOUT_S, metavar="S",
                   help=f"give up if the server cannot be reached within S seconds "
                        f"(default {CONNECT_TIMEOUT_S:g})")
    return p


def _requests(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One `Client.generate` keyword set per prompt; flags left out stay None (not sent)."""
    shared = {"max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
              "stop": tuple(args.stop), "ignore_eos": args.ignore_eos,
              "logprobs": args.logprobs, "timeout": args.timeout}
    if args.prompt is not None:
        return [{"prompt": text, **shared} for text in args.prompt]
    return [{"prompt_token_ids": ids, **shared} for ids in args.prompt_ids]


def _seconds_text(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}s"


def summary(c: Completion) -> str:
    """The one-line stderr summary of a completion."""
    return (f"finish_reason={c.finish_reason} prompt_tokens={c.usage.prompt_tokens} "
            f"completion_tokens={c.usage.completion_tokens} ttft={_seconds_text(c.ttft_s, 3)} "
            f"tpot={_seconds_text(c.tpot_s, 4)}")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def record(c: Completion, prompt_token_ids: list[int] | None, logprobs: bool) -> dict[str, Any]:
    """The --json object for one completion."""
    out: dict[str, Any] = {"request_id": c.request_id}
    if prompt_token_ids is not None:
        out["prompt_token_ids"] = list(prompt_token_ids)
    t = c.timings
    out.update(
        token_ids=list(c.token_ids), text=c.text, finish_reason=c.finish_reason,
        matched_stop=c.matched_stop,
        usage={"prompt_tokens": c.usage.prompt_tokens,
               "completion_tokens": c.usage.completion_tokens,
               "cached_tokens": c.usage.cached_tokens, "total_tokens": c.usage.total_tokens},
        timings={"queue_s": _round(t.queue_s), "prefill_s": _round(t.prefill_s),
                 "transfer_s": _round(t.transfer_s), "ttft_s": _round(t.ttft_s),
                 "total_s": _round(t.total_s)},
        ttft_s=_round(c.ttft_s), tpot_s=_round(c.tpot_s))
    if logprobs:
        out["logprobs"] = [round(x, 6) for x in c.logprobs]
    return out


def _fallback_text(c: Completion) -> str:
    """Token ids as text when the server sent none (a model without a tokenizer)."""
    return " ".join(map(str, c.token_ids)) if not c.text and c.token_ids else ""


def _echo(events: Iterable[StreamEvent], out: TextIO) -> Iterator[StreamEvent]:
    """Pass events through, writing each chunk's text to `out` as it arrives."""
    for event in events:
        if isinstance(event, Chunk) and event.text:
            out.write(event.text)
            out.flush()
        yield event


def _run_live(client: Client, args: argparse.Namespace, request: dict[str, Any]) -> int:
    """One prompt, plain output: stream the text, then the summary line on stderr."""
    if "prompt" in request:
        sys.stdout.write(request["prompt"])
        sys.stdout.flush()
    try:
        done = collect(_echo(client.generate(**request), sys.stdout))
        sys.stdout.write(_fallback_text(done))
    finally:
        print(flush=True)  # end the (possibly partial) line before any error message
    print(summary(done), file=sys.stderr)
    return 0


def _print_result(c: Completion, args: argparse.Namespace, request: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(record(c, request.get("prompt_token_ids"), args.logprobs),
                         ensure_ascii=False), flush=True)
        return
    print(request.get("prompt", "") + (c.text or _fallback_text(c)), flush=True)
    print(summary(c), file=sys.stderr)


def _run_concurrent(client: Client, args: argparse.Namespace,
                    requests: list[dict[str, Any]]) -> int:
    """All prompts at once (one thread each), results printed in the prompts' order."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(requests), 64))
    status = 0
    try:
        futures = [pool.submit(client.complete, **r) for r in requests]
        for request, future in zip(requests, futures):
            try:
                _print_result(future.result(), args, request)
            except ClientError as e:
                print(f"error: {e}", file=sys.stderr)
                status = EXIT_ERROR
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return status


def run(args: argparse.Namespace) -> int:
    """Run `jaxpd client`; returns the exit status."""
    requests = [] if args.info else _requests(args)
    try:
        token = args.token or os.environ.get("JAXPD_API_TOKEN") or None
        with Client(args.address, tls=args.tls, tls_ca=args.tls_ca, token=token) as client:
            client.wait_ready(args.connect_timeout)
            if args.info:
                from google.protobuf import json_format

                print(json.dumps({"server": json_format.MessageToDict(client.server_info()),
                                  "loads": json_format.MessageToDict(client.loads())}, indent=2))
                return 0
            if args.json or len(requests) > 1:
                return _run_concurrent(client, args, requests)
            return _run_live(client, args, requests[0])
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
