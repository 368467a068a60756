"""GPU check, model part: a mixed-depth decode step of the default model's architecture versus a
full-depth one, at batch 64, with the batched-skip kernels and with plain PyTorch slicing.

A decode step at batch 64 reads every layer's weights once however many rows run it, and each
row's K and V per layer it runs: the weights make a mixed step cost as much as a full one, the
KV reads scale with the rows. So the step is timed at two context lengths (256 and 2048 prompt
tokens), each eagerly (what the engine does today) and replayed from a CUDA graph (the same GPU
work without Python's launch overhead, which dominated the eager step on an H200, gpu_model_step_h200.json).
At the first length it also times the same rows as one packed prefill forward (compute-bound,
where skipping rows should save FLOP-proportional time). Beside each it prints the roofline
bound of the decode ratio from this card's measured copy bandwidth and bf16 matmul rate.

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


def time_graphed(fn, steps: int) -> dict:
    """Median replay time (ms) of fn captured in a CUDA graph: the same GPU work with no host
    launch overhead in the way (eager decode at this model size is launch-bound)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t0))
        times.sort()
        return {"graph_forward_ms_median": times[len(times) // 2]}
    except Exception as exc:  # a path that cannot be captured is a finding, not a crash
        return {"graph_error": f"{type(exc).__name__}: {exc}"[:300]}


def time_decode(llm, depths: list[int], kernels: bool, prompt_len: int, steps: int, prefill: bool = True) -> dict:
    from adadepth import SamplingParams

    engine = llm.engine
    engine.model.use_batched_skip_kernels = kernels
    g = torch.Generator().manual_seed(0)
    vocab = min(40000, engine.model.config.vocab_size)
    for i, d in enumerate(depths):
        ids = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
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
        graphed = time_graphed(lambda: runner.model(batch, runner.kv_cache), steps) \
            if engine.device.type == "cuda" else {}
    out = {"context_len": round(float(batch.context_lens.float().mean())), **graphed}
    if prefill:  # the same rows as one packed prefill forward (every position again): compute-bound
        pbatch = runner.prepare_tokens([(s, 0, s.num_tokens) for s in seqs], [s.depth for s in seqs])
        pre = []
        with torch.inference_mode():
            for _ in range(max(3, steps // 5)):
                sync()
                t0 = time.perf_counter()
                runner.model(pbatch, runner.kv_cache)
                sync()
                pre.append(1000 * (time.perf_counter() - t0))
        pre.sort()
        out.update(prefill_forward_ms_median=pre[len(pre) // 2], prefill_tokens=int(pbatch.input_ids.numel()))
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
    return {"forward_ms_median": fwd[len(fwd) // 2], "forward_ms_min": fwd[0], "engine_step_ms_median": step_ms[2], **out}


def card_rates(device: str) -> dict | None:
    """This card's device-to-device copy bandwidth (bytes read + written per second) and dense
    bf16 matmul rate (FLOP/s)."""
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


def flop_share(config, depths_full: list[int], depths_mixed: list[int], context_len: int = 0) -> float:
    """FLOPs of the mixed decode step over those of the full one (rows attending to context_len)."""
    from adadepth.benchmarks.depth_bench import flop_model

    layer, head = flop_model(config, context_len)                              # per token
    return (sum(depths_mixed) * layer + len(depths_mixed) * head) / (sum(depths_full) * layer + len(depths_full) * head)


def roofline_decode_ratio(rates: dict, config, depths_full: list[int], depths_mixed: list[int],
                          context_len: int = 0) -> dict:
    """Lower bound of mixed/(share x full) for a decode step whose rows each attend to
    context_len positions, if each layer took max(bytes / bandwidth, FLOPs / matmul rate).

    A layer's bytes: its bf16 weights (read once, however many rows run it) plus the K and V of
    every active row's context (read per row). Its FLOPs: those of its active rows. The weights
    make a mixed step cost as much as a full one; the KV reads and FLOPs scale with the rows, so
    the longer the context, the closer the bound comes to 1."""
    from adadepth.benchmarks.depth_bench import flop_model

    matmul_flops, head_flops = flop_model(config)         # per token
    layer_flops = flop_model(config, context_len)[0]      # attention's products included
    weight_bytes, head_bytes = matmul_flops, head_flops   # bf16: 2 bytes per weight, 2 FLOPs per weight
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_key_value_heads * head_dim * 2 * context_len     # per row: K and V, bf16
    bw, peak = rates["copy_bytes_per_s"], rates["bf16_flop_per_s"]

    def step(depths: list[int]) -> float:
        t = 0.0
        for layer in range(max(depths)):
            rows = sum(d > layer for d in depths)
            t += max((weight_bytes + rows * kv_bytes) / bw, rows * layer_flops / peak)
        return t + max(head_bytes / bw, len(depths) * head_flops / peak)

    share = flop_share(config, depths_full, depths_mixed, context_len)
    return {"context_len": context_len, "roofline_full_us": 1e6 * step(depths_full),
            "roofline_mixed_us": 1e6 * step(depths_mixed),
            "roofline_mixed_over_flop_proportional": step(depths_mixed) / (share * step(depths_full))}


def run(out_dir: str, batch: int = 64, prompt_lens: tuple[int, ...] = (256, 2048), steps: int = 30,
        model: str | None = None, device: str = "cuda") -> dict:
    """model: the real default model (a path to its GGUF, or 'default-base'); when None, the env var
    ADADEPTH_GPU_MODEL, else random weights with its architecture. Each prompt length is one
    context for the decode rows: the longer it is, the more of a step is per-row KV reads."""
    from adadepth import LLM

    model = model or os.environ.get("ADADEPTH_GPU_MODEL")
    folder = model if model else build_checkpoint(tempfile.mkdtemp(prefix="smollm2-random-"))
    max_len = max(prompt_lens) + steps + 32
    llm = LLM(folder, device=device, dtype="bfloat16" if device == "cuda" else "float32", cache_dir=os.environ.get("ADADEPTH_CACHE_DIR", tempfile.mkdtemp()),
              num_kv_tokens=batch * max_len + 64, max_model_len=max_len,
              max_num_batched_tokens=batch * max_len, max_num_seqs=batch)
    from adadepth.model.depth_plan import DepthPlan

    L = llm.num_layers
    llm.engine.model.plan = DepthPlan.early_exit(L)
    llm.engine.model.rank = list(range(L))
    config = llm.engine.model.config
    full = [L] * batch
    mixed = [L] * (batch // 2) + [L // 2] * (batch - batch // 2)
    rates = card_rates(device)
    results = {}
    for prompt_len in prompt_lens:
        for kernels in (True, False):
            name = f"{'batched_skip_kernels' if kernels else 'pytorch_slicing'}@{prompt_len}"
            first = prompt_len == prompt_lens[0]
            f = time_decode(llm, full, kernels, prompt_len, steps, prefill=first)
            m = time_decode(llm, mixed, kernels, prompt_len, steps, prefill=first)
            share = flop_share(config, full, mixed, f["context_len"])
            ratio = m["forward_ms_median"] / (share * f["forward_ms_median"])
            r = {"prompt_len": prompt_len, "full_depth": f, "mixed_depth": m, "flop_share": share,
                 "mixed_over_flop_proportional": ratio, "target_max": 1.1, "passed": ratio <= 1.1}
            line = (f"[model step] {name:27s} ctx {f['context_len']:5d}  full {f['forward_ms_median']:.3f} ms  "
                    f"mixed {m['forward_ms_median']:.3f} ms  FLOP share {share:.3f}  mixed/(share*full) = {ratio:.2f}  "
                    f"(engine step full {f['engine_step_ms_median']:.2f} ms, mixed {m['engine_step_ms_median']:.2f} ms)")
            if "graph_forward_ms_median" in f and "graph_forward_ms_median" in m:
                r["graph_mixed_over_flop_proportional"] = m["graph_forward_ms_median"] / (share * f["graph_forward_ms_median"])
                line += (f"; CUDA graph full {f['graph_forward_ms_median']:.3f} ms mixed {m['graph_forward_ms_median']:.3f} ms "
                         f"-> {r['graph_mixed_over_flop_proportional']:.2f}")
            elif "graph_error" in f or "graph_error" in m:
                line += f"; CUDA graph: {f.get('graph_error') or m.get('graph_error')}"
            if first:
                r["prefill_mixed_over_flop_proportional"] = m["prefill_forward_ms_median"] / (share * f["prefill_forward_ms_median"])
                line += (f"; packed prefill ({f['prefill_tokens']} tokens) full {f['prefill_forward_ms_median']:.2f} ms "
                         f"mixed {m['prefill_forward_ms_median']:.2f} ms -> {r['prefill_mixed_over_flop_proportional']:.2f}")
            if rates is not None:
                r["roofline"] = roofline_decode_ratio(rates, config, full, mixed, f["context_len"])
                line += f"; roofline bound {r['roofline']['roofline_mixed_over_flop_proportional']:.2f}"
            results[name] = r
            print(line, flush=True)
    if rates is not None:
        results["card_rates"] = rates
        print(f"[model step] card: copy {rates['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
              f"{rates['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    out = {"model": model or "random weights, SmolLM2-135M architecture", "batch": batch, "prompt_lens": list(prompt_lens),
           "num_layers": L, "mixed_depths": "half 30, half 15",
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "results": results}
    with open(os.path.join(out_dir, "gpu_model_step.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    run(ap.parse_args().out)
