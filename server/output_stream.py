"""The outputs of one client request's engine requests, read as an async iterator."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from adadepth.outputs import RequestOutput


class RequestTimeoutError(RuntimeError):
    """The request ran past --request-timeout and was aborted."""


class OutputStream:
    """Outputs of engine requests submitted together (n samples, several prompts), as
    (index, RequestOutput) pairs.

    Outputs are cumulative, so a reader that falls behind only needs each request's newest
    one: older ones are replaced, never queued. Closing the stream (or leaving `async with`)
    aborts whatever has not finished, which frees its KV blocks.
    """

    def __init__(self, request_ids: list[str], abort: Callable[[str], None], deadline: float | None = None):
        self._abort = abort
        self.deadline = deadline  # time.monotonic() past which reading raises RequestTimeoutError
        self.request_ids = request_ids
        self._latest: dict[int, RequestOutput] = {}
        self._unfinished = set(range(len(request_ids)))
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    # ---- filled by AsyncEngine on the event loop ---------------------------------------
    def put(self, index: int, output: RequestOutput) -> None:
        self._latest[index] = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    # ---- read by handlers --------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while not self._latest:
            if self._error is not None:
                raise self._error
            if not self._unfinished:
                raise StopAsyncIteration
            if self.deadline is None:
                await self._ready.wait()
            else:
                try:
                    await asyncio.wait_for(self._ready.wait(), max(0.0, self.deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise RequestTimeoutError("the request took longer than this server allows (--request-timeout) "
                                              "and was aborted") from None
            self._ready.clear()
        index = next(iter(self._latest))
        output = self._latest.pop(index)
        if output.finished:
            self._unfinished.discard(index)
        return index, output

    def close(self) -> None:
        """Abort every request of the stream that has not finished; safe to call again."""
        for index in sorted(self._unfinished):
            self._abort(self.request_ids[index])
        self._unfinished.clear()

    async def __aenter__(self) -> "OutputStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
