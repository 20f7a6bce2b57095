"""An emulated cluster for the real kopf operator, with the test playing the controllers' part.

The operator talks HTTP to the emulator like to an apiserver (kubeconfig -> kopf's login and our
client). The test reads and moves objects directly in the emulator's store, as the Job, Deployment
and kubelet controllers would: Pods with termination messages, Job conditions, Deployment status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
from kopf.testing import KopfRunner
from kubequant import builders
from kubequant.spec import parse_model

from tests.operator_support.emulator import Emulator
from tests.operator_support.objects import NAMESPACE, job_status

QM = "kubequant.io/v1alpha1/quantizedmodels"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
SERVICE_MONITORS = "monitoring.coreos.com/v1/servicemonitors"
PVCS = "v1/persistentvolumeclaims"
EVENTS = "v1/events"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


class Cluster:
    def __init__(self, emulator: Emulator, kubeconfig: Path):
        self.emulator = emulator
        self.kubeconfig = kubeconfig

    # ---- reading ----

    def get(self, resource: str, name: str) -> dict | None:
        return self.emulator.store_get(resource, NAMESPACE, name)

    def list(self, resource: str, model: str | None = None) -> list[dict]:
        objs = self.emulator.store_list(resource, NAMESPACE)
        if model:
            objs = [o for o in objs if (o["metadata"].get("labels") or {}).get("kubequant.io/model") == model]
        return sorted(objs, key=lambda o: int(o["metadata"]["resourceVersion"]))

    def jobs(self, model: str, component: str | None = None) -> list[dict]:
        return [j for j in self.list(JOBS, model)
                if component is None or j["metadata"]["labels"]["app.kubernetes.io/component"] == component]

    def status(self, name: str) -> dict:
        return (self.get(QM, name) or {}).get("status") or {}

    def events(self, name: str) -> list[tuple[str, str]]:
        return [(e.get("type"), e.get("reason")) for e in self.emulator.store_list(EVENTS, NAMESPACE)
                if e.get("involvedObject", {}).get("name") == name]

    async def wait(self, what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def wait_phase(self, name: str, phase: str, timeout: float = 10.0) -> dict:
        def check():
            status = self.status(name)
            return status if status.get("phase") == phase else None
        try:
            return await self.wait(f"{name} to be {phase}", check, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status: {json.dumps(self.status(name), indent=1)}") from None

    async def wait_job(self, model: str, component: str) -> dict:
        """The Job the model's current spec asks for (not one left from an earlier spec)."""
        def check():
            body = self.get(QM, model)
            if body is None:
                return None
            parsed = parse_model(body)
            name = builders.quantize_job_name(parsed) if component == "quantize" else builders.evaluate_job_name(parsed)
            return self.get(JOBS, name)
        return await self.wait(f"the {component} Job of {model}", check)

    def requests_so_far(self) -> int:
        return len(list(self.emulator))

    async def wait_observed(self, name: str, since: int) -> None:
        """Until the operator has read all of `name`'s children (the last read of a reconcile)."""
        def check():
            return any(r.method == "GET" and r.url.path.endswith(f"/servicemonitors/{name}")
                       for r in list(self.emulator)[since:])
        await self.wait(f"the operator to reconcile {name}", check)
        await asyncio.sleep(0.1)  # and to act on what it read

    # ---- playing the controllers ----

    async def create(self, resource: str, body: dict) -> dict:
        return await self.emulator.store_create(resource, body)

    async def patch(self, resource: str, name: str, patch: dict) -> dict:
        return await self.emulator.store_patch(resource, NAMESPACE, name, patch)

    async def delete(self, resource: str, name: str) -> None:
        await self.emulator.store_delete(resource, NAMESPACE, name)

    async def start_job(self, job: dict) -> None:
        await self.emulator.store_patch(JOBS, NAMESPACE, job["metadata"]["name"], {"status": job_status("running")},
                                        "status")

    async def finish_job(self, job: dict, *, exit_code: int = 0, result: dict | None = None,
                         reason: str | None = None, container: str | None = None, init: bool = False) -> None:
        """A Pod ran and terminated (its termination message holds `result`), then the Job concluded."""
        name = job["metadata"]["name"]
        template = job["spec"]["template"]
        container = container or template["spec"]["containers"][0]["name"]
        terminated: dict[str, Any] = {"exitCode": exit_code,
                                      "reason": reason or ("Completed" if exit_code == 0 else "Error")}
        if result is not None:
            terminated["message"] = json.dumps(result)
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-{len(self.list(PODS))}", "namespace": NAMESPACE,
                         "labels": {**template["metadata"]["labels"], "job-name": name,
                                    "batch.kubernetes.io/job-name": name}},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                       "initContainerStatuses" if init else "containerStatuses":
                           [{"name": container, "state": {"terminated": terminated}}]},
        }
        await self.create(PODS, pod)
        state = "succeeded" if exit_code == 0 else "failed"
        await self.emulator.store_patch(JOBS, NAMESPACE, name, {"status": job_status(state)}, "status")

    async def make_available(self, name: str) -> None:
        dep = self.get(DEPLOYMENTS, name)
        assert dep is not None, f"no Deployment {name}"
        n = dep["spec"]["replicas"]
        await self.emulator.store_patch(DEPLOYMENTS, NAMESPACE, name, {"status": {
            "observedGeneration": dep["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
            "readyReplicas": n, "availableReplicas": n,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}}, "status")


def register_resources(emulator) -> None:
    """The built-in kinds plus the two custom ones the operator reads and writes."""
    emulator.resources.load_bundled()
    emulator.resources[QM] = kmock.ResourceInfo(
        kind="QuantizedModel", singular="quantizedmodel", namespaced=True, shortnames={"qm"},
        categories={"kubequant"}, subresources={"status"}, verbs=VERBS)
    emulator.resources[SERVICE_MONITORS] = kmock.ResourceInfo(
        kind="ServiceMonitor", singular="servicemonitor", namespaced=True, verbs=VERBS)


def write_kubeconfig(path: Path, server, namespace: str = NAMESPACE) -> Path:
    """A kubeconfig pointing at the emulator's server, for kopf and the kubernetes client."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test",
                                                      "namespace": namespace}}],
    }))
    return path


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        register_resources(emulator)
        yield Cluster(emulator, write_kubeconfig(tmp_path / "kubeconfig", server))


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster) -> AsyncIterator[KopfRunner]:
    """The real operator (`kopf run -m kubequant.handlers`) in a thread, against the emulator."""
    import kopf
    import kubernetes.config.kube_config as kube_config

    # The kubernetes client reads $KUBECONFIG once, at import: point its default (used by kopf's
    # login) at the emulator too.
    previous, previous_default = os.environ.get("KUBECONFIG"), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(cluster.kubeconfig)
    settings = kopf.OperatorSettings()
    # kmock 0.8 fails on cluster-scoped lists such as /api/v1/namespaces; the namespace is explicit.
    settings.scanning.disabled = True
    runner = KopfRunner(["run", "--standalone", f"--namespace={NAMESPACE}", "-m", "kubequant.handlers"],
                        settings=settings, timeout=30)
    # Enter and exit off the event loop: the emulator serves on this loop while kopf starts and stops.
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous_default
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
