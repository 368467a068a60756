import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from adadepth.model.depth_plan import DepthPlan  # noqa: E402
from adadepth.router.agreement_predictor import AgreementPredictor, PredictorShape  # noqa: E402
from adadepth.router.depth_grid import DepthGrid  # noqa: E402
from adadepth.router.difficulty_router import DifficultyRouter  # noqa: E402

# Layers 0 and 1 run at the grid's smallest depth (2): features after k = 2 layers.
ORDER = [0, 1, 5, 2, 4, 3]
HIDDEN = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def router_ckpt(tmp_path_factory) -> str:
    """A tiny random Llama of our own with a fixed layer order (others' fixtures get plans stored into them)."""
    from tiny_model import build_tiny_checkpoint

    folder = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-router")), "llama", num_layers=6, weight_scale=2.0)
    DepthPlan(6, ORDER, source="test").save(folder)
    return folder


def make_router(plan: DepthPlan, agreements: list[float] | None = None, seed: int = 0, grid: DepthGrid | None = None,
                feature_layers: int | None = None, hidden_size: int = 8) -> DifficultyRouter:
    """A router with random weights, or (agreements given) one predicting exactly `agreements`
    at the grid's partial depths for every prompt."""
    grid = grid or DepthGrid.default(plan.num_layers)
    k = grid.max_feature_layers(plan) if feature_layers is None else feature_layers
    torch.manual_seed(seed)
    predictor = AgreementPredictor(PredictorShape(2 * HIDDEN, 8, hidden_size, len(grid.partial)))
    if agreements is not None:
        a = torch.tensor(agreements, dtype=torch.float64)
        logits = torch.log(a / (1 - a))
        raw = torch.cat([logits[:1], torch.log(torch.expm1(logits.diff()))])   # inverse of cumsum(softplus)
        last = predictor.head[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(raw.float())
    return DifficultyRouter(predictor, grid, k, plan.fingerprint())
