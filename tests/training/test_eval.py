"""`adadepth eval`: agreement 1.0 at full depth, the documented JSON shape, per-prompt agreement."""
from __future__ import annotations

import json
import os

import pytest

from adadepth import LLM
from adadepth.cli import main as cli_main
from adadepth.training.data import Split, load_examples, write_prompts_jsonl
from adadepth.training.evaluate import per_prompt_agreement

RESULT_KEYS = {"depth", "agreement", "kl", "exact_match_32", "perplexity", "num_prompts"}


@pytest.fixture(scope="module")
def prompts_file(fake_data, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("prompts") / "heldout.jsonl")
    write_prompts_jsonl(path, load_examples(fake_data, Split.HELDOUT)[:4])
    return path


def run_eval(args, capsys) -> None:
    cli_main(["eval", "--max-new-tokens", "8", "--exact-match-tokens", "4", "--max-num-seqs", "8",
              "--max-model-len", "256", *args])
    capsys.readouterr()


def test_single_model_json_and_full_depth_agreement(tiny_base, train_cache, prompts_file, tmp_path, capsys):
    out, plot = str(tmp_path / "eval.json"), str(tmp_path / "eval.png")
    run_eval(["--model", tiny_base, "--cache-dir", train_cache, "--prompts", prompts_file, "--depths", "3,6",
              "--json", out, "--plot", plot], capsys)
    report = json.load(open(out))
    assert report["model"] == tiny_base and report["num_layers"] == 6 and "models" not in report
    assert [r["depth"] for r in report["results"]] == [3, 6]
    for r in report["results"]:
        assert RESULT_KEYS <= set(r) and r["num_prompts"] == 4
    full = report["results"][-1]
    assert full["agreement"] == 1.0 and full["kl"] == 0.0 and full["exact_match_32"] == 1.0
    assert full["perplexity"] > 1 and 0 <= report["results"][0]["agreement"] <= 1
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_skipping_layers_that_do_nothing_agrees_everywhere(tiny_base, train_cache, prompts_file, tmp_path, capsys):
    """Constructed so that the answer is known: layers 3-5 write nothing into the residual stream
    (o_proj and down_proj zeroed), so depth 3 (layers 0-2 by the stored order) computes exactly
    what full depth does, and depth 2 does not."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adadepth.model.depth_plan import DepthPlan

    folder = tmp_path / "idle-layers"
    shutil.copytree(tiny_base, folder)
    weights = load_file(str(folder / "model.safetensors"))
    for layer in (3, 4, 5):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            weights[f"model.layers.{layer}.{name}"].zero_()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    DepthPlan(6, list(range(6)), source="test").save(str(folder))
    out = str(tmp_path / "idle.json")
    run_eval(["--model", str(folder), "--cache-dir", train_cache, "--prompts", prompts_file, "--depths", "2,3,6",
              "--no-exact-match", "--json", out], capsys)
    report = json.load(open(out))
    by_depth = {r["depth"]: r for r in report["results"]}
    assert by_depth[3]["agreement"] == 1.0 and by_depth[3]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert by_depth[2]["agreement"] < 1.0 and by_depth[2]["kl"] > 1e-4
    # Free-running: depth 3 writes exactly full depth's text, so it scores exactly the same.
    free = {r["depth"]: r for r in report["free_running"][0]["results"]}
    assert report["free_running"][0]["params"] == {}
    assert free[3] == {**free[6], "depth": 3} and free[2] != {**free[6], "depth": 2}


def test_free_running_scores_and_penalty_variants(tiny_base, train_cache, prompts_file, tmp_path, capsys):
    out = str(tmp_path / "free.json")
    run_eval(["--model", tiny_base, "--cache-dir", train_cache, "--prompts", prompts_file, "--depths", "3,6",
              "--no-perplexity", "--free-running-tokens", "24", "--free-running-variants",
              "repetition_penalty=2.0;frequency_penalty=1.5,presence_penalty=1.0", "--json", out], capsys)
    free = json.load(open(out))["free_running"]
    assert [v["params"] for v in free] == [{}, {"repetition_penalty": 2.0},
                                          {"frequency_penalty": 1.5, "presence_penalty": 1.0}]
    for variant in free:
        for r in variant["results"]:
            assert r["num_prompts"] == 4 and 0 < r["mean_tokens"] <= 24 and r["perplexity_full"] > 1
    plain, penalised = free[0]["results"], free[1]["results"]
    # A random model loops; a strong repetition penalty makes it repeat itself less at every depth.
    for p, q in zip(plain, penalised):
        assert p["repeated_4gram_share"] > 0.2 and q["repeated_4gram_share"] < p["repeated_4gram_share"]
        assert q["distinct_2"] > p["distinct_2"]


def test_repetition_metrics_on_known_text():
    from adadepth.training.free_running import FreeRunningScore, parse_variants

    score = FreeRunningScore()
    score.add_text([1, 2, 3, 4, 1, 2, 3, 4])  # 4-grams 1234 2341 3412 4123 1234; bigrams 12 23 34 41 12 23 34
    score.add_text([5, 6])                    # no 4-gram, one bigram
    assert (score.repeated_4grams, score.total_4grams) == (1, 5)
    assert (score.distinct_2grams, score.total_2grams) == (4 + 1, 7 + 1)
    assert parse_variants("") == [{}]
    assert parse_variants("repetition_penalty=1.1; frequency_penalty=0.5,presence_penalty=0.2") == [
        {}, {"repetition_penalty": 1.1}, {"frequency_penalty": 0.5, "presence_penalty": 0.2}]
    for bad in ("temperature=0.5", "repetition_penalty", "frequency_penalty=9"):
        with pytest.raises(ValueError):
            parse_variants(bad)


def test_compare_lists_models_and_keeps_single_shape_at_top(tiny_base, train_cache, prompts_file, tmp_path, capsys):
    art = str(tmp_path / "art")
    os.makedirs(art)
    with open(os.path.join(art, "adadepth.json"), "w") as f:
        json.dump({"base_model": os.path.abspath(tiny_base)}, f)  # an artifact that changes nothing
    out = str(tmp_path / "cmp.json")
    run_eval(["--model", art, "--compare", "--cache-dir", train_cache, "--prompts", prompts_file, "--depths", "4,6",
              "--max-prompts", "2", "--no-perplexity", "--no-exact-match", "--json", out], capsys)
    report = json.load(open(out))
    assert all(r["exact_match_32"] is None for m in report["models"] for r in m["results"])
    assert [m["model"] for m in report["models"]] == [art, os.path.abspath(tiny_base)]
    assert report["model"] == art and report["results"] == report["models"][0]["results"]
    for m in report["models"]:
        assert m["results"][-1]["agreement"] == 1.0 and m["results"][0]["perplexity"] is None
        assert m["results"][0]["num_prompts"] == 2
    # The artifact changes nothing, so at full depth it reproduces the base's greedy text exactly.
    fidelity = report["models"][0]["full_depth_vs_base"]
    assert fidelity["base"] == os.path.abspath(tiny_base) and fidelity["num_prompts"] == 2
    assert fidelity["positions"] > 0 and fidelity["agreement_with_base_greedy"] == 1.0
    # Same weights and greedy text as the base, so at every depth agreement with the base's
    # continuation is agreement with its own full depth.
    assert fidelity["by_depth"] == {str(r["depth"]): r["agreement"] for r in report["models"][0]["results"]}
    assert fidelity["by_depth"]["4"] < 1.0
    assert "full_depth_vs_base" not in report["models"][1]


def test_per_prompt_agreement(tiny_base, train_cache):
    llm = LLM(tiny_base, cache_dir=train_cache, num_kv_tokens=1024, max_model_len=128, max_num_batched_tokens=256)
    prompts = ["what is 2 + 2?", [{"role": "user", "content": "hello world"}], "x " * 200]
    rows = per_prompt_agreement(llm, prompts, [2, 6], max_new_tokens=6)
    assert rows[2] is None  # longer than the model's context
    for row in rows[:2]:
        assert set(row) == {2, 6} and row[6] == 1.0 and 0 <= row[2] <= 1


def test_compare_finds_the_default_artifacts_base():
    """`--model default --compare` compares with default-base, as the artifact folder would."""
    from adadepth.model.loader import DEFAULT_ARTIFACT_DIR
    from adadepth.training.evaluate import base_of

    assert base_of("default") == base_of(DEFAULT_ARTIFACT_DIR) == "default-base"
    assert base_of("default-base") is None
