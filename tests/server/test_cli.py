"""`adadepth serve`: flags from ServerConfig, and the real command serving over HTTP."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from adadepth.cli import build_parser, engine_config_from_args
from adadepth.cli_args import dataclass_from_args
from adadepth.server.config import API_KEY_ENV, ServerConfig


def test_serve_flags_build_both_configs(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9000", "--max-waiting", "3",
                                      "--default-quality", "0.8", "--max-model-len", "512", "--no-access-log"])
    server = dataclass_from_args(ServerConfig, args)
    assert (server.port, server.max_waiting, server.default_quality, server.api_key, server.access_log) == \
        (9000, 3, 0.8, None, False)
    engine = engine_config_from_args(args)
    assert engine.model.model == "m" and engine.scheduler.max_model_len == 512


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerConfig().api_key == "from-env"
    assert ServerConfig(api_key="flag").api_key == "flag"


@pytest.mark.parametrize("bad", [dict(port=70000), dict(max_waiting=-1), dict(default_quality=0.0),
                                 dict(default_quality=1.5), dict(uvicorn_log_level="loud")])
def test_server_config_validation(bad):
    with pytest.raises(ValueError):
        ServerConfig(**bad)


def test_adadepth_serve_command(tiny_llama, cache_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, API_KEY_ENV: "cli-key"}
    cmd = [sys.executable, "-m", "adadepth.cli", "serve", "--model", tiny_llama, "--cache-dir", cache_dir,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--max-num-batched-tokens", "512",
           "--num-kv-tokens", "4096", "--served-model-name", "tiny-cli", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "adadepth serve did not come up"
            time.sleep(0.2)
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 401
        out = httpx.post(base + "/v1/completions", json={"model": "tiny-cli", "prompt": "hi", "max_tokens": 2},
                         headers={"Authorization": "Bearer cli-key"}, timeout=60)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2
        # --model's own value is accepted as the model name too.
        out = httpx.post(base + "/v1/completions", json={"model": tiny_llama, "prompt": "hi", "max_tokens": 1},
                         headers={"Authorization": "Bearer cli-key"}, timeout=60)
        assert out.status_code == 200 and out.json()["model"] == "tiny-cli"
    finally:
        proc.terminate()
        proc.wait(30)
