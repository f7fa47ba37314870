"""The `jaxpd` command line.

    jaxpd generate --prompt "It is a truth" --max-tokens 32
    jaxpd generate --checkpoint ./Llama-3.1-8B --prompt-ids 1,2,3 --max-tokens 8 --temperature 0 --tp 2 --json
    jaxpd convert --checkpoint ./hf-folder --out ./orbax-folder --tp 2

Errors a user can fix (bad checkpoint, bad flags) print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from jaxpd.errors import JaxpdError

EXIT_USAGE = 2


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids takes comma-separated integers like 1,2,3; got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids needs at least one token id")
    return ids


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a Hugging Face folder (config.json + *.safetensors) or a jaxpd orbax "
                        "checkpoint; default: the embedded model trained on Jane Austen")
    p.add_argument("--tp", type=_positive, default=1, metavar="N",
                   help="tensor-parallel degree: shard the model over the first N devices (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's; float32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpd", description="Disaggregated prefill/decode LLM serving on JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate", help="continue prompts with a model",
        description="Continue one or more prompts. Prints text as it is generated, or one JSON "
                    "object per prompt with --json.")
    _add_model_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=_prompt_ids, metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 1,2,3 (repeat for a batch)")
    gen.add_argument("--max-tokens", type=_positive, default=32, metavar="N",
                     help="tokens to generate per prompt (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0 = greedy (default); > 0 samples from softmax(logits / T)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="keep generating past end-of-sequence tokens")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: token_ids (generated only), text, "
                          "finish_reason, usage")

    conv = sub.add_parser(
        "convert", help="save a checkpoint as a jaxpd orbax checkpoint",
        description="Load a checkpoint (HF or orbax) onto a TP mesh and save it with orbax; the "
                    "result restores onto any TP degree.")
    _add_model_args(conv)
    conv.add_argument("--out", required=True, metavar="DIR", help="new folder to write")
    return parser


def _mesh(tp: int):
    import jax

    from jaxpd.model.sharding import make_mesh

    devices = jax.devices()
    if tp > len(devices):
        raise JaxpdError(f"--tp {tp} needs {tp} devices but only {len(devices)} are visible "
                         f"({devices[0].platform}); on CPU set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={tp}")
    return make_mesh(devices[:tp], tp)


def _tokenizer(folder):
    """The checkpoint's tokenizer, or None: guessing one would turn ids into confident nonsense."""
    from jaxpd.tokenizer import load_tokenizer
    from jaxpd.tokenizer.hf import TOKENIZER_FILE

    return load_tokenizer(folder) if (folder / TOKENIZER_FILE).exists() else None


def cmd_generate(args) -> int:
    from jaxpd.generate import Generator, SamplingParams
    from jaxpd.model.checkpoint import load_model
    from jaxpd.tokenizer import IncrementalDetokenizer

    model = load_model(args.checkpoint, _mesh(args.tp), args.dtype)
    tokenizer = _tokenizer(model.folder)
    if args.prompt is not None:
        if tokenizer is None:
            raise JaxpdError(f"{model.folder} has no tokenizer.json; pass --prompt-ids instead of --prompt")
        prompts = [tokenizer.encode(text) for text in args.prompt]
    else:
        prompts = args.prompt_ids
    stop = () if args.ignore_eos else tuple(
        set(model.config.eos_token_ids) | set(getattr(tokenizer, "eos_token_ids", ()) or ()))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              seed=args.seed, stop_token_ids=stop)
    generator = Generator(model.config, model.params, _mesh(args.tp) if args.tp > 1 else None)

    stream = None
    if not args.json and tokenizer is not None and len(prompts) == 1:
        detok = IncrementalDetokenizer(tokenizer, context=prompts[0])
        if args.prompt is not None:
            print(args.prompt[0], end="", flush=True)

        def stream(index: int, token: int) -> None:
            print(detok.push(token), end="", flush=True)

    start = time.perf_counter()
    outputs = generator.generate(prompts, sampling, on_token=stream)
    elapsed = time.perf_counter() - start
    if stream is not None:
        print(detok.flush(), flush=True)
        return 0
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        text = tokenizer.decode(out) if tokenizer is not None else ""
        if args.json:
            finish = "stop" if out and out[-1] in stop else "length"
            print(json.dumps({
                "index": i, "prompt_token_ids": list(prompt), "token_ids": out, "text": text,
                "finish_reason": finish,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out),
                          "total_tokens": len(prompt) + len(out)},
                "elapsed_s": round(elapsed, 4)}))
        else:
            print(text if tokenizer is not None else " ".join(map(str, out)))
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
    handlers = {"generate": cmd_generate, "convert": cmd_convert}
    try:
        return handlers[args.command](args)
    except JaxpdError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
