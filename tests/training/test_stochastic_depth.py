"""Per-sample layer drops inside a transformers Llama: dropped rows pass through unchanged."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adadepth.training.drop_schedule import DropDecision
from adadepth.training.stochastic_depth import StochasticDepth


def tiny_hf(num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def decision(keep: list[list[bool]], scale: list[list[float]] | None = None) -> DropDecision:
    k = torch.tensor(keep)
    return DropDecision(k, torch.ones(k.shape) if scale is None else torch.tensor(scale))


def run(model, sd, ids, mask, dec):
    sd.capture = []
    with torch.no_grad(), sd.dropping(dec):
        out = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    states, sd.capture = sd.capture, None
    return out, states


def test_dropped_sample_passes_through_and_kept_rows_match_running_alone():
    model = tiny_hf()
    names = [n for n, _ in model.named_parameters()]
    sd = StochasticDepth(model)
    assert [n for n, _ in model.named_parameters()] == names  # nothing renamed: peft keys stay the base's
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0  # a padded row
    keep = [[True, False, True, True], [True, True, True, True], [False, True, False, True]]
    _, states = run(model, sd, ids, mask, decision(keep))
    embeds = model.model.embed_tokens(ids)
    inputs = [embeds] + states[:-1]
    for b in range(3):
        for layer in range(4):
            same = torch.equal(states[layer][b], inputs[layer][b])
            assert same == (not keep[b][layer]), (b, layer)
    # Each row alone (no gather, its own mask) gives the same final states as the mixed batch.
    full, _ = run(model, sd, ids, mask, decision(keep))
    for b in range(3):
        alone, _ = run(model, sd, ids[b: b + 1], mask[b: b + 1], decision([keep[b]]))
        n = int(mask[b].sum())
        assert torch.allclose(full[b, :n], alone[0, :n], atol=1e-5)


def test_no_decision_is_the_plain_model_and_remove_restores():
    model = tiny_hf()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sd = StochasticDepth(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
        with sd.dropping(decision([[True] * 4] * 2)):
            assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)
    sd.remove()
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_rescale_scales_the_residual_update():
    model = tiny_hf(2)
    sd = StochasticDepth(model)
    ids = torch.randint(0, 50, (1, 4))
    mask = torch.ones(1, 4, dtype=torch.long)
    _, plain = run(model, sd, ids, mask, decision([[True, True]]))
    _, scaled = run(model, sd, ids, mask, decision([[True, True]], [[2.0, 1.0]]))
    h0 = model.model.embed_tokens(ids)
    assert torch.allclose(scaled[0] - h0, 2 * (plain[0] - h0), atol=1e-5)


def test_gradients_reach_only_kept_layers():
    model = tiny_hf()
    model.train()
    sd = StochasticDepth(model)
    ids = torch.randint(0, 50, (2, 6))
    with sd.dropping(decision([[True, False, True, True], [True, False, True, False]])):
        model.model(input_ids=ids).last_hidden_state.sum().backward()
    grads = [layer.mlp.down_proj.weight.grad for layer in model.model.layers]
    assert grads[1] is None or float(grads[1].abs().sum()) == 0
    assert all(g is not None and float(g.abs().sum()) > 0 for g in (grads[0], grads[2], grads[3]))


def test_plan_drops_lists_kept_rows_per_layer():
    from adadepth.training.stochastic_depth import plan_drops

    keep = [[True, False, True], [True, True, False], [True, False, False]]
    plan = plan_drops(decision(keep, [[1, 1, 2], [1, 1, 1], [1, 3, 1]]), torch.device("cpu"))
    assert [p.num_kept for p in plan] == [3, 1, 1]
    assert plan[0].rows is None and plan[0].scale is None  # every row, no rescale
    assert plan[1].rows.tolist() == [1] and plan[1].scale is None  # row 2's scale 3 is for a dropped row
    assert plan[2].rows.tolist() == [0] and plan[2].scale.tolist() == [2.0]
