"""Replication policies side by side: the same batches through each, in one process group."""

from __future__ import annotations

import torch.distributed as dist

from .engine import Job, run_jobs
from .launch import launch
from .metrics import summarize
from .workload import Batch


def compare(model_dir: str, batches: list[Batch], variants: dict[str, dict], workers: int, *,
            device: str = "cpu", threads: int | None = None) -> dict:
    """Summary and per-step metrics per variant (name -> ExpertParallelEngine options, policy included).

    Inside an initialised process group (torchrun) the caller's group is used and `workers` is
    ignored; otherwise `workers` processes are launched, once for all variants.
    """
    jobs = [Job(model_dir, batches, dict(device=device, **options), keep_logits=False) for options in variants.values()]
    if dist.is_initialized():
        workers = dist.get_world_size()
        results = run_jobs(dist.get_rank(), workers, jobs)
    else:
        results = launch(run_jobs, workers, jobs, device=device, threads=threads)[0]
    return {"model": model_dir, "workers": workers, "device": device,
            "variants": {name: {"options": options, "summary": summarize(r["metrics"]),
                                "peak_experts_held": r["peak_experts_held"], "steps": r["metrics"]}
                         for (name, options), r in zip(variants.items(), results)}}
