"""The deployment files say only what aserve and the pinned router do: the Kubernetes manifests parse,
every flag they pass exists, every probe path answers, and the container image installs with the
script `make setup` runs. (No container runtime or cluster here: the files are checked, not run.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_api import serve
from test_operations import scrape, value

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "deploy" / "Containerfile"


ADAPTER_VALUES = KUBE / "autoscaling" / "prometheus-adapter-values.yaml"  # Helm values, not an object


def _objects() -> list[dict]:
    return [doc for path in sorted(KUBE.rglob("*.yaml")) if path != ADAPTER_VALUES
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str, name: str) -> dict:
    [obj] = [o for o in _objects() if o.get("kind") == kind and o["metadata"]["name"] == name]
    return obj


def _container(deployment: str) -> dict:
    [container] = _kind("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _help(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _containerfile_cmd() -> list[str]:
    [cmd] = re.findall(r"^CMD (\[.*\])$", CONTAINERFILE.read_text(), re.MULTILINE)
    return yaml.safe_load(cmd)  # a JSON array, which YAML reads too


def test_every_manifest_parses_into_named_kubernetes_objects():
    objects = _objects()
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "PersistentVolumeClaim", "ServiceAccount",
                                             "Role", "RoleBinding", "HorizontalPodAutoscaler", "PodMonitor"}
    for obj in objects:
        assert obj["apiVersion"] and obj["kind"], obj
        if obj["kind"] == "Kustomization":
            assert sorted(obj["resources"]) == ["aserve.yaml", "router.yaml"]  # the autoscaler needs Prometheus
            assert all((KUBE / r).is_file() for r in obj["resources"])
        else:
            assert obj["metadata"]["name"], obj


def test_every_flag_given_to_aserve_exists_in_aserve_serve_help():
    known = _flags(re.findall(r"--[\w-]+", _help(sys.executable, "-m", "aserve", "serve", "--help")))
    args = _container("aserve")["args"]
    assert args[0] == "serve" and _flags(args) <= known, _flags(args) - known
    cmd = _containerfile_cmd()
    assert cmd[0] == "serve" and _flags(cmd) <= known


def test_every_flag_given_to_the_router_exists_in_the_pinned_router():
    sys.path.insert(0, str(REPO / "deploy"))
    from cluster import ROUTER_BALANCE_ARGS, ROUTER_HEALTH_ARGS, router_executable

    known = _flags(re.findall(r"--[\w-]+", _help(router_executable(), "--help")))
    container = _container("aserve-router")
    assert container["command"] == ["vllm-router"]
    assert _flags(container["args"]) <= known, _flags(container["args"]) - known
    # The manifest watches replicas as make cluster does.
    assert _flags(ROUTER_HEALTH_ARGS) - {"--worker-startup-check-interval"} <= _flags(container["args"])
    assert _flags(ROUTER_BALANCE_ARGS) <= _flags(container["args"])
    selector = container["args"][container["args"].index("--selector") + 1]
    labels = _kind("Deployment", "aserve")["spec"]["template"]["metadata"]["labels"]
    assert dict([selector.split("=")]).items() <= labels.items()


@pytest.mark.asyncio(loop_scope="module")
async def test_every_probe_path_answers_on_a_running_server(tiny_llama_dir, client):
    container = _container("aserve")
    probes = [container[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    [port] = container["ports"]
    assert all(p["port"] == port["name"] for p in probes)
    assert container["args"][container["args"].index("--port") + 1] == str(port["containerPort"])
    async with serve(tiny_llama_dir) as s:
        for probe in probes:
            async with client.get(s.url + probe["path"]) as resp:
                assert resp.status == 200, probe["path"]
        s.state.draining = True  # what SIGTERM sets: out of rotation, but not restarted
        ready, live = container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]
        async with client.get(s.url + ready) as r, client.get(s.url + live) as l:
            assert (r.status, l.status) == (503, 200)


def test_kubernetes_waits_longer_than_a_drain_before_killing():
    spec = _kind("Deployment", "aserve")["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    drain = float(args[args.index("--shutdown-timeout") + 1])
    assert spec["terminationGracePeriodSeconds"] > drain + 5  # + the router's 2 s to take it out


def test_the_api_key_comes_from_a_secret_and_probes_need_none():
    [env] = [e for e in _container("aserve")["env"] if e["name"] == "ASERVE_API_KEY"]
    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "aserve-api-key"
    # The key guards everything but these (server/middleware.py):
    from aserve.server.middleware import OPEN_PATHS

    container = _container("aserve")
    assert {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} <= OPEN_PATHS


@pytest.mark.asyncio(loop_scope="module")
async def test_the_autoscaler_reads_a_metric_that_aserve_serves(tiny_llama_dir, client):
    hpa = _kind("HorizontalPodAutoscaler", "aserve")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "aserve"
    [metric] = hpa["spec"]["metrics"]
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.fullmatch(r"([\w:]+)\{.*\}", rule["seriesQuery"])[1]
    async with serve(tiny_llama_dir) as s:
        samples = await scrape(client, s)
    assert any(k.startswith(series + "[") for k in samples), series
    assert value(samples, series) == 0


def test_the_image_installs_with_the_script_make_setup_runs():
    containerfile, makefile = CONTAINERFILE.read_text(), (REPO / "Makefile").read_text()
    assert re.search(r"^RUN deploy/install\.sh \S+ cluster", containerfile, re.MULTILINE)
    assert re.search(r"^\tPYTHON=\$\(PYTHON\) deploy/install\.sh \$\(VENV\) test$", makefile, re.MULTILINE)
    for copied in re.findall(r"^COPY (.+) \S+$", containerfile, re.MULTILINE):
        for path in copied.split():
            assert (REPO / path).exists(), path
    # What the image runs is what the Deployment overrides: the same entry point.
    assert '"aserve"' in re.search(r"^ENTRYPOINT (.*)$", containerfile, re.MULTILINE)[1]
