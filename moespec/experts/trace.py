"""A Chrome / Perfetto trace of one run: a compute lane (one slice per layer) and a transfer lane
(one slice per expert copy). Open the JSON in chrome://tracing or ui.perfetto.dev."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ..hooks import ForwardHooks

COMPUTE_LANE, TRANSFER_LANE = 1, 2


class Tracer(ForwardHooks):
    """Made with the engine and handed to what records (the transfer side, the model's hooks);
    records nothing until `start`, so tracing can begin after load at no cost before."""

    def __init__(self, note: str = ""):
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.note = note
        self.recording = False
        self._lock = threading.Lock()
        self._open: dict[int, float] = {}

    def start(self) -> None:
        self.t0, self.recording = time.perf_counter(), True

    def now_us(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6

    def slice(self, lane: int, name: str, start_us: float, end_us: float, **args) -> None:
        event = dict(name=name, ph="X", pid=os.getpid(), tid=lane, ts=start_us, dur=end_us - start_us, args=args)
        with self._lock:
            self.events.append(event)

    def layer_start(self, layer: int) -> None:
        self._open[layer] = self.now_us()

    def layer_end(self, layer: int) -> None:
        self.slice(COMPUTE_LANE, f"layer {layer}", self._open.pop(layer), self.now_us(), layer=layer)

    def save(self, path: str | Path) -> None:
        pid = os.getpid()
        names = [dict(name="thread_name", ph="M", pid=pid, tid=lane, args={"name": label})
                 for lane, label in ((COMPUTE_LANE, "compute"), (TRANSFER_LANE, "transfer"))]
        doc = {"traceEvents": names + self.events, "displayTimeUnit": "ms", "otherData": {"note": self.note}}
        Path(path).write_text(json.dumps(doc))
