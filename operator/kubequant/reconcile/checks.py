"""Checks on what was produced: the tensor-parallel preflight and the serving rollout."""

from __future__ import annotations

from kubequant import builders
from kubequant.reconcile.jobs import redact

# ---- checks -------------------------------------------------------------------------------------

def preflight(artifact: dict, tp: int, nodes: int = 1) -> str | None:
    """None if vLLM can split every row-parallel layer over `tp` GPUs in whole groups and the layers
    over `nodes` pipeline stages, else why not."""
    layers = artifact.get("decoderLayers")
    if nodes > 1 and isinstance(layers, int) and layers < nodes:
        return (f"serving.nodes {nodes} makes {nodes} pipeline stages, but the model has {layers} decoder "
                f"layers; use at most {layers} nodes")
    group = artifact.get("groupSize")
    features = artifact.get("rowParallelInFeatures") or []

    def fits(k: int, t: int) -> bool:
        return k % t == 0 and (group in (None, -1) or (k // t) % group == 0)

    bad = sorted({k for k in features if not fits(k, tp)})
    if not bad:
        return None
    best = max(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= tp and all(fits(k, t) for k in features)) \
        if all(fits(k, 1) for k in features) else None
    shards = ", ".join(f"{k} -> {k / tp:g}" for k in bad)
    advice = f"use tensorParallelSize {best} or a smaller groupSize" if best else "use a smaller groupSize"
    return (f"tensorParallelSize {tp} splits row-parallel inputs into shards that are not whole groups of "
            f"{group} ({shards} columns per GPU), which vLLM rejects; {advice}")


def rollout(workload: dict | None, desired_hash: str, replicas: int, kind: str = "Deployment") -> tuple[str, str]:
    """("available" | "progressing" | "failed", message) of the Deployment or LeaderWorkerSet (whose
    replicas are groups, ready when all their Pods are) at the desired content."""
    if workload is None:
        return "progressing", f"the {kind} is being created"
    meta, status = workload.get("metadata") or {}, workload.get("status") or {}
    if (meta.get("annotations") or {}).get(builders.ANNOTATION_HASH) != desired_hash:
        return "progressing", f"the {kind} is being updated"
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return "progressing", f"the {kind} controller has not seen the update yet"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "failed", redact(cond.get("message") or "the rollout exceeded its progress deadline")
    unit = "groups" if kind == "LeaderWorkerSet" else "replicas"
    updated = status.get("updatedReplicas") or 0
    available = status.get("readyReplicas" if kind == "LeaderWorkerSet" else "availableReplicas") or 0
    total = status.get("replicas") or 0
    if updated >= replicas and available >= replicas and total <= replicas:
        return "available", f"{available}/{replicas} {unit} available"
    return "progressing", (f"{updated}/{replicas} {unit} updated, {available} available; "
                           f"the previous {unit} serve until the new ones are ready")
