"""Request bodies of the OpenAI API (and vLLM's extras), validated by pydantic.

Models are strict, as OpenAI is: "5" is not an integer and true is not a number. Unknown
fields are ignored (OpenAI clients send `user`, `metadata`, ... that change nothing here).
`to_sampling_params` turns a request into the engine's SamplingParams; anything the engine
cannot honour is refused with a 400 rather than silently ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adadepth.sampling_params import SamplingParams, StructuredOutputsParams
from adadepth.server.errors import bad_request


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage on every chunk


class JsonSchemaFormat(StrictModel):
    name: str
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # `schema` would shadow pydantic's own
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's response_format: free text, any JSON object, or JSON that follows a schema."""
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(StrictModel):
    """vLLM's `structured_outputs` request field: exactly one of json, regex, choice, grammar,
    json_object."""
    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = False
    # vLLM's too; refused below (xgrammar has neither), so a client never believes they applied.
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    disable_additional_properties: bool | None = None


# vLLM sampling fields this server does not implement, with the values at which they change nothing:
# read only to refuse any other value (ignored like an unknown field, they would leave a client
# believing they applied).
UNSUPPORTED_VLLM_FIELDS: dict[str, tuple] = {
    "use_beam_search": (None, False), "length_penalty": (None, 1.0, 1), "allowed_token_ids": (None,),
    "bad_words": (None, []), "include_stop_str_in_output": (None, False), "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,), "logits_processors": (None, []),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
}


class SamplingFields(StrictModel):
    """Fields shared by completions and chat completions."""
    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    repetition_penalty: float | None = None
    min_p: float | None = None
    # adadepth: layers to run (int) or fraction of the layers (float in (0, 1]), or a target quality.
    depth: int | float | None = None
    quality: float | None = None
    # Structured outputs: vLLM's field, or OpenAI's response_format (both endpoints, as vLLM).
    structured_outputs: StructuredOutputsRequest | None = None
    response_format: ResponseFormat | None = None
    # UNSUPPORTED_VLLM_FIELDS, any JSON value.
    use_beam_search: Any = None
    length_penalty: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    include_stop_str_in_output: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None
    logits_processors: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    def check_supported(self) -> None:
        """Refuse knobs the engine does not implement, unless they are at their no-op value."""
        for name, no_op in UNSUPPORTED_VLLM_FIELDS.items():
            value = getattr(self, name)
            if not any(value == v and type(value) is type(v) for v in no_op):
                hint = "; use structured_outputs or response_format" if name.startswith("guided_") else ""
                raise bad_request(f"{name} is not supported by this server{hint}", param=name)
        so = self.structured_outputs
        if so is not None:
            for name in ("whitespace_pattern", "structural_tag"):
                if getattr(so, name) is not None:
                    raise bad_request(f"structured_outputs.{name} is not supported by this server",
                                      param=f"structured_outputs.{name}")
            if so.disable_additional_properties:
                raise bad_request("structured_outputs.disable_additional_properties is not supported by this "
                                  "server; set additionalProperties in the schema", param="structured_outputs")
        rf = self.response_format
        if rf is not None:
            if rf.type == "structural_tag":
                raise bad_request("response_format structural_tag is not supported by this server",
                                  param="response_format")
            if rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
                raise bad_request("response_format json_schema needs json_schema.schema", param="response_format")
            if rf.type != "text" and so is not None:
                raise bad_request("send either response_format or structured_outputs, not both",
                                  param="response_format")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops):
            raise bad_request("stop strings must not be empty", param="stop")
        if self.n is not None and self.n < 1:
            raise bad_request(f"n must be >= 1, got {self.n}", param="n")

    def sampling_params(self, max_tokens: int, logprobs: int | None, default_quality: float | None) -> SamplingParams:
        """One engine request's params (n is expanded by the caller); ValueError on bad values."""
        quality = self.quality
        if self.depth is None and quality is None:
            quality = default_quality
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=bool(self.ignore_eos), min_tokens=self.min_tokens or 0, logprobs=logprobs,
            n=self.n or 1, depth=self.depth, quality=quality,
            skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0, logit_bias=self._token_bias(), structured_outputs=self._constraint())

    def _token_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {key!r}") from None
        return bias

    def _constraint(self) -> StructuredOutputsParams | None:
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf is not None and rf.type == "json_schema":
            return StructuredOutputsParams(json=rf.json_schema.schema_)
        if so is None:
            return None
        return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                       json_object=so.json_object,
                                       disable_any_whitespace=bool(so.disable_any_whitespace))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool | None = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request("best_of is not supported by this server; leave it out or set it to n", param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported: prompt logprobs are not computed", param="echo")


class ContentPart(StrictModel):
    """One part of a message's content list. Only text parts are read: an image or audio part is a
    400 that names its type (a text-only model would otherwise answer without having seen it)."""
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"content parts of type '{self.type}' are not supported: this model reads text parts only")
        if self.text is None:
            raise ValueError("a text content part needs a 'text' string")
        return self


class ChatMessage(StrictModel):
    # Roles the chat template understands; anything else (e.g. "tool" without tools) is a 400.
    role: Literal["system", "developer", "user", "assistant"]
    # The list first: pydantic reports the first member's errors, and a list's are the telling ones.
    content: list[ContentPart] | str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    # vLLM's extras for templates.
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict | None = None
    chat_template: str | None = None  # vLLM's: a Jinja template for this request (refused unless trusted)

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported by this server", param="tools")
        if self.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported by this server", param="tool_choice")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise bad_request(f"top_logprobs must be >= 0, got {self.top_logprobs}", param="top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              param="continue_final_message")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class TokenizeRequest(StrictModel):
    """vLLM's /tokenize: either a prompt or chat messages."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]
