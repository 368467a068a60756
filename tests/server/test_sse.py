"""Server-sent events: what the server writes survives clients that split lines like str.splitlines, and
the reader splits at CR and LF only, wherever the network cuts the bytes."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from adadepth.server.sse import aiter_sse_lines, sse, sse_events

TEXT = "line\u2028sep\u2029para\u0085next\nnewline \u00e9\u4e2d"


def test_sse_event_is_one_line_to_every_line_splitter_and_keeps_the_text():
    event = sse({"choices": [{"text": TEXT}]})
    assert event.endswith("\n\n") and event.startswith("data: ")
    lines = event.splitlines()  # splits at U+2028, U+2029, U+0085 as well as \n
    assert lines == [lines[0], ""] and json.loads(lines[0][len("data: "):]) == {"choices": [{"text": TEXT}]}
    assert "\u00e9\u4e2d" in event  # other non-ASCII text stays as it is
    assert sse("[DONE]") == "data: [DONE]\n\n"


def _response(pieces: list[bytes]) -> httpx.Response:
    async def stream():
        for piece in pieces:
            yield piece
    return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream; charset=utf-8"})


async def _lines(pieces: list[bytes]) -> list[str]:
    return [line async for line in aiter_sse_lines(_response(pieces))]


RAW = ('data: {"t": "a\u2028b"}\r\n\r\n: comment\rdata: x\ndata: y\n\n'
       'data: {"t": "\u00e9\u2029"}\n\ndata: [DONE]').encode()
WANT = ['data: {"t": "a\u2028b"}', "", ": comment", "data: x", "data: y", "", 'data: {"t": "\u00e9\u2029"}', "",
        "data: [DONE]"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(RAW)])
def test_reader_splits_at_cr_and_lf_only_however_the_bytes_arrive(size):
    # Pieces of 1-3 bytes cut CRLF pairs and multi-byte characters in two.
    pieces = [RAW[i:i + size] for i in range(0, len(RAW), size)]
    assert asyncio.run(_lines(pieces)) == WANT


def test_events_group_lines_up_to_the_blank_line():
    async def events():
        return [e async for e in sse_events(_response([RAW]))]
    assert asyncio.run(events()) == [['data: {"t": "a\u2028b"}'], [": comment", "data: x", "data: y"],
                                     ['data: {"t": "\u00e9\u2029"}'], ["data: [DONE]"]]
