"""The `moespec` command line. Every subcommand is a thin layer over `moespec.LLM`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Literal, NoReturn, get_args, get_origin, get_type_hints

from .config import PARTS, EngineConfig, OffloadConfig, option_fields
from .decode.stats import EngineStats
from .errors import MoespecError
from .serve.app import DEFAULT_MAX_BODY_BYTES


def _value(text: str) -> str | int | float:
    """A flag's text as the config takes it: digits are an integer (a slot count, a depth, a γ),
    a decimal number a float (a threshold), anything else stays a string for the config to check."""
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per engine option (moespec/config.py), named and valued as the API names them."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    for part, f in option_fields():
        hints = get_type_hints(PARTS[part] if part else EngineConfig)
        kind = hints[f.name]
        choices = get_args(kind) if get_origin(kind) is Literal else None
        default = f.default if f.default is not None else "unset"
        help = f"{f.metadata['help']} (default: {str(default).replace('%', '%%')})"
        if kind in (bool, bool | None):  # --direct-io / --no-direct-io
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, choices=choices,
                           type=None if choices else _value, help=help)
    p.add_argument("--trace", default=None, metavar="OUT.json", help="write a Chrome/Perfetto trace")


def _engine_options(args: argparse.Namespace) -> dict:
    """The engine flags the user gave (the rest keep the config's defaults)."""
    return {f.name: getattr(args, f.name) for _, f in option_fields() if getattr(args, f.name, None) is not None}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _load(args: argparse.Namespace, **overrides):
    from .api import LLM

    model = args.model
    if getattr(args, "synthetic", None):
        from .bench.synthetic import SyntheticCheckpoint, preset_spec, write_checkpoint

        model = SyntheticCheckpoint(preset_spec(args.synthetic, args.layers), f"synthetic-{args.synthetic}")
        if getattr(args, "write_checkpoint", None):  # a real directory on a real disk, for the disk tier
            import torch

            dtype = getattr(torch, args.dtype or EngineConfig.dtype)
            model = write_checkpoint(model, args.write_checkpoint, dtype)
    options = {**_engine_options(args), **overrides}
    return LLM(model, trace=args.trace is not None, progress=True, **options)


def print_summary(stats: EngineStats, file=None) -> None:
    """Per-layer expert traffic table (hits, misses, bytes, stalls), then the total; on stderr
    (looked up when called, so a redirected sys.stderr gets it)."""
    file = file or sys.stderr
    print(f"expert traffic ({stats.link}; {stats.cache_slots} expert slots on the device)", file=file)
    print(f"{'layer':>6} {'tokens':>7} {'hits':>7} {'misses':>7} {'hit%':>6} {'MB moved':>9} {'stall s':>8}", file=file)
    for name, s in [(str(layer), s) for layer, s in stats.per_layer.items()] + [("total", stats.experts)]:
        uses = s.hits + s.misses
        hit = 100 * s.hits / uses if uses else 0.0
        print(f"{name:>6} {s.tokens:>7} {s.hits:>7} {s.misses:>7} {hit:>6.1f} "
              f"{s.bytes_moved / 1e6:>9.2f} {s.stall_seconds:>8.3f}", file=file)
    print(f"bytes moved per generated token: {stats.bytes_per_token / 1e6:.3f} MB; decode "
          f"{1000 * stats.decode.decode_seconds_per_token:.1f} ms/token", file=file)
    if stats.speculative_decoding is not None:
        c = stats.speculative_decoding.counters
        print(f"speculative decoding: acceptance {100 * c.acceptance_rate:.1f}%, "
              f"{c.tokens_per_step:.2f} tokens per row per verification step, mean gamma "
              f"{c.mean_gamma:.2f} ({c.plain_steps} of {c.steps} steps without drafts)", file=file)


def cmd_generate(args: argparse.Namespace) -> None:
    llm = _load(args)
    shown = False

    def show(text: str) -> None:
        """Write `text` to stdout, the prompt first: only once generation has started, so a
        bad argument gives its one-line error with nothing on stdout."""
        nonlocal shown
        if not shown:
            sys.stdout.write(args.prompt)
            shown = True
        sys.stdout.write(text)
        sys.stdout.flush()

    out = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                       on_text=lambda _row, text: show(text))
    show("\n")
    print(f"[{len(out[0].token_ids)} tokens, finish={out[0].finish_reason}]", file=sys.stderr)
    print_summary(llm.stats())
    if args.trace:
        llm.save_trace(args.trace)
        print(f"trace written to {args.trace}", file=sys.stderr)
    llm.close()


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve

    for name, value, low, high in (("--port", args.port, 0, 65535), ("--max-batch-size", args.max_batch_size, 1, None),
                                   ("--max-queue", args.max_queue, 0, None),
                                   ("--max-body-bytes", args.max_body_bytes, 1, None)):
        if value < low or (high is not None and value > high):  # checked before the model loads
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise MoespecError(f"{name} must be {bounds}, got {value}")
    llm = _load(args)
    try:
        serve(llm, host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
              max_body_bytes=args.max_body_bytes)
    finally:
        if args.trace:
            llm.save_trace(args.trace)
        llm.close()


def _write_json(obj: dict, path: str | None) -> None:
    text = json.dumps(obj, indent=2)
    if path:
        Path(path).write_text(text + "\n")
        print(f"written to {path}", file=sys.stderr)
    else:
        print(text)


def cmd_eval(args: argparse.Namespace) -> None:
    from .api import LLM
    from .bench.evaluate import evaluate

    llm = _load(args)
    exact = None
    if llm.speculation is not None or llm.config.offload.expert_dtype != "auto" or args.compare_exact:
        exact = LLM(args.model, device=llm.config.device, dtype=llm.config.dtype)
    _write_json(evaluate(llm, exact, n_chunks=args.chunks, incremental=args.incremental), args.out)


def cmd_trace(args: argparse.Namespace) -> None:
    from .bench.corpus import heldout_ids, training_ids
    from .bench.routes import record_trace, save_heatmap, usage_entropy

    llm = _load(args)
    ids = training_ids(llm, args.tokens) if args.split == "train" else heldout_ids(llm)[: args.tokens]
    trace = record_trace(llm, ids, hidden=args.hidden)
    trace.save(args.out)
    heatmap = args.heatmap or str(Path(args.out).with_suffix(".png"))
    save_heatmap(trace, heatmap, f"{llm.path.name}: expert usage ({args.split}, {len(trace.ids)} tokens)")
    entropy = usage_entropy(trace)
    print(f"{len(trace.ids)} tokens traced to {args.out}; heatmap {heatmap}", file=sys.stderr)
    for layer, h in zip(trace.moe_layers, entropy):
        print(f"layer {layer}: usage entropy {h:.2f} bits (uniform {math.log2(trace.num_experts):.2f})", file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from .bench.corpus import calibration_ids
    from .bench.routes import calibrate
    from .speculate.lookahead import DEFAULT_VECTORS_FILE

    llm = _load(args)
    out = args.out or llm.path / DEFAULT_VECTORS_FILE
    calibrate(llm, calibration_ids(llm, args.tokens)).save(out)
    print(f"default vectors from {args.tokens} held-out tokens written to {out}", file=sys.stderr)


def cmd_fit_estimator(args: argparse.Namespace) -> None:
    from .bench.corpus import training_ids
    from .bench.routes import record_trace
    from .speculate.estimators import ESTIMATOR_FILE, TRAINING_TOKENS, fit
    from .speculate.traces import RoutingTrace

    llm = _load(args)
    tokens = args.tokens or TRAINING_TOKENS
    trace = RoutingTrace.load(args.routes) if args.routes else record_trace(llm, training_ids(llm, tokens), True)
    options = {k: getattr(args, k) for k in ("mlp", "steps", "lr", "batch") if getattr(args, k) is not None}
    est, report = fit(llm.model, trace, depth=args.depth, next_token=args.next_token_head, **options)
    out = Path(args.out or llm.path / ESTIMATOR_FILE)
    est.save(out)
    report_path = out.with_suffix(".json")
    source = f"--routes {args.routes}" if args.routes else f"--tokens {tokens}"
    report["command"] = (f"moespec fit-estimator --model {args.model or llm.path} {source} --depth {args.depth} "
                         f"--mlp {report['mlp']} --steps {report['steps']} --lr {report['lr']} --batch {report['batch']}"
                         + (" --next-token-head" if args.next_token_head else ""))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"estimators written to {out} (report {report_path}); loss {report['loss_first']:.3f} -> "
          f"{report['loss_last']:.3f}", file=sys.stderr)
    for key, r in report["heads"].items():
        src, target = map(int, key.split("_"))
        target = target if target > src else f"the next token's {target}"
        print(f"layer {src} -> {target}: recall@k lookahead {r['lookahead']['val']:.3f}, "
              f"estimator {r['estimator']['val']:.3f} (validation)", file=sys.stderr)


def _link_speeds(text: str | None) -> list[str | None]:
    """'0.25,1,4,16GB/s' -> ['0.25GB/s', '1GB/s', '4GB/s', '16GB/s'] (the last item's unit for all)."""
    if not text:
        return [None]
    items = [t.strip() for t in text.split(",")]
    unit = items[-1].lstrip("0123456789.")
    return [t if t.endswith("/s") else t + unit for t in items]


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench.corpus import bench_prompts
    from .bench.plots import plot_cache_sweep, plot_link_sweep, plot_step_timeline
    from .bench.runner import POLICIES, BenchConfig, bench, format_sweep, format_table

    unknown = [p for p in args.policies.split(",") if p not in POLICIES]
    if unknown:
        raise MoespecError(f"unknown policy {unknown[0]!r}; available: {', '.join(POLICIES)}")
    if args.threads is not None:
        if args.threads < 1:
            raise MoespecError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    cfg = BenchConfig(policies=args.policies.split(","), batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
    sizes = args.cache_sizes.split(",") if args.cache_sizes else [args.expert_cache or OffloadConfig.expert_cache]
    speeds = _link_speeds(args.link_sweep)
    sweep: dict[str, dict] = {}
    for speed in speeds:
        for size in sizes:
            options = {"expert_cache": _value(str(size)), **({"link_bandwidth": speed} if speed else {})}
            dtypes = args.expert_dtypes.split(",") if args.expert_dtypes else []
            llm = _load(args, **options, **({"expert_dtype": dtypes[0]} if dtypes else {}))
            variants = {dt: _load(args, **options, expert_dtype=dt) for dt in dtypes[1:]}
            result = bench(llm, bench_prompts(llm, cfg.prompt_tokens), cfg, variants)
            result.update(model=str(llm.path), expert_cache=size, config=cfg.__dict__)
            for line in format_table(result):
                print(f"[cache {size}] {line}")
            sweep.setdefault(speed or "", {})[size] = result
            if args.timeline and size == sizes[-1] and speed == speeds[-1]:
                llm.set_policy(**POLICIES[cfg.policies[-1]])
                llm.reset()
                tracer = llm.start_trace()
                llm.generate(bench_prompts(llm, cfg.prompt_tokens)(1), max_new_tokens=4, ignore_eos=True)
                plot_step_timeline(tracer, args.timeline, f"{llm.path.name}, {cfg.policies[-1]}, cache {size}: "
                                                          f"one decode step ({llm.link_note()})")
            llm.close()
            for v in variants.values():
                v.close()
    if args.link_sweep:
        print("\n".join(format_sweep(sweep)))
        if args.plot:
            plot_link_sweep(sweep, args.plot, f"{Path(next(iter(sweep[speeds[0]].values()))['model']).name}: "
                                              "speed-up over on-demand and distance to the link-bound limit "
                                              "(CPU, emulated link)")
        _write_json({"link_sweep": sweep}, args.out)
        return
    sweep = sweep[""] if "" in sweep else next(iter(sweep.values()))
    if args.plot:
        plot_cache_sweep(sweep, str(cfg.batch_sizes[0]), args.plot,
                         f"{next(iter(sweep.values()))['model']}, batch {cfg.batch_sizes[0]} "
                         f"({next(iter(sweep.values()))['link']})")
    _write_json(sweep, args.out)


def cmd_simulate(args: argparse.Namespace) -> None:
    from .bench import simulator as sim
    from .bench.synthetic import preset_spec
    from .speculate.traces import RoutingTrace

    trace = RoutingTrace.load(args.routes)
    policies = args.policies.split(",")
    if args.calibrate_against:
        # CPU calibration: simulate the bench run's own model and settings, compare with its measurements
        llm = _load(args)
        sweep = json.loads(Path(args.calibrate_against).read_text())
        timings = sim.measure_cpu(llm)
        report = {"link": llm.link_note(), "cpu_timings": timings.__dict__, "rows": []}
        for size, result in sweep.items():
            for batch, b in result["batches"].items():
                cost = sim.cpu_cost(llm, timings, b["compute_ms_per_step"], int(batch), trace)
                for policy in policies:
                    measured = b["policies"].get(policy)
                    if measured is None:
                        continue
                    r = sim.simulate(trace, cost, llm.spec.num_layers, result["cache_slots"], policy, int(batch),
                                     result["config"]["new_tokens"], llm.spec.top_k, llm.config.offload.eviction)
                    err = r["seconds_per_step"] * 1000 / measured["ms_per_step_median"] - 1
                    report["rows"].append(dict(cache=size, batch=int(batch), policy=policy, error=err,
                                               simulated_ms=1000 * r["seconds_per_step"],
                                               measured_ms=measured["ms_per_step_median"]))
                    print(f"[{llm.link_note()}] cache {size} batch {batch} {policy}: simulated "
                          f"{1000 * r['seconds_per_step']:.2f} ms/step, measured {measured['ms_per_step_median']:.2f}"
                          f" ({100 * err:+.1f}%)")
        errors = [abs(r["error"]) for r in report["rows"]]
        report["mean_abs_error"] = sum(errors) / len(errors) if errors else None
        print(f"calibration error: mean |error| {100 * report['mean_abs_error']:.1f}% over {len(errors)} rows")
        _write_json(report, args.out)
        return
    if args.hardware not in sim.HARDWARE:
        raise MoespecError(f"unknown hardware {args.hardware!r}; available: {', '.join(sim.HARDWARE)}")
    spec = preset_spec(args.shape, args.layers)
    cost = sim.roofline(spec, sim.HARDWARE[args.hardware])
    shares = [float(x.strip().rstrip("%")) / 100 for x in args.cache_sizes.split(",")]
    out = sim.project(trace, cost, spec, shares, policies, [int(b) for b in args.batch_sizes.split(",")], args.steps,
                      args.eviction or OffloadConfig.eviction)
    out.update(hardware=args.hardware, shape=args.shape, routes=args.routes)
    for key, rows in out["results"].items():
        for policy, r in rows.items():
            print(f"[simulated {args.shape} on {args.hardware}] cache {key} {policy:<12} {r['ms_per_token']:8.2f} ms/token"
                  f"  x{r.get('speedup_vs_on_demand', float('nan')):.2f} vs on-demand  "
                  f"{r['bytes_per_step'] / 1e6:9.1f} MB/step  hit {100 * r['hit_rate']:.1f}%  stall {100 * r['stall_share']:.1f}%")
    _write_json(out, args.out)


def cmd_parallel_bench(args: argparse.Namespace) -> None:
    import os

    import torch.distributed as dist

    from .parallel import POLICIES, init_from_env, skewed_batches
    from .parallel.bench import compare
    from .spec import load_spec

    policies = args.policies.split(",")
    if unknown := set(policies) - set(POLICIES):
        raise MoespecError(f"unknown replication policy {sorted(unknown)[0]!r}; available: {', '.join(POLICIES)}")
    spec = load_spec(args.model)
    batches = skewed_batches(spec.vocab_size, args.batches, args.batch_size, args.seq_len,
                             decoder_len=args.decoder_len if spec.num_encoder_layers else 0, topics=args.topics,
                             seed=args.seed)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: join its group
        init_from_env(args.device)
    variants = {p: dict(policy=p, dtype=args.dtype, slots=args.slots, split=args.split) for p in policies}
    out = compare(args.model, batches, variants, args.workers, device=args.device)
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    for policy, r in out["variants"].items():
        s = r["summary"]
        print(f"{policy:<11} imbalance {s['imbalance_mean']:.3f} (max {s['imbalance_max']:.3f})  step "
              f"{1000 * s['step_seconds_median']:.1f} ms  experts {1000 * s['expert_seconds_median']:.1f} ms  "
              f"utilisation {100 * s['utilisation_mean']:.0f}%  moved {s['moved_experts_per_step']:.1f}/step",
              file=sys.stderr)
    _write_json(out, args.out)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every moespec error is (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moespec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streaming tokens to stdout")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (KV-cache rows)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row (0: none wait); more get HTTP 429")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body; larger ones get HTTP 413")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="time every policy side by side in one process (JSON + table)")
    _engine_args(b)
    b.add_argument("--synthetic", default=None, help="random weights at a real model's shapes, e.g. mixtral-8x7b")
    b.add_argument("--layers", type=int, default=None, help="synthetic: keep only the first N layers")
    b.add_argument("--write-checkpoint", default=None, metavar="DIR",
                   help="synthetic: write the model as a Hugging Face directory here (reused if it already "
                        "holds it) and run from it, so --expert-tier disk reads a real file")
    b.add_argument("--policies", default="none,lookahead", help="comma list; see moespec.bench.runner.POLICIES")
    b.add_argument("--batch-sizes", default="1,4,16")
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); recorded in the JSON")
    b.add_argument("--cache-sizes", default=None, help="comma list of budgets to sweep (overrides --expert-cache)")
    b.add_argument("--expert-dtypes", default=None, metavar="auto,int8,int4",
                   help="run the policies for each expert dtype, interleaved; speed-ups against the first's on-demand")
    b.add_argument("--link-sweep", default=None, metavar="0.25,1,4,16GB/s",
                   help="CPU: repeat the bench at each emulated link speed; --plot then draws the sweep")
    b.add_argument("--plot", default=None, help="png: ms/token vs cache size per policy")
    b.add_argument("--timeline", default=None, help="png: one decode step's compute and transfer lanes")
    b.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("simulate", help="cost-model projection of policies from a routing trace")
    _engine_args(m)
    m.add_argument("--routes", required=True, help="routes.npz (record guesses with `trace --prefetch lookahead`)")
    m.add_argument("--hardware", default="h100-pcie5", help="h100-pcie5, a6000-pcie4 or rtx4090-pcie4")
    m.add_argument("--shape", default="mixtral-8x7b", help="model shape (see moespec.bench.synthetic.PRESETS)")
    m.add_argument("--layers", type=int, default=None)
    m.add_argument("--policies", default="none,lookahead,speculative")
    m.add_argument("--cache-sizes", default="25%,50%")
    m.add_argument("--batch-sizes", default="1,4,16")
    m.add_argument("--steps", type=int, default=32)
    m.add_argument("--calibrate-against", default=None, metavar="BENCH.json",
                   help="CPU: simulate a `moespec bench` run of --model and report the error")
    m.add_argument("--out", default=None)
    m.set_defaults(func=cmd_simulate)

    e = sub.add_parser("eval", help="held-out perplexity and agreement with the exact model (JSON)")
    _engine_args(e)
    e.add_argument("--chunks", type=int, default=64, help="evaluation chunks (the model cards use 64)")
    e.add_argument("--compare-exact", action="store_true", help="also report agreement for exact policies")
    e.add_argument("--incremental", action="store_true",
                   help="score position by position as decoding does (for speculative execution)")
    e.add_argument("--out", default=None, help="write JSON here instead of stdout")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("trace", help="record per-token routing (npz) and an expert-usage heatmap (png)")
    _engine_args(t)
    t.add_argument("--out", required=True, help="routes.npz")
    t.add_argument("--split", choices=["heldout", "train"], default="heldout")
    t.add_argument("--tokens", type=int, default=16384)
    t.add_argument("--hidden", action="store_true", help="also record router inputs (for estimators)")
    t.add_argument("--heatmap", default=None, help="png path (default: next to --out)")
    t.set_defaults(func=cmd_trace)

    c = sub.add_parser("calibrate", help="default vectors (per-expert mean outputs) for lookahead")
    _engine_args(c)
    c.add_argument("--tokens", type=int, default=8192, help="held-out tokens after the evaluation chunks")
    c.add_argument("--out", default=None, help="default: MODEL/default_vectors.safetensors")
    c.set_defaults(func=cmd_calibrate)

    f = sub.add_parser("fit-estimator", help="train learned expert estimators from routing traces")
    _engine_args(f)
    f.add_argument("--routes", default=None, help="routes.npz recorded with `trace --hidden` (default: record now)")
    f.add_argument("--tokens", type=int, default=None,
                   help="training-split tokens to trace if no --routes (default 1048576)")
    f.add_argument("--depth", type=int, default=1)
    f.add_argument("--next-token-head", action="store_true",
                   help="also a head from the last MoE layer to the next token's first one (used by next_token=True)")
    # unset: estimators.fit's defaults, the configuration the shipped estimators were trained with
    f.add_argument("--mlp", type=int, default=None, help="hidden width of the MLP correction (0 = linear; default 64)")
    f.add_argument("--steps", type=int, default=None, help="default 3000")
    f.add_argument("--lr", type=float, default=None, help="Adam learning rate, cosine decay to 5%% of it (default 0.01)")
    f.add_argument("--batch", type=int, default=None, help="tokens per step (default 2048)")
    f.add_argument("--out", default=None, help="default: MODEL/estimators.safetensors")
    f.set_defaults(func=cmd_fit_estimator)

    pb = sub.add_parser("parallel-bench", help="expert parallelism: replication policies on a skewed workload (JSON)")
    pb.add_argument("--model", required=True, help="checkpoint directory")
    pb.add_argument("--workers", type=int, default=2, help="processes to launch (ignored under torchrun)")
    pb.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per worker)")
    pb.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pb.add_argument("--policies", default="none,static,predictive", help="comma list of none, static, predictive")
    pb.add_argument("--slots", type=int, default=None, help="expert slots per worker per layer (default: share + 25%%)")
    pb.add_argument("--split", default="even", choices=["even", "balanced"],
                    help="replicas share an expert's tokens evenly, or water-filled from the actual counts")
    pb.add_argument("--batches", type=int, default=12)
    pb.add_argument("--batch-size", type=int, default=32)
    pb.add_argument("--seq-len", type=int, default=32)
    pb.add_argument("--decoder-len", type=int, default=8, help="encoder-decoder models: decoder tokens per row")
    pb.add_argument("--topics", type=int, default=4, help="skew: batches are dominated by one of N topics")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    pb.set_defaults(func=cmd_parallel_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoespecError as e:
        print(f"moespec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
