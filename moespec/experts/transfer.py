"""Asynchronous host -> device copies of expert weights.

On CUDA, copies run on a dedicated high-priority stream from pinned host memory (on the disk tier,
reader threads read the experts and enqueue their copies); compute waits for a copy's event only
where it needs that expert, never with a device-wide sync. On the CPU there is no link to
measure, so each copy spends its time on an emulated link of a given bandwidth (bytes / bandwidth
seconds), a schedule kept against the wall clock, which lets the overlap of copies and compute be
measured on machines without a GPU; the expert lands in its slot, by reference (the host's memory
is the device's), when compute first waits for it. On the CPU's disk tier a reader process
(reader_process.py) reads a checkpoint directory's experts straight into their slots (reader
threads where it cannot: experts quantized at load, an OS without memfd). Both take a read
function rather than weights, so the store is read on the transfer side, and both move the expert
packed (experts/formats.py): the emulated link costs the packed bytes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from ..errors import MoespecError
from .base import Key
from .formats import Packed, copy_packed, packed_bytes
from .reader_process import ReaderProcess
from .trace import TRANSFER_LANE, Tracer

ReadFn = Callable[[], Packed]  # reads a packed expert from the host store (RAM, or disk)


class _Copy:
    """One expert on its way: read from the store (by a reader thread on the disk tier), then
    moved over the emulated link, then landed in its slot by compute."""

    def __init__(self, read: ReadFn, dst: Packed, label: str, priority: int, key: Key | None, slot: int):
        self.read, self.dst, self.label, self.priority = read, dst, label, priority
        self.key, self.slot = key, slot  # what a reader process reads, and where it writes it
        self.src: Packed | None = None
        self.read_done = threading.Event()  # the disk tier's read has finished (or failed)
        self.error: BaseException | None = None  # a failed read, raised in `wait` on the compute thread
        self.started = False  # a reader has taken it (set under the lock)
        self.ready_at: float | None = None  # when it could enter the link (its read finished)
        self.link_left: float | None = None  # seconds of emulated wire time still to go (None: not begun)
        self.link_start = 0.0  # when it first went on the link (emulated time)
        self.wire = 0.0  # seconds of emulated wire time in all
        self.done = False  # the wire time has passed (emulated time)
        self.cancelled = False
        self.landed = False  # the expert is in its slot (put there by compute when it first waits for it)


class CpuTransfers:
    """An emulated link with no thread of its own: the wire is a schedule that compute advances to
    the wall clock whenever it asks the link anything (copy, done, wait, cancel). A copy's wire time
    (bytes / bandwidth) passes while compute runs; `wait` spins only for what is left of it; compute
    lands an expert in its slot when it first waits for it (`_land`). On the disk tier,
    a reader process or reader threads read the store (disk reads, host-cache fills), so no store
    read ever runs on the thread that computes; a copy enters the link when its read has finished.

    Emulated in time rather than by a link thread: a thread woken for every copy took the
    interpreter lock from compute each time, and those hand-offs cost compute about 1 ms per decode
    step (tiny-mixtral, 25% cache, no bandwidth limit: 3.73 ms per step with a link thread, 2.74 ms
    with the copies inline, 1 torch thread) which a GPU's copy engine never charges. Now every
    copy costs compute only its bookkeeping: an expert lands in its slot by reference (`_land`).

    Demand copies (a layer is waiting) go ahead of queued prefetches at both stages, and a
    prefetch that compute starts waiting for is promoted, so wrong guesses never delay a copy the
    model needs now. A prefetch not yet on the link can be cancelled once its guess is known to be
    wrong. A prefetch on the link yields it to a demand copy the moment one is queued and resumes
    where it stopped afterwards, as a copy split into chunks would on a real link (CudaTransfers
    does not split copies yet: one stream runs them in issue order); a demand copy is never
    interrupted.
    """

    WAITED, DEMAND, PREFETCH = -1, 0, 1  # priorities: lower goes first

    def __init__(self, link_bandwidth: float | None, tracer: Tracer | None = None, readers: int = 0,
                 process: ReaderProcess | None = None):
        """readers: threads reading the store ahead of the link (the disk tier); 0: compute reads
        each expert itself when it lands (RAM: a lookup, not worth a hand-off). process: instead,
        a reader process (reader_process.py) writes each expert into its slot; compute hands it
        the reads, most urgent first, and collects its answers whenever it asks the link anything."""
        self.bandwidth = link_bandwidth
        self.tracer = tracer  # one transfer-lane slice per copy, while it records
        self._stalls: dict[int, float] = {}  # layer -> seconds compute waited, since collect_stalls
        # the link's busy time: wire time of every copy done, plus reading time on the disk tier (summed
        # over the readers; the busy share taken from it is capped at 1)
        self.busy_seconds = 0.0
        self.stalled_seconds: float | None = 0.0  # compute's waits for copies, in all
        self._clock = time.perf_counter()  # the link's schedule is worked out up to here
        self._on_link: _Copy | None = None
        self._queued: list[_Copy] = []  # read, waiting for the link (few: a linear scan picks the next)
        self._order = itertools.count()
        # a demand copy overtakes prefetches, even one already on the link; but a disk read once
        # started runs to its end, so on the disk tier a wrong guess's read can delay one compute needs
        self.preempts = readers == 0 and process is None
        self._readers = readers
        self._process = process
        self._sent: dict[int, _Copy] = {}  # the reader process's reads in flight, by job number
        self._to_read: list[tuple[int, int, _Copy]] = []  # heap of (priority, arrival, copy)
        self._arrived: list[_Copy] = []  # read by a reader, not yet on the link's schedule
        self._lock = threading.Condition()  # guards the two lists above (the readers' side)
        self._closed = False
        self._threads = [threading.Thread(target=self._read_loop, name=f"moespec-read-{i}", daemon=True)
                         for i in range(readers)]
        for t in self._threads:
            t.start()

    def copy(self, read: ReadFn, dst: Packed, label: str, slot: int, urgent: bool = True,
             key: Key | None = None) -> _Copy:
        """Copy the expert `read` reads (`key`: the expert, which a reader process reads itself)
        into `dst`, slot `slot`; `urgent`: a layer waits for it."""
        now = time.perf_counter()
        self._advance(now)
        job = _Copy(read, dst, label, self.DEMAND if urgent else self.PREFETCH, key, slot)
        if self._process is not None:
            heapq.heappush(self._to_read, (job.priority, next(self._order), job))
            self._dispatch()
        elif self._readers:
            with self._lock:
                heapq.heappush(self._to_read, (job.priority, next(self._order), job))
                self._lock.notify()
        else:
            job.ready_at = now
            job.read_done.set()
            self._queued.append(job)
            self._advance(now)  # a demand copy takes the link from a prefetch at once
        return job

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                while not self._to_read and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._to_read)
                if job.started or job.cancelled:  # a promoted duplicate, or taken back
                    continue
                job.started = True
            start = time.perf_counter()
            try:
                job.src = job.read()
            except BaseException as exc:  # surfaces in `wait`, on the compute thread
                job.error = exc
            end = time.perf_counter()
            with self._lock:
                self.busy_seconds += end - start  # the disk is a link too (busy while any reader reads)
                job.ready_at = end
                if job.error is None:
                    self._arrived.append(job)
            job.read_done.set()

    def _dispatch(self) -> None:
        """Hand the reader process the most urgent reads, a few per reader thread of it: the rest
        wait here, where a demand read can still overtake them."""
        while self._to_read and len(self._sent) < 2 * self._process.threads:
            _, _, job = heapq.heappop(self._to_read)
            if not (job.started or job.cancelled):  # a promoted duplicate, or taken back
                self._send(job)

    def _send(self, job: _Copy) -> None:
        job.started = True
        number = next(self._order)
        self._sent[number] = job
        self._process.submit(number, job.key, job.slot)

    def _collect(self) -> None:
        """Take in the reader process's finished reads, if any; hand it more."""
        for number, error, end, seconds in self._process.results():
            job = self._sent.pop(number)
            self.busy_seconds += seconds  # the disk is a link too (busy while any reader reads)
            job.ready_at = end  # the same monotonic clock in both processes
            if error is None:
                job.src = job.dst  # written into its slot
                self._arrived.append(job)
            else:
                job.error = MoespecError(error)
            job.read_done.set()
        self._dispatch()

    def _advance(self, now: float) -> None:
        """Work out the link's schedule up to `now`: copies whose reads have finished join the
        queue at that time; the most urgent queued copy holds the link, a prefetch yielding it to
        a demand copy; a copy whose wire time has passed is done."""
        if self._sent:  # the reader process has reads in flight: any answers? (a syscall: only then)
            self._collect()
        if self._readers or self._process is not None:
            with self._lock:
                arrived, self._arrived = self._arrived, []
            for job in sorted(arrived, key=lambda j: j.ready_at):
                job.ready_at = max(job.ready_at, self._clock)  # read before the schedule's last update
                if not job.cancelled:
                    self._queued.append(job)
        t = self._clock
        while True:
            ready = [j for j in self._queued if j.ready_at <= t]
            later = [j.ready_at for j in self._queued if j.ready_at > t]
            best = min(ready, key=lambda j: (j.priority, j.ready_at), default=None)
            job = self._on_link
            if job is not None and job.priority == self.PREFETCH and best is not None and best.priority < self.PREFETCH:
                self._queued.append(job)  # yields the link; resumes where it stopped
                job = self._on_link = None
            if job is None and best is not None:
                self._queued.remove(best)
                job = self._on_link = best
                if job.link_left is None:
                    job.link_start = t
                    job.wire = packed_bytes(self._source(job)) / self.bandwidth if self.bandwidth else 0.0
                    job.link_left = job.wire
            until = min([now, *later])
            if job is None:
                if until >= now:
                    break
                t = until
                continue
            spent = min(job.link_left, until - t)
            job.link_left -= spent
            t += spent
            if job.link_left <= 0:
                self._finish(job, t)
                self._on_link = None
            elif t >= now:
                break
        self._clock = max(t, now)

    def _finish(self, job: _Copy, end: float) -> None:
        job.done = True
        self.busy_seconds += job.wire
        if self.tracer is not None and self.tracer.recording:
            self.tracer.slice(TRANSFER_LANE, job.label, (job.link_start - self.tracer.t0) * 1e6,
                              (end - self.tracer.t0) * 1e6, bytes=packed_bytes(self._source(job)))

    def wait(self, handle: _Copy, layer: int) -> None:
        """Block until the copy is done (moving it to the front of whichever stage it waits in),
        recording the seconds compute stalled for `layer`."""
        start = time.perf_counter()
        self._advance(start)
        if not handle.done:
            handle.priority = self.WAITED
            if self._process is not None and not handle.read_done.is_set():
                if not handle.started:  # compute waits for it: it goes now, however many are in flight
                    self._send(handle)
                while not handle.read_done.is_set():
                    # polled, not blocked on: a wait that sleeps in the kernel slowed compute after it
                    # (tiny-mixtral, disk tier, direct I/O, 25% cache, batch 1, alternated with
                    # blocking reads over 14 rounds: on demand 1.05x, the estimators 1.11x;
                    # tiny-qwen2moe's on demand 1.13x), and the reader process has its own core
                    self._collect()
            elif self._readers and not handle.read_done.is_set():
                with self._lock:
                    if not handle.started:
                        heapq.heappush(self._to_read, (self.WAITED, next(self._order), handle))
                        self._lock.notify()
                handle.read_done.wait()
            if handle.error is not None:
                raise handle.error
            while not handle.done:
                # spun, not slept: a device waiting for a copy resumes the moment it lands, and a sleep
                # does not (it woke ~0.1 ms late, with a spread that showed as noise between policies,
                # and compute ran slower after it: tiny-mixtral, 0.5 GB/s, 25% cache, every policy
                # about 6% slower per decode step than with spinning). Reader threads need the
                # interpreter lock, so with them the spin yields it (sleep(0)); without them it does
                # not: yielding slowed compute after each wait (tiny-mixtral, 1 GB/s, 25% cache,
                # batch 1, on demand alternated with a spin that never yields: 6.13 against 5.29 ms
                # a decode step, its time outside the waits 3.20 against 2.40 ms)
                if self._readers:
                    time.sleep(0)
                self._advance(time.perf_counter())
            waited = time.perf_counter() - start
            self._stalls[layer] = self._stalls.get(layer, 0.0) + waited
            self.stalled_seconds += waited
        self._land(handle)

    def _land(self, handle: _Copy) -> None:
        """Hand the expert to its slot, on the thread that computes, once its emulated wire time
        has passed: by reference, not by a copy. On a CPU device the host memory the expert sits
        in (the RAM tier's store, the disk tier's read buffer) is device memory already, so a copy
        would only be compute's work that a GPU's copy engine takes off it (tiny-mixtral, 25%
        cache, 16 GB/s, batch 1, alternated with the memcpy version: on demand 4.5-4.7 ms per
        decode step against 5.1, the lookahead 5.4-5.8 against 6.3-6.4). The wire time is
        emulated all the same. A guess that is never used is never landed."""
        if not handle.landed:
            handle.dst.update(self._source(handle))
            handle.landed = True

    @staticmethod
    def _source(job: _Copy) -> Packed:
        """The expert's packed bytes: read by a reader (disk tier), or now, once (RAM: a lookup)."""
        if job.src is None:
            job.src = job.read()
        return job.src

    def done(self, handle: _Copy) -> bool:
        self._advance(time.perf_counter())
        return handle.done or handle.error is not None

    def progress(self, handle: _Copy) -> float:
        """The share of the copy's wire time that has passed (0 while it is read or queued)."""
        self._advance(time.perf_counter())
        if handle.done or handle.error is not None:
            return 1.0
        if handle.link_left is None or handle.wire <= 0:
            return 0.0
        return 1.0 - handle.link_left / handle.wire

    def cancel(self, handle: _Copy) -> bool:
        """Drop a copy that is not on the link (a read already made is wasted, and so is the wire
        time of a prefetch that yielded the link part-way); False if it is on the link or done."""
        self._advance(time.perf_counter())
        if handle.done or handle is self._on_link:
            return False
        if handle.started and not handle.read_done.is_set() and self._process is not None:
            return False  # the process is writing it into its slot: the slot is not free yet
        with self._lock:
            handle.cancelled = True
        if handle in self._queued:
            self._queued.remove(handle)
        return True

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
        if self._process is not None:
            self._process.close()


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
        # the GPU (it would need timed events per copy): there admission starts from an idle link and
        # learns from `progress` whether right guesses had landed when used
        self.busy_seconds = 0.0
        self.stalled_seconds: float | None = None  # known only after a sync (collect_stalls)
        self._stalls: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="moespec-read") if readers else None
        self._busy_lock = threading.Lock()

    def copy(self, read: ReadFn, dst: Packed, label: str, slot: int,
             urgent: bool = True, key: Key | None = None) -> torch.cuda.Event | Future:
        """An event recorded after the copy (RAM tier), or a future of it (disk tier: read and
        enqueued by a reader). Copies on one stream run in issue order: `urgent` cannot reorder them.
        `key` is not needed here (`read` reads it)."""
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

    def progress(self, handle: torch.cuda.Event | Future) -> float:
        """1 if the copy has landed, else 0: how far a copy on the stream has got is not known."""
        return float(self.done(handle))

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
