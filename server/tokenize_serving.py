"""POST /tokenize and /detokenize in vLLM's shapes."""
from __future__ import annotations

from fastapi import Request

from adadepth.server.errors import bad_request
from adadepth.server.openai_serving import OpenAIServing
from adadepth.server.protocol import DetokenizeRequest, TokenizeRequest


class TokenizeServing(OpenAIServing):
    async def tokenize(self, raw_request: Request) -> dict:
        req = await self.parse(raw_request, TokenizeRequest)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            self.limits.check_messages(len(req.messages))
        tokens, token_strs = await self.off_loop(self._tokenize, req)
        return {"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens,
                "token_strs": token_strs}

    def _tokenize(self, req: TokenizeRequest) -> tuple[list[int], list[str] | None]:
        """Preprocessing thread: (token ids, token strings when asked)."""
        if req.messages is not None:
            text = self.apply_chat_template(req.messages, req.add_generation_prompt is not False)
            add_special = bool(req.add_special_tokens)  # vLLM: off for chat, the template has them
        else:
            text = req.prompt
            add_special = req.add_special_tokens is not False
        tokens = self.encode(text, add_special)
        return tokens, self.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None

    async def detokenize(self, raw_request: Request) -> dict:
        req = await self.parse(raw_request, DetokenizeRequest)
        self.check_model(req.model)
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await self.off_loop(self.tokenizer.decode, req.tokens)}
