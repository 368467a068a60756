"""`adadepth calibrate`: valid orders, an identity-like layer goes first, bypass maps, engine semantics."""
from __future__ import annotations

import json
import os

import pytest
import torch

from adadepth import LLM
from adadepth.cli import main as cli_main
from adadepth.model.depth_plan import DepthPlan
from adadepth.model.loader import load_config, load_state_dict
from adadepth.training.calibrate import CalibrateConfig, Calibrator, run_calibration
from adadepth.training.sequence_forward import SequenceBatch, SequenceForward, build_engine_model

IDENTITY_LAYER = 3


@pytest.fixture(scope="module")
def identity_model(tiny_base, tmp_path_factory) -> str:
    """The tiny model with layer 3 made an exact identity (its o_proj and down_proj zeroed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(tmp_path_factory.mktemp("identity"))
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[IDENTITY_LAYER].self_attn.o_proj.weight.zero_()
        model.model.layers[IDENTITY_LAYER].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method,metric", [("greedy", "kl"), ("greedy", "agreement"), ("cos", "kl")])
def test_identity_layer_is_dropped_first(identity_model, fake_data, train_cache, tmp_path, method, metric):
    out = str(tmp_path / "plan")
    cfg = CalibrateConfig(model=identity_model, cache_dir=train_cache, data_dir=fake_data, output=out,
                          method=method, metric=metric, num_prompts=6, seq_len=32, compare_existing=False)
    result = run_calibration(cfg)
    plan = DepthPlan.load(out)
    assert sorted(plan.layer_order) == list(range(6))
    assert plan.layer_order[-1] == IDENTITY_LAYER
    assert plan.source.startswith("calibrated") and result.chosen == "measured"
    if method == "greedy":  # (cos without bypass or comparison is the unscored fast path)
        assert result.scores[5] == pytest.approx(0, abs=1e-6)  # dropping an identity layer costs nothing


def test_cli_bypass_and_keep_order(tiny_base, fake_data, train_cache, tmp_path, capsys):
    out = str(tmp_path / "plan")
    cli_main(["calibrate", "--model", tiny_base, "--cache-dir", train_cache, "--data-dir", fake_data,
              "--output", out, "--num-prompts", "6", "--seq-len", "32", "--bypass", "--ridge", "0.01"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = DepthPlan.load(out)
    assert report["layer_order"] == plan.layer_order and sorted(plan.layer_order) == list(range(6))
    assert set(report["bypass_layers"]) == set(plan.bypass) and plan.bypass, "some bypass map should help"
    for layer, (w, b) in plan.bypass.items():
        assert w.shape == (64, 64) and b.shape == (64,) and layer != plan.layer_order[0]
    # keep_order: the stored order stays, only maps are (re)fitted
    fixed = DepthPlan(6, [5, 4, 3, 2, 1, 0], source="manual")
    fixed.save(out)
    model, sequences = _model_and_sequences(tiny_base, train_cache, fake_data, DepthPlan.load(out))
    result = Calibrator(model, sequences, CalibrateConfig(keep_order=True, bypass=True, num_prompts=6)).run()
    assert result.plan.layer_order == fixed.layer_order and result.chosen == "existing"


def _model_and_sequences(path, cache, data, plan):
    from transformers import AutoTokenizer

    from adadepth.training.calibrate import calibration_sequences

    model = build_engine_model(load_config(path), plan, load_state_dict(path))
    tok = AutoTokenizer.from_pretrained(path)
    return model, calibration_sequences(tok, data, 6, 32)


def test_run_layers_matches_engine_forward_with_bypass(tiny_base, fake_data, train_cache):
    torch.manual_seed(0)
    bypass = {2: (torch.eye(64) + 0.01 * torch.randn(64, 64), 0.01 * torch.randn(64)), 4: (torch.eye(64) * 0.9, None)}
    plan = DepthPlan(6, [0, 5, 1, 3, 2, 4], source="test", bypass=bypass)
    model, sequences = _model_and_sequences(tiny_base, train_cache, fake_data, plan)
    fwd = SequenceForward(model)
    seqs = SequenceBatch.build(sequences[:3], "cpu")
    for depth in (2, 4, 6):
        engine = fwd.final_states(seqs, depth)
        h0, rope, batch, kv = fwd.embed(seqs)
        keep = [r < depth for r in plan.rank]
        ops = {i: model.bypass_ops[i] for i in range(6) if model.bypass_ops[i] is not None}
        ours = model.norm(fwd.run_layers(h0, rope, batch, kv, 0, keep, ops))
        valid = seqs.valid
        assert torch.allclose(engine[valid], ours[valid], atol=1e-5), depth


def test_engine_loads_calibrated_plan(identity_model, fake_data, train_cache):
    run_calibration(CalibrateConfig(model=identity_model, cache_dir=train_cache, data_dir=fake_data,
                                    method="cos", num_prompts=4, seq_len=24, bypass=True))
    assert os.path.exists(os.path.join(identity_model, "layer_order.json"))  # stored with the model
    llm = LLM(identity_model, cache_dir=train_cache, num_kv_tokens=512, max_model_len=128, max_num_batched_tokens=256)
    assert llm.engine.plan.layer_order[-1] == IDENTITY_LAYER
