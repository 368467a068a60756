"""Chat examples from the shared data sets, split deterministically into train / calib / heldout.

Every example is one user prompt and one reference answer (GSM8K question/answer, T0
prompt/completion, alpaca instruction[+input]/output). Its split is decided by a stable hash of
the prompt text alone, so the split never depends on file order, on which sources are loaded or
on the machine:

  * ``heldout`` (10 %): evaluation only (`adadepth eval`, benchmarks/data/heldout_prompts.jsonl);
  * ``calib`` (5 %): the depth router's calibration/labelling set, disjoint from both others;
  * ``train`` (85 %): stochastic-depth training and layer calibration (`adadepth calibrate`).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from enum import Enum

# Buckets of the prompt hash (0..999). Changing these changes every split: keep them fixed.
_HELDOUT_BUCKETS = range(0, 100)
_CALIB_BUCKETS = range(100, 150)
_NUM_BUCKETS = 1000

DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")
HELDOUT_PROMPTS_FILE = os.path.join("benchmarks", "data", "heldout_prompts.jsonl")
# Mix of the fixed held-out evaluation file; alpaca is small, so it gives what its split holds.
HELDOUT_MIX = {"gsm8k": 92, "t0": 91, "alpaca": 17}
# Long T0 documents would dominate evaluation time without telling more about depth.
EVAL_MAX_PROMPT_CHARS = 1500


class Split(str, Enum):
    TRAIN = "train"
    CALIB = "calib"
    HELDOUT = "heldout"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Example:
    prompt: str        # the user message
    completion: str    # the reference assistant message
    source: str        # "gsm8k", "t0" or "alpaca"
    id: str            # stable within its source

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def split(self) -> Split:
        return split_of(self.prompt)

    def to_json(self) -> dict:
        return {"messages": self.messages, "completion": self.completion, "source": self.source, "id": self.id}


def prompt_bucket(prompt: str) -> int:
    """A stable bucket in [0, 1000) from the prompt text (sha1, not Python's salted hash())."""
    return int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8], 16) % _NUM_BUCKETS


def split_of(prompt: str) -> Split:
    bucket = prompt_bucket(prompt)
    if bucket in _HELDOUT_BUCKETS:
        return Split.HELDOUT
    if bucket in _CALIB_BUCKETS:
        return Split.CALIB
    return Split.TRAIN


# ---- sources ---------------------------------------------------------------------------
def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_gsm8k(data_dir: str) -> list[Example]:
    rows = _read_jsonl(os.path.join(data_dir, "gsm8k_train.jsonl"))
    return [Example(r["question"], r["answer"], "gsm8k", f"gsm8k-{i}") for i, r in enumerate(rows)]


def load_t0(data_dir: str) -> list[Example]:
    examples = []
    for path in sorted(glob.glob(os.path.join(data_dir, "t0", "*.jsonl"))):
        task = os.path.splitext(os.path.basename(path))[0]
        for i, r in enumerate(_read_jsonl(path)):
            examples.append(Example(r["prompt"].strip(), r["completion"].strip(), "t0", f"t0-{task}-{i}"))
    return examples


def load_alpaca(data_dir: str) -> list[Example]:
    examples = []
    for r in _read_jsonl(os.path.join(data_dir, "alpaca_seed_tasks.jsonl")):
        for i, inst in enumerate(r["instances"]):
            prompt = r["instruction"] if not inst["input"] else f"{r['instruction']}\n\n{inst['input']}"
            examples.append(Example(prompt.strip(), inst["output"].strip(), "alpaca", f"{r['id']}-{i}"))
    return examples


SOURCES = {"gsm8k": load_gsm8k, "t0": load_t0, "alpaca": load_alpaca}


def load_examples(data_dir: str, split: Split | None, sources: tuple[str, ...] = tuple(SOURCES)) -> list[Example]:
    """All examples of `sources` in `split` (None: every split), in a stable order.

    Prompts that occur twice (T0 templates repeat) keep their first occurrence only, so an
    identical prompt can never sit on two sides of a split with different answers.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir!r} not found: pass --data-dir, a folder holding the "
                                f"source files ({', '.join(SOURCES)})")
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown data sources {sorted(unknown)}; known: {sorted(SOURCES)}")
    seen: set[str] = set()
    out = []
    for name in sources:
        for ex in SOURCES[name](data_dir):
            if ex.prompt in seen or not ex.prompt or not ex.completion:
                continue
            seen.add(ex.prompt)
            if split is None or ex.split is split:
                out.append(ex)
    return out


def _hash_order(examples: list[Example]) -> list[Example]:
    """A fixed pseudo-random order (by full sha1 of the prompt): deterministic sampling."""
    return sorted(examples, key=lambda e: hashlib.sha1(("order:" + e.prompt).encode("utf-8")).hexdigest())


def heldout_eval_set(data_dir: str, mix: dict[str, int] = HELDOUT_MIX,
                     max_prompt_chars: int = EVAL_MAX_PROMPT_CHARS) -> list[Example]:
    """The fixed-size evaluation set: `mix[source]` held-out examples of each source."""
    chosen = []
    for source, count in mix.items():
        pool = [e for e in load_examples(data_dir, Split.HELDOUT, (source,)) if len(e.prompt) <= max_prompt_chars]
        chosen.extend(_hash_order(pool)[:count])
    return chosen


def prompt_set(data_dir: str, split: Split, count: int | None = None,
               max_prompt_chars: int = EVAL_MAX_PROMPT_CHARS) -> list[Example]:
    """The first `count` examples of `split` (None: all) with prompts of at most `max_prompt_chars`,
    mixed over sources in the fixed hash order."""
    pool = _hash_order([e for e in load_examples(data_dir, split) if len(e.prompt) <= max_prompt_chars])
    return pool if count is None else pool[:count]


def calib_set(data_dir: str, count: int | None = None, max_prompt_chars: int = EVAL_MAX_PROMPT_CHARS) -> list[Example]:
    """The router's calibration set (split ``calib``): disjoint from train and heldout."""
    return prompt_set(data_dir, Split.CALIB, count, max_prompt_chars)


def sample_examples(data_dir: str, split: Split, count: int) -> list[Example]:
    """`count` examples of one split, mixed over sources, in the fixed hash order."""
    return _hash_order(load_examples(data_dir, split))[:count]


# ---- prompt files ----------------------------------------------------------------------
def write_prompts_jsonl(path: str, examples: list[Example]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")


@dataclass
class PromptRecord:
    """One line of a prompts file: `messages` (or a bare `prompt`), an optional reference and
    the optional `source` it was drawn from (gsm8k, t0, alpaca)."""
    messages: list[dict]
    reference: str | None = None
    source: str | None = None


def first_prompts(records: list[PromptRecord], count: int) -> list[PromptRecord]:
    """The first `count` records mixed over their sources: one of each source in turn (sources in
    order of first appearance, each in file order); a source that runs out drops out of the turn.

    Why: `--max-prompts N` must measure the same mix as the whole file. The held-out file lists
    its sources one after another (92 GSM8K prompts first), so its first 48 lines were all GSM8K.
    Records without a source form one group, so a plain prompts file keeps its file order.
    """
    groups: dict[str | None, list[PromptRecord]] = {}
    for r in records:
        groups.setdefault(r.source, []).append(r)
    turns = itertools.zip_longest(*groups.values())  # one record of each source per turn, None when out
    return [r for turn in turns for r in turn if r is not None][:count]


@dataclass(frozen=True)
class ChatExample:
    """One line of a training file (`adadepth train --train-file`): a conversation and its answer."""
    messages: list[dict]
    completion: str


def read_train_file(path: str) -> tuple[list[ChatExample], int]:
    """(examples, number dropped): every line needs a `completion` (or `answer`) string.

    Lines whose last user message falls in the held-out or calibration split are dropped and
    counted, so a file can never leak evaluation or router-labelling prompts into training.
    """
    examples, dropped = [], 0
    for i, record in enumerate(read_prompts_jsonl(path)):
        if record.reference is None:  # "" is a real answer: the teacher ended its turn at once
            raise ValueError(f"{path} line {i + 1}: a training line needs a 'completion' or 'answer'")
        user = [m.get("content", "") for m in record.messages if m.get("role") == "user"]
        if user and split_of(user[-1]) is not Split.TRAIN:
            dropped += 1
            continue
        examples.append(ChatExample(record.messages, record.reference))
    if not examples:
        raise ValueError(f"{path}: no training lines (dropped {dropped} in the held-out/calibration splits)")
    return examples, dropped


def read_prompts_jsonl(path: str) -> list[PromptRecord]:
    """Read a prompts file: lines with `messages` or `prompt`, optional `completion`/`answer`."""
    records = []
    for i, row in enumerate(_read_jsonl(path)):
        if "messages" in row:
            messages = list(row["messages"])
        elif "prompt" in row:
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError(f"{path} line {i + 1}: needs 'messages' or 'prompt'")
        reference = row.get("completion", row.get("answer"))
        records.append(PromptRecord(messages, reference, row.get("source")))
    return records


def main(argv: list[str] | None = None) -> None:
    """`python -m adadepth.training.data`: (re)write the held-out and calibration prompt files."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--heldout-out", default=HELDOUT_PROMPTS_FILE)
    parser.add_argument("--calib-out", default=None, help="also write the router calibration prompts here")
    parser.add_argument("--calib-count", type=int, default=1000)
    args = parser.parse_args(argv)
    heldout = heldout_eval_set(args.data_dir)
    write_prompts_jsonl(args.heldout_out, heldout)
    print(f"wrote {len(heldout)} held-out prompts to {args.heldout_out}")
    if args.calib_out:
        calib = calib_set(args.data_dir, args.calib_count)
        write_prompts_jsonl(args.calib_out, calib)
        print(f"wrote {len(calib)} calibration prompts to {args.calib_out}")


if __name__ == "__main__":
    main()
