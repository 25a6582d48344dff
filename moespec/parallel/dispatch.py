"""Expert-parallel execution of one MoE layer: dispatch (token, k) pairs to replicas, compute, combine.

Every worker runs the dense part of the model on its own rows of the batch; at a routed layer the
(token, choice) pairs travel to the workers holding their expert (`all_to_all`), are computed
there, and travel back to be weighted and summed exactly as `model.moe.run_experts` does, so the
result is the single-process math up to floating-point summation order inside the GEMMs.

Sharing an expert's tokens among its replicas needs no extra message: one all-reduce of the
[workers, experts] count matrix gives every worker the same picture. Expert e's tokens are
numbered worker by worker (worker 0's first), and each replica takes a contiguous range of the
numbers (evenly, or water-filled to balance the workers: `Placement.shares`); from the same counts
each worker knows how many rows it sends to and receives from every other, and which replica each
received row is for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..experts.base import ExpertWeights
from ..model.moe import ExpertFn, combine_choices, routed_inputs
from .planner import Plan


@dataclass(frozen=True)
class Placement:
    """A plan as dispatch tables. Physical replicas p are numbered worker by worker, slot by slot."""

    expert: torch.Tensor  # [P] expert of replica p
    worker: torch.Tensor  # [P] worker holding replica p
    index: torch.Tensor  # [P] p is the index-th replica of its expert
    replicas: torch.Tensor  # [E] replicas per expert
    table: torch.Tensor  # [E, max replicas] replica id of expert e's i-th replica (-1: none)
    num_workers: int

    @classmethod
    def from_plan(cls, plan: Plan, device: torch.device | str = "cpu") -> "Placement":
        expert, worker, index, seen = [], [], [], [0] * len(plan.replicas)
        table = [[-1] * max(plan.replicas) for _ in plan.replicas]
        for w, experts in enumerate(plan.workers):
            for e in experts:
                table[e][seen[e]] = len(expert)
                expert.append(e)
                worker.append(w)
                index.append(seen[e])
                seen[e] += 1
        if seen != list(plan.replicas):
            raise ValueError("plan places a different number of replicas than it counts")

        def t(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(t(expert), t(worker), t(index), t(list(plan.replicas)), t(table), len(plan.workers))

    def shares(self, totals: torch.Tensor, split: str) -> torch.Tensor:
        """[P] tokens each replica takes of its expert's `totals` [E] this step.

        "even": replica i of r takes [i·T // r, (i+1)·T // r). "balanced": experts with one replica
        are fixed; replicated ones, heaviest first, fill their replicas' workers from the least
        loaded up (water-filling), so actual counts, not the forecast, decide the final balance.
        """
        if split == "even":
            t, r = totals[self.expert], self.replicas[self.expert]
            return (self.index + 1) * t // r - self.index * t // r
        t, replicas, worker = totals.tolist(), self.replicas.tolist(), self.worker.tolist()
        shares, load = [0] * len(worker), [0] * self.num_workers
        for p, e in enumerate(self.expert.tolist()):
            if replicas[e] == 1:
                shares[p] = t[e]
                load[worker[p]] += t[e]
        for e in sorted((e for e, r in enumerate(replicas) if r > 1), key=lambda e: (-t[e], e)):
            ps = self.table[e, :replicas[e]].tolist()
            for p, amount in zip(ps, water_fill([load[worker[p]] for p in ps], t[e])):
                shares[p] = amount
                load[worker[p]] += amount
        return torch.tensor(shares, dtype=torch.long, device=totals.device)

    def _ends(self, shares: torch.Tensor) -> torch.Tensor:
        """[E, max replicas]: where each replica's range of its expert's token numbers ends (padding: never)."""
        table = torch.zeros(self.table.shape, dtype=torch.long, device=shares.device)
        table[self.expert, self.index] = shares
        ends = torch.cumsum(table, dim=1)
        return torch.where(self.table >= 0, ends, torch.iinfo(torch.long).max)

    def rows(self, counts: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """[workers, P]: rows each worker sends to each replica, given counts [workers, E] of routed pairs.

        Expert e's pairs are numbered worker by worker; each replica takes a contiguous range of them.
        """
        ends = torch.cumsum(counts, dim=0)[:, self.expert]
        starts = ends - counts[:, self.expert]
        hi = self._ends(shares)[self.expert, self.index]
        return (torch.minimum(ends, hi) - torch.maximum(starts, hi - shares)).clamp(min=0)

    def per_worker(self, values: torch.Tensor) -> torch.Tensor:
        """Sum [..., P] per-replica values into [..., workers]."""
        out = values.new_zeros(*values.shape[:-1], self.num_workers)
        return out.index_add_(-1, self.worker, values)

    def replica_of(self, counts: torch.Tensor, rank: int, experts: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """Replica of each of this worker's pairs; `experts` [n] must be sorted (stable) by expert."""
        local = counts[rank]
        first = torch.cumsum(local, dim=0) - local
        offset = (torch.cumsum(counts, dim=0) - counts)[rank]
        g = offset[experts] + torch.arange(len(experts), device=experts.device) - first[experts]
        index = (self._ends(shares)[experts] <= g[:, None]).sum(dim=1)
        return self.table[experts, index]


def water_fill(levels: list[int], total: int) -> list[int]:
    """Split `total` into integer amounts that raise the lowest `levels` first, as evenly as possible."""
    order = sorted(range(len(levels)), key=lambda i: (levels[i], i))
    filled = 0
    for j, i in enumerate(order, start=1):
        filled += levels[i]
        height = (total + filled) / j
        if j == len(order) or height <= levels[order[j]]:
            break
    amounts = [max(0.0, height - level) for level in levels]
    out = [math.floor(a) for a in amounts]
    for i in sorted(range(len(levels)), key=lambda i: (out[i] - amounts[i], i))[:total - sum(out)]:
        out[i] += 1
    return out


@dataclass
class LayerRecord:
    """What one worker saw at one MoE layer of one step."""

    loads: torch.Tensor  # [E] routed pairs per expert over all workers
    rows: torch.Tensor  # [workers] rows each worker computed
    busy: float  # seconds this worker spent computing experts


@dataclass
class ExpertParallel:
    """A RoutedExecutor (model.moe) that runs routed experts across the workers of a process group."""

    rank: int
    world: int
    weights: dict[tuple[int, int], ExpertWeights]  # (layer, expert) -> weights held by this worker
    placements: dict[int, Placement]  # per MoE layer
    group: dist.ProcessGroup | None = None
    split: str = "even"  # how a replicated expert's tokens are shared out: see Placement.shares
    records: dict[int, LayerRecord] = field(default_factory=dict)  # per layer, for the current step

    def run_routed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   expert_fn: ExpertFn, scales_input: bool = False) -> torch.Tensor:
        placement = self.placements[layer]
        k = ids.shape[1]
        E = placement.replicas.shape[0]
        flat = ids.flatten()
        counts = torch.zeros(self.world, E, dtype=torch.long, device=x.device)
        counts[self.rank] = torch.bincount(flat, minlength=E)
        dist.all_reduce(counts, group=self.group)
        shares = placement.shares(counts.sum(dim=0), self.split)
        rows = placement.rows(counts, shares)  # [workers, P]

        by_expert = torch.argsort(flat, stable=True)
        replica = placement.replica_of(counts, self.rank, flat[by_expert], shares)
        by_replica = torch.argsort(replica, stable=True)
        send = by_expert[by_replica]  # pair ids in send order: by destination worker, then replica
        send_counts = placement.per_worker(rows[self.rank]).tolist()
        mine = torch.nonzero(placement.worker == self.rank).flatten()
        recv_counts = rows[:, mine].sum(dim=1).tolist()

        received = x.new_empty(sum(recv_counts), x.shape[1])
        sent = routed_inputs(x, weights, send, k, scales_input)
        dist.all_to_all_single(received, sent, recv_counts, send_counts, group=self.group)
        out, busy = self._compute(layer, received, rows[:, mine], placement.expert[mine], expert_fn)
        back = x.new_empty(len(send), x.shape[1])
        dist.all_to_all_single(back, out, send_counts, recv_counts, group=self.group)

        self.records[layer] = LayerRecord(counts.sum(dim=0), placement.per_worker(rows.sum(dim=0)), busy)
        return combine_choices(back, weights, send, scales_input, x.dtype)

    def _compute(self, layer: int, received: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                 expert_fn: ExpertFn) -> tuple[torch.Tensor, float]:
        """Run local replicas on received rows, which arrive sender by sender, replica by replica."""
        start = time.perf_counter()
        replica = torch.repeat_interleave(torch.arange(len(experts), device=received.device).repeat(self.world),
                                          rows.flatten())
        order = torch.argsort(replica, stable=True)
        out = torch.empty_like(received)
        chunks = received[order].split(rows.sum(dim=0).tolist())
        results = [expert_fn(chunk, self.weights[(layer, e)])
                   for chunk, e in zip(chunks, experts.tolist())]
        if results:
            out[order] = torch.cat(results).to(received.dtype)
        if received.is_cuda:
            torch.cuda.synchronize(received.device)
        return out, time.perf_counter() - start
