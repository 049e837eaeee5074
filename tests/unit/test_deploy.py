"""deploy/ checked offline: every kustomize overlay renders (with the real
kustomize: `kustomize build`, else the one inside `kubectl kustomize`) and
validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors); every Procfile process has a Deployment with the
same arguments, liveness and readiness probes and resource requests and
limits; `honcho check` accepts the Procfile. (That every metric deploy/ names
is exported is checked against running processes: tests/e2e/test_deploy_metrics.py.)
"""

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from workers.bench.mosquitto_durability import CONFIGS, DEPLOYED
from workers.up import procfile_commands

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "deploy/kubernetes/overlays").iterdir() if p.is_dir())
# The oldest Kubernetes the manifests need (PodDisruptionBudget.unhealthyPodEvictionPolicy: 1.27) and the newest schemas.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


@cache
def render(overlay: str) -> list[dict]:
    path = ROOT / "deploy/kubernetes/overlays" / overlay
    if shutil.which("kustomize"):
        argv = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(path)]
    else:
        raise AssertionError("neither kustomize nor kubectl is on PATH (apt-get install kubectl)")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_there_are_overlays():
    assert OVERLAYS == ["production", "single-node"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay, version):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "ConfigMap", "PersistentVolumeClaim", "Job"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                                 f"at {'.'.join(map(str, exc.path))}") from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_procfile_process_has_a_deployment_with_probes_and_resources(overlay):
    deployments = {d["metadata"]["name"]: d for d in render(overlay) if d["kind"] == "Deployment"}
    for name, argv in procfile_commands().items():
        assert name in deployments, f"{overlay}: no Deployment for Procfile process {name!r}"
        containers = deployments[name]["spec"]["template"]["spec"]["containers"]
        edge = next(c for c in containers if c["name"] == "edge")
        assert edge["args"] == argv[3:], f"{overlay}/{name}: args differ from the Procfile"  # after `python -m workers.cli`
        for probe in ("livenessProbe", "readinessProbe"):
            assert edge.get(probe), f"{overlay}/{name}: no {probe}"
        for kind in ("requests", "limits"):
            assert set(edge.get("resources", {}).get(kind, {})) >= {"cpu", "memory"}, f"{overlay}/{name}: {kind}"
        grace = deployments[name]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace >= 30, f"{overlay}/{name}: grace period below the worker shutdown timeout"


def test_honcho_check_accepts_the_procfile():
    out = subprocess.run([sys.executable, "-m", "honcho", "check", "-f", str(ROOT / "Procfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = re.search(r"Valid procfile detected \(([^)]*)\)", out.stderr + out.stdout).group(1)
    assert listed.split(", ") == list(procfile_commands())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_broker_snapshots_as_measured_for_the_deployed_row(overlay):
    # README's guarantee row and persistence figures describe the durability
    # bench's DEPLOYED settings: the broker's ConfigMap must have them.
    config_map, = (doc for doc in render(overlay) if doc["kind"] == "ConfigMap"
                   and doc["metadata"]["name"].startswith("mosquitto-config"))
    options = dict(line.split(maxsplit=1) for line in config_map["data"]["mosquitto.conf"].splitlines()
                   if line.strip() and not line.startswith("#"))
    assert {key: options.get(key) for key in CONFIGS[DEPLOYED]} == CONFIGS[DEPLOYED]
