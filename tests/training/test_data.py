"""Deterministic train / calib / heldout split by prompt hash; prompt files; resumable batches."""
from __future__ import annotations

import os

import pytest

from adadepth.training.chat_batches import ChatBatcher, EncodedChat
from adadepth.training.data import (HELDOUT_PROMPTS_FILE, PromptRecord, Split, calib_set, first_prompts,
                                    heldout_eval_set, load_examples,
                                    read_prompts_jsonl, split_of, write_prompts_jsonl)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO, "..", "shared", "data")


def test_splits_are_disjoint_and_cover_everything(fake_data):
    parts = {s: {e.prompt for e in load_examples(fake_data, s)} for s in Split}
    assert not parts[Split.TRAIN] & parts[Split.HELDOUT]
    assert not parts[Split.TRAIN] & parts[Split.CALIB]
    assert not parts[Split.CALIB] & parts[Split.HELDOUT]
    assert set().union(*parts.values()) == {e.prompt for e in load_examples(fake_data, None)}
    assert all(parts.values())


def test_split_is_a_stable_function_of_the_prompt():
    assert split_of("Natalia sold clips to 48 of her friends") is split_of("Natalia sold clips to 48 of her friends")
    counts = {s: 0 for s in Split}
    for i in range(20000):
        counts[split_of(f"prompt number {i}")] += 1
    assert 0.09 < counts[Split.HELDOUT] / 20000 < 0.11 and 0.04 < counts[Split.CALIB] / 20000 < 0.06


def test_prompt_file_roundtrip(fake_data, tmp_path):
    examples = heldout_eval_set(fake_data, {"gsm8k": 3, "t0": 2, "alpaca": 1})
    assert all(e.split is Split.HELDOUT for e in examples) and len(examples) <= 6
    path = str(tmp_path / "p.jsonl")
    write_prompts_jsonl(path, examples)
    records = read_prompts_jsonl(path)
    assert [r.messages[0]["content"] for r in records] == [e.prompt for e in examples]
    assert [r.reference for r in records] == [e.completion for e in examples]
    assert [r.source for r in records] == [e.source for e in examples]
    calib = calib_set(fake_data)
    assert calib and all(e.split is Split.CALIB for e in calib)


def test_first_prompts_takes_each_source_in_turn():
    records = [PromptRecord([{"role": "user", "content": f"{s}{i}"}], None, s)
               for s, n in (("gsm8k", 4), ("t0", 3), ("alpaca", 1)) for i in range(n)]
    names = lambda rs: [r.messages[0]["content"] for r in rs]  # noqa: E731
    assert names(first_prompts(records, 5)) == ["gsm8k0", "t00", "alpaca0", "gsm8k1", "t01"]
    # alpaca runs out: the others keep alternating, then gsm8k alone; never more than asked or held
    assert names(first_prompts(records, 8)) == ["gsm8k0", "t00", "alpaca0", "gsm8k1", "t01", "gsm8k2", "t02", "gsm8k3"]
    assert len(first_prompts(records, 100)) == 8 and first_prompts(records, 0) == []
    plain = [PromptRecord([{"role": "user", "content": str(i)}]) for i in range(5)]
    assert first_prompts(plain, 3) == plain[:3]  # no sources: file order


def test_committed_heldout_file_records_sources():
    records = read_prompts_jsonl(os.path.join(REPO, HELDOUT_PROMPTS_FILE))
    mix = [r.source for r in first_prompts(records, 48)]
    assert {s: mix.count(s) for s in set(mix)} == {"gsm8k": 16, "t0": 16, "alpaca": 16}


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared data not present")
def test_committed_heldout_file_is_heldout_and_disjoint_from_train():
    records = read_prompts_jsonl(os.path.join(REPO, HELDOUT_PROMPTS_FILE))
    assert 150 <= len(records) <= 250
    prompts = [r.messages[0]["content"] for r in records]
    assert all(split_of(p) is Split.HELDOUT for p in prompts)
    train = {e.prompt for e in load_examples(SHARED, Split.TRAIN)}
    assert not train & set(prompts)
    assert [e.prompt for e in heldout_eval_set(SHARED)] == prompts  # the file is reproducible


def test_batcher_is_deterministic_and_resumable():
    chats = [EncodedChat(list(range(3 + i % 7)), 2) for i in range(40)]
    a = ChatBatcher(chats, 4, pad_id=0, seed=3)
    seq = [a.next().input_ids.tolist() for _ in range(25)]  # crosses an epoch boundary
    b = ChatBatcher(chats, 4, pad_id=0, seed=3)
    for _ in range(12):
        b.next()
    c = ChatBatcher(chats, 4, pad_id=0, seed=3)
    c.seek(b.position)
    assert [c.next().input_ids.tolist() for _ in range(13)] == seq[12:]
