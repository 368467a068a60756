"""The engine behind an event loop: one engine thread runs every step; coroutines await outputs.

`LLMEngine` is not thread-safe and its steps are compute, which must never run on the event
loop. So a single dedicated thread owns the engine: the loop hands it commands (add, abort)
through a condition-guarded list, and the thread hands outputs back with
`loop.call_soon_threadsafe`. With nothing to do the thread sleeps on the condition.

Everything else here (streams, the waiting count) lives on the event loop and is touched only
from it, so it needs no lock.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from adadepth.engine.llm_engine import LLMEngine
from adadepth.hardware import release_openmp_threads
from adadepth.outputs import RequestOutput
from adadepth.sampling_params import SamplingParams
from adadepth.server.metrics import ServerMetrics
from adadepth.server.output_stream import OutputStream, RequestTimeoutError

__all__ = ["AsyncEngine", "EngineDeadError", "EngineRequest", "QueueFullError", "RequestTimeoutError",
           "ServerShuttingDownError", "expand_samples"]

logger = logging.getLogger(__name__)

# When the scheduler can run nothing although requests are pending (a prompt waiting for KV
# blocks), back off this long instead of spinning.
_IDLE_BACKOFF_S = 0.005


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served until a restart."""


class QueueFullError(RuntimeError):
    """More sequences are waiting than the server accepts (--max-waiting)."""


class ServerShuttingDownError(RuntimeError):
    """The server is draining (SIGTERM) and failed the requests still running at its deadline."""


@dataclass
class EngineRequest:
    """One engine request: a single sample of a single prompt."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Add:
    request: EngineRequest


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 0, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        # The event loop tokenizes with its own copy: a Hugging Face fast tokenizer must not be
        # used from two threads at once, and the engine thread detokenizes with the original.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.model_name = engine.model_name
        self.num_layers = engine.num_layers
        self.max_model_len = engine.max_model_len
        # The most UTF-8 bytes one token's text can stand for (its vocabulary string's bytes are an
        # upper bound: byte-level and byte-fallback spellings only take more), for prompt-size bounds.
        self.max_token_bytes = max(len(t.encode("utf-8", "surrogatepass")) for t in engine.tokenizer.get_vocab())
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []  # guarded by _cond
        self._stopping = False                    # guarded by _cond
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None   # why the engine thread died
        self.on_dead = None                        # event loop callback once the engine died and requests were told
        # Written by the engine thread after every step, read by the watchdog (a float: atomic).
        self.last_step_end = time.monotonic()
        # Event loop only:
        self._streams: dict[str, tuple[OutputStream, int]] = {}
        self._not_started: set[str] = set()  # accepted, no token yet: what --max-waiting bounds
        self._busy_since = time.monotonic()  # when the server last went from idle to busy

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the outputs."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is already running")
        self._loop = asyncio.get_running_loop()
        # From here on only the engine thread computes: drop the OpenMP pool that loading the model
        # gave this thread, or every parallel op of the engine thread pays for the extra threads.
        release_openmp_threads()
        self._thread = threading.Thread(target=self._run, name="adadepth-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stalled_for(self) -> float:
        """Seconds requests have been running without an engine step finishing (0 when idle)."""
        if not self._streams:
            return 0.0
        return time.monotonic() - max(self.last_step_end, self._busy_since)

    @property
    def num_waiting(self) -> int:
        """Accepted requests that have not produced a token yet (queued or in prefill)."""
        return len(self._not_started)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- requests (event loop) ---------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine would refuse.

        Reads only what is fixed after load (context length, vocabulary, layer count), so it
        is safe to call from the event loop while the engine thread steps.
        """
        self.engine.validate(prompt_token_ids, params)

    def submit(self, requests: Sequence[EngineRequest], deadline: float | None = None) -> OutputStream:
        """Queue requests (sequences) for the engine thread, all or none; raises EngineDeadError,
        QueueFullError, or ValueError when they could never all wait together.
        deadline: time.monotonic() past which the stream fails with RequestTimeoutError."""
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        if self.max_waiting and len(requests) > self.max_waiting:
            raise ValueError(f"the request has {len(requests)} sequences (prompts x n); this server queues at most "
                             f"{self.max_waiting} (--max-waiting)")
        if self.max_waiting and len(self._not_started) + len(requests) > self.max_waiting:
            raise QueueFullError(f"{len(self._not_started)} sequences are already waiting and this request adds "
                                 f"{len(requests)} (limit {self.max_waiting}); retry later")
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(i in self._streams for i in ids):
            raise ValueError("request ids must be unique")
        if not self._streams:
            self._busy_since = time.monotonic()
        stream = OutputStream(ids, self.abort, deadline)
        for index, r in enumerate(requests):
            self._streams[r.request_id] = (stream, index)
            self._not_started.add(r.request_id)
        self._send(*(_Add(r) for r in requests))
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (cumulative; the last one has `finished`).

        Bad input raises ValueError at the first iteration; leaving the loop early aborts.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        request = EngineRequest(request_id, ids, params, arrival_time or time.monotonic())
        async with self.submit([request]) as stream:
            async for _, output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; nothing happens if it already finished."""
        if self._streams.pop(request_id, None) is None:
            return
        self._not_started.discard(request_id)
        self._send(_Abort(request_id))

    def _send(self, *commands: _Add | _Abort) -> None:
        with self._cond:
            self._commands.extend(commands)
            self._cond.notify()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Event loop: route a step's outputs to their streams."""
        for output in outputs:
            entry = self._streams.get(output.request_id)
            if entry is None:
                continue  # aborted while the step ran
            stream, index = entry
            self._not_started.discard(output.request_id)
            if output.finished:
                del self._streams[output.request_id]
            stream.put(index, output)

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        entry = self._streams.pop(request_id, None)
        self._not_started.discard(request_id)
        if entry is not None:
            entry[0].fail(error)

    def fail_all(self, error: BaseException) -> None:
        """Event loop: fail every accepted request (streams get an error event) and abort it."""
        for request_id in list(self._streams):
            self._fail_request(request_id, error)
            self._send(_Abort(request_id))

    def _engine_died(self, error: BaseException) -> None:
        self.fail_all(error)
        if self.on_dead is not None:
            self.on_dead()

    def _call_soon(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed during shutdown: nobody is left to read
            pass

    # ---- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._stopping:
                        return
                    commands, self._commands = self._commands, []
                for command in commands:
                    self._apply(command)
                outputs = engine.step() if engine.has_unfinished_requests() else []
                self.last_step_end = time.monotonic()
                if self.metrics is not None:
                    self.metrics.record_step(outputs, engine.last_step if outputs else None,
                                             engine.stats(), engine.scheduler.num_preemptions)
                if outputs:
                    self._call_soon(self._deliver, outputs)
                elif engine.has_unfinished_requests():
                    with self._cond:
                        self._cond.wait(_IDLE_BACKOFF_S)
        except BaseException as exc:  # noqa: BLE001 - whatever killed the thread must reach the clients
            logger.exception("the engine thread died")
            self.error = exc
            # The exception's text stays in the log: clients get a generic message.
            self._call_soon(self._engine_died, EngineDeadError("the engine failed; the server will restart"))

    def _apply(self, command: _Add | _Abort) -> None:
        engine = self.engine
        if isinstance(command, _Add):
            r = command.request
            try:
                engine.add_request(r.request_id, r.prompt_token_ids, r.params, arrival_time=r.arrival_time)
            except ValueError as exc:  # validated on the loop already; a race such as a reused id
                self._call_soon(self._fail_request, r.request_id, exc)
        else:
            if command.request_id in engine.seqs:
                engine.abort_request(command.request_id)
                if self.metrics is not None:
                    self.metrics.record_abort(command.request_id)


def expand_samples(request: EngineRequest, n: int) -> list[EngineRequest]:
    """n samples of one prompt as n engine requests; seeded runs use seed + i, as `LLM` does."""
    if n == 1:
        return [dataclasses.replace(request, params=dataclasses.replace(request.params, n=1))]
    seed = request.params.seed
    return [dataclasses.replace(request, request_id=f"{request.request_id}-{i}",
                                params=dataclasses.replace(request.params, n=1,
                                                           seed=None if seed is None else seed + i))
            for i in range(n)]
