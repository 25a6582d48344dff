"""How much could any guess buy? The engine with perfect, free guesses, against on demand and the real policies.

A predictor that knows the routing bounds what better guessing can win: its guesses are never
wrong and cost nothing to make, so what is left between it and the link-bound limit is the cache's
and the link's doing, not the predictor's. This benchmark records the routing of `moespec bench`'s
own run (held-out prompts, greedy continuation: every run of them routes the same way, prefetching
being exact), then replays it as the guesses of a `PerfectGuesses` predictor behind the engine's
own speculation hooks, admission and eviction, `--depth` MoE layers ahead within the token, and
(`across`) on into the next token's first layers, as a next-token guess would (the hooks ask a
predictor only at layers with an MoE layer after them, so those are guessed from the token's
earlier layers, not its last).

Per point (link, cache, batch) the rows are on demand, the real policies of `--policy`, and the
perfect guesses, interleaved `--repeats` times with the compute reference (all experts resident);
decode steps only, medians. The link is emulated (CPU), or the disk (LINK `disk`: a real link);
the JSON records it, the torch threads and the load average.

    python benchmarks/oracle_bound.py --model models/tiny-mixtral --point 1GB/s,25%,1 --compile
"""

from __future__ import annotations

from functools import partial

import torch

from moespec import LLM
from moespec.bench.corpus import bench_prompts
from moespec.bench.runner import BenchConfig, Row, bench, hooked
from moespec.speculate.policy import Speculation
from moespec.speculate.traces import RouteRecorder
from points import point_args, run_points

Routes = dict[tuple[int, int], list[list[int]]]  # (forward pass of the run, MoE layer) -> each row's expert ids


class PerfectGuesses:
    """A Predictor (speculate/policy.py) that knows the routing of the run it guesses for: at each
    MoE layer, the experts the next `depth` MoE layers use, each with probability 1/k (score 1),
    within the token, or with `across` on into the next token's layers."""

    def __init__(self, routes: Routes, moe_layers: list[int], top_k: int, depth: int, across: bool):
        self.routes, self.depth, self.k = routes, depth, top_k
        order = [(0, t) for t in moe_layers] + ([(1, t) for t in moe_layers] if across else [])
        # MoE layer -> its next `depth` MoE layers as (forward passes ahead, layer)
        self.ahead = {layer: order[i + 1:i + 1 + depth] for i, (_, layer) in enumerate(order[:len(moe_layers)])}
        self.step = -1

    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.step = 0 if positions.shape[1] > 1 else self.step + 1

    def routed(self, layer: int, router_input: torch.Tensor) -> None:
        """Nothing to remember: the routing is known."""

    def predict(self, layer, x, router_input=None, routing=None) -> dict:
        return {}  # a prefill starts no copies

    def ranked(self, layer, x, router_input, routing, width) -> dict[int, tuple[list[list[int]], list[list[float]]]]:
        out = {}
        for ahead, target in self.ahead.get(layer, []):
            ids = self.routes.get((self.step + ahead, target))
            if ids is None:  # past the recorded run
                break
            out[target] = (ids, [[1 / self.k] * len(row) for row in ids])
        return out


def record(llm: LLM, prompts: list[list[int]], new_tokens: int) -> Routes:
    """The routing of a greedy run of `prompts`, by forward pass (0: the prefill) and MoE layer."""
    llm.set_policy()
    recorder = RouteRecorder(llm.model, hidden=False)  # one [tokens, k] tensor per forward pass and layer
    with hooked(llm, recorder):
        llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    return {(step, layer): ids.tolist() for layer, passes in recorder.ids.items() for step, ids in enumerate(passes)}


def point(llm: LLM, batch: int, policies: list[str], depths: list[int], repeats: int, new_tokens: int) -> dict:
    """One (link, cache, batch) point: `moespec bench`'s rows for on demand and `policies`, with the
    perfect guesses as rows of their own (on demand, their hooks attached), interleaved alike."""
    prompts = bench_prompts(llm, 32)(batch)
    routes = record(llm, prompts, new_tokens)
    spec = llm.spec

    def perfect(depth: int, across: bool) -> Speculation:
        guesses = PerfectGuesses(routes, list(spec.moe_layer_ids), spec.top_k, depth, across)
        return Speculation(llm.model, llm.experts, guesses, 0, "off")

    extra = {f"perfect d{d}{' across tokens' if across else ''}": Row(llm, "none", partial(perfect, d, across))
             for d in depths for across in (False, True)}
    cfg = BenchConfig(["none", *policies], [batch], new_tokens=new_tokens, repeats=repeats)
    result = bench(llm, lambda _: prompts, cfg, extra_rows=lambda _: extra)["batches"][str(batch)]
    base = result["policies"]["none"]
    for r in result["policies"].values():
        r["bytes_vs_on_demand"] = r["bytes_per_step"] / base["bytes_per_step"] if base["bytes_per_step"] else 1.0
    return result


def main() -> None:
    ap = point_args(__doc__.splitlines()[0], repeats=5, new_tokens=32)
    ap.add_argument("--policy", action="append", default=None,
                    help="real policies beside the perfect guesses (moespec bench names; default lookahead, estimator)")
    ap.add_argument("--depth", action="append", type=int, default=None, help="default 1 and 3")
    args = ap.parse_args()

    def measure(llm: LLM, batch: int) -> dict:
        p = point(llm, batch, args.policy or ["lookahead", "estimator"], args.depth or [1, 3], args.repeats,
                  args.new_tokens)
        p["eviction"] = llm.config.offload.eviction
        return p

    def report(llm: LLM, spec: str, p: dict) -> None:
        on_demand = p["policies"]["none"]
        print(f"[{llm.path.name}, {p['link']}] {spec}: on demand "
              f"{on_demand['ms_per_step_median']:.2f} ms/step, stall {on_demand['decode_stall_share']:.0%}, "
              f"{on_demand['times_link_bound_limit']:.2f}x the link-bound limit ({p['link_bound_limit_ms']:.2f} ms)")
        for name, r in p["policies"].items():
            print(f"    {name:<26} x{r['speedup_vs_on_demand']:.2f} on demand  {r['times_link_bound_limit']:.2f}x limit  "
                  f"bytes x{r['bytes_vs_on_demand']:.2f}  hit {r['decode_hit_rate']:.2f}  "
                  f"stall {r['decode_stall_share']:.0%}  guess {r.get('guess_ms_per_step', 0):.2f} ms/step", flush=True)

    run_points(args, "oracle-bound", measure, report)


if __name__ == "__main__":
    main()
