"""The offline job as a user runs it: `jaxpd generate --input` on bench_vs_hf's workload, cold.

    python tools/bench_offline.py [--scale 0.25] [--sizes default|pow4|...] [--out result.json]

Writes the `bench-30m` checkpoint (random weights, the same as tools/bench_vs_hf.py) and the
offline requests (prompts 32-1024 tokens, outputs 16-512, EOS ignored) as JSONL, then runs
`python -m jaxpd.cli generate --config ... --input ... --output ...` in a fresh process with an
empty persistent compilation cache. Prints one JSON object: wall time, the batch summary the
command printed (engine seconds, output tokens/s, seconds spent compiling step programs and
their share), and the bucket sizes used. `--sizes` picks the bucket lists (scheduler
`prefill_batch_sizes` / `prefill_chunk_sizes` / `decode_batch_sizes`) so families can be
compared side by side in one run (`--sizes default,pow4`).
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

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

CHUNK, MAX_DECODE = 512, 128


def bucket_sizes(name: str) -> dict:
    """The scheduler's bucket lists for a named family (`default`: powers of two)."""
    if name == "default":
        return {}
    if name == "pow4":  # every other power of two: half the programs, up to 4x padding
        return {"prefill_batch_sizes": [1, 4, 16], "prefill_chunk_sizes": [32, 128, 512],
                "decode_batch_sizes": [1, 4, 16, 64, 128]}
    if name == "few":  # one prefill shape per batch, few decode batches
        return {"prefill_batch_sizes": [1, 4, 16], "prefill_chunk_sizes": [128, 512],
                "decode_batch_sizes": [8, 32, 128]}
    raise SystemExit(f"--sizes: unknown family {name!r} (default, pow4, few)")


def run_once(work_dir: Path, checkpoint: Path, records: Path, sizes: str, num_pages: int,
             precompile: str, cache_run: str = "cold") -> dict:
    """One `jaxpd generate --input` run; `cache_run` "cold" starts from an empty persistent
    compilation cache, "warm" reuses the one the cold run of the same settings filled."""
    config = work_dir / f"deploy-{sizes}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"checkpoint": str(checkpoint)},
        "kv": {"page_size": 16, "num_pages": num_pages},
        "scheduler": {"chunk_size": CHUNK, "max_prefill_tokens": 2048,
                      "max_decode_batch": MAX_DECODE, **bucket_sizes(sizes)}}))
    out = work_dir / f"out-{sizes}-{precompile}-{cache_run}.jsonl"
    cache = work_dir / f"xla-{sizes}-{precompile}"  # empty on the cold run
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpd.cli", "generate", "--config", str(config), "--input",
         str(records), "--output", str(out), "--no-progress", "--compile-cache", str(cache),
         "--precompile", precompile],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"jaxpd generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"sizes": sizes, "precompile": precompile, "cache": cache_run,
            "buckets": bucket_sizes(sizes), "wall_s": round(wall, 2), **summary}


def write_records(path: Path, work: dict) -> Path:
    """The offline requests as `jaxpd generate --input` records (EOS ignored, as HF's side)."""
    path.write_text("".join(
        json.dumps({"id": f"r{i}", "prompt_token_ids": p, "max_tokens": m, "ignore_eos": True})
        + "\n" for i, (p, m) in enumerate(zip(work["prompts"], work["max_tokens"]))))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.25, help="fraction of the 256 requests")
    ap.add_argument("--sizes", default="default", help="bucket families, comma-separated")
    ap.add_argument("--num-pages", type=int, default=8192)
    ap.add_argument("--precompile", default="off",
                    help="jaxpd generate --precompile modes to compare, comma-separated")
    ap.add_argument("--warm", action="store_true",
                    help="after each cold run, run again on the cache it filled: cold minus warm "
                         "wall time is what compiling cost the job")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    import jax

    from bench_vs_hf import workload
    from jaxpd.model import forward
    from jaxpd.model.hf_export import save_hf_checkpoint
    from jaxpd.model.presets import get_preset

    work = workload(args.scale)["offline"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "bench-30m"
        cfg = get_preset("bench-30m")
        save_hf_checkpoint(checkpoint, forward.init_params(cfg, jax.random.key(0)), cfg)
        records = write_records(tmp / "offline.jsonl", work)
        runs = []
        for name in args.sizes.split(","):
            for mode in args.precompile.split(","):
                for cache_run in ("cold", "warm") if args.warm else ("cold",):
                    runs.append(run_once(tmp, checkpoint, records, name, args.num_pages, mode,
                                         cache_run))
                    print(json.dumps({k: runs[-1][k] for k in (
                        "sizes", "precompile", "cache", "wall_s", "seconds", "compile_seconds",
                        "output_tokens_per_s")}), file=sys.stderr, flush=True)
    result = {"scale": args.scale, "requests": len(work["prompts"]),
              "prompt_tokens": sum(map(len, work["prompts"])),
              "output_tokens": sum(work["max_tokens"]), "runs": runs}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
