"""`moespec bench`: every policy on the same prompts in one process, interleaved, side by side.

For each batch size the policies run in turn after a warm-up (A B C, then C B A, ...: every other
round in reverse, so no row always follows the same one), each run starting from a cold expert
cache, so slow drift of the machine hits all policies alike; a speed-up over on demand is the
median over rounds of the two runs' ratio in each round (`paired_speedup`). A reference run
with every expert resident on the device gives the compute time per decode step; with the bytes
that on-demand loading had to move, it gives the link-bound limit of the configuration:
max(compute time, required bytes / link bandwidth) per decode step.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..api import LLM
from ..decode.engine import Engine, StepKind
from ..decode.generate import Completion, generate
from ..decode.sampling import SamplingParams
from ..decode.stats import EngineStats
from ..experts.stats import ExpertStats, LayerStats
from ..experts.store import ResidentExperts
from ..hooks import ForwardHooks
from ..speculate.policy import Speculation

# name -> LLM.set_policy arguments
POLICIES: dict[str, dict] = {
    "none": {},
    "lookahead": {"prefetch": "lookahead"},
    "lookahead-d2": {"prefetch": "lookahead", "lookahead_depth": 2},
    "lookahead+2": {"prefetch": "lookahead", "prefetch_extra": 2},
    "estimator": {"prefetch": "estimator"},
    # two MoE layers ahead, and the next token's first layer from this token's last one
    "estimator-d2+next-token": {"prefetch": "estimator", "lookahead_depth": 2, "next_token": True},
    "auto": {"prefetch": "auto"},  # two layers deep with the next token where the estimators have its head
    "auto-d1": {"prefetch": "auto", "lookahead_depth": 1, "next_token": False},
    "auto-d1+next-token": {"prefetch": "auto", "lookahead_depth": 1, "next_token": True},
    "speculative": {"prefetch": "lookahead", "speculative_execution": "on"},
    "fallback": {"prefetch": "lookahead", "speculative_execution": "fallback"},
}


@dataclass
class BenchConfig:
    policies: list[str]
    batch_sizes: list[int]
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1


def link_bandwidth(llm: LLM) -> float:
    """Bytes/s of the host-to-device link: the emulated value on CPU, measured on a GPU."""
    if llm.device.type == "cpu":
        return llm.link_bandwidth or float("inf")
    src = llm.store[llm.store.keys[0]].gate_up
    dst = torch.empty_like(src, device=llm.device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(llm.device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(llm.device)
    return 10 * src.numel() * src.element_size() / (time.perf_counter() - start)


def _sync(llm: LLM) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


def reference_engine(llm: LLM) -> Engine:
    """The same model with every expert resident on the device: no copies at all."""
    return Engine(llm.model, ResidentExperts(llm.store, llm.device, ExpertStats(llm.spec.moe_layer_ids)),
                  None, llm.context_length, llm.device)


def compute_step(llm: LLM, engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds per decode step of one run on the reference engine (speculation hooks off)."""
    saved = llm.config.speculation
    llm.set_policy()
    engine.stats = type(engine.stats)()
    generate(engine, prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    _sync(llm)
    llm.set_policy(saved)
    return engine.stats.decode_seconds_per_step


@dataclass
class AtDecode:
    """A run's counters where its prefill ended and its decode steps began: the expert counters
    (bytes, hits, misses, stall) and the guessing hooks' time so far (a prefill guesses too, for
    statistics; it starts no copies). The run's decode phase is the run less these."""

    experts: LayerStats
    guess_seconds: float


class _MarkDecode:
    """A step kind: `kind`'s steps, with `take()` called once its prefill has run (between the
    prefill and the first decode step, so the decode steps' timing leaves it out)."""

    def __init__(self, kind: StepKind, take: Callable[[], AtDecode]):
        self.kind, self.take = kind, take
        self.at: AtDecode | None = None

    def __call__(self, *args) -> list[list[int]]:
        return self.kind(*args)

    def after_prefill(self) -> None:
        self.kind.after_prefill()
        if self.at is None:
            self.at = self.take()


def _guessed(s: EngineStats, guessing: Callable[[], float] | None) -> float | None:
    """The guessing time so far: `guessing()`, else the prefetch policy's hooks' (None: no policy)."""
    if guessing is not None:
        return guessing()
    return s.speculation.seconds if s.speculation is not None else None


def generate_marked(llm: LLM, prompts: list[list[int]], new_tokens: int,
                    guessing: Callable[[], float] | None = None, **options) -> tuple[list[Completion], AtDecode]:
    """Greedy `llm.generate` of token-id prompts, each running `new_tokens` (`options`: its
    self-speculative decoding), with the counters where its decode steps began. `guessing()`
    reads the guessing time (default: the LLM's prefetch policy's hooks).

    Taken inside the run, not from a separate prefill-only run: a cold prefill's stall varies from
    run to run (a disk's reads most), and subtracting another run's left tiny-qwen2moe's decode
    stall on the disk tier at 0% when its own decode steps stalled."""
    def take() -> AtDecode:
        s = llm.stats()
        return AtDecode(s.experts, _guessed(s, guessing) or 0.0)

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    with llm.step_kind(**options) as kind:
        marked = _MarkDecode(kind, take)
        out = generate(llm.engine, prompts, params, kind=marked)
    return out, marked.at


def one_run(llm: LLM, policy: str, prompts: list[list[int]], new_tokens: int,
            guessing: Callable[[], float] | None = None) -> dict:
    """One cold-cache run. Bytes, the "decode_" hit rate and stall share and the guessing time
    are the decode steps' (`AtDecode`'s subtracted): a cold prefill copies nearly every expert it
    can hold, so counted with it, hits and stalls say little about the decode steps, and its
    guesses (statistics only: a prefill starts no copies) are no decode step's cost.
    `guessing()`: reads the guessing time (default: the policy's hooks)."""
    llm.set_policy(**POLICIES[policy])
    llm.reset()
    _, before = generate_marked(llm, prompts, new_tokens, guessing)
    _sync(llm)
    s = llm.stats()
    d, e, at = s.decode, s.experts, before.experts
    guessed = _guessed(s, guessing)
    decode_bytes = e.bytes_moved - at.bytes_moved
    decode_uses = e.hits + e.misses - at.hits - at.misses
    right_guesses = e.prefetch_hits - at.prefetch_hits
    return {
        "seconds_per_step": d.decode_seconds_per_step,
        "seconds_per_output_token": d.decode_seconds_per_token,
        "prefill_tokens_per_s": d.prompt_tokens / d.prefill_seconds,
        "bytes_per_token": decode_bytes / d.decoded_tokens,
        "bytes_per_step": decode_bytes / d.decode_steps,
        "hit_rate": s.hit_rate,
        "stall_share": e.stall_seconds / (d.prefill_seconds + d.decode_seconds),
        "decode_hit_rate": (e.hits - at.hits) / decode_uses if decode_uses > 0 else None,
        "decode_stall_share": (e.stall_seconds - at.stall_seconds) / d.decode_seconds,
        "recall_at_k": s.speculation.by_depth[1].recall_at_k if s.speculation is not None else None,
        # how much of a right guess's copy was done when compute needed it
        "prefetch_landed_share": (e.prefetch_landed - at.prefetch_landed) / right_guesses
        if right_guesses else None,
        # the speculation hooks' own time in decode steps (guessing, scoring, issuing prefetches)
        "guess_ms_per_step": 1000 * (guessed - before.guess_seconds) / d.decode_steps
        if guessed is not None else None,
    }


@dataclass
class Row:
    """A row of a bench: `policy` (a POLICIES name) on `llm`, with the hooks `hook()` makes attached
    to the model around each of its runs (None: nothing attached; benchmarks/oracle_bound.py
    attaches perfect guesses). An attached Speculation's time is the row's guessing time."""

    llm: LLM
    policy: str
    hook: Callable[[], Speculation | None] = lambda: None


@contextmanager
def hooked(llm: LLM, hook: ForwardHooks | None) -> Iterator[None]:
    """`hook` attached to the model while the context lasts (no hook: nothing)."""
    if hook is not None:
        llm.model.hooks.append(hook)
    try:
        yield
    finally:
        if hook is not None:
            llm.model.hooks.remove(hook)


def row_run(row: Row, prompts: list[list[int]], new_tokens: int) -> dict:
    """`one_run` of the row, its hook attached (its time counted as the guessing)."""
    hook = row.hook()
    with hooked(row.llm, hook):
        return one_run(row.llm, row.policy, prompts, new_tokens, None if hook is None else lambda: hook.seconds)


def _summary(runs: list[dict]) -> dict:
    steps = [r["seconds_per_step"] for r in runs]
    # medians over the runs that have a value (auto may guess in one run and not in another)
    values = {key: [r[key] for r in runs if r[key] is not None] for key in runs[0]}
    out = {key: statistics.median(v) for key, v in values.items() if v}
    out["ms_per_step_median"] = 1000 * statistics.median(steps)
    out["ms_per_step_min"], out["ms_per_step_max"] = 1000 * min(steps), 1000 * max(steps)
    out["ms_per_output_token_median"] = 1000 * statistics.median(r["seconds_per_output_token"] for r in runs)
    return out


def paired_speedup(on_demand: list[dict], runs: list[dict]) -> dict:
    """A row's speed-up over on demand: in each round, on demand's seconds per step over the row's,
    then the median of those ratios, and their range. Paired within a round, the ratios cancel the
    machine's slow drift, which a ratio of the two medians does not (two medians may come from
    different rounds)."""
    ratios = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(on_demand, runs)]
    return {"speedup_vs_on_demand": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)]}


def bench(llm: LLM, prompts_for: Callable[[int], list[list[int]]], cfg: BenchConfig,
          variants: dict[str, LLM] | None = None,
          extra_rows: Callable[[list[list[int]]], dict[str, Row]] | None = None) -> dict:
    """Run every policy at every batch size; `prompts_for(B)` gives B prompts of token ids.

    `variants`: other loads of the same model (e.g. other expert dtypes) whose policies run
    interleaved with `llm`'s; their rows are named "name/policy", their speed-ups are against
    `llm`'s on-demand run and their link-bound limit uses their own on-demand bytes.
    `extra_rows(prompts)`: more rows by name for a batch's prompts, interleaved with the others."""
    bandwidth = link_bandwidth(llm)
    results = {"link": llm.link_note(), "link_bandwidth_bytes_per_s": bandwidth, "cache_slots": llm.experts.capacity,
               "total_experts": len(llm.store.keys), "expert_bytes": llm.store.expert_bytes,
               "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg(),
               "engine_config": llm.config.as_dict(), "batches": {}}
    loads = {"": llm, **(variants or {})}
    if variants:
        results["variants"] = {name: {"cache_slots": v.experts.capacity, "expert_bytes": v.store.expert_bytes,
                                      "engine_config": v.config.as_dict()} for name, v in variants.items()}
    for batch in cfg.batch_sizes:
        prompts = prompts_for(batch)
        rows_of = {f"{name}/{policy}" if name else policy: Row(load, policy)
                   for name, load in loads.items() for policy in cfg.policies}
        rows_of.update(extra_rows(prompts) if extra_rows is not None else {})
        reference = reference_engine(llm)
        for _ in range(cfg.warmup):  # its rows are thrown away: nothing to subtract
            for row in rows_of.values():
                row_run(row, prompts, 4)
            compute_step(llm, reference, prompts, 4)
        runs: dict[str, list[dict]] = {name: [] for name in rows_of}
        computes = []
        for rep in range(cfg.repeats):  # the compute reference interleaved with the policies
            for name in list(rows_of) if rep % 2 == 0 else list(rows_of)[::-1]:
                runs[name].append(row_run(rows_of[name], prompts, cfg.new_tokens))
            computes.append(compute_step(llm, reference, prompts, cfg.new_tokens))
        compute = statistics.median(computes)
        rows = {p: _summary(r) for p, r in runs.items()}
        base = rows.get("none")
        required = base["bytes_per_step"] if base else None
        limit = max(compute, required / bandwidth) if required is not None else compute
        for name, row in rows.items():
            own_base = rows.get(name.rsplit("/", 1)[0] + "/none") if "/" in name else base
            if base:
                row.update(paired_speedup(runs["none"], runs[name]))
                if "guess_ms_per_step" in row:
                    row["guess_share_of_on_demand_step"] = row["guess_ms_per_step"] / base["ms_per_step_median"]
            own_limit = max(compute, own_base["bytes_per_step"] / bandwidth) if own_base else limit
            row["times_link_bound_limit"] = row["ms_per_step_median"] / (1000 * own_limit)
        results["batches"][str(batch)] = {"compute_ms_per_step": 1000 * compute, "link_bound_limit_ms": 1000 * limit,
                                          "required_bytes_per_step": required, "policies": rows}
    for load in loads.values():
        load.reset()
    results["load_average_after"] = os.getloadavg()
    return results


def format_table(results: dict) -> list[str]:
    """One line per (batch, policy); each line names how the link was timed."""
    link = results["link"]
    lines = []
    for batch, b in results["batches"].items():
        lines.append(f"[{link}] batch {batch}: compute {b['compute_ms_per_step']:.2f} ms/step, "
                     f"link-bound limit {b['link_bound_limit_ms']:.2f} ms/step")
        for name, r in b["policies"].items():
            lines.append(
                f"[{link}] batch {batch:>3} {name:<13} {r['ms_per_step_median']:8.2f} ms/step "
                f"({r['ms_per_step_min']:.2f}-{r['ms_per_step_max']:.2f}), {r['ms_per_output_token_median']:.2f} "
                f"ms/output token  "
                f"x{r.get('speedup_vs_on_demand', float('nan')):.2f} vs on-demand "
                f"({'-'.join(f'{v:.2f}' for v in r.get('speedup_range', []))})  "
                f"{r['times_link_bound_limit']:.2f}x limit  prefill {r['prefill_tokens_per_s']:.0f} tok/s  "
                f"{r['bytes_per_token'] / 1e6:.3f} MB/tok  decode hit {100 * (r['decode_hit_rate'] or 0):.1f}%  "
                f"decode stall {100 * r['decode_stall_share']:.1f}%"
                + (f"  guess {r['guess_ms_per_step']:.2f} ms/step" if r.get("guess_ms_per_step") is not None else ""))
    return lines


def format_sweep(sweep: dict[str, dict[str, dict]]) -> list[str]:
    """A link sweep (link speed -> cache size -> bench results) as a Markdown table: per point,
    how much on-demand's decode steps stall and how far it is from the link-bound limit, then the best exact
    prefetching policy (on-demand and speculative execution excluded) with its speed-up, bytes per
    token against on-demand's and distance to the limit."""
    lines = ["| link | cache | batch | on-demand decode stall | on-demand × limit | best exact prefetching policy "
             "| × on-demand (rounds' range) | bytes × on-demand | × link-bound limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for speed, sizes in sweep.items():
        for size, result in sizes.items():
            for batch, b in result["batches"].items():
                rows = b["policies"]
                base = rows.get("none")
                if base is None:  # nothing to compare with
                    continue
                exact = {name: r for name, r in rows.items() if name not in ("none", "speculative", "fallback")}
                if not exact:
                    continue
                name, best = max(exact.items(), key=lambda item: item[1]["speedup_vs_on_demand"])
                bytes_ratio = best["bytes_per_token"] / base["bytes_per_token"] if base["bytes_per_token"] else 1.0
                low, high = best["speedup_range"]
                lines.append(f"| {speed} | {size} | {batch} | {100 * base['decode_stall_share']:.0f}% | "
                             f"{base['times_link_bound_limit']:.2f} | {name} | "
                             f"{best['speedup_vs_on_demand']:.2f} ({low:.2f}-{high:.2f}) | {bytes_ratio:.2f} | "
                             f"{best['times_link_bound_limit']:.2f} |")
    return lines
