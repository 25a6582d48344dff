"""Per-step engine cost: moespec against transformers on the same model, every expert resident.

Side by side in one process, each case run on moespec then transformers back to back, medians of
`--repeats` rounds: batch-1, -8 and -32 greedy decode (decode time = a run of N new tokens minus a
run of one, over N - 1 steps) and a prefill of 512 tokens (or the model's context, if shorter),
for each dtype and torch thread count. The ratio is moespec's speed over transformers' (the
medians' ratio, and the median of each round's ratio); above 1 moespec is faster. Each run records
its thread count and the machine's load average before and after (a shared machine makes absolute
times noisy; the paired ratios much less so). llama.cpp is not measured here (llama-cpp-python
needs a source build on this machine). JSON under benchmarks/results/.

    python benchmarks/runtime.py --models models/tiny-mixtral,models/tiny-qwen2moe --threads 1,2 \
        --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from moespec import LLM


def _prompts(batch: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(3, 500, (batch, length), generator=gen)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def moespec_runs(llm: LLM, prompts: torch.Tensor, new: int) -> float:
    rows = prompts.tolist()
    return _timed(lambda: llm.generate(rows, max_new_tokens=new, temperature=0.0, ignore_eos=True))


def transformers_runs(model, prompts: torch.Tensor, new: int) -> float:
    with torch.inference_mode():
        return _timed(lambda: model.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                             attention_mask=torch.ones_like(prompts), pad_token_id=0))


def measure(path: str, dtype: str, threads: int, repeats: int, new: int, batches: list[int]) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    llm = LLM(path, dtype=dtype, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    cases = {f"decode_b{b}": _prompts(b, 32) for b in batches}
    prefill = _prompts(1, min(512, llm.context_length))  # the shipped models hold 256 tokens
    systems = {"moespec": (llm, moespec_runs), "transformers": (ref, transformers_runs)}

    def once(name: str, case: str) -> float:
        """One measurement of `case` on system `name`: seconds per decode step, or of the prefill."""
        if case == "prefill":
            forward = (lambda: llm.score(prefill)) if name == "moespec" else (lambda: ref(prefill).logits)
            with torch.inference_mode():
                return _timed(forward)
        engine, run = systems[name]
        return (run(engine, cases[case], new) - run(engine, cases[case], 1)) / (new - 1)

    times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in [*cases, "prefill"]} for s in systems}
    for rep in range(repeats + 1):  # the first round warms up and is dropped
        for case in [*cases, "prefill"]:
            for name in systems:  # back to back: a burst of load on the machine hits both sides of a ratio
                seconds = once(name, case)
                if rep:
                    times[name][case].append(seconds)
    out = {"model": path, "dtype": dtype, "torch_threads": torch.get_num_threads(), "repeats": repeats,
           "new_tokens": new, "prefill_tokens": prefill.shape[1], "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "cases": {}}
    for case in times["moespec"]:
        ours, theirs = times["moespec"][case], times["transformers"][case]
        out["cases"][case] = {"moespec_ms": 1000 * statistics.median(ours),
                              "transformers_ms": 1000 * statistics.median(theirs),
                              "speed_ratio_moespec_over_transformers": statistics.median(theirs) / statistics.median(ours),
                              "paired_ratio_median": statistics.median(t / o for t, o in zip(theirs, ours))}
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models/tiny-mixtral,models/tiny-qwen2moe")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/runtime-cpu.json")
    args = ap.parse_args()
    results = {"machine": f"CPU, {os.cpu_count()} cores", "torch": torch.__version__,
               "transformers": transformers.__version__, "load_average_before": os.getloadavg(), "runs": []}
    batches = [int(b) for b in args.batches.split(",")]
    for path in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for threads in map(int, args.threads.split(",")):
                r = measure(path, dtype, threads, args.repeats, args.new_tokens, batches)
                results["runs"].append(r)
                for case, c in r["cases"].items():
                    print(f"{Path(path).name} {dtype} threads={threads} {case}: moespec {c['moespec_ms']:.2f} ms, "
                          f"transformers {c['transformers_ms']:.2f} ms, x{c['speed_ratio_moespec_over_transformers']:.2f}")
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
