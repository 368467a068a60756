"""GPU check, model part: a mixed-depth decode step of the default model's architecture versus a
full-depth one, at batch 64, with the batched-skip kernels and with plain PyTorch slicing.

Beside the decode step (64 rows: every layer's weights are read once per step however many rows
run it, so a layer costs about the same with 32 active rows as with 64), it times the same
mixed-vs-full comparison on a packed prefill forward of the same sequences (64 x ~256 tokens per
layer: compute-bound, where skipping rows should save FLOP-proportional time), and prints the
roofline bound of the decode ratio from this card's measured copy bandwidth and bf16 matmul rate.

Runs on a GPU machine without the real weights (SmolLM2-135M's config, random weights: step time
does not depend on weight values). Called by benchmarks/gpu_check.py as `run(out_dir)`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)


def build_checkpoint(folder: str) -> str:
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny_model import build_tokenizer

    build_tokenizer(folder)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def time_decode(llm, depths: list[int], kernels: bool, prompt_len: int, steps: int) -> dict:
    from adadepth import SamplingParams

    engine = llm.engine
    engine.model.use_batched_skip_kernels = kernels
    g = torch.Generator().manual_seed(0)
    for i, d in enumerate(depths):
        ids = torch.randint(10, 40000, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{kernels}-{i}-{d}-{time.monotonic_ns()}", ids,
                           SamplingParams(max_tokens=steps + 12, temperature=0, ignore_eos=True, depth=d))
    engine.step()  # prefill
    for _ in range(5):  # warm-up decode steps (kernel compile/load, allocator)
        engine.step()
    # Model forward alone (what the kernels change) and the whole engine step (what users see).
    runner = engine.runner
    seqs = sorted(list(engine.scheduler.running), key=lambda s: -s.depth)
    batch = runner.prepare_decode(seqs)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    fwd = []
    with torch.inference_mode():
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            runner.model(batch, runner.kv_cache)
            sync()
            fwd.append(1000 * (time.perf_counter() - t0))
    # The same rows as one packed prefill forward (every position again): compute-bound layers.
    pbatch = runner.prepare_prefill(seqs)
    pre = []
    with torch.inference_mode():
        for _ in range(max(3, steps // 5)):
            sync()
            t0 = time.perf_counter()
            runner.model(pbatch, runner.kv_cache)
            sync()
            pre.append(1000 * (time.perf_counter() - t0))
    pre.sort()
    step_ms = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        step_ms.append(1000 * (time.perf_counter() - t0))
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    fwd.sort()
    step_ms.sort()
    return {"forward_ms_median": fwd[len(fwd) // 2], "forward_ms_min": fwd[0], "engine_step_ms_median": step_ms[2],
            "prefill_forward_ms_median": pre[len(pre) // 2], "prefill_tokens": int(pbatch.input_ids.numel())}


def card_rates(device: str) -> dict | None:
    """This card's device-to-device copy bandwidth (bytes/s) and dense bf16 matmul rate (FLOP/s)."""
    if device != "cuda":
        return None
    buf = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")                  # 256 MiB
    dst = torch.empty_like(buf)
    mat = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn, work in (("copy_bytes_per_s", lambda: dst.copy_(buf), 2 * buf.numel()),
                           ("bf16_flop_per_s", lambda: mat @ mat, 2 * 8192 ** 3)):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        out[name] = 10 * work / (time.perf_counter() - t0)
    return out


def roofline_decode_ratio(rates: dict, config, depths_full: list[int], depths_mixed: list[int]) -> dict:
    """Lower bound of mixed/(share x full) for a decode step if each layer took
    max(weight bytes / bandwidth, active-row FLOPs / matmul rate) and the LM head likewise."""
    from adadepth.benchmarks.depth_bench import flop_model

    layer_flops, head_flops = flop_model(config)          # per token
    layer_bytes, head_bytes = layer_flops, head_flops     # bf16: 2 bytes per weight, 2 FLOPs per weight
    bw, peak = rates["copy_bytes_per_s"] / 2, rates["bf16_flop_per_s"]   # copy moves bytes twice

    def step(depths: list[int]) -> float:
        num_layers = max(depths)
        t = sum(max(layer_bytes / bw, sum(d > layer for d in depths) * layer_flops / peak) for layer in range(num_layers))
        return t + max(head_bytes / bw, len(depths) * head_flops / peak)

    share = (sum(depths_mixed) * layer_flops + len(depths_mixed) * head_flops) / (
        sum(depths_full) * layer_flops + len(depths_full) * head_flops)
    return {"roofline_full_us": 1e6 * step(depths_full), "roofline_mixed_us": 1e6 * step(depths_mixed),
            "roofline_mixed_over_flop_proportional": step(depths_mixed) / (share * step(depths_full))}


def run(out_dir: str, batch: int = 64, prompt_len: int = 256, steps: int = 30, model: str | None = None,
        device: str = "cuda") -> dict:
    """model: the real default model (a path to its GGUF, or 'default-base'); when None, the env var
    ADADEPTH_GPU_MODEL, else random weights with its architecture."""
    from adadepth import LLM
    from adadepth.benchmarks.depth_bench import flop_model

    model = model or os.environ.get("ADADEPTH_GPU_MODEL")
    folder = model if model else build_checkpoint(tempfile.mkdtemp(prefix="smollm2-random-"))
    llm = LLM(folder, device=device, dtype="bfloat16" if device == "cuda" else "float32", cache_dir=os.environ.get("ADADEPTH_CACHE_DIR", tempfile.mkdtemp()),
              num_kv_tokens=batch * (prompt_len + 64) * 2, max_model_len=prompt_len + 64,
              max_num_batched_tokens=batch * (prompt_len + 64), max_num_seqs=batch)
    from adadepth.model.depth_plan import DepthPlan

    llm.engine.model.plan = DepthPlan.early_exit(30)
    llm.engine.model.rank = list(range(30))
    L = llm.num_layers
    layer_flops, head_flops = flop_model(llm.engine.model.config)
    full = [L] * batch
    mixed = [L] * (batch // 2) + [L // 2] * (batch - batch // 2)
    share = (sum(mixed) * layer_flops + batch * head_flops) / (sum(full) * layer_flops + batch * head_flops)
    results = {}
    for kernels in (True, False):
        name = "batched_skip_kernels" if kernels else "pytorch_slicing"
        f = time_decode(llm, full, kernels, prompt_len, steps)
        m = time_decode(llm, mixed, kernels, prompt_len, steps)
        ratio = m["forward_ms_median"] / (share * f["forward_ms_median"])
        prefill_ratio = m["prefill_forward_ms_median"] / (share * f["prefill_forward_ms_median"])
        results[name] = {"full_depth": f, "mixed_depth": m, "flop_share": share,
                         "mixed_over_flop_proportional": ratio, "target_max": 1.1, "passed": ratio <= 1.1,
                         "prefill_mixed_over_flop_proportional": prefill_ratio}
        print(f"[model step] {name:22s} full {f['forward_ms_median']:.3f} ms  mixed {m['forward_ms_median']:.3f} ms  "
              f"FLOP share {share:.3f}  mixed/(share*full) = {ratio:.2f}  (engine step full "
              f"{f['engine_step_ms_median']:.2f} ms, mixed {m['engine_step_ms_median']:.2f} ms); packed prefill "
              f"({f['prefill_tokens']} tokens) full {f['prefill_forward_ms_median']:.2f} ms mixed "
              f"{m['prefill_forward_ms_median']:.2f} ms, mixed/(share*full) = {prefill_ratio:.2f}", flush=True)
    rates = card_rates(device)
    if rates is not None:
        results["roofline"] = {**rates, **roofline_decode_ratio(rates, llm.engine.model.config, full, mixed)}
        print(f"[model step] roofline: decode mixed/(share*full) >= "
              f"{results['roofline']['roofline_mixed_over_flop_proportional']:.2f} on this card at batch {batch} "
              f"(copy {rates['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul {rates['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s)",
              flush=True)
    out = {"model": model or "random weights, SmolLM2-135M architecture", "batch": batch, "prompt_len": prompt_len, "num_layers": L, "mixed_depths": "half 30, half 15",
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "results": results}
    with open(os.path.join(out_dir, "gpu_model_step.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    run(ap.parse_args().out)
