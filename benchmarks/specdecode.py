"""Issue 7's measurements: self-assisted speculative decoding against on-demand loading and lookahead
prefetching, at several batch sizes, on one model under an expert-cache budget; plus the cost-model
simulator's projection of the same comparison for Mixtral-8x7B.

    python benchmarks/specdecode.py --model models/tiny-mixtral [--expert-cache 25%] [--link 25GB/s]
        [--batches 1,4,16,64] [--new-tokens 64] [--repeats 3] [--threads 1] [--project mixtral-8x7b]

Methods run interleaved (A B C A B C ...) after a warm-up, each from a cold expert cache
(`LLM.reset`), greedy on held-out prompts. Throughput counts decoded tokens (all rows; the token
sampled by the prefill excluded) over decode seconds; bytes per token are the decode phase's
host-to-device bytes (a prefill-only run's bytes subtracted). Methods can tie exactly where the
decode's experts fit the cache, since each is then copied once whatever the order (tiny-qwen2moe at
batch 1: greedy text loops over a few experts, and every hot_temporal draft set copies the same
ones). Speculative runs are checked to give the on-demand run's tokens. Writes
benchmarks/results/specdecode-<model>-<link>.json and prints one line per (batch, method), each
naming how the link was timed (CPU: emulated).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from moespec import LLM
from moespec.bench.corpus import heldout_ids
from moespec.bench.routes import record_trace
from moespec.bench.runner import generate_marked
from moespec.bench.simulator import HARDWARE, roofline, simulate
from moespec.bench.synthetic import preset_spec

# name -> (LLM.set_policy arguments, LLM.generate speculative arguments)
METHODS: dict[str, tuple[dict, dict]] = {
    "on-demand": ({}, {}),
    "lookahead": ({"prefetch": "lookahead"}, {}),
    "self-auto": ({}, {"speculative": "self", "gamma": "auto"}),
    "self-g4": ({}, {"speculative": "self", "gamma": 4}),
    "self-g4-router": ({}, {"speculative": "self", "gamma": 4, "draft_affinity": "router"}),
    "self-auto-router": ({}, {"speculative": "self", "gamma": "auto", "draft_affinity": "router"}),
    "self-g4-static": ({}, {"speculative": "self", "gamma": 4, "draft_policy": "static_hot"}),
    "self-g4-random": ({}, {"speculative": "self", "gamma": 4, "draft_policy": "random"}),
}
SPEC_KEYS = ("acceptance_rate", "tokens_per_step", "mean_gamma", "steps", "plain_steps", "draft_substitution_rate",
             "draft_swaps", "draft_fills", "draft_experts_per_layer")


def prompts_for(llm: LLM, batch: int, length: int) -> list[list[int]]:
    ids = heldout_ids(llm)
    step = len(ids) // batch
    return [ids[i * step:i * step + length] for i in range(batch)]


def _sync(llm: LLM) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


def run(llm: LLM, method: str, prompts: list[list[int]], new_tokens: int) -> tuple[dict, list[list[int]]]:
    policy, spec = METHODS[method]
    llm.set_policy(**policy)
    llm.reset()
    out, at_decode = generate_marked(llm, prompts, new_tokens, **spec)  # speculation starts after the prefill
    _sync(llm)
    s = llm.stats().as_dict()
    decoded = s["decoded_tokens"]
    row = {"tokens_per_s": decoded / s["decode_seconds"],
           "ms_per_token_per_row": 1000 * s["decode_seconds"] * len(prompts) / decoded,
           "decode_bytes": s["bytes_moved"] - at_decode.experts.bytes_moved, "decoded_tokens": decoded,
           "hit_rate": s["hit_rate"],
           "stall_share": s["stall_seconds"] / (s["prefill_seconds"] + s["decode_seconds"])}
    if spec:
        row.update({k: s["speculative_decoding"][k] for k in SPEC_KEYS})
    return row, [o.token_ids for o in out]


def measure(llm: LLM, methods: list[str], batches: list[int], prompt_tokens: int, new_tokens: int,
            repeats: int) -> dict:
    results = {}
    for batch in batches:
        prompts = prompts_for(llm, batch, prompt_tokens)
        for method in methods:  # warm-up
            run(llm, method, prompts, 4)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(repeats):
            for method in methods:
                row, tokens[method] = run(llm, method, prompts, new_tokens)
                runs[method].append(row)
        rows = {}
        for method, rs in runs.items():
            row = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            row["tokens_per_s_min"], row["tokens_per_s_max"] = (f(r["tokens_per_s"] for r in rs) for f in (min, max))
            row["bytes_per_token"] = row.pop("decode_bytes") / row["decoded_tokens"]
            row["same_tokens_as_on_demand"] = tokens[method] == tokens["on-demand"]
            rows[method] = row
        base = rows["on-demand"]
        for row in rows.values():
            row["speedup_vs_on_demand"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["bytes_vs_on_demand"] = row["bytes_per_token"] / base["bytes_per_token"] if base["bytes_per_token"] \
                else None
        results[str(batch)] = rows
    llm.reset()
    return results


def alpha_for(tokens_per_step: float, gamma: int) -> float:
    """Per-token acceptance α with (1 − α^(γ+1)) / (1 − α) = tokens_per_step (bisection)."""
    lo, hi = 0.0, 0.999999
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1 - mid ** (gamma + 1)) / (1 - mid) < tokens_per_step:
            lo = mid
        else:
            hi = mid
    return lo


def project(llm: LLM, shape: str, hardware: str, share: float, alphas: dict[str, float], batches: list[int],
            trace_tokens: int, max_gamma: int = 10) -> dict:
    """The simulator's projection for a real shape, replaying this model's routing trace.

    On-demand: `simulate(policy="none")` at batch B. Self-speculation at γ: B·(γ+1) verify tokens
    replayed as one step through the LRU cache (rows far apart in the trace, so fewer shared experts
    than a row's consecutive tokens have: pessimistic), with the cache minus the pinned draft experts
    (lower bound: pinned experts never hit) or the whole cache (upper bound: they always hit),
    plus γ draft passes costed by the roofline (dense part + N resident experts, no copies).
    A row emits (1 − α^(γ+1)) / (1 − α) tokens per step; the best γ ≤ max_gamma is reported.
    """
    spec = preset_spec(shape)
    if (spec.num_experts, spec.top_k) != (llm.spec.num_experts, llm.spec.top_k):
        return {"skipped": f"{shape} has {spec.num_experts} experts top-{spec.top_k}; the traced model has "
                           f"{llm.spec.num_experts} top-{llm.spec.top_k}"}
    llm.set_policy()
    llm.reset()
    trace = record_trace(llm, heldout_ids(llm)[:trace_tokens], hidden=False)
    cost = roofline(spec, HARDWARE[hardware])
    layers, k = spec.num_layers, spec.top_k
    capacity = max(int(layers * spec.num_experts * share), k)
    draft_n = max(1, min(k, (capacity - k) // layers))  # the engine's default for this cache
    pinned = draft_n * layers
    out = {"shape": shape, "hardware": hardware, "cache_share": share, "cache_slots": capacity,
           "draft_experts_per_layer": draft_n, "alphas": alphas, "trace_tokens": len(trace.ids), "batches": {}}
    for batch in batches:
        steps = min(8, len(trace.ids) // (batch * (max_gamma + 1)))
        base = simulate(trace, cost, layers, capacity, "none", batch, steps, k)
        row = {"on_demand_tokens_per_s": batch / base["seconds_per_step"],
               "on_demand_bytes_per_token": base["bytes_per_step"] / batch}
        for bound, cap in (("lower", capacity - pinned), ("upper", capacity)):
            verify = {g: simulate(trace, cost, layers, cap, "none", batch * (g + 1), steps, k) for g in range(1, max_gamma + 1)}
            draft_pass = cost.head_s + layers * (cost.dense_layer_s + draft_n * cost.expert_s(batch * k / draft_n))
            for name, a in alphas.items():
                rate = {g: batch * (1 - a ** (g + 1)) / (1 - a) / (g * draft_pass + v["seconds_per_step"])
                        for g, v in verify.items()}
                g = max(rate, key=rate.get)
                row[f"{name}_{bound}"] = {"gamma": g, "tokens_per_s": rate[g],
                                          "speedup_vs_on_demand": rate[g] / row["on_demand_tokens_per_s"],
                                          "bytes_per_token": verify[g]["bytes_per_step"] / (batch * (1 - a ** (g + 1)) / (1 - a))}
        out["batches"][str(batch)] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--expert-cache", default="25%")
    p.add_argument("--link", default="25GB/s", help="CPU: emulated link bandwidth")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (the machine is shared)")
    p.add_argument("--project", default="mixtral-8x7b", help="shape to project with the simulator ('' = none)")
    p.add_argument("--hardware", default="h100-pcie5")
    p.add_argument("--project-batches", default="1,4,16,64,256")
    p.add_argument("--trace-tokens", type=int, default=24000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = args.device == "cpu"
    llm = LLM(args.model, device=args.device, dtype=args.dtype, expert_cache=args.expert_cache,
              link_bandwidth=args.link if cpu else None)
    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    results = {"model": args.model, "link": llm.link_note(), "expert_cache": args.expert_cache,
               "cache_slots": llm.experts.capacity, "expert_bytes": llm.store.expert_bytes,
               "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
               "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
               "measured": measure(llm, methods, batches, args.prompt_tokens, args.new_tokens, args.repeats)}
    for batch, rows in results["measured"].items():
        for name, r in rows.items():
            extra = f" accept {100 * r['acceptance_rate']:.0f}% {r['tokens_per_step']:.2f} tok/row/step " \
                    f"gamma {r['mean_gamma']:.1f} plain {r['plain_steps']:.0f}/{r['steps']:.0f} steps" \
                if "acceptance_rate" in r else ""
            print(f"[{results['link']}] batch {batch:>3} {name:<15} {r['tokens_per_s']:9.1f} tok/s "
                  f"x{r['speedup_vs_on_demand']:.2f}  {r['bytes_per_token'] / 1e3:9.1f} kB/tok  "
                  f"same tokens {r['same_tokens_as_on_demand']}{extra}")
    if args.project and "self-g4" in methods:
        g4 = [rows["self-g4"] for rows in results["measured"].values()]
        alphas = {"alpha_measured": statistics.median(alpha_for(r["tokens_per_step"], 4) for r in g4),
                  "alpha_specmoe": alpha_for(7.27, 10)}  # SpecMoE: 7.27 tokens per step at γ=10
        results["projection"] = project(llm, args.project, args.hardware, float(args.expert_cache.rstrip("%")) / 100,
                                        alphas, [int(b) for b in args.project_batches.split(",")], args.trace_tokens)
        for batch, row in results["projection"].get("batches", {}).items():
            parts = [f"{key} x{v['speedup_vs_on_demand']:.2f} (gamma {v['gamma']})" for key, v in row.items()
                     if isinstance(v, dict)]
            print(f"[simulated {args.project} on {args.hardware}] batch {batch:>3}: " + ", ".join(parts))
    llm.close()
    link = "gpu" if not cpu else args.link.replace("/", "")
    out = Path(args.out or f"benchmarks/results/specdecode-{Path(args.model).name}-{link}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
