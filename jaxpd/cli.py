"""The `jaxpd` command line.

    jaxpd generate --prompt "It is a truth" --max-tokens 32
    jaxpd generate --checkpoint ./Llama-3.1-8B --prompt-ids 1,2,3 --max-tokens 8 --temperature 0 --tp 2 --json
    jaxpd generate --input prompts.jsonl --output out.jsonl --config configs/cpu-disaggregated.yaml
    jaxpd convert --checkpoint ./hf-folder --out ./orbax-folder --tp 2
    jaxpd place --inventory configs/inventory/mixed-gpu.yaml --model llama3-8b --rate 100 \
        --slo ttft_p90=0.25 --slo tpot_p90=0.03 --out deploy.yaml

Errors a user can fix (bad checkpoint, bad flags) print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from jaxpd.cli_types import positive_int, prompt_ids
from jaxpd.errors import JaxpdError

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a Hugging Face folder (config.json + *.safetensors) or a jaxpd orbax "
                        "checkpoint; default: the embedded model trained on Jane Austen")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor-parallel degree: shard the model over the first N devices (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's; float32 on CPU)")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="JAX's persistent compilation cache (default: $JAXPD_CACHE_DIR, else "
                        "~/.cache/jaxpd/xla); 'off' compiles afresh every run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpd", description="Disaggregated prefill/decode LLM serving on JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate", help="continue prompts, or run an offline batch job (JSONL in, JSONL out)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue prompts with the paged engine. Prints text as it is generated, or "
                    "one JSON object per prompt with --json.\n\nBatch mode: --input prompts.jsonl "
                    "--output out.jsonl runs every record through continuous batching, resumably "
                    "(ids already in the output are skipped).")
    _add_model_args(gen)
    gen.add_argument("--config", metavar="YAML",
                     help="deployment config (model, meshes, KV pages, attention, scheduler); "
                          "flags given here override it")
    gen.add_argument("--attention", choices=["auto", "reference", "cudnn", "pallas"],
                     help="attention implementation (default: auto)")
    gen.add_argument("--decode-steps", type=positive_int, metavar="N",
                     help="decode steps per device call (scheduler.decode_steps_per_dispatch; "
                          "default 8; 1 = one token per call)")
    gen.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                     help="dispatch each decode call before the previous one's tokens are back "
                          "(scheduler.overlap; default off: it pays on accelerators, not on CPU)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=prompt_ids, metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 1,2,3 (repeat for a batch)")
    src.add_argument("--input", metavar="JSONL",
                     help='batch input: one {"id", "prompt" | "prompt_token_ids", ...} per line')
    gen.add_argument("--output", metavar="JSONL", help="batch output (with --input); appended to")
    gen.add_argument("--max-tokens", type=int, default=32, metavar="N",
                     help="tokens to generate per prompt (default 32)")
    gen.add_argument("--temperature", type=float, metavar="T",
                     help="0 = greedy (default); > 0 samples from softmax(logits / T)")
    gen.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest (0 = off)")
    gen.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (1 = off)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per request)")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop when this text is generated (repeatable; not included in the output)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="keep generating past end-of-sequence tokens")
    gen.add_argument("--logprobs", action="store_true", help="report each token's log-probability")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: token_ids (generated only), text, "
                          "finish_reason, usage")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar in batch mode")
    gen.add_argument("--precompile", choices=("background", "off", "first", "all"),
                     default="background",
                     help="when step programs compile. background (default): a shape on the "
                          "request path only when no compiled program can run the step, every "
                          "other shape a step wants on a background thread (low CPU priority) "
                          "while the step runs padded up or trimmed to compiled ones; off: each "
                          "shape when a step first needs it; first: only the smallest shapes, "
                          "every step fitted to them; all: every shape before the first step")

    conv = sub.add_parser(
        "convert", help="save a checkpoint as a jaxpd orbax checkpoint",
        description="Load a checkpoint (HF or orbax) onto a TP mesh and save it with orbax; the "
                    "result restores onto any TP degree.")
    _add_model_args(conv)
    conv.add_argument("--out", required=True, metavar="DIR", help="new folder to write")

    from jaxpd.deploy import render_cli
    from jaxpd.placement import place_cli, simulate_cli
    from jaxpd.serving import client_cli, serve_cli

    serve_cli.add_parser(sub)
    client_cli.add_parser(sub)
    place_cli.add_parser(sub)
    simulate_cli.add_parser(sub)
    render_cli.add_parser(sub)
    return parser


def _check_devices(count: int) -> None:
    import jax

    devices = jax.devices()
    if count > len(devices):
        raise JaxpdError(f"the deployment needs {count} devices but only {len(devices)} are visible "
                         f"({devices[0].platform}); on CPU set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={count}")


def _mesh(tp: int):
    import jax

    from jaxpd.model.sharding import make_mesh

    _check_devices(tp)
    return make_mesh(jax.devices()[:tp], tp)


def _deployment(args):
    """The deployment config from --config, with command-line flags taking precedence."""
    from jaxpd.config import DeploymentConfig, MeshSection, load_config

    cfg = load_config(args.config) if args.config else DeploymentConfig()
    model = cfg.model.model_copy(update={k: v for k, v in (
        ("checkpoint", args.checkpoint), ("dtype", args.dtype)) if v is not None})
    update = {"model": model}
    if args.tp != 1 or not args.config:
        if cfg.mode == "disaggregated" and args.config:
            raise JaxpdError("--tp applies to colocated deployments; set prefill.tp and decode.tp "
                             "in the config instead")
        update["prefill"] = (MeshSection(devices=list(range(args.tp)), tp=args.tp),)
    if args.attention:
        update["attention"] = args.attention
    scheduler = {}
    if args.decode_steps is not None:
        scheduler["decode_steps_per_dispatch"] = args.decode_steps
    if args.overlap is not None:
        scheduler["overlap"] = args.overlap
    if scheduler:
        update["scheduler"] = cfg.scheduler.model_copy(update=scheduler)
    return cfg.model_copy(update=update)


_FLAGS = {"prompt_token_ids": "--prompt-ids", "request_id": "request id"}


def _flag_error(e) -> JaxpdError:
    """An InvalidRequest about a flag's value, naming the flag."""
    return JaxpdError(f"{_FLAGS.get(e.field, '--' + e.field.replace('_', '-'))}: {e.reason}")


def _raw_flags(args):
    """The sampling flags as a RawRequest (unset flags: None, so the defaults apply). EOS ids
    need no listing here: the tokenizer's are merged into the model config at load time."""
    from jaxpd.request_check import RawRequest

    return RawRequest(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, stop=args.stop,
                      ignore_eos=args.ignore_eos or None, logprobs=args.logprobs or None)


def _checked_requests(args, cfg):
    """(request defaults, prompts as engine requests or None in batch mode) from the flags,
    through the one request check (`jaxpd.request_check`) and before any weight is loaded, so
    a bad flag costs no model load."""
    import dataclasses

    from jaxpd.engine.request import Request
    from jaxpd.model.checkpoint import default_checkpoint, load_config
    from jaxpd.request_check import InvalidRequest, Limits, check_request, check_sampling
    from jaxpd.tokenizer import tokenizer_for_checkpoint

    folder = cfg.model.checkpoint or default_checkpoint()
    tokenizer = tokenizer_for_checkpoint(folder)
    pages = (cfg.decode or cfg.prefill)[0].num_pages or cfg.kv.num_pages  # the KV holder's pool
    limits = Limits.of(load_config(folder), (pages - 1) * cfg.kv.page_size)
    raw = _raw_flags(args)
    try:
        defaults = check_sampling(raw, limits, tokenizer)
        if args.input is not None:
            return defaults, None
        if args.prompt is not None:
            inputs = [dataclasses.replace(raw, prompt=text) for text in args.prompt]
        else:
            inputs = [dataclasses.replace(raw, prompt_token_ids=ids) for ids in args.prompt_ids]
        requests = []
        for i, one in enumerate(inputs):
            checked = check_request(one, limits, tokenizer)
            requests.append(Request(str(i), checked.prompt_ids, checked.sampling))
    except InvalidRequest as e:
        raise _flag_error(e) from None
    return defaults, requests


def _load_engine(cfg):
    """(engine, tokenizer or None, model folder) for an in-process deployment."""
    import jax

    from jaxpd.engine.builder import build_engine
    from jaxpd.model.checkpoint import load_model
    from jaxpd.model.sharding import make_mesh
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint

    prefill = cfg.prefill[0].replica_devices(0)  # an in-process engine: each role's first group
    decode = cfg.decode[0].replica_devices(0) if cfg.mode == "disaggregated" and cfg.decode else []
    _check_devices(max(prefill + decode) + 1)
    devices = jax.devices()
    load_mesh = make_mesh([devices[i] for i in prefill], cfg.prefill[0].tp)
    model = load_model(cfg.model.checkpoint, load_mesh, cfg.model.dtype, cfg.model.scan_layers,
                       cfg.model.weight_dtype)
    tokenizer = tokenizer_for_checkpoint(model.folder)
    config = merge_tokenizer_eos(model.config, tokenizer)
    return build_engine(config, model.params, cfg), tokenizer, model.folder


def cmd_generate(args) -> int:
    from jaxpd import compile_cache
    from jaxpd.batch import run_batch

    compile_cache.enable(args.compile_cache)

    if (args.input is None) != (args.output is None):
        raise JaxpdError("--input and --output go together (batch mode)")
    deployment = _deployment(args)
    defaults, requests = _checked_requests(args, deployment)
    engine, tokenizer, folder = _load_engine(deployment)
    engine.prepare_programs(args.precompile)
    try:
        if args.input is not None:
            summary = run_batch(args.input, args.output, engine, tokenizer, defaults,
                                progress=not args.no_progress)
            print(json.dumps(summary.as_dict()), file=sys.stderr)
            return 0
        return _generate_prompts(args, engine, tokenizer, requests)
    finally:
        engine.stop_compiling()


def _generate_prompts(args, engine, tokenizer, requests) -> int:
    """--prompt / --prompt-ids: live text for one prompt, else one line (or JSON) per prompt."""
    from jaxpd.compile_status import CompileStatus
    from jaxpd.engine.output import TextStream, drive_engine

    streams, prompts = {}, [r.prompt_ids for r in requests]
    for request in requests:
        engine.add_request(request)
        if tokenizer is not None:
            streams[request.id] = TextStream(tokenizer, request.prompt_ids, request.sampling.stop)
    live = not args.json and tokenizer is not None and len(prompts) == 1
    final = {}
    status = CompileStatus(runner for runner, _ in engine.shapes())

    def on_output(o, stream, text: str) -> None:
        if live and not status.done:  # the prompt goes out once the status line is gone
            status.first_token()
            if args.prompt is not None:
                print(args.prompt[0], end="", flush=True)
        status.first_token()
        if live and text:
            print(text, end="", flush=True)
        if o.finished:
            final[o.id] = o

    start = time.perf_counter()
    with status:
        drive_engine(engine, streams, on_output)
    elapsed = time.perf_counter() - start
    if live:
        print(flush=True)
        return 0
    for i, prompt in enumerate(prompts):
        o = final[str(i)]
        text = streams[o.id].text if tokenizer is not None else ""
        if args.json:
            record = {
                "index": i, "prompt_token_ids": list(prompt), "token_ids": list(o.token_ids),
                "text": text, "finish_reason": o.finish_reason,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(o.token_ids),
                          "total_tokens": len(prompt) + len(o.token_ids)},
                "elapsed_s": round(elapsed, 4)}
            if o.logprobs is not None:
                record["logprobs"] = [round(x, 6) for x in o.logprobs]
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text if tokenizer is not None else " ".join(map(str, o.token_ids)))
    return 0


def cmd_convert(args) -> int:
    from jaxpd.model.checkpoint import load_model
    from jaxpd.model.orbax_checkpoint import save_orbax

    model = load_model(args.checkpoint, _mesh(args.tp), args.dtype)
    out = save_orbax(args.out, model.params, model.config, tokenizer_from=model.folder)
    print(f"saved {model.config.num_params():,} parameters to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxpd.deploy import render_cli
    from jaxpd.placement import place_cli, simulate_cli
    from jaxpd.serving import client_cli, serve_cli

    handlers = {"generate": cmd_generate, "convert": cmd_convert, "serve": serve_cli.run,
                "client": client_cli.run, "place": place_cli.run, "deploy": render_cli.run,
                "simulate": simulate_cli.run}
    try:
        return handlers[args.command](args)
    except JaxpdError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
