"""Per-phase latency of a model on a device kind at a TP degree: rooflines with calibrated
efficiencies, so the placer predicts what this stack measures rather than a data sheet.

- Prefill of a batch of prompts: dense FLOPs (2 x parameters per token, plus the LM head once
  per prompt) and attention's quadratic FLOPs, over the compute roof, or the weights and KV
  writes over the memory roof, whichever binds; plus two all-reduces per layer over the
  intra-node link when TP > 1, and a fixed per-step overhead.
- A decode step: the weights and the batch's KV read once, over the memory roof (or the FLOPs,
  at large batch), plus the all-reduces and the overhead.
- KV hand-off: the prompt's KV bytes over the slower end's link, minus what layer-by-layer
  streaming hides behind the prefill that produces it.
- Memory: weights / TP plus KV for the tokens in flight must fit in HBM (with headroom).

`Efficiency` holds the calibrated factors: `calibrate` fits them to a `tools/bench_engine.py`
profile (`configs/profiles/*.json`) by least squares on relative error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxpd.model.config import ModelConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HBM_HEADROOM = 0.9  # activations, fragmentation, the runtime's own buffers


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The figures of one device the model needs (from the catalog, or measured on a CPU)."""

    flops: float  # dense FLOP/s at the serving dtype
    bandwidth: float  # HBM bytes/s
    memory: float  # HBM bytes
    link_bandwidth: float = 0.0  # intra-node bytes/s per device (NVLink, ICI); 0 = none
    collective_latency: float = 0.0  # seconds of one small all-reduce over that link


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the roofs, and the fixed cost of one step."""

    compute: float = 0.6  # dense matmul FLOP/s / peak
    attention: float = 0.3  # attention FLOP/s / peak (worse than matmuls without fused kernels)
    memory: float = 0.7  # bytes/s streaming the weights / peak bandwidth
    kv_read: float = 0.5  # bytes/s gathering paged KV / peak bandwidth (scattered pages)
    link: float = 0.7  # all-reduce and KV transfer bytes/s / link peak
    step_overhead_s: float = 2e-4  # dispatch and host work per decode step
    prefill_overhead_s: float = 2e-4  # ... per prefill step (scheduling, page tables, first
    # tokens to the host: more than a decode step's in jaxpd, measured through its engine)
    per_sequence_s: float = 1e-5  # per sequence per step: sampling, page-table gathers
    overlap: float = 1.0  # 1: compute and memory traffic overlap (max); 0: they add up


@dataclasses.dataclass(frozen=True)
class PhaseModel:
    """Latency of one phase of `model` on a TP group of `tp` devices described by `roof`."""

    model: ModelConfig
    roof: Roofline
    tp: int = 1
    efficiency: Efficiency = Efficiency()

    @property
    def dtype_bytes(self) -> int:
        return BYTES[self.model.dtype]

    # -- sizes ---------------------------------------------------------------------------------
    def weight_bytes_per_device(self) -> float:
        """The weights as stored (FP8 linear weights: one byte each), split over TP."""
        return self.model.weight_bytes() / self.tp

    def kv_bytes_per_token_per_device(self) -> float:
        """KV heads split over TP; replicated when TP exceeds them (as kv/layout.py stores)."""
        cfg = self.model
        heads = max(cfg.num_kv_heads / self.tp, 1)
        return 2 * cfg.num_layers * heads * cfg.head_dim * self.dtype_bytes

    def kv_capacity_tokens(self) -> int:
        """KV tokens one TP group holds after its weights (0 when the weights do not fit)."""
        free = self.roof.memory * HBM_HEADROOM - self.weight_bytes_per_device()
        return max(0, int(free / self.kv_bytes_per_token_per_device()))

    def fits(self, kv_tokens: int = 0) -> bool:
        return self.kv_capacity_tokens() >= max(kv_tokens, 1)

    # -- FLOPs ---------------------------------------------------------------------------------
    def _dense_flops(self, tokens: int, sequences: int) -> float:
        cfg = self.model
        embed = cfg.vocab_size * cfg.hidden_size
        body = cfg.num_params() - embed * (1 if cfg.tie_word_embeddings else 2)
        return 2.0 * body * tokens + 2.0 * embed * sequences  # the LM head runs once per sequence

    def _attention_flops(self, query_tokens: int, key_tokens: float) -> float:
        cfg = self.model
        return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * query_tokens * key_tokens

    def _collective_step_seconds(self) -> float:
        """The fixed part of a step's all-reduces: two per layer, each at least the link's
        per-call latency however few bytes it carries (what makes TP > 1 decode steps slower
        than bandwidth alone says)."""
        return 0.0 if self.tp == 1 else 2 * self.model.num_layers * self.roof.collective_latency

    def _allreduce_seconds(self, tokens: int) -> float:
        """Two ring all-reduces of the hidden states per layer (attention out, MLP out): the
        bytes over the link (their per-call latency: `_collective_step_seconds`)."""
        if self.tp == 1:
            return 0.0
        link = self.roof.link_bandwidth * self.efficiency.link
        if link <= 0:
            return float("inf")  # TP > 1 needs an intra-node link
        size = tokens * self.model.hidden_size * self.dtype_bytes
        return 2 * self.model.num_layers * 2 * (self.tp - 1) / self.tp * size / link

    # -- latencies -----------------------------------------------------------------------------
    @functools.cached_property
    def _coefficients(self) -> tuple[float, ...]:
        """The latencies are affine in tokens, sequences and sum(l^2) within each roof: the
        coefficients once, so the simulator's hundreds of thousands of calls stay cheap."""
        eff, roof, tp = self.efficiency, self.roof, self.tp
        compute, attention = roof.flops * eff.compute, roof.flops * eff.attention
        memory = roof.bandwidth * eff.memory
        dense_token = self._dense_flops(1, 0) / tp / compute
        dense_sequence = self._dense_flops(0, 1) / tp / compute
        causal = self._attention_flops(1, 1) / tp / attention  # per query x key token pair
        weights = self.weight_bytes_per_device() / memory
        kv = self.kv_bytes_per_token_per_device() / memory  # prefill writes KV contiguously
        kv_read = self.kv_bytes_per_token_per_device() / (roof.bandwidth * eff.kv_read)
        allreduce = self._allreduce_seconds(1)
        return dense_token, dense_sequence, causal, weights, kv, kv_read, allreduce

    def prefill_seconds(self, prompt_lengths: Sequence[int]) -> float:
        """One prefill step over whole prompts (causal attention: each token sees its prefix)."""
        return self.prefill_step_seconds([(0, length) for length in prompt_lengths])

    def prefill_step_seconds(self, chunks: Sequence[tuple[int, int]]) -> float:
        """One chunked-prefill step: per sequence, (tokens already in its KV, tokens this step).
        A chunk attends to its sequence's earlier KV (read back from the pages) and causally
        to itself; the LM head runs once per sequence."""
        eff = self.efficiency
        dense_token, dense_sequence, causal, weights, kv, kv_read, allreduce = self._coefficients
        tokens = pairs = earlier = 0
        for done, length in chunks:
            tokens += length
            pairs += length * done + length * (length + 1) / 2
            earlier += done
        sequences = len(chunks)
        compute = dense_token * tokens + dense_sequence * sequences + causal * pairs
        memory = weights + kv * tokens + kv_read * earlier
        return (self._roofs(compute, memory) + allreduce * tokens + eff.prefill_overhead_s
                + eff.per_sequence_s * sequences + self._collective_step_seconds())

    def _roofs(self, compute: float, memory: float) -> float:
        """max() when the device overlaps compute with memory traffic, up to the sum when not."""
        return max(compute, memory) + (1 - self.efficiency.overlap) * min(compute, memory)

    def decode_step_seconds(self, batch: int, context_tokens: int) -> float:
        """One decode step: `batch` sequences, `context_tokens` KV tokens among them."""
        eff = self.efficiency
        dense_token, dense_sequence, causal, weights, _, kv_read, allreduce = self._coefficients
        memory = weights + kv_read * context_tokens
        compute = (dense_token + dense_sequence) * batch + causal * context_tokens
        return (self._roofs(compute, memory) + allreduce * batch + eff.step_overhead_s
                + eff.per_sequence_s * batch + self._collective_step_seconds())


def kv_transfer_seconds(model: ModelConfig, prompt_tokens: int, link_bandwidth: float,
                        prefill_seconds: float = 0.0, efficiency: float = 0.7, *,
                        layerwise: bool = True) -> float:
    """Hand-off of one prompt's KV over `link_bandwidth` (the slower end's). Streamed layer by
    layer as prefill computes (`layerwise`), only the part that outlasts the prefill shows, and
    never less than the last layer's share; sent after prefill, all of it shows."""
    if link_bandwidth <= 0:
        return float("inf")
    raw = model.kv_bytes_per_token() * prompt_tokens / (link_bandwidth * efficiency)
    if not layerwise:
        return raw
    hidden = prefill_seconds * (1 - 1 / model.num_layers)
    return max(raw / model.num_layers, raw - hidden)


# -- calibration ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Profile:
    """A `tools/bench_engine.py` result: measured step times of a preset on one device."""

    model: ModelConfig
    roof: Roofline
    tp: int
    prefill: list[tuple[int, int, float]]  # (batch, context, seconds)
    decode: list[tuple[int, int, float]]  # (batch, context, seconds per step)
    source: str = ""
    # a prefill step beside a process decoding on the same host / alone (bench_engine.py
    # --alongside-decode); 1 when not measured
    neighbour_slowdown: float = 1.0

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        from jaxpd.model.presets import get_preset

        data = json.loads(Path(path).read_text())
        model = get_preset(data["preset"]).replace(dtype=data["dtype"])
        # host devices all-reduce through the host's memory: a CPU mesh's "link" is its bandwidth
        link = data.get("peak_link_bandwidth") or (
            data["peak_bandwidth"] if data.get("platform") == "cpu" else 0.0)
        roof = Roofline(flops=data["peak_flops"], bandwidth=data["peak_bandwidth"], memory=0.0,
                        link_bandwidth=link)
        rows = data["rows"]
        return cls(model, roof, data.get("tp", 1),
                   [(r["batch"], r["context"], r["seconds"]) for r in rows if r["phase"] == "prefill"],
                   [(r["batch"], r["context"], r["step_ms"] / 1e3) for r in rows if r["phase"] == "decode"],
                   str(path),
                   float((data.get("alongside_decode") or {}).get("prefill_slowdown", 1.0)))


def _predict(profile: Profile, eff: Efficiency) -> tuple[np.ndarray, np.ndarray]:
    m = PhaseModel(profile.model, profile.roof, profile.tp, eff)
    prefill = [m.prefill_seconds([c] * b) for b, c, _ in profile.prefill]
    decode = [m.decode_step_seconds(b, b * (c + 1)) for b, c, _ in profile.decode]
    return np.array(prefill), np.array(decode)


def prediction_errors(profile: Profile, eff: Efficiency) -> dict[str, list[float]]:
    """Relative error (predicted / measured - 1) of every profile row."""
    prefill, decode = _predict(profile, eff)
    return {"prefill": list(prefill / np.array([s for *_, s in profile.prefill]) - 1),
            "decode": list(decode / np.array([s for *_, s in profile.decode]) - 1)}


class CalibrationError(ValueError):
    """A profile whose fit needs a device to beat its own roof: its roof figures are wrong."""


MAX_BOUNDED_FIT_ERROR = 0.15  # a fit held to efficiencies <= 1 may miss a row by this much


def calibrate(profile: Profile, base: Efficiency = Efficiency()) -> Efficiency:
    """Efficiencies that best predict `profile` (least squares on log ratios), never above 1
    (no step runs faster than its roof). When the free fit wants more than 1, the fit held to
    1 is used if it still predicts every row within `MAX_BOUNDED_FIT_ERROR` (the free fit only
    traded one factor against another); otherwise the profile is refused: its measured roof
    understates the device, and every figure built on it would be wrong."""
    from scipy.optimize import least_squares

    measured = np.log([s for *_, s in profile.prefill] + [s for *_, s in profile.decode])

    names = ("compute", "attention", "memory", "kv_read", "step_overhead_s",
             "prefill_overhead_s", "per_sequence_s", "overlap")
    low = np.log([1e-3, 1e-4, 1e-3, 1e-4, 1e-7, 1e-7, 1e-8, 1e-3])
    high = np.log([4.0, 4.0, 8.0, 8.0, 1.0, 1.0, 1.0, 1.0])

    def make(x) -> Efficiency:
        return dataclasses.replace(base, **{n: float(v) for n, v in zip(names, np.exp(x))})

    def residuals(x):
        prefill, decode = _predict(profile, make(x))
        return np.log(np.concatenate([prefill, decode])) - measured

    x0 = np.clip(np.log([getattr(base, n) for n in names]), low + 1e-9, high - 1e-9)
    fitted = make(least_squares(residuals, x0, bounds=(low, high)).x)
    over = {n: getattr(fitted, n) for n in ("compute", "attention", "memory", "kv_read")
            if getattr(fitted, n) > 1.0}
    if over:  # try the physical fit: every roof fraction at most 1
        capped = np.minimum(high, np.log([1.0] * len(names)))
        x1 = np.clip(x0, low + 1e-9, capped - 1e-9)
        bounded = make(least_squares(residuals, x1, bounds=(low, capped)).x)
        errors = prediction_errors(profile, bounded)
        worst_row = max(abs(e) for e in errors["prefill"] + errors["decode"])
        if worst_row <= MAX_BOUNDED_FIT_ERROR:
            return bounded
        roofs = {"compute": ("peak_flops", profile.roof.flops / 1e12, "TFLOP/s"),
                 "attention": ("peak_flops", profile.roof.flops / 1e12, "TFLOP/s"),
                 "memory": ("peak_bandwidth", profile.roof.bandwidth / 1e9, "GB/s"),
                 "kv_read": ("peak_bandwidth", profile.roof.bandwidth / 1e9, "GB/s")}
        worst = max(over, key=over.get)
        key, value, unit = roofs[worst]
        raise CalibrationError(
            f"{profile.source or 'the profile'}: the fit needs {worst} efficiency "
            f"{over[worst]:.2f} (> 1): the measured steps beat its {key} of {value:.3g} {unit} "
            f"(held to 1, the fit misses a row by {worst_row:.0%}), so that roof is "
            f"understated; re-measure it (tools/bench_engine.py) rather than calibrate on it")
    return fitted
