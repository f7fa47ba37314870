"""The placer's cost model: rooflines behave physically, and calibration recovers known factors."""

import dataclasses
import json

import pytest

from jaxpd.model.presets import get_preset
from jaxpd.placement.cost_model import (Efficiency, PhaseModel, Profile, Roofline, calibrate,
                                        kv_transfer_seconds, prediction_errors)

H100 = Roofline(flops=989e12, bandwidth=3.35e12, memory=80e9, link_bandwidth=450e9)
LLAMA8B = get_preset("llama3-8b").replace(dtype="bfloat16")


def test_prefill_is_compute_bound_and_decode_memory_bound_on_a_gpu():
    m = PhaseModel(LLAMA8B, H100, tp=1)
    long = m.prefill_seconds([2048])
    dense_only = 2 * (LLAMA8B.num_params() - 2 * 128256 * 4096) * 2048 / (H100.flops * m.efficiency.compute)
    assert dense_only < long < 1.5 * dense_only  # attention and overhead on top; FLOPs bind
    assert m.prefill_seconds([2048, 2048]) > 1.9 * long  # batching prompts does not make FLOPs free
    step = m.decode_step_seconds(1, 1024)
    weights = LLAMA8B.num_params() * 2 / (H100.bandwidth * m.efficiency.memory)
    assert weights < step < 1.2 * weights  # one token per step costs the weights
    assert m.decode_step_seconds(64, 64 * 1024) > m.decode_step_seconds(8, 8 * 1024)


def test_tensor_parallelism_splits_weights_and_adds_all_reduces():
    one, four = PhaseModel(LLAMA8B, H100, 1), PhaseModel(LLAMA8B, H100, 4)
    assert four.weight_bytes_per_device() == pytest.approx(one.weight_bytes_per_device() / 4)
    assert four.decode_step_seconds(8, 8192) < one.decode_step_seconds(8, 8192)
    no_link = dataclasses.replace(H100, link_bandwidth=0.0)
    assert PhaseModel(LLAMA8B, no_link, 2).prefill_seconds([128]) == float("inf")
    # 8 KV heads: TP=16 would replicate them, so per-device KV stops shrinking past TP=8
    assert PhaseModel(LLAMA8B, H100, 16).kv_bytes_per_token_per_device() == \
        PhaseModel(LLAMA8B, H100, 8).kv_bytes_per_token_per_device()


def test_each_tp_step_pays_the_links_per_call_latency_twice_a_layer():
    """A TP all-reduce costs at least the link's latency however few bytes it carries: 2 x 32
    layers x 12.5 us is 0.8 ms per Llama-3-8B step at TP > 1, nothing at TP 1."""
    slow = dataclasses.replace(H100, collective_latency=12.5e-6)
    for tp, extra in ((1, 0.0), (2, 0.8e-3), (4, 0.8e-3)):
        a, b = PhaseModel(LLAMA8B, H100, tp), PhaseModel(LLAMA8B, slow, tp)
        assert b.decode_step_seconds(8, 8192) - a.decode_step_seconds(8, 8192) == \
            pytest.approx(extra)
        assert b.prefill_step_seconds([(0, 512)]) - a.prefill_step_seconds([(0, 512)]) == \
            pytest.approx(extra)


def test_fp8_weights_halve_what_a_decode_step_streams():
    """jaxpd's FP8 weights (`--dtype fp8`): the layers' linear weights at one byte, the rest
    (embeddings, LM head) at bf16; compute stays at bf16's peak, so prefill barely moves."""
    fp8 = LLAMA8B.replace(weight_dtype="float8_e4m3fn")
    a, b = PhaseModel(LLAMA8B, H100, 1), PhaseModel(fp8, H100, 1)
    linear = LLAMA8B.linear_params()
    assert a.weight_bytes_per_device() - b.weight_bytes_per_device() == pytest.approx(
        linear - LLAMA8B.num_layers * (4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096) * 4)
    assert b.decode_step_seconds(1, 1024) < 0.6 * a.decode_step_seconds(1, 1024)
    assert b.kv_capacity_tokens() > a.kv_capacity_tokens()
    assert b.prefill_seconds([2048]) == pytest.approx(a.prefill_seconds([2048]), rel=0.05)


def test_memory_feasibility():
    m = PhaseModel(LLAMA8B, H100, 1)
    per_token = LLAMA8B.kv_bytes_per_token()
    assert per_token == 128 * 1024  # Llama-3-8B bf16: 128 KiB per token
    expected = (80e9 * 0.9 - LLAMA8B.num_params() * 2) / per_token
    assert m.kv_capacity_tokens() == pytest.approx(expected, rel=1e-6)
    l4 = Roofline(flops=121e12, bandwidth=0.3e12, memory=24e9)
    seventy = get_preset("llama3-70b").replace(dtype="bfloat16")
    assert not PhaseModel(seventy, l4, 1).fits()
    assert PhaseModel(LLAMA8B, l4, 1).fits(1000)


def test_kv_transfer_hides_behind_a_long_prefill():
    link = 25e9
    raw = kv_transfer_seconds(LLAMA8B, 4096, link)
    assert raw == pytest.approx(LLAMA8B.kv_bytes_per_token() * 4096 / (link * 0.7))
    assert kv_transfer_seconds(LLAMA8B, 4096, link, prefill_seconds=10.0) == pytest.approx(raw / 32)
    # sent after prefill (what jaxpd's gRPC hand-off does today): nothing is hidden
    assert kv_transfer_seconds(LLAMA8B, 4096, link, prefill_seconds=10.0,
                               layerwise=False) == pytest.approx(raw)
    assert raw / 32 < kv_transfer_seconds(LLAMA8B, 4096, link, prefill_seconds=0.01) < raw


def _synthetic_profile(tmp_path, eff: Efficiency):
    model = get_preset("bench-30m")
    roof = Roofline(flops=2e11, bandwidth=8e9, memory=0.0)
    m = PhaseModel(model, roof, 1, eff)
    rows = []
    for batch in (1, 4, 16):
        for context in (128, 256, 512):
            rows.append({"phase": "prefill", "batch": batch, "context": context,
                         "seconds": m.prefill_seconds([context] * batch)})
            rows.append({"phase": "decode", "batch": batch, "context": context,
                         "step_ms": 1e3 * m.decode_step_seconds(batch, batch * (context + 1))})
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"preset": "bench-30m", "dtype": "float32", "tp": 1,
                                "peak_flops": roof.flops, "peak_bandwidth": roof.bandwidth,
                                "rows": rows}))
    return Profile.load(path)


def test_calibration_recovers_the_factors_that_made_a_profile(tmp_path):
    truth = Efficiency(compute=0.7, attention=0.2, memory=0.9, step_overhead_s=3e-4,
                       per_sequence_s=2e-4, overlap=0.5)
    profile = _synthetic_profile(tmp_path, truth)
    fitted = calibrate(profile)
    errors = prediction_errors(profile, fitted)
    assert max(abs(e) for e in errors["prefill"] + errors["decode"]) < 0.01
    before = prediction_errors(profile, Efficiency())
    assert max(abs(e) for e in before["decode"]) > 0.1  # the defaults were not already right


def test_the_cpu_profile_fits_within_its_roofs_and_an_understated_roof_is_refused():
    """configs/profiles' CPU profile fits with every efficiency at most 1 (its bandwidth roof
    is the weight-streaming rate a decode step sees), within 10% on every row; the same
    measurements against a quarter of that roof would need a device faster than its roof,
    and are refused with a message naming the figure to re-measure."""
    import dataclasses
    from pathlib import Path

    from jaxpd.placement.cost_model import CalibrationError, prediction_errors

    path = Path(__file__).resolve().parents[1] / "configs/profiles/cpu-2core-vm-bench-30m.json"
    profile = Profile.load(path)
    fitted = calibrate(profile)
    assert max(fitted.compute, fitted.attention, fitted.memory, fitted.kv_read) <= 1.0
    errors = prediction_errors(profile, fitted)
    assert max(abs(e) for e in errors["prefill"] + errors["decode"]) < 0.10
    understated = dataclasses.replace(profile, roof=dataclasses.replace(
        profile.roof, bandwidth=profile.roof.bandwidth / 4))
    with pytest.raises(CalibrationError, match="memory efficiency .* peak_bandwidth"):
        calibrate(understated)
