"""POST /v1/chat/completions: messages through the tokenizer's chat template, then generation."""
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
from adadepth.server.protocol import ChatCompletionRequest
from adadepth.server.sse import sse


@dataclass
class _ChoiceProgress:
    chars: int = 0
    tokens: int = 0


class ChatServing(OpenAIServing):
    async def create(self, raw_request: Request) -> Response:
        req = await self.parse(raw_request, ChatCompletionRequest)
        arrival = time.monotonic()
        self.check_model(req.model)
        req.check_supported()
        self.limits.check(req)
        self.limits.check_messages(len(req.messages))
        self.limits.check_logprobs(req.top_logprobs, "top_logprobs")
        self.check_template_kwargs(req.chat_template_kwargs, req.chat_template)
        prompt_ids = await self.off_loop(self._render, req)
        max_tokens = req.requested_max_tokens
        if max_tokens is None:  # as OpenAI and vLLM: as much as the context leaves
            max_tokens = self.engine.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                raise bad_request(f"the messages take {len(prompt_ids)} tokens, which leaves no room in the "
                                  f"context of {self.engine.max_model_len} tokens", param="messages")
        params = self.build_params(lambda: req.sampling_params(max_tokens, req.num_logprobs,
                                                               self.config.default_quality))
        await self.validate(prompt_ids, params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.submit(expand_samples(EngineRequest(request_id, prompt_ids, params, arrival), req.n or 1))
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, created, len(prompt_ids), stream),
                                     media_type="text/event-stream", background=BackgroundTask(stream.close))
        try:
            finals = await self.unless_disconnected(raw_request, self.collect(stream))
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(self._response(req, request_id, created, len(prompt_ids), finals))

    def _render(self, req: ChatCompletionRequest) -> list[int]:
        """Preprocessing thread: the conversation through the chat template, then token ids."""
        kwargs = dict(req.chat_template_kwargs or {})
        if req.chat_template is not None:
            kwargs["chat_template"] = req.chat_template
        prompt = self.apply_chat_template(req.messages, bool(req.add_generation_prompt),
                                          bool(req.continue_final_message), kwargs)
        # The template already holds any BOS it wants; adding special tokens again would double it.
        return self.encode(prompt, add_special_tokens=False)

    # ---- responses ---------------------------------------------------------------------
    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.token_str(token_id)
        return {"token": token, "logprob": clamp_logprob(logprob), "bytes": list(token.encode("utf-8"))}

    def _logprobs(self, req: ChatCompletionRequest, out: RequestOutput, start: int, end: int) -> dict | None:
        if not req.logprobs:
            return None
        completion = out.outputs[0]
        k = req.top_logprobs or 0
        content = []
        for token_id, entry in zip(completion.token_ids[start:end], (completion.logprobs or [])[start:end]):
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]
            content.append({**self._entry(token_id, entry[token_id]),
                            "top_logprobs": [self._entry(t, v) for t, v in ranked]})
        return {"content": content}

    def _response(self, req: ChatCompletionRequest, request_id: str, created: int, prompt_len: int,
                  finals: dict[int, RequestOutput]) -> dict:
        outputs = [finals[i] for i in range(len(finals))]
        choices = []
        for index, out in enumerate(outputs):
            completion = out.outputs[0]
            choices.append({"index": index, "message": {"role": "assistant", "content": completion.text},
                            "logprobs": self._logprobs(req, out, 0, len(completion.token_ids)),
                            "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason})
        return {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self.usage([prompt_len], outputs), "adadepth": self.depth_report(outputs)}

    async def _stream(self, req: ChatCompletionRequest, request_id: str, created: int, prompt_len: int,
                      stream: OutputStream) -> AsyncIterator[str]:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        usage_field = {"usage": None} if req.include_usage else {}
        progress = [_ChoiceProgress() for _ in stream.request_ids]
        latest: dict[int, RequestOutput] = {}
        async with stream:
            try:
                async for index, out in stream:
                    if index not in latest:
                        # Each choice opens with its role, as OpenAI's do. Sent with the first token,
                        # not before, so a client timing its first chunk measures time to first token.
                        yield sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}], **usage_field})
                    latest[index] = out
                    chunk = self._chunk(req, head, index, out, progress[index])
                    if chunk is None:
                        continue
                    if req.include_usage:
                        chunk["usage"] = (self.usage([prompt_len], list(latest.values()))
                                          if req.continuous_usage else None)
                    yield sse(chunk)
            except REQUEST_FAILURES as exc:
                yield sse(stream_error(exc).body())
                yield sse("[DONE]")
                return
        outputs = [latest[i] for i in sorted(latest)]
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": self.usage([prompt_len], outputs),
                       "adadepth": self.depth_report(outputs)})
        yield sse("[DONE]")

    def _chunk(self, req: ChatCompletionRequest, head: dict, index: int, out: RequestOutput,
               progress: _ChoiceProgress) -> dict | None:
        completion = out.outputs[0]
        delta = completion.text[progress.chars:]
        num_tokens = len(completion.token_ids)
        if not (delta or num_tokens > progress.tokens or out.finished):
            return None
        logprobs = self._logprobs(req, out, progress.tokens, num_tokens)
        progress.chars = max(progress.chars, len(completion.text))
        progress.tokens = num_tokens
        chunk = {**head, "choices": [{"index": index, "delta": {"content": delta} if delta else {},
                                      "logprobs": logprobs,
                                      "finish_reason": completion.finish_reason if out.finished else None,
                                      "stop_reason": completion.stop_reason if out.finished else None}]}
        if out.finished:
            chunk["adadepth"] = self.depth_report([out])
        return chunk
