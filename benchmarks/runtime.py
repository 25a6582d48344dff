"""Per-step engine cost: moespec against transformers (and llama.cpp) on the same model, every expert resident.

Side by side in one process, each case run on moespec then transformers back to back, medians of
`--repeats` rounds: batch-1, -8 and -32 greedy decode (decode time = a run of N new tokens minus a
run of one, over N - 1 steps) and a prefill of 512 tokens (or the model's context, if shorter),
for each dtype and torch thread count. The ratio is moespec's speed over transformers' (the
medians' ratio, and the median of each round's ratio); above 1 moespec is faster. Each run records
its thread count and the machine's load average before and after (a shared machine makes absolute
times noisy; the paired ratios much less so). JSON under benchmarks/results/.

    python benchmarks/runtime.py --models models/tiny-mixtral,models/tiny-qwen2moe --threads 1,2 \
        --dtypes float32,bfloat16

With --compile, moespec with compile=True (moespec/model/compiled.py) runs every case in the same
rounds too, and the run records whether its greedy tokens equal the eager ones on 8 prompts and
how far its prefill logits are from the eager ones.

With --llama-cpp, llama.cpp through llama-cpp-python runs batch-1 decode and the prefill in the
same rounds, right after the other two, with the same thread count: its own greedy `generate` from
token ids (no tokenizer), and a prefill computing every position's logits as the others do. It runs
a GGUF of the model in the dtype's type (float32: f32, float16: f16, bfloat16: bf16; KV cache
alike; its residual stream stays float32 whatever the weights, so half-precision greedy tokens may
part from moespec's), flash attention on (llama.cpp's own default resolves to on for its CPU
backend; llama-cpp-python's is off). The GGUFs live under --gguf-dir, converted on first use by
benchmarks/gguf_convert.py, which needs llama.cpp's convert_hf_to_gguf.py in $LLAMA_CPP_CONVERTER
(its docstring: where to get it, and the pre-tokenizer name the shipped tokenizer needs). Each run
records how many of the first N greedy tokens llama.cpp and moespec share on 8 prompts.
llama-cpp-python is the optional `bench` extra, built from source (never installed by CI):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e ".[bench]"
    python benchmarks/runtime.py --models models/tiny-mixtral --dtypes float32 --batches 1 --llama-cpp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from moespec import LLM

try:  # the optional `bench` extra
    import llama_cpp
except ImportError:
    llama_cpp = None

# each moespec dtype's GGUF type, with the ggml_type id (ggml.h) of the KV cache that matches it
GGUF_TYPES = {"float32": ("f32", 0), "float16": ("f16", 1), "bfloat16": ("bf16", 30)}
LLAMA_CPP_CASES = ("decode_b1", "prefill")


def runs_case(system: str, case: str) -> bool:
    """llama-cpp-python's Llama runs one sequence."""
    return system != "llama.cpp" or case in LLAMA_CPP_CASES


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


def llama_cpp_greedy(model: llama_cpp.Llama, prompt: list[int], new: int) -> list[int]:
    """llama.cpp's greedy tokens for one prompt, from an empty KV cache (no reuse of the last run's prefix)."""
    model.reset()
    return list(islice(model.generate(prompt, temp=0.0), new))


def llama_cpp_runs(model: llama_cpp.Llama, prompts: torch.Tensor, new: int) -> float:
    (prompt,) = prompts.tolist()
    return _timed(lambda: llama_cpp_greedy(model, prompt, new))


def llama_cpp_prefill(model: llama_cpp.Llama, prompt: torch.Tensor) -> None:
    """llama.cpp's forward over the prompt from an empty KV cache, every position's logits (logits_all)."""
    model.reset()
    model.eval(prompt[0].tolist())


def gguf_file(gguf_dir: Path, path: str, dtype: str) -> Path:
    """The GGUF of model `path` in `dtype`'s type, converted by benchmarks/gguf_convert.py on first use."""
    kind = GGUF_TYPES[dtype][0]
    out = gguf_dir / f"{Path(path).name}.{kind}.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_convert.py")), path, str(out),
                        "--outtype", kind], check=True)
    return out


def greedy_agreement(llm: LLM, model: llama_cpp.Llama, prompts: torch.Tensor, new: int) -> list[int]:
    """For each prompt alone, how many of the first `new` greedy tokens llama.cpp and moespec share."""
    shared = []
    for prompt in prompts.tolist():
        (ours,) = llm.generate([prompt], max_new_tokens=new, temperature=0.0, ignore_eos=True)
        theirs = llama_cpp_greedy(model, prompt, new)
        shared.append(next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs)) if a != b), new))
    return shared


def measure(path: str, dtype: str, threads: int, repeats: int, new: int, batches: list[int],
            gguf_dir: Path | None, compiled: bool) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    llm = LLM(path, dtype=dtype, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    cases = {f"decode_b{b}": _prompts(b, 32) for b in batches}
    prefill = _prompts(1, min(512, llm.context_length))  # the shipped models hold 256 tokens
    systems = {"moespec": (llm, moespec_runs), "transformers": (ref, transformers_runs)}
    forwards = {"moespec": lambda: llm.score(prefill), "transformers": lambda: ref(prefill).logits}
    out = {"model": path, "dtype": dtype, "torch_threads": torch.get_num_threads(), "repeats": repeats,
           "new_tokens": new, "prefill_tokens": prefill.shape[1], "load_average_before": load_before}
    if compiled:
        fast_llm = LLM(path, dtype=dtype, progress=False, compile=True)
        systems["moespec compiled"] = (fast_llm, moespec_runs)
        forwards["moespec compiled"] = lambda: fast_llm.score(prefill)
        with torch.inference_mode():
            out["compiled_prefill_max_logit_difference"] = (fast_llm.score(prefill) - llm.score(prefill)).abs().max().item()
        out["compiled_greedy_identical"] = all(
            a.token_ids == b.token_ids for a, b in zip(*(m.generate(_prompts(8, 32).tolist(), max_new_tokens=new,
                                                                   temperature=0.0, ignore_eos=True)
                                                        for m in (llm, fast_llm))))
    if gguf_dir is not None:
        gguf = gguf_file(gguf_dir, path, dtype)
        kind, kv_type = GGUF_TYPES[dtype]
        lcpp = llama_cpp.Llama(str(gguf), n_ctx=llm.context_length, n_threads=threads, n_threads_batch=threads,
                               logits_all=True, flash_attn=True, type_k=kv_type, type_v=kv_type, verbose=False)
        systems["llama.cpp"] = (lcpp, llama_cpp_runs)
        forwards["llama.cpp"] = lambda: llama_cpp_prefill(lcpp, prefill)
        out["llama_cpp"] = {"gguf": str(gguf), "gguf_type": kind, "kv_cache_type": kind, "flash_attn": True,
                            "greedy_tokens_shared": greedy_agreement(llm, lcpp, _prompts(8, 32), new)}

    def once(name: str, case: str) -> float:
        """One measurement of `case` on system `name`: seconds per decode step, or of the prefill."""
        if case == "prefill":
            with torch.inference_mode():
                return _timed(forwards[name])
        engine, run = systems[name]
        return (run(engine, cases[case], new) - run(engine, cases[case], 1)) / (new - 1)

    times: dict[str, dict[str, list[float]]] = {
        s: {c: [] for c in [*cases, "prefill"] if runs_case(s, c)} for s in systems}
    for rep in range(repeats + 1):  # the first round warms up and is dropped
        for case in [*cases, "prefill"]:
            for name in systems:  # back to back: a burst of load on the machine hits both sides of a ratio
                if case in times[name]:
                    seconds = once(name, case)
                    if rep:
                        times[name][case].append(seconds)
    out["load_average_after"] = os.getloadavg()
    out["cases"] = {}
    for case in times["moespec"]:
        ours, theirs = times["moespec"][case], times["transformers"][case]
        out["cases"][case] = c = {
            "moespec_ms": 1000 * statistics.median(ours), "transformers_ms": 1000 * statistics.median(theirs),
            "speed_ratio_moespec_over_transformers": statistics.median(theirs) / statistics.median(ours),
            "paired_ratio_median": statistics.median(t / o for t, o in zip(theirs, ours))}
        if case in times.get("llama.cpp", {}):
            theirs = times["llama.cpp"][case]
            c.update({"llama_cpp_ms": 1000 * statistics.median(theirs),
                      "speed_ratio_moespec_over_llama_cpp": statistics.median(theirs) / statistics.median(ours),
                      "paired_ratio_llama_cpp_median": statistics.median(t / o for t, o in zip(theirs, ours))})
        if case in times.get("moespec compiled", {}):
            fast = statistics.median(times["moespec compiled"][case])
            c.update({"moespec_compiled_ms": 1000 * fast,
                      "speed_ratio_compiled_over_eager": statistics.median(ours) / fast,
                      "speed_ratio_compiled_over_transformers": statistics.median(times["transformers"][case]) / fast})
            if "llama_cpp_ms" in c:
                c["speed_ratio_compiled_over_llama_cpp"] = statistics.median(times["llama.cpp"][case]) / fast
    if "llama.cpp" in systems:
        systems["llama.cpp"][0].close()
    if compiled:
        fast_llm.close()
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
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also measure llama.cpp (llama-cpp-python, the `bench` extra): batch-1 decode and prefill")
    ap.add_argument("--compile", action="store_true",
                    help="also measure moespec with compile=True")
    ap.add_argument("--gguf-dir", type=Path, default=Path("benchmarks/.gguf"),
                    help="GGUF files for --llama-cpp, converted there on first use ($LLAMA_CPP_CONVERTER)")
    args = ap.parse_args()
    if args.llama_cpp and llama_cpp is None:
        ap.error("--llama-cpp needs llama-cpp-python: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install -e \".[bench]\"")
    results = {"machine": f"CPU, {os.cpu_count()} cores", "torch": torch.__version__,
               "transformers": transformers.__version__, "load_average_before": os.getloadavg(), "runs": []}
    if args.llama_cpp:
        results["llama_cpp_python"] = llama_cpp.__version__
        results["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    gguf_dir = args.gguf_dir if args.llama_cpp else None
    batches = [int(b) for b in args.batches.split(",")]
    for path in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for threads in map(int, args.threads.split(",")):
                r = measure(path, dtype, threads, args.repeats, args.new_tokens, batches, gguf_dir, args.compile)
                results["runs"].append(r)
                for case, c in r["cases"].items():
                    line = f"{Path(path).name} {dtype} threads={threads} {case}: moespec {c['moespec_ms']:.2f} ms, "
                    line += f"transformers {c['transformers_ms']:.2f} ms, x{c['speed_ratio_moespec_over_transformers']:.2f}"
                    if "llama_cpp_ms" in c:
                        line += f", llama.cpp {c['llama_cpp_ms']:.2f} ms, x{c['speed_ratio_moespec_over_llama_cpp']:.2f}"
                    if "moespec_compiled_ms" in c:
                        line += f"; compiled {c['moespec_compiled_ms']:.2f} ms, " \
                                f"x{c['speed_ratio_compiled_over_transformers']:.2f} over transformers"
                        if "speed_ratio_compiled_over_llama_cpp" in c:
                            line += f", x{c['speed_ratio_compiled_over_llama_cpp']:.2f} over llama.cpp"
                    print(line)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
