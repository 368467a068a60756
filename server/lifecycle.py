"""How a server ends: a graceful drain on SIGTERM, a non-zero exit when its engine dies.

Kubernetes stops a pod with SIGTERM, then SIGKILL after `terminationGracePeriodSeconds`. On the
first SIGTERM (or SIGINT) the server starts draining: `/health` answers 503 at once (the pod
leaves its Service's endpoints), new requests get 503 with an error body, and requests already
in flight run to their end for up to `shutdown_timeout` seconds. Whatever is still running then
is failed with an error (a stream gets an error event and `[DONE]`), and the process exits 0.
A second signal exits at once.

When the engine dies (a step raised), its requests have been failed already; the server then
exits non-zero a moment later, so that the orchestrator restarts it (vLLM does the same on
`EngineDeadError`).
"""
from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import uvicorn

logger = logging.getLogger(__name__)

# After failing requests, let their error events reach the clients before the sockets close.
_FLUSH_S = 0.5


class ServerLifecycle:
    """Shared by the routes (draining? how many requests in flight?) and the uvicorn server."""

    def __init__(self, shutdown_timeout: float):
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self.in_flight = 0        # HTTP requests being answered (event loop only)
        self.exit_code = 0
        self._stop: Callable[[], None] | None = None
        self._fail_remaining: Callable[[], None] | None = None
        self._drain_task: asyncio.Task | None = None

    def attach(self, stop: Callable[[], None], fail_remaining: Callable[[], None]) -> None:
        """stop: make the server exit; fail_remaining: fail every request still running."""
        self._stop, self._fail_remaining = stop, fail_remaining

    def begin_drain(self) -> None:
        """Event loop: start draining (again: nothing more happens)."""
        if self.draining:
            return
        self.draining = True
        logger.info("draining: %d requests in flight, up to %.0f s", self.in_flight, self.shutdown_timeout)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("shutdown timeout: failing %d requests still in flight", self.in_flight)
            if self._fail_remaining is not None:
                self._fail_remaining()
            await asyncio.sleep(_FLUSH_S)
        if self._stop is not None:
            self._stop()

    def fatal(self, exit_code: int = 1) -> None:
        """Event loop: the engine died; requests were told; exit non-zero shortly."""
        self.draining = True
        self.exit_code = exit_code
        if self._stop is not None:
            asyncio.get_running_loop().call_later(_FLUSH_S, self._stop)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (`ServerLifecycle`) instead of closing at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.lifecycle.draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal: uvicorn's own, immediate exit
            return
        self._loop.call_soon_threadsafe(self.lifecycle.begin_drain)

    def stop(self) -> None:
        self.should_exit = True


class InFlightMiddleware:
    """Counts the HTTP requests being answered (streams until their last byte), for the drain."""

    def __init__(self, app, lifecycle: ServerLifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/health", "/metrics"):
            await self.app(scope, receive, send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


def serve_until_drained(app, config) -> None:
    """Run uvicorn on `app` until SIGTERM has drained it or its engine died; then exit with the
    lifecycle's code (0 after a drain). app.state holds `lifecycle` (a ServerLifecycle) and,
    where requests can be failed, `fail_remaining`."""
    lifecycle: ServerLifecycle = app.state.lifecycle
    fail_remaining = getattr(app.state, "fail_remaining", None)
    # After our drain, connections still open (a stream cut by the timeout) are closed promptly.
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
                                           access_log=config.access_log, timeout_graceful_shutdown=2), lifecycle)
    lifecycle.attach(server.stop, fail_remaining or (lambda: None))
    server.run()
    if lifecycle.exit_code:
        logger.error("exiting with status %d", lifecycle.exit_code)
        sys.exit(lifecycle.exit_code)
