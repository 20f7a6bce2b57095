"""The Helm chart (charts/kubequant), rendered by Helm's own engine through helm-python-sdk.

Each values variant is rendered once and then linted (strict, Kubernetes 1.33), validated object by
object with kubernetes-validate (strict, 1.33; the Prometheus Operator kinds against schemas of
their required fields here), checked for the operator's security and RBAC contract, scanned with
checkov (every skip listed with its justification in charts/kubequant/.checkov.yaml), and its
alerting rules checked and unit-tested with promtool.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev dependency")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubequant"
CRDS = ROOT / "crds"
RELEASE, NAMESPACE = "kq", "kubequant"
KUBE_VERSION = "1.33.0"
FULLNAME = f"{RELEASE}-kubequant"

ALL_ON = yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())
VARIANTS: dict[str, dict] = {
    "default": {},
    "all-on": ALL_ON,
    # Namespaced with several watched namespaces, and no cluster-scoped object at all.
    "namespaced-multi": {
        "operator": {"watchNamespaces": ["llm-a", "llm-b"]},
        "rbac": {"discovery": False},
    },
}
NAMESPACED_KINDS = {"Deployment", "ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap",
                    "ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
CLUSTER_KINDS = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ValidatingAdmissionPolicy",
                 "ValidatingAdmissionPolicyBinding"}


# ---- rendering ----------------------------------------------------------------------------------

@functools.cache
def _chart():
    return helm.Chart.load(str(CHART))


def _render(values: dict) -> dict[str, str]:
    return _chart().render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def _parse(rendered: dict[str, str]) -> tuple[dict, ...]:
    """Every object Helm would install: the CRDs from crds/, then the rendered templates."""
    docs = [yaml.safe_load(crd["data"]) for crd in _chart().crds]
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return tuple(docs)


@functools.cache
def _rendered(variant: str) -> dict[str, str]:
    return _render(VARIANTS[variant])


@functools.cache
def _objects(variant: str) -> tuple[dict, ...]:
    return _parse(_rendered(variant))


def _of_kind(variant: str, kind: str) -> list[dict]:
    return [o for o in _objects(variant) if o["kind"] == kind]


def _one(variant: str, kind: str) -> dict:
    (obj,) = _of_kind(variant, kind)
    return obj


def _container(variant: str) -> dict:
    (container,) = _one(variant, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _render_error(values: dict) -> str:
    with pytest.raises(helm.HelmError) as info:
        _chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(info.value)


# ---- the CRDs: one source of truth -------------------------------------------------------------

def test_chart_crds_are_the_top_level_crds():
    link = CHART / "crds"
    assert link.is_symlink(), "charts/kubequant/crds must stay a symlink to the top-level crds/"
    assert os.readlink(link) == "../../crds"
    assert link.resolve() == CRDS.resolve()
    loaded = {Path(c["name"]).name: c["data"] for c in _chart().crds}
    on_disk = {p.name: p.read_text() for p in CRDS.iterdir() if p.suffix in (".yaml", ".yml", ".json")}
    assert loaded == on_disk, "Helm must load exactly the files of crds/, byte for byte"
    for name, text in loaded.items():
        docs = [d for d in yaml.safe_load_all(text) if d]
        assert docs and all(d["kind"] == "CustomResourceDefinition" for d in docs), \
            f"crds/{name}: Helm installs every file under crds/ as is; keep only CRDs there"


def test_packaged_chart_contains_the_crds(tmp_path):
    archive = helm.package(str(CHART), destination=str(tmp_path))
    with helm.Chart.load(archive) as packaged:
        assert {Path(c["name"]).name for c in packaged.crds} == {p.name for p in CRDS.glob("*.yaml")}
        names = {f["name"] for f in packaged.files}
        assert not any(n.startswith("ci/") for n in names) and ".checkov.yaml" not in names


# ---- metadata, lint, schema ---------------------------------------------------------------------

def test_chart_metadata():
    meta = _chart().metadata
    assert meta["apiVersion"] == "v2"
    assert (meta["name"], meta["version"], meta["appVersion"]) == ("kubequant", "0.1.0", "0.1.0")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lint_strict(variant):
    report = helm.lint(str(CHART), copy.deepcopy(VARIANTS[variant]) or None, strict=True,
                       namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_values_schema_is_valid_and_documents_every_key():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    for values in VARIANTS.values():  # as Helm merges them over the defaults
        jsonschema.Draft7Validator(schema).validate(_chart().merge_values(copy.deepcopy(values)))

    def walk(node: dict, path: str):
        for key, sub in (node.get("properties") or {}).items():
            if "$ref" not in sub and "allOf" not in sub:
                assert sub.get("description") or sub.get("properties") is not None \
                    or sub.get("pattern"), f"{path}.{key} has no description"
                walk(sub, f"{path}.{key}")
    walk(schema, "values")


@pytest.mark.parametrize(("values", "where"), [
    ({"image": {"tag": "latest"}}, "/image/tag"),
    ({"images": {"quantizer": {"tag": "latest"}}}, "/images/quantizer/tag"),
    ({"images": {"evaluator": {"digest": "sha256:abc"}}}, "/images/evaluator/digest"),
    ({"imagee": {}}, "imagee"),
    ({"rbac": {"clusterwide": True}}, "clusterwide"),
    ({"operator": {"healthPort": 80}}, "/operator/healthPort"),
    ({"replicaCount": 2}, "/replicaCount"),
    ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "/operator/watchNamespaces/0"),
    ({"prometheusRule": {"notReadyFor": "6 hours"}}, "/prometheusRule/notReadyFor"),
    ({"metrics": {"service": {"type": "ExternalName"}}}, "/metrics/service/type"),
])
def test_values_schema_rejects(values, where):
    assert where in _render_error(values)


def test_ports_must_differ():
    assert "must differ" in _render_error({"operator": {"healthPort": 8080}})


# ---- every object is valid Kubernetes 1.33 ------------------------------------------------------

SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object", "minProperties": 1}}},
                "namespaceSelector": {"type": "object", "properties": {
                    "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}},
            },
        },
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": {"type": "string"},
                               "rules": {"type": "array", "minItems": 1, "items": {
                                   "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                                   "properties": {
                                       "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                       "expr": {"type": "string", "minLength": 1},
                                       "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                       "annotations": {"type": "object",
                                                       "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}
CUSTOM_RESOURCE_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_validates_against_kubernetes_1_33(variant):
    kinds = set()
    for obj in _objects(variant):
        kinds.add(obj["kind"])
        if obj["kind"] in CUSTOM_RESOURCE_SCHEMAS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            jsonschema.validate(obj, CUSTOM_RESOURCE_SCHEMAS[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Service"} <= kinds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_object_names_namespaces_and_labels(variant):
    seen = set()
    for obj in _objects(variant):
        meta, kind = obj["metadata"], obj["kind"]
        key = (kind, meta.get("namespace"), meta["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        if kind in CLUSTER_KINDS:
            assert "namespace" not in meta
        else:
            assert kind in NAMESPACED_KINDS, f"unexpected kind {kind}"
            assert meta.get("namespace"), f"{kind}/{meta['name']} has no namespace"
        if kind != "CustomResourceDefinition":
            assert meta["labels"]["app.kubernetes.io/part-of"] == "kubequant"
            assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_common_annotations_reach_every_object():
    for obj in _objects("all-on"):
        if obj["kind"] != "CustomResourceDefinition":
            assert obj["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "1", obj["kind"]
            assert obj["metadata"]["labels"]["team"] == "ml-platform"


# ---- the operator Deployment --------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_operator_runs_hardened(variant):
    pod = _one(variant, "Deployment")["spec"]["template"]["spec"]
    container = _container(variant)
    psc, csc = pod["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["privileged"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The token is mounted explicitly, read-only, where the Kubernetes clients look for it.
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert [next(iter(s)) for s in sources] == ["serviceAccountToken", "configMap", "downwardAPI"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"]["readOnly"] is True
    assert mounts["/tmp"]["name"] == "tmp"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_operator_probes_use_kopf_liveness_endpoint(variant):
    container = _container(variant)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--health-port={ports['health']}" in container["args"]
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_arguments_follow_rbac_scope():
    args = {v: _container(v)["args"] for v in VARIANTS}
    assert args["default"] == ["operator", f"--namespace={NAMESPACE}", "--metrics-port=8080", "--health-port=8081",
                               "--resync-seconds=60"]
    assert "--all-namespaces" in args["all-on"] and not any(a.startswith("--namespace") for a in args["all-on"])
    assert [a for a in args["namespaced-multi"] if a.startswith("--namespace")] == \
        ["--namespace=llm-a", "--namespace=llm-b"]
    assert args["all-on"][-1] == "--verbose"
    for variant in VARIANTS:
        deployment = _one(variant, "Deployment")
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_operator_cli_accepts_the_arguments(variant):
    """The chart's arguments parse with the real `kubequant` command line, ports and scope included."""
    try:
        from kubequant.cli import build_parser
    except ImportError as exc:
        pytest.skip(f"kubequant.cli is not importable yet: {exc}")
    container = _container(variant)
    parsed = build_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert parsed.command == "operator"
    assert (parsed.metrics_port, parsed.health_port) == (ports["metrics"], ports["health"])
    if variant == "all-on":
        assert parsed.all_namespaces and parsed.verbose
    else:
        assert parsed.namespace == VARIANTS[variant].get("operator", {}).get("watchNamespaces", [NAMESPACE])


def test_images_are_pinned_and_passed_to_the_operator():
    version = _chart().metadata["appVersion"]
    container = _container("default")
    assert container["image"] == f"ghcr.io/kubequant/kubequant-operator:{version}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEQUANT_QUANTIZER_IMAGE"] == f"ghcr.io/kubequant/kubequant-quantizer:{version}"
    assert env["KUBEQUANT_EVALUATOR_IMAGE"] == f"ghcr.io/kubequant/kubequant-evaluator:{version}"
    assert env["KUBEQUANT_VLLM_IMAGE"] == "vllm/vllm-openai:v0.32.0"
    on = {e["name"]: e.get("value") for e in _container("all-on")["env"]}
    assert _container("all-on")["image"].startswith("ghcr.io/kubequant/kubequant-operator@sha256:")
    assert on["KUBEQUANT_QUANTIZER_IMAGE"].startswith("ghcr.io/kubequant/kubequant-quantizer@sha256:")
    assert on["KUBEQUANT_LOG_FORMAT"] == "json"
    for variant in VARIANTS:
        for value in [_container(variant)["image"], *(e.get("value", "") for e in _container(variant)["env"])]:
            assert not value.endswith(":latest")


def test_metrics_service_selects_the_operator():
    service = _one("default", "Service")
    pod_labels = _one("default", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["name"] == f"{FULLNAME}-metrics"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in _container("all-on")["ports"]
    monitor = _one("all-on", "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not _of_kind("default", "ServiceMonitor")
    policy = _one("all-on", "NetworkPolicy")
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["metrics"]
    assert policy["spec"]["ingress"][0]["from"] == ALL_ON["networkPolicy"]["metricsFrom"]


def test_the_network_policy_is_on_by_default_and_closes_everything_else():
    policy = _one("default", "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        _one("default", "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    api, dns = policy["spec"]["egress"]
    assert [p["port"] for p in api["ports"]] == [443, 6443] and "to" not in api
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    def policies(values: dict) -> list[dict]:
        return [o for o in _parse(_render(values)) if o["kind"] == "NetworkPolicy"]

    (pinned,) = policies({"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1/32"]}}})
    assert pinned["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert policies({"networkPolicy": {"enabled": False}}) == []


# ---- RBAC: least privilege ----------------------------------------------------------------------

WATCHED_CHILD = {"get", "list", "watch", "create", "patch", "delete"}
CHILD = {"get", "create", "patch", "delete"}
EXPECTED_RULES = {
    ("kubequant.io", "quantizedmodels"): {"get", "list", "watch", "patch"},
    ("kubequant.io", "quantizedmodels/status"): {"get", "patch"},
    ("kubequant.io", "quantizedmodels/finalizers"): {"update"},
    ("batch", "jobs"): WATCHED_CHILD,
    ("apps", "deployments"): WATCHED_CHILD,
    ("", "services"): CHILD,
    ("", "persistentvolumeclaims"): CHILD,
    ("policy", "poddisruptionbudgets"): CHILD,
    ("monitoring.coreos.com", "servicemonitors"): CHILD,
    ("leaderworkerset.x-k8s.io", "leaderworkersets"): WATCHED_CHILD,
    ("autoscaling", "horizontalpodautoscalers"): CHILD,
    ("inference.networking.k8s.io", "inferencepools"): CHILD,
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create"},
}
KOPF_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
                  ("", "namespaces"): {"list", "watch"}}


def _grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rbac_has_no_wildcards_and_no_secrets(variant):
    for role in _of_kind(variant, "Role") + _of_kind(variant, "ClusterRole"):
        for (group, resource), verbs in _grants(role).items():
            assert "*" not in group and "*" not in resource and "*" not in verbs
            assert resource not in ("secrets", "configmaps", "nodes", "serviceaccounts/token")
            assert not verbs & {"escalate", "bind", "impersonate", "deletecollection"}


def test_rbac_default_is_namespaced():
    role = _one("default", "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _grants(role) == EXPECTED_RULES
    binding = _one("default", "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # The only cluster-scoped grant: kopf's read-only discovery.
    (discovery,) = _of_kind("default", "ClusterRole")
    assert _grants(discovery) == KOPF_DISCOVERY
    (cluster_binding,) = _of_kind("default", "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == discovery["metadata"]["name"]


def test_rbac_watch_namespaces_get_one_role_each():
    roles = _of_kind("namespaced-multi", "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llm-a", "llm-b"]
    for role in roles:
        assert _grants(role) == EXPECTED_RULES
    bindings = _of_kind("namespaced-multi", "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["llm-a", "llm-b"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)
    assert not _of_kind("namespaced-multi", "ClusterRole")
    assert not _of_kind("namespaced-multi", "ClusterRoleBinding")


def test_rbac_cluster_wide():
    assert not _of_kind("all-on", "Role") and not _of_kind("all-on", "RoleBinding")
    (role,) = _of_kind("all-on", "ClusterRole")
    assert _grants(role) == {**EXPECTED_RULES,
                             ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
    (binding,) = _of_kind("all-on", "ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole" and binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role["metadata"]["name"] == f"{NAMESPACE}-{FULLNAME}"


def test_rbac_covers_what_the_operator_touches():
    """Read from the operator's code: the kinds it reads and writes (builders.KINDS, the table of its API
    layer), the kinds its builders make, and
    the kinds kopf watches for it; each needs its verbs in the Role."""
    from kubequant import builders

    grants = _grants(_one("default", "Role"))
    resource = {kind: (api_version.rpartition("/")[0], plural) for kind, (api_version, plural) in builders.KINDS.items()}
    for kind, key in resource.items():
        needed = {"QuantizedModel": {"list", "watch", "patch"}, "Pod": {"list"}}.get(kind, CHILD)
        assert needed <= grants.get(key, set()), f"{kind}: the Role lacks {needed - grants.get(key, set())}"
    sources = ROOT / "operator" / "kubequant"
    built = {kind for module in (sources / "builders").glob("*.py")
             for kind in re.findall(r'"kind":\s*"([A-Za-z]+)"', module.read_text())}
    assert {"Job", "Service", "PersistentVolumeClaim"} <= built
    assert built <= resource.keys(), f"the builders make {built - resource.keys()}, unknown to the chart's RBAC"
    watched = re.findall(r'@kopf\.on\.\w+\("([^"]*)",\s*"[^"]*",\s*"([^"]+)"', (sources / "handlers.py").read_text())
    assert watched, "no kopf.on.* handlers found on literal resources in handlers.py"
    for group, plural in watched:
        assert {"list", "watch"} <= grants.get((group, plural), set()), f"kopf watches {group}/{plural}"


# ---- alerts -------------------------------------------------------------------------------------

def _rules(variant: str) -> dict[str, dict]:
    rule = _one(variant, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_prometheus_rule_covers_the_alerts():
    assert not _of_kind("default", "PrometheusRule")
    rules = _rules("all-on")
    assert set(rules) == {"KubequantOperatorDown", "KubequantReconcileErrors", "KubequantGateFailed",
                          "KubequantModelFailed", "KubequantModelNotReady", "KubequantJobFailed",
                          "VllmHighRequestLatency", "VllmHighTimeToFirstToken", "VllmRequestQueueDeep"}
    expressions = " ".join(r["expr"] for r in rules.values())
    for metric in ("kubequant_models", "kubequant_reconciles_total", "kube_job_failed",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:num_requests_waiting"):
        assert metric in expressions
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["labels"]["team"] == "ml-platform", name
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), name
    assert rules["KubequantModelNotReady"]["for"] == "4h"
    assert 'namespace=~"llm-.*"' in rules["VllmRequestQueueDeep"]["expr"]


def test_every_alert_has_a_runbook_entry():
    docs = (ROOT / "docs" / "install.md").read_text()
    assert "### Alerts" in docs  # the runbook_url anchor: docs/install.md#alerts
    for name, rule in _rules("all-on").items():
        assert f"| {name} |" in docs, f"docs/install.md#alerts does not explain {name}"
        assert rule["annotations"]["runbook_url"].endswith("/docs/install.md#alerts")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`: apt-get install -y prometheus)")
    return path


def _write_rules(tmp_path: Path, name: str, objects: tuple[dict, ...]) -> Path:
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    groups = rule["spec"]["groups"]
    path = tmp_path / f"{name}-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_promtool_check_rules(tmp_path):
    promtool = _promtool()
    rules = _write_rules(tmp_path, "all-on", _objects("all-on"))
    # The rules with the optional parts off: no vLLM selector, no ServiceMonitor, no kube-state-metrics.
    minimal = _write_rules(tmp_path, "minimal", _parse(_render({"prometheusRule": {"enabled": True, "kubeStateMetrics": False}})))
    result = subprocess.run([promtool, "check", "rules", str(rules), str(minimal)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout and "SUCCESS: 7 rules found" in result.stdout


ALERT_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                {"series": 'kubequant_models{job="kq-kubequant-metrics", namespace="kubequant", phase="GateFailed"}',
                 "values": "0 1x30"},
                {"series": 'kubequant_models{job="kq-kubequant-metrics", namespace="kubequant", phase="Failed"}',
                 "values": "0x30"},
                {"series": 'up{job="kq-kubequant-metrics", namespace="kubequant"}', "values": "1x5 0x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "KubequantGateFailed", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "KubequantGateFailed", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "team": "ml-platform"},
                    "exp_annotations": {
                        "summary": "A quantized model failed its quality gate",
                        "description": "1 QuantizedModel(s) are GateFailed: the quantized perplexity measured in "
                                       "vLLM exceeded the thresholds. The last artifact that passed keeps serving; "
                                       "kubectl get qm -A shows which.",
                        "runbook_url": "https://github.com/kubequant/kubequant/blob/main/docs/install.md#alerts"}}]},
                {"eval_time": "20m", "alertname": "KubequantModelFailed", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "KubequantOperatorDown", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "KubequantOperatorDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "team": "ml-platform"},
                    "exp_annotations": {
                        "summary": "The kubequant operator is down",
                        "description": "No kubequant operator in kubequant has answered a scrape for 10 minutes: "
                                       "QuantizedModels are not reconciled.",
                        "runbook_url": "https://github.com/kubequant/kubequant/blob/main/docs/install.md#alerts"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": 'kubequant_models{phase="Quantizing"}', "values": "1x330"},
            ],
            "alert_rule_test": [
                {"eval_time": "3h", "alertname": "KubequantModelNotReady", "exp_alerts": []},
                {"eval_time": "5h", "alertname": "KubequantModelNotReady", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "team": "ml-platform"},
                    "exp_annotations": {
                        "summary": "QuantizedModels have not been Ready for long",
                        "description": "1 QuantizedModel(s) have been Pending, Quantizing, Evaluating or Deploying "
                                       "for more than 4h.",
                        "runbook_url": "https://github.com/kubequant/kubequant/blob/main/docs/install.md#alerts"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": 'kube_job_failed{namespace="llm-a", job_name="llama-quantize-0f3a9c", condition="true"}',
                 "values": "0 1x10"},
                {"series": 'kube_job_failed{namespace="llm-a", job_name="nightly-backup", condition="true"}',
                 "values": "1x10"},
                # Every request takes between 10 s and 60 s: p95 = 10 + 50 * 0.95 = 57.5 s.
                {"series": 'vllm:e2e_request_latency_seconds_bucket{namespace="llm-a", model_name="llama", le="10"}',
                 "values": "0x20"},
                {"series": 'vllm:e2e_request_latency_seconds_bucket{namespace="llm-a", model_name="llama", le="60"}',
                 "values": "0+60x20"},
                {"series": 'vllm:e2e_request_latency_seconds_bucket{namespace="llm-a", model_name="llama", le="+Inf"}',
                 "values": "0+60x20"},
                {"series": 'vllm:num_requests_waiting{namespace="llm-a", model_name="llama", pod="a"}',
                 "values": "20x20"},
                {"series": 'vllm:num_requests_waiting{namespace="llm-a", model_name="llama", pod="b"}',
                 "values": "10x20"},
                # Outside the selector (namespace=~"llm-.*"): never alerts.
                {"series": 'vllm:num_requests_waiting{namespace="other", model_name="x"}', "values": "500x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "KubequantJobFailed", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "team": "ml-platform", "namespace": "llm-a",
                                   "job_name": "llama-quantize-0f3a9c"},
                    "exp_annotations": {
                        "summary": "A kubequant Job failed",
                        "description": "Job llm-a/llama-quantize-0f3a9c failed after its retries; kubectl describe "
                                       "job and the Pod's termination message tell why.",
                        "runbook_url": "https://github.com/kubequant/kubequant/blob/main/docs/install.md#alerts"}}]},
                {"eval_time": "15m", "alertname": "VllmHighRequestLatency", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "team": "ml-platform", "namespace": "llm-a",
                                   "model_name": "llama"},
                    "exp_annotations": {
                        "summary": "vLLM end-to-end latency is high",
                        "description": "The p95 end-to-end request latency of llama in llm-a is 57.5s "
                                       "(threshold 20s).",
                        "runbook_url": "https://github.com/kubequant/kubequant/blob/main/docs/install.md#alerts"}}]},
                {"eval_time": "3m", "alertname": "VllmRequestQueueDeep", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "VllmRequestQueueDeep", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "team": "ml-platform", "namespace": "llm-a",
                                   "model_name": "llama"},
                    "exp_annotations": {
                        "summary": "Requests are queueing in vLLM",
                        "description": "30 requests are waiting for llama in llm-a (threshold 25): add replicas "
                                       "or GPUs.",
                        "runbook_url": "https://github.com/kubequant/kubequant/blob/main/docs/install.md#alerts"}}]},
                {"eval_time": "15m", "alertname": "VllmHighTimeToFirstToken", "exp_alerts": []},
            ],
        },
    ],
}


def test_promtool_alert_unit_tests(tmp_path):
    promtool = _promtool()
    rules = _write_rules(tmp_path, "all-on", _objects("all-on"))
    tests = tmp_path / "alerts-test.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], **ALERT_TESTS}, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", tests.name], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the Grafana dashboard ----------------------------------------------------------------------

OPERATOR_METRICS = {"kubequant_reconciles_total", "kubequant_models", "kubequant_gate_outcomes_total",
                    "kubequant_quantization_duration_seconds_sum", "kubequant_quantization_duration_seconds_count",
                    "kubequant_evaluation_duration_seconds_sum", "kubequant_evaluation_duration_seconds_count",
                    "kubequant_baseline_perplexity", "kubequant_quantized_perplexity", "kubequant_kl_divergence",
                    "kubequant_top_token_agreement", "kubequant_task_score", "kubequant_candidate_kl_divergence"}
VLLM_METRICS = {"vllm:e2e_request_latency_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:generation_tokens_total",
                "vllm:prompt_tokens_total"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "model_name", "namespace", "phase",
                "result", "outcome", "model", "kind", "label_values"}


def test_dashboard_configmap():
    (cm,) = _of_kind("default", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["kubequant.json"])
    assert dashboard["uid"] == "kubequant"
    assert json.loads((CHART / "files" / "kubequant-dashboard.json").read_text()) == dashboard
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = re.sub(r'"[^"]*"', "", target["expr"])  # drop label values
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # and range durations
            used |= {m for m in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if m not in PROMQL_WORDS}
    assert used - {"0.5", "0.95"} == OPERATOR_METRICS | VLLM_METRICS
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model", "namespace", "model_name"}
    (moved,) = _of_kind("all-on", "ConfigMap")
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"]["grafana_folder"] == "LLM"


def test_dashboard_and_alerts_use_metrics_the_operator_exports():
    try:
        from kubequant import metrics
        from prometheus_client.metrics import MetricWrapperBase
    except ImportError as exc:
        pytest.skip(f"kubequant.metrics is not importable yet: {exc}")
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                exported |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    (cm,) = _of_kind("default", "ConfigMap")
    text = cm["data"]["kubequant.json"] + json.dumps(_one("all-on", "PrometheusRule")["spec"])
    used = set(re.findall(r"kubequant_[a-z_]+", text)) - {"kubequant_json"}
    assert used <= exported, f"not exported by kubequant.metrics: {sorted(used - exported)}"
    assert used >= OPERATOR_METRICS


def test_notes_name_the_objects():
    notes = _rendered("default")["kubequant/templates/NOTES.txt"]
    assert f"deployment/{FULLNAME}" in notes and "quantizedmodels.kubequant.io" in notes
    assert "ghcr.io/kubequant/kubequant-quantizer:0.1.0" in notes
    assert "llm-a, llm-b" in _rendered("namespaced-multi")["kubequant/templates/NOTES.txt"]


# ---- checkov ------------------------------------------------------------------------------------

def _checkov_command() -> list[str] | None:
    """checkov importable here, else a `checkov` from $CHECKOV, .venv-checkov/ or the PATH.

    checkov pins old versions of packaging, networkx and others, so it lives best in a venv of its own.
    """
    if importlib.util.find_spec("checkov") is not None:
        return [sys.executable, "-m", "checkov.main"]
    for candidate in (os.environ.get("CHECKOV"), str(ROOT / ".venv-checkov" / "bin" / "checkov"),
                      shutil.which("checkov")):
        if candidate and os.access(candidate, os.X_OK):
            return [candidate]
    return None


def _skips() -> dict[str, str]:
    """The skipped checks of charts/kubequant/.checkov.yaml with their justification comments."""
    text = (CHART / ".checkov.yaml").read_text()
    listed = yaml.safe_load(text)["skip-check"]
    reasons = dict(re.findall(r"^\s*-\s*(CKV2?_[A-Z0-9_]+)\s*#\s*(.+)$", text, flags=re.M))
    assert sorted(listed) == sorted(reasons), "every skip-check entry needs a '# justification' comment"
    for check, reason in reasons.items():
        assert len(reason) > 40, f"{check}: justify the skip"
    return reasons


def test_checkov_skips_are_justified():
    _skips()


@pytest.mark.slow
def test_checkov_scan(tmp_path):
    command = _checkov_command()
    if command is None:
        pytest.skip("checkov is not installed: it conflicts with this venv's pins, so CI installs it into "
                    ".venv-checkov (python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov)")
    for variant in VARIANTS:
        out = tmp_path / variant
        out.mkdir()
        for i, obj in enumerate(_objects(variant)):
            (out / f"{i:02d}-{obj['kind'].lower()}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False))
    result = subprocess.run([*command, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                             "--quiet", "--compact", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= sum(len(_objects(v)) for v in VARIANTS)
    failed = {(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]}
    skips = _skips()
    unjustified = sorted(f"{check} on {resource}" for check, resource in failed if check not in skips)
    assert not unjustified, "checkov failed checks that .checkov.yaml does not skip: " + ", ".join(unjustified)
    stale = sorted(set(skips) - {check for check, _ in failed})
    assert not stale, f"skipped in .checkov.yaml but no longer failing, remove them: {stale}"
