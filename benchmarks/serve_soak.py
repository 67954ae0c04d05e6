"""Soak of the Serve endpoint on loopback: ``python benchmarks/serve_soak.py [--minutes 10]``.

Builds the same random-weight T5 world as ``serve_load.py`` (two recipes over one base, composed on
the model replicas: requests alternate between them), serves it autoscaled (``--min-replicas`` 1,
``--max-replicas`` 2, ``--num-cpus`` 0.5 per replica, the default ``model_load`` policy) and sends
``--minutes`` of load at ``--concurrency`` 64. One request in ``--bad-every`` is a bad one, cycling
through malformed JSON, a mistyped field, too many inputs, too long an input, a too large
``max_new_tokens`` and an unknown recipe; each must get its own 4xx.

Reports, per minute: good requests, their errors (0 expected), p50/p99 latency, bad requests and
how many got the expected status, the model replicas RUNNING (from ``serve.status()``, polled every
``--poll-s``), their resident memory (RSS of the replica processes, found by process title) and
the machine's load average (the machine may be shared). Then the RSS of each replica at the start
and at the end. Exit status 1 if a good request failed or a bad one got another status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_load import build_world, free_port, make_inputs  # noqa: E402 - after the path set-up

MODEL = "LoraHubModel"
# (body, expected status): the bad requests, cycled
BAD = [
    ("{not json", 400),
    ({"inputs": "one string, not a list"}, 422),
    ({"inputs": ["x"] * 33}, 422),
    ({"inputs": ["y" * 5000]}, 422),
    ({"inputs": ["x"], "max_new_tokens": 10_000}, 422),
    ({"inputs": ["x"], "recipe": "../../etc/passwd"}, 404),
]


def replica_processes(app_name: str) -> dict:
    """pid -> psutil.Process of this application's model replicas (Ray titles them ``ray::ServeReplica:APP:DEPLOYMENT``)."""
    import psutil

    title = f"ray::ServeReplica:{app_name}:{MODEL}"
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and cmd[0].startswith(title):
            found[p.info["pid"]] = p
    return found


def rss_mib(app_name: str) -> dict:
    out = {}
    for pid, p in replica_processes(app_name).items():
        try:
            out[pid] = p.memory_info().rss / 2**20
        except Exception:  # noqa: BLE001 - a replica that just stopped
            pass
    return out


def running_replicas(app_name: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None or MODEL not in status.deployments:
        return 0
    return status.deployments[MODEL].replica_states.get("RUNNING", 0)


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def soak(url: str, seconds: float, concurrency: int, bad_every: int, max_new_tokens: int, inputs: list,
               on_tick) -> list:
    """Closed-loop load for ``seconds``; returns (t_start, kind, expected, status, latency_s) per request."""
    import httpx

    records: list = []
    counter = [0]
    t0 = time.monotonic()
    end = t0 + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            while time.monotonic() < end:
                n = counter[0]
                counter[0] += 1
                start = time.monotonic()
                if n % bad_every == bad_every - 1:
                    body, expected = BAD[(n // bad_every) % len(BAD)]
                    kind = "bad"
                else:
                    body, expected, kind = ({"inputs": [inputs[n % len(inputs)]], "max_new_tokens": max_new_tokens,
                                             "recipe": "ab"[n % 2]}, 200, "good")
                try:
                    if isinstance(body, str):
                        r = await client.post("/generate", content=body, headers={"content-type": "application/json"})
                    else:
                        r = await client.post("/generate", json=body)
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = f"{type(exc).__name__}"
                records.append((start - t0, kind, expected, status, time.monotonic() - start))

        async def ticker():
            while time.monotonic() < end:
                await asyncio.sleep(1)
                await asyncio.to_thread(on_tick, time.monotonic() - t0)

        await asyncio.gather(ticker(), *(worker() for _ in range(concurrency)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bad-every", type=int, default=10, help="one request in N is a bad one")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per model replica")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--poll-s", type=float, default=5, help="how often replicas and memory are sampled")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    opts = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import ray
    from ray import serve

    from lorahub_ray.cluster.serve_app import app

    app_name = f"soak{os.getpid()}"  # the replicas' process titles carry it: never another run's processes
    samples: list = []  # (t, running replicas, {pid: rss MiB}, load average 1 min)
    with tempfile.TemporaryDirectory(prefix="lorahub-serve-soak-") as tmp:
        recipes = build_world(Path(tmp), d_model=opts.d_model, layers=opts.layers, modules=opts.modules)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(app({"recipes": [f"a={recipes['a']}", f"b={recipes['b']}"], "num_cpus": opts.num_cpus,
                           "min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas}),
                      name=app_name, route_prefix="/")
            start_rss = rss_mib(app_name)
            load_start = os.getloadavg()
            print(f"serving 2 recipes composed, replicas {opts.min_replicas}..{opts.max_replicas} at "
                  f"{opts.num_cpus} CPU; start: RSS {fmt_rss(start_rss)}, load average {load_start[0]:.1f}", flush=True)
            last = [-1e9]

            def on_tick(t):
                if t - last[0] >= opts.poll_s:
                    last[0] = t
                    samples.append((t, running_replicas(app_name), rss_mib(app_name), os.getloadavg()[0]))

            records = asyncio.run(soak(f"http://127.0.0.1:{port}", 60 * opts.minutes, opts.concurrency,
                                       opts.bad_every, opts.max_new_tokens, make_inputs(4096), on_tick))
            end_rss = rss_mib(app_name)
            load_end = os.getloadavg()
            serve.delete(app_name)
            serve.shutdown()
        finally:
            ray.shutdown()

    report = summarize(records, samples, opts)
    report.update(start_rss_mib=start_rss, end_rss_mib=end_rss, load_average_start=load_start,
                  load_average_end=load_end, settings={k: str(v) for k, v in vars(opts).items()})
    print(f"end: RSS {fmt_rss(end_rss)} (start {fmt_rss(start_rss)}), load average {load_end[0]:.1f} "
          f"(cores: {os.cpu_count()})")
    t = report["totals"]
    print(f"total: {t['good']} good requests, {t['good_errors']} errors; {t['bad']} bad requests, "
          f"{t['bad_expected']} with the expected 4xx; replicas over time: {report['replica_changes']}")
    if opts.output:
        opts.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    sys.exit(1 if t["good_errors"] or t["bad_expected"] != t["bad"] else 0)


def fmt_rss(rss: dict) -> str:
    return ", ".join(f"{v:.0f} MiB (pid {pid})" for pid, v in sorted(rss.items())) or "none found"


def summarize(records: list, samples: list, opts) -> dict:
    minutes = []
    print("minute | good | good errors | p50 ms | p99 ms | bad | bad with expected 4xx | replicas RUNNING | "
          "RSS MiB of each replica (by pid, at the minute's end) | load avg")
    for m in range(int(opts.minutes + 0.999)):
        rows = [r for r in records if m * 60 <= r[0] < (m + 1) * 60]
        good = [r for r in rows if r[1] == "good"]
        bad = [r for r in rows if r[1] == "bad"]
        lat = [1000 * r[4] for r in good if r[3] == 200]
        ss = [s for s in samples if m * 60 <= s[0] < (m + 1) * 60]
        rep = sorted({s[1] for s in ss})
        last_rss = next((s[2] for s in reversed(ss) if s[2]), {})  # each replica's RSS at the minute's last sample
        row = {"minute": m + 1, "good": len(good), "good_errors": sum(r[3] != 200 for r in good),
               "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99), "bad": len(bad),
               "bad_expected": sum(r[3] == r[2] for r in bad), "replicas": rep,
               "replica_rss_mib": {str(pid): round(v) for pid, v in sorted(last_rss.items())},
               "load_average": statistics.mean(s[3] for s in ss) if ss else None}
        minutes.append(row)
        print(f"{row['minute']} | {row['good']} | {row['good_errors']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{row['bad']} | {row['bad_expected']} | {'-'.join(map(str, rep)) or '?'} | "
              f"{' '.join(f'{v}' for v in row['replica_rss_mib'].values()) or '?'} | "
              f"{row['load_average'] or float('nan'):.1f}",
              flush=True)
    changes, prev = [], None
    for t, n, _, _ in samples:
        if n != prev:
            changes.append(f"{n} at {t:.0f} s")
            prev = n
    errors = {}
    for r in records:
        if r[1] == "good" and r[3] != 200 or r[1] == "bad" and r[3] != r[2]:
            errors[f"{r[1]}:{r[3]}"] = errors.get(f"{r[1]}:{r[3]}", 0) + 1
    good = [r for r in records if r[1] == "good"]
    bad = [r for r in records if r[1] == "bad"]
    return {"minutes": minutes, "replica_changes": ", ".join(changes), "unexpected": errors,
            "samples": [{"t": round(t, 1), "running": n, "rss_mib": {str(k): round(v) for k, v in rss.items()},
                         "load_average": la} for t, n, rss, la in samples],
            "totals": {"good": len(good), "good_errors": sum(r[3] != 200 for r in good), "bad": len(bad),
                       "bad_expected": sum(r[3] == r[2] for r in bad)}}


if __name__ == "__main__":
    main()
