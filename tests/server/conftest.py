"""A real uvicorn server on a free port, in a background thread, serving a tiny random model."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from adadepth.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from adadepth.engine.llm_engine import LLMEngine
from adadepth.server.api_server import build_app
from adadepth.server.config import ServerConfig

MODEL_ALIAS = "tiny"
ENGINE_OPTIONS = dict(dtype="float64", num_kv_tokens=4096, max_model_len=256, max_num_batched_tokens=512)


def engine_config(path: str, cache_dir: str, **overrides) -> EngineConfig:
    options = {**ENGINE_OPTIONS, **overrides}
    model = ModelConfig(model=path, cache_dir=cache_dir, dtype=options.pop("dtype"),
                        served_model_name=options.pop("served_model_name", None))
    cache = CacheConfig(num_kv_tokens=options.pop("num_kv_tokens"))
    scheduler = SchedulerConfig(**options)
    return EngineConfig(model, cache, scheduler)


@dataclass
class RunningServer:
    base_url: str
    app: object
    engine: LLMEngine
    api_key: str | None
    _server: object
    _thread: threading.Thread

    @property
    def async_engine(self):
        return self.app.state.async_engine

    @property
    def model(self) -> str:
        return self.engine.model_name

    def client(self, **kwargs):
        from openai import OpenAI

        # No retries: a 429 or 500 must reach the test, not be retried away.
        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "unused", max_retries=0,
                      timeout=60, **kwargs)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def metrics_text(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=30).text

    def wait_until(self, predicate, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


def start_server(engine: LLMEngine, config: ServerConfig) -> RunningServer:
    import uvicorn

    app = build_app(engine, config, model_aliases=(MODEL_ALIAS,))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; handing uvicorn the socket avoids a race
    port = sock.getsockname()[1]
    from adadepth.server.lifecycle import DrainingServer

    server = DrainingServer(uvicorn.Config(app, log_level="warning", access_log=False), app.state.lifecycle)
    app.state.lifecycle.attach(server.stop, lambda: app.state.fail_remaining())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return RunningServer(f"http://127.0.0.1:{port}", app, engine, config.api_key, server, thread)


@pytest.fixture(scope="session")
def server(tiny_llama, cache_dir):
    """The shared open server: no API key, default queue bound."""
    running = start_server(LLMEngine(engine_config(tiny_llama, cache_dir)), ServerConfig(api_key=None))
    yield running
    running.stop()


@pytest.fixture
def slow_steps(monkeypatch):
    """Make an engine's steps take at least `delay` seconds, so that a request is reliably still
    running when the test acts on it; undone after the test."""

    def apply(engine: LLMEngine, delay: float = 0.02) -> None:
        step = engine.step

        def slow_step():
            time.sleep(delay)
            return step()

        monkeypatch.setattr(engine, "step", slow_step)

    return apply


STRICT_API_KEY = "sk-adadepth-test"


@pytest.fixture(scope="session")
def strict_server(tiny_llama, cache_dir):
    """A server with an API key, a waiting queue of one, one sequence at a time and a default quality."""
    config = ServerConfig(api_key=STRICT_API_KEY, max_waiting=1, default_quality=0.9)
    running = start_server(LLMEngine(engine_config(tiny_llama, cache_dir, max_num_seqs=1)), config)
    yield running
    running.stop()
