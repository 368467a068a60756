"""Tokenize chat examples (prompt + reference answer) and cut them into padded batches.

A sequence is the chat template applied to [user, assistant]; `target_mask` marks the tokens
of the assistant answer (through its end-of-turn token), the only ones the losses score.
The prompt part is encoded exactly as the engine encodes a chat prompt (`tokenizer.encode` of
the templated text with the generation prompt), so training sees the serving token boundary.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class EncodedChat:
    input_ids: list[int]
    num_prompt_tokens: int  # tokens before the assistant answer

    @property
    def num_target_tokens(self) -> int:
        return len(self.input_ids) - self.num_prompt_tokens


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt ending with the assistant header, as `LLM.chat` encodes it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text)


def _split_chat_text(tokenizer, messages: list[dict], completion: str) -> tuple[str, str]:
    """(prompt text with the assistant header, answer text through the end-of-turn token)."""
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not extend the generation prompt with the answer; "
                         "cannot locate the assistant tokens")
    answer = full_text[len(prompt_text):]
    # Stop right after the end-of-turn token: what follows it (a newline) is never generated.
    eos = tokenizer.eos_token
    if eos and eos in answer:
        answer = answer[: answer.index(eos) + len(eos)]
    return prompt_text, answer


def encode_chat(tokenizer, messages: list[dict], completion: str) -> EncodedChat:
    prompt_text, answer = _split_chat_text(tokenizer, messages, completion)
    prompt_ids = tokenizer.encode(prompt_text)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    return EncodedChat(prompt_ids + answer_ids, len(prompt_ids))


def truncate(chat: EncodedChat, max_len: int) -> EncodedChat | None:
    """Cut the answer to fit `max_len`; None when the prompt leaves under a quarter for it."""
    if chat.num_prompt_tokens > max_len * 3 // 4:
        return None
    return EncodedChat(chat.input_ids[:max_len], chat.num_prompt_tokens)


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long, 1 for real tokens
    target_mask: torch.Tensor     # (B, T) bool; True where the *next* token is an answer token to score
    num_tokens: int               # real tokens in the batch

    def to(self, device) -> "Batch":
        # non_blocking: a host->device copy from ordinary memory is staged at once and needs no
        # stream sync (a blocking .to() would make the host wait for all queued GPU work).
        return Batch(self.input_ids.to(device, non_blocking=True), self.attention_mask.to(device, non_blocking=True),
                     self.target_mask.to(device, non_blocking=True), self.num_tokens)


def collate(chats: list[EncodedChat], pad_id: int) -> Batch:
    t = max(len(c.input_ids) for c in chats)
    ids = torch.full((len(chats), t), pad_id, dtype=torch.long)
    attn = torch.zeros(len(chats), t, dtype=torch.long)
    target = torch.zeros(len(chats), t, dtype=torch.bool)
    for i, c in enumerate(chats):
        n = len(c.input_ids)
        ids[i, :n] = torch.tensor(c.input_ids)
        attn[i, :n] = 1
        # Position j predicts token j+1: score positions whose next token belongs to the answer.
        target[i, c.num_prompt_tokens - 1: n - 1] = True
    return Batch(ids, attn, target, int(attn.sum()))


class ChatBatcher:
    """Endless, resumable stream of batches over tokenized examples.

    Each epoch shuffles with (seed, epoch), then sorts within windows of 50 batches by length so
    that padding stays small, then shuffles the batches. `position` = (epoch, batch index) is
    all a checkpoint needs to continue the exact stream.
    """

    def __init__(self, chats: list[EncodedChat], batch_size: int, pad_id: int, seed: int = 0):
        if not chats:
            raise ValueError("no training examples left after tokenization and truncation")
        self.chats = chats
        self.batch_size = min(batch_size, len(chats))
        self.pad_id = pad_id
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._plan = self._epoch_plan(0)

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.chats)))
        rng.shuffle(order)
        window = self.batch_size * 50
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start: start + window], key=lambda i: len(self.chats[i].input_ids))
            batches.extend(chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        batches = [b for b in batches if len(b) == self.batch_size]  # equal-sized batches only
        rng.shuffle(batches)
        return batches

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def seek(self, position: tuple[int, int]) -> None:
        self.epoch, self.index = position
        self._plan = self._epoch_plan(self.epoch)

    def next(self) -> Batch:
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self._epoch_plan(self.epoch)
        rows = self._plan[self.index]
        self.index += 1
        return collate([self.chats[i] for i in rows], self.pad_id)


def tokenize_examples(tokenizer, examples, max_len: int) -> list[EncodedChat]:
    """`encode_chat` + `truncate` for many examples, encoded in batches (the tokenizer's fast path)."""
    texts = [_split_chat_text(tokenizer, ex.messages, ex.completion) for ex in examples]
    chats = []
    for start in range(0, len(texts), 1024):
        part = texts[start: start + 1024]
        prompts = tokenizer([p for p, _ in part])["input_ids"]  # same special tokens as tokenizer.encode
        answers = tokenizer([a for _, a in part], add_special_tokens=False)["input_ids"]
        for prompt_ids, answer_ids in zip(prompts, answers):
            chat = truncate(EncodedChat(list(prompt_ids) + list(answer_ids), len(prompt_ids)), max_len)
            if chat is not None and chat.num_target_tokens > 0:
                chats.append(chat)
    return chats
