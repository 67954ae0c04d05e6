"""Load benchmark of the Serve endpoint on loopback: ``python benchmarks/serve_load.py``.

Builds a T5 (random weights, t5-small-like by default; no download) with K LoRA modules and two
recipes, then in one run:

1. in-process batched generation of recipe A's merged model (the baseline, same thread count as
   a replica: ``ceil(--num-cpus)``);
2. Serve on 127.0.0.1 with recipe A merged (one replica), behind an API key: a bounded load
   generator sends ``--requests`` requests (one input each) at each ``--concurrency`` level (32
   and 64 by default), through ``POST /generate`` (httpx) and through the OpenAI API
   (``/v1/completions`` with the official ``openai`` client's ``AsyncOpenAI``, greedy), with the
   in-process baseline measured again beside them: ``--repeats`` rounds of (in process, /generate,
   OpenAI), whose medians are reported. Prints errors, p50/p99 latency, requests/s and
   throughput ÷ the baseline of the same round. With one replica and ``--max-batch-size`` 32,
   concurrency 32 cannot keep the model busy (Little's law: while a batch runs, the clients it
   answers are on their way back), so batches alternate between two halves; concurrency 64 fills
   a whole batch while the previous one runs;
3. Serve with recipes A and B composed in one replica: the in-place switch time (in process and
   in the replica) and the /generate load with requests alternating between the recipes.

The load generator, proxy, ingress and replica share the machine's cores: on a small machine
the ratio is a lower bound of what a replica on its own cores reaches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_world(root: Path, *, d_model: int, layers: int, modules: int) -> dict:
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    from helpers import make_module
    from lorahub_ray.core import learning
    from lorahub_ray.io import storage
    from lorahub_ray.core.model import build_model
    from lorahub_ray.core.modules import load_module
    from lorahub_ray.core.recipe import Recipe

    torch.manual_seed(0)
    base = root / "base"
    tok = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=64, d_ff=4 * d_model, num_layers=layers,
                      num_decoder_layers=layers, num_heads=max(1, d_model // 64), decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(base)
    tok.save_pretrained(base)
    mods = [load_module(str(make_module(base, root / "hub" / f"m{i}", seed=i + 1, r=8, scale=0.05)))
            for i in range(modules)]
    recipes = {}
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        weights = [round(float(x), 3) for x in (torch.rand(modules, generator=g) * 2 - 1)]
        recipe = Recipe(base_model=str(base), base_model_sha256=storage.sha256_dir(base),
                        modules=[{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in mods], weights=weights,
                        objective=0.0, optimizer="none", algorithm="benchmark", budget=0, seed=seed)
        learning.write_output(root / name, recipe, mods, merged=build_model(recipe, device="cpu"))
        recipes[name] = str(root / name)
    return recipes


def make_inputs(n: int) -> list[str]:
    words = ["lora", "hub", "ray", "serve", "compose", "module", "batch", "token", "merge", "weight"]
    return [f"task {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(send, jobs: list, concurrency: int) -> dict:
    """``concurrency`` workers that ``await send(job)`` (an error text or None) until the jobs run out."""
    latencies, errors = [], []
    queue = list(reversed(jobs))

    async def worker():
        while queue:
            job = queue.pop()
            start = time.perf_counter()
            try:
                error = await send(job)
            except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                error = repr(exc)[:200]
            if error:
                errors.append(error)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(jobs), "errors": len(errors), "first_errors": errors[:3], "seconds": seconds,
            "requests_per_s": len(jobs) / seconds, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


async def load_generate(url: str, key: str, jobs: list[dict], concurrency: int) -> dict:
    """``POST /generate`` with httpx, one job a request."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:

        async def send(job):
            r = await client.post("/generate", json=job)
            return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"

        return await load(send, jobs, concurrency)


async def load_openai(url: str, key: str, jobs: list[dict], concurrency: int) -> dict:
    """``/v1/completions`` through the official ``openai`` client (``AsyncOpenAI``), greedy, one job a request."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120,
                           http_client=httpx.AsyncClient(limits=limits)) as client:

        async def send(job):
            done = await client.completions.create(model=job.get("recipe", "a"), prompt=job["inputs"][0],
                                                   max_tokens=job["max_new_tokens"], temperature=0)
            return None if len(done.choices) == 1 else f"{len(done.choices)} choices"

        return await load(send, jobs, concurrency)


def in_process(model, tok, inputs: list[str], opts) -> dict:
    """Batched generate of the merged model in this process (the baseline)."""
    from lorahub_ray.evaluation.generate import generate

    start = time.perf_counter()
    generate(model, tok, inputs, batch_size=opts.max_batch_size, max_new_tokens=opts.max_new_tokens)
    seconds = time.perf_counter() - start
    return {"inputs": len(inputs), "seconds": seconds, "inputs_per_s": len(inputs) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64],
                        help="client concurrency levels, each a separate load run (default: 32 and 64)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the model replica")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (in process, /generate, OpenAI client) per concurrency level, interleaved")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    opts = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import ray
    from ray import serve

    from lorahub_ray.core.model import load_model
    from lorahub_ray.evaluation.generate import generate
    from lorahub_ray.cluster.serve_app import app
    from lorahub_ray.serving.host import ModelHost

    threads = max(1, math.ceil(opts.num_cpus))
    torch.set_num_threads(threads)
    report: dict = {"settings": vars(opts) | {"output": None, "threads": threads, "cpus": os.cpu_count()}}
    inputs = make_inputs(opts.requests)
    with tempfile.TemporaryDirectory(prefix="lorahub-serve-bench-") as tmp:
        recipes = build_world(Path(tmp), d_model=opts.d_model, layers=opts.layers, modules=opts.modules)

        # 1. in-process baseline: batched generate of the merged model (kept, to measure it again between loads)
        model, tok = load_model(recipes["a"], device="cpu")
        generate(model, tok, inputs[:opts.max_batch_size], batch_size=opts.max_batch_size,
                 max_new_tokens=opts.max_new_tokens)  # warm-up
        report["in_process"] = in_process(model, tok, inputs, opts)
        print(f"in-process batched generate: {report['in_process']['inputs_per_s']:.1f} inputs/s "
              f"({threads} thread(s))", flush=True)

        # switch time in process: compose(weights) of the other recipe
        host = ModelHost([f"a={recipes['a']}", f"b={recipes['b']}"], mode="composed", device="cpu")
        times = [host.switch("ab"[i % 2]) for i in range(opts.switches + 1)][1:]
        report["switch_in_process_ms"] = {"median": 1000 * statistics.median(times), "max": 1000 * max(times),
                                          "lora_parameters": host._groups["a"].composer.buffer.numel(),
                                          "modules": opts.modules}
        print(f"recipe switch in process: median {1000 * statistics.median(times):.3f} ms over {len(times)} "
              f"({host._groups['a'].composer.buffer.numel()} LoRA parameters, {opts.modules} modules)", flush=True)
        del host

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster
        ray.init(address="local", num_cpus=max(2, threads + 1), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url, api_key = f"http://127.0.0.1:{port}", secrets.token_hex(16)
            common = {"num_cpus": opts.num_cpus, "min_replicas": 1, "max_replicas": 1,
                      "max_batch_size": opts.max_batch_size, "max_inputs": opts.max_batch_size,
                      "batch_wait_timeout_s": opts.batch_wait_timeout_s}
            jobs = [{"inputs": [text], "max_new_tokens": opts.max_new_tokens} for text in inputs]

            # 2. merged single recipe through /generate and the OpenAI client, rounds interleaved with the
            # in-process baseline; then 3. two recipes composed in one replica (requests alternating)
            mixed = [dict(job, recipe="ab"[i % 2]) for i, job in enumerate(jobs)]
            for key, recipe_args, mode, requests in (
                    ("serve_merged", [f"a={recipes['a']}"], "merged", jobs),
                    ("serve_composed_two_recipes", [f"a={recipes['a']}", f"b={recipes['b']}"], "composed", mixed)):
                serve.run(app({"recipes": recipe_args, "mode": mode, **common}, api_key=api_key), name="bench",
                          route_prefix="/")
                handle = serve.get_deployment_handle("LoraHubModel", app_name="bench")
                routes = {"generate": load_generate, **({"openai": load_openai} if mode == "merged" else {})}
                for run in routes.values():  # warm-up
                    asyncio.run(run(url, api_key, requests[: 2 * max(opts.concurrency)], max(opts.concurrency)))
                report[key] = {}
                for c in opts.concurrency:
                    rounds = []
                    for _ in range(opts.repeats if mode == "merged" else 1):
                        base = in_process(model, tok, inputs, opts) if mode == "merged" else report["in_process"]
                        rounds.append({"in_process_inputs_per_s": base["inputs_per_s"]})
                        for route, run in routes.items():
                            before = handle.health.remote().result()
                            r = asyncio.run(run(url, api_key, requests, c))
                            after = handle.health.remote().result()
                            r["mean_batch_inputs"] = ((after["inputs"] - before["inputs"])
                                                      / max(1, after["generate_calls"] - before["generate_calls"]))
                            r["replica_torch_threads"] = after["torch_threads"]
                            r["throughput_ratio"] = r["requests_per_s"] / base["inputs_per_s"]
                            r["switches"] = after["switches"] - before["switches"]
                            r["replica_mean_switch_ms"] = after["mean_switch_ms"]
                            rounds[-1][route] = r
                            switches = (f"; {r['switches']} switches in the replica, mean "
                                        f"{after['mean_switch_ms']:.3f} ms" if mode == "composed" else "")
                            print(f"serve {mode} ({len(recipe_args)} recipe(s)) via {route}: {r['requests']} requests at "
                                  f"concurrency {c}: {r['errors']} errors, p50 {r['p50_ms']:.0f} ms, p99 "
                                  f"{r['p99_ms']:.0f} ms, {r['requests_per_s']:.1f} requests/s, throughput / in-process "
                                  f"batched ({base['inputs_per_s']:.1f} inputs/s) = {r['throughput_ratio']:.2f} "
                                  f"(mean batch {r['mean_batch_inputs']:.1f} inputs, {r['replica_torch_threads']} torch "
                                  f"thread(s) in the replica){switches}", flush=True)
                    medians = {route: statistics.median(x[route]["throughput_ratio"] for x in rounds) for route in routes}
                    report[key][c] = {"rounds": rounds, "median_throughput_ratio": medians}
                    if "openai" in routes:
                        medians["openai_over_generate"] = statistics.median(
                            x["openai"]["requests_per_s"] / x["generate"]["requests_per_s"] for x in rounds)
                    print(f"serve {mode} at concurrency {c}, medians over {len(rounds)} round(s): "
                          + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()), flush=True)
                serve.delete("bench")
            serve.shutdown()
        finally:
            ray.shutdown()
    if opts.output:
        opts.output.write_text(json.dumps(report, indent=2) + "\n")
    errors = sum(x[route]["errors"] for key in ("serve_merged", "serve_composed_two_recipes")
                 for level in report[key].values() for x in level["rounds"] for route in ("generate", "openai") if route in x)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
