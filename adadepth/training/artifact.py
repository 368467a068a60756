"""Write training results as adadepth artifacts and resumable checkpoints.

Artifact folder (loadable by `LLM(folder)` through `adadepth.model.loader`):

    adadepth.json         {"base_model": ..., "lora": "lora" | null, "overrides": ... | null, "train": {...}}
    lora/                 peft `save_pretrained` output (adapter_config.json + adapter_model.safetensors)
    overrides.safetensors full fine-tuning only: the weights that changed, under their HF names
    layer_order.json      the order trained with (+ bypass.safetensors after `adadepth calibrate --bypass`)

A checkpoint is an artifact plus `trainer_state.pt` (trainable weights, optimizer, data position,
RNG states), so every checkpoint is also servable.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from adadepth.model.depth_plan import DepthPlan
from adadepth.model.loader import ARTIFACT_FILE

LORA_DIR = "lora"
OVERRIDES_FILE = "overrides.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
CHECKPOINTS_DIR = "checkpoints"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cast_safetensors(path: str, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def save_artifact(folder: str, model, *, base_model: str, plan: DepthPlan, train_meta: dict,
                  lora_save_dtype: str = "float32", base_state: dict[str, torch.Tensor] | None = None) -> None:
    """`model` is a peft model (LoRA) or, with `base_state` (the base weights), a fully fine-tuned one."""
    os.makedirs(folder, exist_ok=True)
    meta = {"base_model": base_model, "lora": None, "overrides": None}
    if base_state is None:
        lora_dir = os.path.join(folder, LORA_DIR)
        model.save_pretrained(lora_dir)
        if lora_save_dtype != "float32":
            _cast_safetensors(os.path.join(lora_dir, "adapter_model.safetensors"), SAVE_DTYPES[lora_save_dtype])
        meta["lora"] = LORA_DIR
    else:
        from safetensors.torch import save_file

        state = model.state_dict()
        changed = {k: state[k].detach().to(base_state[k].dtype).cpu().contiguous()
                   for k in base_state if k in state and not torch.equal(state[k].detach().cpu(), base_state[k])}
        save_file(changed, os.path.join(folder, OVERRIDES_FILE), metadata={"format": "pt"})
        meta["overrides"] = OVERRIDES_FILE
    meta["train"] = train_meta
    plan.save(folder)
    with open(os.path.join(folder, ARTIFACT_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def save_trainer_state(folder: str, state: dict) -> None:
    tmp = os.path.join(folder, TRAINER_STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, TRAINER_STATE_FILE))


def load_trainer_state(folder: str) -> dict:
    path = os.path.join(folder, TRAINER_STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} holds no {TRAINER_STATE_FILE}: not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_dir(output: str, step: int) -> str:
    return os.path.join(output, CHECKPOINTS_DIR, f"step-{step:07d}")


def latest_checkpoint(output: str) -> str | None:
    found = sorted(p for p in glob.glob(os.path.join(output, CHECKPOINTS_DIR, "step-*"))
                   if os.path.exists(os.path.join(p, TRAINER_STATE_FILE)))
    return found[-1] if found else None
