"""Issue 5's tables for one model, in one run: speculation hit rates (lookahead depth 1-3 with and
without default vectors, estimators), the accuracy cost of speculative execution, and decode time
per token against on-demand with a 25% expert cache on an emulated link.

    python benchmarks/speculation.py --model models/tiny-mixtral [--chunks 16] [--link 25GB/s]

Writes benchmarks/results/speculation-<model>.json and prints Markdown tables. Needs the model's
default vectors and depth-3 estimators (made here if missing: `moespec calibrate`,
`moespec fit-estimator --depth 3`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moespec import LLM, MoespecError
from moespec.bench.corpus import calibration_ids, heldout_ids, training_ids
from moespec.bench.evaluate import evaluate
from moespec.bench.routes import calibrate, record_trace
from moespec.bench.runner import BenchConfig, bench
from moespec.speculate.estimators import ESTIMATOR_FILE, TRAINING_TOKENS, Estimators, fit
from moespec.speculate.lookahead import DEFAULT_VECTORS_FILE

DEPTH = 3


def ensure_artifacts(model: Path) -> dict:
    llm = LLM(model)
    report = {}
    if not (model / DEFAULT_VECTORS_FILE).is_file():
        calibrate(llm, calibration_ids(llm, 8192)).save(model / DEFAULT_VECTORS_FILE)
    est_path = model / ESTIMATOR_FILE
    try:
        usable = Estimators.load(est_path, llm.model).depth >= DEPTH
    except MoespecError:  # missing, or made by an older moespec
        usable = False
    if not usable:
        est, meta = fit(llm.model, record_trace(llm, training_ids(llm, TRAINING_TOKENS), hidden=True), depth=DEPTH)
        est.save(est_path)
        est_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    meta = json.loads(est_path.with_suffix(".json").read_text())
    report["estimator_training"] = {k: v for k, v in meta.items() if k != "loss_curve"}
    return report


def hit_rates(model: Path, chunks: int, incremental: bool) -> dict:
    """Recall of the true top-k among the k best guesses, per depth, on held-out evaluation chunks,
    scored position by position as decoding runs (`incremental`: where prefetches are made, and
    where estimators see the previous token's context) or as one prefill per chunk."""
    out = {}
    for name, kw in {"lookahead": dict(prefetch="lookahead", default_vectors=False),
                     "lookahead+default vectors": dict(prefetch="lookahead", default_vectors=True),
                     "estimator": dict(prefetch="estimator")}.items():
        llm = LLM(model, lookahead_depth=DEPTH, **kw)
        evaluate(llm, None, n_chunks=chunks, incremental=incremental)
        out[name] = llm.stats().speculation.as_dict()["total"]
    return out


def accuracy(model: Path, chunks: int) -> dict:
    exact = LLM(model)
    out = {}
    for name, kw in {"lookahead, speculative": dict(prefetch="lookahead", speculative_execution="on"),
                     "lookahead, fallback": dict(prefetch="lookahead", speculative_execution="fallback"),
                     "estimator, speculative": dict(prefetch="estimator", speculative_execution="on"),
                     "estimator, fallback": dict(prefetch="estimator", speculative_execution="fallback")}.items():
        r = evaluate(LLM(model, expert_cache="25%", **kw), exact, n_chunks=chunks, incremental=True)
        out[name] = {k: r[k] for k in ("perplexity", "exact_perplexity", "delta_perplexity", "top1_agreement")}
    return out


def decode_times(model: Path, link: str) -> dict:
    llm = LLM(model, expert_cache="25%", link_bandwidth=link)
    ids = heldout_ids(llm)
    cfg = BenchConfig(policies=["none", "lookahead", "estimator", "speculative", "fallback"], batch_sizes=[1, 4],
                      prompt_tokens=32, new_tokens=32, repeats=3)
    return bench(llm, lambda b: [ids[i * 997:i * 997 + 32] for i in range(b)], cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--chunks", type=int, default=16, help="held-out evaluation chunks of 256 tokens")
    parser.add_argument("--link", action="append", default=None, help="emulated link(s), default 25GB/s")
    args = parser.parse_args()
    model = Path(args.model)
    result = {"model": str(model), "chunks": args.chunks, **ensure_artifacts(model)}
    result["hit_rates"] = hit_rates(model, args.chunks, incremental=True)
    result["hit_rates_prefill"] = hit_rates(model, args.chunks, incremental=False)
    result["accuracy"] = accuracy(model, args.chunks)
    result["decode"] = {link: decode_times(model, link) for link in (args.link or ["25GB/s"])}
    out = Path(__file__).parent / "results" / f"speculation-{model.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"## {model.name}: recall@k of speculation on {args.chunks} held-out chunks\n")
    print("| predictor | scored | " + " | ".join(f"depth {d}" for d in range(1, DEPTH + 1)) + " |")
    print("|---|---|" + "---|" * DEPTH)
    for how, key in (("decoding", "hit_rates"), ("prefill", "hit_rates_prefill")):
        for name, per_depth in result[key].items():
            cells = [per_depth[f"depth {d}"]["recall_at_k"] for d in range(1, DEPTH + 1)]
            print(f"| {name} | {how} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    print("\n| speculative execution (25% cache, decoded position by position) | perplexity | exact | Δ | "
          "top-1 agreement |\n|---|---|---|---|---|")
    for name, r in result["accuracy"].items():
        print(f"| {name} | {r['perplexity']:.3f} | {r['exact_perplexity']:.3f} | {r['delta_perplexity']:+.3f} | "
              f"{r['top1_agreement']:.3f} |")
    for link, d in result["decode"].items():
        print(f"\n| {d['link']} | batch | ms/token | vs on-demand | MB/token | hit rate | stall share |\n|---|---|---|---|---|---|---|")
        for batch, b in d["batches"].items():
            for name, r in b["policies"].items():
                print(f"| {name} | {batch} | {r['ms_per_step_median']:.2f} | x{r['speedup_vs_on_demand']:.2f} | "
                      f"{r['bytes_per_token'] / 1e6:.3f} | {r['hit_rate']:.3f} | {r['stall_share']:.3f} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
