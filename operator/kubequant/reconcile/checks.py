"""Checks on what was produced: the tensor-parallel preflight and the serving rollout."""

from __future__ import annotations

from kubequant import builders
from kubequant.reconcile.jobs import redact
from quantizer.contract import (
    EXPERT_PARALLEL_FLAGS,
    MARLIN_INPUT_DTYPE_ENV,
    UNSIGNED_SCALE_INPUT_DTYPES,
)

# The preflight's refusals, by the field they name: the reason each is reported with.
PREFLIGHT_REASONS = {"serving.nodes": "PipelineParallelMismatch", "spec.serving.env": "UnsafeEngineSetting"}


def preflight_reason(message: str) -> str:
    return next((reason for field, reason in PREFLIGHT_REASONS.items() if message.startswith(field)),
                "TensorParallelMismatch")

# ---- checks -------------------------------------------------------------------------------------

def preflight(artifact: dict, tp: int, nodes: int = 1, extra_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> str | None:
    """None if vLLM can split every row-parallel layer (and every expert, unless extra_args place
    experts whole) over `tp` GPUs in whole groups and the layers over `nodes` pipeline stages, and
    the engine's environment reads this checkpoint as written; else why not."""
    layers = artifact.get("decoderLayers")
    if nodes > 1 and isinstance(layers, int) and layers < nodes:
        return (f"serving.nodes {nodes} makes {nodes} pipeline stages, but the model has {layers} decoder "
                f"layers; use at most {layers} nodes")
    input_dtype = (env or {}).get(MARLIN_INPUT_DTYPE_ENV)
    if artifact.get("fullRangeScales") and input_dtype in UNSIGNED_SCALE_INPUT_DTYPES:
        return (f"spec.serving.env {MARLIN_INPUT_DTYPE_ENV}={input_dtype}: vLLM's {input_dtype}-activation Marlin "
                f"path reads weight scales as unsigned (vLLM issue 48905), and this checkpoint's scales are "
                f"full-range (negative where a group's extreme weight is): remove the variable, or quantize "
                f"with spec.quantization.fullRange false")
    # Mixed precision: every group size of the checkpoint, each checked against every row-parallel input
    # (a unit at the finer setting may be any of them).
    groups = [g for g in artifact.get("groupSizes") or [artifact.get("groupSize")] if g not in (None, -1)]
    group = max(groups, default=None)
    experts_whole = any(a == f or a.startswith(f + "=") for a in extra_args for f in EXPERT_PARALLEL_FLAGS)
    features = (artifact.get("rowParallelInFeatures") or []) + \
        ([] if experts_whole else artifact.get("expertInFeatures") or [])

    def fits(k: int, t: int) -> bool:
        return k % t == 0 and all((k // t) % g == 0 for g in groups)

    bad = sorted({k for k in features if not fits(k, tp)})
    if not bad:
        return None
    best = max(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= tp and all(fits(k, t) for k in features)) \
        if all(fits(k, 1) for k in features) else None
    shards = ", ".join(f"{k} -> {k / tp:g}" for k in bad)
    advice = f"use tensorParallelSize {best} or a smaller groupSize" if best else "use a smaller groupSize"
    sizes = " and ".join(str(g) for g in sorted(groups)) if len(groups) > 1 else str(group)
    return (f"tensorParallelSize {tp} splits row-parallel inputs into shards that are not whole groups of "
            f"{sizes} ({shards} columns per GPU), which vLLM rejects; {advice}")


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
