"""How the server ends: SIGTERM drain, shutdown timeout, engine exceptions and hangs, and a storm
of disconnects. The first four run a real server process (its own exit code is the point), with
its engine's steps slowed, failed or hung by a patch inside that process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SCRIPT = """
import sys, time
sys.path.insert(0, {tests_dir!r})
from conftest import engine_config
from adadepth.engine.llm_engine import LLMEngine
from adadepth.server.api_server import build_app, serve_until_drained
from adadepth.server.config import ServerConfig

engine = LLMEngine(engine_config({model!r}, {cache!r}))
step, count = engine.step, [0]

def patched():
    count[0] += 1
    if count[0] == {raise_at}:
        raise RuntimeError("injected fault")
    if {hang_at} and count[0] >= {hang_at}:
        time.sleep(3600)
    time.sleep({delay})
    return step()

engine.step = patched
config = ServerConfig(host="127.0.0.1", port={port}, api_key=None, uvicorn_log_level="warning", **{config!r})
serve_until_drained(build_app(engine, config), config)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, cache: str, delay: float = 0.0, raise_at: int = 0, hang_at: int = 0, **config):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = SCRIPT.format(tests_dir=TESTS_DIR, model=model, cache=cache, delay=delay, raise_at=raise_at,
                             hang_at=hang_at, port=self.port, config=config)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + self.proc.stdout.read().decode(errors="replace"))
            time.sleep(0.1)

    def health(self) -> int:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code
        except httpx.TransportError:
            return -1

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def serve(tiny_llama, cache_dir):
    started = []

    def start(**kwargs) -> ServerProcess:
        started.append(ServerProcess(tiny_llama, cache_dir, **kwargs))
        return started[-1]

    yield start
    for process in started:
        process.close()


class Streams:
    """n streaming completions in threads; each records its events and whether its first arrived."""

    def __init__(self, url: str, n: int, max_tokens: int):
        self.events: list[list[str]] = [[] for _ in range(n)]
        self.times: list[list[float]] = [[] for _ in range(n)]  # monotonic arrival time of each event
        self.first = [threading.Event() for _ in range(n)]
        body = {"prompt": "hello world", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        self.threads = [threading.Thread(target=self._run, args=(url, body, i)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, url: str, body: dict, i: int) -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events[i].append(line[6:])
                        self.times[i].append(time.monotonic())
                        self.first[i].set()
        except httpx.TransportError as exc:  # the server went away mid-stream: recorded, then asserted on
            self.events[i].append(f"<cut: {type(exc).__name__}>")

    def wait_first(self, timeout: float = 60) -> None:
        for e in self.first:
            assert e.wait(timeout), "a stream never started"

    def join(self, timeout: float = 120) -> None:
        for t in self.threads:
            t.join(timeout)

    def texts_and_errors(self) -> list[tuple[int, dict | None]]:
        """Per stream: (chunks with text, the error object or None); every stream must end in [DONE]."""
        out = []
        for events in self.events:
            assert events and events[-1] == "[DONE]", events[-3:]
            payloads = [json.loads(e) for e in events[:-1]]
            errors = [p["error"] for p in payloads if "error" in p]
            out.append((sum(1 for p in payloads if p.get("choices")), errors[0] if errors else None))
        return out


def test_sigterm_lets_in_flight_streams_finish_refuses_new_ones_and_exits_0(serve):
    server = serve(delay=0.03, shutdown_timeout=60)
    streams = Streams(server.url, 16, max_tokens=40)
    streams.wait_first()
    server.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    while server.health() != 503:
        assert time.monotonic() - t0 < 1, "/health did not turn 503 at once"
        time.sleep(0.02)
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    streams.join()
    for chunks, error in streams.texts_and_errors():
        assert error is None and chunks >= 40
    assert server.proc.wait(30) == 0


def test_past_the_shutdown_timeout_the_rest_get_an_error_event(serve):
    server = serve(delay=0.05, shutdown_timeout=0.5)
    streams = Streams(server.url, 4, max_tokens=200)
    streams.wait_first()
    server.proc.send_signal(signal.SIGTERM)
    streams.join()
    for _, error in streams.texts_and_errors():
        assert error is not None and error["code"] == "shutting_down"
    assert server.proc.wait(30) == 0


def test_engine_exception_fails_requests_at_once_and_exits_non_zero(serve):
    server = serve(delay=0.05, raise_at=12)
    streams = Streams(server.url, 4, max_tokens=200)
    streams.wait_first()
    streams.join(10)
    for i, (_, error) in enumerate(streams.texts_and_errors()):
        assert error is not None and error["code"] == "engine_dead" and "injected" not in error["message"]
        # The fault struck between the last token event and the error event: told within 1 s.
        assert streams.times[i][-2] - streams.times[i][-3] < 1.0
    told = max(t[-1] for t in streams.times)
    assert server.health() in (503, -1)  # 503 until it exits; then nothing listens
    assert server.proc.wait(5) != 0
    assert time.monotonic() - told < 5
    assert b"injected fault" in server.proc.stdout.read()  # the cause is in the log


def test_a_hung_step_turns_health_503_within_the_step_timeout(serve):
    server = serve(delay=0.0, hang_at=6, step_timeout=1.0)
    Streams(server.url, 1, max_tokens=50)  # left hanging; the process is killed at the end
    t0 = time.monotonic()
    while server.health() == 200:
        assert time.monotonic() - t0 < 1.0 + 1.0 + 0.5, "/health stayed 200 past --step-timeout + 1 s"
        time.sleep(0.05)
    response = httpx.get(server.url + "/health", timeout=2)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stalled"


def test_a_storm_of_disconnects_leaves_nothing_behind(server):
    engine, blocks = server.engine, server.engine.block_manager

    def drop(i: int) -> None:
        body = {"prompt": f"hello {i}", "max_tokens": 200, "ignore_eos": True, "stream": i % 2 == 0}
        try:
            with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=0.2) as response:
                for _ in response.iter_lines():
                    break  # hang up after the first line
        except httpx.TimeoutException:
            pass  # a non-streaming request hung up on by the client's timeout

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.wait_until(lambda: not engine.seqs and blocks.num_free_blocks == blocks.num_usable_blocks
                      and server.async_engine.num_unfinished == 0, timeout=30, what="every request aborted")
    assert httpx.get(server.base_url + "/health").status_code == 200
    ok = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200
