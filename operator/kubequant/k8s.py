"""The one I/O layer: reads children, applies the reconciler's actions, patches status.

Plain dicts over the Kubernetes REST API (the official client only for configuration, TLS and
auth), so that what the builders produce is exactly what is sent and tests can compare dicts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import kubernetes

from kubequant import builders
from kubequant.reconcile import MISSING_API, Action, Create, Delete, Observed, Update
from kubequant.spec import KIND

logger = logging.getLogger(__name__)

FIELD_MANAGER = "kubequant"
# Kinds kept in line with the spec by server-side apply from their creation on, so that a field
# dropped from the spec is dropped from the object. Jobs and the claim are only ever created.
APPLIED_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "LeaderWorkerSet",
                 "HorizontalPodAutoscaler", "InferencePool"}



class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    api_version, plural = builders.KINDS[kind]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    out = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: removed keys become None."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def _matches(obj: dict, labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


@dataclass
class Client:
    api: kubernetes.client.ApiClient

    @classmethod
    def from_config(cls) -> Client:
        """In-cluster service account, else the kubeconfig ($KUBECONFIG), as kubectl does."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            # $KUBECONFIG as it is now (the client library reads it only once, at import).
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        return cls(kubernetes.client.ApiClient())

    def request(self, method: str, url: str, *, query: dict | None = None, body: Any = None,
                content_type: str = "application/json") -> dict | None:
        params = self.api.param_serialize(
            method=method, resource_path=url, query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body, auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*params)
        data = response.read()
        if response.status >= 400:
            try:
                message = json.loads(data).get("message", "")
            except ValueError:
                message = data[:200].decode(errors="replace")
            raise ApiError(response.status, f"{method} {url}: {message}")
        return json.loads(data) if data else None

    # ---- reads ----

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self.request("GET", path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:  # absent, or the kind itself is not installed (ServiceMonitor)
                return None
            raise

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        answer = self.request("GET", path(kind, namespace), query={"labelSelector": selector}) or {}
        # Filtered again here: cheap, and correct even against an API that ignores the selector.
        return [item for item in answer.get("items") or [] if _matches(item, labels)]

    def served(self, kind: str) -> bool:
        """Whether the API serves `kind` (its CRD may not be installed)."""
        api_version, plural = builders.KINDS[kind]
        try:
            resources = self.request("GET", f"/apis/{api_version}") or {}
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in resources.get("resources") or [])

    def observe(self, namespace: str, name: str, claim: str | None, optional: tuple[str, ...] = ()) -> Observed:
        """The children of one model: its Jobs (all of them), their Pods, the serving objects, and
        which of the `optional` kinds (builders.OPTIONAL_KINDS its spec uses) the cluster lacks."""
        owned = {builders.LABEL_MODEL: name}
        jobs = {job["metadata"]["name"]: job for job in self.list("Job", namespace, owned)}
        pods: dict[str, list[dict]] = {}
        server_pods: list[dict] = []
        for pod in self.list("Pod", namespace, owned):
            job_name = (pod["metadata"].get("labels") or {}).get("job-name")
            if job_name in jobs:
                pods.setdefault(job_name, []).append(pod)
            elif job_name is None:
                server_pods.append(pod)
        return Observed(
            jobs=jobs,
            pods=pods,
            server_pods=server_pods,
            deployment=self.get("Deployment", namespace, name),
            service=self.get("Service", namespace, name),
            pdb=self.get("PodDisruptionBudget", namespace, name),
            service_monitor=self.get("ServiceMonitor", namespace, name),
            pvc=self.get("PersistentVolumeClaim", namespace, claim) if claim else None,
            leader_worker_set=self.get("LeaderWorkerSet", namespace, name),
            hpa=self.get("HorizontalPodAutoscaler", namespace, name),
            inference_pool=self.get("InferencePool", namespace, name),
            missing_kinds=frozenset(kind for kind in optional if not self.served(kind)),
        )

    # ---- writes ----

    def create(self, obj: dict) -> None:
        meta = obj["metadata"]
        try:
            self.request("POST", path(obj["kind"], meta["namespace"]), body=obj, query={"fieldManager": FIELD_MANAGER})
        except ApiError as exc:
            if exc.status != 409:  # created by an earlier reconcile: the names are deterministic
                raise

    def apply(self, obj: dict) -> None:
        """Server-side apply (creates or updates), forcing our fields: the operator owns its children."""
        meta = obj["metadata"]
        try:
            self.request("PATCH", path(obj["kind"], meta["namespace"], meta["name"]), body=obj,
                         query={"fieldManager": FIELD_MANAGER, "force": "true"},
                         content_type="application/apply-patch+yaml")
        except ApiError as exc:
            if exc.status != 404:  # an API without server-side apply (an emulator) cannot create by PATCH
                raise
            self.create(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", path(kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, old: dict, new: dict) -> None:
        patch = merge_patch(old, new)
        if patch:
            self.request("PATCH", path(KIND, namespace, name, "status"), body={"status": patch},
                         content_type="application/merge-patch+json")

    def execute(self, namespace: str, actions: list[Action]) -> list[str]:
        """Apply the actions in order; returns the errors that must not stop the others."""
        errors = []
        for action in actions:
            try:
                if isinstance(action, Create) and action.obj["kind"] not in APPLIED_KINDS:
                    self.create(action.obj)
                elif isinstance(action, (Create, Update)):
                    self.apply(action.obj)
                elif isinstance(action, Delete):
                    self.delete(action.kind, namespace, action.name)
            except ApiError as exc:
                kind = action.kind if isinstance(action, Delete) else action.obj["kind"]
                if kind in MISSING_API and exc.status == 404:
                    errors.append(f"{kind}: {MISSING_API[kind]}")
                else:
                    raise
        return errors
