"""Ray Serve application: an autoscaled, batched HTTP endpoint for composed models.

Two deployments:

* ``LoraHubIngress`` (FastAPI, no model): validates requests, looks the recipe id up among the
  registered recipes only, and forwards to the model deployment with the recipe id as the
  multiplexed model id. Serves ``POST /generate``, ``GET /recipes``, ``GET /healthz``, the OpenAI API
  (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``: ``lorahub_ray.cluster.serve_openai``)
  and the OpenAPI description (``/openapi.json``, ``/docs``). With an API key, every route but
  ``/healthz`` asks for ``Authorization: Bearer KEY`` (``lorahub_ray.serving.auth``).
* ``LoraHubModel`` (autoscaled, batched): a :class:`~lorahub_ray.serving.host.ModelHost` per replica.
  Requests of every route are batched with ``@serve.batch`` (``max_batch_size`` counts inputs, not
  requests; within a batch, rows are grouped by generation options: ``lorahub_ray.serving.generation``);
  Serve splits batches by multiplexed id, so each batch runs one recipe, and in ``composed`` mode
  a batch for another recipe first switches the shared LoRA slot in place. It autoscales on the
  load each replica measures (busy fraction + waiting inputs in batches, reported through
  ``record_autoscaling_stats``) with ``lorahub_ray.cluster.serve_autoscaling.ModelLoadPolicy``.

``import_path: lorahub_ray.cluster.serve_app:app`` with ``args`` (see :class:`ServeArgs`) works with
``serve run``, ``serve deploy`` and a KubeRay RayService's ``serveConfigV2``; see
``deployments/lorahub_serve.yaml``.
"""

# no `from __future__ import annotations`: FastAPI resolves the route annotations of the
# Serve-wrapped methods at runtime
import asyncio
import time
from typing import Literal, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from ray import serve
from ray.serve.config import AutoscalingConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorahub_ray.cluster.serve_autoscaling import POLICY_PATH
from lorahub_ray.cluster.serve_model import MODEL, LoraHubModel
from lorahub_ray.cluster.serve_openai import OpenAIRoutes, internal_error, router as openai_router
from lorahub_ray.serving import auth
from lorahub_ray.serving.host import MODES, RECIPE_ID, ServeConfigError, describe, effective_mode, load_recipes, parse_specs
from lorahub_ray.serving.openai_api import OpenAIError, from_validation

INGRESS = "LoraHubIngress"


# --- configuration -------------------------------------------------------------------------------


class RecipeEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = Field(None, description="Public id of the recipe (default: the directory's name).")
    path: str = Field(description="Run directory (recipe.json and adapter/, or model/ with --merge): local path or s3:// URI.")


class ServeArgs(BaseModel):
    """The ``args`` of the application (``import_path: lorahub_ray.cluster.serve_app:app``)."""

    model_config = ConfigDict(extra="forbid")
    recipes: list[Union[str, RecipeEntry]] = Field(
        description="Recipes to serve: 'DIR', 'ID=DIR' or {id, path}; DIR is a local path or s3:// URI.")
    default_recipe: Optional[str] = Field(None, description="Recipe used when a request names none (default: the first).")
    mode: Literal["auto", "merged", "composed"] = Field(
        "auto", description="merged: one merged model per recipe; composed: one base model per base, LoRA switched "
                            "in place per request group; auto: merged for one recipe, composed for several.")
    device: Optional[str] = Field(None, description="Torch device in the replicas (default: cuda if visible, else cpu).")
    verify: bool = Field(True, description="Check the modules' and base model's hashes recorded in the recipes.")
    max_inputs: int = Field(32, ge=1, description="Most inputs in one request.")
    max_input_chars: int = Field(4096, ge=1, description="Longest input, in characters.")
    max_new_tokens_limit: int = Field(256, ge=1, description="Largest max_new_tokens a request may ask for.")
    max_batch_size: int = Field(32, ge=1, description="Most inputs generated together in one batch.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    num_cpus: float = Field(1, ge=0, description="CPUs per model replica.")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per model replica (fractions share a GPU); "
                                                              "default: gpu_fraction when the cluster has GPUs, else 0.")
    gpu_fraction: float = Field(0.5, gt=0, le=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    autoscaling_metric: Literal["model_load", "ongoing_requests"] = Field(
        "model_load", description="model_load: the replicas' own measure (busy fraction + waiting inputs in batches), "
                                  "scaled by ModelLoadPolicy; ongoing_requests: Serve's default policy.")
    target_model_load: float = Field(0.8, gt=0, description="model_load target per model replica.")
    target_ongoing_requests: float = Field(32, gt=0, description="Target per model replica with ongoing_requests.")
    autoscaling_options: dict = Field(default_factory=dict, description=(
        "More Serve autoscaling_config fields for the model deployment (upscale_delay_s, downscale_delay_s, "
        "metrics_interval_s, look_back_period_s, ...)."))
    api_key_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "Name of an environment variable (e.g. LORAHUB_RAY_API_KEY, set from a Kubernetes Secret) that holds the "
        "API key, read where the ingress runs: every route but /healthz then asks for 'Authorization: Bearer KEY'. "
        "The key itself never goes in the args: Serve logs them."))


def parse_args(args: Union[dict, ServeArgs]) -> ServeArgs:
    """Validate the application args; a :class:`ServeConfigError` names the bad field."""
    if isinstance(args, ServeArgs):
        parsed = args
    elif isinstance(args, dict) and "api_key" in args:
        raise ServeConfigError("api_key: Serve writes the application's args to its logs; put the key in an "
                               "environment variable on every node and name it with api_key_env")
    else:
        try:
            parsed = ServeArgs.model_validate(dict(args or {}))
        except ValidationError as exc:
            raise ServeConfigError("bad serve args: " + _summarize(exc.errors())) from None
    specs = parse_specs([e.model_dump() if isinstance(e, RecipeEntry) else e for e in parsed.recipes])
    ids = [s.id for s in specs]
    if parsed.default_recipe is not None and parsed.default_recipe not in ids:
        raise ServeConfigError(f"default_recipe '{parsed.default_recipe}' is not one of the recipes ({', '.join(ids)})")
    if parsed.max_inputs > parsed.max_batch_size:
        raise ServeConfigError(f"max_inputs ({parsed.max_inputs}) must not exceed max_batch_size "
                               f"({parsed.max_batch_size}): one request must fit in one batch")
    if parsed.min_replicas > parsed.max_replicas:
        raise ServeConfigError(f"min_replicas ({parsed.min_replicas}) exceeds max_replicas ({parsed.max_replicas})")
    autoscaling_config(parsed)  # Serve's own check of the fields
    return parsed


def autoscaling_config(args: ServeArgs) -> dict:
    """The model deployment's Serve ``autoscaling_config`` (checked by Serve's ``AutoscalingConfig``)."""
    config = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
              "target_ongoing_requests": args.target_ongoing_requests}
    if args.autoscaling_metric == "model_load":
        config["policy"] = {"policy_function": POLICY_PATH,
                            "policy_kwargs": {"target_model_load": args.target_model_load}}
    reserved = set(args.autoscaling_options) & {"min_replicas", "max_replicas", "policy"}
    if reserved:
        raise ServeConfigError(f"autoscaling_options: set {', '.join(sorted(reserved))} through their own args")
    unknown = set(args.autoscaling_options) - set(AutoscalingConfig.model_fields)
    if unknown:
        raise ServeConfigError(f"autoscaling_options: unknown field(s) {', '.join(sorted(unknown))}")
    config.update(args.autoscaling_options)
    try:
        AutoscalingConfig(**config)
    except (ValidationError, ValueError, TypeError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"msg": str(exc)}]
        raise ServeConfigError("bad autoscaling_options: " + _summarize(errors)) from None
    return config


def _plain(args: ServeArgs) -> dict:
    """The args as plain JSON data, the form the deployments receive."""
    data = args.model_dump()
    data["recipes"] = [e if isinstance(e, str) else {k: v for k, v in e.items() if v is not None}
                       for e in data["recipes"]]
    return data


def _summarize(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


# --- HTTP API ------------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"inputs": ["reverse: abc"], "max_new_tokens": 32, "recipe": "mytask"}]})
    inputs: list[StrictStr] = Field(min_length=1, description="Texts to generate from (at most max_inputs).")
    max_new_tokens: StrictInt = Field(64, ge=1, description="Longest answer, in tokens (at most max_new_tokens_limit).")
    recipe: Optional[StrictStr] = Field(None, description="Id of a served recipe (GET /recipes); default: the default recipe.")


class GenerateResponse(BaseModel):
    recipe: str
    outputs: list[str]


class ErrorResponse(BaseModel):
    detail: str


class ServedModule(BaseModel):
    name: str
    uri: str
    sha256: str


class RecipeInfo(BaseModel):
    id: str
    base_model: str
    modules: list[ServedModule]
    weights: dict[str, float]
    merge_method: str
    template: str = "plain"
    objective: float
    mode: Literal["merged", "composed"]
    default: bool


class Health(BaseModel):
    status: str
    recipes: int


api = FastAPI(
    title="lorahub-ray",
    version="0.1.0",
    description="Generation with LoraHub-composed seq2seq models (LoRA modules composed with searched weights).",
)


def _is_openai(request: Request) -> bool:
    path = request.url.path
    root = request.scope.get("root_path", "")
    return (path[len(root):] if root and path.startswith(root) else path).startswith("/v1/")


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError):
    return JSONResponse(status_code=exc.status, content=exc.body())


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's own errors (an unknown route, a wrong method) as OpenAI's error JSON under /v1/."""
    if _is_openai(request):
        return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                            content=OpenAIError(exc.status_code, str(exc.detail)).body())
    return await http_exception_handler(request, exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if _is_openai(request):
        return await _openai_error(request, from_validation(errors))
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    message = "malformed JSON body" if status == 400 else "invalid request: " + _summarize(errors)
    return JSONResponse(status_code=status, content={"detail": message})


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    error = internal_error(exc)
    return JSONResponse(status_code=500, content=error.body() if _is_openai(request) else {"detail": error.message})


def _replica_key_digest() -> Optional[bytes]:
    """The API key digest of the ingress replica serving this request (None: no key)."""
    return serve.get_replica_context().servable_object.api_key_digest


api.add_middleware(auth.BearerAuth, digest=_replica_key_digest)
api.include_router(openai_router)


def lookup_recipe(catalog: dict, recipe_id: str) -> dict:
    """The registered recipe named ``recipe_id``: a dictionary lookup, nothing else (404 otherwise,
    echoing the id only when it has an id's shape: never a path)."""
    entry = catalog.get(recipe_id)
    if entry is None:
        shown = f"'{recipe_id}'" if RECIPE_ID.match(recipe_id) else "(not an id: 1-64 letters, digits, '.', '_' or '-')"
        raise HTTPException(404, f"unknown recipe {shown}; GET /recipes lists the served ones")
    return entry


def check_limits(body: GenerateRequest, limits: dict) -> None:
    if len(body.inputs) > limits["max_inputs"]:
        raise HTTPException(422, f"too many inputs: {len(body.inputs)}; at most {limits['max_inputs']} per request")
    for i, text in enumerate(body.inputs):
        if len(text) > limits["max_input_chars"]:
            raise HTTPException(422, f"input {i} is too long: {len(text)} characters; "
                                     f"at most {limits['max_input_chars']}")
    if body.max_new_tokens > limits["max_new_tokens_limit"]:
        raise HTTPException(422, f"max_new_tokens is {body.max_new_tokens}; at most {limits['max_new_tokens_limit']}")


_ERRORS = {400: {"model": ErrorResponse}, 401: {"description": "OpenAI error JSON"}, 404: {"model": ErrorResponse},
           422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}}


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class LoraHubIngress(OpenAIRoutes):
    def __init__(self, model, config: dict, api_key_sha256: Optional[str] = None):
        # the key: its digest from the builder (--api-key), else from the variable named by api_key_env here
        self.api_key_digest = bytes.fromhex(api_key_sha256) if api_key_sha256 else (
            auth.digest_from_env(config["api_key_env"]) if config.get("api_key_env") else None)
        self.created = int(time.time())
        self.model = model
        specs = parse_specs(config["recipes"])
        recipes = load_recipes(specs)
        mode = effective_mode(config["mode"], len(specs))
        self.default = config.get("default_recipe") or specs[0].id
        self.catalog = {s.id: {**describe(s, recipes[s.id], mode), "default": s.id == self.default} for s in specs}
        self.limits = {k: config[k] for k in ("max_inputs", "max_input_chars", "max_new_tokens_limit")}
        # one handle per recipe, made once: the recipe id travels as the multiplexed model id
        self.handles = {rid: model.options(multiplexed_model_id=rid) for rid in self.catalog}

    @api.post("/generate", response_model=GenerateResponse, responses=_ERRORS,
              summary="Generate with a served recipe's composed model")
    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        recipe_id = body.recipe if body.recipe is not None else self.default
        lookup_recipe(self.catalog, recipe_id)
        check_limits(body, self.limits)
        try:
            outputs = await self.handles[recipe_id].generate.remote(body.inputs, body.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - no traceback reaches a client
            raise HTTPException(500, internal_error(exc).message) from None
        return GenerateResponse(recipe=recipe_id, outputs=outputs)

    @api.get("/recipes", response_model=list[RecipeInfo], summary="The served recipes")
    async def recipes(self) -> list[RecipeInfo]:
        return [RecipeInfo(**entry) for entry in self.catalog.values()]

    @api.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}}, summary="Liveness")
    async def healthz(self) -> Health:
        try:
            await asyncio.wait_for(self.model.health.remote(), timeout=10)
        except Exception:  # noqa: BLE001
            raise HTTPException(503, "model deployment is not answering") from None
        return Health(status="ok", recipes=len(self.catalog))


# --- application builder -------------------------------------------------------------------------


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def app(args: dict, *, api_key: Optional[str] = None) -> serve.Application:
    """Application builder: ``import_path: lorahub_ray.cluster.serve_app:app`` with ``args`` as in :class:`ServeArgs`.

    ``api_key`` (Python callers and ``lorahub-ray serve --api-key``; a Serve config names an environment
    variable with ``api_key_env`` instead): only its SHA-256 digest reaches the ingress."""
    parsed = parse_args(args)
    try:
        digest = None if api_key is None else auth.key_digest(api_key).hex()
    except auth.AuthConfigError as exc:
        raise ServeConfigError(str(exc)) from None
    config = _plain(parsed)
    num_gpus = parsed.num_gpus if parsed.num_gpus is not None else (parsed.gpu_fraction if _cluster_has_gpus() else 0)
    model = LoraHubModel.options(
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": num_gpus},
        autoscaling_config=autoscaling_config(parsed),
        max_ongoing_requests=max(64, 4 * parsed.max_batch_size),
        user_config={"max_batch_size": parsed.max_batch_size, "batch_wait_timeout_s": parsed.batch_wait_timeout_s},
    ).bind(config)
    return LoraHubIngress.bind(model, config, digest)


__all__ = ["INGRESS", "MODEL", "MODES", "GenerateRequest", "GenerateResponse", "LoraHubIngress", "LoraHubModel",
           "ServeArgs", "api", "app", "autoscaling_config", "check_limits", "lookup_recipe", "parse_args"]
