"""adadepth: adaptive-depth LLM inference (per-request depth, mixed-depth batching)."""
from adadepth.llm import LLM
from adadepth.outputs import CompletionOutput, DepthDecision, RequestOutput
from adadepth.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "DepthDecision"]
