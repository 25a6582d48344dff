"""Expert replication under expert parallelism on a skewed batch workload.

For each model and worker count, every policy runs the same batches in one process group
(moespec.parallel.bench.compare_policies): "none" (one replica per expert), "static" (plan from
the moving average of observed loads), "predictive" (plan from a forecast of the next batch: the
routing memory, falling back to the router lookahead), each with EPLB's even split of a replicated
expert's tokens, and the two replicating policies again with the "balanced" split (water-filled
from the actual counts at dispatch). The first step runs before any plan exists and is excluded.

Models:
- Switch-shaped synthetic models: transformers' SwitchTransformersForConditionalGeneration with
  its own random initialisation at a scaled-down Switch-base shape (d_model 128, d_ff 512, 4+4
  layers, every other feed-forward sparse, top-1, expert capacity 8 per sequence), 64 and 128
  experts;
- decoder-only: the trained models shipped under models/ when present (tiny-mixtral,
  tiny-qwen2moe), otherwise a random Mixtral-architecture model with 64 experts, top-2.
Workload: moespec.parallel.skewed_batches (each batch dominated by one of 4 Zipf topics, the
dominant topic changing every batch). Writes JSON (default benchmarks/results/replication.json).

    python benchmarks/replication.py [--workers 2,4] [--batches 12] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moespec.parallel import skewed_batches
from moespec.parallel.bench import compare
from moespec.parallel.engine import default_slots
from moespec.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["tiny-mixtral", "tiny-qwen2moe"]
VARIANTS = {  # name: ExpertParallelEngine options
    "none": {"policy": "none"},
    "static": {"policy": "static"},
    "predictive": {"policy": "predictive"},
    "static+balanced": {"policy": "static", "split": "balanced"},
    "predictive+balanced": {"policy": "predictive", "split": "balanced"},
}


def switch_model(path: Path, experts: int) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=2048, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=experts, expert_capacity=8,
        decoder_start_token_id=0)
    transformers.SwitchTransformersForConditionalGeneration(config).save_pretrained(path)


def mixtral_model(path: Path, experts: int) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=512)
    transformers.MixtralForCausalLM(config).save_pretrained(path)


def models(cache: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint directory, how it was made)."""
    out = {}
    for experts in (128, 64):
        path = cache / f"switch-{experts}"
        if not (path / "config.json").is_file():
            switch_model(path, experts)
        out[f"switch-synthetic-{experts}"] = (path, "Switch-shaped, random init (transformers), synthetic")
    shipped = [ROOT / "models" / n for n in SHIPPED if (ROOT / "models" / n / "config.json").is_file()]
    for path in shipped:
        out[path.name] = (path, "shipped trained model")
    if not shipped:
        path = cache / "mixtral-64"
        if not (path / "config.json").is_file():
            mixtral_model(path, 64)
        out["mixtral-random-64"] = (path, "Mixtral architecture, random init (transformers); no shipped model found")
    return out


def run(args: argparse.Namespace) -> dict:
    results = {"environment": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                               "torch": torch.__version__, "python": platform.python_version(),
                               "device": args.device, "threads_per_worker": "cpus // workers (at least 1)",
                               "note": "workers share this machine's cores; see README 'Expert parallelism'"},
               "workload": {"batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
                            "decoder_len": args.decoder_len, "topics": 4,
                            "generator": "moespec.parallel.skewed_batches"},
               "runs": []}
    for name, (path, origin) in models(Path(args.cache)).items():
        spec = load_spec(path)
        batches = skewed_batches(spec.vocab_size, args.batches, args.batch_size, args.seq_len,
                                 decoder_len=args.decoder_len if spec.num_encoder_layers else 0, seed=args.seed)
        for workers in args.workers:
            start = time.perf_counter()
            out = compare(str(path), batches, VARIANTS, workers, device=args.device)
            results["runs"].append({"model": name, "origin": origin, "experts": spec.num_experts, "top_k": spec.top_k,
                                    "moe_layers": len(spec.moe_layer_ids), "workers": workers,
                                    "slots_per_worker_per_layer": default_slots(spec.num_experts, workers),
                                    "variants": out["variants"]})
            print(f"{name} × {workers} workers: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def table(results: dict) -> str:
    lines = [f"{'model':<24}{'W':>3} {'variant':<20}{'imbalance':>10}{'max':>7}{'crit.rows':>10}{'step ms':>9}"
             f"{'util%':>7}{'moved/step':>11}{'fcst err':>9}"]
    for r in results["runs"]:
        for variant, v in r["variants"].items():
            s = v["summary"]
            err = "" if s["forecast_error_mean"] is None else f"{s['forecast_error_mean']:.2f}"
            lines.append(f"{r['model']:<24}{r['workers']:>3} {variant:<20}{s['imbalance_mean']:>10.3f}"
                         f"{s['imbalance_max']:>7.3f}{s['critical_rows_mean']:>10.0f}"
                         f"{1000 * s['step_seconds_median']:>9.1f}{100 * s['utilisation_mean']:>7.0f}"
                         f"{s['moved_experts_per_step']:>11.1f}{err:>9}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="2,4")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--decoder-len", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="/tmp/moespec-replication-models", help="where synthetic models are saved")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replication.json"))
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
