import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_data import build_fake_data  # noqa: E402


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> str:
    return build_fake_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and the CPU is shared: one thread is fastest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny random Llama of our own (others' fixtures get plans stored into them)."""
    from tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-train")), "llama", num_layers=6, weight_scale=2.0)


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("train-cache"))
