"""The OpenAI-compatible routes of the Serve ingress: ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events with
``"stream": true``).

:class:`OpenAIRoutes` is a base class of ``LoraHubIngress`` (Serve binds the routes of a class's bases
too); the routes use the ingress's catalogue, limits and per-recipe handles. A request goes to the
model deployment like ``POST /generate``: the recipe id as Serve's multiplexed model id, the same
``@serve.batch`` batches (options group rows within a batch, see ``lorahub_ray.serving.generation``)
and the same load metering for autoscaling. Request and protocol shapes: ``lorahub_ray.serving.openai_api``.
"""

# no `from __future__ import annotations`: FastAPI resolves the route annotations at runtime
import logging
import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from lorahub_ray.serving import openai_api as oa

logger = logging.getLogger("ray.serve")

router = APIRouter(prefix="/v1", tags=["OpenAI"])
_ERRORS = {400: {"description": "OpenAI error JSON"}, 401: {"description": "OpenAI error JSON"},
           404: {"description": "OpenAI error JSON"}, 500: {"description": "OpenAI error JSON"}}


def internal_error(exc: BaseException) -> oa.OpenAIError:
    """A 500 whose message points at the server log (where the traceback goes), never at the traceback."""
    ref = uuid.uuid4().hex[:12]
    logger.error("lorahub-ray: internal error %s", ref, exc_info=exc)
    return oa.OpenAIError(500, f"internal error (reference {ref}); see the server logs")


class OpenAIRoutes:
    """Routes for ``LoraHubIngress``, which sets ``catalog``, ``limits`` and ``handles`` (recipe id ->
    the model deployment's handle with that multiplexed model id)."""

    catalog: dict
    limits: dict
    handles: dict
    created: int

    def _recipe_handle(self, model: str):
        if model not in self.catalog:
            raise oa.unknown_model(model)
        return self.handles[model]

    @router.get("/models", summary="The served recipes, as OpenAI models", responses=_ERRORS)
    async def list_models(self) -> dict:
        return {"object": "list", "data": [oa.model_object(rid, self.created) for rid in self.catalog]}

    @router.get("/models/{model}", summary="One served recipe, as an OpenAI model", responses=_ERRORS)
    async def get_model(self, model: str) -> dict:
        self._recipe_handle(model)
        return oa.model_object(model, self.created)

    @router.post("/completions", summary="Complete prompts with a served recipe (OpenAI API)", responses=_ERRORS)
    async def completions(self, body: oa.CompletionRequest):
        return await self._answer(body, chat=False)

    @router.post("/chat/completions", summary="Chat with a served recipe (OpenAI API)", responses=_ERRORS)
    async def chat_completions(self, body: oa.ChatCompletionRequest):
        return await self._answer(body, chat=True)

    async def _answer(self, body, *, chat: bool):
        handle = self._recipe_handle(body.model)
        work = oa.work(body, self.limits)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, work, oa.Chunks(body.model, chat=chat, include_usage=include_usage))
        try:
            result = await handle.complete.remote(work)
        except Exception as exc:  # noqa: BLE001 - no traceback reaches a client
            raise internal_error(exc) from None
        if "error" in result:
            raise oa.OpenAIError.from_body(result["status"], result)
        return JSONResponse(oa.completion(result, model=body.model, chat=chat))

    async def _stream(self, handle, work: dict, chunks: "oa.Chunks"):
        try:
            events = handle.options(stream=True).stream.remote(work)
            first = await events.__anext__()  # the request's own errors come before any event
        except Exception as exc:  # noqa: BLE001
            raise internal_error(exc) from None
        if "error" in first:
            raise oa.OpenAIError.from_body(first["status"], first)
        choices = len(work.get("prompts") or [None]) * work["n"]

        async def sse():
            sent = [""] * choices
            try:
                for event in chunks.start(choices):
                    yield event
                result = None
                async for item in events:
                    for index, text in item.get("deltas", ()):
                        sent[index] += text
                        yield chunks.text(index, text)
                    result = item.get("result", result)
                for index, choice in enumerate(result["choices"]):
                    if not choice["text"].startswith(sent[index]):
                        logger.warning("lorahub-ray: streamed text of choice %d differs from its final text", index)
                    yield chunks.text(index, choice["text"][len(sent[index]):], choice["finish_reason"])
                for event in chunks.usage(result):
                    yield event
            except Exception as exc:  # noqa: BLE001 - the stream is under way: the error is its last event
                yield oa.sse(internal_error(exc).body())
            yield oa.DONE

        return StreamingResponse(sse(), media_type="text/event-stream")
