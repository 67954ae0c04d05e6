"""The KubeRay manifests in k8s/: valid against the KubeRay 1.7 CRDs, and the RayService in step
with the Serve config it is generated from."""

import ast
import copy
from pathlib import Path

import pytest
import yaml

from k8s import kuberay as k8s

REPO = Path(__file__).parents[1]
CRDS = REPO / "k8s" / "crds"
MANIFESTS = sorted(p for p in (REPO / "k8s").glob("*.yaml") if not p.name.endswith((".template.yaml", ".placeholder.yaml")))


@pytest.fixture(scope="module")
def schemas():
    return k8s.load_crd_schemas(CRDS)


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_there_is_a_rayjob_and_a_rayservice():
    kinds = sorted(d["kind"] for p in MANIFESTS for d in docs(p))
    assert kinds == ["RayJob", "RayService"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_crds(schemas, path):
    for doc in docs(path):
        assert k8s.validate_manifest(doc, schemas) == []


def test_validator_catches_what_kubernetes_would_drop_or_refuse(schemas):
    (job,) = docs(REPO / "k8s" / "rayjob-search.yaml")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo: silently dropped by Kubernetes
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    bad["metadata"]["name"] = "x" * 48
    problems = "\n".join(k8s.validate_manifest(bad, schemas))
    assert "spec.shutdownAfterJobFinish: not declared" in problems
    assert "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].gpus: not declared" in problems
    assert "rayStartParams.num-cpus: 0 is not of type 'string'" in problems
    assert "'groupName' is a required property" in problems
    assert "longer than 47 characters" in problems
    # maps with free keys (labels, rayStartParams, resources) are not flagged
    assert "labels" not in problems and "nvidia.com/gpu" not in problems


def test_rayjob_runs_a_search_and_cleans_up(schemas):
    (job,) = docs(REPO / "k8s" / "rayjob-search.yaml")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("lorahub-ray search ") and "--output s3://" in spec["entrypoint"]
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env_vars and all(isinstance(v, str) for v in env_vars.values())  # Ray refuses non-string values
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["entrypointNumGpus"] == 1  # the search (the driver) lands on the GPU worker
    image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cluster["rayVersion"] in image


def test_rayservice_autoscales_in_tree():
    (svc,) = docs(REPO / k8s.RAYSERVICE)
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in cluster["workerGroupSpecs"])
    image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cluster["rayVersion"] in image


def test_rayservice_serve_config_is_the_deployments_file():
    (svc,) = docs(REPO / k8s.RAYSERVICE)
    source = (REPO / k8s.SERVE_CONFIG).read_text()
    assert svc["spec"]["serveConfigV2"] == source  # verbatim, comments included
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert apps and len({a["route_prefix"] for a in apps}) == len(apps)
    for app in apps:  # each import path names a module of this repository that defines that name
        module, name = app["import_path"].split(":")
        tree = ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert name in defined, app["import_path"]  # an application builder or a bound application


def test_committed_rayservice_is_what_the_generator_renders():
    """Fails when k8s/rayservice.yaml drifts from its template or the Serve config:
    run `python k8s/kuberay.py render`."""
    assert (REPO / k8s.RAYSERVICE).read_text() == k8s.render(REPO)
    assert k8s.main(["render", "--check", "--root", str(REPO)]) == 0


def test_drift_is_detected(tmp_path):
    for rel in (k8s.TEMPLATE, k8s.SERVE_CONFIG, k8s.RAYSERVICE):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    assert k8s.main(["render", "--check", "--root", str(tmp_path)]) == 0
    config = tmp_path / k8s.SERVE_CONFIG
    config.write_text(config.read_text() + "# an edit to the Serve config\n")
    assert k8s.main(["render", "--check", "--root", str(tmp_path)]) == 1
    assert k8s.main(["render", "--root", str(tmp_path)]) == 0
    (svc,) = docs(tmp_path / k8s.RAYSERVICE)
    assert svc["spec"]["serveConfigV2"] == config.read_text()


def test_render_refuses_a_template_without_one_placeholder():
    with pytest.raises(k8s.ManifestError, match="exactly one line '__SERVE_CONFIG__'"):
        k8s.render_rayservice("spec:\n  serveConfigV2: |\n", "applications: []\n")
    with pytest.raises(k8s.ManifestError, match="has no 'applications' list"):
        k8s.render_rayservice("a: |\n  __SERVE_CONFIG__\n", "foo: 1\n")


def test_validate_command_reports_each_document(schemas, tmp_path, capsys):
    (job,) = docs(REPO / "k8s" / "rayjob-search.yaml")
    job["spec"]["ttlSecondsAfterFinish"] = 60
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    assert k8s.main(["validate", "--crds", str(CRDS), *map(str, MANIFESTS)]) == 0
    assert k8s.main(["validate", "--crds", str(CRDS), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "RayJob/lorahub-search: INVALID" in out and "spec.ttlSecondsAfterFinish: not declared" in out
