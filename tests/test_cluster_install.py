"""The install paths, as a user runs them, against the real apiserver: the CRDs by server-side apply,
the chart by the helm CLI (install, upgrade, uninstall), `kubectl explain`, the printer columns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kube.controlplane import MONITORING_CRDS, ROOT, ControlPlane, wait_for

pytestmark = pytest.mark.controlplane
CHART = ROOT / "charts" / "kubequant"


def test_crds_apply_server_side_again_without_conflict(control_plane: ControlPlane):
    done = control_plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    assert "quantizedmodels.kubequant.io serverside-applied" in done.stdout
    crd = control_plane.get("crd", "quantizedmodels.kubequant.io")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True" and established["NamesAccepted"] == "True"
    # The apiserver serves the kind under its short name and category.
    resources = control_plane.kubectl("api-resources", "--api-group=kubequant.io", "-o", "wide").stdout
    assert "qm" in resources and "QuantizedModel" in resources and "kubequant" in resources


def test_kubectl_explain_prints_the_field_docs(control_plane: ControlPlane):
    # The apiserver publishes a new CRD's OpenAPI schema a few seconds after it is established.
    out = wait_for("the CRD's OpenAPI schema", lambda: (done := control_plane.kubectl(
        "explain", "quantizedmodel.spec.quantization", check=False)).returncode == 0 and done.stdout)
    schema = yaml.safe_load((ROOT / "crds" / "quantizedmodels.kubequant.io.yaml").read_text())
    quantization = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "quantization"]
    assert "GROUP:      kubequant.io" in out
    for field, node in quantization["properties"].items():
        assert field in out, field
        # The first words of each description, as kubectl wraps them.
        assert " ".join(node["description"].split()[:4]) in " ".join(out.split()), field
    recursive = control_plane.kubectl("explain", "qm.spec", "--recursive").stdout
    assert "tensorParallelSize" in recursive and "retentionPolicy" in recursive


def _helm_objects(cluster: ControlPlane, release: str, namespace: str) -> list[tuple[str, str]]:
    manifest = cluster.helm("get", "manifest", release, "-n", namespace).stdout
    return [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(manifest) if d]


def test_helm_install_upgrade_uninstall_with_default_values(control_plane: ControlPlane):
    ns = control_plane.create_namespace("kq-helm-default")
    control_plane.helm("install", "kubequant", str(CHART), "-n", ns)
    objects = _helm_objects(control_plane, "kubequant", ns)
    assert ("Deployment", "kubequant") in objects and ("Role", "kubequant") in objects
    deployment = control_plane.get("deployment", "kubequant", ns)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kubequant"
    # The scheduler places the operator's Pod on the CPU node (it does not tolerate the GPU taint).
    pod = wait_for("the operator Pod to be scheduled", lambda: next(
        (p for p in control_plane.list("pods", ns, "app.kubernetes.io/component=operator")
         if p["spec"].get("nodeName")), None))
    assert pod["spec"]["nodeName"] == "cpu-1"

    control_plane.helm("upgrade", "kubequant", str(CHART), "-n", ns, "--set", "operator.resyncSeconds=15")
    args = control_plane.get("deployment", "kubequant", ns)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--resync-seconds=15" in args
    history = json.loads(control_plane.helm("history", "kubequant", "-n", ns, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"

    control_plane.helm("uninstall", "kubequant", "-n", ns, "--wait")
    for kind, name in objects:
        assert control_plane.get(kind.lower(), name, None if kind.startswith("Cluster") else ns) is None, (kind, name)
    # The CRDs stay: helm never deletes CRDs, and the models (and their artifacts) with them.
    assert control_plane.get("crd", "quantizedmodels.kubequant.io") is not None


def test_helm_install_with_every_option_on(control_plane: ControlPlane):
    """The all-on values, with the Prometheus Operator's CRDs (generated from its API types) installed."""
    assert MONITORING_CRDS.is_dir(), "scripts/cluster.sh build generates the monitoring.coreos.com CRDs"
    control_plane.kubectl("apply", "--server-side", "-f", str(MONITORING_CRDS))
    control_plane.wait_established("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com")
    ns = control_plane.create_namespace("kq-helm-all-on")
    control_plane.create_namespace("monitoring")
    values = str(CHART / "ci" / "all-on-values.yaml")
    control_plane.helm("install", "kq", str(CHART), "-n", ns, "-f", values)
    objects = _helm_objects(control_plane, "kq", ns)
    kinds = {kind for kind, _ in objects}
    assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ClusterRole", "ClusterRoleBinding",
            "ConfigMap"} <= kinds
    dashboard = next(name for kind, name in objects if kind == "ConfigMap")
    assert control_plane.get("configmap", dashboard, "monitoring") is not None
    rule = control_plane.get("prometheusrule", next(n for k, n in objects if k == "PrometheusRule"), ns)
    assert rule["spec"]["groups"], "the PrometheusRule has its alert groups"

    control_plane.helm("upgrade", "kq", str(CHART), "-n", ns, "-f", values, "--set", "operator.resyncSeconds=45")
    control_plane.helm("uninstall", "kq", "-n", ns, "--wait")
    assert control_plane.list("servicemonitors", ns) == []
    assert control_plane.get("clusterrole", next(n for k, n in objects if k == "ClusterRole")) is None


def test_printer_columns(control_plane: ControlPlane):
    ns = control_plane.create_namespace("kq-columns")
    body = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    control_plane.apply(body, namespace=ns)
    # The status as the operator writes it; the columns read it.
    status = {"phase": "Ready", "baselinePerplexity": 30.19, "quantizedPerplexity": 30.33,
              "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "m",
                              "lastTransitionTime": "2026-12-01T00:00:00Z"}]}
    control_plane.kubectl("patch", "qm", "tiny-llama", "-n", ns, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": status}))
    header, row = control_plane.kubectl("get", "qm", "-n", ns).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "BITS", "GROUP", "BASELINE", "PPL", "QUANTIZED", "PPL", "KL", "TOP-1", "READY",
                              "CANDIDATE", "AGE"]
    assert row.split()[:7] == ["tiny-llama", "Ready", "4", "32", "30.19", "30.33", "True"]
    # The recipe candidate serving (spec.quantization.candidates), from the serving record.
    control_plane.kubectl("patch", "qm", "tiny-llama", "-n", ns, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"serving": {"candidate": "finer"}}}))
    header, row = control_plane.kubectl("get", "qm", "-n", ns).stdout.splitlines()
    assert row[header.index("CANDIDATE"):].split()[0] == "finer"
    # -o wide adds the first task's drop, from the evaluation the operator records.
    evaluation = {"evaluation": {"klDivergence": {"mean": 0.0117}, "topTokenAgreement": 0.9134,
                                 "tasks": [{"task": "python_identifier", "metric": "acc", "source": 0.2,
                                            "quantized": 0.19, "drop": 0.01, "samples": 100}]}}
    control_plane.kubectl("patch", "qm", "tiny-llama", "-n", ns, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": evaluation}))
    header, row = control_plane.kubectl("get", "qm", "-n", ns, "-o", "wide").stdout.splitlines()
    assert header.split()[8:12] == ["KL", "TOP-1", "TASK", "DROP"]
    assert row.split()[6:9] == ["0.0117", "0.9134", "0.01"]


@pytest.mark.parametrize("name", ["tiny.yaml", "llama-3-8b-tp2.yaml"])
def test_render_names_what_the_operator_names_from_the_stored_object(control_plane: ControlPlane, name: str):
    # `kubequant render` parses the file; the operator parses the object the apiserver stored, whose
    # numbers are JSON's (1.0 comes back as 1). Both must name the same Jobs and artifact paths.
    from kubequant import builders
    from kubequant.spec import parse_model

    ns = control_plane.create_namespace(f"kq-names-{name.split('.')[0]}")
    example = ROOT / "examples" / name
    control_plane.kubectl("apply", "-n", ns, "-f", str(example))
    file_name = yaml.safe_load(example.read_text())["metadata"]["name"]
    stored = parse_model(control_plane.get("qm", file_name, ns))
    rendered = subprocess.run([str(Path(sys.executable).parent / "kubequant"), "render", "-f", str(example), "-n", ns],
                              capture_output=True, text=True, check=True).stdout
    jobs = {doc["metadata"]["name"] for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "Job"}
    assert builders.quantize_job_name(stored) in jobs
    assert builders.evaluate_job_name(stored) in jobs
    assert builders.artifact_dir(stored) in rendered


def test_uninstall_leaves_no_model_that_cannot_be_deleted(control_plane: ControlPlane, tmp_path: Path):
    """Only a model whose artifacts go with it (retentionPolicy Delete) carries the operator's finalizer;
    after `helm uninstall` every other model deletes at once, and the documented command frees the
    rest. The periodic resync runs without any finalizer."""
    from tests.kube.models import data_volume, example
    from tests.kube.operator_process import OperatorProcess

    release, system, ns = "kq-un", "kq-un-system", "kq-un"
    control_plane.create_namespace(ns)
    control_plane.helm("install", release, str(CHART), "-n", system, "--create-namespace", "--set", "replicaCount=0",
                       "--set", f"operator.watchNamespaces={{{ns}}}")
    kubeconfig = control_plane.token_kubeconfig(f"{release}-kubequant", system, tmp_path / "kubeconfig")
    data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    control_plane.apply(example("tiny.yaml", "keep"), namespace=ns)
    control_plane.apply(example("tiny.yaml", "wipe", storage__retentionPolicy="Delete"), namespace=ns)

    def finalizers(name: str) -> list[str]:
        return (control_plane.get("qm", name, ns) or {}).get("metadata", {}).get("finalizers") or []

    with OperatorProcess(kubeconfig, [ns], tmp_path / "operator.log", resync_seconds=1) as operator:
        for name in ("keep", "wipe"):
            wait_for(f"{name} to be reconciled", lambda n=name: (control_plane.get("qm", n, ns) or {}).get("status"),
                     describe=operator.tail)
        wait_for("the finalizer on the model with retentionPolicy Delete", lambda: finalizers("wipe"),
                 describe=operator.tail)
        assert finalizers("keep") == []
        before = operator.sample("kubequant_reconciles_total", {"result": "success"}) or 0
        wait_for("the resync to reconcile unchanged models", lambda: (operator.sample(
            "kubequant_reconciles_total", {"result": "success"}) or 0) >= before + 4, timeout=30, describe=operator.tail)
    control_plane.helm("uninstall", release, "-n", system, "--wait")

    control_plane.kubectl("delete", "qm", "keep", "-n", ns, "--timeout=30s")
    assert finalizers("wipe") == ["kubequant.io/finalizer"]
    # docs/install.md, "Uninstalling": a model whose operator is gone, freed by hand (its artifacts stay).
    control_plane.kubectl("patch", "qm", "wipe", "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    control_plane.kubectl("delete", "qm", "wipe", "-n", ns, "--timeout=30s")
    assert control_plane.list("qm", ns) == []


def test_without_the_discovery_cluster_role_the_operator_starts_quietly(control_plane: ControlPlane, tmp_path: Path):
    """`rbac.discovery: false`: the operator runs with the chart's own arguments under the chart's RBAC
    and reconciles a model at once, without a storm of forbidden CRD lists."""
    import time

    from tests.kube.models import example
    from tests.kube.operator_process import OperatorProcess

    release, system, ns = "kq-nodisc", "kq-nodisc-system", "kq-nodisc"
    control_plane.create_namespace(ns)
    control_plane.helm("install", release, str(CHART), "-n", system, "--create-namespace", "--set", "replicaCount=0",
                       "--set", f"operator.watchNamespaces={{{ns}}}", "--set", "rbac.discovery=false")
    try:
        objects = list(yaml.safe_load_all(control_plane.helm("get", "manifest", release, "-n", system).stdout))
        assert not [o for o in objects if o and o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
        [deployment] = [o for o in objects if o and o["kind"] == "Deployment"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--no-discovery" in args
        chart_flags = tuple(a for a in args if a not in ("operator",) and not a.startswith(
            ("--namespace", "--metrics-port", "--health-port", "--resync-seconds")))
        kubeconfig = control_plane.token_kubeconfig(f"{release}-kubequant", system, tmp_path / "kubeconfig")
        control_plane.apply(example("tiny.yaml", "quiet"), namespace=ns)
        started = time.monotonic()
        log = tmp_path / "operator.log"
        with OperatorProcess(kubeconfig, [ns], log, extra_args=chart_flags) as operator:
            wait_for("the first reconcile", lambda: (control_plane.get("qm", "quiet", ns) or {}).get("status"),
                     timeout=30, describe=operator.tail)
            took = time.monotonic() - started
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line or "Forbidden" in line]
        assert errors == [], errors[:5]
        assert took < 30, took
    finally:
        control_plane.kubectl("delete", "qm", "quiet", "-n", ns, "--wait=false", check=False)
        control_plane.helm("uninstall", release, "-n", system, "--wait", check=False)


def test_a_model_in_an_unwatched_namespace_is_impossible_to_miss(control_plane: ControlPlane):
    """kubectl apply of a model where this release does not look prints the apiserver's warning, naming
    the watched namespaces and the fix; in a watched namespace it says nothing. Never a refusal."""
    release, system = "kq-warn", "kq-warn-system"
    watched = control_plane.create_namespace("kq-warn")
    elsewhere = control_plane.create_namespace("kq-warn-elsewhere")
    control_plane.helm("install", release, str(CHART), "-n", system, "--create-namespace", "--set", "replicaCount=0",
                       "--set", f"operator.watchNamespaces={{{watched}}}")
    try:
        example = str(ROOT / "examples" / "tiny.yaml")

        def apply_warnings(namespace: str) -> list[str]:
            done = control_plane.kubectl("apply", "-n", namespace, "-f", example)
            return [line for line in done.stderr.splitlines() if line.startswith("Warning:") and f"release {release} " in line]

        # The policy reaches the apiserver's admission a moment after it is created.
        [warning] = wait_for("the apiserver's warning", lambda: apply_warnings(elsewhere) or (
            control_plane.kubectl("delete", "qm", "--all", "-n", elsewhere) and None), timeout=30)
        assert f"no kubequant operator watches the namespace {elsewhere}" in warning
        assert f"watches {watched}" in warning and f"-n {watched}" in warning and "operator.watchNamespaces" in warning
        assert control_plane.get("qm", "tiny-llama", elsewhere) is not None  # warned, not refused
        assert apply_warnings(watched) == []
        # Cluster-wide, every namespace is watched: no policy.
        manifest = control_plane.helm("template", release, str(CHART), "-n", system, "--set", "rbac.clusterWide=true").stdout
        assert "ValidatingAdmissionPolicy" not in manifest
    finally:
        control_plane.helm("uninstall", release, "-n", system, "--wait", check=False)


def test_a_watched_namespace_that_does_not_exist_fails_the_install_with_the_fix(control_plane: ControlPlane):
    done = control_plane.helm("install", "kq-missing", str(CHART), "-n", "kq-missing-system", "--create-namespace",
                              "--set", "replicaCount=0", "--set", "operator.watchNamespaces={kq-not-there}", check=False)
    assert done.returncode != 0
    assert 'operator.watchNamespaces: the namespace "kq-not-there" does not exist' in done.stderr, done.stderr
    assert "kubectl create namespace kq-not-there" in done.stderr
    assert control_plane.helm("status", "kq-missing", "-n", "kq-missing-system", check=False).returncode != 0
    # The release's own namespace, made by --create-namespace, is never refused.
    control_plane.helm("install", "kq-own", str(CHART), "-n", "kq-own-system", "--create-namespace",
                       "--set", "replicaCount=0")
    control_plane.helm("uninstall", "kq-own", "-n", "kq-own-system", "--wait")
