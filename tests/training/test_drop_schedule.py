"""Drop probabilities (linear / exponential in depth), the ramp, and the sampled keep masks."""
from __future__ import annotations

import math

import pytest
import torch

from adadepth.training.drop_schedule import DropConfig, DropSchedule


def test_linear_profile_values():
    s = DropSchedule(DropConfig(drop_mode="layer", p_max=0.3, ramp_fraction=0, profile_axis="index"), num_layers=4)
    assert torch.allclose(s.layer_probs(1.0), torch.tensor([0.0, 0.1, 0.2, 0.3]))


def test_exponential_profile_values():
    s = DropSchedule(DropConfig(drop_mode="layer", p_max=0.2, depth_profile="exponential", ramp_fraction=0,
                                 profile_axis="index"), 5)
    expected = torch.tensor([0.2 * (math.exp(l / 4 * math.log(2)) - 1) for l in range(5)])
    assert torch.allclose(s.layer_probs(1.0), expected)
    assert s.layer_probs(1.0)[0] == 0 and math.isclose(float(s.layer_probs(1.0)[-1]), 0.2, rel_tol=1e-6)


def test_order_axis_follows_the_layer_order():
    cfg = DropConfig(drop_mode="layer", p_max=0.3, ramp_fraction=0)  # profile_axis="order" by default
    s = DropSchedule(cfg, 4, [0, 3, 1, 2])  # layer 3 is kept by serving before 1 and 2
    assert torch.allclose(s.layer_probs(1.0), torch.tensor([0.0, 0.2, 0.3, 0.1]))
    early = DropSchedule(cfg, 4, [0, 1, 2, 3])
    assert torch.allclose(early.layer_probs(1.0), torch.tensor([0.0, 0.1, 0.2, 0.3]))  # = LayerSkip's by index
    with pytest.raises(ValueError):
        DropSchedule(cfg, 4, None)


def test_ramp_linear_and_exponential():
    lin = DropSchedule(DropConfig(drop_mode="layer", p_max=0.4, ramp_fraction=0.2, profile_axis="index"), 3)
    assert lin.ramp(0.0) == 0 and lin.ramp(0.1) == pytest.approx(0.5) and lin.ramp(0.2) == 1 and lin.ramp(0.9) == 1
    assert torch.allclose(lin.layer_probs(0.1), torch.tensor([0.0, 0.1, 0.2]))
    exp = DropSchedule(DropConfig(drop_mode="layer", ramp_fraction=0.5, ramp_shape="exponential", profile_axis="index"), 3)
    assert exp.ramp(0.25) == pytest.approx(math.sqrt(2) - 1)
    assert exp.ramp(0.0) == 0 and exp.ramp(0.5) == pytest.approx(1.0)


def test_order_mode_keeps_nested_top_d_sets_and_ramps_min_depth():
    order = [3, 0, 5, 1, 4, 2, 7, 6]
    s = DropSchedule(DropConfig(drop_mode="order", min_depth_fraction=0.5, ramp_fraction=0.5), 8, order)
    assert s.min_depth(0.0) == 8 and s.min_depth(0.25) == 6 and s.min_depth(1.0) == 4
    keep = s.sample(500, 1.0, torch.Generator().manual_seed(0)).keep
    depths = keep.sum(1)
    assert int(depths.min()) == 4 and int(depths.max()) == 8
    for row, d in zip(keep, depths.tolist()):
        assert set(row.nonzero().squeeze(1).tolist()) == set(order[:d])
    assert s.sample(10, 0.0).keep.all()  # before the ramp: nothing dropped


def test_mixed_mode_share_and_rescale_only_on_layer_samples():
    order = list(range(10))[::-1]
    cfg = DropConfig(drop_mode="mixed", order_fraction=0.5, p_max=0.5, ramp_fraction=0, rescale=True)
    s = DropSchedule(cfg, 10, order)
    d = s.sample(4000, 1.0, torch.Generator().manual_seed(1))
    # Layer-mode samples carry 1/(1-p_l) scales; order-mode samples carry none and are nested.
    layer_rows = (d.scale != 1).any(1)
    assert 0.45 < float(layer_rows.float().mean()) < 0.55
    assert torch.allclose(d.scale[layer_rows], (1 / (1 - s.layer_probs(1.0))).expand(int(layer_rows.sum()), 10))
    for row in d.keep[~layer_rows]:
        assert (row == (s.rank < int(row.sum()))).all()


def test_full_depth_fraction_keeps_every_layer_of_that_share_unscaled():
    cfg = DropConfig(drop_mode="mixed", order_fraction=0.5, p_max=0.5, ramp_fraction=0, rescale=True,
                     min_depth_fraction=0.2, full_depth_fraction=0.3)
    s = DropSchedule(cfg, 10, list(range(10)))
    d = s.sample(4000, 1.0, torch.Generator().manual_seed(2))
    full = d.keep.all(1)
    # 30 % anchored, plus the few order/layer samples that happen to keep everything.
    without = DropSchedule(DropConfig(**{**cfg.__dict__, "full_depth_fraction": 0.0}), 10, list(range(10)))
    base_rate = float(without.sample(4000, 1.0, torch.Generator().manual_seed(2)).keep.all(1).float().mean())
    expected = 0.3 + 0.7 * base_rate
    assert abs(float(full.float().mean()) - expected) < 0.03
    # Anchored rows carry no rescale: only the layer-mode half of the other 70 % do.
    assert abs(float((d.scale != 1).any(1).float().mean()) - 0.7 * 0.5) < 0.03


def test_config_validation():
    with pytest.raises(ValueError):
        DropConfig(full_depth_fraction=1.0)
    with pytest.raises(ValueError):
        DropConfig(p_max=1.0)
    with pytest.raises(ValueError):
        DropConfig(drop_mode="sideways")
    with pytest.raises(ValueError):
        DropSchedule(DropConfig(drop_mode="order"), 4, None)
