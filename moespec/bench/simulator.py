"""`moespec simulate`: a discrete-event cost model of offloaded MoE decoding.

Two resources: a compute stream and a copy link, each doing one thing at a time. A recorded
routing trace (and a prefetch policy's recorded guesses) says which experts every token needs at
every layer; hardware constants say how long a layer's dense part, an expert's compute and an
expert's copy take. The simulator replays decode steps through an expert cache with the same
rules as moespec's ExpertCache (experts the running layer needs are never evicted; the victim is
chosen by the engine's eviction policy, LFRU by default) and reports time and bytes per token for
each policy and cache size:

- "none": on-demand. When layer L routes, its missing experts are queued on the link; each runs
  as soon as it has landed (resident ones first).
- "lookahead": as "none", and once layer L's missing experts are on the link, the guessed experts
  of the next MoE layer are queued behind them (a later demand copy waits for queued guesses:
  the simulated link is first come, first served, where moespec's CPU link lets demand overtake,
  even a guess already on the link).
- "speculative": as "lookahead", but layer L+1 runs the guessed top-k experts instead of the
  true ones (exactness traded for no demand misses).

Decoding at small batch is memory-bound, so compute times follow a roofline:
time = max(FLOPs / peak, bytes read / memory bandwidth) + a fixed per-kernel overhead. On the CPU
the constants are measured instead (`measure_cpu`, `cpu_cost`), and the model is checked against a real
`moespec bench` run: the relative error per policy is the calibration error.

Assumption: the trace's model and the simulated shape have the same experts per layer and top-k;
shape layer l replays trace layer l mod (trace layers). Batch rows are taken from trace tokens
far apart, step after step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import MoespecError
from ..experts.eviction import make_policy
from ..experts.transfer import CpuTransfers
from ..model.moe import make_expert_fn
from ..spec import ModelSpec
from ..speculate.traces import RoutingTrace


@dataclass(frozen=True)
class Hardware:
    name: str
    link_bytes_per_s: float  # host -> device, one way, achieved
    copy_overhead_s: float  # fixed cost per expert copy
    memory_bytes_per_s: float  # device memory bandwidth (compute side)
    flops_per_s: float  # dense bf16 peak
    kernel_overhead_s: float  # fixed cost per kernel group (a layer's dense part, one expert)


HARDWARE = {
    # achieved PCIe 5.0 x16 ~ 50 GB/s (ANCHORS.md); H100 PCIe: 2.0 TB/s HBM2e, ~756 TFLOP/s bf16 dense
    "h100-pcie5": Hardware("h100-pcie5", 50e9, 10e-6, 2.0e12, 756e12, 10e-6),
    # A6000: PCIe 4.0 ~ 25 GB/s, 768 GB/s GDDR6, ~155 TFLOP/s bf16 dense
    "a6000-pcie4": Hardware("a6000-pcie4", 25e9, 10e-6, 768e9, 155e12, 10e-6),
    # RTX 4090: PCIe 4.0 ~ 25 GB/s, 1.0 TB/s, ~165 TFLOP/s bf16 dense
    "rtx4090-pcie4": Hardware("rtx4090-pcie4", 25e9, 10e-6, 1.0e12, 165e12, 10e-6),
}


@dataclass(frozen=True)
class CostModel:
    """Seconds for the pieces of a decode step of one model shape on one machine."""

    dense_layer_s: float  # attention, norms, router, shared expert of one layer
    head_s: float  # embedding + final norm + LM head, once per step
    expert_fixed_s: float  # one expert call, independent of its token count
    expert_per_token_s: float  # plus this per token routed to it
    copy_s: float  # one expert across the link
    expert_bytes: int

    def expert_s(self, tokens: int) -> float:
        return self.expert_fixed_s + self.expert_per_token_s * tokens


def roofline(spec: ModelSpec, hw: Hardware, bytes_per_param: int = 2) -> CostModel:
    """Decode costs of a model shape on a GPU from its sizes (weights read once per step)."""
    h, d = spec.hidden_size, spec.head_dim
    attn = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    dense = attn + h * spec.num_experts + 3 * h * spec.shared_expert_intermediate_size
    expert = spec.expert_params
    return CostModel(
        dense_layer_s=dense * bytes_per_param / hw.memory_bytes_per_s + hw.kernel_overhead_s,
        head_s=spec.vocab_size * h * bytes_per_param / hw.memory_bytes_per_s + hw.kernel_overhead_s,
        expert_fixed_s=expert * bytes_per_param / hw.memory_bytes_per_s + hw.kernel_overhead_s,
        expert_per_token_s=2 * expert / hw.flops_per_s,
        copy_s=expert * bytes_per_param / hw.link_bytes_per_s + hw.copy_overhead_s,
        expert_bytes=expert * bytes_per_param,
    )


def _time(fn, repeats: int = 30) -> float:
    """Fastest of `repeats` calls: robust to other work sharing the CPU."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class CpuTimings:
    expert_fixed_s: float
    expert_per_token_s: float
    copy_s: float


def measure_cpu(llm) -> CpuTimings:
    """Expert call times on the model's own weights (a + b·tokens, fitted over 1..64 tokens) and the
    cost of one expert copy: the median round trip through moespec's own (emulated) link."""
    key = llm.store.keys[0]
    w, packed, expert_fn = llm.store[key], llm.store.packed(key), make_expert_fn(llm.spec)
    counts = [1, 4, 16, 64]
    inputs = {n: torch.randn(n, llm.spec.hidden_size, dtype=llm.dtype) for n in counts}
    for _ in range(3):  # warm the thread pool before timing
        _time(lambda: expert_fn(inputs[64], w))
    times = [_time(lambda n=n: expert_fn(inputs[n], w)) for n in counts]
    per_token, fixed = np.polyfit(counts, times, 1)
    link = CpuTransfers(llm.link_bandwidth)
    roundtrips = []
    for _ in range(30):  # the whole copy as compute sees it: bookkeeping, emulated wire, landing
        start = time.perf_counter()
        link.wait(link.copy(lambda: packed, {}, "calibration", 0), 0)
        roundtrips.append(time.perf_counter() - start)
    link.close()
    return CpuTimings(max(float(fixed), 0.0), max(float(per_token), 0.0), statistics.median(roundtrips))


def cpu_cost(llm, timings: CpuTimings, compute_ms_per_step: float, batch: int, trace: RoutingTrace) -> CostModel:
    """The CPU cost model of one batch size: measured expert and copy times, and as the dense part
    of a layer what is left of a measured all-resident decode step (`moespec bench`'s reference)."""
    expert_work = statistics.mean(
        sum(timings.expert_fixed_s + timings.expert_per_token_s * n for n in _tokens_per_expert(trace, j, rows).values())
        for rows in _batches(trace, batch, 8) for j in range(len(trace.moe_layers)))
    layers = llm.spec.num_layers
    dense = max(compute_ms_per_step / 1000 / layers - expert_work * len(trace.moe_layers) / layers, 0.0)
    return CostModel(dense_layer_s=dense, head_s=0.0, expert_fixed_s=timings.expert_fixed_s,
                     expert_per_token_s=timings.expert_per_token_s, copy_s=timings.copy_s,
                     expert_bytes=llm.store.expert_bytes)


def _batches(trace: RoutingTrace, batch: int, steps: int) -> list[np.ndarray]:
    """Row indices of the trace for each decode step: `batch` streams far apart, advancing together."""
    n = len(trace.ids)
    stride = max(n // batch, 1)
    if steps > stride:
        raise MoespecError(f"trace of {n} tokens is too short for {steps} steps at batch {batch}")
    return [np.arange(batch) * stride + s for s in range(steps)]


def _tokens_per_expert(trace: RoutingTrace, layer: int, rows: np.ndarray, ids: np.ndarray | None = None) -> dict[int, int]:
    chosen = trace.ids[rows, layer] if ids is None else ids
    values, counts = np.unique(chosen[chosen >= 0], return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def simulate(trace: RoutingTrace, cost: CostModel, num_layers: int, capacity: int, policy: str, batch: int,
             steps: int, top_k: int, eviction: str = "lfru") -> dict:
    """Replay `steps` decode steps; return seconds and bytes per step, hit rate, stall share."""
    if policy != "none" and trace.guesses is None:
        raise MoespecError(f"policy {policy!r} needs a trace recorded with its guesses (moespec trace --prefetch lookahead)")
    n_trace = len(trace.moe_layers)
    cache: dict[tuple[int, int], float] = {}  # key -> time its copy lands
    order = make_policy(eviction, capacity)
    now = link = 0.0
    copies = hits = misses = 0
    stall = 0.0

    def copy(key: tuple[int, int], at: float, protect: set, demand: bool) -> bool:
        """Queue `key` on the link at time `at`, evicting the policy's victim among the experts
        that are not protected; a prefetch only evicts landed experts, a demand load waits for
        the first to land if none has."""
        nonlocal link, copies
        if len(cache) >= capacity:
            victim = order.victim(lambda k: k not in protect and cache[k] <= at)
            candidates = [k for k in cache if k not in protect] if victim is None and demand else []
            if candidates:
                victim = min(candidates, key=cache.__getitem__)
                at = max(at, cache[victim])
            if victim is None:
                return False
            del cache[victim]
            order.forget(victim)
        link = max(link, at) + cost.copy_s
        cache[key] = link
        order.admit(key, guess=not demand)
        copies += 1
        return True

    for rows in _batches(trace, batch, steps):
        now += cost.head_s
        for layer in range(num_layers):
            j = layer % n_trace
            now += cost.dense_layer_s
            order.layer_runs(layer)
            run_ids = trace.guesses[rows, j][:, :top_k] if policy == "speculative" and layer > 0 else None
            work = _tokens_per_expert(trace, j, rows, run_ids)
            keys = [(layer, e) for e in work]
            remaining = [k for k in keys if k in cache] + [k for k in keys if k not in cache]  # hits first
            hits += sum(k in cache for k in keys)
            misses += sum(k not in cache for k in keys)
            queue = [k for k in remaining if k not in cache]

            def issue(at: float) -> None:
                while queue and copy(queue[0], at, set(remaining), demand=True):
                    queue.pop(0)

            issue(now)
            if policy in ("lookahead", "speculative") and layer + 1 < num_layers and not queue:
                # guesses for the next layer go on the link after this layer's own misses
                guess = trace.guesses[rows, (layer + 1) % n_trace]
                for e, _ in sorted(_tokens_per_expert(trace, j, rows, guess).items(), key=lambda x: -x[1]):
                    if (layer + 1, e) not in cache:
                        copy((layer + 1, e), now, set(keys), demand=False)
            while remaining:
                key = remaining[0]
                if key not in cache:
                    issue(now)
                    if key not in cache:
                        raise MoespecError("the simulated cache cannot hold one expert")
                start = max(now, cache[key])
                stall += start - now
                now = start + cost.expert_s(work[key[1]])
                order.touch(key)
                remaining.pop(0)
                issue(now)
    return {"seconds_per_step": now / steps, "bytes_per_step": copies * cost.expert_bytes / steps,
            "hit_rate": hits / max(hits + misses, 1), "stall_share": stall / now if now else 0.0}


def project(trace: RoutingTrace, cost: CostModel, spec: ModelSpec, cache_shares: list[float], policies: list[str],
            batch_sizes: list[int], steps: int, eviction: str = "lfru") -> dict:
    """Every (cache share, batch, policy) of a shape; time per token in ms and ratio to on-demand."""
    if trace.num_experts != spec.num_experts or trace.ids.shape[2] != spec.top_k:
        raise MoespecError(f"trace has {trace.num_experts} experts top-{trace.ids.shape[2]}; the shape needs "
                           f"{spec.num_experts} experts top-{spec.top_k}")
    total = spec.num_layers * spec.num_experts
    out: dict = {"cost_model": asdict(cost), "layers": spec.num_layers, "results": {}}
    for share in cache_shares:
        capacity = max(int(total * share), spec.top_k)
        for batch in batch_sizes:
            rows = {p: simulate(trace, cost, spec.num_layers, capacity, p, batch, steps, spec.top_k, eviction)
                    for p in policies}
            base = rows.get("none")
            for r in rows.values():
                r["ms_per_token"] = 1000 * r["seconds_per_step"]
                if base:
                    r["speedup_vs_on_demand"] = base["seconds_per_step"] / r["seconds_per_step"]
            out["results"][f"{share:.0%} batch {batch}"] = rows
    return out
