"""Starting the workers: moespec spawns them itself on this machine, or torchrun starts them.

`launch` starts `world_size` fresh processes (spawn, so no state leaks from the parent), joins
them in one process group over 127.0.0.1 (gloo on CPU, NCCL on GPUs, one GPU per worker), runs
`worker(rank, world_size, *args)` in each and returns every rank's result, in rank order. If any
worker fails, the others are stopped and the first traceback is raised. Under torchrun, call
`init_from_env` instead and run the worker body directly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(minutes=5)


class WorkerError(RuntimeError):
    pass


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(device: str = "cpu") -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)


def _entry(worker: Callable[..., Any], rank: int, world_size: int, port: int, device: str, threads: int,
           args: tuple, results: mp.Queue) -> None:
    torch.set_num_threads(threads)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
        result = worker(rank, world_size, *args)
        results.put((rank, pickle.dumps(result), None))  # by value: the process may exit before it is read
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(worker: Callable[..., Any], world_size: int, *args: Any, device: str = "cpu",
           threads: int | None = None) -> list[Any]:
    """Run worker(rank, world_size, *args) in `world_size` new processes; their results in rank order.

    `worker` must be importable by name (a module-level function). threads: torch threads per
    worker (default: this machine's cores shared out evenly).
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, rank, world_size, port, device, threads, args, results))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    try:
        while len(done) < world_size:
            try:
                rank, payload, error = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(f"worker {dead[0]} exited with code {procs[dead[0]].exitcode} and no result")
                continue
            if error is not None:
                raise WorkerError(f"worker {rank} failed:\n{error}")
            done[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            if p.is_alive() and len(done) < world_size:
                p.terminate()
            p.join()
    return [done[r] for r in range(world_size)]
