"""Asynchronous host -> device copies of expert weights.

On CUDA, copies run on a dedicated high-priority stream from pinned host memory (on the disk tier,
reader threads read the experts and enqueue their copies); compute waits for a copy's event only
where it needs that expert, never with a device-wide sync. On the CPU there is
no link to measure, so reader threads fetch experts from the store and a link thread spends each
copy's time on an emulated link of a given bandwidth (bytes / bandwidth seconds), which lets the
overlap of copies and compute be measured on machines without a GPU; the bytes land in the slot
when compute first waits for them. Both take
a read function rather than weights, so the store is read on the transfer side, and both move
the expert packed (experts/formats.py) into a packed slot: the emulated link costs the packed bytes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from .formats import Packed, copy_packed, packed_bytes
from .trace import TRANSFER_LANE, Tracer

ReadFn = Callable[[], Packed]  # reads a packed expert from the host store (RAM, or disk)


class _Copy:
    """One expert on its way: read from the store by a reader, then copied over the link."""

    def __init__(self, read: ReadFn, dst: Packed, label: str, priority: int):
        self.read, self.dst, self.label, self.priority = read, dst, label, priority
        self.src: Packed | None = None
        self.future: Future = Future()
        self.started = False  # a reader has taken it (set under the lock)
        self.on_link = False  # the link thread holds it: it cannot be cancelled until it yields the link
        self.link_left: float | None = None  # seconds of emulated wire time still to go (None: not begun)
        self.landed = False  # the bytes are in the slot (copied by compute when it first waits for them)
        self.wire = 0.0  # seconds of emulated wire time in all
        self.link_start = 0.0


class CpuTransfers:
    """Reader threads fetch experts from the host store (disk reads, host-cache fills) and one
    link thread spends the copies' wire time one after another, overlapping compute: no store
    read ever runs on the thread that computes. Compute lands an expert's bytes in its slot when
    it first waits for it (`_land`).

    Demand copies (a layer is waiting) go ahead of queued prefetches at both stages, and a
    prefetch that compute starts waiting for is promoted, so wrong guesses never delay a copy the
    model needs now. A prefetch not yet on the link can be cancelled once its guess is known to be
    wrong. A prefetch on the link yields it to a demand copy the moment one is queued and resumes
    where it stopped afterwards, as a copy split into chunks would on a real link (CudaTransfers
    does not split copies yet: one stream runs them in issue order); a demand copy is never
    interrupted.
    """

    WAITED, DEMAND, PREFETCH = -1, 0, 1  # priorities: lower goes first

    def __init__(self, link_bandwidth: float | None, tracer: Tracer | None = None, readers: int = 0):
        """readers: threads reading the store ahead of the link (the disk tier); 0: the link
        thread reads each expert itself (RAM: a lookup, not worth a hand-off)."""
        self.bandwidth = link_bandwidth
        self.tracer = tracer  # one transfer-lane slice per copy, while it records
        self._stalls: dict[int, float] = {}  # layer -> seconds compute waited, since collect_stalls
        # the link's busy time: wire time of every copy done, plus reading time on the disk tier (summed
        # over the readers; the busy share taken from it is capped at 1)
        self.busy_seconds = 0.0
        self.stalled_seconds: float | None = 0.0  # compute's waits for copies, in all
        self._to_read: list[tuple[int, int, _Copy]] = []  # heaps of (priority, arrival, copy)
        self._to_copy: list[tuple[int, int, _Copy]] = []
        self._order = itertools.count()
        self._readers = readers
        # a demand copy overtakes prefetches, even one already on the link; but a disk read once
        # started runs to its end, so on the disk tier a wrong guess's read can delay one compute needs
        self.preempts = readers == 0
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._read_loop, name=f"moespec-read-{i}", daemon=True)
                         for i in range(readers)]
        self._threads.append(threading.Thread(target=self._link_loop, name="moespec-link", daemon=True))
        for t in self._threads:
            t.start()

    def copy(self, read: ReadFn, dst: Packed, label: str, slot: int, urgent: bool = True) -> _Copy:
        job = _Copy(read, dst, label, self.DEMAND if urgent else self.PREFETCH)
        with self._lock:
            heapq.heappush(self._to_read if self._readers else self._to_copy, (job.priority, next(self._order), job))
            self._lock.notify_all()
        return job

    def _next(self, heap: list[tuple[int, int, _Copy]], taken: str) -> _Copy | None:
        """The most urgent job of `heap` whose `taken` flag is unset (now set), or None once closed."""
        with self._lock:
            while True:
                while heap:
                    _, _, job = heapq.heappop(heap)
                    if not getattr(job, taken) and not job.future.cancelled():  # not a promoted duplicate
                        setattr(job, taken, True)
                        return job
                if self._closed:
                    return None
                self._lock.wait()

    def _read_loop(self) -> None:
        while (job := self._next(self._to_read, "started")) is not None:
            try:
                start = time.perf_counter()
                job.src = job.read()
                reading = time.perf_counter() - start
            except BaseException as exc:  # surfaces in `wait`, on the compute thread
                with self._lock:
                    if not job.future.cancelled():
                        job.future.set_exception(exc)
                continue
            with self._lock:
                self.busy_seconds += reading  # the disk is a link too (busy while any reader reads)
                heapq.heappush(self._to_copy, (job.priority, next(self._order), job))
                self._lock.notify_all()

    def _link_loop(self) -> None:
        while (job := self._next(self._to_copy, "on_link")) is not None:
            try:
                if self._run(job):
                    job.future.set_result(None)
            except BaseException as exc:
                job.future.set_exception(exc)

    def _run(self, job: _Copy) -> bool:
        """Move `job` over the link; False if it yielded the link to a demand copy (requeued)."""
        if job.src is None:  # no reader stage
            job.src = job.read()
        if job.link_left is None:
            job.link_start = time.perf_counter()
            job.wire = packed_bytes(job.src) / self.bandwidth if self.bandwidth else 0.0
            job.link_left = job.wire
        with self._lock:
            while job.link_left > 0:
                if job.priority == self.PREFETCH and self._demand_queued():
                    job.on_link = False
                    heapq.heappush(self._to_copy, (job.priority, next(self._order), job))
                    return False
                start = time.perf_counter()
                self._lock.wait(job.link_left)  # woken early when a copy is queued or promoted
                job.link_left -= time.perf_counter() - start
            self.busy_seconds += job.wire
        if self.tracer is not None and self.tracer.recording:
            t0 = (job.link_start - self.tracer.t0) * 1e6
            self.tracer.slice(TRANSFER_LANE, job.label, t0, self.tracer.now_us(), bytes=packed_bytes(job.src))
        return True

    def _demand_queued(self) -> bool:
        """A copy compute needs (demand, or a waited-for prefetch) waits for the link (lock held)."""
        return any(priority < self.PREFETCH and not job.on_link and not job.future.done()
                   for priority, _, job in self._to_copy)

    def wait(self, handle: _Copy, layer: int) -> None:
        """Block until the copy is done (moving it to the front of whichever stage it waits in),
        recording the seconds compute stalled for `layer`."""
        if handle.future.done():
            handle.future.result()
            self._land(handle)
            return
        start = time.perf_counter()
        with self._lock:
            handle.priority = self.WAITED
            if self._readers and not handle.started:
                heapq.heappush(self._to_read, (self.WAITED, next(self._order), handle))
            elif (handle.src is not None or not self._readers) and not handle.on_link:
                heapq.heappush(self._to_copy, (self.WAITED, next(self._order), handle))
            self._lock.notify_all()
        handle.future.result()
        waited = time.perf_counter() - start
        self._stalls[layer] = self._stalls.get(layer, 0.0) + waited
        self.stalled_seconds += waited
        self._land(handle)

    @staticmethod
    def _land(handle: _Copy) -> None:
        """Copy the expert's bytes into its slot, on the thread that computes, once its emulated
        wire time has passed. A CPU device's copy is CPU work either way, and done here it costs
        less: on this project's 2-core machine a layer that read a slot the link thread had just
        written ran slower by more than the copy itself (tiny-mixtral, 25% cache, no emulated
        bandwidth: 4.7 ms per decode step with the copies on the link thread, 3.1 ms with them
        here, 1.8 ms with no copies at all). A guess that is never used is never copied."""
        if not handle.landed:
            copy_packed(handle.src, handle.dst)
            handle.landed = True

    def done(self, handle: _Copy) -> bool:
        return handle.future.done()

    def cancel(self, handle: _Copy) -> bool:
        """Drop a copy that has not reached the link (a read already made is wasted, but no bytes
        are moved); False if it is on the link or done."""
        with self._lock:
            return not handle.on_link and handle.future.cancel()

    def slot_released(self, slot: int) -> None:
        """Compute on the CPU is synchronous: a released slot is free at once."""

    def collect_stalls(self) -> dict[int, float]:
        """Seconds compute waited for copies, per layer, since the last call (measured in `wait`)."""
        stalls, self._stalls = self._stalls, {}
        return stalls

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for t in self._threads:
            t.join()


class CudaTransfers:
    """Copies on a high-priority side stream; per-slot events keep copies off slots still in use.

    On the disk tier, reader threads read each expert and enqueue its copy themselves, so no store
    read runs on the thread that computes; compute blocks only on a read it needs now. A copy from
    the page cache or a direct-I/O buffer (pageable memory) is staged by CUDA on the reader thread.
    The readers take copies first come, first served: unlike CpuTransfers, a demand read does not
    overtake queued guesses' reads.
    """

    preempts = False  # one stream runs copies in issue order: a queued guess delays a later demand copy

    def __init__(self, device: torch.device, slots: int, readers: int = 0):
        """readers: threads reading the store (the disk tier); 0: the store is read by the thread
        that asks for the copy (the RAM tier: a lookup of pinned host memory)."""
        self.device = device
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self._slot_free = [None] * slots  # event recorded on the compute stream when a slot was last used
        # reading time on the disk tier (summed over the readers); the wire itself is not measured on
        # the GPU (it would need timed events per copy): there, guesses see an idle link
        self.busy_seconds = 0.0
        self.stalled_seconds: float | None = None  # known only after a sync (collect_stalls)
        self._stalls: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="moespec-read") if readers else None
        self._busy_lock = threading.Lock()

    def copy(self, read: ReadFn, dst: Packed, label: str, slot: int,
             urgent: bool = True) -> torch.cuda.Event | Future:
        """An event recorded after the copy (RAM tier), or a future of it (disk tier: read and
        enqueued by a reader). Copies on one stream run in issue order: `urgent` cannot reorder them."""
        after = self._slot_free[slot]  # the slot's last use before this copy was asked for
        if self._readers is None:
            return self._enqueue(read(), dst, after)
        return self._readers.submit(self._read_and_enqueue, read, dst, after)

    def _read_and_enqueue(self, read: ReadFn, dst: Packed, after: torch.cuda.Event | None) -> torch.cuda.Event:
        start = time.perf_counter()
        src = read()
        with self._busy_lock:
            self.busy_seconds += time.perf_counter() - start
        return self._enqueue(src, dst, after)

    def _enqueue(self, src: Packed, dst: Packed, after: torch.cuda.Event | None) -> torch.cuda.Event:
        done = torch.cuda.Event()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            copy_packed(src, dst)
            done.record(self.stream)
        return done

    def wait(self, handle: torch.cuda.Event | Future, layer: int) -> None:
        """Make the compute stream wait for the copy (no host sync; on the disk tier, the host
        first waits for the read); its stall is read later."""
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        event = handle.result() if isinstance(handle, Future) else handle
        torch.cuda.current_stream(self.device).wait_event(event)
        after.record()
        self._stalls.append((layer, before, after))

    def done(self, handle: torch.cuda.Event | Future) -> bool:
        if isinstance(handle, Future):  # a failed read counts as done: `wait` raises it
            if not handle.done() or handle.cancelled():
                return False
            return handle.exception() is not None or handle.result().query()
        return handle.query()

    def cancel(self, handle: torch.cuda.Event | Future) -> bool:
        """A read not yet begun can be dropped; a copy enqueued on the stream cannot be taken back."""
        return isinstance(handle, Future) and handle.cancel()

    def slot_released(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record()
        self._slot_free[slot] = event

    def collect_stalls(self) -> dict[int, float]:
        """Seconds the compute stream waited for copies, per layer, since the last call (one sync).
        A disk-tier wait's host-side wait for the read falls between the two events too."""
        torch.cuda.synchronize(self.device)
        per_layer: dict[int, float] = {}
        for layer, before, after in self._stalls:
            per_layer[layer] = per_layer.get(layer, 0.0) + before.elapsed_time(after) / 1000
        self._stalls.clear()
        return per_layer

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
        torch.cuda.synchronize(self.device)
