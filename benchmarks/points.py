"""What the per-point benchmarks (auto_depth.py, oracle_bound.py) share: their common arguments, and
the loop that loads the model at each LINK,CACHE,BATCH point, measures there and writes one JSON.
A LINK is an emulated bandwidth, or "disk": the checkpoint's own files read with direct I/O (the
disk tier, no host cache), a real link.

Each point loads the model afresh (its own cache size and emulated link) and closes it after, so
no point inherits another's cache or transfer threads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

import torch

from moespec import LLM


def point_args(description: str, repeats: int, new_tokens: int) -> argparse.ArgumentParser:
    """A parser with the arguments every per-point benchmark takes; a benchmark adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--point", action="append", required=True,
                    help="LINK,CACHE,BATCH e.g. 1GB/s,25%%,1; LINK 'disk': the disk tier, direct I/O, no host cache")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/NAME-MODEL.json")
    return ap


def run_points(args: argparse.Namespace, name: str, measure: Callable[[LLM, int], dict],
               report: Callable[[LLM, str, dict], None], **record) -> None:
    """`measure(llm, batch)` at every `--point`, `report(llm, point, result)` after each, then all of
    it (with `record`, the torch threads and the load average before and after) written to
    `--out` or benchmarks/results/NAME-MODEL.json."""
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    result = {"model": str(model), **record, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "new_tokens": args.new_tokens, "compile": args.compile, "load_average_before": os.getloadavg(),
              "points": {}}
    for point in args.point:
        link, cache, batch = point.split(",")
        tier = dict(expert_tier="disk", direct_io=True, host_cache=0) if link == "disk" else dict(link_bandwidth=link)
        llm = LLM(model, expert_cache=cache, compile=args.compile, progress=False, **tier)
        measured = measure(llm, int(batch))
        measured["link"] = llm.link_note()
        result["points"][point] = measured
        report(llm, point, measured)
        llm.close()
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{name}-{model.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
