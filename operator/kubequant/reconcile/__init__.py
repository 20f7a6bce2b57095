"""The reconciler's one decision: (QuantizedModel, observed children, now) -> (actions, new status, events).

Pure and level-triggered: it reads only its arguments, so a restarted operator, a missed watch event
or a resync tick all reach the same decision from the same state. Results that the cluster does not
keep forever (a Pod's termination message) are copied into the status once observed.

The flow for the artifact the spec asks for is a table of stages (STAGES), run in order:
    quantize (Job -> artifact record) -> preflight -> gate (evaluate Job -> verdict) -> serve.
When the spec lists recipe candidates, the stages work on the first whose gate has not failed
(`search`), so a failed gate moves on to the next candidate and what serves stays until one passes.
Each returns its conditions, the records it keeps in status and the actions it needs; the phase is
derived in one place, from the first stage that failed or is not done.

Safe rollout: the Deployment is only ever built from an artifact that passed the gate. While a new
artifact is quantized or evaluated, or when it fails, the last one that passed keeps serving.
"""

from __future__ import annotations

from typing import Any

from kubequant import builders
from kubequant.reconcile.checks import (  # noqa: F401  (the package's API)
    preflight,
    preflight_reason,
    rollout,
)
from kubequant.reconcile.deletion import (  # noqa: F401  (the package's API)
    Deletion,
    decide_deletion,
)
from kubequant.reconcile.jobs import (  # noqa: F401  (the package's API)
    STUCK_CONTAINER_REASONS,
    JobOutcome,
    job_outcome,
    pod_waiting,
    redact,
)
from kubequant.reconcile.outcomes import (  # noqa: F401  (the package's API)
    CONDITION_TYPES,
    DEPLOYING,
    EVALUATING,
    FAILED,
    GATE_FAILED,
    MESSAGE_LIMIT,
    MISSING_API,
    OPTIONAL_CONDITION_TYPES,
    PENDING,
    PHASES,
    QUANTIZING,
    READY,
    Action,
    Create,
    Decision,
    Delete,
    Event,
    Observed,
    Update,
)
from kubequant.reconcile.search import REJECTED, Search, all_rejected, entries, none_passed, search
from kubequant.reconcile.search import events as candidate_events
from kubequant.reconcile.stages import (  # noqa: F401  (the package's API)
    STAGES,
    Context,
    Stage,
    StageResult,
    desired_replicas,
)
from kubequant.spec import Model, SpecError, parse_model


def _conditions(old: list[dict], stages: dict[str, Stage], generation: int, now: str) -> list[dict]:
    previous = {c.get("type"): c for c in old or []}
    out = []
    for kind in CONDITION_TYPES + tuple(k for k in OPTIONAL_CONDITION_TYPES if k in stages):
        stage = stages[kind]
        before = previous.get(kind)
        # API conventions: lastTransitionTime moves only when the status does.
        since = before["lastTransitionTime"] if before and before.get("status") == stage.status \
            and before.get("lastTransitionTime") else now
        out.append({"type": kind, "status": stage.status, "reason": stage.reason, "message": stage.message,
                    "lastTransitionTime": since, "observedGeneration": generation})
    return out


def _phase_event(old_phase: str | None, phase: str, message: str) -> list[Event]:
    if old_phase == phase:
        return []
    kind = "Warning" if phase in (FAILED, GATE_FAILED) else "Normal"
    return [Event(kind, phase, message)]


def _action_events(actions: list[Action]) -> list[Event]:
    out = []
    for action in actions:
        if isinstance(action, Delete):
            out.append(Event("Normal", "Deleted", f"{action.kind} {action.name}"))
        else:
            verb = "Created" if isinstance(action, Create) else "Updated"
            out.append(Event("Normal", verb, f"{action.obj['kind']} {action.obj['metadata']['name']}"))
    return out


def invalid_spec(body: dict, error: SpecError, now: str) -> Decision:
    """The status of a model whose spec cannot be acted on: nothing is created, what serves stays."""
    old: dict = body.get("status") or {}
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    message = str(error)
    waiting = Stage("Unknown", "InvalidSpec", message)
    ready = Stage("True", "ServingPreviousArtifact", f"the spec is invalid; the last artifact that passed "
                   f"keeps serving: {message}") if old.get("serving") else Stage("False", "InvalidSpec", message)
    status = {k: v for k, v in old.items() if k in ("artifact", "evaluation", "serving")}
    status.update({
        "phase": FAILED,
        "message": message,
        "observedGeneration": generation,
        "failure": {"stage": "Spec", "reason": "InvalidSpec", "message": message},
        "conditions": _conditions(old.get("conditions", []), {
            "Quantized": Stage("False", "InvalidSpec", message), "Evaluated": waiting, "GatePassed": waiting,
            "Ready": ready}, generation, now),
    })
    return Decision(status, [], _phase_event(old.get("phase"), FAILED, message))


def _housekeeping(model: Model, observed: Observed, names: tuple[str, ...]) -> list[Action]:
    actions: list[Action] = []
    if model.spec.storage.create and observed.pvc is None:
        actions.append(Create(builders.persistent_volume_claim(model)))
    # Jobs of earlier specs: whatever they would produce is no longer wanted (and holds GPUs).
    for name, job in sorted(observed.jobs.items()):
        component = ((job.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
        if component in ("quantize", "evaluate") and name not in names:
            actions.append(Delete(builders.api_version("Job"), "Job", name))
    return actions


def decide(body: dict, observed: Observed, now: str) -> Decision:
    """The next actions and the new status for one QuantizedModel (`body` as the API returns it)."""
    try:
        model = parse_model(body)
    except SpecError as exc:
        return invalid_spec(body, exc, now)
    return decide_model(model, body.get("status") or {}, observed, now)


def observed_claim(model: Model) -> str | None:
    """The claim whose absence decide_model acts on: the one the spec asks the operator to create."""
    return model.spec.storage.claim_name if model.spec.storage.create else None


def decide_model(model: Model, old: dict, observed: Observed, now: str) -> Decision:
    """decide() for a parsed spec; `old` is the status as it was."""
    known = old  # the status the search reads: `old`, plus the verdicts this decision reads from Jobs
    while True:
        found = search(model, known)  # the recipe candidate the stages work on: the first not rejected
        ctx, status, actions, phase, message = _run_stages(model, found, known, observed)
        rows = entries(found, known, status, phase) if found.listed else []
        # A verdict read just now rejected this candidate and another follows: go on to it at once,
        # rather than report GateFailed for one reconcile.
        if found.current + 1 < len(found.candidates) and rows[found.current]["state"] == REJECTED:
            known = {**known, "candidates": rows}
            continue
        break
    if rows:
        status["candidate"], status["candidates"] = found.name, rows
    if all_rejected(rows):
        message = none_passed(rows)
        gate = ctx.conditions["GatePassed"]
        ctx.conditions["GatePassed"] = Stage(gate.status, gate.reason, message)
    elif rows and phase != READY:
        message = f"candidate {found.name} ({found.current + 1} of {len(rows)}): {message}"
    status["phase"] = phase
    status["message"] = message
    status["conditions"] = _conditions(old.get("conditions", []), ctx.conditions, model.generation, now)
    events = _action_events(actions) + candidate_events(old, rows) + _phase_event(old.get("phase"), phase, message)
    return Decision(status, actions, events)


def _run_stages(model: Model, found: Search, old: dict,
                observed: Observed) -> tuple[Context, dict[str, Any], list[Action], str, str]:
    """The stages (STAGES) on the candidate `found` points at: (context, status, actions, phase, message)."""
    ctx = Context(found.model, observed, old, found.hashes[found.current], found.keys[found.current],
                  recipe_name=found.name if found.listed else None)
    actions = _housekeeping(model, observed, found.job_names())
    status: dict[str, Any] = {"artifactHash": ctx.a_hash, "observedGeneration": model.generation}
    standing: StageResult | None = None  # the first stage that failed or is not done
    for stage in STAGES:
        result = stage(ctx)
        ctx.conditions.update(result.conditions)
        ctx.failure = ctx.failure or result.failure
        status.update(result.records)
        actions += result.actions
        if standing is None and (result.failure or result.phase):
            standing = result

    ready = ctx.conditions["Ready"]
    if standing and standing.failure:
        phase, message = FAILED, standing.failure["message"]
    elif standing:
        phase, message = standing.phase, standing.message
    else:
        phase, message = READY, ready.message

    if ctx.artifact:
        status["baselinePerplexity"] = ctx.artifact.get("baselinePerplexity")
        served_ppl = (ctx.evaluation or {}).get("servedPerplexity")
        status["quantizedPerplexity"] = served_ppl if served_ppl is not None else ctx.artifact.get("fakequantPerplexity")
        status = {k: v for k, v in status.items() if v is not None}
    if ctx.failure:
        status["failure"] = ctx.failure
    return ctx, status, actions, phase, message
