"""The OpenAI wire format: strictly validated request bodies, errors, responses and stream chunks.

Bodies are parsed by hand (UTF-8, then JSON, then pydantic in strict mode) so every way a body
can be wrong gets a 400 with OpenAI's error shape and a message naming the offending field,
instead of the framework's own 422 format. Unknown fields are ignored, as OpenAI-compatible
servers commonly do; known OpenAI options this server cannot honour are refused unless they are
given their neutral value. The response models below are the served OpenAPI schema's; the
bodies themselves are built by the format classes at the end.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..decode.sampling import MAX_LOGPROBS, TokenLogprob

T = TypeVar("T", bound=BaseModel)

# options refused unless absent, null or one of these neutral values
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "suffix": ("",),
    "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],), "functions": ([],),
    "response_format": ({"type": "text"},),
}


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: no "5" for 5, no true for 1, no 1.5 for an int; finite floats only
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """Fields shared by completions and chat completions. top_k and ignore_eos extend OpenAI's set."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)  # choices per prompt, each a row of the batch


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False  # the prompt before the completion (with its logprobs if asked)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the n most likely tokens per position


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins if both are given
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# --- response bodies (for the OpenAPI schema) ----------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def parse_body(raw: bytes, model: type[T]) -> T:
    """Decode, parse and validate a request body, raising APIError(400) that says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:  # JSON escapes can smuggle in lone surrogates, which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "request body contains an unpaired UTF-16 surrogate escape: not valid Unicode") from None
    for name, neutral in UNSUPPORTED.items():
        if data.get(name) not in (None, *neutral):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, data) from None


def _param(error: dict, data: dict) -> str:
    """The dotted path of the offending field in the body (pydantic's union tags left out)."""
    parts: list[str] = []
    node: Any = data
    for i, key in enumerate(error["loc"]):
        last_missing = error["type"] == "missing" and i == len(error["loc"]) - 1
        if isinstance(node, dict) and isinstance(key, str) and (key in node or last_missing):
            parts.append(key)
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            parts.append(str(key))
            node = node[key]
        else:
            break
    return ".".join(parts)


def _validation_error(e: ValidationError, data: dict) -> APIError:
    errors = e.errors(include_url=False)
    param = _param(errors[0], data)
    if errors[0]["type"] == "missing":
        return APIError(400, f"missing required field '{param}'", param=param)
    messages = dict.fromkeys(err["msg"] for err in errors if _param(err, data) == param)
    return APIError(400, f"invalid '{param}': {' or '.join(messages)}", param=param)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


LOGPROB_FLOOR = -9999.0  # how a log-probability of -inf (probability 0 in float32) is written: JSON has no inf
TokenText = Callable[[int], str]  # a token id's text
Tokens = list[tuple[int, TokenLogprob | None]]  # (token id, its logprobs; None for a prompt's first token)


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class CompletionFormat:
    """Response and stream-chunk bodies of /v1/completions, for one request. `top`: the request's
    `logprobs` (None: no logprobs in the answer)."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str, token_text: TokenText, top: int | None = None):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.token_text, self.top = model, token_text, top
        self._offsets: dict[int, int] = {}  # per choice: the text offset of its next token

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, index: int, tokens: Tokens) -> dict | None:
        """OpenAI's legacy logprobs object for the next `tokens` of choice `index`."""
        if self.top is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self._offsets.get(index, 0)
        for token, record in tokens:
            text = self.token_text(token)
            top = None
            if record is not None:
                top = {}
                for alt, logprob in record.top:  # two ids may share a text: the likelier one stays
                    top.setdefault(self.token_text(alt), _finite(logprob))
            out["tokens"].append(text)
            out["token_logprobs"].append(None if record is None else _finite(record.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return out

    def _choice(self, index: int, text: str, tokens: Tokens, finish_reason: str | None, stream: bool) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(index, tokens), "finish_reason": finish_reason}

    def response(self, choices: list[tuple[str, Tokens, str]], usage: dict) -> dict:
        """The whole answer: (text, tokens, finish_reason) per choice."""
        return {**self._head(self.object), "usage": usage,
                "choices": [self._choice(i, text, tokens, reason, False) for i, (text, tokens, reason) in enumerate(choices)]}

    def opening(self, choices: int) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def chunk(self, index: int, text: str, tokens: Tokens, finish_reason: str | None) -> dict:
        return {**self._head(self.chunk_object), "choices": [self._choice(index, text, tokens, finish_reason, True)]}

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk when the client asked for stream_options.include_usage: no choices."""
        return {**self._head(self.chunk_object), "choices": [], "usage": usage}


class ChatCompletionFormat(CompletionFormat):
    """Response and stream-chunk bodies of /v1/chat/completions: text goes in message / delta,
    logprobs in the chat shape (`top` is the request's top_logprobs, 0 if only logprobs=true)."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def logprobs(self, index: int, tokens: Tokens) -> dict | None:
        if self.top is None:
            return None
        return {"content": [{**self._entry(token, record.logprob),
                             "top_logprobs": [self._entry(alt, logprob) for alt, logprob in record.top]}
                            for token, record in tokens if record is not None]}

    def _choice(self, index: int, text: str, tokens: Tokens, finish_reason: str | None, stream: bool) -> dict:
        logprobs = self.logprobs(index, tokens)
        if stream:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def opening(self, choices: int) -> list[dict]:
        return [{**self._head(self.chunk_object), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(choices)]
