"""Ray Jobs end to end: a real local Ray head (the session's ``ray_cluster``), moto's S3 server on
loopback holding the catalogue, base model, modules and examples; a search submitted through the
CLI runs as a job, writes its recipe to S3, and the recipe is evaluated."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lorahub_ray as lr
from lorahub_ray.io import catalogue as hub
from lorahub_ray.cluster import jobs
from lorahub_ray.cli import app
from s3 import S3_ENV, moto_server, s3fs_client, upload_dir

REPO = Path(__file__).parents[1]
CAT = "s3://hub/jobs-catalogue.parquet"


@pytest.fixture(scope="module")
def s3(world):
    import s3fs

    with moto_server() as endpoint:
        s3fs.S3FileSystem.clear_instance_cache()
        upload_dir(world["base"], "s3://models/tiny-t5")
        upload_dir(world["hub"], "s3://hub/modules")
        upload_dir(world["examples"].parent, "s3://data/fewshot")
        if not s3fs_client().exists("runs"):  # moto's state outlives its server within a process
            s3fs_client().mkdir("runs")
        hub.add(CAT, ["s3://hub/modules/"], task="reverse", replace=True)
        yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory):
    """Just this checkout's package, uploaded as the job's working directory."""
    root = tmp_path_factory.mktemp("job-wd")
    shutil.copytree(REPO / "lorahub_ray", root / "lorahub_ray", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def submit(ray_cluster, working_dir, tmp_path, *command):
    env = [f"--env={k}" for k in [*S3_ENV, "AWS_ENDPOINT_URL"]]
    # the head's PATH has no venv: name this interpreter (the one the head was started from)
    return run("submit", "--address", ray_cluster["dashboard"], "--working-dir", working_dir, *env,
               "--python", sys.executable,
               "--env", f"LORAHUB_RAY_CACHE={tmp_path / 'job-cache'}", "--env", "HF_HUB_OFFLINE=1", "--wait",
               "--", *command)


def test_search_job_writes_its_recipe_to_s3_then_evaluate(ray_cluster, s3, working_dir, tmp_path):
    out = "s3://runs/job"
    code, text = submit(ray_cluster, working_dir, tmp_path,
                        "search", "--model", "s3://models/tiny-t5", "--hub", CAT, "--filter", "id!=delta",
                        "--examples", "s3://data/fewshot/fewshot.jsonl", "--output", out, "--budget", "3")
    assert code == 0, text
    job_id = re.search(r"submitted job (\S+)", text).group(1)
    assert f"job {job_id} SUCCEEDED" in text
    assert "module weights" in text  # the job's own output, followed

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_cluster["dashboard"]).get_job_info(job_id)
    assert info.entrypoint.startswith(f"{sys.executable} -m lorahub_ray search ")

    recipe = lr.Recipe.load(out)
    assert [m["name"] for m in recipe.modules] == ["alpha", "beta", "gamma"]
    assert all(m["uri"].startswith("s3://hub/modules/") for m in recipe.modules)
    code, text = run("evaluate", "--model", out, "--data", "s3://data/fewshot/fewshot.jsonl")
    assert code == 0, text
    assert re.search(r"accuracy \d+\.\d\d% on 5 examples", text)


def test_failing_job_exits_nonzero_with_the_jobs_error(ray_cluster, s3, working_dir, tmp_path):
    code, text = submit(ray_cluster, working_dir, tmp_path,
                        "search", "--model", "s3://models/tiny-t5", "--hub", CAT, "--filter", "task=summarize",
                        "--examples", "s3://data/fewshot/fewshot.jsonl", "--output", "s3://runs/never")
    assert code == 1, text
    assert "no module in hub catalogue" in text and re.search(r"job \S+ FAILED", text)
    assert not s3fs_client().exists("s3://runs/never/recipe.json")


def test_every_command_of_the_app_can_be_submitted(ray_cluster, working_dir, tmp_path):
    # compare was refused while the allowed commands were a list of their own
    code, text = run("submit", "--address", ray_cluster["dashboard"], "--working-dir", working_dir,
                     "--python", sys.executable, "--wait", "--", "compare", "--help")
    assert code == 0, text
    assert re.search(r"job \S+ SUCCEEDED", text) and "zero-shot" in text.lower(), text


def test_bad_submissions_fail_before_anything_is_sent(tmp_path, monkeypatch):
    code, text = run("submit", "--address", "127.0.0.1:8265", "--", "search")
    assert code == 2 and "must be the job API's URL" in text
    code, text = run("submit", "--", "nosuchcommand")
    assert code == 2 and "unknown lorahub-ray command 'nosuchcommand'" in text
    assert "compare" in text and "serve" in text and "submit," not in text  # the app's own commands
    code, text = run("submit", "--address", "http://127.0.0.1:1")
    assert code == 2 and "no command to run" in text
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    code, text = run("submit", "--env", "NOT_SET_HERE", "--", "search")
    assert code == 2 and "NOT_SET_HERE is not set here" in text
    code, text = run("submit", "--runtime-env", tmp_path / "missing.yaml", "--", "search")
    assert code == 2 and "runtime env file" in text and "does not exist" in text


def test_runtime_env_file_with_options_on_top(tmp_path):
    file = tmp_path / "env.yaml"
    file.write_text("pip: [nevergrad]\nenv_vars: {A: '1', B: '2'}\n")
    env = jobs.runtime_env(file=file, working_dir=tmp_path, env=jobs.parse_env(["B=3", "C"], {"C": "4"}))
    assert env == {"pip": ["nevergrad"], "env_vars": {"A": "1", "B": "3", "C": "4"}, "working_dir": str(tmp_path)}
    assert jobs.entrypoint(["search", "--output", "s3://a b"]) == "python -m lorahub_ray search --output 's3://a b'"
    assert json.loads(jobs.describe(env))["env_vars"] == {"A": "…", "B": "…", "C": "…"}  # values not echoed
