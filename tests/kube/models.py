"""QuantizedModels on the real control plane: storage, the chart's RBAC, waiting on phases, Job results."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.kube.controlplane import ROOT, ControlPlane, wait_for
from tests.kube.kubelet import Kubelet
from tests.operator_support.objects import PASSED, QUANTIZE_RESULT, REGRESSED, with_spec

__all__ = ["PASSED", "QUANTIZE_RESULT", "REGRESSED", "Models", "data_volume", "example", "install_operator_rbac"]

EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / "tests" / "fixtures"
OPERATOR_NAMESPACE = "kubequant-system"
SERVICE_ACCOUNT = "kubequant"

def example(name: str, model_name: str | None = None, **spec_changes: object) -> dict:
    """An example QuantizedModel, renamed, with dotted spec paths changed (serving__replicas=2)."""
    body = yaml.safe_load((EXAMPLES / name).read_text())
    if model_name:
        body["metadata"]["name"] = model_name
    for dotted, value in spec_changes.items():
        body = with_spec(body, dotted.replace("__", "."), value)
    body["metadata"].pop("generation", None)  # the apiserver's to count
    return body


def install_operator_rbac(cluster: ControlPlane, namespaces: list[str]) -> None:
    """The chart as a user installs it, watching `namespaces`; no operator Pod (the test runs the
    operator itself, with the chart's ServiceAccount)."""
    for ns in namespaces:
        if cluster.get("namespace", ns) is None:
            cluster.create_namespace(ns)
    cluster.helm("install", "kubequant", str(ROOT / "charts" / "kubequant"), "-n", OPERATOR_NAMESPACE,
                 "--create-namespace", "--set", "replicaCount=0",
                 "--set", f"operator.watchNamespaces={{{','.join(namespaces)}}}")


def data_volume(cluster: ControlPlane, namespace: str, claim: str, folder: Path, *, size: str = "10Gi",
                access_mode: str = "ReadWriteOnce", create_claim: bool = True, with_fixtures: bool = False,
                local_node: str | None = None) -> Path:
    """A PersistentVolume on a local folder, bound to `claim` (created here unless the operator does).

    `local_node`: a `local` volume on that (real) node instead of a hostPath: the type a one-node cluster
    uses, and one whose ownership the kubelet gives the Pod's fsGroup (a hostPath is left as it is, so
    user 65532 could not write there)."""
    folder.mkdir(parents=True, exist_ok=True)
    if with_fixtures:  # what examples/tiny.yaml and tiny-moe.yaml expect at the root of their claim
        shutil.copytree(FIXTURES / "tiny-llama", folder / "tiny-llama", dirs_exist_ok=True)
        shutil.copytree(FIXTURES / "tiny-qwen3-moe", folder / "tiny-qwen3-moe", dirs_exist_ok=True)
        shutil.copytree(FIXTURES / "text", folder / "text", dirs_exist_ok=True)
        shutil.copytree(FIXTURES / "tasks", folder / "tasks", dirs_exist_ok=True)
    pv_name = f"{namespace}-{claim}"
    where: dict = {"hostPath": {"path": str(folder)}}
    if local_node:
        where = {"local": {"path": str(folder)}, "nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [local_node]}]}]}}}
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": size}, "accessModes": [access_mode], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "claimRef": {"namespace": namespace, "name": claim},
                 **where},
    })
    if create_claim:
        cluster.apply({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": [access_mode], "storageClassName": "", "volumeName": pv_name,
                     "resources": {"requests": {"storage": size}}},
        })
    return folder


@dataclass
class Models:
    """The QuantizedModels of one namespace, and the children the operator made for them."""

    cluster: ControlPlane
    namespace: str
    kubelet: Kubelet

    def apply(self, body: dict) -> None:
        self.cluster.apply(body, namespace=self.namespace)

    def get(self, name: str) -> dict | None:
        return self.cluster.get("qm", name, self.namespace)

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def patch_spec(self, name: str, dotted: str, value: object) -> None:
        patch: dict = {}
        node = patch
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        self.cluster.kubectl("patch", "qm", name, "-n", self.namespace, "--type=merge", "-p",
                             json.dumps({"spec": patch}))

    def wait_phase(self, name: str, phase: str, timeout: float = 90) -> dict:
        return wait_for(f"{name} to be {phase}", lambda: (s := self.status(name)).get("phase") == phase and s,
                        timeout, describe=lambda: json.dumps(self.status(name), indent=1)[:3000])

    def jobs(self, name: str, component: str | None = None) -> list[dict]:
        selector = f"kubequant.io/model={name}" + (f",app.kubernetes.io/component={component}" if component else "")
        return sorted(self.cluster.list("jobs", self.namespace, selector),
                      key=lambda j: j["metadata"]["creationTimestamp"])

    def wait_job(self, name: str, component: str, exclude: set[str] = frozenset(), timeout: float = 60) -> str:
        """The name of a Job of this component that is not in `exclude` (one made for a new spec)."""
        def check() -> str | None:
            names = [j["metadata"]["name"] for j in self.jobs(name, component)]
            return next((n for n in names if n not in exclude), None)
        return wait_for(f"a {component} Job of {name}", check, timeout,
                        describe=lambda: json.dumps(self.status(name), indent=1)[:2000])

    def finish(self, job: str, result: dict | None, exit_code: int = 0, reason: str | None = None) -> None:
        """End every attempt of `job` as given (a retried Job gets a new Pod) until the Job concludes."""
        message = json.dumps(result) if result is not None else ""

        def concluded() -> bool:
            got = self.cluster.get("job", job, self.namespace) or {}
            conditions = {c["type"] for c in got.get("status", {}).get("conditions") or [] if c["status"] == "True"}
            if conditions & {"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"}:
                return True
            for pod in self.kubelet.job_pods(job):
                if pod["spec"].get("nodeName") and pod.get("status", {}).get("phase") == "Running":
                    self.kubelet.terminate(pod, exit_code=exit_code, reason=reason, message=message)
            return False

        wait_for(f"Job {job} to conclude", concluded, timeout=90, interval=0.5)

    def deployment(self, name: str) -> dict | None:
        return self.cluster.get("deployment", name, self.namespace)

    def serving_pods(self, name: str) -> list[dict]:
        return self.cluster.list("pods", self.namespace, f"kubequant.io/model={name},app.kubernetes.io/component=server")

    def events(self, name: str) -> list[tuple[str, str]]:
        items = json.loads(self.cluster.kubectl(
            "get", "events", "-n", self.namespace, "--field-selector", f"involvedObject.name={name}",
            "-o", "json").stdout)["items"]
        return [(e.get("type"), e.get("reason")) for e in items]

