"""Configuration of `adadepth train`: run/optimisation settings and the adapter (LoRA) settings.

The drop schedule (`DropConfig`) and the losses (`LossConfig`) have their own dataclasses next
to the code that uses them; the CLI builds one flag per field of all four.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from adadepth.config import _default_cache_dir
from adadepth.training.data import DEFAULT_DATA_DIR

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LAYER_ORDER_SPECIAL = ("auto", "early-exit")


@dataclass
class TrainConfig:
    model: str = field(default="default-base", metadata={
        "help": "base model: default-base, a .gguf file or a Hugging Face checkpoint folder"})
    base_model_name: str | None = field(default=None, metadata={
        "help": "what the artifact records as base_model (default: --model; absolute path for local paths)"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "where converted models are cached"})
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "the shared data folder (train split is used)"})
    train_file: str | None = field(default=None, metadata={
        "help": "train on this JSONL (messages/prompt + completion, e.g. from `adadepth distill-data`) instead "
                "of the shared data's reference answers; prompts in the held-out/calibration splits are dropped"})
    output: str = field(default="runs/stochastic-depth", metadata={"help": "artifact folder to write"})
    layer_order: str = field(default="auto", metadata={
        "help": "order for 'order' drops: auto (the model's calibrated order, else calibrate now), "
                "early-exit, or a folder holding layer_order.json"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={
        "help": "float32, or bfloat16 (autocast over fp32 master weights)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per sequence (answers are cut to fit)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "training time budget; stop cleanly and save when spent (0: none)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_fraction: float = field(default=0.05, metadata={"help": "linear warmup, then cosine decay to a tenth of lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    max_examples: int = field(default=0, metadata={"help": "use only this many training examples (0: all)"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a resumable checkpoint every N steps (0: off)"})
    resume: str | None = field(default=None, metadata={
        "help": "checkpoint folder to resume from, or 'auto' for the newest under --output"})
    init_adapter: str | None = field(default=None, metadata={
        "help": "artifact folder whose LoRA weights start this run (a new run continuing a trained model, e.g. "
                "adadepth/artifacts/smollm2-135m-sd; same --model, --lora-rank and targets; new optimizer and schedule)"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines (train_log.jsonl)"})
    profile_steps: int = field(default=3, metadata={
        "help": "print a synchronised per-phase time breakdown for this many steps after the first"})
    op_profile: str | None = field(default=None, metadata={
        "help": "write a torch.profiler table (ops by device and host time) of the profiled steps to this file"})
    seed: int = field(default=0, metadata={"help": "seed for data order, drops and LoRA init"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch's default"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_seq_len < 16:
            raise ValueError("max_seq_len must be >= 16")
        if min(self.max_minutes, self.checkpoint_every, self.max_examples, self.profile_steps) < 0:
            raise ValueError("max_minutes, checkpoint_every, max_examples and profile_steps must be >= 0")
        if self.init_adapter and self.resume:
            raise ValueError("--init-adapter starts a new run from trained weights; --resume continues a checkpoint: pick one")
        if self.lr <= 0 or not 0 <= self.warmup_fraction < 1 or self.grad_clip < 0:
            raise ValueError("need lr > 0, warmup_fraction in [0, 1), grad_clip >= 0")


@dataclass
class AdapterConfig:
    full_finetune: bool = field(default=False, metadata={"help": "train all weights instead of LoRA"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch"})
    lora_targets: str = field(default=LORA_TARGETS, metadata={"help": "comma-separated module names to adapt"})
    lora_save_dtype: str = field(default="float32", metadata={
        "help": "dtype of the saved adapter weights: float32, float16 or bfloat16 (halves the file)"})

    def __post_init__(self) -> None:
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need lora_rank >= 1, lora_alpha > 0, lora_dropout in [0, 1)")
        if not self.target_modules:
            raise ValueError("lora_targets must name at least one module")
        if self.lora_save_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError("lora_save_dtype must be float32, float16 or bfloat16")

    @property
    def target_modules(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]
