"""Running the app under uvicorn: `serve` blocks (the CLI); `BackgroundServer` runs it in a thread.

`BackgroundServer` binds its socket before starting uvicorn, so port 0 gives a free port with no
race between picking it and using it: that is what tests and the load test need.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from .app import create_app

if TYPE_CHECKING:
    from ..api import LLM

GRACEFUL_SHUTDOWN_SECONDS = 5  # then open streams are cut, which cancels their requests


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, max_queue: int = 64) -> None:
    """Serve `llm` until interrupted."""
    app = create_app(llm, max_batch_size=max_batch_size, max_queue=max_queue)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)


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
