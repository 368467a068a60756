"""AsyncEngine without HTTP: generate as an async iterator, abort, queue bound, bad input."""
from __future__ import annotations

import asyncio
import threading

import pytest

from adadepth import LLM, SamplingParams
from adadepth.engine.llm_engine import LLMEngine
from adadepth.server.async_engine import AsyncEngine, EngineRequest, QueueFullError
from conftest import ENGINE_OPTIONS, engine_config

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama, cache_dir):
    return LLMEngine(engine_config(tiny_llama, cache_dir, max_num_seqs=1))


def run(coro):
    return asyncio.run(coro)


def test_generate_streams_cumulative_outputs_from_the_engine_thread(engine, tiny_llama, cache_dir):
    want = LLM(tiny_llama, cache_dir=cache_dir, **ENGINE_OPTIONS).generate("hello world", GREEDY)[0]

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        seen, threads = [], set()
        original = engine.step

        def step():
            threads.add(threading.current_thread().name)
            return original()

        engine.step = step
        try:
            async for out in ae.generate("r1", "hello world", GREEDY):
                seen.append(out)
        finally:
            del engine.step
            ae.shutdown()
        return seen, threads

    seen, threads = run(main())
    assert threads == {"adadepth-engine"}  # compute never ran on the event loop's thread
    assert seen[-1].finished and seen[-1].token_ids == want.token_ids
    counts = [len(o.token_ids) for o in seen]
    assert counts == sorted(counts) and counts[-1] == 8


def test_abort_queue_bound_and_bad_input(engine):
    async def main():
        ae = AsyncEngine(engine, max_waiting=1)
        ae.start()
        try:
            with pytest.raises(ValueError):
                async for _ in ae.generate("bad", "hi", SamplingParams(max_tokens=10_000)):
                    pass
            long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            ids = ae.tokenizer.encode("hello")
            a = ae.submit([EngineRequest("a", ids, long, 0.0)])
            await a.__anext__()                                      # a runs (max_num_seqs=1)
            b = ae.submit([EngineRequest("b", ids, GREEDY, 0.0)])     # b waits
            with pytest.raises(QueueFullError):
                ae.submit([EngineRequest("c", ids, GREEDY, 0.0)])
            a.close()                                                # abort a: b can run
            finals = [out async for _, out in b if out.finished]
            assert len(finals[0].token_ids) == 8
            for _ in range(200):
                if ae.num_unfinished == 0 and ae.num_waiting == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            ae.shutdown()
        return ae

    ae = run(main())
    assert not ae.is_healthy  # shut down
    assert engine.block_manager.usage == 0.0 and not engine.has_unfinished_requests()
