"""`adadepth export`: the exported checkpoint, loaded by plain transformers, computes what the engine
computes at that depth (float64, custom layer orders, artifacts with LoRA, folded bypass maps)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from adadepth import LLM, SamplingParams
from adadepth.cli import main
from adadepth.export import EXPORT_META_FILE, ExportConfig, export_depth
from adadepth.model.forward_batch import ForwardBatch
from adadepth.model.depth_plan import DepthPlan
from adadepth.model.loader import ARTIFACT_FILE
from tiny_model import build_tiny_checkpoint
from output_helpers import chosen_logprobs

ORDER = [4, 1, 5, 0, 3, 2]  # depth 4 keeps layers 0, 1, 4, 5; depth 2 keeps 1, 4
PROMPT = "the quick brown fox jumps over"
LLM_OPTIONS = dict(dtype="float64", num_kv_tokens=1024, max_model_len=128, max_num_batched_tokens=256)


def _identity_bypass(dim: int) -> tuple[torch.Tensor, None]:
    return torch.eye(dim), None


def _random_bypass(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=gen), 0.1 * torch.randn(dim, generator=gen)


@pytest.fixture(scope="module")
def ordered_model(tmp_path_factory) -> str:
    """A tiny Llama with a stored custom (non early-exit) layer order and no bypass."""
    folder = build_tiny_checkpoint(str(tmp_path_factory.mktemp("export-llama")), "llama", seed=3, weight_scale=4.0)
    DepthPlan(6, ORDER, source="test").save(folder)
    return folder


@pytest.fixture(scope="module")
def lora_artifact(tmp_path_factory) -> str:
    """An adadepth artifact over a tied-embedding base: LoRA on two layers, a custom order, an identity
    bypass on a skipped middle layer and a real bypass before the first kept layer at depth 2."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("export-artifact")
    base = build_tiny_checkpoint(str(root / "base"), "llama", seed=5, tie_word_embeddings=True, weight_scale=4.0)
    artifact = root / "artifact"
    (artifact / "lora").mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in (1, 4):
        for proj, (out_dim, in_dim) in {"q_proj": (64, 64), "down_proj": (64, 128)}.items():
            module = "self_attn" if proj == "q_proj" else "mlp"
            key = f"base_model.model.model.layers.{layer}.{module}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_dim, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, 4, generator=gen)
    save_file(tensors, str(artifact / "lora" / "adapter_model.safetensors"))
    (artifact / "lora" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (artifact / ARTIFACT_FILE).write_text(json.dumps({"base_model": base, "lora": "lora", "overrides": None}))
    # Depth 2 keeps layers 1 and 4: layer 0 (before them) folds, layer 2 (between) is the identity.
    DepthPlan(6, ORDER, source="test", bypass={0: _random_bypass(64, 2), 2: _identity_bypass(64)}).save(str(artifact))
    return str(artifact)


def engine_logits(llm: LLM, ids: list[int], depth: int) -> torch.Tensor:
    """(T, V) teacher-forced logits of the engine's model at `depth`: one row per prefix, each row
    reading the last position of its own prefix."""
    model = llm.engine.model
    t = len(ids)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pos = torch.arange(t)
    mask = (pos[:, None] >= pos[None, :])[None, None].expand(t, 1, t, t)       # (B=T, 1, T, T)
    batch = ForwardBatch(
        input_ids=torch.tensor([ids] * t), positions=pos.expand(t, t).contiguous(),
        slot_mapping=torch.zeros(t * t, dtype=torch.long), context_blocks=None, attn_mask=mask,
        active_rows=model.active_rows([depth] * t), row_depths=[depth] * t, last_index=pos)
    kv = torch.zeros(model.num_layers, 2, 1, cfg.num_key_value_heads, head_dim, dtype=torch.float64)
    with torch.inference_mode():
        return model.compute_logits(model(batch, kv)).double()


def hf_logits(folder: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]                             # (T, V)


# The engine computes rope angles in float32 whatever the dtype, transformers its own way: on the
# source model at full depth the two already differ by ~3e-7 in float64 logits (of magnitude ~2).
# A folded embedding is also rounded once to the checkpoint's float32.
TOLERANCE = dict(rtol=0, atol=2e-6)


def assert_export_matches_engine(source: str, export_dir: str, depth: int, cache_dir: str) -> None:
    llm = LLM(source, cache_dir=cache_dir, **LLM_OPTIONS)
    ids = llm.tokenizer.encode(PROMPT)
    expected = engine_logits(llm, ids, depth)                                   # (T, V)
    torch.testing.assert_close(hf_logits(export_dir, ids), expected, **TOLERANCE)
    exported = LLM(export_dir, cache_dir=cache_dir, **LLM_OPTIONS)
    assert exported.num_layers == depth
    torch.testing.assert_close(engine_logits(exported, ids, depth), expected, **TOLERANCE)
    # Greedy generation agrees too: the engine at `depth` on the source, the engine at full depth on the export.
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, depth=depth, logprobs=0)
    source_out = llm.generate([PROMPT], params)[0]
    export_out = exported.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                           logprobs=0))[0]
    assert export_out.token_ids == source_out.token_ids
    lp = [chosen_logprobs(out) for out in (source_out, export_out)]
    torch.testing.assert_close(torch.tensor(lp[0]), torch.tensor(lp[1]), **TOLERANCE)


def test_export_equals_the_engine_at_its_depth(ordered_model, cache_dir, tmp_path):
    out = str(tmp_path / "depth-4")
    result = export_depth(ExportConfig(model=ordered_model, depth=4, cache_dir=cache_dir), out)
    assert result.kept_layers == [0, 1, 4, 5] and result.bypass.exact
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            EXPORT_META_FILE, "layer_order.json", "README.md"} <= files
    assert "bypass.safetensors" not in files  # stock loaders glob *.safetensors: nothing but the weights
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["num_hidden_layers"] == 4 and config["architectures"] == ["LlamaForCausalLM"]
    meta = json.loads(open(os.path.join(out, EXPORT_META_FILE)).read())
    assert meta["source_model"] == ordered_model and meta["depth"] == 4 and meta["num_layers"] == 6
    assert meta["kept_layers"] == [0, 1, 4, 5] and meta["layer_order"] == ORDER
    assert meta["layer_order_fingerprint"] == DepthPlan(6, ORDER).fingerprint() and meta["exact"] is True
    # The export keeps the source's nested order: source layers 4, 1, 5, 0 are export layers 2, 1, 3, 0.
    assert DepthPlan.load(out).layer_order == [2, 1, 3, 0]
    assert_export_matches_engine(ordered_model, out, 4, cache_dir)


def test_export_of_a_lora_artifact_folds_the_leading_bypass(lora_artifact, cache_dir, tmp_path):
    out = str(tmp_path / "depth-2")
    result = export_depth(ExportConfig(model=lora_artifact, depth=2, cache_dir=cache_dir), out)
    assert result.kept_layers == [1, 4]
    assert (result.bypass.folded, result.bypass.identity, result.bypass.dropped) == ([0], [2], [])
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["tie_word_embeddings"] is False  # the folded embedding is no longer the LM head
    assert_export_matches_engine(lora_artifact, out, 2, cache_dir)


def test_export_trims_per_layer_config_lists_and_keeps_qwen2_biases(tmp_path, cache_dir):
    source = build_tiny_checkpoint(str(tmp_path / "qwen2"), "qwen2", num_layers=4, seed=7, weight_scale=4.0)
    DepthPlan(4, [3, 0, 2, 1], source="test").save(source)
    out = str(tmp_path / "depth-3")
    export_depth(ExportConfig(model=source, depth=3, cache_dir=cache_dir), out)
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["num_hidden_layers"] == 3 and len(config["layer_types"]) == 3
    assert_export_matches_engine(source, out, 3, cache_dir)


def test_a_bypass_between_kept_layers_is_refused_unless_dropped(ordered_model, tmp_path, cache_dir):
    import shutil

    source = str(tmp_path / "with-bypass")
    shutil.copytree(ordered_model, source)
    # Depth 4 keeps 0, 1, 4, 5: layer 3 sits between kept layers.
    DepthPlan(6, ORDER, source="test", bypass={3: _random_bypass(64, 4)}).save(source)
    with pytest.raises(ValueError, match=r"layer 3 \(between kept layers\).*--drop-bypass"):
        export_depth(ExportConfig(model=source, depth=4, cache_dir=cache_dir), str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    out = str(tmp_path / "dropped")
    result = export_depth(ExportConfig(model=source, depth=4, cache_dir=cache_dir, drop_bypass=True), out)
    assert result.bypass.dropped == [3] and not result.bypass.exact
    meta = json.loads(open(os.path.join(out, EXPORT_META_FILE)).read())
    assert meta["exact"] is False and meta["bypass"]["dropped"] == [3]
    assert "not exact" in open(os.path.join(out, "README.md")).read()
    # Dropped means identity: the export equals the engine run without that map.
    ids = LLM(source, cache_dir=cache_dir, **LLM_OPTIONS).tokenizer.encode(PROMPT)
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(_reference_export(ordered_model, tmp_path, cache_dir), ids))
    # A map after the last kept layer (depth 1 keeps layer 4; the final norm is not linear) is refused too.
    DepthPlan(6, ORDER, source="test", bypass={5: _random_bypass(64, 5)}).save(source)
    with pytest.raises(ValueError, match=r"layer 5 \(after the last kept layer\)"):
        export_depth(ExportConfig(model=source, depth=1, cache_dir=cache_dir), str(tmp_path / "refused-2"))


def _reference_export(model: str, tmp_path, cache_dir: str) -> str:
    out = str(tmp_path / "reference")
    export_depth(ExportConfig(model=model, depth=4, cache_dir=cache_dir), out)
    return out


def test_adadepth_export_command(ordered_model, cache_dir, tmp_path, capsys):
    out = str(tmp_path / "cli")
    main(["export", "--model", ordered_model, "--depth", "2", "--cache-dir", cache_dir, out])
    report = json.loads(capsys.readouterr().out)
    assert report["kept_layers"] == [1, 4] and report["exact"] is True and report["output"] == out
    # An existing folder is not overwritten; bad depths and a missing --depth are clear errors.
    for argv, message in [(["--depth", "2", out], "already exists"), (["--depth", "7", out + "-7"], "exceeds"),
                          ([out + "-none"], "--depth is required"), (["--depth", "0", out + "-0"], ">= 1")]:
        with pytest.raises(SystemExit) as exc:
            main(["export", "--model", ordered_model, "--cache-dir", cache_dir, *argv])
        assert message in str(exc.value)


def test_export_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        ExportConfig(depth=2, dtype="int8")
    assert ExportConfig(depth=2, dtype="bfloat16").depth == 2


@pytest.mark.slow
def test_vllm_serves_the_export_like_the_engine(ordered_model, cache_dir, tmp_path):
    """Optional: only where vLLM is installed (it is not part of adadepth's environment)."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - missing, or present but unusable on this machine
        pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); the export is checked against "
                    "transformers above, and the depth tiers run it in the vllm/vllm-openai image")
    out = str(tmp_path / "depth-4")
    export_depth(ExportConfig(model=ordered_model, depth=4, cache_dir=cache_dir), out)
    engine = LLM(ordered_model, cache_dir=cache_dir, **{**LLM_OPTIONS, "dtype": "float32", "weight_dtype": "float32"})
    ids = engine.tokenizer.encode(PROMPT)
    expected = engine.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, depth=4))[0]
    served = vllm.LLM(out, dtype="float32", enforce_eager=True, max_model_len=128)
    got = served.generate([{"prompt_token_ids": ids}],
                          vllm.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert list(got.token_ids) == expected.token_ids
