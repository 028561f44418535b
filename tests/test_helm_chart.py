"""helm/halfstep rendered by Helm's own Go engine (helm-python-sdk), linted, and every built-in
object validated against the Kubernetes OpenAPI schemas (kubernetes-validate). CRD objects
(ServiceMonitor, ScaledObject, InferenceService) are not in those schemas: their structure is
checked here against the required fields of their CRDs, and the InferenceService predictor's pod
fields against the Kubernetes PodSpec schema."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (the dev extra)")
kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the dev extra)")
yaml = pytest.importorskip("yaml", reason="needs pyyaml (the dev extra)")
jsonschema = pytest.importorskip("jsonschema", reason="comes with kubernetes-validate")

CHART = Path(__file__).resolve().parents[1] / "helm" / "halfstep"
K8S_VERSION = kv.latest_version()
RELEASE, NAMESPACE, FULLNAME = "demo", "ml", "demo-halfstep"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu_off": {"gpu": {"enabled": False}},
    "hpa_queue_depth": {"autoscaling": {"enabled": True}},
    "hpa_cpu": {"autoscaling": {"enabled": True, "metric": "cpu"}},
    "keda": {"keda": {"enabled": True}},
    "service_monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "pvc_model": {"model": {"source": "pvc", "pvc": {"claimName": "bundles"},
                            "bundlePath": "mnist-v2"}},
    "image_model": {"model": {"source": "image",
                              "image": {"repository": "registry.example.com/mnist", "tag": "7"}}},
    "api_key_value": {"server": {"apiKey": {"value": "s3cret"}}},
    "min_available": {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": "50%"}},
    "kserve": {"kserve": {"enabled": True, "maxReplicas": 3, "timeoutS": 60},
               "server": {"apiKey": {"value": "s3cret"}}},
    "kserve_serverless": {"kserve": {"enabled": True, "deploymentMode": "Serverless"},
                          "model": {"source": "pvc", "pvc": {"claimName": "bundles"}}},
    "grafana_dashboard": {"grafana": {"dashboard": {
        "enabled": True, "annotations": {"grafana_folder": "halfstep"}}}},
}

# Required structure from the CRDs (keda.sh ScaledObject v1alpha1; monitoring.coreos.com
# ServiceMonitor v1). KEDA trigger metadata is map[string]string: a number there is refused.
_DURATION = r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_TARGET = {"type": "object", "required": ["name"],
           "properties": {"name": {"type": "string"}, "kind": {"type": "string"}}}
# serving.kserve.io/v1beta1 InferenceService: the predictor is a PodSpec inline plus the
# component extension fields below (checked as a PodSpec separately, see predictor_pod).
KSERVE_EXTENSION = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "timeout": {"type": "integer", "minimum": 1},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): {
        "type": "object", "required": ["metadata", "spec"], "properties": {
            "metadata": {**_META, "properties": {
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                         "maxLength": 63},
                "annotations": {"type": "object", "properties": {
                    "serving.kserve.io/deploymentMode": {
                        "enum": ["RawDeployment", "Serverless"]}}}}},
            "spec": {"type": "object", "required": ["predictor"], "additionalProperties": False,
                     "properties": {"predictor": {
                         "type": "object", "required": ["containers"],
                         "properties": {**KSERVE_EXTENSION, "containers": {
                             "type": "array", "minItems": 1,
                             "contains": {"properties": {"name": {
                                 "const": "kserve-container"}}}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["metadata", "spec"], "properties": {
            "metadata": _META,
            "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"],
                     "additionalProperties": False, "properties": {
                "scaleTargetRef": _TARGET,
                "minReplicaCount": {"type": "integer"}, "maxReplicaCount": {"type": "integer"},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "properties": {
                        "type": {"type": "string"},
                        "metadata": {"type": "object",
                                     "additionalProperties": {"type": "string"}}}}}}}}},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["metadata", "spec"], "properties": {
            "metadata": _META,
            "spec": {"type": "object", "required": ["selector", "endpoints"], "properties": {
                "selector": {"type": "object"},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION}}}}}}}},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in server(docs)["env"]}


def predictor_pod(isvc: dict[str, Any]) -> dict[str, Any]:
    """The InferenceService predictor's inline PodSpec fields as a v1 Pod, for the Kubernetes
    schema (the component extension fields are KServe's own)."""
    spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in KSERVE_EXTENSION}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": spec}


def test_kubernetes_schemas_are_current() -> None:
    assert tuple(int(p) for p in K8S_VERSION.split(".")[:2]) >= (1, 30)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is INFO (for example "icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates(rendered, name: str) -> None:
    docs = rendered[name]
    assert docs
    for doc in docs:
        crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd_schema is not None:
            jsonschema.validate(doc, crd_schema)
            if doc["kind"] == "InferenceService":
                kv.validate(predictor_pod(doc), K8S_VERSION, strict=True)
        else:  # SchemaNotFoundError here would mean a kind unknown to Kubernetes
            kv.validate(doc, K8S_VERSION, strict=True)


def test_defaults_request_a_gpu_and_tolerate_its_taint(rendered) -> None:
    docs = rendered["defaults"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert server(docs)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server(docs)["resources"]["limits"]["memory"] == "4Gi"  # user limits kept
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    assert server(docs)["image"] == "halfstep:0.1.0"
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "ServiceAccount",
                                         "PodDisruptionBudget"}


def test_gpu_off_drops_gpu_limit_and_toleration(rendered) -> None:
    docs = rendered["gpu_off"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in server(docs)["resources"].get("limits", {})
    assert "tolerations" not in pod
    assert server(docs)["image"] == "halfstep:0.1.0-cpu"


def test_probes(rendered) -> None:
    c = server(rendered["defaults"])
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The startup budget must cover engine build and graph capture: minutes, not seconds.
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 300
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]


def test_pod_runs_non_root_with_read_only_root(rendered) -> None:
    docs = rendered["defaults"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs writable scratch: /tmp and the cache dir are emptyDirs.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", env(docs)["XDG_CACHE_HOME"]):
        assert "emptyDir" in volumes[mounts[path]]


SERVER_OPTS = {"host": "::", "port": 9000, "backend": "onnxruntime", "maxBatch": 32,
               "maxWaitMs": 2.5, "maxWaitFraction": 0.25, "maxQueue": 1000, "timeoutS": 12,
               "drainS": 45, "maxBodyBytes": 4096, "maxBacklogS": 2.5, "maxTeacherSteps": 32,
               "teacher": "off", "maxRequestS": 7.5, "watchdogFactor": 20, "authMetrics": True}


def test_every_server_option_maps_to_env() -> None:
    docs = render({"server": SERVER_OPTS, "gpu": {"enabled": False}})
    e = env(docs)
    assert {k: v for k, v in e.items() if k.startswith("HALFSTEP_")} == {
        "HALFSTEP_HOST": "::", "HALFSTEP_PORT": "9000", "HALFSTEP_BACKEND": "onnxruntime",
        "HALFSTEP_MAX_BATCH": "32", "HALFSTEP_MAX_WAIT_MS": "2.5",
        "HALFSTEP_MAX_WAIT_FRACTION": "0.25", "HALFSTEP_MAX_QUEUE": "1000",
        "HALFSTEP_TIMEOUT_S": "12", "HALFSTEP_DRAIN_S": "45", "HALFSTEP_MAX_BODY_BYTES": "4096",
        "HALFSTEP_MAX_BACKLOG_S": "2.5", "HALFSTEP_MAX_TEACHER_STEPS": "32",
        "HALFSTEP_TEACHER": "off", "HALFSTEP_MAX_REQUEST_S": "7.5",
        "HALFSTEP_WATCHDOG_FACTOR": "20", "HALFSTEP_AUTH_METRICS": "true"}
    assert server(docs)["ports"][0]["containerPort"] == 9000
    assert "HALFSTEP_BUNDLE" not in e  # the embedded bundle needs none


def test_defaults_bind_every_interface(rendered) -> None:
    """`halfstep serve` binds loopback unless told otherwise; a pod must be reachable."""
    assert env(rendered["defaults"])["HALFSTEP_HOST"] == "0.0.0.0"


def test_server_reads_the_env_the_chart_sets() -> None:
    """The chart's HALFSTEP_* variables, parsed by the server's own settings loader."""
    settings = pytest.importorskip("halfstep.server.settings", reason="server not written yet")
    docs = render({"server": SERVER_OPTS, "gpu": {"enabled": False},
                   "model": {"source": "pvc", "pvc": {"claimName": "b"}}})
    e = {k: v for k, v in env(docs).items() if k.startswith("HALFSTEP_")}
    fields = {f.name for f in dataclasses.fields(settings.Settings)}
    assert {k.removeprefix("HALFSTEP_").lower() for k in e} <= fields
    s = settings.Settings.from_env(e)
    assert (s.host, s.port, s.backend, s.max_batch, s.max_wait_ms, s.max_wait_fraction,
            s.max_queue, s.timeout_s, s.drain_s, s.max_body_bytes, s.bundle) == (
        "::", 9000, "onnxruntime", 32, 2.5, 0.25, 1000, 12, 45, 4096, "/models")
    assert (s.max_backlog_s, s.max_teacher_steps, s.teacher, s.max_request_s,
            s.watchdog_factor, s.auth_metrics) == (2.5, 32, "off", 7.5, 20, True)
    d = settings.Settings.from_env(
        {k: v for k, v in env(render({})).items() if k.startswith("HALFSTEP_")})
    defaults = settings.Settings()
    assert (d.max_backlog_s, d.max_teacher_steps, d.teacher, d.max_request_s,
            d.watchdog_factor, d.auth_metrics) == (
        defaults.max_backlog_s, defaults.max_teacher_steps, defaults.teacher,
        defaults.max_request_s, defaults.watchdog_factor, defaults.auth_metrics)
    from halfstep.engines.names import BACKENDS

    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
    assert tuple(schema["properties"]["server"]["properties"]["backend"]["enum"]) == BACKENDS


@pytest.mark.parametrize("drain", [0, 20, 100.5])
def test_termination_grace_exceeds_drain(drain: float) -> None:
    docs = render({"server": {"drainS": drain}})
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = int(server(docs)["lifecycle"]["preStop"]["exec"]["command"][1])
    assert grace > sleep + drain and grace >= drain + 5
    no_sleep = render({"server": {"drainS": drain, "preStopSleepS": 0,
                                  "terminationGraceMarginS": 5}})
    spec = one(no_sleep, "Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= drain + 5


def test_api_key_comes_from_a_secret(rendered) -> None:
    docs = rendered["api_key_value"]
    secret = one(docs, "Secret")
    ref = env(docs)["HALFSTEP_API_KEY"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert secret["data"]["api-key"] == "czNjcmV0"  # base64("s3cret")
    existing = render({"server": {"apiKey": {"existingSecret": "auth", "secretKey": "token"}}})
    assert env(existing)["HALFSTEP_API_KEY"]["secretKeyRef"] == {"name": "auth", "key": "token"}
    assert not [d for d in existing if d["kind"] == "Secret"]
    assert "HALFSTEP_API_KEY" not in env(rendered["defaults"])


def test_hpa_on_queue_depth_pods_metric(rendered) -> None:
    docs = rendered["hpa_queue_depth"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": FULLNAME}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "halfstep_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert "replicas" not in one(docs, "Deployment")["spec"]  # the HPA owns the count


def test_hpa_on_cpu(rendered) -> None:
    (metric,) = one(rendered["hpa_cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == 70


def test_keda_scaled_object(rendered) -> None:
    docs = rendered["keda"]
    so = one(docs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert query == f'sum(halfstep_queue_depth{{namespace="{NAMESPACE}",service="{FULLNAME}"}})'
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_service_monitor_scrapes_the_service(rendered) -> None:
    docs = rendered["service_monitor"]
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "prom"
    labels = svc["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_service_selects_the_pods(rendered) -> None:
    docs = rendered["defaults"]
    svc, dep = one(docs, "Service"), one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in server(docs)["ports"]}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1,
                           "selector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}
    assert one(rendered["min_available"], "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"


def test_pvc_model_source(rendered) -> None:
    docs = rendered["pvc_model"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert env(docs)["HALFSTEP_BUNDLE"] == "/models/mnist-v2"
    (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert vol["persistentVolumeClaim"] == {"claimName": "bundles", "readOnly": True}
    (mount,) = [m for m in server(docs)["volumeMounts"] if m["name"] == vol["name"]]
    assert mount == {"name": vol["name"], "mountPath": "/models", "readOnly": True}
    assert "initContainers" not in pod


def test_several_bundles_become_halfstep_bundles() -> None:
    docs = render({"model": {"source": "pvc", "pvc": {"claimName": "bundles"},
                             "bundles": [{"name": "mnist", "path": "mnist-v2"},
                                         {"name": "fashion", "path": "fashion"}]}})
    e = env(docs)
    assert e["HALFSTEP_BUNDLES"] == "mnist=/models/mnist-v2,fashion=/models/fashion"
    assert "HALFSTEP_BUNDLE" not in e
    with pytest.raises(helm.HelmValuesError, match="bundles"):
        render({"model": {"bundles": [{"name": "bad name", "path": "x"}]}})


def test_image_model_source_copies_with_an_init_container(rendered) -> None:
    docs = rendered["image_model"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "registry.example.com/mnist:7"
    assert init["command"] == ["cp", "-R", "/bundle/.", "/models"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    shared = {m["name"] for m in init["volumeMounts"]} & {
        m["name"] for m in server(docs)["volumeMounts"]}
    assert shared and all("emptyDir" in v for v in pod["volumes"] if v["name"] in shared)
    assert env(docs)["HALFSTEP_BUNDLE"] == "/models"


@pytest.mark.parametrize("values, where", [
    ({"replicaCount": -1}, "/replicaCount"),
    ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
    ({"gpu": {"enable": True}}, "'enable' not allowed"),
    ({"server": {"backend": "cuda"}}, "/server/backend"),
    ({"server": {"port": 70000}}, "/server/port"),
    ({"server": {"maxBatch": 0}}, "/server/maxBatch"),
    ({"model": {"source": "s3"}}, "/model/source"),
    ({"model": {"source": "pvc"}}, "/model/pvc/claimName"),
    ({"model": {"source": "image"}}, "/model/image"),
    ({"model": {"bundlePath": "/abs"}}, "/model/bundlePath"),
    ({"serviceMonitor": {"interval": "15 seconds"}}, "/serviceMonitor/interval"),
    ({"autoscaling": {"metric": "gpu"}}, "/autoscaling/metric"),
    ({"server": {"terminationGraceMarginS": 4}}, "/server/terminationGraceMarginS"),
    ({"server": {"teacher": "no"}}, "/server/teacher"),
    ({"server": {"maxTeacherSteps": 0}}, "/server/maxTeacherSteps"),
    ({"server": {"authMetrics": "yes"}}, "/server/authMetrics"),
])
def test_schema_rejects_wrong_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(values)


@pytest.mark.parametrize("values, message", [
    ({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "enable one of them"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
    ({"gpu": {"enabled": False}, "server": {"backend": "tensorrt"}}, "needs a GPU"),
    ({"podDisruptionBudget": {"maxUnavailable": None}}, "minAvailable or maxUnavailable"),
])
def test_contradictory_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def _leaf_paths(tree: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict) and value:
            paths |= _leaf_paths(value, path + ".")
    return paths


def test_readme_documents_the_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = _leaf_paths(values)
    rows = re.findall(r"^\| (`[^|]+`) \|", (CHART / "README.md").read_text(), re.MULTILINE)
    documented = {k for row in rows for k in re.findall(r"`([^`]+)`", row)}
    assert documented - known == set(), "README names values that do not exist"
    tops = {k.split(".")[0] for k in documented}
    assert set(values) - tops == set(), "top-level values missing from the README table"


def test_kserve_replaces_deployment_and_service(rendered) -> None:
    docs = rendered["kserve"]
    assert {d["kind"] for d in docs} == {"InferenceService", "ServiceAccount",
                                         "PodDisruptionBudget", "Secret"}
    isvc = one(docs, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["timeout"]) == (1, 3, 60)
    # the PodDisruptionBudget still selects the predictor pods through their labels
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= predictor["labels"].items()


def test_kserve_predictor_runs_the_same_server(rendered) -> None:
    plain = render({"server": {"apiKey": {"value": "s3cret"}}})
    deployed = one(plain, "Deployment")["spec"]["template"]["spec"]
    predictor = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    (c,) = predictor["containers"]
    d = deployed["containers"][0]
    assert c["name"] == "kserve-container"
    for key in ("image", "env", "resources", "securityContext", "volumeMounts", "lifecycle"):
        assert c[key] == d[key], key
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": d[probe]["httpGet"]["path"], "port": 8000}
    assert c["ports"] == [{"name": "http1", "containerPort": 8000, "protocol": "TCP"}]
    for key in ("volumes", "tolerations", "securityContext", "terminationGracePeriodSeconds",
                "serviceAccountName", "automountServiceAccountToken"):
        assert predictor[key] == deployed[key], key


def test_kserve_serverless_leaves_out_what_knative_refuses(rendered) -> None:
    isvc = one(rendered["kserve_serverless"], "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    (c,) = isvc["spec"]["predictor"]["containers"]
    assert "startupProbe" not in c and "lifecycle" not in c
    assert "readinessProbe" in c and "livenessProbe" in c
    assert {"name": "HALFSTEP_BUNDLE", "value": "/models"} in c["env"]


@pytest.mark.parametrize("values, message", [
    ({"autoscaling": {"enabled": True}}, "KServe scales the predictor"),
    ({"keda": {"enabled": True}}, "KServe scales the predictor"),
    ({"serviceMonitor": {"enabled": True}}, "no Service under KServe"),
    ({"kserve": {"minReplicas": 3, "maxReplicas": 2}}, "kserve.minReplicas"),
])
def test_kserve_contradictions_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    merged = {**values, "kserve": {"enabled": True, **values.get("kserve", {})}}
    with pytest.raises(helm.HelmRenderError, match=message):
        render(merged)


def test_schema_rejects_wrong_kserve_values() -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape("/kserve/deploymentMode")):
        render({"kserve": {"enabled": True, "deploymentMode": "Knative"}})


def dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    import json

    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(cm["data"]["halfstep.json"])


def test_grafana_dashboard_config_map(rendered) -> None:
    docs = rendered["grafana_dashboard"]
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["annotations"] == {"grafana_folder": "halfstep"}
    board = dashboard(docs)
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("lane", "p99", "batch size", "queue depth", "backlog", "busy", "rejection",
                  "reload"):
        assert topic in titles, topic
    assert not [d for d in rendered["defaults"] if d["kind"] == "ConfigMap"]


def test_dashboard_queries_only_metrics_the_server_exports(rendered, tiny_bundle_dir) -> None:
    """Every halfstep_* series a panel queries exists in a live /metrics after one request."""
    import httpx

    from .test_server_support import make_app, serving

    exprs = [t["expr"] for p in dashboard(rendered["grafana_dashboard"])["panels"]
             for t in p["targets"]]
    queried = {name for e in exprs for name in re.findall(r"\bhalfstep_[a-z_]+", e)}
    assert len(queried) >= 8
    app, _ = make_app(tiny_bundle_dir)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        assert h.post("/generate", params={"steps": 1, "seed": 1}).status_code == 200
        text = h.get("/metrics").text
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    families = {line.split()[2]: line.split()[3] for line in text.splitlines()
                if line.startswith("# TYPE ")}
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",),
                "gauge": ("",)}
    declared = {name + suffix for name, kind in families.items()
                for suffix in suffixes.get(kind, ("",))}
    assert queried - (samples | declared) == set()
