"""The router without an engine: grid, features, predictor, policy, persistence."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import HIDDEN, ORDER, make_router

from adadepth.model.depth_plan import DepthPlan
from adadepth.router.depth_grid import DepthGrid
from adadepth.router.difficulty_router import ROUTER_CONFIG_FILE, ROUTER_WEIGHTS_FILE, DifficultyRouter
from adadepth.router.prefill_features import PrefillFeatures

PLAN = DepthPlan(6, ORDER, source="test")


def random_features(n: int, seed: int = 1) -> PrefillFeatures:
    g = torch.Generator().manual_seed(seed)
    return PrefillFeatures(torch.randn(n, 2 * HIDDEN, generator=g) * 3,
                           torch.randint(3, 200, (n,), generator=g).float())


def test_grid_default_parse_and_feature_layers():
    assert DepthGrid.default(30).depths == (12, 15, 18, 21, 24, 27, 30)
    assert DepthGrid.default(6).depths == (2, 3, 4, 5, 6)
    assert DepthGrid.parse("12,18", 30).depths == (12, 18, 30)
    assert DepthGrid.parse("", 30) == DepthGrid.default(30)
    with pytest.raises(ValueError):
        DepthGrid.parse("12,40", 30)
    with pytest.raises(ValueError):
        DepthGrid((3, 2, 6), 6)
    grid = DepthGrid.default(6)
    assert grid.max_feature_layers(PLAN) == 2                       # layers 0, 1 are the depth-2 set
    assert grid.max_feature_layers(DepthPlan(6, [5, 4, 0, 1, 2, 3])) == 0   # k = 0: embeddings
    assert DepthGrid((4, 6), 6).max_feature_layers(PLAN) == 3       # depth-4 set {0, 1, 5, 2}
    with pytest.raises(ValueError, match="smallest depth"):
        grid.check_feature_layers(PLAN, 3)


def test_pooled_features_ignore_padding():
    h = torch.randn(2, 5, 4)
    lengths = torch.tensor([5, 3])
    f = PrefillFeatures.from_hidden(h, lengths)
    assert torch.allclose(f.pooled[1, :4], h[1, :3].mean(0)) and torch.equal(f.pooled[1, 4:], h[1, 2])
    alone = PrefillFeatures.from_hidden(h[1:, :3], lengths[1:])
    assert torch.allclose(alone.pooled, f.pooled[1:])
    assert f.lengths.tolist() == [5.0, 3.0]


@pytest.mark.parametrize("hidden_size", [0, 8])
def test_predictions_are_monotone_in_depth(hidden_size):
    for seed in range(5):
        router = make_router(PLAN, seed=seed, hidden_size=hidden_size)
        for p in router.predictor.head.parameters():  # large random weights: big raw outputs of both signs
            p.data.mul_(5)
        pred = router.predict(random_features(64, seed))
        assert pred.shape == (64, 5)
        assert (pred.diff(dim=-1) >= 0).all()
        assert ((pred >= 0) & (pred <= 1)).all() and (pred[:, -1] == 1).all()


def test_policy_picks_the_smallest_depth_meeting_quality():
    router = make_router(PLAN, agreements=[0.1, 0.6, 0.85, 0.95])       # depths 2, 3, 4, 5; full depth 6 = 1
    pred = router.predict(random_features(3))
    assert torch.allclose(pred, torch.tensor([[0.1, 0.6, 0.85, 0.95, 1.0]] * 3), atol=1e-5)
    row = pred[0].tolist()
    for quality, want in [(0.05, 2), (0.1, 2), (0.5, 3), (0.6, 3), (0.8, 4), (0.9, 5), (0.96, 6), (1.0, 6)]:
        assert router.choose(row, quality - 1e-6)[0] == want, quality
    decisions = router.decide(random_features(4), [0.5, 0.9, 1.0, None])
    assert [d.depth for d in decisions] == [3, 5, 6, 6]
    assert [d.source for d in decisions] == ["router", "router", "router", "default"]
    assert decisions[0].quality == 0.5 and decisions[0].predicted_agreement == pytest.approx(0.6, abs=1e-4)
    assert decisions[2].predicted_agreement == 1.0 and decisions[3].predicted_agreement is None


def test_save_load_round_trip(tmp_path):
    router = make_router(PLAN, seed=3)
    router.predictor.fit_inputs(random_features(40, 7))
    router.info["note"] = "test"
    router.save(str(tmp_path))
    meta = json.loads((tmp_path / ROUTER_CONFIG_FILE).read_text())
    assert meta["depth_grid"] == [2, 3, 4, 5, 6] and meta["layer_order_fingerprint"] == PLAN.fingerprint()
    assert meta["features"]["feature_layers"] == 2 and meta["info"]["note"] == "test"
    assert os.path.getsize(tmp_path / ROUTER_WEIGHTS_FILE) < 200_000
    loaded = DifficultyRouter.load(str(tmp_path), PLAN, hidden_size=HIDDEN)
    feats = random_features(16, 9)
    assert torch.equal(loaded.predict(feats), router.predict(feats))
    assert loaded.grid == router.grid and loaded.feature_layers == 2
    assert DifficultyRouter.find(str(tmp_path / "nothing"), PLAN) is None


def test_fingerprint_mismatch_is_refused(tmp_path):
    make_router(PLAN).save(str(tmp_path))
    other = DepthPlan(6, [0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="layer order"):
        DifficultyRouter.load(str(tmp_path), other)
    with pytest.raises(ValueError, match="layer order"):
        DifficultyRouter.find(str(tmp_path), other)
    with pytest.raises(ValueError, match="hidden size"):
        DifficultyRouter.load(str(tmp_path), PLAN, hidden_size=32)


def test_fixed_depth_baselines():
    from adadepth.router.policy_sweep import interpolate, mixed_fixed_depth

    curve = [{"depth": d, "agreement": a} for d, a in [(2, 0.2), (4, 0.6), (5, 0.7), (6, 1.0)]]
    assert interpolate(curve, 4.5) == pytest.approx(0.65) and interpolate(curve, 1) == 0.2
    # Hull: (2, .2) -> (4, .6) -> (6, 1.0) is a straight line above (5, .7).
    assert mixed_fixed_depth(curve, 5) == pytest.approx(0.8)
    assert mixed_fixed_depth(curve, 3) == pytest.approx(0.4) and mixed_fixed_depth(curve, 6) == 1.0


def test_platt_scaling_corrects_over_confidence_and_round_trips(tmp_path):
    # Predicts 0.1/0.6/0.85/0.95 for everyone; the truth is pulled towards 0.5 (over-confident head).
    router = make_router(PLAN, agreements=[0.1, 0.6, 0.85, 0.95])
    predictor = router.predictor
    feats = random_features(200, 4)
    truth = torch.tensor([[0.25, 0.55, 0.7, 0.78]]).expand(200, 4).clone()
    w = torch.ones(200)
    before = (predictor(feats) - truth).abs().mean()
    predictor.fit_calibration(feats, truth, w)
    pred = predictor(feats)
    assert 0 < float(predictor.calib_scale) < 1, "an over-confident head must be flattened"
    assert (pred - truth).abs().mean() < before / 2
    assert (pred.diff(dim=-1) >= 0).all()
    router.predictor.fit_inputs(feats)
    router.save(str(tmp_path))
    loaded = DifficultyRouter.load(str(tmp_path), PLAN, hidden_size=HIDDEN)
    assert float(loaded.predictor.calib_scale) == pytest.approx(float(predictor.calib_scale))
    assert torch.equal(loaded.predict(feats), router.predict(feats))


def _bits_record(name: str, bits: dict[int, str]):
    from adadepth.router.label_store import LabelRecord

    n = len(next(iter(bits.values())))
    return LabelRecord(name, [{"role": "user", "content": name}], [1, 2, 3], n,
                       {d: b.count("1") for d, b in bits.items()}, bits)


def test_label_record_match_bits_round_trip_and_halves():
    from adadepth.router.label_store import LabelRecord

    record = _bits_record("p", {2: "110100", 6: "111111"})
    assert record.half(2, 0) == (1, 3) and record.half(2, 1) == (2, 3)   # even positions 1,0,0; odd 1,1,0
    again = LabelRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and again.match_bits[2] == "110100"
    old = {k: v for k, v in record.to_json().items() if k != "match_bits"}   # label format 1
    assert LabelRecord.from_json(old).match_bits == {}
    with pytest.raises(ValueError, match="do not add up"):
        LabelRecord("q", [], [1], 4, {2: 3}, {2: "1100"})


def test_split_half_oracle_and_reliability():
    from adadepth.router.policy_sweep import oracle_sweep, split_half_oracle, split_half_reliability

    grid = DepthGrid((2, 4, 6), 6)
    # Every position doubled ("1" -> "11"): both halves see the same agreement, so deciding on one
    # half and scoring on the other is the plain oracle, and the halves correlate perfectly.
    patterns = ["1011", "0001", "1111", "0110", "0000", "1110", "0111", "1000"]
    doubled = [_bits_record(f"p{i}", {2: "".join(c * 2 for c in p) + "11", 4: "".join(c * 2 for c in p[::-1]) + "11",
                                      6: "1" * 10})
               for i, p in enumerate(patterns)]
    keys = ("mean_depth", "agreement", "gain_vs_fixed", "gain_vs_mixed_fixed_depths")
    qualities = (0.3, 0.5, 0.8)
    for half, full in zip(split_half_oracle(doubled, grid, qualities), oracle_sweep(doubled, grid, qualities)):
        assert {k: half[k] for k in keys} == pytest.approx({k: full[k] for k in keys}, abs=1e-4)
    rel = split_half_reliability(doubled, grid, min_half=2)
    assert rel["2"]["half_correlation"] == pytest.approx(1.0) and rel["2"]["reliability"] == pytest.approx(1.0)
    # Halves that disagree (even positions all match, odd ones never): deciding on one half picks
    # depths that the other half scores badly, so the split-half oracle falls below the oracle.
    split = [_bits_record(f"s{i}", {2: ("10" if i % 2 else "01") * 4, 4: "11111110", 6: "1" * 8}) for i in range(6)]
    assert split_half_oracle(split, grid, (0.6,))[0]["agreement"] < oracle_sweep(split, grid, (0.6,))[0]["agreement"]
    from adadepth.router.label_store import LabelRecord

    with pytest.raises(ValueError, match="match_bits"):   # a label-format-1 record
        split_half_oracle([LabelRecord("y", [], [1], 4, {2: 1, 4: 2, 6: 4})], grid)


def test_calibrated_half_predictions_cross_fit():
    from adadepth.router.policy_sweep import calibrated_half_predictions

    # The scored half is an increasing line of the deciding half: every fold's fit recovers it
    # inside the range of the prompts it was fitted on (prompts 0 and 9 lie outside their fold's
    # range, so they get the nearest fitted value: flat outside, as isotonic maps are).
    decide = torch.tensor([[0.1 * i, 0.1 * i + 0.05] for i in range(10)], dtype=torch.float64)
    score = 0.2 + 0.5 * decide
    predicted = calibrated_half_predictions(decide, score)
    assert torch.allclose(predicted[1:9], score[1:9])
    assert torch.allclose(predicted[0], score[1]) and torch.allclose(predicted[9], score[8])
    # No relation at all: each prompt gets the mean of the OTHER prompts, never its own
    # score; a prompt's own value cannot leak into its prediction.
    score = torch.tensor([[1.0, 1.0] if i % 2 else [0.0, 0.0] for i in range(10)], dtype=torch.float64)
    flat = torch.full((10, 2), 0.5, dtype=torch.float64)
    predicted = calibrated_half_predictions(flat, score, folds=2)   # fold = i % 2: fits only on the other parity
    assert torch.allclose(predicted, 1 - score)
    # Monotone in depth even when one depth's fit lies below the one before it.
    decide = torch.rand(20, 3, dtype=torch.float64)
    score = torch.stack([decide[:, 0], 0.5 * decide[:, 1], decide[:, 2]], 1)
    out = calibrated_half_predictions(decide, score)
    assert (out[:, 1:] >= out[:, :-1]).all() and ((out >= 0) & (out <= 1)).all()


def test_isotonic_fit_pools_violators_and_ties():
    import numpy as np

    from adadepth.router.policy_sweep import isotonic_fit

    # x = 1 twice (ties pooled first: mean 0.5), then a drop at x = 2 that pools with them.
    fit = isotonic_fit(np.array([1.0, 1.0, 2.0, 3.0]), np.array([0.2, 0.8, 0.2, 0.9]))
    assert np.allclose(fit(np.array([0.0, 1.0, 2.0, 2.5, 3.0, 4.0])), [0.4, 0.4, 0.4, 0.65, 0.9, 0.9])
    x = np.random.default_rng(0).random(50)
    assert np.all(np.diff(isotonic_fit(x, np.sin(6 * x))(np.sort(x))) >= 0)   # never decreasing


def test_calibrated_split_half_oracle():
    from adadepth.router.policy_sweep import calibrated_split_half_oracle, split_half_oracle

    grid = DepthGrid((2, 4, 6), 6)
    # Both halves identical, the rows monotone, and every prompt twinned with one in another fold:
    # each fold's fitted map is the identity at every value it is asked about, so the calibrated
    # oracle makes the raw oracle's decisions, and is exactly calibrated.
    patterns = [("1011", "1111"), ("0001", "0011"), ("1111", "1111"), ("0110", "0111"), ("0000", "0101"),
                ("1110", "1111"), ("0111", "1111"), ("1000", "1100"), ("0100", "1101"), ("0010", "0111")]
    doubled = [_bits_record(f"p{i}", {2: "".join(c * 2 for c in a), 4: "".join(c * 2 for c in b), 6: "1" * 8})
               for i, (a, b) in enumerate(p for p in patterns for _ in range(2))]   # folds i % 5: twins differ
    qualities = (0.3, 0.5, 0.8)
    calibrated, raw = calibrated_split_half_oracle(doubled, grid, qualities), split_half_oracle(doubled, grid, qualities)
    for c, r in zip(calibrated, raw):
        assert {k: c[k] for k in r} == pytest.approx(r, abs=1e-4)
        assert c["calibration_error"] == pytest.approx(0, abs=1e-4)
    # Halves unrelated at depth 2 (every (even, odd) combination equally often, and each fold of
    # the cross-fit holds one of each): the raw half sends half the prompts to depth 2 and is
    # wrong there half the time; the calibrated one predicts the mean (0.5 < 0.6) for every prompt,
    # so all go to depth 4, where they do reach 0.6, and it is calibrated.
    combos = ("11", "10", "01", "00")                                 # (even, odd) bit at depth 2
    unrelated = [_bits_record(f"u{i}", {2: combos[i // 5] * 4, 4: "11111110", 6: "1" * 8}) for i in range(20)]
    row = calibrated_split_half_oracle(unrelated, grid, (0.6,))[0]
    assert row["mean_depth"] == 4 and row["calibration_error"] == pytest.approx(0, abs=1e-4)
    assert split_half_oracle(unrelated, grid, (0.6,))[0]["mean_depth"] == 3


def test_sharpen_keeps_the_mean_and_spreads():
    from adadepth.router.policy_sweep import sharpen

    predicted = torch.tensor([[0.5, 0.7, 1.0], [0.6, 0.8, 1.0], [0.7, 0.9, 1.0]])
    assert torch.allclose(sharpen(predicted, 1.0), predicted)
    twice = sharpen(predicted, 2.0)
    assert torch.allclose(twice[:, :-1].mean(0), predicted[:, :-1].mean(0))
    assert torch.allclose(twice[:, 0], torch.tensor([0.4, 0.6, 0.8])) and (twice[:, -1] == 1).all()
    assert torch.allclose(sharpen(predicted, 0.0)[:, :-1], predicted[:, :-1].mean(0).expand(3, 2))
    clipped = sharpen(predicted, 10.0)
    assert ((clipped >= 0) & (clipped <= 1)).all() and (clipped[:, 1:] >= clipped[:, :-1]).all()
