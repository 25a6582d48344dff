"""Continuous batching: one background thread owns the model and steps every running request together.

The thread drives one `Batch` of the engine loop (decode/engine.py) with `max_batch_size` KV-cache
rows, so requests need not start together. At every step boundary it (1) drops cancelled
requests and frees their rows, (2) admits waiting requests into free rows and prefills their
prompts in one forward pass, and (3) runs one step of the engine's step kind over all running
rows (plain, or self-speculative: the same options as `LLM.generate`), sampling with each
request's own parameters and random generator. Finished requests free their rows immediately.

Requests talk to HTTP handlers through a sink callback, so this module knows nothing of asyncio.
A step that raises is retried row by row, so only the requests that fail on their own are failed
(with a `Failure` event) and the engine goes on serving the others.

The scheduler holds at most `max_batch_size + max_queue` requests: `max_batch_size` running and
`max_queue` waiting for a row (0: none wait; a request is taken only while a row is free).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..decode.sampling import SamplingParams, TokenLogprob
from ..decode.sequence import Sequence
from ..errors import MoespecError
from .metrics import Metrics

if TYPE_CHECKING:
    from ..api import LLM

log = logging.getLogger(__name__)
STATS_INTERVAL = 0.5  # seconds between engine-stats snapshots while busy


@dataclass(frozen=True)
class Output:
    """New final text of a request; `finish_reason` is set on its last output. `logprobs`: the
    tokens sampled since the previous output (when the request asked for logprobs);
    `prompt_logprobs`: on the first output of a request that asked for them."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Failure:
    """The request ended without a result. status: the HTTP status it maps to (5xx)."""

    message: str
    status: int


Event = Output | Failure
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """A prompt to complete. `sink` receives its events on the scheduler thread and must not block."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    finished: bool = False  # its last event was sent
    seq: Sequence | None = None  # set when it is admitted into the batch
    sent_logprobs: int = 0  # of seq.logprobs, how many went out in earlier outputs


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


class SchedulerStopped(Exception):
    """The scheduler is draining for shutdown, stopped, or its thread has died (HTTP 503)."""


class Scheduler:
    def __init__(self, llm: LLM, max_batch_size: int, max_queue: int, metrics: Metrics):
        if max_batch_size < 1 or max_queue < 0:
            raise MoespecError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.llm, self.metrics, self.max_batch_size, self.max_queue = llm, metrics, max_batch_size, max_queue
        self.capacity = max_batch_size + max_queue
        self.batch = llm.engine.batch(max_batch_size, llm.context_length)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # touched only by the scheduler thread
        self._held = 0  # requests taken and not finished: running, being admitted or waiting
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._stats_due = 0.0
        self._thread = threading.Thread(target=self._loop, name="moespec-scheduler", daemon=True)

    # --- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step, then fail everything still queued or running with a 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        for req in [*self._waiting, *self._running]:
            req.sink(Failure("the server is shutting down", 503))
        self._waiting.clear()
        self._running.clear()

    def drain(self) -> None:
        """Take no new requests (SchedulerStopped: 503) and finish the ones held (shutdown)."""
        with self._cond:
            self._draining = True

    @property
    def idle(self) -> bool:
        return self._held == 0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping and not self._draining

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, reqs: list[Request]) -> None:
        """Queue requests, all or none (the choices of one HTTP request), or raise QueueFull /
        SchedulerStopped at once."""
        with self._cond:
            if self._draining:
                raise SchedulerStopped("the server is shutting down")
            if not self.alive:
                raise SchedulerStopped("the engine is not running")
            if self._held + len(reqs) > self.capacity:
                raise QueueFull(f"the server is full ({self.max_batch_size} running, "
                                f"{self.max_queue} waiting at most): retry later")
            self._held += len(reqs)
            self._waiting.extend(reqs)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Forget a request (client gone). A running one leaves the batch at the next step boundary."""
        with self._cond:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                req.finished = True
                self._held -= 1
                self.metrics.request_done("cancelled")

    # --- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode(), self.llm.step_kind() as kind:
            self.batch.kind = kind
            while True:
                if not (self._waiting or self._running) or time.perf_counter() > self._stats_due:
                    self._snapshot_stats()
                with self._cond:
                    while not (self._stopping or self._waiting or self._running):
                        self._cond.wait()
                    if self._stopping:
                        return
                    room = len(self.batch.free)
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                try:
                    self._step(admitted)
                except Exception:  # a bug in the bookkeeping: fail what is in flight, keep serving
                    log.exception("scheduler step failed")
                    for req in [*admitted, *self._running]:
                        self._finish(req, "failed", Failure("internal error in the scheduler", 500))

    def _snapshot_stats(self) -> None:
        """Publish `LLM.stats()` to the metrics. It is read here, on the thread that owns the model
        (on CUDA it synchronizes), every STATS_INTERVAL seconds while busy and whenever going idle."""
        try:
            self.metrics.engine_stats(self.llm.stats().as_dict())
        except Exception:
            log.exception("reading engine stats failed")
        self._stats_due = time.perf_counter() + STATS_INTERVAL

    def _step(self, admitted: list[Request]) -> None:
        for req in [*admitted, *self._running]:
            if req.cancelled:
                self._finish(req, "cancelled")
        admitted = [r for r in admitted if not r.cancelled]
        for req in admitted:
            req.seq = self.llm.engine.sequence(req.prompt, req.params)
        decoding = list(self._running)
        self._running += admitted
        if admitted:
            self._run(admitted, prefill=True)
        if decoding:
            self._run([r for r in decoding if r in self._running], prefill=False)

    def _run(self, reqs: list[Request], prefill: bool) -> None:
        """Prefill `reqs` into the batch, or advance them by one decode step, and send their text.

        If the batched pass raises, each request is retried alone: a fault tied to one request
        fails only that request, and a transient one fails none.
        """
        t0 = time.perf_counter()
        seqs = [r.seq for r in reqs]
        tokens_before = sum(len(s.token_ids) for s in seqs)
        try:
            events = self.batch.admit(seqs) if prefill else self.batch.step(seqs)
        except Exception as exc:
            if len(reqs) == 1:
                log.exception("request %d failed", reqs[0].id)
                self._finish(reqs[0], "failed", Failure(f"generation failed: {type(exc).__name__}: {exc}", 500))
            else:
                for req in reqs:
                    self._run([req], prefill)
            return
        now = time.perf_counter()
        for req, (seq, text) in zip(reqs, events):
            if prefill:
                self.metrics.prefilled(len(req.prompt), now - req.arrival)
            if seq.finish_reason is not None:
                req.sink(self._output(req, text))
                self._finish(req, seq.finish_reason)
            elif text:
                req.sink(self._output(req, text))
        if not prefill:
            self.metrics.decoded(sum(len(s.token_ids) for s in seqs) - tokens_before, now - t0)

    @staticmethod
    def _output(req: Request, text: str) -> Output:
        """An output event with the text and the logprobs not sent before."""
        seq = req.seq
        first, req.sent_logprobs = req.sent_logprobs, len(seq.logprobs)
        prompt = tuple(seq.prompt_logprobs) if first == 0 and seq.params.prompt_logprobs is not None else None
        return Output(text, seq.finish_reason, len(seq.token_ids), tuple(seq.logprobs[first:]), prompt)

    def _finish(self, req: Request, outcome: str, failure: Failure | None = None) -> None:
        """Take a request out of the batch and free its cache row (once: later calls do nothing)."""
        if req.finished:
            return
        req.finished = True
        with self._cond:
            self._held -= 1
        if failure is not None:
            req.sink(failure)
        if req in self._running:
            self._running.remove(req)
        if req.seq is not None:
            self.batch.release(req.seq)
        self.metrics.request_done(outcome)
