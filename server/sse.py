"""Server-sent events on the wire: writing them so any client splits them right, and reading them as the
SSE specification says.

The two halves guard against the same trap. SSE ends a line at CR, LF or CRLF only, and JSON already
escapes both inside strings, so a JSON event is always one line. But many readers split lines as Python's
`str.splitlines` does (httpx's `iter_lines` among them), which also breaks at U+0085, U+2028 and U+2029:
characters JSON leaves raw. A model that emits one of them (tokens are arbitrary text) would cut such a
client's event in two, an unparseable half-line in the middle of a stream. So `sse` escapes those three
(the JSON stays equal), and `aiter_sse_lines` splits at CR and LF only, for streams from servers that do not
escape them (vLLM tiers behind the gateway, the peers in benchmarks).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

# Line breaks to str.splitlines that JSON does not escape (it escapes every character below U+0020).
_UNSAFE_FOR_SPLITLINES = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def escape_line_separators(event: str) -> str:
    """`event` with U+0085, U+2028 and U+2029 escaped. In a JSON event they can only sit inside strings,
    where the escape means the same character."""
    return event.translate(_UNSAFE_FOR_SPLITLINES)


def sse(payload: dict | str) -> str:
    """One server-sent event as OpenAI streams them: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {escape_line_separators(data)}\n\n"


async def aiter_sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream, split at CR, LF and CRLF only (never inside a JSON string)."""
    pending = ""
    async for text in response.aiter_text():
        pending += text
        # A trailing CR may be the first half of a CRLF still to come: keep it for the next piece.
        cut = len(pending) - 1 if pending.endswith("\r") else len(pending)
        lines = pending[:cut].replace("\r\n", "\n").replace("\r", "\n").split("\n")
        pending = lines.pop() + pending[cut:]
        for line in lines:
            yield line
    if pending:
        yield pending.rstrip("\r")


async def sse_events(response: httpx.Response) -> AsyncIterator[list[str]]:
    """The lines of each server-sent event (events end with a blank line)."""
    lines: list[str] = []
    async for line in aiter_sse_lines(response):
        if line:
            lines.append(line)
        elif lines:
            yield lines
            lines = []
    if lines:
        yield lines
