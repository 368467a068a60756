"""Offline inference in vLLM's words: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence as Seq

from tqdm import tqdm

from adadepth.config import CacheConfig, DepthPolicyConfig, EngineConfig, ModelConfig, SchedulerConfig
from adadepth.engine.llm_engine import LLMEngine
from adadepth.outputs import RequestOutput, merge_delta
from adadepth.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "default", *, engine_config: EngineConfig | None = None,
                 depth_router=None, **kwargs):
        """kwargs are fields of ModelConfig, CacheConfig, SchedulerConfig or DepthPolicyConfig (dtype=,
        max_model_len=, ...)."""
        if engine_config is None:
            groups = {}
            for cls in (ModelConfig, CacheConfig, SchedulerConfig, DepthPolicyConfig):
                names = {f.name for f in dataclasses.fields(cls)}
                groups[cls] = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
            if kwargs:
                raise TypeError(f"unknown LLM options: {sorted(kwargs)}")
            groups[ModelConfig].model = model
            engine_config = EngineConfig(groups[ModelConfig], groups[CacheConfig], groups[SchedulerConfig],
                                         groups[DepthPolicyConfig])
        self.engine = LLMEngine(engine_config, depth_router=depth_router)
        self._ids = itertools.count()

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        Every prompt is validated before any work starts, so bad input raises and runs nothing.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        engine = self.engine
        encoded = [engine.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids, p in zip(encoded, params_list):
            engine.validate(ids, p)
        # n > 1: one engine request per sample (seed + i keeps seeded runs reproducible).
        groups: list[list[str]] = []
        for prompt, ids, p in zip(prompts, encoded, params_list):
            ids_for_prompt = []
            for i in range(p.n):
                sub = dataclasses.replace(p, n=1, seed=None if p.seed is None else p.seed + i)
                rid = f"llm-{next(self._ids)}"
                engine.add_request(rid, ids, sub)
                engine.seqs[rid].prompt = prompt if isinstance(prompt, str) else None
                ids_for_prompt.append(rid)
            groups.append(ids_for_prompt)
        whole: dict[str, RequestOutput] = {}
        finished: dict[str, RequestOutput] = {}
        total = sum(len(g) for g in groups)
        with tqdm(total=total, disable=not use_tqdm, desc="generate") as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():  # each holds what is new: fold into the whole output
                    whole[out.request_id] = merge_delta(whole.get(out.request_id), out)
                    if out.finished:
                        finished[out.request_id] = whole.pop(out.request_id)
                        bar.update(1)
        results = []
        for rids in groups:
            first = finished[rids[0]]
            outputs = []
            for i, rid in enumerate(rids):
                completion = finished[rid].outputs[0]
                completion.index = i
                outputs.append(completion)
            results.append(dataclasses.replace(first, outputs=outputs))
        return results

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
