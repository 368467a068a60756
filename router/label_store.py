"""Router training data: per prompt, its agreement with the full-depth model at every grid depth.

One JSONL file. The first line is `{"meta": {...}}` (model, layer-order fingerprint, grid,
continuation length); each further line is one prompt:

    {"id": "...", "messages": [...], "prompt_token_ids": [...], "positions": 64,
     "matches": {"12": 31, "15": 40, ..., "30": 64},
     "match_bits": {"12": "1101...", ...}}

`positions` is the number of scored continuation positions (the full-depth greedy continuation,
up to 64 tokens) and `matches[d]` how many of them the depth-d argmax agrees on, so a prompt's
agreement is matches / positions and a pooled agreement is sum(matches) / sum(positions).
`match_bits[d]` says which positions agree ("1"), in order (label format 2; files of format 1
lack it): the even and odd positions of one continuation are two independent-ish measurements
of the same prompt, which tells how much of a prompt's agreement is the prompt and how much is
the luck of its 64 tokens (`policy_sweep.split_half_oracle`).
Records are appended batch by batch, so an interrupted labelling run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

# 2: records carry per-position match bits. Label metas say it, so a cache of format 1 is stale.
LABEL_FORMAT = 2


def prompt_id(messages: list[dict]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


@dataclass
class LabelRecord:
    id: str
    messages: list[dict]
    prompt_token_ids: list[int]
    positions: int
    matches: dict[int, int]  # depth -> agreeing positions
    match_bits: dict[int, str] = field(default_factory=dict)  # depth -> "1"/"0" per position; may be empty

    def __post_init__(self) -> None:
        for depth, bits in self.match_bits.items():
            if len(bits) != self.positions or bits.count("1") != self.matches.get(depth):
                raise ValueError(f"record {self.id}: match bits at depth {depth} do not add up to "
                                 f"{self.matches.get(depth)} of {self.positions} positions")

    def agreement(self, depth: int) -> float:
        return self.matches[depth] / self.positions if self.positions else float("nan")

    def half(self, depth: int, parity: int) -> tuple[int, int]:
        """(agreeing, scored) over the even (parity 0) or odd (parity 1) positions at `depth`."""
        bits = self.match_bits[depth][parity::2]
        return bits.count("1"), len(bits)

    def to_json(self) -> dict:
        row = {"id": self.id, "messages": self.messages, "prompt_token_ids": self.prompt_token_ids,
               "positions": self.positions, "matches": {str(d): m for d, m in sorted(self.matches.items())}}
        if self.match_bits:
            row["match_bits"] = {str(d): b for d, b in sorted(self.match_bits.items())}
        return row

    @classmethod
    def from_json(cls, row: dict) -> "LabelRecord":
        return cls(row["id"], row["messages"], list(row["prompt_token_ids"]), int(row["positions"]),
                   {int(d): int(m) for d, m in row["matches"].items()},
                   {int(d): str(b) for d, b in row.get("match_bits", {}).items()})

    @property
    def user_text(self) -> str:
        """The (first) user message: what the data splits hash."""
        return next((m["content"] for m in self.messages if m.get("role") == "user"), "")


class StaleLabelsError(ValueError):
    """The file holds labels made with other weights or settings than the run asks for."""


class LabelStore:
    """A labels JSONL file: its meta line and records."""

    def __init__(self, path: str):
        self.path = path

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> tuple[dict, list[LabelRecord]]:
        with open(self.path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if not lines or "meta" not in lines[0]:
            raise ValueError(f"{self.path}: not a router labels file (its first line must be {{\"meta\": ...}})")
        return lines[0]["meta"], [LabelRecord.from_json(row) for row in lines[1:]]

    def start(self, meta: dict, resume: bool) -> list[LabelRecord]:
        """Open for writing: the records already there when resuming a run with the same meta,
        else a fresh file holding only the meta line."""
        if resume and self.exists():
            old_meta, records = self.read()
            if old_meta == meta:
                return records
            raise StaleLabelsError(f"{self.path} holds labels made with other settings ({old_meta}); "
                             "pass --no-resume to overwrite it or choose another --output")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
        return []

    def append(self, records: list[LabelRecord]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
