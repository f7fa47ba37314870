"""How KV reaches a multi-host decode replica: the leader forwards each host its own KV heads
("scatter", what jaxpd does), or every host all of them ("broadcast"), beside the same write
on one host alone ("one host": a replica that receives each host's heads directly could do
no better than this per host).

One request's KV (`--preset`'s shape, `--tokens` tokens, cut into `--message-mib` pieces as the
gRPC stream cuts it) is written into a page pool sharded over 4 CPU devices of 2 processes
(TP 4 across hosts, jax.distributed with gloo), through `ModelRunner.write_kv`: the leader
publishes each piece on the step stream and both hosts write it, as a served decode replica
does. The clock stops when a gather of the last page has reached the leader, so every host's
writes are in. "one host" writes the leader's half of the heads into a 2-device pool in this
process, with no stream. After each case the pool's bytes are checked against the input.

    .venv/bin/python tools/bench_multihost_kv.py                 # llama3-8b shape, 1024 tokens
    .venv/bin/python tools/bench_multihost_kv.py --tokens 256 --repeats 1

Prints one JSON object (seconds per case, bytes on the step stream, the ratio to one host).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--message-mib", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--host-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _runner(preset: str, tokens: int, devices, tp: int, kv_heads: int | None = None):
    import jax.numpy as jnp  # noqa: F401 - jax is initialised by now

    from jaxpd.engine.runner import ModelRunner
    from jaxpd.kv.layout import KVLayout
    from jaxpd.kv.manager import KVCacheManager
    from jaxpd.model.presets import get_preset
    from jaxpd.model.sharding import make_mesh

    config = get_preset(preset).replace(dtype="bfloat16")
    if kv_heads is not None:  # one host's share of the heads
        config = config.replace(num_kv_heads=kv_heads)
    mesh = make_mesh(devices, tp)
    layout = KVLayout.for_model(config, tp=tp, page_size=16)
    manager = KVCacheManager(layout, tokens // 16 + 2, mesh, prefix_caching=False)
    return ModelRunner(config, None, mesh, manager, "reference"), layout


def _pieces(layout, tokens: int, message_bytes: int):
    """The request's KV as the decode worker receives it: checked pieces, seeded data."""
    import ml_dtypes
    import numpy as np

    from jaxpd.transfer import wire
    from jaxpd.v1 import worker_pb2

    rng = np.random.default_rng(0)
    full = rng.standard_normal((layout.num_layers, 2, layout.model_kv_heads, tokens,
                                layout.head_dim), np.float32).astype(ml_dtypes.bfloat16)
    per = 2 * full.shape[2] * layout.head_dim * 2
    out = []
    for l0, l1, t0, t1 in wire.split_ranges(layout.num_layers, tokens, per, message_bytes):
        header = worker_pb2.KVHeader(request_id="r", layer_start=l0, layer_end=l1,
                                     token_start=t0, token_end=t1)
        out.append(wire.KVPiece(header, np.ascontiguousarray(full[l0:l1, :, :, t0:t1])))
    return full, out


def _write_all(runner, pages, pieces) -> float:
    """Seconds to write every piece and read back a gather (every host's writes done)."""
    import jax

    started = time.perf_counter()
    for piece in pieces:
        runner.write_kv(pages, piece)
    arr, _ = runner.gather_kv(pages, len(pages) * 16 - 16, len(pages) * 16)
    jax.block_until_ready(arr)
    return time.perf_counter() - started


def _check(runner, pages, full, tokens: int) -> bool:
    import numpy as np

    arr, offset = runner.gather_kv(pages, 0, tokens)
    got = np.asarray(arr)[:, :, :, offset:offset + tokens]
    return bool(np.array_equal(got.view(np.uint16), full.view(np.uint16)))


def host(args) -> int:
    """One process of the 2-host replica (index 0 leads and times)."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxpd.serving import multihost

    group = multihost.HostGroup(2, args.host_index, args.coordinator)
    multihost.initialize(group, 120)
    import jax

    runner, layout = _runner(args.preset, args.tokens, jax.devices()[:4], 4)
    pages = list(range(1, args.tokens // 16 + 1))
    if not group.leader:
        sock = multihost.connect(group, "bench", 60)
        return multihost.follow(sock, runner.execute, group.index)
    steps = multihost.StepLeader(group, "bench", 60.0, lambda why: os._exit(3))
    steps.accept(60)
    runner.lockstep = steps.publish
    message_bytes = int(args.message_mib * (1 << 20))
    full, pieces = _pieces(layout, args.tokens, message_bytes)
    result = {"preset": args.preset, "tokens": args.tokens, "message_mib": args.message_mib,
              "kv_bytes": int(full.nbytes), "devices": "cpu, 2 processes x 2 devices, TP 4"}
    for mode in ("scatter", "broadcast"):
        runner.kv_delivery = mode
        _write_all(runner, pages, pieces)  # warm-up: compiles the write and gather programs
        before = steps.bytes
        times = [_write_all(runner, pages, pieces) for _ in range(args.repeats)]
        result[mode] = {"seconds": min(times), "stream_bytes_per_write":
                        (steps.bytes - before) // args.repeats,
                        "correct": _check(runner, pages, full, args.tokens)}
    steps.close()
    half = layout.model_kv_heads // 2
    one, one_layout = _runner(args.preset, args.tokens, jax.local_devices()[:2], 2, half)
    _, mine = _pieces(one_layout, args.tokens, message_bytes)
    _write_all(one, pages, mine)
    result["one_host"] = {"seconds": min(_write_all(one, pages, mine)
                                         for _ in range(args.repeats))}
    for mode in ("scatter", "broadcast"):
        result[mode]["vs_one_host"] = round(result[mode]["seconds"] /
                                            result["one_host"]["seconds"], 2)
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host_index is not None:
        code = host(args)
        sys.stdout.flush()
        os._exit(code)
    from jaxpd.serving.launcher import free_port_pair

    coordinator = f"127.0.0.1:{free_port_pair('127.0.0.1')}"
    argv = [a for a in (argv or sys.argv[1:])]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--host-index", str(i),
                               "--coordinator", coordinator], cwd=REPO,
                              stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True) for i in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=1800)
        procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if procs[0].returncode or not lines:
        print(f"error: the leader exited with status {procs[0].returncode}", file=sys.stderr)
        return 1
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
