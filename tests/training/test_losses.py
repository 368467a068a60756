"""Chunked, checkpointed CE/KL equal the direct computation, values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adadepth.training.chat_batches import collate, encode_chat, encode_prompt
from adadepth.training.losses import LossConfig, chunked_losses, target_positions


@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_chunked_losses_match_direct(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(11, 8, requires_grad=True)
    teacher = torch.randn(11, 8)
    labels = torch.randint(0, 20, (11,))
    ce, kl = chunked_losses(head, hidden, labels, teacher, temperature=2.0, chunk=chunk)
    (ce + kl).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden)
    ref_ce = F.cross_entropy(logits, labels)
    t = F.log_softmax(head(teacher).detach() / 2.0, -1)
    s = F.log_softmax(logits / 2.0, -1)
    ref_kl = (t.exp() * (t - s)).sum(-1).mean() * 4.0
    (ref_ce + ref_kl).backward()
    assert torch.allclose(ce, ref_ce, atol=1e-5) and torch.allclose(kl, ref_kl, atol=1e-5)
    assert torch.allclose(grad, hidden.grad, atol=1e-5)


def test_kl_is_zero_for_identical_student_and_no_teacher_gives_zero():
    head = torch.nn.Linear(4, 9)
    h = torch.randn(5, 4)
    labels = torch.zeros(5, dtype=torch.long)
    assert float(chunked_losses(head, h, labels, h.clone())[1]) == pytest.approx(0, abs=1e-6)
    assert float(chunked_losses(head, h, labels)[1]) == 0


def test_targets_are_the_answer_tokens(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    messages = [{"role": "user", "content": "what is 2 + 2?"}]
    chat = encode_chat(tok, messages, "it is 4.")
    assert chat.input_ids[: chat.num_prompt_tokens] == encode_prompt(tok, messages)  # serving's prompt encoding
    assert tok.decode(chat.input_ids[chat.num_prompt_tokens:]) == "it is 4.<|im_end|>"
    other = encode_chat(tok, messages, "5")
    batch = collate([chat, other], pad_id=0)
    flat, labels = target_positions(batch.target_mask, batch.input_ids)
    t = batch.input_ids.shape[1]
    rows = flat // t
    assert labels[rows == 0].tolist() == chat.input_ids[chat.num_prompt_tokens:]
    assert labels[rows == 1].tolist() == other.input_ids[other.num_prompt_tokens:]
    assert batch.num_tokens == len(chat.input_ids) + len(other.input_ids)


def test_loss_config_validation():
    with pytest.raises(ValueError):
        LossConfig(ce_weight=0, kl_weight=0)
    with pytest.raises(ValueError):
        LossConfig(distill_temperature=0)


def test_batched_tokenization_equals_encode_chat(tiny_base, fake_data):
    from transformers import AutoTokenizer

    from adadepth.training.chat_batches import tokenize_examples, truncate
    from adadepth.training.data import load_examples

    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = load_examples(fake_data, None)[:30]
    batched = tokenize_examples(tok, examples, max_len=40)
    single = [truncate(encode_chat(tok, e.messages, e.completion), 40) for e in examples]
    single = [c for c in single if c is not None and c.num_target_tokens > 0]
    assert batched == single and all(len(c.input_ids) <= 40 for c in batched)


def test_cli_registers_the_training_subcommands(capsys):
    from adadepth.cli import build_parser

    parser = build_parser()
    for command in ("train", "calibrate", "distill-data", "eval"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "--" in capsys.readouterr().out
    args = parser.parse_args(["train", "--drop-mode", "order", "--depth-profile", "exponential"])
    assert args.drop_mode.value == "order" and args.depth_profile.value == "exponential"
