"""Asynchronous host -> device copies of expert weights.

On CUDA, copies run on a dedicated high-priority stream from pinned host memory; compute waits for
a copy's event only where it needs that expert, never with a device-wide sync. On the CPU there is
no link to measure, so a worker thread does the copies and can emulate a link of a given bandwidth
(each copy then takes bytes / bandwidth seconds), which lets the overlap of copies and compute be
measured on machines without a GPU.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future

import torch

from .base import ExpertWeights
from .trace import TRANSFER_LANE, Tracer

def _nbytes(w: ExpertWeights) -> int:
    return w.gate_up.numel() * w.gate_up.element_size() + w.down.numel() * w.down.element_size()


class _Copy:
    """One queued copy on the emulated link."""

    def __init__(self, src: ExpertWeights, dst: ExpertWeights, label: str):
        self.src, self.dst, self.label = src, dst, label
        self.future: Future = Future()
        self.started = False  # set under the link's lock when the link thread takes it


class CpuTransfers:
    """One worker thread plays the link: copies run one after another, overlapping compute.

    Demand copies (a layer is waiting) go ahead of queued prefetches, and a prefetch that compute
    starts waiting for is promoted, so wrong guesses never delay a copy the model needs now. A
    prefetch not yet started can be cancelled once its guess is known to be wrong. A copy already
    on the link is never interrupted.
    """

    def __init__(self, link_bandwidth: float | None, tracer: Tracer | None = None):
        self.bandwidth = link_bandwidth
        self.tracer = tracer  # one transfer-lane slice per copy, while it records
        self._stalls: dict[int, float] = {}  # layer -> seconds compute waited, since collect_stalls
        self._queue: list[tuple[int, int, _Copy]] = []  # heap of (-1 waited on / 0 demand / 1 prefetch, arrival, copy)
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="moespec-link", daemon=True)
        self._thread.start()

    def copy(self, src: ExpertWeights, dst: ExpertWeights, label: str, slot: int, urgent: bool = True) -> _Copy:
        job = _Copy(src, dst, label)
        with self._lock:
            heapq.heappush(self._queue, (0 if urgent else 1, next(self._order), job))
            self._lock.notify()
        return job

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                _, _, job = heapq.heappop(self._queue)
                if job.started or job.future.cancelled():  # promoted duplicate, or cancelled
                    continue
                job.started = True
            try:
                self._run(job)
                job.future.set_result(None)
            except BaseException as exc:  # surfaces in `wait`, on the compute thread
                job.future.set_exception(exc)

    def _run(self, job: _Copy) -> None:
        start = time.perf_counter()
        job.dst.gate_up.copy_(job.src.gate_up)
        job.dst.down.copy_(job.src.down)
        if self.bandwidth:
            time.sleep(max(0.0, start + _nbytes(job.src) / self.bandwidth - time.perf_counter()))
        if self.tracer is not None and self.tracer.recording:
            t0 = (start - self.tracer.t0) * 1e6
            self.tracer.slice(TRANSFER_LANE, job.label, t0, self.tracer.now_us(), bytes=_nbytes(job.src))

    def wait(self, handle: _Copy, layer: int) -> None:
        """Block until the copy is done (moving it to the front if it was still queued), recording
        the seconds compute stalled for `layer`."""
        if handle.future.done():
            handle.future.result()
            return
        start = time.perf_counter()
        with self._lock:
            if not handle.started:
                heapq.heappush(self._queue, (-1, next(self._order), handle))  # this duplicate runs it next
                self._lock.notify()
        handle.future.result()
        self._stalls[layer] = self._stalls.get(layer, 0.0) + time.perf_counter() - start

    def done(self, handle: _Copy) -> bool:
        return handle.future.done()

    def cancel(self, handle: _Copy) -> bool:
        """Drop a copy that has not started; False if it is already on the link or done."""
        with self._lock:
            return not handle.started and handle.future.cancel()

    def slot_released(self, slot: int) -> None:
        """Compute on the CPU is synchronous: a released slot is free at once."""

    def collect_stalls(self) -> dict[int, float]:
        """Seconds compute waited for copies, per layer, since the last call (measured in `wait`)."""
        stalls, self._stalls = self._stalls, {}
        return stalls

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()


class CudaTransfers:
    """Copies on a high-priority side stream; per-slot events keep copies off slots still in use."""

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self._slot_free = [None] * slots  # event recorded on the compute stream when a slot was last used
        self._stalls: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def copy(self, src: ExpertWeights, dst: ExpertWeights, label: str, slot: int,
             urgent: bool = True) -> torch.cuda.Event:
        """Copies on one stream run in issue order: `urgent` cannot reorder them on a GPU."""
        done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            if self._slot_free[slot] is not None:
                self.stream.wait_event(self._slot_free[slot])
            dst.gate_up.copy_(src.gate_up, non_blocking=True)
            dst.down.copy_(src.down, non_blocking=True)
            done.record(self.stream)
        return done

    def wait(self, handle: torch.cuda.Event, layer: int) -> None:
        """Make the compute stream wait for the copy (no host sync); its stall is read later."""
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        torch.cuda.current_stream(self.device).wait_event(handle)
        after.record()
        self._stalls.append((layer, before, after))

    def done(self, handle: torch.cuda.Event) -> bool:
        return handle.query()

    def cancel(self, handle: torch.cuda.Event) -> bool:
        """A copy enqueued on the stream cannot be taken back."""
        return False

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
