"""OpenAI's API for served recipes (Ray-free): request models, their checks against the server's
limits, the response and stream-chunk objects, and OpenAI's error JSON.

Shapes follow OpenAI's API reference and vLLM's OpenAI server, so that the ``openai`` client,
LangChain, LiteLLM and curl recipes work unchanged:

* ``model`` is a recipe id (``GET /v1/models``);
* a completion's ``prompt`` is rendered with the recipe's template, as ``POST /generate`` renders its
  inputs, so ``temperature=0`` gives ``/generate``'s text; a chat's ``messages`` are rendered with the
  tokenizer's chat template;
* ``usage`` counts the prompts' tokens (each prompt once, whatever ``n``) and every choice's tokens;
* a request over the limits, with an option the server cannot honour, or with an unknown field gets a 400,
  an unknown model a 404, in ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from lorahub_ray.serving.host import RECIPE_ID

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4  # OpenAI's limit on stop sequences


class OpenAIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_body(cls, status: int, body: dict) -> OpenAIError:
        e = body["error"]
        return cls(status, e["message"], param=e.get("param"), code=e.get("code"), type=e.get("type"))


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unknown_model(name: str, listing: str = "GET /v1/models") -> OpenAIError:
    """404 for a model id that is not served. The id is echoed only when it has the shape of an id
    (letters, digits, '.', '_', '-'): never a path, never markup."""
    if RECIPE_ID.match(name):
        message = f"The model '{name}' does not exist; {listing} lists the served ones"
    else:
        message = (f"The model named in the request does not exist (an id is 1-64 letters, digits, '.', '_' or '-'); "
                   f"{listing} lists the served ones")
    return OpenAIError(404, message, param="model", code="model_not_found")


def from_validation(errors) -> OpenAIError:
    """A 400 for the first error of a request body's validation (pydantic/FastAPI errors)."""
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    if first.get("type") == "json_invalid":
        return invalid("malformed JSON body")
    if first.get("type") == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    message = str(first.get("msg", "invalid"))
    return invalid(f"invalid request: {param}: {message}" if param else f"invalid request: {message}", param)


# --- requests ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="A served recipe's id (GET /v1/models).")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy (POST /generate's decoding); default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling (with temperature > 0); default 1.")
    n: Optional[StrictInt] = Field(None, ge=1, description="Completions of each prompt.")
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, description=f"Up to {MAX_STOPS} stop strings.")
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None
    # accepted at their neutral values only (a clear 400 otherwise)
    seed: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None


class CompletionRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"model": "mytask", "prompt": "reverse: abc", "max_tokens": 32, "temperature": 0}]})
    prompt: Union[StrictStr, list[StrictStr]] = Field(description="A text or a list of texts.")
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description=f"Default {COMPLETION_DEFAULT_MAX_TOKENS}.")
    echo: Optional[StrictBool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value):
        if isinstance(value, list) and value and (isinstance(value[0], int) or isinstance(value[0], list)):
            raise ValueError("prompts given as token ids are not supported; send text")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # messages that clients send back (a previous response's message) carry more fields; only these count
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]
    name: Optional[StrictStr] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"model": "mytask", "messages": [{"role": "user", "content": "reverse: abc"}],
                      "max_tokens": 32, "temperature": 0}]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description="Default: the server's max_new_tokens_limit.")
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, description="max_tokens' newer name.")
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None


_NEUTRAL = {  # field: (neutral test, why it is refused otherwise)
    "seed": (lambda v: v is None, "sampling is batched across requests, so a seed could not make it reproducible"),
    "frequency_penalty": (lambda v: not v, "penalties are not implemented"),
    "presence_penalty": (lambda v: not v, "penalties are not implemented"),
    "logit_bias": (lambda v: not v, "logit_bias is not implemented"),
    "echo": (lambda v: not v, "echo is not implemented"),
    "logprobs": (lambda v: not v, "log-probabilities are not returned"),
    "top_logprobs": (lambda v: not v, "log-probabilities are not returned"),
    "best_of": (lambda v: v in (None, 1), "best_of is not implemented"),
    "suffix": (lambda v: not v, "suffix (insertion) is not implemented"),
    "response_format": (lambda v: not v or v.get("type") == "text", "only text responses are produced"),
    "tools": (lambda v: not v, "tool calling is not implemented"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not implemented"),
}


def work(body: _Request, limits: dict) -> dict:
    """The checked request as the model deployment's work: ``{"prompts" | "messages", "n",
    "options": {max_new_tokens, temperature, top_p, stop}}``; a 400 :class:`OpenAIError` names the
    first field that breaks a limit or asks for what is not implemented."""
    for name, (neutral, why) in _NEUTRAL.items():
        if name in type(body).model_fields and not neutral(getattr(body, name)):
            raise invalid(f"'{name}' is not supported here: {why}", name, "unsupported_parameter")
    n = body.n or 1
    if isinstance(body, CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise invalid("prompt: give a text or a non-empty list of texts", "prompt")
        for i, text in enumerate(prompts):
            if len(text) > limits["max_input_chars"]:
                raise invalid(f"prompt {i} is too long: {len(text)} characters; at most {limits['max_input_chars']}",
                              "prompt")
        max_param, max_tokens = "max_tokens", body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        payload = {"prompts": prompts}
    else:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > limits["max_input_chars"]:
            raise invalid(f"messages are too long: {chars} characters in all; at most {limits['max_input_chars']}",
                          "messages")
        prompts = [messages]
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens or limits["max_new_tokens_limit"]
        payload = {"messages": messages}
    if len(prompts) * n > limits["max_inputs"]:
        raise invalid(f"too many completions: {len(prompts)} prompt(s) x n={n}; at most {limits['max_inputs']} "
                      "per request", "n" if n > 1 else "prompt")
    if max_tokens > limits["max_new_tokens_limit"]:
        raise invalid(f"{max_param} is {max_tokens}; at most {limits['max_new_tokens_limit']}", max_param)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise invalid(f"stop: at most {MAX_STOPS} non-empty strings", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return {**payload, "n": n, "options": {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                                           "stop": stops}}


# --- responses -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(result: dict) -> dict:
    prompt = sum(result["prompt_tokens"])
    completion = sum(c["completion_tokens"] for c in result["choices"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_object(recipe_id: str, created: int) -> dict:
    return {"id": recipe_id, "object": "model", "created": created, "owned_by": "lorahub-ray"}


def completion(result: dict, *, model: str, chat: bool, id: str | None = None, created: int | None = None) -> dict:
    """The ``text_completion`` or ``chat.completion`` object of a finished job's result."""
    choices = []
    for i, c in enumerate(result["choices"]):
        body = {"message": {"role": "assistant", "content": c["text"]}} if chat else {"text": c["text"]}
        choices.append({"index": i, **body, "logprobs": None, "finish_reason": c["finish_reason"]})
    return {"id": id or new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": created or int(time.time()), "model": model, "choices": choices, "usage": usage(result)}


class Chunks:
    """The server-sent events of one streamed completion or chat completion, in OpenAI's chunk format."""

    def __init__(self, model: str, *, chat: bool, include_usage: bool = False):
        self.model, self.chat, self.include_usage = model, chat, include_usage
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _event(self, choices: list, **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices, **extra}
        if self.include_usage and "usage" not in extra:
            chunk["usage"] = None
        return sse(chunk)

    def start(self, choices: int) -> list[str]:
        """A chat's first chunk for each choice names the assistant's role."""
        if not self.chat:
            return []
        return [self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(choices)]

    def text(self, index: int, text: str, finish_reason: str | None = None) -> str:
        if self.chat:
            choice = {"index": index, "delta": {"content": text} if text else {}}
        else:
            choice = {"index": index, "text": text}
        return self._event([{**choice, "logprobs": None, "finish_reason": finish_reason}])

    def usage(self, result: dict) -> list[str]:
        return [self._event([], usage=usage(result))] if self.include_usage else []


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
