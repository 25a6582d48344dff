"""Is `gamma="auto"` never slower than plain decoding? Wall time, prefill included, side by side.

Self-speculative decoding with γ chosen by measurement must not lose to plain decoding on any
prompt set: a probe of drafting that fails costs time, and a short generation has little time to
win it back. Each case (a prompt set, a batch, a length) runs plain and `speculative="self",
gamma="auto"` interleaved from a cold cache (`LLM.reset`), `--repeats` times after a warm-up,
each first in every other repeat (so neither gains from its place in the pair);
the ratio is plain's median wall time over auto's (above 1: auto is faster). Prompt sets: short
code prompts ("def fN(x):\\n    ", the case where drafting does not pay) and held-out text.
JSON under benchmarks/results/.

    python benchmarks/gamma_auto.py --model models/tiny-qwen2moe --expert-cache 25% --link 0.25GB/s
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
from moespec.bench.corpus import heldout_ids


def prompt_sets(llm: LLM, batch: int) -> dict[str, list]:
    ids = heldout_ids(llm)
    step = len(ids) // batch
    return {"short code": [f"def f{n}(x):\n    " for n in range(batch)],
            "held-out": [ids[i * step:i * step + 32] for i in range(batch)]}


def wall(llm: LLM, prompts: list, new_tokens: int, speculative: str) -> tuple[float, list[list[int]]]:
    llm.reset()
    start = time.perf_counter()
    out = llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True, speculative=speculative, gamma="auto")
    return time.perf_counter() - start, [o.token_ids for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/tiny-qwen2moe")
    ap.add_argument("--expert-cache", default="25%")
    ap.add_argument("--link", default="0.25GB/s", help="CPU: emulated link bandwidth")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", default="32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, expert_cache=args.expert_cache, link_bandwidth=args.link, progress=False)
    result = {"model": args.model, "expert_cache": args.expert_cache, "link": llm.link_note(),
              "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg(),
              "repeats": args.repeats, "cases": []}
    for batch in map(int, args.batches.split(",")):
        for name, prompts in prompt_sets(llm, batch).items():
            for new in map(int, args.new_tokens.split(",")):
                wall(llm, prompts, 4, "self")  # warm-up
                times: dict[str, list[float]] = {"off": [], "self": []}
                same = True
                for r in range(args.repeats):
                    runs = {}
                    for mode in ("off", "self")[::1 if r % 2 == 0 else -1]:  # either first in turn
                        runs[mode] = wall(llm, prompts, new, mode)
                        times[mode].append(runs[mode][0])
                    same &= runs["off"][1] == runs["self"][1]
                s = llm.stats().speculative_decoding
                case = {"prompts": name, "batch": batch, "new_tokens": new,
                        "plain_s": statistics.median(times["off"]), "auto_s": statistics.median(times["self"]),
                        "drafting_steps": s.counters.steps - s.counters.plain_steps,
                        "same_tokens": same}
                case["speed_ratio_auto_over_plain"] = case["plain_s"] / case["auto_s"]
                result["cases"].append(case)
                print(f"[{llm.link_note()}] {name:>10} batch {batch:>3} {new:>3} new tokens: plain "
                      f"{case['plain_s']:.3f} s, auto {case['auto_s']:.3f} s  x{case['speed_ratio_auto_over_plain']:.2f}"
                      f"  drafting steps {case['drafting_steps']}")
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out or f"benchmarks/results/gamma-auto-{Path(args.model).name}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
