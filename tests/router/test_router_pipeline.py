"""`adadepth router label / train / eval` end to end on a tiny model, and the server's report."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import ORDER, make_router

from adadepth.cli import main
from adadepth.model.depth_plan import DepthPlan
from adadepth.router.difficulty_router import ROUTER_CONFIG_FILE, DifficultyRouter
from adadepth.router.label_store import LabelStore
from adadepth.training.data import Split, split_of

WORDS = ["fox", "dog", "clips", "april", "world", "add", "layers", "depth", "tokens", "friends", "lazy", "quick"]


def prompts_file(path, count: int, offset: int) -> str:
    rows = []
    i = offset
    while len(rows) < count:
        text = " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1 + i % 7)) + f" {i}?"
        i += 1
        if split_of(text) is not Split.HELDOUT:
            rows.append({"messages": [{"role": "user", "content": text}], "source": "ab"[len(rows) % 2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def model_dir(router_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(router_ckpt, folder)
    return str(folder)


def nondecreasing(values: list[float]) -> bool:
    return all(a <= b + 1e-9 for a, b in zip(values, values[1:]))


def assert_png(path) -> None:
    """A real picture: a PNG that decodes to an image of plot size."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert height >= 200 and width >= 300


def test_label_train_eval(model_dir, cache_dir, tmp_path, capsys):
    common = ["--model", model_dir, "--cache-dir", cache_dir]
    calib = prompts_file(tmp_path / "calib.jsonl", 30, 0)
    labels = str(tmp_path / "labels.jsonl")
    main(["router", "label", *common, "--prompts", calib, "--count", "0", "--max-new-tokens", "8", "--output", labels,
          "--chunk", "12", "--max-num-seqs", "8"])
    meta, records = LabelStore(labels).read()
    assert meta["depth_grid"] == [2, 3, 4, 5, 6] and meta["layer_order_fingerprint"] == ",".join(map(str, ORDER))
    assert len(records) == 30 and all(r.positions == 8 and r.matches[6] == 8 for r in records)
    assert all(0 <= r.matches[d] <= 8 for r in records for d in (2, 3, 4, 5))
    # Per-position bits (label format 2) are the counts, position by position.
    assert meta["label_format"] == 2
    assert all(len(r.match_bits[d]) == 8 and r.match_bits[d].count("1") == r.matches[d] for r in records for d in r.matches)
    # Resuming finds everything done.
    main(["router", "label", *common, "--prompts", calib, "--count", "0", "--max-new-tokens", "8", "--output", labels])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new"] == 0

    main(["router", "train", *common, "--labels", labels, "--pca-dims", "8", "--hidden-size", "8",
          "--max-epochs", "60", "--val-fraction", "0.3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["router"] == model_dir and summary["feature_layers"] == 2 and summary["num_prompts"] == 30
    assert summary["num_trained_parameters"] < 5000
    router = DifficultyRouter.load(model_dir, DepthPlan.load(model_dir))
    assert router.info["num_prompts"] == 30

    heldout = prompts_file(tmp_path / "heldout.jsonl", 8, 1000)
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    main(["router", "eval", *common, "--prompts", heldout, "--labels", str(tmp_path / "heldout_labels.jsonl"),
          "--max-new-tokens", "8", "--qualities", "0.5,0.8,0.9", "--timing-prompts", "3",
          "--json", str(out_json), "--plot", str(out_png)])
    report = json.loads(out_json.read_text())
    assert [r["depth"] for r in report["results"]] == [2, 3, 4, 5, 6] and report["results"][-1]["agreement"] == 1.0
    by_source = report["results_by_source"]
    assert set(by_source) == {"a", "b"} and [curve[0]["num_prompts"] for curve in by_source.values()] == [4, 4]
    for i, total in enumerate(report["results"]):  # the sources' positions add up to the whole curve
        parts = [curve[i] for curve in by_source.values()]
        assert sum(p["num_positions"] for p in parts) == total["num_positions"]
        pooled = sum(p["agreement"] * p["num_positions"] for p in parts) / total["num_positions"]
        assert abs(pooled - total["agreement"]) < 1e-4
    assert [r["quality"] for r in report["router"]] == [0.5, 0.8, 0.9]
    for r in report["router"]:
        assert {"mean_depth", "agreement", "predicted_agreement", "gain_vs_fixed"} <= set(r)
    # Asking for more quality never buys fewer layers, for the router and for every oracle or sweep.
    assert nondecreasing([r["mean_depth"] for r in report["router"]])
    assert report["timing"]["num_prompts"] == 3 and report["timing"]["engine_matches_offline_decisions"] == 3
    assert set(report["prediction_fit"]) == {"2", "3", "4", "5"}
    assert [r["quality"] for r in report["split_half_oracle"]] == [0.5, 0.8, 0.9]
    assert nondecreasing([r["mean_depth"] for r in report["split_half_oracle"]])
    assert [r["quality"] for r in report["calibrated_split_half_oracle"]] == [0.5, 0.8, 0.9]
    assert nondecreasing([r["mean_depth"] for r in report["calibrated_split_half_oracle"]])
    for r in report["calibrated_split_half_oracle"]:
        assert r["calibration_error"] == pytest.approx(r["predicted_agreement"] - r["agreement"], abs=2e-5)
    assert report["sharpened_router"]["factor"] == 2.0
    assert [r["quality"] for r in report["sharpened_router"]["rows"]] == [0.5, 0.8, 0.9]
    assert set(report["sharpened_router"]["prediction_fit"]) == {"2", "3", "4", "5"}
    assert report["label_reliability"] == {}   # 8-token labels: below the 16 positions per half it needs
    assert_png(out_png)

    # benchmarks/router_feature_study.py on the same labels: every feature set scored on the held-out ones.
    from adadepth.benchmarks.router_feature_study import FEATURE_SETS, QUALITIES
    from adadepth.benchmarks.router_feature_study import main as study

    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(labels, folder / "router_labels.jsonl")
    shutil.copy(tmp_path / "heldout_labels.jsonl", folder / "router_heldout_labels.jsonl")
    report = study(["--artifact", str(folder), "--model", model_dir, "--cache-dir", cache_dir,
                    "--json", str(tmp_path / "study.json"), "--plot", str(tmp_path / "study.png")])
    assert_png(tmp_path / "study.png")
    assert json.loads((tmp_path / "study.json").read_text()) == json.loads(json.dumps(report))
    assert report["num_fit_prompts"] == 30 and report["num_test_prompts"] == 8
    assert {tuple(r["features"]) for r in report["feature_sets"]} == set(FEATURE_SETS)
    for r in report["feature_sets"]:
        assert [p["quality"] for p in r["sweep"]] == list(QUALITIES)
        assert nondecreasing([p["mean_depth"] for p in r["sweep"]])
    assert set(report["correlation_with_agreement"]["first_token_entropy"]) == {"2", "3", "4", "5"}

    # benchmarks/router_prompt_probe.py: the prompt's own agreement, correlated with its labels.
    from adadepth.benchmarks.router_prompt_probe import corr, main as probe

    probe_json = tmp_path / "probe.json"
    report = probe(["--labels", str(tmp_path / "heldout_labels.jsonl"), "--model", model_dir, "--cache-dir", cache_dir,
                    "--json", str(probe_json), "--plot", str(tmp_path / "probe.png")])
    assert json.loads(probe_json.read_text()) == json.loads(json.dumps(report))
    assert_png(tmp_path / "probe.png")
    assert report["num_prompts"] == 8 and [r["depth"] for r in report["correlations"]] == [2, 3, 4, 5]
    # Each prompt is scored past the template's shared prefix, and keeps at least one position.
    assert report["shared_prefix_tokens"] > 0 and report["scored_prompt_positions"] >= 8
    _, records = LabelStore(str(tmp_path / "heldout_labels.jsonl")).read()
    records = [r for r in records if r.positions > 0]
    for r in report["correlations"]:
        assert 0 <= r["mean_prompt_agreement"] <= 1
        assert r["mean_label"] == pytest.approx(sum(x.agreement(r["depth"]) for x in records) / len(records), abs=1e-4)
        labels = [x.agreement(r["depth"]) for x in records]
        lengths = [math.log(len(x.prompt_token_ids)) for x in records]
        want = corr(lengths, labels)                       # the probe's length correlation, recomputed
        assert (math.isnan(want) and math.isnan(r["r_log_prompt_tokens"])) or r["r_log_prompt_tokens"] == pytest.approx(want, abs=1e-3)
        if len(set(labels)) > 1:                           # labels that vary: every correlation is a number
            assert all(-1 <= r[k] <= 1 for k in ("r_prompt_agreement", "r_prompt_kl"))


def test_shared_prefix_len():
    from adadepth.benchmarks.router_prompt_probe import corr, shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 9], [1, 2, 4]]) == 2
    assert shared_prefix_len([[1, 2], [1, 2, 3]]) == 1  # the shortest prompt keeps a position
    assert shared_prefix_len([[5, 6, 7]]) == 2
    assert abs(corr([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]) - 0.9934) < 1e-3 and math.isnan(corr([1.0, 1.0], [1.0, 2.0]))


def test_labels_of_other_weights_are_refused(model_dir, cache_dir, tmp_path):
    """Labels belong to weights, not to a model name: a retrained model must be relabelled."""
    common = ["--model", model_dir, "--cache-dir", cache_dir]
    calib = prompts_file(tmp_path / "calib.jsonl", 12, 0)
    labels = tmp_path / "labels.jsonl"
    main(["router", "label", *common, "--prompts", calib, "--count", "0", "--max-new-tokens", "4",
          "--output", str(labels)])
    lines = labels.read_text().splitlines()
    meta = json.loads(lines[0])["meta"]
    assert len(meta["weights_fingerprint"]) == 16
    meta["weights_fingerprint"] = "0" * 16  # as if labelled before the adapter was retrained
    labels.write_text("\n".join([json.dumps({"meta": meta}), *lines[1:]]) + "\n")
    with pytest.raises(SystemExit, match="other weights"):
        main(["router", "train", *common, "--labels", str(labels), "--pca-dims", "4", "--hidden-size", "4"])
    with pytest.raises(SystemExit, match="other settings"):
        main(["router", "label", *common, "--prompts", calib, "--count", "0", "--max-new-tokens", "4",
              "--output", str(labels)])


def test_weights_fingerprint_sees_through_float16_rounding(model_dir, cache_dir):
    """One fingerprint for a float32 model whether an engine rounded its weights to float16 or not,
    another for other weights."""
    import torch

    from adadepth.router.labeler import weights_fingerprint
    from adadepth.training.sequence_forward import load_engine_model

    net, _, _ = load_engine_model(model_dir, cache_dir)
    before = weights_fingerprint(net)
    assert net.round_weights(torch.float16) > 0
    assert weights_fingerprint(net) == before
    with torch.no_grad():
        net.lm_head.weight.mul_(1.5)
    assert weights_fingerprint(net) != before


def test_training_on_heldout_prompts_is_refused(model_dir, cache_dir, tmp_path):
    from adadepth.router.label_store import LabelRecord
    from adadepth.router.router_trainer import check_not_heldout

    text = next(f"question {i}" for i in range(1000) if split_of(f"question {i}") is Split.HELDOUT)
    with pytest.raises(ValueError, match="held-out"):
        check_not_heldout([LabelRecord("x", [{"role": "user", "content": text}], [1, 2], 8, {6: 8})])


def test_server_reports_router_decisions(model_dir, cache_dir):
    from fastapi.testclient import TestClient

    from adadepth.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from adadepth.engine.llm_engine import LLMEngine
    from adadepth.server.api_server import build_app
    from adadepth.server.config import ServerConfig

    make_router(DepthPlan.load(model_dir), agreements=[0.2, 0.5, 0.8, 0.95]).save(model_dir)
    assert (DepthPlan.exists(model_dir) and (__import__("os").path.exists(f"{model_dir}/{ROUTER_CONFIG_FILE}")))
    engine = LLMEngine(EngineConfig(ModelConfig(model=model_dir, cache_dir=cache_dir, dtype="float64"),
                                    CacheConfig(num_kv_tokens=4096),
                                    SchedulerConfig(max_model_len=256, max_num_batched_tokens=512)))
    config = ServerConfig().for_router(engine.depth_router is not None)
    with TestClient(build_app(engine, config)) as client:
        body = {"model": engine.model_name, "prompt": "hello world", "max_tokens": 2, "temperature": 0}
        routed = client.post("/v1/completions", json=body).json()["adadepth"]
        assert routed == {**routed, "depth": 5, "source": "router", "quality": 0.9}
        assert routed["predicted_agreement"] == pytest.approx(0.95, abs=1e-3)
        explicit = client.post("/v1/completions", json={**body, "depth": 2}).json()["adadepth"]
        assert (explicit["depth"], explicit["source"], explicit["predicted_agreement"]) == (2, "request", None)
        metrics = client.get("/metrics").text
    assert 'adadepth:predicted_agreement_count{' in metrics and "source=\"router\"" in metrics
