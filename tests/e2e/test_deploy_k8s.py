"""k8s/: every overlay renders with kustomize, validates offline against the Kubernetes schemas (and KEDA's, for
its ScaledObject), and keeps the deployment policies (one GPU per pod, probes, graceful termination, restricted
security, routing timeouts)."""

import copy
import re

import jsonschema
import pytest
import yaml

from server import config
from server.metrics import Metrics
from tests.support.deploy import ROOT, objects, render, run, tool

OVERLAYS = [
    "k8s/overlays/kubernetes",
    "k8s/overlays/openshift",
    "k8s/examples/queue-autoscaling",
    "k8s/examples/keda-autoscaling",
    "k8s/examples/compile-cache",
]
# KEDA's published ScaledObject CRD (its source and license are in the file's first lines).
KEDA_CRD = ROOT / "tests/data/keda/keda.sh_scaledobjects.yaml"
# Oldest schema checked: OpenShift 4.14 is Kubernetes 1.27. The newest is kubernetes-validate's default.
SCHEMA_VERSIONS = ["1.27.0", None]


def settings(objs: dict) -> dict[str, str]:
    return objs["ConfigMap"]["data"]


def container(objs: dict) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def seconds(duration: str) -> int:
    """An OpenShift router duration (e.g. 15m, 900s, 1h) in seconds."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", duration).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[unit]


def longest_request(objs: dict) -> float:
    """A request waits and generates for at most REQUEST_TIMEOUT, then its images are uploaded."""
    upload = int(objs["Deployment"]["metadata"]["annotations"]["image-server/longest-upload-seconds"])
    return float(settings(objs)["REQUEST_TIMEOUT"]) + upload


@pytest.mark.parametrize("version", SCHEMA_VERSIONS, ids=lambda v: v or "newest")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay, version, tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(overlay))
    result = run([tool("kubernetes-validate"), "--strict", *(["-k", version] if version else []), rendered])
    assert result.returncode == 0, result.stdout
    # It did look at the objects: kinds without a schema here (Route, PodMonitor) are only warned about.
    assert "passed for resource deployment/image-server" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_gets_one_gpu_and_memory_for_loading(overlay):
    resources = container(objects(overlay))["resources"]
    for part in ("requests", "limits"):
        assert resources[part]["nvidia.com/gpu"] == 1
        memory = resources[part]["memory"]
        assert memory.endswith("Gi") and int(memory[:-2]) >= 64, memory


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_server_settings(overlay):
    objs = objects(overlay)
    sections = [config.Settings, *config.plugin_sections().values()]
    known = {config.env_name(f) for section in sections for f in config.options(section)}
    assert set(settings(objs)) <= known, set(settings(objs)) - known
    # torch's CPU threads stay within the CPUs the pod asked for (it sees all of its node's cores)
    assert int(settings(objs)["TORCH_THREADS"]) <= int(container(objs)["resources"]["requests"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_give_the_model_load_minutes_and_never_restart_for_a_busy_gpu(overlay):
    c = container(objects(overlay))
    startup, readiness, liveness = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["failureThreshold"] >= 30 and startup["periodSeconds"] >= 10
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300
    assert readiness["httpGet"]["path"] == "/ready"
    assert liveness["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert all(p["httpGet"]["port"] in ports for p in (startup, readiness, liveness))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_drain_generation_and_upload(overlay):
    objs = objects(overlay)
    deployment = objs["Deployment"]
    notes = deployment["metadata"]["annotations"]
    command = container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = (
        int(command[1])
        + float(settings(objs)["DRAIN_TIMEOUT"])
        + int(notes["image-server/longest-generation-seconds"])
        + int(notes["image-server/longest-upload-seconds"])
    )
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_meets_the_restricted_pod_security_standard(overlay):
    pod = objects(overlay)["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"].get("runAsUser", 1001) != 0
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"}
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed | {"secret"}, volume
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert not sc.get("privileged")


def test_openshift_sets_no_uid_or_gid_so_restricted_v2_can_assign_one():
    text = render("k8s/overlays/openshift")
    for key in ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups"):
        assert key not in text


def test_kubernetes_pins_the_image_user_and_enforces_restricted():
    objs = objects("k8s/overlays/kubernetes")
    security = objs["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (1001, 0)  # the Dockerfile's USER 1001:0
    assert objs["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_read_only_caches_on_emptydir_keys_from_secret_settings_from_configmap(overlay):
    objs = objects(overlay)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = container(objs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = volumes[mounts["/app/models"]["name"]]
    assert mounts["/app/models"]["readOnly"] is True and models["persistentVolumeClaim"]["readOnly"] is True
    assert objs[f"PersistentVolumeClaim/{models['persistentVolumeClaim']['claimName']}"]
    assert settings(objs)["MODEL_PATH"].startswith("/app/models")
    # The image's one writable path (HF_HOME, torch, Triton caches, HOME) and /tmp: the root filesystem is read-only.
    assert "emptyDir" in volumes[mounts["/app/state"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (api_key,) = [e for e in c["env"] if e["name"] == "API_KEY"]
    assert api_key["valueFrom"]["secretKeyRef"]["key"] == "API_KEY"
    assert [s["configMapRef"]["name"] for s in c["envFrom"]] == [objs["ConfigMap"]["metadata"]["name"]]
    assert "API_KEY" not in settings(objs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_pinned_to_a_tag(overlay):
    image = container(objects(overlay))["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" in name and tag and tag != "latest", image


@pytest.mark.parametrize("overlay", ["k8s/overlays/kubernetes", "k8s/overlays/openshift"])
def test_one_pod_per_gpu_spread_over_nodes_with_a_disruption_budget(overlay):
    objs = objects(overlay)
    spec = objs["Deployment"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 1  # the number of GPUs: each pod takes exactly one (checked above)
    (spread,) = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # several GPU pods may share a node
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = objs["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"]["matchLabels"].items() <= labels.items()
    service = objs["Service"]["spec"]
    assert service["type"] == "ClusterIP" and service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] in {p["name"] for p in container(objs)["ports"]}


def test_openshift_route_is_tls_edge_with_a_timeout_above_the_longest_request():
    objs = objects("k8s/overlays/openshift")
    route = objs["Route"]
    assert route["spec"]["tls"]["termination"] == "edge"
    assert route["spec"]["to"] == {"kind": "Service", "name": objs["Service"]["metadata"]["name"], "weight": 100}
    assert route["spec"]["port"]["targetPort"] == objs["Service"]["spec"]["ports"][0]["name"]
    timeout = route["metadata"]["annotations"]["haproxy.router.openshift.io/timeout"]
    assert seconds(timeout) > longest_request(objs)


def test_kubernetes_ingress_timeouts_above_the_longest_request():
    objs = objects("k8s/overlays/kubernetes")
    notes = objs["Ingress"]["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > longest_request(objs)


def test_hpa_example_scales_on_the_queue_depth_the_server_exports():
    objs = objects("k8s/examples/queue-autoscaling")
    hpa = objs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "image-server"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert f"\n{name} " in Metrics().render().decode()  # a per-pod gauge of the real server
    assert "replicas" not in objs["Deployment"]["spec"]  # the HPA owns the count
    rules = yaml.safe_load((ROOT / "k8s/examples/queue-autoscaling/prometheus-adapter.yaml").read_text())
    assert [r["name"]["as"] for r in rules["rules"]] == [name]
    (endpoint,) = objs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def strict(schema: dict) -> dict:
    """A CRD's OpenAPI schema as `kubectl apply --validate=strict` reads it: a field the schema does not name is an
    error, not silently pruned, except where the schema keeps unknown fields."""
    schema = copy.deepcopy(schema)
    nodes = [schema]
    while nodes:
        node = nodes.pop()
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        nodes += list(node.get("properties", {}).values())
        nodes += [child for child in (node.get("items"), node.get("additionalProperties")) if isinstance(child, dict)]
    return schema


def keda_errors(scaled_object: dict) -> list[str]:
    crd = next(d for d in yaml.safe_load_all(KEDA_CRD.read_text()) if d)
    group, version = scaled_object["apiVersion"].split("/")
    assert (group, scaled_object["kind"]) == (crd["spec"]["group"], crd["spec"]["names"]["kind"])
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    validator = jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(scaled_object)]


def test_keda_example_is_a_valid_scaled_object_on_the_waiting_requests_the_server_exports():
    objs = objects("k8s/examples/keda-autoscaling")
    scaled = objs["ScaledObject"]
    assert keda_errors(scaled) == []
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "image-server"}
    assert "replicas" not in objs["Deployment"]["spec"]  # KEDA's HPA owns the count
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    name = re.fullmatch(r"sum\((\w+)\{namespace=\"image-server\"\}\)", trigger["metadata"]["query"])[1]
    assert f"\n{name} " in Metrics().render().decode()  # a per-pod gauge of the real server
    assert float(trigger["metadata"]["threshold"]) > 0


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=4), "is not of type 'string'"),
        (lambda s: s["spec"].update(maxReplicas=8), "Additional properties are not allowed"),
        (lambda s: s["spec"]["triggers"][0].pop("type"), "'type' is a required property"),
    ],
    ids=["number-threshold", "hpa-field-name", "no-trigger-type"],
)
def test_the_keda_schema_check_catches_what_keda_would_refuse(change, error):
    scaled = copy.deepcopy(objects("k8s/examples/keda-autoscaling")["ScaledObject"])
    change(scaled)
    assert any(error in e for e in keda_errors(scaled))
