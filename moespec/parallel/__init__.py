"""Expert parallelism over torch.distributed with load-driven expert replication (EPLB-style planning,
router-lookahead load prediction, asynchronous re-placement between batches)."""

from .engine import POLICIES, ExpertParallelEngine, Job, run_jobs
from .launch import init_from_env, launch
from .metrics import StepMetrics, summarize
from .planner import Plan, default_plan, plan
from .workload import Batch, skewed_batches

__all__ = ["POLICIES", "Batch", "ExpertParallelEngine", "Job", "Plan", "StepMetrics", "default_plan", "init_from_env",
           "launch", "plan", "run_jobs", "skewed_batches", "summarize"]
