"""A cheap layer order for models that have not been calibrated yet.

A layer whose output is nearly its input (cosine close to 1) changes little and is dropped
first. One forward pass over a short built-in text; calibration (`adadepth calibrate`)
replaces this with a measured order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adadepth.model.adaptive_llama import AdaptiveLlama
from adadepth.model.forward_batch import ForwardBatch
from adadepth.model.depth_plan import DepthPlan

# Fixed token ids rather than text: the heuristic must not depend on a tokenizer being present.
_PROBE_LEN = 64


@torch.inference_mode()
def influence_order(model: AdaptiveLlama, device: torch.device) -> DepthPlan:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, _PROBE_LEN), generator=gen).to(device)  # (1, T)
    t = ids.shape[1]
    pos = torch.arange(t, device=device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = model.embed_tokens.weight.dtype
    kv = torch.zeros(model.num_layers, 2, t + 1, cfg.num_key_value_heads, head_dim, dtype=dtype, device=device)
    batch = ForwardBatch(
        input_ids=ids, positions=pos[None], slot_mapping=pos + 1, context_blocks=None,
        attn_mask=(pos[:, None] >= pos[None, :])[None, None], active_rows=[1] * model.num_layers, row_depths=[model.num_layers],
        last_index=torch.tensor([t - 1], device=device))
    states: list[torch.Tensor] = []
    model(batch, kv, capture=states)
    influence = []
    for layer in range(model.num_layers):
        cos = F.cosine_similarity(states[layer].float(), states[layer + 1].float(), dim=-1).mean()
        influence.append(1.0 - float(cos))
    order = sorted(range(model.num_layers), key=lambda layer: -influence[layer])
    return DepthPlan(model.num_layers, order, source="heuristic:1-cos(in,out),random-token-probe")
