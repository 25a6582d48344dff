"""The matmul floor of a batch-1 decode step: what the step's weight matmuls alone cost, with no
Python, no other op and no sampling. It bounds from below what any engine (moespec eager or
compiled, llama.cpp) can reach on this machine, so the gap of a measured step to it is overhead.

Every weight matrix one decode step multiplies with is listed from the loaded model (per layer:
stacked q/k/v, output projection, router, shared expert and its gate where the layer has them, the
top-k routed experts; then the LM head), and each shape is timed as `F.linear` on a one-token input,
cycling over copies so that no matrix is reused while still in the core's own caches. The sum is the
floor. JSON under benchmarks/results/ with the thread count and load average.

    python benchmarks/matmul_floor.py --models models/tiny-mixtral,models/tiny-qwen2moe
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moespec import LLM
from moespec.model.moe import MoE


def step_matrices(llm: LLM) -> list[tuple[int, int]]:
    """The [out, in] shape of every weight matrix one batch-1 decode step multiplies with."""
    expert = llm.store[llm.store.keys[0]]
    shapes = []
    for block in llm.model.layers:
        attn, mlp = block.self_attn, block.mlp
        shapes += [tuple(attn.qkv_weight.shape), tuple(attn.o_proj.weight.shape)]
        if isinstance(mlp, MoE):
            shapes.append(tuple(mlp.gate.weight.shape))
            if mlp.shared_expert is not None:
                shapes += [tuple(mlp.shared_expert.gate_up.shape), tuple(mlp.shared_expert.down_proj.weight.shape)]
            if mlp.shared_expert_gate is not None:
                shapes.append(tuple(mlp.shared_expert_gate.weight.shape))
            shapes += [tuple(expert.gate_up.shape), tuple(expert.down.shape)] * llm.spec.top_k
        else:
            shapes += [tuple(mlp.gate_up.shape), tuple(mlp.down_proj.weight.shape)]
    head = llm.model.embed_tokens.weight if llm.model.lm_head is None else llm.model.lm_head.weight
    return shapes + [tuple(head.shape)]


def linear_us(shape: tuple[int, int], dtype: torch.dtype, copies: int = 24, rounds: int = 20) -> float:
    """Median µs of `F.linear` of one token with an [out, in] weight, over `copies` weights in turn."""
    weights = [torch.randn(*shape).to(dtype) for _ in range(copies)]
    x = torch.randn(1, shape[1]).to(dtype)
    for w in weights:
        F.linear(x, w)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        times.append((time.perf_counter() - start) / copies)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models/tiny-mixtral,models/tiny-qwen2moe")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/matmul-floor-cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": args.threads, "dtype": args.dtype,
              "load_average_before": os.getloadavg(), "models": {}}
    for path in args.models.split(","):
        llm = LLM(path, dtype=args.dtype, progress=False)
        shapes = step_matrices(llm)
        per_shape = {shape: linear_us(shape, llm.dtype) for shape in set(shapes)}
        floor_ms = sum(per_shape[s] for s in shapes) / 1000
        mb = sum(a * b for a, b in shapes) * llm.dtype.itemsize / 1e6
        result["models"][Path(path).name] = {
            "matrices": len(shapes), "weight_mb_per_step": mb, "floor_ms_per_step": floor_ms,
            "linear_us": {f"{a}x{b}": round(us, 2) for (a, b), us in sorted(per_shape.items())}}
        print(f"{Path(path).name}: {len(shapes)} matrices, {mb:.1f} MB per step, matmul floor {floor_ms:.2f} ms")
        llm.close()
    result["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
