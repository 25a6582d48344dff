"""The host tier: routed experts in host memory as the checkpoint's format packs them.

tier="ram" reads every expert once at load (pinned on CUDA, so device copies run asynchronously).
tier="disk" is for models larger than RAM: an expert is read from the safetensors file when
first needed and kept in a host LRU cache of `host_cache` experts. Reads come from the transfer
side's reader threads (never the thread that computes), several at once, so the host cache is
guarded by a lock and a file read happens outside it. `packed(key)` is what crosses the link;
`store[key]` is the expert unpacked in the compute dtype, for host-side analysis.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterator

import torch

from ..checkpoint import Checkpoint
from .base import ExpertWeights, Key
from .formats import Dense, Packed, Unpacker, packed_bytes
from .stats import ExpertStats

class ExpertStore:
    """Expert weights in host memory, keyed by (layer, expert)."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, pin: bool, tier: str = "ram",
                 host_cache: int = 64, progress: Callable[[list[Key]], Iterator[Key]] = iter, direct_io: bool = False,
                 transposed: bool = False):
        """host_cache: experts the disk tier keeps in host memory (0: none beyond the device
        cache). direct_io: the disk tier reads around the page cache (O_DIRECT). transposed: the
        dense expert matrices the store holds (the RAM tier's experts, `ResidentExperts`' stacks)
        are transposed in memory, behind views of the usual shapes; the disk tier's reads stay as
        stored. For a CPU in float32 (what `LLM` asks it for): a linear of a few tokens runs
        25-40% faster on them (tiny-mixtral's expert shapes, 1 thread; decode with a 25% cache 5%
        faster per step), and the grouped matmul 1.1-1.4x (tiny-mixtral and tiny-qwen2moe shapes,
        16 to 1024 rows). bfloat16 gains nothing and its one-token linears lose 5-10%."""
        spec = checkpoint.spec
        self.spec, self.dtype, self.pin, self.tier = spec, dtype, pin, tier
        self.checkpoint, self.host_cache, self.direct_io = checkpoint, host_cache, direct_io
        self.disk_seconds = 0.0  # time the disk tier's reads took (on the reader threads)
        self.format = checkpoint.format
        self.keys = [(layer, e) for layer in spec.moe_layer_ids for e in range(spec.num_experts)]
        self._experts: OrderedDict[Key, Packed] = OrderedDict()
        self.disk_reads = 0
        # where a reader process reads for this store (reader_process.py): what it last reported of
        # its own, (bytes read around the page cache, experts in its host cache); None: none does
        self.reported: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.transposed = transposed and isinstance(self.format, Dense)
        if tier == "ram":
            for key in progress(self.keys):
                w = self._read(key)
                self._experts[key] = {name: t.mT.contiguous().mT if t.dim() == 2 else t
                                      for name, t in w.items()} if self.transposed else w
        # all experts of a model have the same shapes: one tells the packed bytes and slot shapes
        first = self._experts[self.keys[0]] if tier == "ram" else self._read(self.keys[0])
        self.expert_bytes = packed_bytes(first)
        self.packed_layout = {name: (tuple(t.shape), t.dtype) for name, t in first.items()}  # one slot's tensors
        self.shapes = {name: tuple(t.shape) for name, t in self.format.unpack(first, dtype).tensors().items()}
        self.dense_bytes = sum(math.prod(shape) for shape in self.shapes.values()) * torch.finfo(dtype).bits // 8

    def _read(self, key: Key, out: torch.Tensor | None = None) -> Packed:
        """`out` is given only for a checkpoint directory's experts (`Checkpoint.expert` takes it)."""
        extra = {} if out is None else {"out": out}
        packed = self.checkpoint.expert(*key, self.dtype, direct=self.direct_io, **extra)
        return {name: t.pin_memory() for name, t in packed.items()} if self.pin else packed

    def __getitem__(self, key: Key) -> ExpertWeights:
        """The expert unpacked in the compute dtype, on the host."""
        return self.format.unpack(self.packed(key), self.dtype)

    def stack(self, layer: int, transposed: bool = False) -> Packed:
        """Every expert of MoE layer `layer` as one tensor per packed name [E, ...], in id order.
        The RAM tier then keeps that layer's experts as views into the stack: stacking them
        (for `ResidentExperts`' grouped path) costs no second copy. `transposed`: each matrix
        is stored as its transpose ([E, in, out] in memory) and returned as a view of that with
        the usual shape [E, out, in]: the same values, other strides."""
        keys = [(layer, e) for e in range(self.spec.num_experts)]

        def stacked(name: str) -> torch.Tensor:
            parts = [self.packed(key)[name] for key in keys]
            if transposed and parts[0].dim() == 2:
                return torch.stack([p.mT for p in parts]).mT
            return torch.stack(parts)

        stack = {name: stacked(name) for name in self.packed_layout}
        if self.pin:
            stack = {name: t.pin_memory() for name, t in stack.items()}
        if self.tier == "ram":
            for e, key in enumerate(keys):
                self._experts[key] = {name: t[e] for name, t in stack.items()}
        return stack

    @property
    def direct_bytes(self) -> int:
        """Bytes the disk tier's reads took around the page cache (direct I/O)."""
        if self.reported is not None:
            return self.reported[0]
        direct = getattr(self.checkpoint, "direct", None)
        return direct.bytes_read if direct is not None else 0

    @property
    def host_cached(self) -> int:
        """Experts the disk tier keeps in host memory now."""
        if self.reported is not None:
            return self.reported[1]
        return len(self._experts) if self.tier == "disk" else 0

    def packed(self, key: Key, out: torch.Tensor | None = None) -> Packed:
        """The expert as it is stored and crosses the link. `out`: where a dense gated expert read
        from disk may be assembled (Checkpoint.expert), unless the host cache keeps it."""
        if self.tier == "ram":
            return self._experts[key]
        with self._lock:
            if key in self._experts:
                self._experts.move_to_end(key)
                return self._experts[key]
            self.disk_reads += 1
        start = time.perf_counter()
        w = self._read(key, None if self.host_cache else out)
        with self._lock:
            self.disk_seconds += time.perf_counter() - start
            if self.host_cache:
                self._experts[key] = w
                if len(self._experts) > self.host_cache:
                    self._experts.popitem(last=False)
        return w


class ResidentExperts:
    """Every expert on the device at once (a DeviceExperts): the budget holds all experts, so
    nothing is ever moved, evicted or waited for. Each layer's experts are stacked [E, ...]:
    dense ones whose rows are 16-byte aligned (what grouped matmul kernels need) serve a grouped
    computation of the whole layer (`fetch_stack`). Packed formats stay packed (the budget counts
    packed bytes) and are unpacked into one scratch expert when used."""

    def __init__(self, store: ExpertStore, device: torch.device, stats: ExpertStats):
        self.stats = stats
        self.num_experts = self.pin_limit = store.spec.num_experts
        self.capacity = len(store.keys)
        bits = torch.finfo(store.dtype).bits

        def aligned(dim: int) -> bool:  # rows of 16-byte multiples, the rows being dimension `dim`
            return all(shape[dim] * bits // 8 % 16 == 0 for shape in store.shapes.values())

        self.groupable = isinstance(store.format, Dense) and aligned(-1)
        # stacked as the store lays its matrices out ([E, in, out] in memory if transposed), where
        # the rows of that layout are aligned too
        transposed = store.transposed and self.groupable and aligned(0)
        self._stacks = {layer: {name: t.to(device) for name, t in store.stack(layer, transposed).items()}
                        for layer in store.spec.moe_layer_ids}  # on the CPU: the store's own memory
        self._packed = {(layer, e): {name: t[e] for name, t in stack.items()}
                        for layer, stack in self._stacks.items() for e in range(store.spec.num_experts)}
        self.unpack = Unpacker(store.format, store.shapes, store.dtype, device)

    def _weights(self, key: Key) -> ExpertWeights:
        return self.unpack(self._packed[key])

    def resident(self) -> set[Key]:
        return set(self._packed)

    def ready(self, layer: int) -> set[int]:
        return {e for (l, e) in self.resident() if l == layer}

    def prefetch(self, target: int, ids: list[int], running: int | None = None,
                 scores: list[float] | None = None, predicted: list[float] | None = None, depth: int = 1) -> None:
        """Nothing to move: every expert is already on the device."""

    def stalled_seconds(self) -> float | None:
        return 0.0

    def clear(self) -> None:
        """Nothing is ever evicted, so there is no cold state to return to."""

    def flush_stats(self) -> None:
        """No transfers, so no stalls to collect."""

    def close(self) -> None:
        """No transfer side to stop."""

    # speculative decoding pins its draft experts; here every expert stays anyway
    def pin(self, key: Key, load: bool = True) -> bool:
        return True

    def unpin(self, key: Key) -> None:
        pass

    def peek(self, key: Key) -> ExpertWeights:
        return self._weights(key)

    def count(self, layer: int, experts: int, tokens: int) -> None:
        """Count a fetch of `experts` experts of `layer` for `tokens` tokens (all hits): what
        `fetch` does, for a caller that computes from the stack without fetching (model/compiled.py)."""
        stats = self.stats[layer]
        stats.hits += experts
        stats.tokens += tokens

    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        self.count(layer, len(ids), tokens)
        for e in ids:
            yield e, self._weights((layer, e))

    def fetch_stack(self, layer: int, ids: list[int], tokens: int) -> ExpertWeights | None:
        """Every expert of `layer` stacked [E, ...] in id order, for one grouped computation of
        the experts `ids` (counted as their fetch); None, counting nothing, if they are packed or
        their rows unaligned."""
        stack = self.stack(layer)
        if stack is not None:
            self.count(layer, len(ids), tokens)
        return stack

    def stack(self, layer: int) -> ExpertWeights | None:
        """Every expert of `layer` stacked [E, ...] in id order, counting nothing; None if they are
        packed or their rows unaligned."""
        return ExpertWeights(**self._stacks[layer]) if self.groupable else None
