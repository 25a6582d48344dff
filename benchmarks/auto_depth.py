"""How deep should prefetch="auto" guess? auto one layer deep, two deep with the next token (its
default where the estimators have a next-token head) and one deep with the next token, against on
demand, over runs long enough for its switch to measure both modes.

auto tries guessing only once a failed try fits its budget (about 35 decode steps in), so
`moespec bench`'s 32-token runs would show it on demand throughout; this runs `moespec bench`'s
rows (interleaved, every other round reversed, the compute reference in each round) over 256 new
tokens per point. The link is emulated (CPU), or the disk (LINK `disk`); the JSON records it, the
torch threads and the load.

    python benchmarks/auto_depth.py --model models/tiny-mixtral --compile \\
        --point 0.5GB/s,25%,1 --point 1GB/s,25%,1 --point 1GB/s,50%,4

Writes benchmarks/results/auto-depth-MODEL.json and prints one line per point.
"""

from __future__ import annotations

from moespec import LLM
from moespec.bench.corpus import bench_prompts
from moespec.bench.runner import BenchConfig, bench
from points import point_args, run_points

POLICIES = ["none", "auto-d1", "auto", "auto-d1+next-token"]


def main() -> None:
    ap = point_args(__doc__.splitlines()[0], repeats=3, new_tokens=256)
    args = ap.parse_args()

    def measure(llm: LLM, batch: int) -> dict:
        cfg = BenchConfig(POLICIES, [batch], new_tokens=args.new_tokens, repeats=args.repeats)
        return bench(llm, bench_prompts(llm, cfg.prompt_tokens), cfg)["batches"][str(batch)]

    def report(llm: LLM, point: str, b: dict) -> None:
        rows = b["policies"]
        print(f"[{llm.path.name}, {b['link']}] {point}: on demand stall "
              f"{rows['none']['decode_stall_share']:.0%}; x on demand: "
              + ", ".join(f"{p} {rows[p]['speedup_vs_on_demand']:.2f}" for p in POLICIES[1:]), flush=True)

    run_points(args, "auto-depth", measure, report, policies=POLICIES)


if __name__ == "__main__":
    main()
