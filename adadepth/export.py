"""`adadepth export`: the depth-d model as a plain Hugging Face checkpoint that stock servers load.

A request of depth d runs the d layers ranked highest in the model's `layer_order`, in natural
order. This writes exactly that network as an ordinary Llama-family checkpoint with d layers
(renumbered 0..d-1), so vLLM or transformers can serve one depth tier without knowing about
adadepth. The weights come through the engine's own path (resolve_model -> load_state_dict ->
apply_artifact), so LoRA and overrides of an artifact are merged.

Bypass maps (`h -> h @ W.T + b` standing in for a skipped layer) have no place in a plain Llama:

  * an identity map needs nothing;
  * a map before the first kept layer acts on the embedding output, and an embedding is a table
    lookup, so `E @ W.T + b` is an exact new table (the LM head is untied from it if it was tied);
  * any other map (between kept layers, or after the last one: the final RMSNorm is not linear)
    cannot be expressed exactly. The export refuses, unless `drop_bypass` is set: then the map is
    left out and the export's metadata and README say that it differs from the engine at depth d.

Output folder: config.json (num_hidden_layers = d, layer_types trimmed), model.safetensors,
tokenizer files, generation_config.json, layer_order.json (the source order restricted to the
kept layers, so adadepth can still serve the export at lower depths), adadepth_export.json
(provenance: source model, depth, kept layers, order fingerprint, what happened to each bypass)
and README.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

import torch

from adadepth.config import _default_cache_dir
from adadepth.model.depth_plan import DepthPlan
from adadepth.model.loader import (ResolvedModel, apply_artifact, load_config, load_plan, load_state_dict,
                                   resolve_model)

logger = logging.getLogger(__name__)

EXPORT_META_FILE = "adadepth_export.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "model.layers.7.mlp.down_proj.weight" -> ("model.", 7, "mlp.down_proj.weight"); the prefix is optional.
_LAYER_KEY = re.compile(r"^((?:model\.)?)layers\.(\d+)\.(.+)$")


@dataclass
class ExportConfig:
    model: str = field(default="default", metadata={"help": (
        "what to export: 'default', 'default-base', a Hugging Face checkpoint folder, a .gguf file or an "
        "adadepth artifact folder (as `adadepth serve --model`)")})
    depth: int | None = field(default=None, metadata={"help": "layers to keep (required): the depth-d set of "
                                                               "the model's layer order"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "where converted models are cached"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto (as stored), float32, bfloat16, float16"})
    drop_bypass: bool = field(default=False, metadata={"help": (
        "leave out bypass maps that cannot be folded exactly into a plain checkpoint (the export then "
        "differs from the engine at this depth, and says so); without it such an export is refused")})

    def __post_init__(self) -> None:
        if self.depth is None:
            raise ValueError("--depth is required: the number of layers to keep")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be a layer count >= 1, got {self.depth!r}")
        if self.dtype != "auto" and self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(EXPORT_DTYPES)}; got {self.dtype!r}")


@dataclass
class BypassReport:
    """What the export did with the bypass map of each skipped layer (layer indices of the source)."""
    identity: list[int] = field(default_factory=list)     # nothing to do
    folded: list[int] = field(default_factory=list)       # folded into the embedding table
    dropped: list[int] = field(default_factory=list)      # left out: the export differs from the engine

    @property
    def exact(self) -> bool:
        return not self.dropped


@dataclass
class ExportResult:
    output_dir: str
    source_model: str
    depth: int
    num_layers: int
    kept_layers: list[int]
    plan: DepthPlan
    bypass: BypassReport

    def metadata(self, resolved: ResolvedModel, dtype: str, tied: bool) -> dict:
        return {
            "format": 1,
            "source_model": self.source_model,
            "checkpoint_dir": os.path.abspath(resolved.checkpoint_dir),
            "artifact_dir": os.path.abspath(resolved.artifact_dir) if resolved.artifact_dir else None,
            "depth": self.depth,
            "num_layers": self.num_layers,
            "kept_layers": self.kept_layers,
            "layer_order": self.plan.layer_order,
            "layer_order_fingerprint": self.plan.fingerprint(),
            "layer_order_source": self.plan.source,
            "bypass": {"identity": self.bypass.identity, "folded_into_embedding": self.bypass.folded,
                       "dropped": self.bypass.dropped},
            "exact": self.bypass.exact,
            "dtype": dtype,
            "tie_word_embeddings": tied,
        }


def _is_identity(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)
    return torch.equal(weight, eye) and (bias is None or not bool(bias.any()))


def _plan_like_the_engine(resolved: ResolvedModel, hf_config, state: dict[str, torch.Tensor]) -> DepthPlan:
    """The plan the engine would use. With none stored, the engine ranks layers by a heuristic on
    its first load and stores the order beside the model; do the same (and store it), so that the
    export and a later engine agree on which layers depth d keeps."""
    if DepthPlan.exists(resolved.plan_dir):
        return load_plan(resolved.plan_dir, hf_config.num_hidden_layers)
    from adadepth.model.adaptive_llama import AdaptiveLlama
    from adadepth.model.heuristic_order import influence_order

    model = AdaptiveLlama.from_state_dict(hf_config, DepthPlan.early_exit(hf_config.num_hidden_layers),
                                          {k: v.float() for k, v in state.items()}).eval()
    plan = influence_order(model, torch.device("cpu"))
    del model
    try:
        plan.save(resolved.plan_dir)
    except OSError as exc:  # a read-only model folder: the order lives in the export's metadata only
        logger.warning("could not store layer order in %s: %s", resolved.plan_dir, exc)
    return plan


def classify_bypass(plan: DepthPlan, depth: int, drop_bypass: bool) -> BypassReport:
    """Decide, for each skipped layer's bypass map, whether it vanishes, folds or must be dropped."""
    kept = plan.layers_for_depth(depth)
    report = BypassReport()
    unfoldable = []
    for layer in sorted(plan.bypass):
        if layer in kept:
            continue  # the layer runs at this depth: its bypass is never used
        weight, bias = plan.bypass[layer]
        if _is_identity(weight, bias):
            report.identity.append(layer)
        elif layer < kept[0]:
            report.folded.append(layer)
        else:
            unfoldable.append(layer)
    if unfoldable and not drop_bypass:
        where = ", ".join(f"layer {layer} ({'after the last kept layer' if layer > kept[-1] else 'between kept layers'})"
                          for layer in unfoldable)
        raise ValueError(
            f"at depth {depth} the engine replaces skipped {where} with a stored linear bypass map, which a "
            f"plain checkpoint cannot express exactly (only maps before the first kept layer {kept[0]} fold into "
            "the embedding). Export a depth whose skipped layers carry no such map, or pass --drop-bypass to "
            "export without it (the export then differs from the engine at this depth, and its README says so)")
    report.dropped = unfoldable
    return report


def _fold_into_embedding(embedding: torch.Tensor, plan: DepthPlan, layers: list[int]) -> torch.Tensor:
    """(V, D) table -> (V, D) table with the bypass maps of `layers` (ascending) applied to every row."""
    table = embedding.double()
    for layer in layers:
        weight, bias = plan.bypass[layer]
        table = table @ weight.double().T                                       # (V, D) @ (D, D)
        if bias is not None:
            table = table + bias.double()
    return table.to(embedding.dtype)


def _renumber(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """Keep the layers in `kept` (renumbered 0..d-1, natural order) and every non-layer weight."""
    new_index = {layer: i for i, layer in enumerate(kept)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, layer, rest = match.group(1), int(match.group(2)), match.group(3)
        if layer in new_index:
            out[f"{prefix}layers.{new_index[layer]}.{rest}"] = tensor
    return out


def _embedding_key(state: dict[str, torch.Tensor]) -> str:
    for key in ("model.embed_tokens.weight", "embed_tokens.weight"):
        if key in state:
            return key
    raise KeyError("the checkpoint has no embed_tokens.weight")


def _write_readme(path: str, result: ExportResult) -> None:
    lines = [f"# {os.path.basename(os.path.normpath(result.output_dir))}", "",
             f"`{result.source_model}` cut to depth {result.depth} of {result.num_layers} layers by `adadepth export`: "
             f"source layers {result.kept_layers} (the depth-{result.depth} set of the layer order "
             f"`{result.plan.fingerprint()}`), renumbered 0..{result.depth - 1}.", "",
             "A plain Hugging Face checkpoint: transformers and vLLM load it as they would the source model.", ""]
    if result.bypass.folded:
        lines += [f"The bypass maps of skipped layers {result.bypass.folded} (before the first kept layer) are "
                  "folded into the embedding table, which is therefore untied from the LM head.", ""]
    if result.bypass.dropped:
        lines += ["**This export is not exact.** At this depth the adadepth engine replaces skipped layers "
                  f"{result.bypass.dropped} with stored linear bypass maps that a plain checkpoint cannot express; "
                  "they were dropped (`--drop-bypass`), so this model's outputs differ from the engine's at "
                  f"depth {result.depth}.", ""]
    else:
        lines += [f"Its outputs equal the adadepth engine's at depth {result.depth} (up to floating-point rounding).", ""]
    lines += [f"Provenance: `{EXPORT_META_FILE}`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def export_depth(config: ExportConfig, output_dir: str) -> ExportResult:
    """Write the depth-`config.depth` model to `output_dir` (which must not hold files yet)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ValueError(f"{output_dir} already exists and is not an empty folder; export into a new folder")
    resolved = resolve_model(config.model, config.cache_dir)
    hf_config = load_config(resolved.checkpoint_dir)
    num_layers = hf_config.num_hidden_layers
    if config.depth > num_layers:
        raise ValueError(f"depth {config.depth} exceeds the model's {num_layers} layers")
    state = load_state_dict(resolved.checkpoint_dir)
    if resolved.artifact_dir:
        state = apply_artifact(state, resolved.artifact_dir)
    plan = _plan_like_the_engine(resolved, hf_config, state)
    kept = plan.layers_for_depth(config.depth)
    bypass = classify_bypass(plan, config.depth, config.drop_bypass)

    # The LM head as the engine reads it: lm_head.weight when stored, else the (tied) embedding.
    embed_key = _embedding_key(state)
    embedding = state[embed_key]
    head = state.get("lm_head.weight", embedding)
    out_state = _renumber(state, kept)
    del state
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    if bypass.folded:
        out_state[embed_key] = _fold_into_embedding(embedding, plan, bypass.folded)
    # transformers ties the head to the embedding when the config says so, whatever lm_head.weight
    # holds; keep the tie only when that is still what the engine computes.
    tied = tied and not bypass.folded and (head is embedding or torch.equal(head, embedding))
    out_state.pop("lm_head.weight", None)
    if not tied:
        out_state["lm_head.weight"] = head.clone()  # its own storage: safetensors refuses shared tensors
    if config.dtype != "auto":
        out_state = {k: v.to(EXPORT_DTYPES[config.dtype]) if v.is_floating_point() else v for k, v in out_state.items()}
    dtype = config.dtype if config.dtype != "auto" else str(next(iter(out_state.values())).dtype).removeprefix("torch.")

    # config.json: d layers; per-layer lists follow the kept layers.
    hf_config.num_hidden_layers = config.depth
    if getattr(hf_config, "layer_types", None) is not None:
        hf_config.layer_types = [hf_config.layer_types[i] for i in kept]
    hf_config.tie_word_embeddings = tied
    if config.dtype != "auto":
        hf_config.dtype = config.dtype
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config

    os.makedirs(output_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out_state.items()}, os.path.join(output_dir, WEIGHTS_FILE),
              metadata={"format": "pt"})
    hf_config.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(resolved.checkpoint_dir).save_pretrained(output_dir)
    generation_config = os.path.join(resolved.checkpoint_dir, "generation_config.json")
    if os.path.exists(generation_config):
        shutil.copyfile(generation_config, os.path.join(output_dir, "generation_config.json"))
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(output_dir)
    # The source order restricted to the kept layers: the nested depth sets of the export are those
    # of the source, should adadepth serve the export itself at lower depths.
    new_index = {layer: i for i, layer in enumerate(kept)}
    DepthPlan(config.depth, [new_index[layer] for layer in plan.layer_order if layer in new_index],
              source=f"export of depth {config.depth}/{num_layers} ({plan.source})").save(output_dir)

    result = ExportResult(output_dir, config.model, config.depth, num_layers, kept, plan, bypass)
    with open(os.path.join(output_dir, EXPORT_META_FILE), "w") as f:
        json.dump(result.metadata(resolved, dtype, tied), f, indent=1)
    _write_readme(os.path.join(output_dir, "README.md"), result)
    return result
