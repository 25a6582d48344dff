"""The `moespec` command line. Every subcommand is a thin layer over `moespec.LLM`."""

from __future__ import annotations

import argparse
import sys

from .errors import MoespecError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--expert-cache", default="100%",
                   help="device budget for routed experts: share ('25%%'), size ('3GiB') or slot count")
    p.add_argument("--prefetch", default="none", help="expert prefetch policy (none = on-demand)")
    p.add_argument("--eviction", default="lru", help="lru, lfu or pinned_hot")
    p.add_argument("--cache-scope", default="global", help="global (layers share slots) or layer")
    p.add_argument("--link-bandwidth", default=None, help="CPU only: emulate a host-device link, e.g. 25GB/s")
    p.add_argument("--expert-tier", default="ram", help="ram, or disk (read experts from the checkpoint on demand)")
    p.add_argument("--trace", default=None, metavar="OUT.json", help="write a Chrome/Perfetto trace")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _load(args: argparse.Namespace):
    from .api import LLM

    slots = int(args.expert_cache) if args.expert_cache.isdigit() else args.expert_cache
    return LLM(args.model, device=args.device, dtype=args.dtype, expert_cache=slots, prefetch=args.prefetch,
               eviction=args.eviction, cache_scope=args.cache_scope, link_bandwidth=args.link_bandwidth,
               expert_tier=args.expert_tier, trace=args.trace is not None, progress=True)


def print_summary(stats: dict, file=sys.stderr) -> None:
    """Per-layer expert traffic table (hits, misses, bytes, stalls), then the total."""
    print(f"expert traffic ({stats['link']}; {stats['cache_slots']} expert slots on the device)", file=file)
    print(f"{'layer':>6} {'tokens':>7} {'hits':>7} {'misses':>7} {'hit%':>6} {'MB moved':>9} {'stall s':>8}", file=file)
    rows = [(str(layer), s) for layer, s in stats["per_layer"].items()] + [("total", stats)]
    for name, s in rows:
        uses = s["hits"] + s["misses"]
        hit = 100 * s["hits"] / uses if uses else 0.0
        print(f"{name:>6} {s['tokens']:>7} {s['hits']:>7} {s['misses']:>7} {hit:>6.1f} "
              f"{s['bytes_moved'] / 1e6:>9.2f} {s['stall_seconds']:>8.3f}", file=file)
    per_token = stats["bytes_moved"] / max(stats["generated_tokens"], 1)
    print(f"bytes moved per generated token: {per_token / 1e6:.3f} MB; decode "
          f"{1000 * stats['decode_seconds_per_token']:.1f} ms/token", file=file)


def cmd_generate(args: argparse.Namespace) -> None:
    llm = _load(args)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def stream(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, on_text=stream)
    sys.stdout.write("\n")
    print(f"[{len(out[0].token_ids)} tokens, finish={out[0].finish_reason}]", file=sys.stderr)
    print_summary(llm.stats())
    if args.trace:
        llm.save_trace(args.trace)
        print(f"trace written to {args.trace}", file=sys.stderr)
    llm.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moespec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streaming tokens to stdout")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.set_defaults(func=cmd_generate)
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
