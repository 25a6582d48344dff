"""Which eviction policy should the expert cache use by default? LRU, LFU and LFRU side by side.

Two measurements per model, cache size (25%, 50%) and batch (1, 4), on-demand loading only (no
prefetching, so the policy alone decides what is resident):

- replay: held-out text's routing (one trace of `--trace-tokens` tokens, recorded resident)
  through the cost-model simulator's cache (moespec/bench/simulator.py), batch rows taken from
  tokens far apart: the decode hit rate and bytes per step of each policy, no timing noise;
- decode: `moespec bench`'s on-demand decode steps (held-out prompts, greedy continuation), one
  engine per policy, interleaved `--repeats` times with the order alternating; the median ms per
  decode step, the decode hit rate and bytes per step, and the speed over LRU's.

The link is emulated (CPU); the JSON records it, the torch threads and the load average.

    python benchmarks/eviction.py --model models/tiny-mixtral --link 0.5GB/s --link 4GB/s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from moespec import LLM
from moespec.bench.corpus import bench_prompts, heldout_ids
from moespec.bench.routes import record_trace
from moespec.bench.runner import BenchConfig, bench
from moespec.bench.simulator import CostModel, simulate
from moespec.experts.cache import budget_slots

EVICTIONS = ["lru", "lfu", "lfru"]
CACHES = ["25%", "50%"]
BATCHES = [1, 4]
# any cost model gives the replay's hit rates and bytes; these constants only make its timeline defined
UNIT_COST = CostModel(dense_layer_s=1, head_s=0, expert_fixed_s=1, expert_per_token_s=0, copy_s=1, expert_bytes=1)


def replay(model: Path, tokens: int) -> dict:
    llm = LLM(model, progress=False)
    trace = record_trace(llm, heldout_ids(llm)[:tokens], hidden=False)
    spec, out = llm.spec, {}
    total = len(spec.moe_layer_ids) * spec.num_experts
    for cache in CACHES:
        slots = budget_slots(cache, total, llm.store.expert_bytes)
        for batch in BATCHES:
            steps = tokens // batch
            rows = {e: simulate(trace, UNIT_COST, len(spec.moe_layer_ids), slots, "none", batch, steps, spec.top_k, e)
                    for e in EVICTIONS}
            out[f"{cache} batch {batch}"] = {
                e: {"hit_rate": r["hit_rate"], "bytes_per_step": r["bytes_per_step"] * llm.store.expert_bytes,
                    "misses_vs_lru": (1 - r["hit_rate"]) / max(1 - rows["lru"]["hit_rate"], 1e-12)}
                for e, r in rows.items()}
    return out


def decode(model: Path, link: str, cache: str, repeats: int, compile: bool) -> dict:
    llms = {e: LLM(model, expert_cache=cache, link_bandwidth=link, eviction=e, compile=compile, progress=False)
            for e in EVICTIONS}
    prompts = bench_prompts(llms["lru"], 32)
    cfg = BenchConfig(policies=["none"], batch_sizes=BATCHES, repeats=1)
    runs: dict[tuple[int, str], list[dict]] = {}
    for rep in range(repeats):
        for e in EVICTIONS if rep % 2 == 0 else EVICTIONS[::-1]:
            llms[e].reset()
            for batch, b in bench(llms[e], prompts, cfg)["batches"].items():
                runs.setdefault((int(batch), e), []).append(b["policies"]["none"])
    out = {"link": llms["lru"].link_note()}
    for batch in BATCHES:
        ms = {e: statistics.median(r["ms_per_step_median"] for r in runs[(batch, e)]) for e in EVICTIONS}
        out[f"batch {batch}"] = {
            e: {"ms_per_step": ms[e], "speed_vs_lru": ms["lru"] / ms[e],
                "ms_per_step_runs": [r["ms_per_step_median"] for r in runs[(batch, e)]],
                "decode_hit_rate": statistics.median(r["decode_hit_rate"] for r in runs[(batch, e)]),
                "bytes_per_step": statistics.median(r["bytes_per_step"] for r in runs[(batch, e)])}
            for e in EVICTIONS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--link", action="append", default=None, help="emulated link(s) (default 0.5GB/s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trace-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    result = {"model": str(model), "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "compile": args.compile, "load_average_before": os.getloadavg(),
              "replay": replay(model, args.trace_tokens), "decode": {}}
    for case, rows in result["replay"].items():
        print(f"[replay, {model.name}] {case}: " + ", ".join(
            f"{e} hit {r['hit_rate']:.3f} ({r['misses_vs_lru']:.2f}x LRU's misses)" for e, r in rows.items()))
    for link in args.link or ["0.5GB/s"]:
        for cache in CACHES:
            d = result["decode"][f"{link} {cache}"] = decode(model, link, cache, args.repeats, args.compile)
            for batch in BATCHES:
                print(f"[decode, {model.name}, {d['link']}] {cache} batch {batch}: " + ", ".join(
                    f"{e} {r['ms_per_step']:.2f} ms (x{r['speed_vs_lru']:.2f}, hit {r['decode_hit_rate']:.2f})"
                    for e, r in d[f"batch {batch}"].items()), flush=True)
    result["load_average_after"] = os.getloadavg()
    out = Path(__file__).parent / "results" / f"eviction-{model.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
