"""A small stand-in for /work/shared/data with the same file layout, built in the test."""
from __future__ import annotations

import json
import os


def build_fake_data(folder: str, n: int = 80) -> str:
    os.makedirs(os.path.join(folder, "t0"), exist_ok=True)
    with open(os.path.join(folder, "gsm8k_train.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"what is {i} + {i + 1}?",
                                "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}) + "\n")
    with open(os.path.join(folder, "t0", "toy_task.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"the quick brown fox number {i} jumps. summarize:",
                                "completion": f"fox {i} jumps"}) + "\n")
    with open(os.path.join(folder, "alpaca_seed_tasks.jsonl"), "w") as f:
        for i in range(n // 4):
            f.write(json.dumps({"id": f"seed_task_{i}", "instruction": f"say hello {i} times",
                                "instances": [{"input": "" if i % 2 else "politely", "output": "hello " * (i % 5 + 1)}]})
                    + "\n")
    return folder
