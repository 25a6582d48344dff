"""OpenAI-compatible HTTP server (`moespec serve`) with continuous batching.

`create_app(llm)` builds the FastAPI application; `serve(llm, host, port)` runs it under uvicorn;
`BackgroundServer(app)` runs it in a thread on a free loopback port (tests, load test).
"""

from .app import create_app
from .server import BackgroundServer, serve

__all__ = ["BackgroundServer", "create_app", "serve"]
