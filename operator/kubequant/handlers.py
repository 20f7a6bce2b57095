"""kopf handlers: thin. They gather the inputs, call reconcile.decide, apply its actions.

Every trigger (create, spec update, operator resume, a child Job or Deployment changing, a periodic
timer as a safety net) runs the same `reconcile`, which re-reads the model and its children: the
decision never depends on which event arrived, only on the state. A per-model lock keeps two
triggers of one model from deciding at the same time.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any

import kopf

from kubequant import builders, k8s, metrics
from kubequant.reconcile import Create, decide, decide_deletion
from kubequant.spec import GROUP, KIND, PLURAL, VERSION, SpecError, parse_model

RESYNC_SECONDS = float(os.environ.get("KUBEQUANT_RESYNC_SECONDS", "60"))
METRICS_PORT = int(os.environ.get("KUBEQUANT_METRICS_PORT", "8080"))
BIND_ADDRESS = os.environ.get("KUBEQUANT_BIND_ADDRESS", "0.0.0.0")
DELETE_RETRY_SECONDS = float(os.environ.get("KUBEQUANT_DELETE_RETRY_SECONDS", "5"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Annotations, not status: the status schema is ours and fully structural (no kopf fields pruned).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # Our own Events tell the story; kopf's per-handler INFO events would drown them.
    settings.posting.level = logging.WARNING
    memo.client = k8s.Client.from_config()
    memo.locks = {}
    memo.locks_guard = threading.Lock()
    if METRICS_PORT > 0:
        metrics.serve(METRICS_PORT, BIND_ADDRESS)
        logger.info("metrics on %s:%d/metrics", BIND_ADDRESS, METRICS_PORT)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    """One lock per model: handlers run in a thread pool, and two triggers must not decide at once."""
    with memo.locks_guard:
        return memo.locks.setdefault((namespace, name), threading.Lock())


def reconcile(memo: kopf.Memo, namespace: str, name: str, logger: logging.Logger) -> None:
    client: k8s.Client = memo.client
    with _lock(memo, namespace, name):
        body = client.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # gone, or the delete handler owns it now
        old = body.get("status") or {}
        try:
            storage = (body.get("spec") or {}).get("storage") or {}
            claim = storage.get("claimName") if storage.get("create") else None
            observed = client.observe(namespace, name, claim)
            decision = decide(body, observed, _now())
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


def resync(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """The safety net: a missed event is corrected within RESYNC_SECONDS."""
    reconcile(memo, namespace, name, logger)


if RESYNC_SECONDS > 0:  # 0 turns it off (the tests drive every change through events)
    kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)(resync)


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            return ref.get("name")
    return None


@kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_MODEL: kopf.PRESENT})
@kopf.on.event("apps", "v1", "deployments", labels={builders.LABEL_MODEL: kopf.PRESENT})
def child_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, logger: logging.Logger, **event: Any) -> None:
    # A child with no status yet is the echo of our own create: nothing has happened to it that the
    # reconcile which created it does not know. Skipping it saves a full reconcile per child
    # (37% of the API requests in bench/operator_bench.py); deletions always count.
    if event.get("type") != "DELETED" and not body.get("status"):
        return
    owner = _owner(body)
    if owner:
        reconcile(memo, namespace, owner, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=DELETE_RETRY_SECONDS)
def model_deleted(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger,
                  **_: Any) -> None:
    """Honour the retention policy; the finalizer stays until the artifacts are dealt with."""
    client: k8s.Client = memo.client
    try:
        model = parse_model(dict(body))
    except SpecError:
        metrics.forget(namespace, name)
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
        raise kopf.TemporaryError(deletion.message, delay=DELETE_RETRY_SECONDS)
    kopf.event(body, type="Warning" if deletion.warning else "Normal", reason="Deleted", message=deletion.message)
    metrics.forget(namespace, name)
    with memo.locks_guard:
        memo.locks.pop((namespace, name), None)
