"""Defaults that decide where commands write: never into the installed package."""
from __future__ import annotations

import hashlib
import os

import adadepth
from adadepth.config import ModelConfig, output_dir_for


def test_outputs_for_package_models_go_to_the_cache(tmp_path):
    package = os.path.dirname(adadepth.__file__)
    inside = os.path.join(package, "artifacts", "smollm2-135m-sd")
    assert output_dir_for(inside, str(tmp_path)) == os.path.join(str(tmp_path), "outputs", "smollm2-135m-sd")
    outside = str(tmp_path / "my-model")
    assert output_dir_for(outside, str(tmp_path / "cache")) == outside


def test_router_eval_labels_default_to_a_cache_copy_of_the_shipped_ones(tmp_path, monkeypatch):
    from adadepth.router import router_eval
    from adadepth.router.router_eval import HELDOUT_LABELS_FILE, default_heldout_labels

    plan_dir = os.path.join(os.path.dirname(adadepth.__file__), "artifacts", "smollm2-135m-sd")
    # The default model's plan folder is the package's artifact folder (resolving it would convert the GGUF).
    monkeypatch.setattr(router_eval, "plan_dir_of", lambda model: plan_dir)
    model = ModelConfig(model="default", cache_dir=str(tmp_path))
    shipped = os.path.join(plan_dir, HELDOUT_LABELS_FILE)
    before = hashlib.sha256(open(shipped, "rb").read()).hexdigest()
    path = default_heldout_labels(model)
    assert path.startswith(str(tmp_path)) and open(path, "rb").read() == open(shipped, "rb").read()
    with open(path, "a") as f:  # a relabelling run appends or rewrites the copy ...
        f.write("\n")
    assert hashlib.sha256(open(shipped, "rb").read()).hexdigest() == before  # ... never the shipped file
    assert default_heldout_labels(model) == path  # and the copy is reused, not re-seeded
    assert open(path).read().endswith("\n\n")
