"""kopf handlers: thin. They gather the inputs, call reconcile.decide, apply its actions.

Every trigger (create, spec update, operator resume, a child Job or Deployment changing, a periodic
resync as a safety net) runs the same `reconcile`, which re-reads the model and its children: the
decision never depends on which event arrived, only on the state. A per-model lock keeps two
triggers of one model from deciding at the same time.

The operator's settings come from its command line (`kubequant operator`), once, in kopf's memo:
nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kopf

from kubequant import builders, k8s, metrics
from kubequant.reconcile import (
    Create,
    Decision,
    decide_deletion,
    decide_model,
    invalid_spec,
    observed_claim,
    pod_waiting,
)
from kubequant.spec import GROUP, KIND, PLURAL, VERSION, SpecError, parse_model


@dataclass(frozen=True)
class OperatorSettings:
    metrics_port: int = 8080  # 0: no /metrics
    bind_address: str = "0.0.0.0"  # of the metrics endpoint
    resync_seconds: float = 60  # re-decide every model this often; 0: only on events
    delete_retry_seconds: float = 5  # how often a deletion checks on its cleanup
    discovery: bool = True  # list/watch CRDs and Namespaces (kopf's scanning); needs the discovery ClusterRole


def _settings(memo: kopf.Memo) -> OperatorSettings:
    # `kopf run -m kubequant.handlers` passes no settings: the defaults hold.
    return memo.get("settings") or OperatorSettings()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Annotations, not status: the status schema is ours and fully structural (no kopf fields pruned).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # Our own Events tell the story; kopf's per-handler INFO events would drown them.
    settings.posting.level = logging.WARNING
    memo.settings = _settings(memo)
    # Without the discovery ClusterRole kopf's scanning only retries forbidden lists (a minute of
    # errors before the first reconcile): serve what the cluster has at start instead.
    settings.scanning.disabled = not memo.settings.discovery
    memo.client = k8s.Client.from_config()
    memo.locks = {}
    memo.locks_guard = threading.Lock()
    memo.known = set()  # (namespace, name) of every model seen
    if memo.settings.metrics_port > 0:
        metrics.serve(memo.settings.metrics_port, memo.settings.bind_address)
        logger.info("metrics on %s:%d/metrics", memo.settings.bind_address, memo.settings.metrics_port)
    # The safety net: a missed event is corrected within resync_seconds (0 turns it off). One loop over
    # the models rather than a kopf daemon per model: a daemon needs a finalizer on every model, and a
    # finalizer that outlives the operator (helm uninstall) makes the model undeletable.
    if memo.settings.resync_seconds > 0:
        memo.resync_task = asyncio.create_task(_resync(memo, logger))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    """One lock per model: handlers run in a thread pool, and two triggers must not decide at once."""
    with memo.locks_guard:
        return memo.locks.setdefault((namespace, name), threading.Lock())


def _decide(client: k8s.Client, body: dict) -> Decision:
    """The spec parsed once: the children it names are observed, then decided on."""
    try:
        model = parse_model(body)
    except SpecError as exc:
        return invalid_spec(body, exc, _now())  # nothing is acted on, so nothing to observe
    observed = client.observe(model.namespace, model.name, observed_claim(model), builders.optional_kinds(model))
    return decide_model(model, body.get("status") or {}, observed, _now())


def reconcile(memo: kopf.Memo, namespace: str, name: str, logger: logging.Logger) -> None:
    client: k8s.Client = memo.client
    with _lock(memo, namespace, name):
        body = client.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # gone, or the delete handler owns it now
        old = body.get("status") or {}
        try:
            decision = _decide(client, body)
            for error in client.execute(namespace, decision.actions):
                kopf.event(body, type="Warning", reason="Incomplete", message=error)
            client.patch_status(namespace, name, old, decision.status)
        except Exception:
            metrics.RECONCILES.labels(result="error").inc()
            raise
        metrics.RECONCILES.labels(result="success").inc()
        metrics.record(namespace, name, old, decision.status)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        if decision.status["phase"] != old.get("phase"):
            logger.info("%s/%s: %s -> %s: %s", namespace, name, old.get("phase"), decision.status["phase"],
                        decision.status.get("message", ""))


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=5)
def model_changed(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    reconcile(memo, namespace, name, logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
def model_seen(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **event: Any) -> None:
    """The models the resync visits. Deleted: its metrics go, and a retained model says where its
    artifacts stay (a model that needs no cleanup has no finalizer, so no delete handler sees it)."""
    with memo.locks_guard:
        if event.get("type") != "DELETED":
            memo.known.add((namespace, name))
            return
        memo.known.discard((namespace, name))
        memo.locks.pop((namespace, name), None)
    metrics.forget(namespace, name)
    try:
        model = parse_model(dict(body))
    except SpecError:
        return
    if not needs_cleanup(model.spec.storage.retention_policy):
        kopf.event(body, type="Normal", reason="Deleted", message=decide_deletion(model, None, [], None, None).message)


async def _resync(memo: kopf.Memo, logger: logging.Logger) -> None:
    interval = memo.settings.resync_seconds
    while True:
        await asyncio.sleep(interval)
        with memo.locks_guard:
            known = sorted(memo.known)
        for namespace, name in known:
            try:
                await asyncio.to_thread(reconcile, memo, namespace, name, logger)
            except Exception as exc:  # the next tick, or the next event, tries again
                logger.warning("resync of %s/%s failed: %s", namespace, name, exc)


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync_task")
    if task:
        task.cancel()


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            return ref.get("name")
    return None


@kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_MODEL: kopf.PRESENT})
@kopf.on.event("apps", "v1", "deployments", labels={builders.LABEL_MODEL: kopf.PRESENT})
@kopf.on.event("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels={builders.LABEL_MODEL: kopf.PRESENT})
def child_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, logger: logging.Logger, **event: Any) -> None:
    # A child with no status yet is the echo of our own create: nothing has happened to it that the
    # reconcile which created it does not know. Skipping it saves a full reconcile per child
    # (37% of the API requests in bench/operator_bench.py); deletions always count.
    if event.get("type") != "DELETED" and not body.get("status"):
        return
    owner = _owner(body)
    if owner:
        reconcile(memo, namespace, owner, logger)


@kopf.on.event("", "v1", "pods", labels={builders.LABEL_MODEL: kopf.PRESENT})
def pod_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, logger: logging.Logger, **event: Any) -> None:
    # A Pod (a Job's or vLLM's) that the scheduler cannot place, or whose image cannot be pulled,
    # changes nothing in its Job's or Deployment's status: only the Pod tells that nothing runs. Every
    # other change of such a Pod reaches its owner's status, whose event reconciles: only a stuck Pod
    # is worth a reconcile here.
    if event.get("type") == "DELETED" or pod_waiting([dict(body)]) is None:
        return
    reconcile(memo, namespace, body["metadata"]["labels"][builders.LABEL_MODEL], logger)


def needs_cleanup(retention_policy: object) -> bool:
    """Only a model whose artifacts go with it holds a finalizer: the operator must remove them first."""
    return retention_policy == "Delete"


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=5,
                when=lambda spec, **_: needs_cleanup((spec.get("storage") or {}).get("retentionPolicy")))
def model_deleted(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger,
                  **_: Any) -> None:
    """Honour the retention policy; the finalizer stays until the artifacts are dealt with."""
    client: k8s.Client = memo.client
    # Its metrics and lock go when the model does (model_seen), as every model's do.
    try:
        model = parse_model(dict(body))
    except SpecError:
        return  # an invalid spec never produced artifacts we could find
    with _lock(memo, namespace, name):
        cleanup_name = builders.cleanup_job_name(model)
        cleanup = client.get("Job", namespace, cleanup_name)
        pods = client.list("Pod", namespace, {"job-name": cleanup_name}) if cleanup else []
        pvc = client.get("PersistentVolumeClaim", namespace, model.spec.storage.claim_name) \
            if model.spec.storage.create else None
        deployment = client.get("Deployment", namespace, name)
        deletion = decide_deletion(model, cleanup, pods, pvc, deployment)
        client.execute(namespace, deletion.actions)
    if not deletion.done:
        if any(isinstance(a, Create) for a in deletion.actions):
            kopf.event(body, type="Normal", reason="CleaningUp", message=deletion.message)
        raise kopf.TemporaryError(deletion.message, delay=memo.settings.delete_retry_seconds)
    kopf.event(body, type="Warning" if deletion.warning else "Normal", reason="Deleted", message=deletion.message)
