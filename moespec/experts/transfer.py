"""Asynchronous host -> device copies of expert weights.

On CUDA, copies run on a dedicated high-priority stream from pinned host memory; compute waits for
a copy's event only where it needs that expert, never with a device-wide sync. On the CPU there is
no link to measure, so a worker thread does the copies and can emulate a link of a given bandwidth
(each copy then takes bytes / bandwidth seconds), which lets the overlap of copies and compute be
measured on machines without a GPU.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .base import ExpertWeights
from .trace import TRANSFER_LANE, Tracer

UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_bandwidth(text: str) -> float:
    """'25GB/s' -> 25e9 bytes per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B/s\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"link bandwidth must look like '25GB/s', got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def _nbytes(w: ExpertWeights) -> int:
    return w.gate_up.numel() * w.gate_up.element_size() + w.down.numel() * w.down.element_size()


class CpuTransfers:
    """One worker thread plays the link: copies run one after another, overlapping compute."""

    def __init__(self, link_bandwidth: float | None):
        self.bandwidth = link_bandwidth
        self.tracer: Tracer | None = None  # set by LLM.start_trace: one transfer-lane slice per copy
        self._link = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespec-link")

    def copy(self, src: ExpertWeights, dst: ExpertWeights, label: str, slot: int) -> Future:
        return self._link.submit(self._run, src, dst, label)

    def _run(self, src: ExpertWeights, dst: ExpertWeights, label: str) -> None:
        start = time.perf_counter()
        dst.gate_up.copy_(src.gate_up)
        dst.down.copy_(src.down)
        if self.bandwidth:
            time.sleep(max(0.0, start + _nbytes(src) / self.bandwidth - time.perf_counter()))
        if self.tracer:
            t0 = (start - self.tracer.t0) * 1e6
            self.tracer.slice(TRANSFER_LANE, label, t0, self.tracer.now_us(), bytes=_nbytes(src))

    def wait(self, handle: Future, layer: int) -> float:
        """Block until the copy is done; return the seconds compute stalled."""
        if handle.done():
            handle.result()
            return 0.0
        start = time.perf_counter()
        handle.result()
        return time.perf_counter() - start

    def done(self, handle: Future) -> bool:
        return handle.done()

    def slot_released(self, slot: int) -> None:
        """Compute on the CPU is synchronous: a released slot is free at once."""

    def collect_stalls(self) -> dict[int, float]:
        """CPU stalls are measured as they happen (returned by `wait`)."""
        return {}

    def close(self) -> None:
        self._link.shutdown(wait=True)


class CudaTransfers:
    """Copies on a high-priority side stream; per-slot events keep copies off slots still in use."""

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self._slot_free = [None] * slots  # event recorded on the compute stream when a slot was last used
        self._stalls: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def copy(self, src: ExpertWeights, dst: ExpertWeights, label: str, slot: int) -> torch.cuda.Event:
        done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            if self._slot_free[slot] is not None:
                self.stream.wait_event(self._slot_free[slot])
            dst.gate_up.copy_(src.gate_up, non_blocking=True)
            dst.down.copy_(src.down, non_blocking=True)
            done.record(self.stream)
        return done

    def wait(self, handle: torch.cuda.Event, layer: int) -> float:
        """Make the compute stream wait for the copy (no host sync); its stall is read later."""
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        torch.cuda.current_stream(self.device).wait_event(handle)
        after.record()
        self._stalls.append((layer, before, after))
        return 0.0

    def done(self, handle: torch.cuda.Event) -> bool:
        return handle.query()

    def slot_released(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record()
        self._slot_free[slot] = event

    def collect_stalls(self) -> dict[int, float]:
        """Seconds the compute stream waited for copies, per layer, since the last call (one sync)."""
        torch.cuda.synchronize(self.device)
        per_layer: dict[int, float] = {}
        for layer, before, after in self._stalls:
            per_layer[layer] = per_layer.get(layer, 0.0) + before.elapsed_time(after) / 1000
        self._stalls.clear()
        return per_layer

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
