"""Where a batch-1 decode step's time goes when speculation and quantized experts are on (CPU).

1. Guessing against prefetching: on-demand, the lookahead with every guess below the admission
   threshold (it guesses, nothing is copied), and the lookahead, interleaved in one process on an
   emulated link; the difference of the first two is the guess's own cost.
2. Unpacking: one expert of the model unpacked into the compute dtype per format (int8, int4),
   against the same expert's matmul for one token; and, for int4, the expert's gate/up matmul
   of 1, 4 and 16 tokens computed from the codes group by group without a dense weight
   (y = sum_g s_g (x_g . q_g) + o_g sum x_g, in float32) against unpacking then multiplying.
JSON under benchmarks/results/.

    python benchmarks/step_costs.py --model models/tiny-mixtral --link-bandwidth 1GB/s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from moespec import LLM
from moespec.bench.runner import POLICIES, one_run
from moespec.experts.base import ExpertWeights
from moespec.experts.quant import make_quantizer, nibbles
from moespec.model.moe import make_expert_fn

VARIANTS = {"none": POLICIES["none"], "guess-only": {"prefetch": "lookahead", "prefetch_threshold": 1.0},
            "lookahead": POLICIES["lookahead"]}


def guess_cost(llm: LLM, repeats: int, new: int) -> dict:
    prompt = [[(7 * i + 3) % 500 + 3 for i in range(32)]]
    POLICIES.update(VARIANTS)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name in VARIANTS:
            runs[name].append(one_run(llm, name, prompt, new))
    out = {name: {key: statistics.median(r[key] for r in rs) for key in ("seconds_per_step", "stall_share",
                                                                       "bytes_per_token", "hit_rate")}
           for name, rs in runs.items()}
    llm.set_policy(**VARIANTS["lookahead"])
    llm.reset()
    llm.generate(prompt, max_new_tokens=new, ignore_eos=True)
    s = llm.stats()
    out["lookahead"]["guess_seconds_per_step"] = s.speculation.seconds / s.decode.decode_steps
    return out


def unpack_cost(llm: LLM, dtype: torch.dtype, repeats: int = 200) -> dict:
    w = llm.store[llm.store.keys[0]]
    expert_fn = make_expert_fn(llm.spec)
    dense = ExpertWeights(**{name: t.to(dtype) for name, t in w.tensors().items()})
    x = torch.randn(1, llm.spec.hidden_size, dtype=dtype)

    def per_call(fn) -> float:
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    out = {"matmul_one_token_s": per_call(lambda: expert_fn(x, dense))}
    for name in ("int8", "int4"):
        fmt = make_quantizer(name, 0, llm.spec)
        packed, dst = fmt.pack(w), ExpertWeights(**{n: torch.empty_like(t) for n, t in dense.tensors().items()})
        out[f"unpack_{name}_s"] = per_call(lambda: fmt.unpack_into(packed, dst))
    fmt = make_quantizer("int4", 0, llm.spec)
    parts = {p: t for p, t in fmt.pack(w).items() if p.startswith("gate_up.")}
    scratch = torch.empty_like(dense.gate_up)
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, llm.spec.hidden_size, dtype=dtype)
        out[f"int4_gate_up_{tokens}_tokens"] = {
            "unpack_then_matmul_s": per_call(lambda: unpacked_linear(fmt, parts, scratch, x)),
            "grouped_from_codes_s": per_call(lambda: grouped_linear(parts, x))}
    return out


def unpacked_linear(fmt, parts: dict, scratch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What moespec does: dequantize into the compute dtype, then an ordinary matmul."""
    scratch.copy_(fmt.dequantize({p.split(".")[1]: t for p, t in parts.items()}))
    return torch.nn.functional.linear(x, scratch)


def grouped_linear(parts: dict, x: torch.Tensor) -> torch.Tensor:
    """The alternative measured: per-group dot products with the codes, then scales and offsets."""
    scale, offset = parts["gate_up.scale"].float(), parts["gate_up.offset"].float()
    rows, groups = scale.shape
    codes = nibbles(parts["gate_up.q"]).view(rows, groups, -1).float()
    xg = x.float().view(x.shape[0], groups, -1)
    y = (torch.einsum("tgc,rgc->trg", xg, codes) * scale).sum(-1) + xg.sum(-1) @ offset.T
    return y.to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/tiny-mixtral")
    ap.add_argument("--link-bandwidth", default="1GB/s")
    ap.add_argument("--expert-cache", default="25%")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/step-costs-tiny-mixtral.json")
    args = ap.parse_args()
    result = {"machine": "CPU", "link": f"emulated {args.link_bandwidth}", "torch_threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg(), "model": args.model, "expert_cache": args.expert_cache}
    # unpacking first, on a load without a transfer side: nothing else runs while it is timed
    result["unpack_bfloat16"] = unpack_cost(LLM(args.model, progress=False), torch.bfloat16)
    llm = LLM(args.model, expert_cache=args.expert_cache, link_bandwidth=args.link_bandwidth, progress=False)
    result["batch1_guess_cost"] = guess_cost(llm, args.repeats, args.new_tokens)
    result["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, r in result["batch1_guess_cost"].items():
        print(f"{name}: {1000 * r['seconds_per_step']:.2f} ms/step, stall {100 * r['stall_share']:.1f}%, "
              f"{r['bytes_per_token'] / 1e6:.3f} MB/token")
    for what, cost in result["unpack_bfloat16"].items():
        print(what, {k: f"{1000 * v:.3f} ms" for k, v in cost.items()} if isinstance(cost, dict) else f"{1000 * cost:.3f} ms")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
