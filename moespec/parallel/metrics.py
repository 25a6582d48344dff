"""Per-step metrics of the expert-parallel engine, and their summary over a run."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class StepMetrics:
    """One batch over all workers. Rows are routed (token, choice) pairs computed by a worker."""

    step: int
    seconds: float  # wall time of the whole step (commit, planning, forward), slowest worker
    tokens_per_worker: list[int]  # rows computed per worker, summed over MoE layers
    imbalance: float  # mean over MoE layers of max / mean rows per worker (1.0 = perfectly even)
    utilisation: float  # expert compute time / (workers × the slowest worker's), summed over layers
    expert_seconds: float  # the expert phase's critical path: per layer the slowest worker, summed
    critical_rows: int  # the same in rows: per layer the most loaded worker's rows, summed
    stall_seconds: float  # waiting for replica copies at the batch boundary, slowest worker
    moved_experts: int  # expert copies that landed at this boundary, all workers
    forecast_error: float | None  # total variation distance of the plan's forecast from the actual loads

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(steps: list[dict], warmup: int = 1) -> dict:
    """Means (medians for times) over the steps after `warmup`, which run before any replication."""
    kept = steps[warmup:] or steps
    errors = [s["forecast_error"] for s in kept if s["forecast_error"] is not None]
    return {
        "steps": len(kept),
        "imbalance_mean": statistics.fmean(s["imbalance"] for s in kept),
        "imbalance_max": max(s["imbalance"] for s in kept),
        "step_seconds_median": statistics.median(s["seconds"] for s in kept),
        "expert_seconds_median": statistics.median(s["expert_seconds"] for s in kept),
        "critical_rows_mean": statistics.fmean(s["critical_rows"] for s in kept),
        "utilisation_mean": statistics.fmean(s["utilisation"] for s in kept),
        "stall_seconds_total": sum(s["stall_seconds"] for s in kept),
        "moved_experts_per_step": statistics.fmean(s["moved_experts"] for s in kept),
        "forecast_error_mean": statistics.fmean(errors) if errors else None,
    }
