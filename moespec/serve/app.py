"""The OpenAI-compatible HTTP API over one loaded model.

Handlers run on the event loop: they validate a request, turn it into prompt token ids and
sampling parameters, hand it to the scheduler thread, and relay its events as one JSON response
or as server-sent events. Nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..decode.sampling import SamplingParams
from ..errors import MoespecError
from .chat import ChatFormat
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (APIError, ChatCompletionFormat, ChatRequest, CompletionFormat, CompletionRequest,
                       SamplingRequest, error_body, parse_body, usage)
from .scheduler import Event, Failure, Output, QueueFull, Request, Scheduler, SchedulerStopped

if TYPE_CHECKING:
    from ..api import LLM

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CLIENT_CLOSED = 499  # nginx's convention; the client never sees it


class EventQueue:
    """Carries one request's events from the scheduler thread to the coroutine serving it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Called on the scheduler thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Failure) or event.finish_reason is not None:
                return


async def _wait_for_disconnect(request: HTTPRequest) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class OpenAIAPI:
    """Route handlers for one model served by one scheduler."""

    def __init__(self, llm: LLM, scheduler: Scheduler, metrics: Metrics, chat: ChatFormat, model_name: str):
        self.llm, self.scheduler, self.metrics, self.chat = llm, scheduler, metrics, chat
        self.model_name = model_name

    # --- routes --------------------------------------------------------------------------------

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    async def completions(self, request: HTTPRequest) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        self._check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        ids = self.llm.encode(prompt) if isinstance(prompt, str) else prompt
        return await self._generate(request, body, ids, body.max_tokens, CompletionFormat(self.model_name),
                                    default_max=DEFAULT_COMPLETION_TOKENS)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = parse_body(await request.body(), ChatRequest)
        self._check_model(body.model)
        if not body.messages:
            raise APIError(400, "'messages' must hold at least one message", param="messages")
        if self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer.json, so it cannot take chat messages")
        ids = self.chat.encode([{"role": m.role, "content": m.text()} for m in body.messages], self.llm.tokenizer)
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        return await self._generate(request, body, ids, max_tokens, ChatCompletionFormat(self.model_name))

    async def metrics_page(self) -> Response:
        text = self.metrics.render(self.scheduler.queue_length, self.scheduler.running)
        return Response(text, media_type=CONTENT_TYPE)

    async def health(self) -> Response:
        if not self.scheduler.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    # --- error handlers ------------------------------------------------------------------------

    async def on_api_error(self, _request: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        if exc.status < 500:
            self.metrics.request_rejected(exc.status)
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def on_user_error(self, request: HTTPRequest, exc: Exception) -> Response:
        """A MoespecError raised while preparing a request (bad prompt, bad sampling option)."""
        return await self.on_api_error(request, APIError(400, str(exc)))

    # --- helpers -------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "moespec"}

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _sampling_params(self, body: SamplingRequest, prompt: list[int], max_tokens: int | None,
                         default_max: int | None) -> SamplingParams:
        """Check the prompt against the context window and build the request's SamplingParams.

        Without max_tokens a request may generate `default_max` tokens (None: up to the end of
        the context window), cut to what the window leaves. An explicit max_tokens that does not
        fit is an error, as with OpenAI.
        """
        self.llm.engine.check_prompt(prompt)
        context = self.llm.context_length
        room = context - len(prompt)
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        elif max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}, "
                                f"more than the context window of {context} tokens", param="max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if not all(stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                              seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)

    async def _generate(self, request: HTTPRequest, body: SamplingRequest, prompt: list[int],
                        max_tokens: int | None, fmt: CompletionFormat, default_max: int | None = None) -> Response:
        params = self._sampling_params(body, prompt, max_tokens, default_max)
        events = EventQueue(asyncio.get_running_loop())
        req = Request(prompt, params, events.put)
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), type="requests", code="rate_limit_exceeded") from None
        except SchedulerStopped as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(req, events, fmt, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._respond(request, req, events, fmt)

    async def _respond(self, request: HTTPRequest, req: Request, events: EventQueue,
                       fmt: CompletionFormat) -> Response:
        """Wait for the whole completion, or stop as soon as the client goes away."""

        async def collect() -> tuple[list[str], Output]:
            pieces = []
            async for event in events:
                if isinstance(event, Failure):
                    raise APIError(event.status, event.message, type="server_error")
                pieces.append(event.text)
            return pieces, event

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
                self.scheduler.cancel(req)
        if result.cancelled():
            return Response(status_code=CLIENT_CLOSED)
        pieces, last = result.result()
        return JSONResponse(fmt.response("".join(pieces), last.finish_reason,
                                         usage(len(req.prompt), last.completion_tokens)))

    async def _stream(self, req: Request, events: EventQueue, fmt: CompletionFormat,
                      include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: OpenAI chunks, an error event if the request fails, then [DONE].

        When the client disconnects, Starlette cancels this generator; `finally` then frees the
        request's batch slot.
        """
        try:
            for chunk in fmt.opening():
                yield _sse(chunk)
            async for event in events:
                if isinstance(event, Failure):
                    yield _sse(error_body(event.message, "server_error"))
                    break
                yield _sse(fmt.chunk(event.text, event.finish_reason))
                if event.finish_reason is not None and include_usage:
                    yield _sse(fmt.usage_chunk(usage(len(req.prompt), event.completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(req)


async def _on_http_error(_request: HTTPRequest, exc: Exception) -> Response:
    """Unknown routes and wrong methods, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                        headers=exc.headers)


async def _on_unexpected_error(_request: HTTPRequest, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def create_app(llm: LLM, max_batch_size: int = 8, max_queue: int = 64, model_name: str | None = None) -> FastAPI:
    """The server application for `llm`; its scheduler thread starts and stops with the app.

    model_name: the id clients pass as `model` (default: the checkpoint directory's name).
    """
    metrics = Metrics()
    scheduler = Scheduler(llm, max_batch_size, max_queue, metrics)
    api = OpenAIAPI(llm, scheduler, metrics, ChatFormat.load(llm.path), model_name or llm.path.name)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="moespec", lifespan=lifespan, openapi_url=None)
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", api.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/metrics", api.metrics_page, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_exception_handler(APIError, api.on_api_error)
    app.add_exception_handler(MoespecError, api.on_user_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    return app
