#!/usr/bin/env python3
"""Engine micro-benchmark: prefill throughput/MFU and decode step time/MBU for a preset.

Random weights; one paged model step per measurement (the same jitted step the engines run).

    python tools/bench_engine.py --preset llama3-8b --dtype bfloat16 --batch 1,8,64 --context 512,2048
    python tools/bench_engine.py --preset bench-30m --batch 1,32 --context 256,1024   # CPU
    python tools/bench_engine.py --preset default --tp 2 --through-engine   # as a worker runs

Prints one JSON object: device, peaks used, and a row per (phase, batch, context).

`--through-engine` times what a serving worker's engine thread does instead of the bare model
step: a prefill row is one `Engine.step` of a prefill worker (admission, scheduling, page
tables, the model step, sampling, the first tokens to the host, and each prompt's KV gathered
for its hand-off); a decode row is a token of continuous decoding through `Engine.step`
(dispatches of `decode_steps_per_dispatch` tokens included). A profile taken this way carries
the engine's host work per step, which the cost model then fits as its per-step overheads:
what `tools/bench_serving.py --simulate` needs to predict a served deployment.
`--alongside-decode B` measures while another process decodes B sequences continuously on the
same host, as a prefill worker runs beside its decode worker when both share one machine's
cores (the CPU deployment of `configs/local.yaml`); keep the default median statistic then,
since the contention is what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-30m")
    ap.add_argument("--dtype", default=None, help="override the preset dtype")
    ap.add_argument("--batch", type=_ints, default=[1, 8, 32])
    ap.add_argument("--context", type=_ints, default=[256, 1024])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--statistic", choices=["median", "min"], default="median",
                    help="per measurement over the repeats; min resists a shared machine's "
                         "interference (it only ever slows a run), which profiles want")
    ap.add_argument("--device-key", metavar="KEY",
                    help="catalog key of this device (configs/hardware/KEY.yaml), recorded so "
                         "`jaxpd place` calibrates that device from this profile")
    ap.add_argument("--breakdown", type=int, default=0, metavar="STEPS",
                    help="also run the engine itself (scheduler, runner, sampling) for this many "
                         "decode steps per (batch, context) and split each step into host "
                         "preparation, dispatch and device + fetch time")
    ap.add_argument("--through-engine", action="store_true",
                    help="time each row through the engine a serving worker runs (host work "
                         "included) instead of the bare model step; see above")
    ap.add_argument("--decode-tokens", type=int, default=24,
                    help="--through-engine: tokens each decode row times per sequence")
    ap.add_argument("--alongside-decode", type=int, default=0, metavar="B",
                    help="--through-engine: measure while another process on this host decodes "
                         "B sequences continuously (a decode worker sharing the cores)")
    ap.add_argument("--keep-decoding", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.alongside_decode and not args.through_engine:
        ap.error("--alongside-decode needs --through-engine")

    from jaxpd import hardware
    from jaxpd.engine import attention as attention_lib
    from jaxpd.engine import model_step
    from jaxpd.engine.sampling import SamplingParams, sampling_arrays
    from jaxpd.kv.layout import KVLayout
    from jaxpd.kv.pool import create_pages
    from jaxpd.model import forward
    from jaxpd.model.presets import get_preset
    from jaxpd.model.sharding import abstract_params, make_mesh, param_shardings

    cfg = get_preset(args.preset)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    mesh = make_mesh(jax.devices()[:args.tp], args.tp)
    shardings = param_shardings(abstract_params(cfg), cfg, mesh)
    params = jax.jit(lambda: forward.init_params(cfg, jax.random.key(0)), out_shardings=shardings)()
    backend = attention_lib.resolve(args.attention, head_dim=cfg.head_dim, dtype=cfg.dtype)
    name, prefill_attn, decode_attn = backend.name, backend.prefill, backend.decode
    device = jax.devices()[0]
    peaks = hardware.lookup(device) if device.platform != "cpu" else hardware.measure_cpu_peaks()
    weight_bytes = cfg.num_params() * jnp.dtype(cfg.jnp_dtype).itemsize
    dense_flops_per_token = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_word_embeddings))
    layout = KVLayout.for_model(cfg, tp=args.tp, page_size=args.page_size)
    rows = []

    def timed(fn):
        fn()  # compile
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) if args.statistic == "min" else statistics.median(times)

    for context in ([] if args.through_engine else args.context):
        for batch in args.batch:
            pages_per_seq = math.ceil((context + 1) / args.page_size)
            num_pages = batch * pages_per_seq + 1
            kv = create_pages(layout, num_pages, mesh)
            table = jnp.asarray(1 + np.arange(batch * pages_per_seq, dtype=np.int32).reshape(batch, pages_per_seq))
            sampling = sampling_arrays([SamplingParams()] * batch, [0] * batch, [0] * batch, batch)
            tokens = jnp.ones((batch, context), jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
            state = {"kv": kv}

            def prefill():
                out, _, state["kv"] = model_step.step(params, state["kv"], tokens, positions, table, sampling,
                                                      config=cfg, mesh=mesh, attention=prefill_attn)
                out.block_until_ready()

            t = timed(prefill)
            attn_flops = 2 * cfg.num_layers * batch * context * context * cfg.num_heads * cfg.head_dim  # causal QK+PV
            flops = dense_flops_per_token * batch * context + attn_flops
            rows.append({"phase": "prefill", "batch": batch, "context": context, "seconds": round(t, 5),
                         "tokens_per_s": round(batch * context / t, 1), "tflops": round(flops / t / 1e12, 4),
                         "mfu": round(flops / t / peaks.flops, 4) if peaks else None})

            dtok = jnp.ones((batch, 1), jnp.int32)
            dpos = jnp.full((batch, 1), context, jnp.int32)

            def decode():
                out, _, state["kv"] = model_step.step(params, state["kv"], dtok, dpos, table, sampling,
                                                      config=cfg, mesh=mesh, attention=decode_attn)
                out.block_until_ready()

            t = timed(decode)
            kv_bytes = batch * (context + 1) * cfg.kv_bytes_per_token() * layout.head_repeat
            rows.append({"phase": "decode", "batch": batch, "context": context, "step_ms": round(t * 1e3, 3),
                         "tokens_per_s": round(batch / t, 1), "bytes_per_step": weight_bytes + kv_bytes,
                         "mbu": round((weight_bytes + kv_bytes) / t / peaks.bandwidth, 4) if peaks else None})
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), file=sys.stderr)

    if args.keep_decoding:  # the neighbour of --alongside-decode: until it is killed
        _engine_rows(cfg, params, args, None, weight_bytes, layout, forever=True)
    extra = {}
    if args.through_engine:
        rows, beside = _engine_rows(cfg, params, args, peaks, weight_bytes, layout)
        if beside:
            alone = [r["seconds"] for r in rows if r["phase"] == "prefill"]
            extra["alongside_decode"] = {
                "batch": args.alongside_decode,
                "prefill_slowdown": round(statistics.median(
                    b["seconds"] / a for a, b in zip(alone, beside)), 3),
                "prefill_rows": beside}
    breakdown = []
    if args.breakdown:
        for context in args.context:
            for batch in args.batch:
                breakdown.append(_engine_breakdown(cfg, params, args, batch, context, peaks,
                                                   weight_bytes, layout))
                print(json.dumps(breakdown[-1]), file=sys.stderr)

    meta = {"device_key": args.device_key, "date": datetime.date.today().isoformat(),
            "command": "python tools/bench_engine.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
            "statistic": args.statistic, "repeats": args.repeats}
    print(json.dumps({**meta, "preset": args.preset, "dtype": cfg.dtype, "params": cfg.num_params(),
                      "device": device.device_kind, "platform": device.platform, "tp": args.tp,
                      "attention": name, "through_engine": args.through_engine,
                      "peak_flops": peaks.flops if peaks else None,
                      "peak_bandwidth": peaks.bandwidth if peaks else None, "rows": rows, **extra,
                      **({"engine_breakdown": breakdown} if breakdown else {})}))
    return 0


@contextlib.contextmanager
def _neighbour(args):
    """With --alongside-decode B: a process decoding B sequences of this preset at TP 1 on
    this host for as long as the block runs (started and warm before it begins)."""
    if not args.alongside_decode:
        yield
        return
    cmd = [sys.executable, __file__, "--preset", args.preset, "--tp", "1", "--through-engine",
           "--keep-decoding", "--batch", str(args.alongside_decode), "--context", "128",
           "--decode-tokens", "256", "--page-size", str(args.page_size)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "decoding":
            raise SystemExit("--alongside-decode: the neighbour process did not start")
        yield
    finally:
        proc.kill()
        proc.wait()


def _engine_rows(cfg, params, args, peaks, weight_bytes: int, layout, *,
                 forever: bool = False) -> tuple[list[dict], list[dict]]:
    """Profile rows timed through the engine of one worker (see the module docstring), and
    with --alongside-decode the prefill rows again beside a decoding process. Each prefill row
    is exactly one engine step: the chunk size and step budget cover every (batch, context),
    and powers of two need no bucket padding."""
    import numpy as np

    from jaxpd.config import SchedulerSection, parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams

    batches, contexts = args.batch, args.context
    # a decode row's requests: 2 tokens to start decoding, the first decode call (up to
    # decode_steps_per_dispatch tokens) before the clock, then the timed tokens
    n_decode = args.decode_tokens + 2 + SchedulerSection().decode_steps_per_dispatch
    most = max(batches) * -(-(max(contexts) + n_decode) // args.page_size) + 8
    chunk = 1 << (max(max(contexts), 16) - 1).bit_length()
    deployment = parse_config(
        {"mode": "colocated", "prefill": {"devices": list(range(args.tp)), "tp": args.tp},
         "kv": {"page_size": args.page_size, "num_pages": most}, "attention": args.attention,
         "scheduler": {"chunk_size": chunk, "max_prefill_tokens": max(batches) * chunk,
                       "max_decode_batch": max(batches), "prefix_caching": False,
                       "prefill_batch_sizes": sorted({1 << (b - 1).bit_length() for b in batches})}},
        "bench_engine --through-engine")
    engine = build_engine(cfg, params, deployment)
    runner = engine.prefill.runner
    rng = np.random.default_rng(0)
    serial = iter(range(1 << 30))

    def requests(batch, context, max_tokens):
        return [Request(f"r{next(serial)}", tuple(int(t) for t in rng.integers(2, cfg.vocab_size,
                                                                                context)),
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                for _ in range(batch)]

    def prefill_once(batch, context) -> float:
        """A prefill worker's step: prefill, first tokens, each prompt's KV gathered."""
        engine.send_prefilled = True
        reqs = requests(batch, context, 2)
        for r in reqs:
            engine.add_request(r)
        start = time.perf_counter()
        while len(engine.sending) < batch:
            engine.step()
        gathered = [runner.gather_kv(seq.pages.pages, 0, seq.num_computed)[0]
                    for seq in engine.sending.values()]
        jax.block_until_ready(gathered)
        seconds = time.perf_counter() - start
        for r in reqs:
            engine.release_sent(r.id)
        return seconds

    def decode_once(batch, context) -> float:
        """Seconds per token of `batch` sequences decoding together from `context` tokens."""
        engine.send_prefilled = False
        reqs = requests(batch, context, n_decode)
        for r in reqs:
            engine.add_request(r)
        made = dict.fromkeys((r.id for r in reqs), 0)
        while engine.prefilling or engine.waiting or min(made.values()) < 2:  # all decoding
            for out in engine.step():
                made[out.id] = len(out.token_ids)
        start, first = time.perf_counter(), min(made.values())
        while engine.has_work():
            for out in engine.step():
                made[out.id] = len(out.token_ids)
        return (time.perf_counter() - start) / (min(made.values()) - first)

    if forever:
        decode_once(max(batches), max(contexts))  # compiled: the measuring process may start
        print("decoding", flush=True)
        while True:
            decode_once(max(batches), max(contexts))

    def measure(fn):
        fn()  # compiles the shapes this row uses
        times = [fn() for _ in range(args.repeats)]
        return min(times) if args.statistic == "min" else statistics.median(times)

    rows = []
    dense_flops_per_token = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size
                                 * (not cfg.tie_word_embeddings))

    def prefill_row(batch, context) -> dict:
        t = measure(lambda: prefill_once(batch, context))
        flops = (dense_flops_per_token * batch * context
                 + 2 * cfg.num_layers * batch * context * context * cfg.num_heads * cfg.head_dim)
        return {"phase": "prefill", "batch": batch, "context": context,
                "seconds": round(t, 5), "tokens_per_s": round(batch * context / t, 1),
                "mfu": round(flops / t / peaks.flops, 4) if peaks else None}

    for context in contexts:
        for batch in batches:
            rows.append(prefill_row(batch, context))
            t = measure(lambda: decode_once(batch, context))
            mid = context + args.decode_tokens // 2  # the middle of the timed tokens
            kv_bytes = batch * (mid + 1) * cfg.kv_bytes_per_token() * layout.head_repeat
            rows.append({"phase": "decode", "batch": batch, "context": mid,
                         "step_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1),
                         "bytes_per_step": weight_bytes + kv_bytes,
                         "mbu": round((weight_bytes + kv_bytes) / t / peaks.bandwidth, 4)
                         if peaks else None})
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), file=sys.stderr)
    beside = []
    if args.alongside_decode:
        with _neighbour(args):
            for context in contexts:
                for batch in batches:
                    beside.append(prefill_row(batch, context))
                    print("beside a decoding process:", json.dumps(beside[-1]), file=sys.stderr)
    return rows, beside


def _engine_breakdown(cfg, params, args, batch: int, context: int, peaks, weight_bytes: int,
                      layout) -> dict:
    """Where an engine decode step's time goes: `batch` requests of `context` prompt tokens
    decoding `args.breakdown` tokens each through the real engine (the shape compiled first)."""
    import numpy as np

    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams

    steps = args.breakdown
    pages = batch * -(-(context + steps + 1) // args.page_size) + 8
    deployment = parse_config({"prefill": {"devices": list(range(args.tp)), "tp": args.tp},
                               "kv": {"page_size": args.page_size, "num_pages": pages},
                               "attention": args.attention,
                               "scheduler": {"max_decode_batch": batch, "prefix_caching": False,
                                             "max_prefill_tokens": max(2048, context)}},
                              "bench_engine --breakdown")
    engine = build_engine(cfg, params, deployment)
    rng = np.random.default_rng(0)

    def requests(tag):
        return [Request(f"{tag}{i}", tuple(int(t) for t in rng.integers(2, cfg.vocab_size, context)),
                        SamplingParams(max_tokens=steps, ignore_eos=True)) for i in range(batch)]

    engine.run_to_completion(requests("warm"))  # compiles every shape the measured run uses
    runner = engine.decode.runner
    runner.decode_breakdown.update(dispatches=0, steps=0, host_s=0.0, dispatch_s=0.0, device_s=0.0)
    start = time.perf_counter()
    engine.run_to_completion(requests("run"))
    wall = time.perf_counter() - start
    b = runner.decode_breakdown
    n = max(b["steps"], 1)
    step = (b["host_s"] + b["dispatch_s"] + b["device_s"]) / n
    kv_bytes = batch * (context + steps / 2) * cfg.kv_bytes_per_token() * layout.head_repeat
    return {"batch": batch, "context": context, "decode_steps": b["steps"],
            "decode_dispatches": b["dispatches"], "wall_s": round(wall, 3),
            "step_ms": round(step * 1e3, 3),
            "host_ms": round(b["host_s"] / n * 1e3, 3), "dispatch_ms": round(b["dispatch_s"] / n * 1e3, 3),
            "device_and_fetch_ms": round(b["device_s"] / n * 1e3, 3),
            "host_share": round(b["host_s"] / n / step, 3) if step else None,
            "bytes_per_step": int(weight_bytes + kv_bytes),
            "gb_per_s": round((weight_bytes + kv_bytes) / step / 1e9, 3) if step else None,
            "bandwidth_roof_share": round((weight_bytes + kv_bytes) / step / peaks.bandwidth, 3)
            if peaks and step else None}


if __name__ == "__main__":
    sys.exit(main())
