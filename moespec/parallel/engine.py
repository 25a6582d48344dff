"""One worker of expert-parallel inference with load-driven expert replication.

Every worker of a torch.distributed process group runs the same program (SPMD): it loads the dense
model (small) and the experts its placement gives it, takes its contiguous share of each batch's
rows, runs attention locally and exchanges routed tokens with the other workers at every MoE layer
(`dispatch.ExpertParallel`). Between batches the placement can change:

    step t:  commit the plan prepared during step t-1 (its copies have landed: no stall, normally)
             forecast loads of batch t+1 -> plan (planner.plan, per layer) -> start copying the
                 experts it adds here, in the background
             run batch t; observe its actual per-layer loads (every worker sees all of them)

Policies: "none" keeps one replica per expert in contiguous blocks; "static" plans from the moving
average of observed loads; "predictive" blends that with a forecast of batch t+1 from its token
ids (predict.py). Forecasts are all-reduced, and the planner is deterministic, so every worker
derives the same plan without sending it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import open_checkpoint
from ..experts.store import ExpertStore
from ..model.load import build_model
from ..model.switch import SwitchTransformer
from .dispatch import ExpertParallel, Placement
from .metrics import StepMetrics
from .planner import Plan, default_plan, plan
from .predict import LoadForecast, RouterLookahead, RoutingMemory, forecast_error
from .replicas import LocalExperts
from .workload import Batch

POLICIES = ("none", "static", "predictive")
PREDICTORS = ("memory", "lookahead")
SPLITS = ("even", "balanced")


def default_slots(num_experts: int, workers: int, redundancy: float = 0.25) -> int:
    """Expert slots per worker and MoE layer: an even share plus `redundancy` of it for replicas."""
    return math.ceil(math.ceil(num_experts / workers) * (1 + redundancy))


class ExpertParallelEngine:
    """A worker of the SPMD engine; torch.distributed must be initialised (see launch.py).

    slots: expert slots per worker per MoE layer (default: the even share + 25%).
    predictor: what "predictive" reads the next batch with (predict.RoutingMemory or RouterLookahead).
    split: how replicas of an expert share its tokens: "even" (as EPLB), or "balanced" (water-filled
        from the actual counts at each layer; the outputs are the same either way).
    history_decay / lookahead_weight: see predict.LoadForecast.
    stickiness: a replica stays on the worker holding it when that costs at most this fraction of
        the mean worker load (moving weights is not free); 0 replans from scratch.
    """

    def __init__(self, model_dir: str | Path, *, policy: str = "none", slots: int | None = None,
                 dtype: str | torch.dtype = "float32", device: str = "cpu", predictor: str = "memory",
                 split: str = "even", history_decay: float = 0.5, lookahead_weight: float = 0.75,
                 stickiness: float = 0.05, group: dist.ProcessGroup | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.policy, self.group, self.stickiness = policy, group, stickiness
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
        checkpoint = open_checkpoint(model_dir)
        self.spec = checkpoint.spec
        E = self.spec.num_experts
        self.slots = slots or default_slots(E, self.world)
        if self.slots * self.world < E:
            raise ValueError(f"{self.world} workers × {self.slots} slots cannot hold {E} experts")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = build_model(checkpoint, dtype, self.device)
        store = ExpertStore(checkpoint, dtype, pin=self.device.type == "cuda", tier="disk",
                            host_cache=2 * self.slots * len(self.spec.moe_layer_ids))
        self.local = LocalExperts(store, self.device)
        self.plans = {layer: default_plan(E, self.world) for layer in self.spec.moe_layer_ids}
        self.local.load(self._keys(self.plans))
        self.executor = ExpertParallel(self.rank, self.world, self.local.weights, self._placements(self.plans), group,
                                       split)
        self.forecast = LoadForecast(history_decay, lookahead_weight)
        self.predictor: RouterLookahead | RoutingMemory | None = None
        if policy == "predictive":
            self.predictor = RoutingMemory(self.model, group) if predictor == "memory" else RouterLookahead(self.model)
        if isinstance(self.predictor, RoutingMemory):
            self.model.hooks.append(self.predictor)
        self._next: tuple[dict[int, Plan], torch.Tensor] | None = None  # plans for the next batch + their forecast
        self.steps = 0

    def _keys(self, plans: dict[int, Plan]) -> set[tuple[int, int]]:
        return {(layer, e) for layer, p in plans.items() for e in p.workers[self.rank]}

    def _placements(self, plans: dict[int, Plan]) -> dict[int, Placement]:
        return {layer: Placement.from_plan(p, self.device) for layer, p in plans.items()}

    def _plan_next(self, next_batch: Batch) -> None:
        """Forecast the next batch's loads, plan, and start moving weights for it."""
        predicted = None
        if self.predictor is not None:
            predicted = self.predictor.expert_counts(next_batch.rows(self.rank, self.world).to(self.device))
            dist.all_reduce(predicted, group=self.group)
        loads = self.forecast.forecast(predicted)
        if loads is None:
            return
        plans = {layer: plan(loads[i].tolist(), self.world, self.slots, self.plans[layer], self.stickiness)
                 for i, layer in enumerate(self.spec.moe_layer_ids)}
        self.local.prepare(self._keys(plans))
        self._next = (plans, loads)

    def _forward(self, batch: Batch) -> torch.Tensor:
        if isinstance(self.predictor, RoutingMemory):
            self.predictor.watch(batch)
        if isinstance(self.model, SwitchTransformer):
            return self.model.score(batch.tokens, batch.decoder_tokens, self.executor)
        cache = self.model.new_cache(*batch.tokens.shape)
        return self.model.logits(self.model(batch.tokens, cache, self.executor))

    @torch.inference_mode()
    def step(self, batch: Batch, next_batch: Batch | None = None) -> tuple[torch.Tensor, StepMetrics]:
        """Run `batch` (all workers pass the same one); prepare the placement for `next_batch`.

        Returns this worker's logits (its rows, see Batch.rows) and the step's metrics.
        """
        if batch.tokens.shape[0] < self.world:
            raise ValueError(f"a batch needs at least one row per worker ({self.world}), got {batch.tokens.shape[0]}")
        start = time.perf_counter()
        moved_before = self.local.moved
        stall = self.local.commit()
        forecast = None
        if self._next is not None:
            self.plans, forecast = self._next
            self.executor.placements = self._placements(self.plans)
            self._next = None
        if self.policy != "none" and next_batch is not None:
            self._plan_next(next_batch)
        logits = self._forward(batch.rows(self.rank, self.world).to(self.device))
        seconds = time.perf_counter() - start
        records = [self.executor.records[layer] for layer in self.spec.moe_layer_ids]
        actual = torch.stack([r.loads for r in records]).double().cpu()
        self.forecast.observe(actual)
        if isinstance(self.predictor, RoutingMemory):
            self.predictor.learn()
        metrics = self._metrics(records, seconds, stall, self.local.moved - moved_before, actual, forecast)
        self.steps += 1
        return logits, metrics

    def _metrics(self, records, seconds: float, stall: float, moved: int, actual: torch.Tensor,
                 forecast: torch.Tensor | None) -> StepMetrics:
        """Token counts are known to every worker; times and copies are gathered with one all-reduce."""
        mine = torch.tensor([seconds, stall, moved] + [r.busy for r in records], dtype=torch.float64)
        table = torch.zeros(self.world, len(mine), dtype=torch.float64, device=self.device)
        table[self.rank] = mine.to(self.device)
        dist.all_reduce(table, group=self.group)
        table = table.cpu()
        busy = table[:, 3:]  # [workers, layers]
        rows = torch.stack([r.rows for r in records]).double().cpu()  # [layers, workers]
        imbalance = (rows.max(dim=1).values / rows.mean(dim=1).clamp(min=1e-12)).mean()
        slowest = busy.max(dim=0).values.sum()
        return StepMetrics(
            step=self.steps,
            seconds=float(table[:, 0].max()),
            tokens_per_worker=[int(t) for t in rows.sum(dim=0)],
            imbalance=float(imbalance),
            utilisation=float(busy.sum() / (self.world * slowest)) if slowest > 0 else 1.0,
            expert_seconds=float(slowest),
            critical_rows=int(rows.max(dim=1).values.sum()),
            stall_seconds=float(table[:, 1].max()),
            moved_experts=int(table[:, 2].sum()),
            forecast_error=None if forecast is None else forecast_error(forecast, actual),
        )

    def run(self, batches: list[Batch]) -> tuple[list[torch.Tensor], list[StepMetrics]]:
        """Every batch in order, each step preparing the next; this worker's logits and all metrics."""
        out = [self.step(b, batches[i + 1] if i + 1 < len(batches) else None) for i, b in enumerate(batches)]
        return [logits for logits, _ in out], [m for _, m in out]

    def close(self) -> None:
        self.local.close()


@dataclass
class Job:
    """A workload for run_jobs: a model, its batches, ExpertParallelEngine keyword arguments."""

    model_dir: str
    batches: list[Batch]
    engine: dict = field(default_factory=dict)
    keep_logits: bool = True


def run_jobs(rank: int, world: int, jobs: list[Job]) -> list[dict]:
    """A worker body for launch(): each job in turn in the same process group (one start-up for all).

    Per job: this worker's logits per batch (if kept), the step metrics, and the most experts any
    worker held at once (all MoE layers together).
    """
    out = []
    for job in jobs:
        engine = ExpertParallelEngine(job.model_dir, **job.engine)
        try:
            logits, metrics = engine.run(job.batches)
        finally:
            engine.close()
        peak = torch.tensor([engine.local.peak], device=engine.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out.append({"logits": logits if job.keep_logits else None, "metrics": [m.as_dict() for m in metrics],
                    "peak_experts_held": int(peak)})
    return out
