"""The `moespec` command line. Every subcommand is a thin layer over `moespec.LLM`."""

from __future__ import annotations

import argparse
import sys

from .errors import MoespecError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _load(args: argparse.Namespace):
    from .api import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, progress=True)


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
    s = llm.stats()
    print(f"[{len(out[0].token_ids)} tokens, finish={out[0].finish_reason}, "
          f"prefill {s['prefill_seconds']:.3f}s, decode {1000 * s['decode_seconds_per_token']:.1f} ms/token]",
          file=sys.stderr)


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
