"""The kernel benchmark runs its own code paths on CPU (`--smoke`: tiny shapes, kernels
interpreted) so it does not rot between device runs; its rows agree with the reference."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_kernels_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    rows = {(r["phase"], r["impl"]): r for r in result["rows"]}
    for key in [("prefill", "xla"), ("prefill", "jaxpd_pallas_tpu"), ("decode", "jaxpd_pallas_tpu"),
                ("decode", "dense_xla_contiguous"), ("decode", "jax_bundled_tpu_paged")]:
        assert "error" not in rows[key], rows[key]
        # JAX's bundled kernel differs from the f32 reference by ~2e-3 here (not ours to fix)
        tol = 1e-2 if key[1] == "jax_bundled_tpu_paged" else 1e-4
        assert rows[key]["max_abs_diff"] < tol, rows[key]
    assert rows[("prefill", "jaxpd_pallas_tpu")]["tflops"] > 0
    assert rows[("decode", "jaxpd_pallas_tpu")]["gb_per_s"] > 0
