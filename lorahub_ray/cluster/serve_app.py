"""Ray Serve application: an autoscaled, batched HTTP endpoint for composed models.

Two deployments:

* ``LoraHubIngress`` (FastAPI, no model): validates requests, looks the recipe id up among the
  registered recipes only, and forwards to the model deployment with the recipe id as the
  multiplexed model id. Serves ``POST /generate``, ``GET /recipes``, ``GET /healthz`` and the
  OpenAPI description (``/openapi.json``, ``/docs``).
* ``LoraHubModel`` (autoscaled, batched): a :class:`~lorahub_ray.serving.host.ModelHost` per replica.
  Requests are batched with ``@serve.batch`` (``max_batch_size`` counts inputs, not requests);
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
import logging
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import AutoscalingConfig

from lorahub_ray.cluster.serve_autoscaling import LOAD_METRIC, POLICY_PATH
from lorahub_ray.serving.host import MODES, ModelHost, ServeConfigError, describe, effective_mode, load_recipes, parse_specs
from lorahub_ray.serving.load import LoadMeter

logger = logging.getLogger("ray.serve")

INGRESS = "LoraHubIngress"
MODEL = "LoraHubModel"
# every replica hosts every registered recipe (the stacked modules are small), so the
# multiplexing cache never has to evict
MAX_RECIPES_PER_REPLICA = 4096
# batches Serve may hand over while the model is busy (they wait in LoraHubModel's queue)
BATCHES_IN_FLIGHT = 64


# --- configuration -------------------------------------------------------------------------------


class RecipeEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = Field(None, description="Public id of the recipe (default: the directory's name).")
    path: str = Field(description="Recipe directory (recipe.json, model/): local path or s3:// URI.")


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


def parse_args(args: Union[dict, ServeArgs]) -> ServeArgs:
    """Validate the application args; a :class:`ServeConfigError` names the bad field."""
    if isinstance(args, ServeArgs):
        parsed = args
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


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    message = "malformed JSON body" if status == 400 else "invalid request: " + _summarize(errors)
    return JSONResponse(status_code=status, content={"detail": message})


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return JSONResponse(status_code=500, content={"detail": _log_internal(exc)})


def _log_internal(exc: BaseException) -> str:
    ref = uuid.uuid4().hex[:12]
    logger.error("lorahub-ray: internal error %s", ref, exc_info=exc)
    return f"internal error (reference {ref}); see the server logs"


def lookup_recipe(catalog: dict, recipe_id: str) -> dict:
    """The registered recipe named ``recipe_id``: a dictionary lookup, nothing else (404 otherwise)."""
    entry = catalog.get(recipe_id)
    if entry is None:
        shown = recipe_id if len(recipe_id) <= 80 else recipe_id[:77] + "..."
        raise HTTPException(404, f"unknown recipe {shown!r}; GET /recipes lists the served ones")
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


_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
           500: {"model": ErrorResponse}}


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class LoraHubIngress:
    def __init__(self, model, config: dict):
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
            raise HTTPException(500, _log_internal(exc)) from None
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


# --- model deployment ----------------------------------------------------------------------------


def count_inputs(items) -> int:
    """Batch size as the number of inputs (each batched item is ``(recipe_id, inputs, max_new_tokens)``)."""
    return sum(len(item[1]) for item in items)


@serve.deployment(name=MODEL, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32})
class LoraHubModel:
    def __init__(self, config: dict):
        self.host = ModelHost(config["recipes"], mode=config["mode"], device=config.get("device"),
                              verify=config.get("verify", True), generate_batch_size=config["max_batch_size"])
        self._pending: list = []  # batches formed by Serve, waiting for the model
        self._worker = None
        self.load = LoadMeter()
        self._load_gauge = serve_metrics.Gauge(
            "lorahub_model_load", description="Replica load: busy fraction + waiting inputs / max_batch_size.")
        self._waiting_gauge = serve_metrics.Gauge(
            "lorahub_model_waiting_inputs", description="Inputs in the replica waiting for the model.")
        self.reconfigure({k: config[k] for k in ("max_batch_size", "batch_wait_timeout_s")})

    def reconfigure(self, user_config: dict) -> None:
        """Batching settings, changeable without restarting replicas (``user_config``)."""
        if "max_batch_size" in user_config:
            self.max_batch_size = int(user_config["max_batch_size"])
            self._generate_batch.set_max_batch_size(self.max_batch_size)
            self.host.generate_batch_size = self.max_batch_size
        if "batch_wait_timeout_s" in user_config:
            self._generate_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.multiplexed(max_num_models_per_replica=MAX_RECIPES_PER_REPLICA)
    async def _recipe(self, recipe_id: str) -> str:
        # every replica holds every recipe: "loading" one is a lookup among the registered ids
        if recipe_id not in self.host.recipes:
            raise KeyError(f"unknown recipe {recipe_id!r}")
        return recipe_id

    async def generate(self, inputs: list[str], max_new_tokens: int) -> list[str]:
        recipe_id = await self._recipe(serve.get_multiplexed_model_id())
        with self.load.accepted(len(inputs)):
            if len(inputs) > self.max_batch_size:  # cannot share a batch
                with self.load.running(len(inputs)):
                    return await asyncio.to_thread(self.host.generate, recipe_id, inputs,
                                                   max_new_tokens=max_new_tokens)
            return await self._generate_batch((recipe_id, list(inputs), int(max_new_tokens)))

    async def record_autoscaling_stats(self) -> dict:
        """Serve's custom-metrics hook: this replica's ``model_load`` (read by ModelLoadPolicy)."""
        sample = self.load.sample(self.max_batch_size)
        self._load_gauge.set(sample["load"])
        self._waiting_gauge.set(sample["waiting"])
        return {LOAD_METRIC: sample["load"], "model_busy": sample["busy"], "model_waiting_inputs": sample["waiting"]}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=count_inputs,
                 max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _generate_batch(self, items: list[tuple[str, list[str], int]]) -> list[list[str]]:
        # Serve forms a batch as soon as requests arrive, even while the model is busy with the
        # previous one; the model queue below merges the batches that waited meanwhile
        future = asyncio.get_running_loop().create_future()
        self._pending.append((items, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Run the waiting batches one model call at a time, merging those of one recipe up to max_batch_size inputs."""
        while self._pending:
            recipe_id = self._pending[0][0][0][0]
            taken, rest, size = [], [], 0
            for entry in self._pending:
                n = count_inputs(entry[0])
                if entry[0][0][0] == recipe_id and (not taken or size + n <= self.max_batch_size):
                    taken.append(entry)
                    size += n
                else:
                    rest.append(entry)
            self._pending = rest
            flat = [item for items, _ in taken for item in items]
            try:
                # off the event loop, so requests keep arriving meanwhile
                with self.load.running(size):
                    results = await asyncio.to_thread(self._run_batch, flat)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            pos = 0
            for items, future in taken:
                if not future.done():
                    future.set_result(results[pos : pos + len(items)])
                pos += len(items)

    def _run_batch(self, items):
        # Serve splits batches by multiplexed id; group anyway, and by max_new_tokens
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (recipe_id, _, max_new) in enumerate(items):
            groups.setdefault((recipe_id, max_new), []).append(i)
        results: list = [None] * len(items)
        for (recipe_id, max_new), members in groups.items():
            flat = [text for i in members for text in items[i][1]]
            outputs = self.host.generate(recipe_id, flat, max_new_tokens=max_new)
            pos = 0
            for i in members:
                n = len(items[i][1])
                results[i] = outputs[pos : pos + n]
                pos += n
        return results

    async def health(self) -> dict:
        return {**self.host.stats(), "waiting_inputs": self.load.waiting}


# --- application builder -------------------------------------------------------------------------


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def app(args: dict) -> serve.Application:
    """Application builder: ``import_path: lorahub_ray.cluster.serve_app:app`` with ``args`` as in :class:`ServeArgs`."""
    parsed = parse_args(args)
    config = _plain(parsed)
    num_gpus = parsed.num_gpus if parsed.num_gpus is not None else (parsed.gpu_fraction if _cluster_has_gpus() else 0)
    model = LoraHubModel.options(
        ray_actor_options={"num_cpus": parsed.num_cpus, "num_gpus": num_gpus},
        autoscaling_config=autoscaling_config(parsed),
        max_ongoing_requests=max(64, 4 * parsed.max_batch_size),
        user_config={"max_batch_size": parsed.max_batch_size, "batch_wait_timeout_s": parsed.batch_wait_timeout_s},
    ).bind(config)
    return LoraHubIngress.bind(model, config)


__all__ = ["INGRESS", "MODEL", "MODES", "GenerateRequest", "GenerateResponse", "LoraHubIngress", "LoraHubModel",
           "ServeArgs", "api", "app", "autoscaling_config", "check_limits", "lookup_recipe", "parse_args"]
