"""The endpoints through the official `openai` client: shapes, sampling knobs, depth control."""
from __future__ import annotations

import importlib.metadata
import json
import re
import time

import httpx
import openai
import pytest

from adadepth import LLM, SamplingParams
from conftest import ENGINE_OPTIONS, MODEL_ALIAS

PROMPT = "the quick brown fox jumps"


def greedy(client, model, prompt=PROMPT, **kwargs):
    options = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    options.update(kwargs)
    return client.completions.create(**options)


def test_models_health_and_model_aliases(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert client.models.retrieve(server.model).model_extra["num_layers"] == models.data[0].model_extra["num_layers"]
    assert client.models.retrieve(MODEL_ALIAS).id == server.model
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.body["code"] == "model_not_found"
    version = httpx.get(server.base_url + "/version").json()["version"]
    assert version == importlib.metadata.version("adadepth")
    # The served name and the alias given at start both address the model.
    for name in (server.model, MODEL_ALIAS):
        assert greedy(client, name, max_tokens=2).model == server.model


def test_completion_shape_usage_and_depth_report(server):
    out = greedy(server.client(), server.model)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(server.async_engine.tokenizer.encode(PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.usage.model_extra["layers_per_token"] == 6.0
    assert out.model_extra["adadepth"] == {"depth": 6, "num_layers": 6, "source": "default", "quality": None,
                                           "predicted_agreement": None}


def test_chat_completion_uses_the_chat_template(server):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_completion_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 8
    # Same tokens as the engine generating from the rendered template, via completions.
    tok = server.async_engine.tokenizer
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    plain = greedy(client, server.model, prompt=tok.encode(prompt, add_special_tokens=False), max_tokens=8)
    assert out.choices[0].message.content == plain.choices[0].text
    # Content given as text parts renders the same prompt.
    parts = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    again = client.chat.completions.create(model=server.model, messages=parts, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == out.choices[0].message.content


def _sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_streaming_wire_format_and_include_usage(server):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.strip().split("\n\n"))
    events = [e for e in (block[len("data: "):] for block in raw.strip().split("\n\n")) if e != "[DONE]"]
    chunks = [json.loads(e) for e in events]
    assert all(c["usage"] is None for c in chunks[:-1])
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 10
    assert final["adadepth"]["depth"] == 6
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert streamed == greedy(server.client(), server.model, max_tokens=10).choices[0].text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_streaming_chat_through_the_client(server):
    client = server.client()
    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "depth": 0.5})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.model_extra["layers_per_token"] == 3.0
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-2].model_extra["adadepth"]["depth"] == 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0, extra_body={"ignore_eos": True, "depth": 0.5})
    assert text == full.choices[0].message.content
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices


def test_completion_logprobs_legacy_format(server):
    out = greedy(server.client(), server.model, max_tokens=5, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        # Greedy: the chosen token is the most likely one.
        assert logprob == pytest.approx(max(top.values()))
        assert top[token] == pytest.approx(logprob)


def test_chat_logprobs(server):
    out = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    # Token strings decode one token at a time; the text may hold back an unfinished character.
    assert "".join(c.token for c in content).startswith(out.choices[0].message.content)
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    none = server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
    assert none.choices[0].logprobs is None


def test_n_seed_and_reproducibility(server):
    client = server.client()

    def sample(seed, n=1, prompt=PROMPT):
        return client.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=1.0, seed=seed,
                                         n=n, extra_body={"ignore_eos": True})

    a, b, c = sample(7), sample(7), sample(8)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text
    two = sample(7, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    # Sample i of a seeded request uses seed + i, as LLM.generate does.
    assert two.choices[0].text == a.choices[0].text and two.choices[1].text == c.choices[0].text
    assert two.usage.completion_tokens == 20 and two.usage.prompt_tokens == a.usage.prompt_tokens
    # Several prompts times n: choice index = prompt index * n + sample index.
    many = client.completions.create(model=server.model, prompt=[PROMPT, "hello"], n=2, max_tokens=10,
                                     temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[1].text == two.choices[1].text
    assert many.choices[2].text == sample(7, prompt="hello").choices[0].text
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, seed=1, extra_body={"ignore_eos": True})
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 10


def test_prompt_forms_echo_top_p_top_k(server):
    client = server.client()
    ids = server.async_engine.tokenizer.encode(PROMPT)
    text = greedy(client, server.model).choices[0].text
    assert greedy(client, server.model, prompt=ids).choices[0].text == text
    batch = greedy(client, server.model, prompt=[ids, ids])
    assert [c.text for c in batch.choices] == [text, text]
    assert batch.usage.prompt_tokens == 2 * len(ids)
    echoed = greedy(client, server.model, echo=True).choices[0].text
    assert echoed == PROMPT + text
    # top_k=1 and a tiny top_p both make sampling greedy.
    for extra in ({"top_k": 1}, {}):
        out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                        top_p=1e-6 if not extra else 1.0, seed=3,
                                        extra_body={"ignore_eos": True, **extra})
        assert out.choices[0].text == text


def test_stop_strings_and_stop_token_ids(server):
    client = server.client()
    full = greedy(client, server.model, max_tokens=30).choices[0].text
    match = re.search(r"[a-z]{2}", full[2:])
    assert match, full
    stop = match.group(0)
    out = greedy(client, server.model, max_tokens=30, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    # Streaming never shows text past the stop string.
    chunks = list(greedy(client, server.model, max_tokens=30, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    # stop_token_ids (a vLLM extra): the first token that is a whole vocabulary entry ends it.
    tok = server.async_engine.tokenizer
    tokens = greedy(client, server.model, max_tokens=30, logprobs=0).choices[0].logprobs.tokens
    first, token_id = next((i, tok.encode(t)[0]) for i, t in enumerate(tokens)
                           if i > 0 and "\ufffd" not in t and len(tok.encode(t)) == 1)
    first = tokens.index(tokens[first])
    out = greedy(client, server.model, max_tokens=30, extra_body={"ignore_eos": True, "stop_token_ids": [token_id]})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].model_extra["stop_reason"] == token_id
    assert out.usage.completion_tokens == first + 1
    # min_tokens keeps the stop token from ending it that early.
    later = greedy(client, server.model, max_tokens=30,
                   extra_body={"ignore_eos": True, "stop_token_ids": [token_id], "min_tokens": first + 2})
    assert later.usage.completion_tokens >= first + 2


def test_event_loop_stays_responsive_while_the_engine_steps(server, slow_steps):
    """Steps of a second run on the engine thread; the event loop keeps answering at once."""
    slow_steps(server.engine, 1.0)
    stream = greedy(server.client(), server.model, max_tokens=50, stream=True)
    next(iter(stream))
    with server.http() as http:
        for _ in range(3):
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            assert http.get("/v1/models").status_code == 200
            assert time.monotonic() - start < 0.5
    stream.close()


def test_depth_reaches_the_engine(server, tiny_llama, cache_dir):
    """Greedy output at depth d over HTTP equals LLM.generate(..., depth=d) offline."""
    client = server.client()
    llm = LLM(tiny_llama, cache_dir=cache_dir, **ENGINE_OPTIONS)
    texts = {}
    for depth, layers in ((2, 2), (4, 4), (0.5, 3), (6, 6)):
        out = greedy(client, server.model, extra_body={"ignore_eos": True, "depth": depth})
        want = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, depth=depth))[0]
        assert out.choices[0].text == want.text
        report = out.model_extra["adadepth"]
        assert report["depth"] == layers and report["num_layers"] == 6 and report["source"] == "request"
        assert out.usage.model_extra["layers_per_token"] == float(layers)
        texts[layers] = out.choices[0].text
    assert len(set(texts.values())) > 1  # depth changes what the model says


def test_quality_without_router_runs_full_depth(server):
    out = greedy(server.client(), server.model, extra_body={"ignore_eos": True, "quality": 0.5})
    report = out.model_extra["adadepth"]
    assert report["quality"] == 0.5 and report["depth"] == 6 and report["source"] == "default"


def test_default_quality_applies_when_the_request_sets_neither(strict_server):
    client = strict_server.client()
    out = client.completions.create(model=strict_server.model, prompt=PROMPT, max_tokens=2)
    assert out.model_extra["adadepth"]["quality"] == 0.9
    explicit = client.completions.create(model=strict_server.model, prompt=PROMPT, max_tokens=2,
                                         extra_body={"depth": 2})
    assert explicit.model_extra["adadepth"]["quality"] is None and explicit.model_extra["adadepth"]["depth"] == 2


def test_tokenize_and_detokenize(server):
    with server.http() as http:
        tok = server.async_engine.tokenizer
        out = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
        assert out["tokens"] == tok.encode(PROMPT) and out["count"] == len(out["tokens"])
        assert out["max_model_len"] == 256 and out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
        chat = http.post("/tokenize", json={"model": server.model,
                                            "messages": [{"role": "user", "content": "hi"}]}).json()
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
        assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False) and chat["token_strs"] is None
        back = http.post("/detokenize", json={"tokens": out["tokens"]}).json()
        assert back == {"prompt": PROMPT}


def test_streaming_long_stop_string_never_leaks(server):
    client = server.client()
    full = greedy(client, server.model, max_tokens=30).choices[0].text
    stop = full[2:12]
    chunks = list(greedy(client, server.model, max_tokens=30, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_penalties_bias_and_min_p_reach_the_engine(server, tiny_llama, cache_dir):
    """The HTTP fields give what SamplingParams with the same values gives offline."""
    client = server.client()
    fields = dict(presence_penalty=0.5, frequency_penalty=1.2, repetition_penalty=1.4, min_p=0.05,
                  logit_bias={"7": 3.0, "11": -100})
    served = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "min_p": fields["min_p"],
                                                   "repetition_penalty": fields["repetition_penalty"]},
                                       presence_penalty=fields["presence_penalty"],
                                       frequency_penalty=fields["frequency_penalty"], logit_bias=fields["logit_bias"])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=0.5,
                            frequency_penalty=1.2, repetition_penalty=1.4, min_p=0.05, logit_bias={7: 3.0, 11: -100})
    expected = LLM(tiny_llama, cache_dir=cache_dir, **ENGINE_OPTIONS).generate(PROMPT, params)[0].text
    plain = greedy(client, server.model, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].text
    assert served.choices[0].text == expected != plain


def test_structured_outputs_on_both_endpoints(server):
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "w": {"enum": ["yes", "no"]}},
              "required": ["n", "w"], "additionalProperties": False}
    client = server.client()
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    value = json.loads(chat.choices[0].message.content)
    assert set(value) == {"n", "w"} and 0 <= value["n"] <= 99 and value["w"] in ("yes", "no")
    assert chat.choices[0].finish_reason == "stop"
    completion = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, n=3, temperature=1,
                                           seed=3, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert {c.text for c in completion.choices} <= {"red", "green"}
    stream = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                       extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", text)
