"""Running the app under uvicorn: `serve` blocks (the CLI); `BackgroundServer` runs it in a thread.

`BackgroundServer` binds its socket before starting uvicorn, so port 0 gives a free port with no
race between picking it and using it: that is what tests and the load test need.
"""

from __future__ import annotations

import socket
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from .app import DEFAULT_MAX_BODY_BYTES, create_app

if TYPE_CHECKING:
    from ..api import LLM
    from .scheduler import Scheduler

GRACEFUL_SHUTDOWN_SECONDS = 5  # then open streams are cut, which cancels their requests
DRAIN_SECONDS = 30  # at most this long, requests already taken finish while new ones get 503


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its shutdown: the first SIGINT / SIGTERM stops the app's
    scheduler taking requests (new clients get 503, not a refused connection) while the socket
    stays open and the requests it holds finish, for at most DRAIN_SECONDS; then uvicorn shuts
    down as usual. A second signal skips the rest of the drain."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_seconds: float = DRAIN_SECONDS):
        super().__init__(config)
        self.scheduler, self.drain_seconds = scheduler, drain_seconds
        self._drain_requested = False  # set in the signal handler; acted on by on_tick, on the loop
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:
            super().handle_exit(sig, frame)
        else:
            self._captured_signals.append(sig)  # re-raised by uvicorn once it has stopped, as usual
            self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.drain_seconds
            self.scheduler.drain()
        if self._drain_deadline is not None and not self.should_exit:
            self.should_exit = self.scheduler.idle or time.monotonic() > self._drain_deadline
        return await super().on_tick(counter)


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, max_queue: int = 64,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve `llm` until interrupted (draining first, see DrainingServer)."""
    app = create_app(llm, max_batch_size=max_batch_size, max_queue=max_queue, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    try:
        DrainingServer(config, app.state.scheduler).run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it drained for, as uvicorn.run expects
        pass


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` at `server.url` from a daemon thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0):
        self.app, self.host, self.port, self.startup_timeout = app, host, port, startup_timeout
        self.url = ""
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, self.port))
        self.url = f"http://{self.host}:{sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="moespec-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
