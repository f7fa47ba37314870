#!/usr/bin/env python3
"""jaxpd against Hugging Face transformers on CPU: one checkpoint, two workloads, one run.

(a) latency: one request, 256 prompt + 128 output tokens.
(b) offline: 256 requests, prompt lengths 32-1024 and output lengths 16-512 (fixed seed). HF runs
    it as its users do (left-padded batches of 32, each batch until its longest output); jaxpd
    puts every request in flight through continuous batching.
(c) plain batch (jaxpd only): 32 equal requests of 256 prompt + 128 output tokens.

Each is also set against this machine's roofline for the job (`roofline_seconds`): the
prefill's dense and attention FLOPs at the measured matmul peak, plus, per decode step, the
larger of its FLOPs at that peak and its weight and KV bytes at the measured memory bandwidth.

The checkpoint is the `bench-30m` shape (8 layers, width 512, vocab 8192, fp32, ~34M params)
with random weights, written once as an HF folder that both sides load. HF runs in the tool venv
(torch + transformers) as a subprocess; both sides get 2 CPU threads' worth of the machine.

    python tools/bench_vs_hf.py --hf-python .toolvenv/bin/python [--scale 0.25] [--out bench.json]

Prints one JSON object: tokens/s of each side, their ratios, jaxpd's achieved FLOP/s next to the
machine's measured matmul peak, and whether both sides produced the same greedy tokens on (a).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxpd.config import DeploymentConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def workload(scale: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = max(32, int(256 * scale))
    prompt_lens = rng.integers(32, 1025, n)
    outs = rng.integers(16, 513, n)
    prompts = [rng.integers(3, 8192, int(L)).tolist() for L in prompt_lens]
    return {
        "latency": {"prompt": rng.integers(3, 8192, 256).tolist(), "max_tokens": 128},
        "offline": {"prompts": prompts, "max_tokens": [int(x) for x in outs], "batch_size": 32},
        "plain": {"prompts": [rng.integers(3, 8192, 256).tolist() for _ in range(32)],
                  "max_tokens": 128},
    }


def roofline_seconds(config, prompt_lens: list[int], output_lens: list[int], peaks) -> float:
    """Lower bound on a job's time on this machine, every request in flight at once: the
    prefill's dense and attention FLOPs at the matmul peak, then per decode step the larger of
    its FLOPs at that peak and the bytes it must read (the weights once, each live request's
    KV) at the measured bandwidth. No compilation, no host time, no batch limit."""
    dense = 2 * (config.num_params() - config.vocab_size * config.hidden_size)  # per token
    attn_width = config.num_layers * config.num_heads * config.head_dim
    itemsize = 2 if config.dtype in ("bfloat16", "float16") else 4
    weights = config.num_params() * itemsize
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    prompts, outputs = np.asarray(prompt_lens, np.float64), np.asarray(output_lens)
    total = float(np.sum(dense * prompts + 2 * 2 * prompts * prompts / 2 * attn_width)) / peaks.flops
    for step in range(int(outputs.max()) - 1):  # the first output token comes from the prefill
        live = step < outputs - 1
        context = float(np.sum(prompts[live] + step + 1))
        flops = int(live.sum()) * dense + 2 * 2 * context * attn_width
        total += max(flops / peaks.flops, (weights + context * kv_per_token) / peaks.bandwidth)
    return total


def run_jaxpd(checkpoint: Path, work: dict, deployment: DeploymentConfig) -> dict:
    import jax

    from jaxpd import hardware
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model

    model = load_model(checkpoint, scan_layers=deployment.model.scan_layers)
    peaks = hardware.measure_cpu_peaks()
    dense_flops = 2 * (model.config.num_params() - model.config.vocab_size * model.config.hidden_size)

    def run(requests):
        engine = build_engine(model.config, model.params, deployment)
        t = time.perf_counter()
        final = engine.run_to_completion(requests)
        return engine, final, time.perf_counter() - t

    lat = work["latency"]
    sp = SamplingParams(max_tokens=lat["max_tokens"], ignore_eos=True)
    run([Request("warm", tuple(lat["prompt"]), sp)])  # compile the single-request shapes
    engine, final, seconds = run([Request("a", tuple(lat["prompt"]), sp)])
    floor = roofline_seconds(model.config, [len(lat["prompt"])], [lat["max_tokens"]], peaks)
    result = {"latency": {"seconds": seconds, "output_tokens": lat["max_tokens"],
                          "tokens_per_s": lat["max_tokens"] / seconds,
                          "roofline_seconds": floor, "fraction_of_roofline": floor / seconds,
                          "token_ids": list(final["a"].token_ids)}}

    off = work["offline"]
    requests = [Request(f"r{i}", tuple(p), SamplingParams(max_tokens=m, ignore_eos=True))
                for i, (p, m) in enumerate(zip(off["prompts"], off["max_tokens"]))]
    engine, final, seconds = run(requests)
    useful = sum(off["max_tokens"])
    prompt_tokens = sum(len(p) for p in off["prompts"])
    flops = dense_flops * (prompt_tokens + useful)
    compiling = sum(r.seconds["compile"] for r, _ in engine.shapes())  # steps waiting on XLA
    result["offline"] = {
        "seconds": seconds, "output_tokens": useful, "tokens_per_s": useful / seconds,
        "compiled_programs": sum(len(r.programs) for r, _ in engine.shapes()),
        "compile_seconds": compiling,  # compiling step programs on the request path, included
        "tokens_per_s_excluding_compilation": useful / (seconds - compiling),
        "roofline_seconds": (floor := roofline_seconds(
            model.config, [len(p) for p in off["prompts"]], off["max_tokens"], peaks)),
        "fraction_of_roofline": floor / seconds,
        "fraction_of_roofline_excluding_compilation": floor / (seconds - compiling),
        "achieved_gflops": flops / seconds / 1e9, "first_tokens": [list(final[f"r{i}"].token_ids[:4]) for i in range(len(requests))],
    }
    plain = work["plain"]
    sp = SamplingParams(max_tokens=plain["max_tokens"], ignore_eos=True)
    batch = [Request(f"p{i}", tuple(p), sp) for i, p in enumerate(plain["prompts"])]
    run([Request(f"w{r.id}", r.prompt_ids, sp) for r in batch])  # compile its shapes
    engine, final, seconds = run(batch)
    floor = roofline_seconds(model.config, [len(p) for p in plain["prompts"]],
                             [plain["max_tokens"]] * len(batch), peaks)
    result["plain_batch"] = {
        "seconds": seconds, "output_tokens": len(batch) * plain["max_tokens"],
        "tokens_per_s": len(batch) * plain["max_tokens"] / seconds,
        "roofline_seconds": floor, "fraction_of_roofline": floor / seconds}
    result["machine"] = {"matmul_peak_gflops": peaks.flops / 1e9,
                         "bandwidth_gb_per_s": peaks.bandwidth / 1e9, "devices": str(jax.devices()[0])}
    result["deployment"] = deployment.model_dump(mode="json")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-python", default=str(REPO / ".toolvenv" / "bin" / "python"),
                    help="a Python with torch and transformers (see `make fixtures`)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 256 offline requests")
    ap.add_argument("--skip-hf", action="store_true", help="jaxpd side only")
    ap.add_argument("--max-decode-batch", type=int, default=128)
    ap.add_argument("--num-pages", type=int, default=8192)
    ap.add_argument("--scan-layers", action="store_true",
                    help="run jaxpd's scanned layer stack (model.scan_layers: true)")
    ap.add_argument("--offline-precompile", default="background",
                    help="also run (b) as a user does, `jaxpd generate --input` in a fresh "
                         "process with an empty compilation cache, with this --precompile "
                         "mode ('none' skips it)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    from jaxpd.config import parse_config
    from jaxpd.model import forward
    from jaxpd.model.hf_export import save_hf_checkpoint
    from jaxpd.model.presets import get_preset

    import jax

    work = workload(args.scale)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench-30m"
        cfg = get_preset("bench-30m")
        save_hf_checkpoint(ckpt, forward.init_params(cfg, jax.random.key(0)), cfg)
        (Path(tmp) / "work.json").write_text(json.dumps(work))
        deployment = parse_config({
            "model": {"scan_layers": args.scan_layers},
            "kv": {"page_size": 16, "num_pages": args.num_pages},
            "scheduler": {"chunk_size": 512, "max_prefill_tokens": 2048,
                          "max_decode_batch": args.max_decode_batch}}, "bench_vs_hf")
        result = {"jaxpd": run_jaxpd(ckpt, work, deployment), "workload": {
            "offline_requests": len(work["offline"]["prompts"]),
            "offline_prompt_tokens": sum(map(len, work["offline"]["prompts"])),
            "offline_output_tokens": sum(work["offline"]["max_tokens"])}}
        if args.offline_precompile != "none":
            from bench_offline import run_once, write_records

            cli = run_once(Path(tmp), ckpt, write_records(Path(tmp) / "offline.jsonl", work["offline"]),
                           "default", args.num_pages, args.offline_precompile)
            result["jaxpd"]["offline_cli"] = {**cli, "tokens_per_s": cli["completion_tokens"] / cli["wall_s"]}
        print(json.dumps({"jaxpd_done": {k: result["jaxpd"][k]["tokens_per_s"] for k in ("latency", "offline")}}),
              file=sys.stderr, flush=True)
        if not args.skip_hf:
            proc = subprocess.run([args.hf_python, str(REPO / "tools" / "hf_reference_generate.py"),
                                   "--checkpoint", str(ckpt), "--workload", str(Path(tmp) / "work.json")],
                                  stdout=subprocess.PIPE, text=True, check=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="2"))
            hf = json.loads(proc.stdout)
            result["hf"] = hf
            j = result["jaxpd"]
            result["summary"] = {
                "latency_tokens_per_s": {"jaxpd": j["latency"]["tokens_per_s"], "hf": hf["latency"]["tokens_per_s"],
                                         "ratio": j["latency"]["tokens_per_s"] / hf["latency"]["tokens_per_s"]},
                "offline_tokens_per_s": {"jaxpd": j["offline"]["tokens_per_s"], "hf": hf["offline"]["tokens_per_s"],
                                         "ratio": j["offline"]["tokens_per_s"] / hf["offline"]["tokens_per_s"]},
                **({"offline_cli_tokens_per_s": {
                    "jaxpd": j["offline_cli"]["tokens_per_s"], "hf": hf["offline"]["tokens_per_s"],
                    "ratio": j["offline_cli"]["tokens_per_s"] / hf["offline"]["tokens_per_s"],
                    "compile_share_of_wall": j["offline_cli"]["compile_seconds"] / j["offline_cli"]["wall_s"]}}
                   if "offline_cli" in j else {}),
                "latency_tokens_identical": j["latency"]["token_ids"] == hf["latency"]["token_ids"],
                "offline_first_tokens_identical_share": float(np.mean(
                    [a == b for a, b in zip(j["offline"]["first_tokens"], hf["offline"]["first_tokens"])])),
                "jaxpd_achieved_gflops": j["offline"]["achieved_gflops"],
                "matmul_peak_gflops": j["machine"]["matmul_peak_gflops"],
            }
    for side in ("jaxpd", "hf"):
        if side in result:
            for w in ("latency", "offline"):
                result[side][w].pop("token_ids", None)
                result[side][w].pop("first_tokens", None)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
