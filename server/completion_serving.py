"""POST /v1/completions: OpenAI's legacy completions, with vLLM's extras and adadepth's depth."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from adadepth.outputs import RequestOutput
from adadepth.server.async_engine import EngineRequest, expand_samples
from adadepth.server.errors import bad_request
from adadepth.server.openai_serving import (REQUEST_FAILURES, ClientDisconnected, OpenAIServing, clamp_logprob,
                                             stream_error)
from adadepth.server.output_stream import OutputStream
from adadepth.server.protocol import CompletionRequest
from adadepth.server.sse import sse


@dataclass
class Prompt:
    text: str | None  # None for token-id prompts until echo needs it
    token_ids: list[int]


@dataclass
class _ChoiceProgress:
    """How much of one choice has been streamed."""
    chars: int = 0
    tokens: int = 0
    echoed: bool = False


class CompletionServing(OpenAIServing):
    async def create(self, raw_request: Request) -> Response:
        req = await self.parse(raw_request, CompletionRequest)
        arrival = time.monotonic()
        self.check_model(req.model)
        req.check_supported()
        self.limits.check(req)
        self.limits.check_logprobs(req.logprobs, "logprobs")
        if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int):
            self.limits.check_prompts(len(req.prompt))
        prompts = await self.off_loop(self._prompts, req)
        n = req.n or 1
        params = self.build_params(lambda: req.sampling_params(req.max_tokens if req.max_tokens is not None else 16,
                                                               req.logprobs, self.config.default_quality))
        for p in prompts:
            await self.validate(p.token_ids, params)
            if p.text is None:  # decoded only now that the ids are known to be in the vocabulary
                p.text = await self.off_loop(self.tokenizer.decode, p.token_ids)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        engine_requests = []
        for i, p in enumerate(prompts):  # choice index = prompt index * n + sample index, as OpenAI
            engine_requests += expand_samples(EngineRequest(f"{request_id}-{i}", p.token_ids, params, arrival), n)
        stream = self.submit(engine_requests)
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, created, prompts, n, stream),
                                     media_type="text/event-stream", background=BackgroundTask(stream.close))
        try:
            finals = await self.unless_disconnected(raw_request, self.collect(stream))
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(self._response(req, request_id, created, prompts, n, finals))

    def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        prompt = req.prompt
        add_special = req.add_special_tokens is not False
        if isinstance(prompt, str):
            return [Prompt(prompt, self.encode(prompt, add_special))]
        if not prompt:
            raise bad_request("prompt must not be an empty list", param="prompt")
        if isinstance(prompt[0], str):
            return [Prompt(p, self.encode(p, add_special)) for p in prompt]
        if isinstance(prompt[0], int):
            return [Prompt(None, list(prompt))]
        return [Prompt(None, list(p)) for p in prompt]

    # ---- responses ---------------------------------------------------------------------
    def _logprobs(self, out: RequestOutput, start: int, end: int, text_offset: int) -> dict:
        """The legacy logprobs object for tokens [start, end) of a choice."""
        completion = out.outputs[0]
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(completion.token_ids[start:end], (completion.logprobs or [])[start:end]):
            token = self.token_str(token_id)
            tokens.append(token)
            token_logprobs.append(clamp_logprob(entry[token_id]))
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
            top_logprobs.append({self.token_str(t): clamp_logprob(v) for t, v in ranked})
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def _response(self, req: CompletionRequest, request_id: str, created: int, prompts: list[Prompt], n: int,
                  finals: dict[int, RequestOutput]) -> dict:
        outputs = [finals[i] for i in range(len(finals))]
        choices = []
        for index, out in enumerate(outputs):
            completion = out.outputs[0]
            prefix = prompts[index // n].text if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._logprobs(out, 0, len(completion.token_ids), len(prefix))
            choices.append({"index": index, "text": prefix + completion.text, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason})
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self.usage([len(p.token_ids) for p in prompts], outputs),
                "adadepth": self.depth_report(outputs)}

    async def _stream(self, req: CompletionRequest, request_id: str, created: int, prompts: list[Prompt], n: int,
                      stream: OutputStream) -> AsyncIterator[str]:
        head = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}
        progress = [_ChoiceProgress() for _ in stream.request_ids]
        latest: dict[int, RequestOutput] = {}
        prompt_lens = [len(p.token_ids) for p in prompts]
        async with stream:
            try:
                async for index, out in stream:
                    latest[index] = out
                    chunk = self._chunk(req, head, index, out, progress[index], prompts[index // n].text)
                    if chunk is None:
                        continue
                    if req.include_usage:
                        chunk["usage"] = self.usage(prompt_lens, list(latest.values())) if req.continuous_usage else None
                    yield sse(chunk)
            except REQUEST_FAILURES as exc:
                yield sse(stream_error(exc).body())
                yield sse("[DONE]")
                return
        outputs = [latest[i] for i in sorted(latest)]
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": self.usage(prompt_lens, outputs),
                       "adadepth": self.depth_report(outputs)})
        yield sse("[DONE]")

    def _chunk(self, req: CompletionRequest, head: dict, index: int, out: RequestOutput,
               progress: _ChoiceProgress, prompt_text: str) -> dict | None:
        completion = out.outputs[0]
        prefix = ""
        if req.echo and not progress.echoed:
            prefix, progress.echoed = prompt_text, True
        delta = completion.text[progress.chars:]
        num_tokens = len(completion.token_ids)
        if not (prefix or delta or num_tokens > progress.tokens or out.finished):
            return None
        logprobs = None
        if req.logprobs is not None:
            # Offsets count from the start of this choice's text, echoed prompt included.
            base = (len(prompt_text) if req.echo else 0) + progress.chars
            logprobs = self._logprobs(out, progress.tokens, num_tokens, base)
        progress.chars = max(progress.chars, len(completion.text))
        progress.tokens = num_tokens
        chunk = {**head, "choices": [{"index": index, "text": prefix + delta, "logprobs": logprobs,
                                      "finish_reason": completion.finish_reason if out.finished else None,
                                      "stop_reason": completion.stop_reason if out.finished else None}]}
        if out.finished:
            chunk["adadepth"] = self.depth_report([out])
        return chunk
