"""The OpenAI wire format: strictly validated request bodies, errors, responses and stream chunks.

Bodies are parsed by hand (UTF-8, then JSON, then pydantic in strict mode) so every way a body
can be wrong gets a 400 with OpenAI's error shape and a message naming the offending field,
instead of the framework's own 422 format. Unknown fields are ignored, as OpenAI-compatible
servers commonly do; known OpenAI options this server cannot honour are refused unless they are
given their neutral value.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

T = TypeVar("T", bound=BaseModel)

# options refused unless absent, null or one of these neutral values
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,), "suffix": ("",),
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


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]


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


class CompletionFormat:
    """Response and stream-chunk bodies of /v1/completions, for one request."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish_reason: str | None, stream: bool) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def response(self, text: str, finish_reason: str, usage: dict) -> dict:
        return {**self._head(self.object), "choices": [self._choice(text, finish_reason, False)], "usage": usage}

    def opening(self) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return {**self._head(self.chunk_object), "choices": [self._choice(text, finish_reason, True)]}

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk when the client asked for stream_options.include_usage: no choices."""
        return {**self._head(self.chunk_object), "choices": [], "usage": usage}


class ChatCompletionFormat(CompletionFormat):
    """Response and stream-chunk bodies of /v1/chat/completions: text goes in message / delta."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _choice(self, text: str, finish_reason: str | None, stream: bool) -> dict:
        if stream:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def opening(self) -> list[dict]:
        return [{**self._head(self.chunk_object), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}]
