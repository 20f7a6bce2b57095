"""What deleting a model does to its artifacts (the retention policy)."""

from __future__ import annotations

from dataclasses import dataclass

from kubequant import builders
from kubequant.reconcile.jobs import job_outcome
from kubequant.reconcile.outcomes import Action, Create, Delete
from kubequant.spec import Model

# ---- deletion -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deletion:
    actions: list[Action]
    done: bool  # the finalizer may go
    message: str
    warning: bool = False


def decide_deletion(model: Model, cleanup: dict | None, cleanup_pods: list[dict], pvc: dict | None,
                    deployment: dict | None) -> Deletion:
    """What deleting the model does to its artifacts. Children are garbage-collected by ownerReferences."""
    st = model.spec.storage
    where = f"{builders.model_dir(model)}/ on claim {st.claim_name}"
    if st.retention_policy == "Retain":
        return Deletion([], True, f"retained the artifacts under {where}")
    if st.create:
        actions: list[Action] = [Delete(builders.api_version("PersistentVolumeClaim"), "PersistentVolumeClaim", st.claim_name)] if pvc else []
        return Deletion(actions, True, f"deleted the claim {st.claim_name} with its artifacts")
    outcome = job_outcome(cleanup, cleanup_pods, "cleanup")
    if outcome.state == "missing":
        # Stop vLLM first: it holds the artifact open.
        actions = [Delete(builders.api_version("Deployment"), "Deployment", deployment["metadata"]["name"])] if deployment else []
        return Deletion([*actions, Create(builders.cleanup_job(model))], False, f"removing {where}")
    if outcome.state == "succeeded":
        return Deletion([], True, f"removed {where}")
    if outcome.state == "failed":
        return Deletion([], True, f"could not remove {where} ({outcome.reason}: {outcome.message}); "
                        "remove it by hand", warning=True)
    return Deletion([], False, f"removing {where}")
