"""The OpenAI-compatible HTTP API over one loaded model.

Handlers on the event loop only read the body (bounded: 413 past `max_body_bytes`; 415 unless it
is declared JSON) and relay events. Parsing, tokenization, chat templates and prompt checks run
on a small worker pool, so a huge prompt never stalls /health or the streams of others. A request
becomes one scheduler request per choice (prompts × n), submitted together, and their events come
back as one JSON response or as server-sent events. Nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..decode.sampling import SEED_RANGE, SamplingParams
from ..errors import MoespecError
from .chat import ChatFormat
from .metrics import CONTENT_TYPE, Metrics
from .openapi import openapi_schema, route_docs
from .protocol import (APIError, ChatCompletionFormat, ChatRequest, CompletionFormat, CompletionRequest,
                       DetokenizeRequest, SamplingRequest, TokenizeRequest, Tokens, error_body, parse_body, usage)
from .scheduler import Event, Failure, Output, QueueFull, Request, Scheduler, SchedulerStopped

if TYPE_CHECKING:
    from ..api import LLM

log = logging.getLogger(__name__)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_MAX_BODY_BYTES = 2 * 2**20  # a 128k-token prompt is well under this; tokenizing more takes seconds
PREPARE_WORKERS = 2  # threads that parse and tokenize request bodies
CLIENT_CLOSED = 499  # nginx's convention; the client never sees it


@dataclass
class Prepared:
    """A validated request: prompt ids and sampling parameters per choice, and how to answer."""

    choices: list[tuple[list[int], SamplingParams]]
    fmt: CompletionFormat
    stream: bool
    include_usage: bool
    prompt_tokens: int  # each prompt counted once, as OpenAI counts usage
    echo: list[str] | None = None  # per choice, the prompt text sent before its completion


@dataclass
class Choice:
    """What has come back so far for one choice."""

    pieces: list[str] = field(default_factory=list)
    tokens: Tokens = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class EventQueue:
    """Carries the events of one HTTP request's choices from the scheduler thread to the
    coroutine serving it, tagged with the choice's index."""

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int):
        self._loop, self._open = loop, choices
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def sink(self, index: int) -> Callable[[Event], None]:
        """The callback for choice `index`, called on the scheduler thread."""
        def put(event: Event) -> None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
        return put

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        """Events until every choice has finished, or the first failure."""
        while self._open:
            index, event = await self._queue.get()
            yield index, event
            if isinstance(event, Failure):
                return
            if event.finish_reason is not None:
                self._open -= 1


async def _wait_for_disconnect(request: HTTPRequest) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class OpenAIAPI:
    """Route handlers for one model served by one scheduler."""

    def __init__(self, llm: LLM, scheduler: Scheduler, metrics: Metrics, chat: ChatFormat, model_name: str,
                 max_body_bytes: int):
        self.llm, self.scheduler, self.metrics, self.chat = llm, scheduler, metrics, chat
        self.model_name, self.max_body_bytes = model_name, max_body_bytes
        self.workers = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="moespec-prepare")

    # --- routes --------------------------------------------------------------------------------

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, await self._prepare(request, self._prepare_completion))

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, await self._prepare(request, self._prepare_chat))

    async def tokenize(self, request: HTTPRequest) -> Response:
        return JSONResponse(await self._prepare(request, self._tokenize))

    async def detokenize(self, request: HTTPRequest) -> Response:
        return JSONResponse(await self._prepare(request, self._detokenize))

    async def metrics_page(self) -> Response:
        text = self.metrics.render(self.scheduler.queue_length, self.scheduler.running)
        return Response(text, media_type=CONTENT_TYPE)

    async def health(self) -> Response:
        if not self.scheduler.alive:
            raise APIError(503, "the engine is not running or the server is shutting down", type="server_error",
                           code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    # --- error handlers ------------------------------------------------------------------------

    async def on_api_error(self, _request: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        if exc.status < 500:
            self.metrics.request_rejected(exc.status)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def on_user_error(self, request: HTTPRequest, exc: Exception) -> Response:
        """A MoespecError raised while preparing a request (bad prompt, bad sampling option)."""
        return await self.on_api_error(request, APIError(400, str(exc)))

    # --- preparing a request (on the worker pool) ----------------------------------------------

    async def _read_body(self, request: HTTPRequest) -> bytes:
        """The body, refused with 415 unless declared JSON and with 413 once past the limit."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json', "
                                f"got {media or 'no content type'!r}")
        too_big = APIError(413, f"the request body is larger than the server's limit of {self.max_body_bytes} "
                                "bytes (moespec serve --max-body-bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _prepare(self, request: HTTPRequest, prepare: Callable[[bytes], Any]) -> Any:
        raw = await self._read_body(request)
        return await asyncio.get_running_loop().run_in_executor(self.workers, prepare, raw)

    def _prepare_completion(self, raw: bytes) -> Prepared:
        body = parse_body(raw, CompletionRequest)
        self._check_model(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and \
            not isinstance(body.prompt[0], int) else [body.prompt]
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.llm.encode(p) if isinstance(p, str) else p for p in prompts]
        self._check_logprobs(body.logprobs, "logprobs")
        prompt_logprobs = body.logprobs if body.echo else None
        prepared = self._prepared(body, ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS,
                                  CompletionFormat(self.model_name, self._token_text, body.logprobs),
                                  body.logprobs, prompt_logprobs)
        if body.echo:
            shown = [t if t is not None else self._decode(i) for t, i in zip(texts, ids)]
            prepared.echo = [text for text in shown for _ in range(body.n)]
        return prepared

    def _prepare_chat(self, raw: bytes) -> Prepared:
        body = parse_body(raw, ChatRequest)
        self._check_model(body.model)
        ids = self._chat_ids(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        self._check_logprobs(top, "logprobs")
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        return self._prepared(body, [ids], max_tokens, None, ChatCompletionFormat(self.model_name, self._token_text, top),
                              top, None)

    def _tokenize(self, raw: bytes) -> dict:
        body = parse_body(raw, TokenizeRequest)
        if body.model is not None:
            self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.prompt is not None:
            ids = self.llm.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            ids = self._chat_ids(body.messages)
        return {"count": len(ids), "max_model_len": self.llm.context_length, "tokens": ids}

    def _detokenize(self, raw: bytes) -> dict:
        body = parse_body(raw, DetokenizeRequest)
        if body.model is not None:
            self._check_model(body.model)
        vocab = self.llm.spec.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": self._decode(body.tokens)}

    # --- helpers -------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "moespec"}

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check_logprobs(self, top: int | None, param: str) -> None:
        if top is not None and self.llm.config.specdecode.speculative != "off":
            raise APIError(400, "logprobs are not available from a server running self-speculative decoding "
                                "(moespec serve --speculative self)", param=param)

    def _tokenizer(self):
        if self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer.json: it takes and gives token ids only")
        return self.llm.tokenizer

    def _chat_ids(self, messages: list) -> list[int]:
        if not messages:
            raise APIError(400, "'messages' must hold at least one message", param="messages")
        return self.chat.encode([{"role": m.role, "content": m.text()} for m in messages], self._tokenizer())

    def _decode(self, ids: list[int]) -> str:
        return self.llm.tokenizer.decode(ids, skip_special_tokens=True) if self.llm.tokenizer is not None else ""

    def _token_text(self, token: int) -> str:
        """A token's own text in logprobs (special tokens included; 'token_id:N' without a tokenizer)."""
        if self.llm.tokenizer is None:
            return f"token_id:{token}"
        return self.llm.tokenizer.decode([token], skip_special_tokens=False)

    def _prepared(self, body: SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                  default_max: int | None, fmt: CompletionFormat, logprobs: int | None,
                  prompt_logprobs: int | None) -> Prepared:
        """Each prompt × n as a choice with its sampling parameters (choice j of a seeded
        request samples with seed + j, so the n choices differ and each is reproducible)."""
        if len(prompts) * body.n > self.scheduler.capacity:
            raise APIError(400, f"{len(prompts)} prompt(s) × n={body.n} choices is more than this server takes at "
                                f"once ({self.scheduler.capacity}: --max-batch-size + --max-queue)", param="n")
        choices = []
        for prompt in prompts:
            params = self._sampling_params(body, prompt, max_tokens, default_max, logprobs, prompt_logprobs)
            for j in range(body.n):
                seed = None if params.seed is None else \
                    (params.seed + j - SEED_RANGE[0]) % (SEED_RANGE[1] - SEED_RANGE[0]) + SEED_RANGE[0]
                choices.append((prompt, replace(params, seed=seed)))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return Prepared(choices, fmt, bool(body.stream), include_usage, sum(len(p) for p in prompts))

    def _sampling_params(self, body: SamplingRequest, prompt: list[int], max_tokens: int | None,
                         default_max: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
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
                              seed=body.seed, stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)

    # --- running a request ---------------------------------------------------------------------

    async def _generate(self, request: HTTPRequest, job: Prepared) -> Response:
        events = EventQueue(asyncio.get_running_loop(), len(job.choices))
        reqs = [Request(prompt, params, events.sink(i)) for i, (prompt, params) in enumerate(job.choices)]
        try:
            self.scheduler.submit(reqs)
        except QueueFull as e:
            raise APIError(429, str(e), type="requests", code="rate_limit_exceeded") from None
        except SchedulerStopped as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        if job.stream:
            return StreamingResponse(self._stream(reqs, events, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._respond(request, reqs, events, job)

    @staticmethod
    def _piece(job: Prepared, req: Request, index: int, event: Output, first: bool) -> tuple[str, Tokens]:
        """The text and logprob tokens an output adds to its choice (the echoed prompt first)."""
        text, tokens = event.text, [(r.token, r) for r in event.logprobs]
        if first and job.echo is not None:
            text = job.echo[index] + text
            if event.prompt_logprobs is not None:
                tokens = [(req.prompt[0], None), *((r.token, r) for r in event.prompt_logprobs), *tokens]
        return text, tokens

    async def _respond(self, request: HTTPRequest, reqs: list[Request], events: EventQueue,
                       job: Prepared) -> Response:
        """Wait for every choice, or stop as soon as the client goes away."""
        choices = [Choice() for _ in reqs]

        async def collect() -> None:
            async for i, event in events:
                if isinstance(event, Failure):
                    raise APIError(event.status, event.message, type="server_error")
                choice = choices[i]
                text, tokens = self._piece(job, reqs[i], i, event, not choice.pieces)
                choice.pieces.append(text)
                choice.tokens += tokens
                choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            result.cancel()
            for req in reqs:  # nothing for finished ones; frees the rows of the rest
                self.scheduler.cancel(req)
        if result not in done:
            return Response(status_code=CLIENT_CLOSED)
        result.result()  # raises the failure, if a choice failed
        body = job.fmt.response([("".join(c.pieces), c.tokens, c.finish_reason) for c in choices],
                                usage(job.prompt_tokens, sum(c.completion_tokens for c in choices)))
        return JSONResponse(body)

    async def _stream(self, reqs: list[Request], events: EventQueue, job: Prepared) -> AsyncIterator[str]:
        """Server-sent events: OpenAI chunks, an error event if a choice fails, then [DONE].

        When the client disconnects, Starlette cancels this generator; `finally` then frees the
        requests' batch rows.
        """
        started, completion_tokens = set(), [0] * len(reqs)
        try:
            for chunk in job.fmt.opening(len(reqs)):
                yield _sse(chunk)
            async for i, event in events:
                if isinstance(event, Failure):
                    yield _sse(error_body(event.message, "server_error"))
                    break
                text, tokens = self._piece(job, reqs[i], i, event, i not in started)
                started.add(i)
                completion_tokens[i] = event.completion_tokens
                yield _sse(job.fmt.chunk(i, text, tokens, event.finish_reason))
            else:
                if job.include_usage:
                    yield _sse(job.fmt.usage_chunk(usage(job.prompt_tokens, sum(completion_tokens))))
            yield "data: [DONE]\n\n"
        finally:
            for req in reqs:
                self.scheduler.cancel(req)


async def _on_http_error(_request: HTTPRequest, exc: Exception) -> Response:
    """Unknown routes and wrong methods, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                        headers=exc.headers)


async def _on_client_disconnect(_request: HTTPRequest, _exc: Exception) -> Response:
    """The client left while sending its body: nobody reads the answer."""
    return Response(status_code=CLIENT_CLOSED)


async def _on_unexpected_error(_request: HTTPRequest, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def create_app(llm: LLM, max_batch_size: int = 8, max_queue: int = 64, model_name: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The server application for `llm`; its scheduler thread starts and stops with the app
    (`app.state.scheduler`, drained by the server at shutdown).

    model_name: the id clients pass as `model` (default: the checkpoint directory's name).
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise MoespecError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    metrics = Metrics()
    scheduler = Scheduler(llm, max_batch_size, max_queue, metrics)
    name = model_name or llm.path.name
    api = OpenAIAPI(llm, scheduler, metrics, ChatFormat.load(llm.path), name, max_body_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            api.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="moespec", summary="OpenAI-compatible API of one MoE model with offloaded experts",
                  version="1", lifespan=lifespan)
    app.state.scheduler = scheduler
    routes = [("/v1/models", api.list_models, "GET"), ("/v1/models/{model_id:path}", api.get_model, "GET"),
              ("/v1/completions", api.completions, "POST"), ("/v1/chat/completions", api.chat_completions, "POST"),
              ("/tokenize", api.tokenize, "POST"), ("/detokenize", api.detokenize, "POST"),
              ("/metrics", api.metrics_page, "GET"), ("/health", api.health, "GET")]
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method], **route_docs(path))
    app.add_exception_handler(APIError, api.on_api_error)
    app.add_exception_handler(MoespecError, api.on_user_error)
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    app.openapi = lambda: openapi_schema(app, name)
    return app
