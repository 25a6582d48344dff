"""How deep should prefetch="auto" guess? auto one layer deep, two deep with the next token (its
default where the estimators have a next-token head) and one deep with the next token, against on
demand, over runs long enough for its switch to measure both modes.

auto tries guessing only once a failed try fits its budget (about 35 decode steps in), so
`moespec bench`'s 32-token runs would show it on demand throughout; this runs `moespec bench`'s
rows (interleaved, every other round reversed, the compute reference in each round) over 256 new
tokens per point. The link is emulated (CPU); the JSON records it, the torch threads and the load.

    python benchmarks/auto_depth.py --model models/tiny-mixtral --compile \\
        --point 0.5GB/s,25%,1 --point 1GB/s,25%,1 --point 1GB/s,50%,4

Writes benchmarks/results/auto-depth-MODEL.json and prints one line per point.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from moespec import LLM
from moespec.bench.corpus import bench_prompts
from moespec.bench.runner import BenchConfig, bench

POLICIES = ["none", "auto-d1", "auto", "auto-d1+next-token"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--point", action="append", required=True, help="LINK,CACHE,BATCH e.g. 1GB/s,25%%,1")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/auto-depth-MODEL.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    result = {"model": str(model), "policies": POLICIES, "torch_threads": torch.get_num_threads(),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "compile": args.compile,
              "load_average_before": os.getloadavg(), "points": {}}
    for point in args.point:
        link, cache, batch = point.split(",")
        llm = LLM(model, expert_cache=cache, link_bandwidth=link, compile=args.compile, progress=False)
        cfg = BenchConfig(POLICIES, [int(batch)], new_tokens=args.new_tokens, repeats=args.repeats)
        b = bench(llm, bench_prompts(llm, cfg.prompt_tokens), cfg)["batches"][batch]
        b["link"] = llm.link_note()
        result["points"][point] = b
        rows = b["policies"]
        print(f"[{model.name}, {b['link']}] cache {cache} batch {batch}: on demand stall "
              f"{rows['none']['decode_stall_share']:.0%}; x on demand: "
              + ", ".join(f"{p} {rows[p]['speedup_vs_on_demand']:.2f}" for p in POLICIES[1:]), flush=True)
        llm.close()
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"auto-depth-{model.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
