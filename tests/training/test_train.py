"""End-to-end `adadepth train` on a tiny model: artifact shape, LoRA merge, resume, full fine-tuning."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from adadepth import LLM
from adadepth.cli import main as cli_main
from adadepth.model.depth_plan import DepthPlan
from adadepth.training.sequence_forward import SequenceBatch, SequenceForward


def train(tiny_base, data, cache, out, *extra):
    cli_main(["train", "--model", tiny_base, "--data-dir", data, "--cache-dir", cache, "--output", out,
              "--batch-size", "4", "--max-seq-len", "64", "--lr", "0.02", "--no-progress-bar", "--log-every", "1",
              *extra])


@pytest.fixture(scope="module")
def trained(tiny_base, fake_data, train_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "art")
    train(tiny_base, fake_data, train_cache, out, "--max-steps", "3", "--checkpoint-every", "2",
          "--layer-order", "early-exit", "--early-exit-weight", "0.5", "--early-exit-every", "2",
          "--profile-steps", "1", "--op-profile", out + "-ops.txt")
    return out


def test_op_profile_table_of_the_profiled_step(trained):
    table = open(trained + "-ops.txt").read()
    # Step 2 alone is profiled (no CUDA here, so one table, by host time); its matmuls show.
    assert "# sorted by self_cpu_time_total" in table
    assert "aten::mm" in table or "aten::addmm" in table or "aten::linear" in table


def full_logits(model_path, cache, ids):
    # weight_dtype float32: the merged weights as they are, for peft's float32 merge to be the oracle.
    llm = LLM(model_path, cache_dir=cache, dtype="float32", weight_dtype="float32", num_kv_tokens=512,
              max_model_len=128, max_num_batched_tokens=256)
    fwd = SequenceForward(llm.engine.model)
    return fwd.logits(fwd.final_states(SequenceBatch.build([ids], "cpu"), llm.num_layers))[0]


def test_artifact_layout_and_metadata(trained, tiny_base):
    for name in ("adadepth.json", "layer_order.json", "train_log.jsonl", "lora/adapter_config.json",
                 "lora/adapter_model.safetensors"):
        assert os.path.exists(os.path.join(trained, name)), name
    meta = json.load(open(os.path.join(trained, "adadepth.json")))
    assert meta["base_model"] == os.path.abspath(tiny_base) and meta["lora"] == "lora"
    t = meta["train"]
    assert t["steps"] == 3 and t["stopped_by"] == "max_steps"
    assert t["config"]["drops"]["drop_mode"] == "mixed" and t["config"]["adapter"]["lora_rank"] == 16
    assert set(t["final_losses"]) >= {"loss", "ce", "kl", "early_exit"} and t["final_losses"]["early_exit"] > 0
    assert DepthPlan.load(trained).layer_order == list(range(6))
    log = [json.loads(line) for line in open(os.path.join(trained, "train_log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert t["tokens"] == log[-1]["tokens"] and log[0]["tokens"] < log[1]["tokens"] < log[2]["tokens"]
    keys = load_file(os.path.join(trained, "lora/adapter_model.safetensors"))
    assert any(".mlp.down_proj.lora_A." in k for k in keys) and any(".self_attn.q_proj.lora_B." in k for k in keys)


def test_engine_merge_equals_peft_merge_and_differs_from_base(trained, tiny_base, train_cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = [5, 17, 42, 99, 7, 3, 250, 11]
    engine = full_logits(trained, train_cache, ids)
    base = full_logits(tiny_base, train_cache, ids)
    assert (engine - base).abs().max() > 1e-3  # the adapter changed the model
    hf = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(hf, os.path.join(trained, "lora")).merge_and_unload()
    with torch.no_grad():
        ref = merged(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(engine, ref, atol=1e-4), (engine - ref).abs().max()


def test_resume_continues_exactly(trained, tiny_base, fake_data, train_cache, tmp_path):
    ckpt = os.path.join(trained, "checkpoints", "step-0000002")
    assert os.path.exists(os.path.join(ckpt, "trainer_state.pt"))
    assert LLM(ckpt, cache_dir=train_cache, num_kv_tokens=512, max_model_len=128,
               max_num_batched_tokens=256).num_layers == 6  # a checkpoint is an artifact too
    out = str(tmp_path / "resumed")
    train(tiny_base, fake_data, train_cache, out, "--max-steps", "3", "--resume", ckpt,
          "--layer-order", "early-exit", "--early-exit-weight", "0.5", "--early-exit-every", "2")
    a = load_file(os.path.join(trained, "lora/adapter_model.safetensors"))
    b = load_file(os.path.join(out, "lora/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert json.load(open(os.path.join(out, "adadepth.json")))["train"]["steps"] == 3


def test_full_finetune_time_budget_and_auto_order(tiny_base, fake_data, train_cache, tmp_path):
    out = str(tmp_path / "full")
    train(tiny_base, fake_data, train_cache, out, "--full-finetune", "--max-steps", "50", "--max-minutes", "0.0001",
          "--drop-mode", "order", "--ce-weight", "1", "--kl-weight", "0.5")
    meta = json.load(open(os.path.join(out, "adadepth.json")))
    assert meta["overrides"] == "overrides.safetensors" and meta["lora"] is None
    assert meta["train"]["stopped_by"] == "max_minutes" and meta["train"]["steps"] < 50
    # auto with no calibrated order and order drops: calibrated before training, recorded
    assert meta["train"]["layer_order_source"].startswith("calibrated")
    overrides = load_file(os.path.join(out, "overrides.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in overrides
    ids = [5, 17, 42, 99]
    assert (full_logits(out, train_cache, ids) - full_logits(tiny_base, train_cache, ids)).abs().max() > 1e-4


def test_teacher_is_the_base_model_with_adapters_off(tiny_base, fake_data, train_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from adadepth.training.chat_batches import collate, EncodedChat
    from adadepth.training.drop_schedule import DropConfig
    from adadepth.training.losses import LossConfig
    from adadepth.training.train_config import AdapterConfig, TrainConfig
    from adadepth.training.trainer import Trainer

    t = Trainer(TrainConfig(model=tiny_base, data_dir=fake_data, cache_dir=train_cache, output=str(tmp_path),
                            layer_order="early-exit", max_seq_len=64, progress_bar=False),
                AdapterConfig(), DropConfig(), LossConfig())
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter
    batch = collate([EncodedChat([5, 17, 42, 99, 7, 3], 3), EncodedChat([8, 9, 10, 11], 2)], pad_id=0)
    teacher = t._teacher_states(batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        student = t.inner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    assert torch.allclose(teacher[real], ref[real], atol=1e-5)
    assert not torch.allclose(student[real], ref[real], atol=1e-3)  # adapters are back on afterwards
    assert all(p.requires_grad for n, p in t.model.named_parameters() if "lora_" in n)


def test_self_distill_teacher_is_own_full_depth_except_on_anchor_rows(tiny_base, fake_data, train_cache, tmp_path):
    from adadepth.training.chat_batches import collate, EncodedChat
    from adadepth.training.drop_schedule import DropConfig, DropDecision
    from adadepth.training.losses import LossConfig
    from adadepth.training.train_config import AdapterConfig, TrainConfig
    from adadepth.training.trainer import Trainer

    t = Trainer(TrainConfig(model=tiny_base, data_dir=fake_data, cache_dir=train_cache, output=str(tmp_path),
                            layer_order="early-exit", max_seq_len=64, progress_bar=False),
                AdapterConfig(), DropConfig(), LossConfig(self_distill=True))
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate([EncodedChat([5, 17, 42, 99, 7, 3], 3), EncodedChat([8, 9, 10, 11], 2),
                     EncodedChat([12, 13, 14, 15, 16], 2)], pad_id=0)
    n = t.num_layers
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[0, -1] = keep[2, 1] = False                     # rows 0 and 2 skip a layer, row 1 is an anchor
    decision = DropDecision(keep, torch.ones(3, n))
    teacher = t._self_teacher_states(batch, decision)
    base = t._teacher_states(batch)
    with torch.no_grad():
        own = t.inner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    for row, expected in ((0, own), (1, base), (2, own)):
        assert torch.allclose(teacher[row][real[row]], expected[row][real[row]], atol=1e-5), row
    assert not torch.allclose(own[real], base[real], atol=1e-3)   # the two teachers do differ
    # All anchors: the base alone; no anchors: the student alone.
    assert torch.allclose(t._self_teacher_states(batch, DropDecision(torch.ones(3, n, dtype=torch.bool),
                                                                      torch.ones(3, n)))[real], base[real], atol=1e-5)
    keep[1, 0] = False
    assert torch.allclose(t._self_teacher_states(batch, DropDecision(keep, torch.ones(3, n)))[real], own[real], atol=1e-5)
    # And a training run with it goes through (anchors on, so both teachers are used).
    out = str(tmp_path / "art")
    train(tiny_base, fake_data, train_cache, out, "--max-steps", "2", "--layer-order", "early-exit",
          "--self-distill", "--full-depth-fraction", "0.5", "--ce-weight", "0")
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert log[-1]["step"] == 2 and log[-1]["loss"] == pytest.approx(log[-1]["kl"])   # --ce-weight 0: KL only


def test_init_adapter_starts_from_the_artifacts_weights(trained, tiny_base, fake_data, train_cache, tmp_path):
    """One step at a tiny learning rate from `trained`'s adapter lands next to its weights (and
    far from a fresh run's); the source is recorded; another rank or --resume is refused."""
    out = str(tmp_path / "cont")
    train(tiny_base, fake_data, train_cache, out, "--max-steps", "1", "--lr", "1e-9", "--layer-order", trained,
          "--init-adapter", trained)
    before = load_file(os.path.join(trained, "lora/adapter_model.safetensors"))
    after = load_file(os.path.join(out, "lora/adapter_model.safetensors"))
    assert before.keys() == after.keys()
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and all(before[k].abs().max() > 0 for k in lora_b)   # a fresh adapter's B is zero
    for k in before:
        torch.testing.assert_close(after[k].float(), before[k].float(), atol=1e-6, rtol=1e-5)
    meta = json.load(open(os.path.join(out, "adadepth.json")))
    assert meta["train"]["init_adapter"] == os.path.abspath(trained)
    for extra, message in ((("--lora-rank", "8", "--init-adapter", trained), "has rank 16"),
                           (("--init-adapter", trained, "--resume", "auto"), "pick one"),
                           (("--init-adapter", str(tmp_path)), "no LoRA adapter")):
        with pytest.raises(SystemExit, match=message):   # the CLI's one-line error, no traceback
            train(tiny_base, fake_data, train_cache, str(tmp_path / "bad"), "--max-steps", "1", *extra)
