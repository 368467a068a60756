"""The roofline bound that benchmarks/gpu_model_step.py prints beside its decode measurement."""
from __future__ import annotations

import pytest
from transformers import LlamaConfig

from adadepth.benchmarks.depth_bench import flop_model
from adadepth.benchmarks.gpu_model_step import SMOLLM2_135M, flop_share, roofline_decode_ratio, run

CONFIG = LlamaConfig(**SMOLLM2_135M)


H200 = {"copy_bytes_per_s": 4.27e12, "bf16_flop_per_s": 7e14}   # the measured copy rate (gpu_check_h200.json)


def share(full, mixed):
    layer, head = flop_model(CONFIG)
    return (sum(mixed) * layer + len(mixed) * head) / (sum(full) * layer + len(full) * head)


def test_flop_share_counts_attention_at_long_context():
    full, mixed = [30] * 64, [30] * 32 + [15] * 32
    assert flop_share(CONFIG, full, mixed) == pytest.approx(share(full, mixed))
    # Attention's products scale with depth like the layer matmuls; the LM head does not, so a
    # long context brings the share down towards the layers' own 0.75.
    assert 0.75 < flop_share(CONFIG, full, mixed, 4096) < flop_share(CONFIG, full, mixed, 256) < share(full, mixed)


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


def test_kv_reads_scale_with_rows_so_context_lowers_the_bound():
    """Weights are read once per layer, each row's K and V per layer it runs: at the context of
    the H200 measurement's context (~290 tokens) the bound is already under the 1.1 target. With a
    long context the KV reads dominate; they scale with the rows a little faster than the FLOPs
    do (the LM head's FLOPs are the same in both steps), so the bound even dips under 1 before
    settling at 1 once attention is all there is."""
    full, mixed = [30] * 64, [30] * 32 + [15] * 32
    bounds = [roofline_decode_ratio(H200, CONFIG, full, mixed, ctx)["roofline_mixed_over_flop_proportional"]
              for ctx in (0, 290, 2048, 1 << 17)]
    assert bounds[0] == pytest.approx(1 / share(full, mixed))   # 1.25: weights only
    assert bounds[0] > bounds[1] > bounds[2]
    assert 1.0 < bounds[1] < 1.1                                 # 1.06
    assert bounds[2] < 1.0                                       # 0.98
    assert bounds[3] == pytest.approx(1.0, abs=0.01)


def test_run_times_every_context_and_path_on_cpu(tmp_path):
    """The GPU script end to end on a tiny model on the CPU: both paths, every context length,
    the prefill timing at the first one, JSON written. (No CUDA graph or roofline on a CPU.)"""
    import json

    from tiny_model import build_tiny_checkpoint
    from transformers import AutoConfig

    folder = build_tiny_checkpoint(str(tmp_path / "m"), num_layers=4)
    out = run(str(tmp_path), batch=4, prompt_lens=(8, 20), steps=3, model=folder, device="cpu")
    saved = json.loads((tmp_path / "gpu_model_step.json").read_text())
    assert saved["prompt_lens"] == [8, 20] and saved["num_layers"] == 4
    names = {f"{p}@{n}" for p in ("batched_skip_kernels", "pytorch_slicing") for n in (8, 20)}
    assert set(out["results"]) == names
    for name, r in out["results"].items():
        assert r["full_depth"]["forward_ms_median"] > 0 and r["mixed_depth"]["forward_ms_median"] > 0
        assert r["full_depth"]["context_len"] >= r["prompt_len"]
        assert ("prefill_mixed_over_flop_proportional" in r) == name.endswith("@8")
        expected = flop_share(AutoConfig.from_pretrained(folder), [4] * 4, [4, 4, 2, 2], r["full_depth"]["context_len"])
        assert r["flop_share"] == pytest.approx(expected)
