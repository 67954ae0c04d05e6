"""The OpenAI-compatible API: generation options in batches (in process), the request checks and the
bearer-key middleware (no Ray), then the contract end to end: the real `lorahub-ray serve --recipe
ID=OUT --host H --port P --api-key KEY` in a fresh process, answered through the official `openai`
client (models, completions, chat, streaming, an unknown model, a wrong key, requests over the limits)
and never writing the key where Ray or Serve keep their logs, nor where Ray shows a job's command line."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer
from helpers import EXAMPLES, end_with_this_process, make_base, make_llama_base, make_llama_module, make_module, write_jsonl
from ports import free_port

import lorahub_ray as lr
from lorahub_ray.core.templates import render_chat
from lorahub_ray.evaluation.generate import generate
from lorahub_ray.serving import openai_api as oa
from lorahub_ray.serving.auth import ENV_VAR, BearerAuth, key_digest
from lorahub_ray.serving.generation import Job, Options, run_batch
from lorahub_ray.serving.host import ModelHost
from lorahub_ray.serving.stops import first_stop, stable_text

REPO = Path(__file__).parents[1]
PROMPTS = ["reverse: abc", "reverse: hello world", "upper: ray", "xy"]
LIMITS = {"max_inputs": 8, "max_input_chars": 64, "max_new_tokens_limit": 16}
START_WITHIN_S = 300  # a fresh process starts its own Ray and loads two models, on a shared 2-core machine
HTTP_TIMEOUT_S = 60  # httpx's default, 5 s, is less than /healthz's own wait for the model (10 s) on a busy machine


def _noisy(path: Path, seed: int) -> Path:
    """Larger random weights than a fresh tiny model's: it then writes varied text rather than padding."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(path)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Two recipes: 't5' (a seq2seq model whose tokenizer has no chat template) and 'chat' (a causal
    LM with a chat template, searched with --template chat); the greedy outputs of each, in process."""
    root = tmp_path_factory.mktemp("openai")
    t5 = _noisy(make_base(root / "t5base"), seed=1)
    for i, name in enumerate(["alpha", "beta"]):
        make_module(t5, root / "t5hub" / name, seed=i + 1, scale=0.2)
    chat = _noisy(make_llama_base(root / "chatbase", seed=2, chat=True), seed=3)
    for i, name in enumerate(["one", "two"]):
        make_llama_module(chat, root / "chathub" / name, seed=i + 5, scale=0.1)
    examples = write_jsonl(root / "fewshot.jsonl", EXAMPLES)
    lr.lorahub_learning(str(t5), [str(root / "t5hub")], str(examples), output=root / "t5", budget=3, progress=False)
    lr.lorahub_learning(str(chat), [str(root / "chathub")], str(examples), output=root / "chat", budget=3,
                        template="chat", progress=False)
    expected = {}
    for name, template in (("t5", "plain"), ("chat", "chat")):
        model, tok = lr.load_model(root / name, device="cpu")
        expected[name] = generate(model, tok, PROMPTS, max_new_tokens=12, template=template)
        assert any(expected[name]), f"recipe {name} writes only empty text: the tests would mean little"
    return {"root": root, "expected": expected}


# --- options in batches, in process --------------------------------------------------------------


def test_stop_strings_and_the_final_part_of_a_growing_text():
    assert first_stop("abc\ndef", ["\n", "c"]) == 2 and first_stop("abc", ["x"]) is None
    assert stable_text("hello wor", ["world!"]) == "hello "  # "wor" may start the stop string
    assert stable_text("caf\ufffd", []) == "caf"  # an incomplete character waits
    assert stable_text("a b c", [], cleans_spaces=True) == "a b"  # a cleaned-up space may still go
    assert stable_text("plain", []) == "plain"


def test_one_batch_keeps_each_jobs_options(recipes):
    """Jobs with different options in one batch: greedy rows give /generate's text, sampling and stop
    strings stay with their own job, streamed text adds up to the final text, tokens are counted."""
    root = recipes["root"]
    host = ModelHost([f"t5={root / 't5'}", f"chat={root / 'chat'}"], mode="composed", device="cpu")
    want = recipes["expected"]["t5"]
    stop = next(t[2:4] for t in want if len(t) > 4)  # a stop string that greedy decoding meets
    streamed: dict[int, str] = {}
    jobs = [Job(PROMPTS, Options(12)),
            Job(PROMPTS[:2], Options(12, temperature=2.0), n=8),
            Job(PROMPTS, Options(12, temperature=1.0, top_p=1e-9)),  # the nucleus holds the top token only
            Job(PROMPTS, Options(12, stop=(stop,))),
            Job(PROMPTS, Options(12), on_text=lambda i, text: streamed.__setitem__(i, streamed.get(i, "") + text)),
            Job(PROMPTS, Options(5))]
    for job in jobs:
        job.recipe_id = "t5"
    torch.manual_seed(0)  # sampling draws from torch's generator: the same draws every run
    greedy, sampled, nucleus, stopped, stream, short = run_batch(host, jobs)
    assert [c["text"] for c in greedy["choices"]] == want
    assert [c["text"] for c in nucleus["choices"]] == want
    assert len({c["text"] for c in sampled["choices"]}) > 2 and len(sampled["choices"]) == 16
    for c, full in zip(stopped["choices"], want):
        cut = first_stop(full, [stop])
        assert c["text"] == (full if cut is None else full[:cut])
        assert c["finish_reason"] == ("stop" if cut is not None or c["completion_tokens"] < 12 else "length")
    assert [c["text"] for c in stream["choices"]] == want
    assert all(want[i].startswith(text) for i, text in streamed.items()) and streamed
    assert all(c["completion_tokens"] <= 5 for c in short["choices"])
    tok = host.tokenizer("t5")
    assert greedy["prompt_tokens"] == [len(tok(p)["input_ids"]) for p in PROMPTS]
    chat = Job([render_chat(host.tokenizer("chat"), [{"role": "user", "content": p}]) for p in PROMPTS], Options(12),
               prompt_kind="rendered", recipe_id="chat")
    assert [c["text"] for c in run_batch(host, [chat])[0]["choices"]] == recipes["expected"]["chat"]


def test_requests_are_checked_against_limits_and_refuse_what_is_not_implemented():
    def error(**fields):
        body = oa.ChatCompletionRequest(**fields) if "messages" in fields else oa.CompletionRequest(**fields)
        with pytest.raises(oa.OpenAIError) as info:
            oa.work(body, LIMITS)
        return info.value

    work = oa.work(oa.CompletionRequest(model="m", prompt=["a", "b"], n=2, stop="\n", temperature=0), LIMITS)
    assert work == {"prompts": ["a", "b"], "n": 2, "options": {"max_new_tokens": 16, "temperature": 0.0,
                                                               "top_p": 1.0, "stop": ["\n"]}}
    chat = oa.work(oa.ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "be brief"},
                                                                 {"role": "user", "content": [{"type": "text",
                                                                                               "text": "hi"}]}]),
                   LIMITS)
    assert chat["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat["options"]["max_new_tokens"] == 16 and chat["options"]["temperature"] == 1.0
    assert error(model="m", prompt="x", max_tokens=17).param == "max_tokens"
    assert error(model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=99).param == \
        "max_completion_tokens"
    assert error(model="m", prompt=["x"] * 5, n=2).message == "too many completions: 5 prompt(s) x n=2; at most 8 " \
                                                              "per request"
    assert error(model="m", prompt="y" * 65).message == "prompt 0 is too long: 65 characters; at most 64"
    assert error(model="m", prompt="x", stop=["a", "b", "c", "d", "e"]).param == "stop"
    assert error(model="m", prompt="x", seed=1).code == "unsupported_parameter"
    assert error(model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]).param == "tools"
    with pytest.raises(ValueError, match="token ids are not supported"):
        oa.CompletionRequest(model="m", prompt=[1, 2, 3])


def test_errors_are_openais_json_and_never_echo_a_path():
    assert oa.unknown_model("nope").body()["error"] == {
        "message": "The model 'nope' does not exist; GET /v1/models lists the served ones",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    for bad in ("../a", "/etc/passwd", "<script>"):
        assert bad not in oa.unknown_model(bad).message and oa.unknown_model(bad).status == 404
    assert oa.from_validation([{"type": "extra_forbidden", "loc": ("body", "max_token"), "msg": "x"}]).message == \
        "Unrecognized request argument supplied: max_token"


def test_the_bearer_key_guards_every_route_but_healthz():
    import asyncio

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    key = "s3cret-key"
    guarded = BearerAuth(app, digest=lambda: key_digest(key))

    async def call(path, headers=None, root="", target=guarded):
        transport = httpx.ASGITransport(app=target, root_path=root)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(root + path, headers=headers or {})

    async def main():
        assert (await call("/healthz")).status_code == 200
        assert (await call("/healthz", root="/multi")).status_code == 200
        missing = await call("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await call("/docs", {"Authorization": "Bearer s3cret-kez"})
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        assert (await call("/generate", {"Authorization": f"Basic {key}"})).status_code == 401
        assert (await call("/generate", {"Authorization": f"bearer {key}"})).status_code == 200
        assert (await call("/x", {"Authorization": f"Bearer {key}"}, root="/multi")).status_code == 200
        assert (await call("/v1/models", target=BearerAuth(app, digest=lambda: None))).status_code == 200  # no key

    asyncio.run(main())


def test_the_key_comes_from_the_command_or_an_environment_variable_never_from_the_serve_args(monkeypatch):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app as cli
    from lorahub_ray.cluster.serve_app import app, parse_args
    from lorahub_ray.serving.auth import AuthConfigError, digest_from_env
    from lorahub_ray.serving.host import ServeConfigError

    with pytest.raises(ServeConfigError, match="api_key: Serve writes the application's args to its logs"):
        parse_args({"recipes": ["r"], "api_key": "k"})
    assert parse_args({"recipes": ["r"], "api_key_env": ENV_VAR}).api_key_env == ENV_VAR
    with pytest.raises(ServeConfigError, match="api_key_env: String should match pattern"):
        parse_args({"recipes": ["r"], "api_key_env": "$(cat key)"})
    with pytest.raises(ServeConfigError, match="the API key is empty"):
        app({"recipes": ["r"]}, api_key=" ")
    monkeypatch.setenv("LORAHUB_TEST_KEY", "k1")
    assert digest_from_env("LORAHUB_TEST_KEY") == key_digest("k1")
    monkeypatch.delenv("LORAHUB_TEST_KEY")
    with pytest.raises(AuthConfigError, match=r"\$LORAHUB_TEST_KEY is not set"):
        digest_from_env("LORAHUB_TEST_KEY")
    result = CliRunner().invoke(cli, ["serve", "--recipe", "missing", "--api-key", ""])
    assert result.exit_code == 2 and "error: --api-key / $LORAHUB_RAY_API_KEY: the API key is empty" in \
        " ".join(result.output.split())


# --- the command, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(recipes, tmp_path_factory):
    """`lorahub-ray serve --recipe t5=OUT --recipe chat=OUT2 --host 127.0.0.1 --port P --api-key KEY` in a
    fresh process, with its own Ray in a temp dir of its own (so that its logs can be searched)."""
    root, port = recipes["root"], free_port()
    key = "lhr-" + secrets.token_hex(16)
    ray_dir = Path(tempfile.mkdtemp(prefix="lhoa-"))  # short: Ray's socket paths must fit in 107 bytes
    log = tmp_path_factory.mktemp("cli") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_VAR)}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(ray_dir), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    args = ["serve", "--recipe", f"t5={root / 't5'}", "--recipe", f"chat={root / 'chat'}", "--host", "127.0.0.1",
            "--port", str(port), "--api-key", key, "--num-cpus", "0.5", "--max-inputs", "8"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lorahub_ray", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(), preexec_fn=end_with_this_process)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_WITHIN_S
        while True:
            assert proc.poll() is None, f"lorahub-ray serve ended ({proc.returncode}): {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not serving after {START_WITHIN_S} s: {log.read_text()[-3000:]}"
            time.sleep(1)
        yield {"url": url, "key": key, "proc": proc, "log": log, "ray_dir": ray_dir,
               "client": openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)}
    finally:
        proc.send_signal(signal.SIGTERM)  # ray.init turns it into an exit: Serve and Ray shut down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)


def _generate(server, recipe, inputs, max_new_tokens=12):
    r = httpx.post(f"{server['url']}/generate", json={"inputs": inputs, "max_new_tokens": max_new_tokens,
                                                      "recipe": recipe},
                   headers={"Authorization": f"Bearer {server['key']}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_models_list_names_the_recipes(server):
    client = server["client"]
    assert [m.id for m in client.models.list()] == ["t5", "chat"]
    assert client.models.retrieve("chat").owned_by == "lorahub-ray"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_greedy_completions_give_the_text_of_generate(server, recipes):
    client = server["client"]
    for recipe in ("t5", "chat"):
        want = _generate(server, recipe, PROMPTS)
        assert want == recipes["expected"][recipe]
        for prompt, text in zip(PROMPTS, want):
            done = client.completions.create(model=recipe, prompt=prompt, max_tokens=12, temperature=0)
            assert done.choices[0].text == text and done.model == recipe and done.object == "text_completion"
    done = client.completions.create(model="t5", prompt=PROMPTS[:2], n=2, max_tokens=12, temperature=0)
    assert [c.text for c in done.choices] == [recipes["expected"]["t5"][0]] * 2 + [recipes["expected"]["t5"][1]] * 2
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    prompt_tokens = [len(p.encode()) + 1 for p in PROMPTS[:2]]  # ByT5: one token a byte, and EOS
    assert done.usage.prompt_tokens == sum(prompt_tokens)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert {c.finish_reason for c in done.choices} <= {"stop", "length"}


def test_chat_renders_the_template_and_a_model_without_one_gets_a_400(server, recipes):
    client = server["client"]
    done = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=12, temperature=0)
    assert done.choices[0].message.content == recipes["expected"]["chat"][0]  # the recipe's chat template too
    tok = AutoTokenizer.from_pretrained(recipes["root"] / "chatbase")

    def tokens(messages):
        return len(tok(render_chat(tok, messages), add_special_tokens=False)["input_ids"])

    assert done.choices[0].message.role == "assistant"
    assert done.usage.prompt_tokens == tokens([{"role": "user", "content": PROMPTS[0]}])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    turns = client.chat.completions.create(model="chat", max_tokens=4, temperature=0, messages=messages)
    assert turns.usage.prompt_tokens == tokens(messages) and turns.usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="t5", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 400 and "has no chat template" in info.value.message


def test_streams_are_openai_chunks_that_add_up_to_the_completion(server, recipes):
    client = server["client"]
    chunks = list(client.completions.create(model="t5", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == recipes["expected"]["t5"][1]
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0
    chat = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": PROMPTS[2]}],
                                               max_tokens=12, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == recipes["expected"]["chat"][2]
    assert chat[-1].object == "chat.completion.chunk" and chat[-1].choices[0].finish_reason is not None
    with httpx.stream("POST", f"{server['url']}/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {server['key']}"},
                      json={"model": "t5", "prompt": "xy", "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_concurrent_requests_with_other_options_do_not_change_greedy_text(server, recipes):
    from concurrent.futures import ThreadPoolExecutor

    client, want = server["client"], recipes["expected"]["t5"]

    def call(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            return prompt, client.completions.create(model="t5", prompt=prompt, max_tokens=12, temperature=0)
        if i % 3 == 1:
            return None, client.completions.create(model="t5", prompt=prompt, max_tokens=12, temperature=1.5, n=2)
        return None, client.completions.create(model="t5", prompt=prompt, max_tokens=3, temperature=0, stop=["a"])

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(36)))
    for prompt, answer in answers:
        if prompt is not None:
            assert answer.choices[0].text == want[PROMPTS.index(prompt)]


@pytest.mark.parametrize("call, error, status, message", [
    (lambda c: c.completions.create(model="nope", prompt="x"), openai.NotFoundError, 404,
     "The model 'nope' does not exist"),
    (lambda c: c.completions.create(model="../../etc/passwd", prompt="x"), openai.NotFoundError, 404,
     "does not exist (an id is"),
    (lambda c: c.completions.create(model="t5", prompt="x", max_tokens=10_000), openai.BadRequestError, 400,
     "max_tokens is 10000; at most 256"),
    (lambda c: c.completions.create(model="t5", prompt=["x"] * 9), openai.BadRequestError, 400,
     "too many completions: 9 prompt(s) x n=1; at most 8"),
    (lambda c: c.completions.create(model="t5", prompt="y" * 5000), openai.BadRequestError, 400,
     "prompt 0 is too long: 5000 characters; at most 4096"),
    (lambda c: c.completions.create(model="t5", prompt="x", extra_body={"max_token": 3}), openai.BadRequestError, 400,
     "Unrecognized request argument supplied: max_token"),
    (lambda c: c.completions.create(model="t5", prompt="x", temperature=5), openai.BadRequestError, 400,
     "temperature"),
    (lambda c: c.embeddings.create(model="t5", input="x"), openai.NotFoundError, 404, "Not Found"),  # no such route
])
def test_bad_requests_get_openai_errors(server, call, error, status, message):
    with pytest.raises(error) as info:
        call(server["client"])
    assert info.value.status_code == status and message in info.value.message
    assert set(info.value.body) == {"message", "type", "param", "code"} and "Traceback" not in str(info.value.body)
    if status == 404:
        assert "passwd" not in info.value.message


def test_a_wrong_or_missing_key_gets_a_401_and_the_key_is_never_logged_or_shown(server):
    url, key = server["url"], server["key"]
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key=key[:-1] + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/generate", "/recipes", "/docs", "/openapi.json"):
        assert httpx.get(url + path, timeout=HTTP_TIMEOUT_S).status_code == 401, path
    assert httpx.get(f"{url}/healthz", timeout=HTTP_TIMEOUT_S).status_code == 200
    assert httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {key}"},
                     timeout=HTTP_TIMEOUT_S).status_code == 200
    # the key was given on the command line; Ray records a driver's command line (`ray list jobs`)
    cmdline = Path(f"/proc/{server['proc'].pid}/cmdline").read_bytes().decode()
    assert key not in cmdline and "--api-key" not in cmdline
    logs = server["ray_dir"] / "ray" / "session_latest" / "logs"
    dashboard = re.search(r"Dashboard head http address: (\S+)", (logs / "dashboard.log").read_text())
    jobs = httpx.get(f"http://{dashboard.group(1)}/api/jobs/", timeout=30).json()  # Ray's job table
    assert any("lorahub_ray serve" in (j.get("entrypoint") or "") for j in jobs)
    assert key not in json.dumps(jobs)
    time.sleep(2)  # Serve's request logs are flushed asynchronously
    files = [server["log"], *(p for p in (server["ray_dir"] / "ray").rglob("*") if p.is_file() and not p.is_socket())]
    leaked = [str(p) for p in files if key.encode() in _bytes_of(p)]
    assert not leaked and len(files) > 20
    assert "an API key required" in " ".join(server["log"].read_text().split())


def _bytes_of(path: Path) -> bytes:
    """A file's bytes, or none when Ray removed it since it was listed (a rotated log, a temp file)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def test_serve_gives_the_proxy_time_to_start_on_a_busy_machine(server):
    """Serve's controller kills an HTTP proxy not ready within 5 s three times over (`serve.start` then fails
    with ActorDiedError, as measured under load); the Ray that `lorahub-ray serve` starts gives it 30 s."""
    from lorahub_ray.cli.serve import PROXY_CHECK_S

    logs = server["ray_dir"] / "ray" / "session_latest" / "logs"
    pids = {int(m.group(1)) for p in logs.rglob("controller_*.log")
            if (m := re.fullmatch(r"controller_(\d+)\.log", p.name))}
    live = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert live, (pids, sorted(p.name for p in logs.rglob("*")))
    raw = Path(f"/proc/{live[0]}/environ").read_bytes()
    environ = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    for name, seconds in PROXY_CHECK_S.items():
        assert environ.get(name.encode()) == seconds.encode(), name

