"""Engine configuration: one dataclass per concern, validated on construction.

The CLI (`adadepth.cli`) builds its flags from these fields, so defaults live here only.
Each field's `metadata["help"]` is its flag's help text.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field


def _default_cache_dir() -> str:
    return os.environ.get("ADADEPTH_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "adadepth"))


def output_dir_for(plan_dir: str, cache_dir: str) -> str:
    """Where a command writes what belongs beside a model's layer order, when the user names no
    path: the plan folder itself, unless it lies inside the installed adadepth package (the
    default model's artifacts), which no command writes into; then a folder of the same name
    under the cache directory."""
    package = os.path.dirname(os.path.abspath(__file__))
    if os.path.commonpath([package, os.path.abspath(plan_dir)]) != package:
        return plan_dir
    return os.path.join(cache_dir, "outputs", os.path.basename(os.path.normpath(plan_dir)))


@dataclass
class ModelConfig:
    model: str = field(default="default", metadata={"help": (
        "'default' (SmolLM2-135M-Instruct with the shipped stochastic-depth artifact), 'default-base' "
        "(the untrained base), a local Hugging Face Llama-family checkpoint folder, or an adadepth artifact folder")})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "where converted models are cached"})
    dtype: str = field(default="auto", metadata={"help": (
        "compute dtype: auto (bfloat16 on GPUs and on CPUs with AVX512-BF16 or AMX, float32 on other CPUs), "
        "float32, bfloat16, float16")})
    weight_dtype: str = field(default="auto", metadata={"help": (
        "float32 models only: float16 rounds every matmul weight to float16 once at load (products and sums "
        "stay float32) so that CPU decode steps read half the bytes (the C++ kernel's float16 copies, on CPUs "
        "with AVX2, FMA and F16C); float32 keeps the weights as loaded; auto: float16 where that kernel "
        "runs, else the compute dtype")})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name reported by the API"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch's default"})
    cpu_weight_prepack: bool = field(default=True, metadata={"help": (
        "on CPU in float32 or bfloat16, run matmuls through oneDNN on weights packed once at load "
        "(faster small-batch decode than the default path)")})
    cpu_kernels: bool = field(default=True, metadata={"help": (
        "on CPU in float32 or bfloat16, run decode attention (read from the paged KV cache in place) and "
        "each layer's norms, RoPE, KV write and SiLU through fused C++ kernels (compiled once per machine "
        "into the cache folder; the PyTorch references run if they cannot be built)")})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype must be auto, float32, bfloat16, float16 or float64, got {self.dtype!r}")
        if self.weight_dtype not in ("auto", "float32", "float16"):
            raise ValueError(f"weight_dtype must be auto, float32 or float16, got {self.weight_dtype!r}")
        if self.weight_dtype != "auto" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"weight_dtype {self.weight_dtype} applies to float32 models; with dtype "
                             f"{self.dtype} leave it auto")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.num_threads < 0:
            raise ValueError("num_threads must be >= 0")

    def resolved_dtype(self) -> str:
        """The dtype the engine runs: `dtype`, with auto decided by the machine (adadepth.hardware)."""
        from adadepth.hardware import auto_dtype

        return auto_dtype(self.device) if self.dtype == "auto" else self.dtype

    def resolved_weight_dtype(self, dtype: str, half_weight_kernel: bool) -> str:
        """The dtype whose values the matmul weights hold, for a model running in `dtype` (resolved),
        `half_weight_kernel` telling whether a decode kernel reads float16 copies of float32 weights."""
        if dtype != "float32":
            if self.weight_dtype != "auto":
                raise ValueError(f"weight_dtype {self.weight_dtype} applies to float32 models; dtype auto "
                                 f"chose {dtype} on this machine")
            return dtype
        if self.weight_dtype == "auto":
            return "float16" if half_weight_kernel else "float32"
        return self.weight_dtype


@dataclass
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    num_kv_tokens: int = field(default=65536, metadata={
        "help": "KV-cache capacity in tokens at full depth, preallocated at start (reduced-depth requests "
                "hold pages for their layers only, so more of their tokens fit)"})
    kv_group_layers: int = field(default=3, metadata={
        "help": "layers per KV page group: a depth-d request holds pages of ceil(d / this) groups (1: per layer; "
                "the number of layers: every request holds every layer's pages)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "share the KV pages of prompt prefixes already computed (at the same depth) between requests, "
                "as vLLM does by default; needs chunked prefill (prefill_chunk_tokens > 0)"})

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_kv_tokens < self.block_size:
            raise ValueError("num_kv_tokens must hold at least one block")
        if self.kv_group_layers < 1:
            raise ValueError("kv_group_layers must be >= 1")

    def num_pages(self, num_groups: int) -> int:
        """Pages for num_kv_tokens at full depth (every group), plus scratch page 0 that padding
        tokens write into; it is never handed out."""
        return num_groups * (self.num_kv_tokens // self.block_size) + 1


@dataclass
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences decoded together in one step"})
    max_num_batched_tokens: int = field(default=4096, metadata={"help": "most prompt tokens in one prefill step"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + output, in tokens"})
    prefill_chunk_tokens: int = field(default=2048, metadata={"help": (
        "chunked prefill: prompt tokens a step that decodes may also carry, so that new prompts join "
        "running streams instead of waiting for a step of their own; scaled up by the sequences "
        "waiting for a prefill per sequence decoding (up to max_num_batched_tokens). Small values "
        "(e.g. 64) bound the pause a long prompt puts on running streams, at some throughput; "
        "0: prompts wait for a step of their own")})

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.prefill_chunk_tokens < 0:
            raise ValueError("prefill_chunk_tokens must be >= 0")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) so that any accepted prompt fits one prefill step")


class DepthPolicyMode(enum.Enum):
    MIN = "min"    # the smallest depth predicted to reach the request's quality
    LOAD = "load"  # full depth while the latency objectives hold, down towards that floor under load


@dataclass
class DepthPolicyConfig:
    depth_policy: str = field(default="min", metadata={"help": (
        "how deep a request that names a quality (or none: --default-quality) runs: 'min', the smallest "
        "depth the router predicts to reach its quality; 'load', full depth while the server meets "
        "--slo-ttft-ms and --slo-itl-ms, going down towards that floor as load rises (an explicit depth "
        "is never changed)")})
    slo_ttft_ms: float = field(default=2000.0, metadata={"help": "time-to-first-token objective of --depth-policy load"})
    slo_itl_ms: float = field(default=100.0, metadata={"help": "time-between-tokens objective of --depth-policy load"})

    def __post_init__(self) -> None:
        choices = [p.value for p in DepthPolicyMode]
        if self.depth_policy not in choices:
            raise ValueError(f"depth_policy must be one of {choices}, got {self.depth_policy!r}")
        if not (self.slo_ttft_ms > 0 and self.slo_itl_ms > 0):
            raise ValueError("slo_ttft_ms and slo_itl_ms must be > 0")

    @property
    def policy(self) -> DepthPolicyMode:
        return DepthPolicyMode(self.depth_policy)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    depth_policy: DepthPolicyConfig = field(default_factory=DepthPolicyConfig)

    def __post_init__(self) -> None:
        if self.cache.num_kv_tokens < self.scheduler.max_model_len:
            raise ValueError(
                f"num_kv_tokens ({self.cache.num_kv_tokens}) must hold at least one request of "
                f"max_model_len ({self.scheduler.max_model_len}) tokens")
