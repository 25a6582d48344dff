"""Reading safetensors tensors around the page cache (O_DIRECT), so a disk tier measures the disk.

A buffered read of an expert lands in the page cache, and the next read of it costs a memcpy: a
benchmark of the disk tier would then measure RAM. O_DIRECT reads go to the device; they need
the file offset, the length and the buffer aligned to the block size, so a tensor's byte range is
widened to aligned bounds and read into an anonymous (page-aligned) mapping, then cut out.
The layout comes from the safetensors header: 8 bytes of header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the data.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path

import torch

from .errors import MoespecError

ALIGN = 4096  # covers the logical block size of common disks and file systems
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "F8_E4M3": torch.float8_e4m3fn}


class DirectReader:
    """Tensors of safetensors files read with O_DIRECT; file descriptors kept open per file."""

    def __init__(self) -> None:
        self._layout: dict[Path, dict[str, tuple[torch.dtype, list[int], int, int]]] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _open(self, path: Path) -> tuple[int, dict]:
        with self._lock:
            if path not in self._fds:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                base = 8 + n
                self._layout[path] = {
                    name: (DTYPES[info["dtype"]], info["shape"], base + info["data_offsets"][0],
                           base + info["data_offsets"][1])
                    for name, info in header.items() if name != "__metadata__"}
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    raise MoespecError(f"direct_io: {path} cannot be opened with O_DIRECT ({e.strerror}); "
                                       "use direct_io=False on this file system") from None
            return self._fds[path], self._layout[path]

    def tensor(self, path: Path, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor `name` of `path` (or its `index`-th slice along the first dimension), in its
        stored dtype, in memory of its own."""
        fd, layout = self._open(path)
        dtype, shape, start, end = layout[name]
        if index is not None:
            row = (end - start) // shape[0]
            start, end, shape = start + index * row, start + (index + 1) * row, shape[1:]
        lo, hi = start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        buf = mmap.mmap(-1, hi - lo)
        got = os.preadv(fd, [buf], lo)
        if got < end - lo:
            raise MoespecError(f"{path}: tensor {name} ends past the end of the file (truncated checkpoint?)")
        self.bytes_read += end - start
        # a copy of its own: the mapping is freed with `buf` once the view is gone
        return torch.frombuffer(memoryview(buf)[start - lo:end - lo], dtype=dtype).clone().reshape(shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
