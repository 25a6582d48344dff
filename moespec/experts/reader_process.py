"""The disk tier's reads in a process of their own, writing each expert straight into its slot.

On a CPU the device's memory is the host's, and a reader *thread* shares the interpreter lock with
compute: every call it makes into the OS or torch can hand the lock back and forth, and compute
waits at each hand-off. Measured beside tiny-qwen2moe's compiled decode (1 torch thread, 25%
cache, RAM tier), reading tiny-mixtral experts from disk with direct I/O: a reader thread slowed
compute 1.26x at ~400 experts a second and 2.07x at ~1,200; the same reads and conversion in a
process of their own, 1.02-1.03x. So where the device is the CPU and the experts come from a
checkpoint directory, the reads run here:

    compute (this process)                reader process (`serve`, 2 reader threads)
      cache picks a slot for (layer, e)
      request (job, layer, e, slot) ----> pipe ----> store.packed((layer, e)): a dense expert is
                                                     assembled in its slot by the read itself
                                                     (anything else copied in); shared memory
      _advance / wait: poll results <---- pipe <---- (job, error, end time, seconds, disk counters)
      the expert is in its slot already: nothing to land

Against reader threads, on the disk tier with direct I/O (compiled, batch 1, 25% cache, processes
of either version alternating, 10 rounds in each): tiny-mixtral's on demand 4.75-4.90 ms a step against 4.97-5.22, the
estimators 0.95-0.97x of on demand before, 1.00-1.03x after; perfect guesses three layers ahead on
into the next token (benchmarks/oracle_bound.py) 1.08x before, 1.55x after.

The slots live in one memfd mapping that both processes map (not /dev/shm, which containers keep
small). A slot is written only while its copy is in flight, and the cache never evicts an expert
whose copy has not landed, nor cancels one the process has begun: no slot is written while read.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import select
import struct
import subprocess
import sys
import threading
import time
import weakref

import torch

from ..checkpoint import open_checkpoint
from ..errors import MoespecError
from .base import Key
from .formats import Packed
from .store import ExpertStore

ALIGN = 64  # each slot starts on a cache line
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # one slot's packed tensors: name -> (shape, dtype)


def slot_block(layout: Layout) -> tuple[dict[str, int], int]:
    """Where each packed tensor starts in a slot's block of bytes (in `layout`'s order, each at a
    multiple of its element size, so a dense expert's gate_up and down lie back to back as
    Checkpoint.expert assembles them), and the block's size (a multiple of ALIGN)."""
    offsets, end = {}, 0
    for name, (shape, dtype) in layout.items():
        offsets[name] = -(-end // dtype.itemsize) * dtype.itemsize
        end = offsets[name] + math.prod(shape) * dtype.itemsize
    return offsets, -(-end // ALIGN) * ALIGN


def slot_blocks(mapping: mmap.mmap, layout: Layout, slots: int) -> torch.Tensor:
    """The slots' blocks of bytes in `mapping`, [slots, block] uint8."""
    block = slot_block(layout)[1]
    return torch.frombuffer(mapping, dtype=torch.uint8, count=slots * block).view(slots, block)


def slot_tensors(blocks: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Every slot's packed tensors, [slots, *shape] per name, as views of the slots' `blocks`
    (each slot's tensors in its own block); both processes build the same views."""
    offsets = slot_block(layout)[0]
    return {name: blocks[:, offsets[name]:offsets[name] + math.prod(shape) * dtype.itemsize].view(dtype)
            .view(len(blocks), *shape) for name, (shape, dtype) in layout.items()}


# the messages, fixed-size (one write, one read each; a pipe delivers up to 4 KiB writes whole):
REQUEST = struct.Struct("<qiii")  # job (-1: stop), layer, expert, slot
# job, error length (its UTF-8 follows), end, seconds; then the process's store: disk reads, their
# seconds, bytes read around the page cache, experts in its host cache
RESULT = struct.Struct("<qiddqdqq")


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class ReaderProcess:
    """A process that reads the experts of `store` (an ExpertStore of the disk tier over a checkpoint
    directory) as it would, `threads` at once, into `slots` shared slots of its packed layout; it
    keeps the store's disk counters (`disk_reads`, `disk_seconds`, `reported`) as the process
    reports them."""

    def __init__(self, store: ExpertStore, slots: int, threads: int = 2):
        self.store, layout = store, store.packed_layout
        size = slots * slot_block(layout)[1]
        fd = os.memfd_create("moespec-expert-slots")
        os.ftruncate(fd, size)
        self._mapping = mmap.mmap(fd, size)
        self.slots = slot_tensors(slot_blocks(self._mapping, layout, slots), layout)
        self.threads = threads
        requests_in, self._requests = os.pipe()
        self._results, results_out = os.pipe()
        args = {"model": str(store.checkpoint.dir), "dtype": str(store.dtype).removeprefix("torch."),
                "direct_io": store.direct_io, "host_cache": store.host_cache, "threads": threads,
                "slots": slots, "fd": fd,
                "layout": [[name, list(shape), str(dt).removeprefix("torch.")] for name, (shape, dt) in layout.items()],
                "requests": requests_in, "results": results_out}
        serve = f"import json, sys; from {__name__} import serve; serve(json.loads(sys.argv[1]))"
        self._process = subprocess.Popen([sys.executable, "-c", serve, json.dumps(args)],
                                         pass_fds=(fd, requests_in, results_out))
        for child_end in (fd, requests_in, results_out):
            os.close(child_end)
        self._pending = b""  # answers read off the pipe, not yet whole
        # a model dropped without close() still ends its process: its pipes close, and the process,
        # reading the end of its requests, stops
        self._close_pipes = weakref.finalize(self, _close_fds, self._requests, self._results)

    def submit(self, job: int, key: Key, slot: int) -> None:
        """Read expert `key` into `slot`; `job` names it in the result."""
        try:
            os.write(self._requests, REQUEST.pack(job, key[0], key[1], slot))
        except OSError:
            raise self._gone() from None

    def _gone(self) -> MoespecError:
        return MoespecError(f"the disk tier's reader process exited (code {self._process.poll()})")

    def results(self) -> list[tuple[int, str | None, float, float]]:
        """The reads finished since the last call, each (job, error or None, its end on the
        perf_counter clock, its seconds); none if none has finished (it never waits)."""
        try:
            if select.select([self._results], [], [], 0)[0]:
                chunk = os.read(self._results, 1 << 16)
                if not chunk:
                    raise EOFError
                self._pending += chunk
            out = []
            while len(self._pending) >= RESULT.size:
                job, length, end, seconds, reads, read_seconds, direct, cached = RESULT.unpack_from(self._pending)
                if len(self._pending) < RESULT.size + length:  # an error's text still on its way
                    self._pending += _read_exactly(self._results, RESULT.size + length - len(self._pending))
                error = self._pending[RESULT.size:RESULT.size + length].decode(errors="replace") if length else None
                self._pending = self._pending[RESULT.size + length:]
                self.store.disk_reads, self.store.disk_seconds = reads, read_seconds
                self.store.reported = (direct, cached)
                out.append((job, error, end, seconds))
        except (EOFError, OSError):
            raise self._gone() from None
        return out

    def close(self) -> None:
        try:
            os.write(self._requests, REQUEST.pack(-1, 0, 0, 0))
        except OSError:  # already gone
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._close_pipes()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def serve(args: dict) -> None:
    """The process's side: `threads` readers, each taking the next request off the pipe, reading
    the expert into its slot (a dense gated expert assembled there by the read itself, anything
    else copied in) and answering."""
    torch.set_num_threads(1)
    dtype = getattr(torch, args["dtype"])
    layout = {name: (tuple(shape), getattr(torch, dt)) for name, shape, dt in args["layout"]}
    blocks = slot_blocks(mmap.mmap(args["fd"], args["slots"] * slot_block(layout)[1]), layout, args["slots"])
    slots = slot_tensors(blocks, layout)
    # where a read may assemble the expert in place: a block that starts with its tensors back to
    # back in the compute dtype (a dense expert), seen as one flat tensor of that dtype
    sizes = [math.prod(shape) * dt.itemsize for shape, dt in layout.values()]
    flat = blocks[:, :sum(sizes)].view(dtype) if all(dt == dtype for _, dt in layout.values()) \
        and list(slot_block(layout)[0].values()) == [sum(sizes[:i]) for i in range(len(sizes))] else None
    store = ExpertStore(open_checkpoint(args["model"]), dtype, pin=False, tier="disk",
                        host_cache=args["host_cache"], direct_io=args["direct_io"])
    requests, results = args["requests"], args["results"]
    take, answer = threading.Lock(), threading.Lock()
    stopped = []

    def read() -> None:
        while True:
            with take:  # one reader waits on the pipe; the others wait for it to take a request
                if stopped:  # another reader was told to stop
                    return
                try:
                    job, layer, expert, slot = REQUEST.unpack(_read_exactly(requests, REQUEST.size))
                except EOFError:  # the parent is gone
                    job = -1
                if job < 0:
                    stopped.append(True)
                    return
            start, error = time.perf_counter(), None
            try:
                packed: Packed = store.packed((layer, expert), None if flat is None else flat[slot])
                for name, t in packed.items():
                    if t.data_ptr() != slots[name][slot].data_ptr():  # not assembled in place
                        slots[name][slot].copy_(t)
            except MoespecError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 -- any failure is the parent's to raise, on its compute thread
                error = f"reading expert {expert} of layer {layer} failed ({type(e).__name__}: {e})"
            end = time.perf_counter()
            text = b"" if error is None else error.encode()[:2000]  # a message goes whole (under 4 KiB)
            try:
                with answer:
                    os.write(results, RESULT.pack(job, len(text), end, end - start, store.disk_reads,
                                                  store.disk_seconds, store.direct_bytes, store.host_cached) + text)
            except OSError:  # the parent is gone
                return

    readers = [threading.Thread(target=read) for _ in range(args["threads"])]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
