"""The model deployment of the Serve application (``lorahub_ray.cluster.serve_app``): a
:class:`~lorahub_ray.serving.host.ModelHost` per replica, behind ``@serve.batch``.

Every route's requests become :class:`~lorahub_ray.serving.generation.Job` s (``POST /generate``,
``/v1/completions``, ``/v1/chat/completions``, streamed or not) and share the same batches: Serve
splits batches by multiplexed id (the recipe), the replica's queue merges the batches that waited
while the model was busy, and ``run_batch`` groups the rows by generation options. Each replica
measures its own load (busy fraction + waiting inputs, ``LoadMeter``) for autoscaling.
"""

import asyncio

from ray import serve
from ray.serve import metrics as serve_metrics

from lorahub_ray.cluster.serve_autoscaling import LOAD_METRIC
from lorahub_ray.core.templates import render_chat
from lorahub_ray.serving.generation import Job, Options, run_batch
from lorahub_ray.serving.host import ModelHost
from lorahub_ray.serving.load import LoadMeter
from lorahub_ray.serving.openai_api import OpenAIError

MODEL = "LoraHubModel"
# every replica hosts every registered recipe (the stacked modules are small), so the
# multiplexing cache never has to evict
MAX_RECIPES_PER_REPLICA = 4096
# batches Serve may hand over while the model is busy (they wait in LoraHubModel's queue)
BATCHES_IN_FLIGHT = 64


def count_inputs(items) -> int:
    """Batch size as the number of inputs (each batched item is a :class:`Job`: its prompts x n)."""
    return sum(job.size for job in items)


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
        """``POST /generate``: greedy, the recipe's template."""
        job = Job(list(inputs), Options(max_new_tokens=int(max_new_tokens)))
        job.recipe_id = await self._recipe(serve.get_multiplexed_model_id())
        return [choice["text"] for choice in (await self._submit(job))["choices"]]

    async def _job(self, work: dict) -> Job:
        """The OpenAI routes' checked work (``lorahub_ray.serving.openai_api.work``) as a job; a chat is
        rendered here, with the recipe's tokenizer (a 400 when it has no chat template or refuses the turns)."""
        recipe_id = await self._recipe(serve.get_multiplexed_model_id())
        options = Options(**{**work["options"], "stop": tuple(work["options"]["stop"])})
        if "messages" not in work:
            return Job(list(work["prompts"]), options, n=work["n"], recipe_id=recipe_id)
        tokenizer = self.host.tokenizer(recipe_id)
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, f"model '{recipe_id}' has no chat template (its tokenizer has none): use "
                                   "/v1/completions", param="messages", code="no_chat_template")
        try:
            prompt = render_chat(tokenizer, work["messages"])
        except Exception as exc:  # noqa: BLE001 - the template's own refusal (e.g. roles that must alternate)
            raise OpenAIError(400, f"model '{recipe_id}' cannot render these messages with its chat template: {exc}",
                              param="messages") from None
        return Job([prompt], options, n=work["n"], prompt_kind="rendered", recipe_id=recipe_id)

    async def complete(self, work: dict) -> dict:
        """An OpenAI completion or chat: the job's result, or ``{"error", "status"}`` for a bad request."""
        try:
            job = await self._job(work)
        except OpenAIError as exc:
            return {**exc.body(), "status": exc.status}
        return await self._submit(job)

    async def stream(self, work: dict):
        """Streamed: ``{"error", "status"}`` or ``{"accepted"}`` first, then ``{"deltas": [(choice, text)]}``
        as text is generated, then ``{"result"}``."""
        try:
            job = await self._job(work)
        except OpenAIError as exc:
            yield {**exc.body(), "status": exc.status}
            return
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job.on_text = lambda index, text: loop.call_soon_threadsafe(queue.put_nowait, (index, text))
        yield {"accepted": True}
        task = asyncio.ensure_future(self._submit(job))
        # the text arrives through call_soon_threadsafe before the batch's result, so None comes last
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                if deltas := [item for item in items if item is not None]:
                    yield {"deltas": deltas}
                if None in items:
                    break
            yield {"result": task.result()}
        finally:
            task.cancel()  # the client went away: a job still waiting for a batch is dropped

    async def _submit(self, job: Job) -> dict:
        with self.load.accepted(job.size):
            if job.size > self.max_batch_size:  # cannot share a batch
                with self.load.running(job.size):
                    return (await asyncio.to_thread(run_batch, self.host, [job]))[0]
            return await self._generate_batch(job)

    async def record_autoscaling_stats(self) -> dict:
        """Serve's custom-metrics hook: this replica's ``model_load`` (read by ModelLoadPolicy)."""
        sample = self.load.sample(self.max_batch_size)
        self._load_gauge.set(sample["load"])
        self._waiting_gauge.set(sample["waiting"])
        return {LOAD_METRIC: sample["load"], "model_busy": sample["busy"], "model_waiting_inputs": sample["waiting"]}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=count_inputs,
                 max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _generate_batch(self, jobs: list[Job]) -> list[dict]:
        # Serve forms a batch as soon as requests arrive, even while the model is busy with the
        # previous one; the model queue below merges the batches that waited meanwhile
        future = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Run the waiting batches one model call at a time, merging those of one recipe up to max_batch_size inputs."""
        while self._pending:
            recipe_id = self._pending[0][0][0].recipe_id
            taken, rest, size = [], [], 0
            for entry in self._pending:
                n = count_inputs(entry[0])
                if entry[0][0].recipe_id == recipe_id and (not taken or size + n <= self.max_batch_size):
                    taken.append(entry)
                    size += n
                else:
                    rest.append(entry)
            self._pending = rest
            flat = [job for jobs, _ in taken for job in jobs]
            try:
                # off the event loop, so requests keep arriving meanwhile; jobs are grouped by
                # recipe and generation options inside (run_batch)
                with self.load.running(size):
                    results = await asyncio.to_thread(run_batch, self.host, flat)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            pos = 0
            for jobs, future in taken:
                if not future.done():
                    future.set_result(results[pos : pos + len(jobs)])
                pos += len(jobs)

    async def health(self) -> dict:
        return {**self.host.stats(), "waiting_inputs": self.load.waiting}


__all__ = ["MODEL", "LoraHubModel", "count_inputs"]
