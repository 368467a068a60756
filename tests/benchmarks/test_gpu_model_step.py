"""The roofline bound that benchmarks/gpu_model_step.py prints beside its decode measurement."""
from __future__ import annotations

import pytest
from transformers import LlamaConfig

from adadepth.benchmarks.depth_bench import flop_model
from adadepth.benchmarks.gpu_model_step import SMOLLM2_135M, roofline_decode_ratio

CONFIG = LlamaConfig(**SMOLLM2_135M)


def share(full, mixed):
    layer, head = flop_model(CONFIG)
    return (sum(mixed) * layer + len(mixed) * head) / (sum(full) * layer + len(full) * head)


def test_bandwidth_bound_step_cannot_beat_the_full_step():
    """Too few rows to be compute-bound: every layer costs its weight bytes, so a mixed step whose
    deepest row runs all layers costs a full step, and the ratio is 1 / FLOP share."""
    full, mixed = [30] * 64, [30] * 32 + [15] * 32
    r = roofline_decode_ratio({"copy_bytes_per_s": 8e12, "bf16_flop_per_s": 1e15}, CONFIG, full, mixed)
    assert r["roofline_mixed_us"] == pytest.approx(r["roofline_full_us"])
    assert r["roofline_mixed_over_flop_proportional"] == pytest.approx(1 / share(full, mixed))


def test_compute_bound_step_scales_with_flops():
    full, mixed = [30] * 4096, [30] * 2048 + [15] * 2048
    r = roofline_decode_ratio({"copy_bytes_per_s": 8e12, "bf16_flop_per_s": 1e14}, CONFIG, full, mixed)
    assert r["roofline_mixed_over_flop_proportional"] == pytest.approx(1.0)
