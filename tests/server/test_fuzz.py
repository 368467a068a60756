"""schemathesis against the live server's OpenAPI schema: 100 valid and 100 invalid examples per
operation; no 5xx, only declared status codes and content types, bodies that conform (every 4xx
with OpenAI's error body), invalid input refused, and the server healthy afterwards."""
from __future__ import annotations

import pytest

from adadepth.benchmarks.fuzz import fuzz
from adadepth.engine.llm_engine import LLMEngine
from adadepth.server.config import ServerConfig
from conftest import engine_config, start_server


@pytest.fixture(scope="module")
def server(tiny_llama, cache_dir):
    """A short context and few samples keep the valid requests' generations short."""
    running = start_server(LLMEngine(engine_config(tiny_llama, cache_dir, dtype="float32", max_model_len=64)),
                           ServerConfig(api_key=None, max_n=4, max_prompts_per_request=4))
    yield running
    running.stop()


def test_fuzz_every_operation(server):
    report = fuzz(server.base_url, examples=100, seed=0)
    totals = report["totals"]
    failures = {op: {m: s["failures"][:2] for m, s in modes.items() if s["failures"]}
                for op, modes in report["operations"].items()}
    assert totals["server_errors"] == 0 and totals["failed_checks"] == 0, failures
    assert report["healthy_after"]
    # Every POST operation got its 100 valid and 100 invalid bodies, and valid ones did run.
    for op in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"):
        assert report["operations"][op]["positive"]["requests"] == 100
        assert report["operations"][op]["negative"]["requests"] == 100
        assert report["operations"][op]["positive"]["statuses"].get("200", 0) > 0
    assert server.async_engine.num_unfinished == 0
