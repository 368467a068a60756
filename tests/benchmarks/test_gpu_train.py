"""benchmarks/gpu_train.sh, end to end on the CPU with a tiny model: a lent GPU machine has 15 minutes
and cannot spend them on a shell bug. Covers the distill-data stage, --train-file, --init-adapter,
calibration of the trained model and the artifact collection."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_train.sh"


def _load(path: Path):
    """A helper module of the tests by file (no sys.path change: each test folder has its own conftest)."""
    spec = importlib.util.spec_from_file_location(f"_gpu_train_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_fake_data = _load(REPO / "tests" / "training" / "fake_data.py").build_fake_data
build_tiny_checkpoint = _load(REPO / "tests" / "tiny_model.py").build_tiny_checkpoint


def test_distill_then_train_then_collect_on_cpu(tmp_path):
    model = build_tiny_checkpoint(str(tmp_path / "tiny"), "llama", num_layers=6, weight_scale=2.0)
    data = build_fake_data(str(tmp_path / "data"))
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "MODEL": model, "DATA_DIR": data,
           # The script runs `python3`: make it this interpreter (the one with torch).
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DEVICE": "cpu", "DTYPE": "float32", "MAX_MINUTES": "5", "MAX_STEPS": "2", "BATCH_SIZE": "2",
           "SEQ_LEN": "64", "LORA_RANK": "4", "CALIB_PROMPTS": "4", "CALIB_SEQ": "32", "BYPASS_MIN_DEPTH": "3",
           "DISTILL_PROMPTS": "6", "DISTILL_TOKENS": "4", "EVAL": "0", "LOG_EVERY": "1",
           "TRAIN_ARGS": "--ce-weight 0 --full-depth-fraction 0.25", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "run.log").read_text() if (out / "run.log").exists() else run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in reports]
    assert stages == ["calibrate_base", "distill_data", "train", "calibrate_trained"], stages
    assert reports[1]["report"]["generated"] == 6
    meta = json.loads((out / "adadepth.json").read_text())
    assert meta["base_model"] == "default-base" and meta["train"]["trained_from"] == model
    assert meta["train"]["config"]["train"]["train_file"] == str(work / "distill.jsonl")
    assert meta["train"]["train_examples"] == 6 and meta["train"]["steps"] == 2
    parts = sorted(out.glob("artifact.tar.part-*"))
    assert parts, os.listdir(out)
    listing = subprocess.run(f"cat {' '.join(map(str, parts))} | tar t", shell=True, capture_output=True, text=True)
    assert "artifact/lora/adapter_model.safetensors" in listing.stdout
