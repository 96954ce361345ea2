"""deploy/kubernetes without a cluster: every overlay renders (kubectl kustomize), every object
passes its schema (kubernetes-validate --strict; the ServiceMonitor CRD's stored schema), and
what the manifests say about p3 is what p3 does: each container's args parse with p3's own
parser, each port is the one its flag binds on a wildcard host, each probe path answers on
the server that binds it, each environment variable is read by p3 or substituted into args,
the node's memory covers its shard, the grace periods cover the drains, and the keys
deploy/kubernetes/keys.sh makes are the ones the pods' mounts and ids need."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml

from p3.cli import build_parser
from p3.config import default_of
from p3.nodes.coordinator.placement import model_bytes

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH"),
]

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "tensor-parallel", "cuda")
KUBERNETES_VERSION = "1.32"  # kubectl's here; kubernetes-validate has schemas to 1.37
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json"
}
WORKLOADS = ("StatefulSet", "Deployment")
PROCESS_BYTES = 384 * 1024**2  # a node besides its weights and KV cache: measured 333 MiB
GRACE_MARGIN_S = 10
WILDCARD_HOSTS = ("0.0.0.0", "::", "*")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay}: {out.stderr}"
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def validate(obj: dict) -> None:
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    else:
        jsonschema.validate(obj, json.loads((SCHEMAS / crd).read_text()))


def find(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def containers(objects: list[dict]):
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            for container in obj["spec"]["template"]["spec"]["containers"]:
                yield obj, container


def parse(args: list[str], env: dict[str, str]) -> argparse.Namespace:
    """args as p3's own parsers take them ($(VAR) as Kubernetes substitutes it); a flag p3
    does not have fails with argparse's message."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    parser = parsers()[args[0] == "edge"]
    if args[0] == "edge":  # p3 edge parses its own flags (p3.cli.cmd_edge)
        args = args[1:]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"p3 rejects {args}: {stderr.getvalue()}")


@functools.cache
def parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """p3's parser, and p3 edge's."""
    from p3.nodes.edge import edge

    edge_parser = argparse.ArgumentParser(prog="p3 edge")
    edge.add_arguments(edge_parser)
    return build_parser(), edge_parser


def sample_env(obj: dict) -> dict[str, str]:
    """What the env fieldRefs hold in the workload's first pod."""
    return {"POD_NAME": f"{obj['metadata']['name']}-0"}


def bound_ports(args: argparse.Namespace) -> dict[int, str]:
    """port -> host, for every port the process binds."""
    ports = {}
    if getattr(args, "bind", None):
        host, _, port = args.bind.removeprefix("tcp://").rpartition(":")
        ports[int(port)] = host
    if getattr(args, "status_port", None) is not None:
        ports[args.status_port] = args.status_host
    if getattr(args, "port", None) is not None:
        ports[args.port] = args.host
    return ports


def quantity(text: str | int) -> float:
    units = {"m": 1e-3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def test_every_object_passes_its_schema(rendered):
    kinds, seen = set(), set()
    for overlay, objects in rendered.items():
        for obj in objects:
            if (text := json.dumps(obj, sort_keys=True)) in seen:  # the same in two overlays
                continue
            seen.add(text)
            try:
                validate(obj)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
                pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {exc}")
            kinds.add(obj["kind"])
    want = {"Service", "StatefulSet", "Deployment", "HorizontalPodAutoscaler"}
    assert want | {"PodDisruptionBudget", "ServiceMonitor"} <= kinds


def test_the_stored_crd_schema_rejects_what_the_crd_does_not_have(rendered):
    monitor = find(rendered["cpu"], "ServiceMonitor", "p3")
    validate(monitor)
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["paht"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError, match="paht"):
        validate(broken)


def test_args_ports_and_env_are_what_p3_takes(rendered):
    read_by_p3 = environment_p3_reads()
    for overlay, objects in rendered.items():
        for obj, container in containers(objects):
            where = f"{overlay}: {obj['metadata']['name']}"
            assert "command" not in container, f"{where}: the image's ENTRYPOINT is p3"
            args = parse(container["args"], sample_env(obj))
            bound = bound_ports(args)
            for port in container["ports"]:
                number = port["containerPort"]
                assert number in bound, f"{where}: containerPort {number} is not bound: {bound}"
                assert bound[number] in WILDCARD_HOSTS, f"{where}: {number} on {bound[number]}"
            for env in container.get("env", []):
                name = env["name"]
                substituted = any(f"$({name})" in a for a in container["args"])
                assert substituted or name in read_by_p3, f"{where}: p3 reads no ${name}"


def environment_p3_reads() -> set[str]:
    source = "\n".join(p.read_text() for p in (ROOT / "p3").rglob("*.py"))
    names = set(re.findall(r"os\.environ(?:\.get\(|\[)\s*\"([A-Z0-9_]+)\"", source))
    return names | set(re.findall(r"^\w+_ENV = \"([A-Z0-9_]+)\"", source, re.M))


def test_probes_are_routes_the_process_serves(rendered):
    paths = asyncio.run(served_paths())
    for overlay, objects in rendered.items():
        for obj, container in containers(objects):
            args = parse(container["args"], sample_env(obj))
            server = "edge" if container["args"][0] == "edge" else "status"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if (probe := container.get(kind)) is None:
                    continue
                get = probe["httpGet"]
                port = ports.get(get["port"], get["port"])
                binds = args.port if server == "edge" else args.status_port
                assert port == binds, f"{overlay}: {kind} on {port}, served on {binds}"
                assert get["path"] in paths[server], f"{overlay}: {kind} {get['path']}"
            assert {"readinessProbe", "livenessProbe"} <= container.keys()


async def served_paths() -> dict[str, set[str]]:
    """The paths that answer (anything but 404) on a real edge app and a real status server."""
    from aiohttp.test_utils import TestServer

    from p3.nodes.coordinator.coordinator import Coordinator, CoordinatorConfig
    from p3.nodes.edge.api import make_app
    from p3.nodes.edge.edge import Edge, EdgeConfig
    from p3.status import CoordinatorMetrics, StatusServer

    candidates = ("/health", "/ready", "/metrics", "/healthz", "/v1/models")
    edge = TestServer(make_app(Edge(EdgeConfig(coordinator="tcp://127.0.0.1:9"))))
    await edge.start_server()
    coordinator = Coordinator(CoordinatorConfig(bind="tcp://127.0.0.1:0"))
    status = StatusServer(coordinator, lambda: False, CoordinatorMetrics())
    await status.start()
    found: dict[str, set[str]] = {"edge": set(), "status": set()}
    try:
        async with aiohttp.ClientSession() as http:
            for server, base in (("edge", str(edge.make_url(""))), ("status", status.url)):
                for path in candidates:
                    async with http.get(base.rstrip("/") + path) as response:
                        if response.status != 404:
                            found[server].add(path)
    finally:
        await status.stop()
        await edge.close()
    assert "/healthz" not in found["edge"] | found["status"]  # a 404 is told apart
    return found


def test_node_memory_covers_its_shard_and_cpu_its_threads(rendered, default_model_dir):
    for overlay, objects in rendered.items():
        coordinator = find(objects, "StatefulSet", "p3-coordinator")
        cluster = parse(coordinator["spec"]["template"]["spec"]["containers"][0]["args"], {})
        node = find(objects, "StatefulSet", "p3-node")
        container = node["spec"]["template"]["spec"]["containers"][0]
        args = parse(container["args"], sample_env(node))
        weights = model_bytes(args.model, 4, args.quantization)
        assert weights > 0, "the default model is not at hand"
        need = weights / (cluster.tp * cluster.pp) + args.kv_cache_bytes + PROCESS_BYTES
        resources = container["resources"]
        memory = quantity(resources["requests"]["memory"])
        assert memory >= need, f"{overlay}: nodes request {memory:.0f} B, need {need:.0f} B"
        assert resources["limits"]["memory"] == resources["requests"]["memory"]
        assert quantity(resources["requests"]["cpu"]) == args.threads, overlay
        assert node["spec"]["replicas"] % (cluster.tp * cluster.pp) == 0, overlay
        assert node["spec"]["podManagementPolicy"] == "Parallel"


def test_grace_periods_cover_the_drains(rendered):
    from p3.nodes.edge.edge import EdgeConfig

    for overlay, objects in rendered.items():
        node = find(objects, "StatefulSet", "p3-node")["spec"]["template"]["spec"]
        drain_s = parse(node["containers"][0]["args"], {"POD_NAME": "p3-node-0"}).drain_timeout
        assert node["terminationGracePeriodSeconds"] >= drain_s + GRACE_MARGIN_S, overlay
        edge = find(objects, "Deployment", "p3-edge")["spec"]["template"]["spec"]
        pre_stop_s = edge["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        need_s = pre_stop_s + default_of(EdgeConfig, "drain_timeout_s") + GRACE_MARGIN_S
        assert edge["terminationGracePeriodSeconds"] >= need_s, overlay


def test_the_keys_script_makes_the_keys_the_pods_mount_and_run_as(rendered, tmp_path):
    """keys.sh's Secrets, laid out as each pod mounts them, give every process p3's Keyring
    for the member it runs as, with the public key of every member it dials. (The keys are
    made here, in-process, for the most nodes an overlay has: `p3 keys generate`, which
    keys.sh runs when DIR has none, takes 3 s to start.)"""
    from p3.protocol.security import Keyring, generate

    most = max(replicas(objects) for objects in rendered.values())
    generate(tmp_path / "keys", [f"p3-node-{i}" for i in range(most)], ["edge-0"])
    cmd = [str(KUBERNETES / "keys.sh"), str(tmp_path / "keys"), str(most)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    secrets: dict[str, dict[str, bytes]] = {}
    for secret in filter(None, yaml.safe_load_all(out.stdout)):
        validate(secret)
        secrets[secret["metadata"]["name"]] = {
            key: base64.b64decode(value) for key, value in secret["data"].items()
        }
    for overlay, objects in rendered.items():
        for obj, container in containers(objects):
            mounted = mount(obj, container, secrets, tmp_path / overlay / obj["metadata"]["name"])
            for i in range(obj["spec"]["replicas"]):
                args = parse(container["args"], {"POD_NAME": f"{obj['metadata']['name']}-{i}"})
                role, name = member(container["args"][0], args)
                keyring = Keyring(mounted, role, name)
                assert keyring.public_key("coordinator", "coordinator") is not None
                if role == "edge":
                    assert keyring.public_key("node", f"p3-node-{replicas(objects) - 1}")


def replicas(objects: list[dict]) -> int:
    return find(objects, "StatefulSet", "p3-node")["spec"]["replicas"]


def member(command: str, args: argparse.Namespace) -> tuple[str, str]:
    return {
        "coordinator": ("coordinator", "coordinator"),
        "node": ("node", getattr(args, "node_id", None)),
        "edge": ("edge", getattr(args, "edge_id", None)),
    }[command]


def mount(obj: dict, container: dict, secrets: dict, root: Path) -> Path:
    """The container's Secret volumes written out as the kubelet mounts them; its --keys."""
    volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
    for volume_mount in container["volumeMounts"]:
        volume = volumes[volume_mount["name"]]
        if "secret" in volume:
            names = [volume["secret"]["secretName"]]
        else:
            names = [source["secret"]["name"] for source in volume["projected"]["sources"]]
        target = root / volume_mount["mountPath"].lstrip("/")
        target.mkdir(parents=True)
        for name in names:
            assert name in secrets, f"{obj['metadata']['name']} mounts {name}: keys.sh makes none"
            for key, value in secrets[name].items():
                (target / key).write_bytes(value)
    keys = parse(container["args"], sample_env(obj)).keys
    return root / keys.lstrip("/")


def test_dockerfiles_run_p3_with_flags_it_takes():
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
        assert re.search(r'^ENTRYPOINT \["p3"\]$', text, re.M), dockerfile
        (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
        args = parse(json.loads(cmd), {})
        assert bound_ports(args)[8000] in WILDCARD_HOSTS, dockerfile
        assert re.search(r"^ENV P3_HOME=/opt/p3", text, re.M), f"{dockerfile}: the model's home"
    assert "P3_HOME" in environment_p3_reads()
