"""The outputs of one client request's engine requests, read as an async iterator."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from adadepth.outputs import RequestOutput, merge_delta


class RequestTimeoutError(RuntimeError):
    """The request ran past --request-timeout and was aborted."""


class OutputStream:
    """Outputs of engine requests submitted together (n samples, several prompts), as
    (index, RequestOutput) pairs.

    The engine's outputs hold what is new; the stream folds them into each request's whole output
    (`merge_delta`) and hands readers that, so a reader that falls behind reads each request once
    with everything so far: nothing queues. Closing the stream (or leaving `async with`) aborts
    whatever has not finished, which frees its KV blocks.
    """

    def __init__(self, request_ids: list[str], abort: Callable[[str], None], deadline: float | None = None):
        self._abort = abort
        self.deadline = deadline  # time.monotonic() past which reading raises RequestTimeoutError
        self.request_ids = request_ids
        self._whole: dict[int, RequestOutput] = {}   # each request's output so far
        self._updated: dict[int, None] = {}          # indices with news since last read (ordered)
        self._unfinished = set(range(len(request_ids)))
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    # ---- filled by AsyncEngine on the event loop ---------------------------------------
    def put(self, index: int, output: RequestOutput) -> None:
        """output: what is new for request `index` (an engine step's output)."""
        self._whole[index] = merge_delta(self._whole.get(index), output)
        self._updated[index] = None
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
        while not self._updated:
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
        index = next(iter(self._updated))
        del self._updated[index]
        output = self._whole[index]
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
