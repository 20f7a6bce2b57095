"""The reconciler's one decision: (QuantizedModel, observed children, now) -> (actions, new status, events).

Pure and level-triggered: it reads only its arguments, so a restarted operator, a missed watch event
or a timer tick all reach the same decision from the same state. Results that the cluster does not
keep forever (a Pod's termination message) are copied into the status once observed.

The flow for the artifact the spec asks for:
    quantize Job -> artifact record -> evaluate Job (the gate) -> preflight -> Deployment.
Safe rollout: the Deployment is only ever built from an artifact that passed the gate. While a new
artifact is quantized or evaluated, or when it fails, the last one that passed keeps serving.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubequant import builders
from kubequant.spec import Model, SpecError, parse_model

PENDING, QUANTIZING, EVALUATING, DEPLOYING, READY, FAILED, GATE_FAILED = (
    "Pending", "Quantizing", "Evaluating", "Deploying", "Ready", "Failed", "GateFailed")
PHASES = (PENDING, QUANTIZING, EVALUATING, DEPLOYING, READY, FAILED, GATE_FAILED)
CONDITION_TYPES = ("Quantized", "Evaluated", "GatePassed", "Ready")
GATE_VERDICTS = ("Passed", "PerplexityRegression", "EngineMismatch")
MESSAGE_LIMIT = 1024
# List items carry no apiVersion: deletes name it from here.
API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1", "PodDisruptionBudget": "policy/v1",
                "ServiceMonitor": "monitoring.coreos.com/v1"}


# ---- inputs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Observed:
    """The children as read from the cluster (None: absent)."""

    jobs: dict[str, dict] = field(default_factory=dict)  # every Job labelled with this model, by name
    pods: dict[str, list[dict]] = field(default_factory=dict)  # Pods by the name of their Job
    deployment: dict | None = None
    service: dict | None = None
    pdb: dict | None = None
    service_monitor: dict | None = None
    pvc: dict | None = None


# ---- outputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Create:
    obj: dict


@dataclass(frozen=True)
class Update:
    """Bring an existing object to this content (server-side apply)."""

    obj: dict


@dataclass(frozen=True)
class Delete:
    api_version: str
    kind: str
    name: str


Action = Create | Update | Delete


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: dict
    actions: list[Action]
    events: list[Event]


# ---- reading Jobs -------------------------------------------------------------------------------

def redact(text: str) -> str:
    """Termination messages go to status and Events: never let a token through, keep them short."""
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _parse_result(message: str | None) -> dict | None:
    try:
        result = json.loads(message or "")
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


@dataclass(frozen=True)
class JobOutcome:
    state: str  # missing, pending, running, succeeded, failed
    result: dict | None = None  # the main container's JSON termination message
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    seconds: float | None = None  # from the Job's start to its completion or failure


def _duration(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _terminations(pods: list[dict]) -> list[tuple[str, dict]]:
    """(container name, terminated state) of every container of the Pods, newest Pod first."""
    out = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True):
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            for state_key in ("state", "lastState"):
                terminated = (cs.get(state_key) or {}).get("terminated")
                if terminated:
                    out.append((cs.get("name", ""), terminated))
    return out


def job_outcome(job: dict | None, pods: list[dict], container: str) -> JobOutcome:
    if job is None:
        return JobOutcome("missing")
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    terminations = _terminations(pods)

    if "Complete" in conditions or "SuccessCriteriaMet" in conditions or (status.get("succeeded") or 0) > 0:
        seconds = _duration(status.get("startTime"), status.get("completionTime"))
        for name, terminated in terminations:
            if name == container and terminated.get("exitCode") == 0:
                return JobOutcome("succeeded", result=_parse_result(terminated.get("message")), seconds=seconds)
        return JobOutcome("succeeded", seconds=seconds)

    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        seconds = _duration(status.get("startTime"), failed.get("lastTransitionTime"))
        for name, terminated in terminations:
            code = terminated.get("exitCode")
            if code in (None, 0):
                continue
            result = _parse_result(terminated.get("message"))
            if terminated.get("reason") == "OOMKilled":
                reason, message = "OOMKilled", f"container {name} ran out of memory (exit code {code}); raise its memory limit"
            elif result and result.get("reason"):
                reason, message = str(result["reason"]), str(result.get("message", ""))
            else:
                reason = terminated.get("reason") or "Error"
                message = f"container {name} exited with code {code}"
                if terminated.get("message"):
                    message += f": {terminated['message']}"
            if name != container:
                message = f"{name}: {message}"
            return JobOutcome("failed", result=result if name == container else None, reason=reason,
                              message=redact(message), exit_code=code, seconds=seconds)
        return JobOutcome("failed", reason=failed.get("reason") or "JobFailed",
                          message=redact(failed.get("message") or "the Job failed"), seconds=seconds)

    if (status.get("active") or 0) > 0 or (status.get("ready") or 0) > 0:
        return JobOutcome("running")
    return JobOutcome("pending")


# ---- checks -------------------------------------------------------------------------------------

def preflight(artifact: dict, tp: int) -> str | None:
    """None if vLLM can split every row-parallel layer over `tp` GPUs in whole groups, else why not."""
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


def rollout(dep: dict | None, desired_hash: str, replicas: int) -> tuple[str, str]:
    """("available" | "progressing" | "failed", message) of the Deployment at the desired content."""
    if dep is None:
        return "progressing", "the Deployment is being created"
    meta, status = dep.get("metadata") or {}, dep.get("status") or {}
    if (meta.get("annotations") or {}).get(builders.ANNOTATION_HASH) != desired_hash:
        return "progressing", "the Deployment is being updated"
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return "progressing", "the Deployment controller has not seen the update yet"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "failed", redact(cond.get("message") or "the rollout exceeded its progress deadline")
    updated, available = status.get("updatedReplicas") or 0, status.get("availableReplicas") or 0
    total = status.get("replicas") or 0
    if updated >= replicas and available >= replicas and total <= replicas:
        return "available", f"{available}/{replicas} replicas available"
    return "progressing", (f"{updated}/{replicas} replicas updated, {available} available; "
                           "the previous replicas serve until the new ones are ready")


# ---- records kept in status ---------------------------------------------------------------------

def _artifact_record(model: Model, a_hash: str, result: dict) -> dict:
    record = {
        "hash": a_hash,
        "path": builders.artifact_dir(model, a_hash),
        "baselinePerplexity": result.get("baseline_ppl"),
        "fakequantPerplexity": result.get("fakequant_ppl"),
        "sizeBeforeBytes": result.get("size_before_bytes"),
        "sizeAfterBytes": result.get("size_after_bytes"),
        "seconds": result.get("seconds"),
        "groupSize": result.get("group_size", model.spec.quantization.group_size),
        "rowParallelInFeatures": result.get("row_parallel_in_features"),
    }
    return {k: v for k, v in record.items() if v is not None}


def _evaluation_record(model: Model, e_key: str, a_hash: str, result: dict, seconds: float | None) -> dict:
    record = {
        "key": e_key,
        "artifactHash": a_hash,
        "passed": bool(result.get("passed")),
        "reason": str(result.get("reason")),
        "message": redact(str(result.get("message", ""))),
        "servedPerplexity": result.get("served_ppl"),
        "tensorParallelSize": model.spec.serving.tensor_parallel_size,
        "seconds": seconds,
    }
    return {k: v for k, v in record.items() if v is not None}


# ---- the decision -------------------------------------------------------------------------------

@dataclass
class _Stage:
    """One condition-to-be: status True/False/Unknown, reason, message."""

    status: str
    reason: str
    message: str


def _conditions(old: list[dict], stages: dict[str, _Stage], generation: int, now: str) -> list[dict]:
    previous = {c.get("type"): c for c in old or []}
    out = []
    for kind in CONDITION_TYPES:
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


def _invalid(body: dict, old: dict, error: SpecError, now: str) -> Decision:
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    message = str(error)
    waiting = _Stage("Unknown", "InvalidSpec", message)
    ready = _Stage("True", "ServingPreviousArtifact", f"the spec is invalid; the last artifact that passed "
                   f"keeps serving: {message}") if old.get("serving") else _Stage("False", "InvalidSpec", message)
    status = {k: v for k, v in old.items() if k in ("artifact", "evaluation", "serving")}
    status.update({
        "phase": FAILED,
        "message": message,
        "observedGeneration": generation,
        "failure": {"stage": "Spec", "reason": "InvalidSpec", "message": message},
        "conditions": _conditions(old.get("conditions", []), {
            "Quantized": _Stage("False", "InvalidSpec", message), "Evaluated": waiting, "GatePassed": waiting,
            "Ready": ready}, generation, now),
    })
    return Decision(status, [], _phase_event(old.get("phase"), FAILED, message))


def _record_for(key_name: str, key: str, *records: dict | None) -> dict | None:
    for record in records:
        if record and record.get(key_name) == key:
            return record
    return None


def decide(body: dict, observed: Observed, now: str) -> Decision:
    """The next actions and the new status for one QuantizedModel (`body` as the API returns it)."""
    old: dict = body.get("status") or {}
    try:
        model = parse_model(body)
    except SpecError as exc:
        return _invalid(body, old, exc, now)

    spec = model.spec
    a_hash, e_key = builders.artifact_hash(model), builders.evaluation_key(model)
    q_name, e_name = builders.quantize_job_name(model), builders.evaluate_job_name(model)
    served: dict = old.get("serving") or {}
    actions: list[Action] = []
    failure: dict | None = None
    status: dict[str, Any] = {"artifactHash": a_hash, "observedGeneration": model.generation}

    if spec.storage.create and observed.pvc is None:
        actions.append(Create(builders.persistent_volume_claim(model)))

    # Jobs of earlier specs: whatever they would produce is no longer wanted (and holds GPUs).
    for name, job in sorted(observed.jobs.items()):
        component = ((job.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
        if component in ("quantize", "evaluate") and name not in (q_name, e_name):
            actions.append(Delete("batch/v1", "Job", name))

    # 1. The artifact: recorded, reused from what serves (a reverted spec), or the quantize Job's result.
    artifact = _record_for("hash", a_hash, old.get("artifact"), served.get("artifact"))
    if artifact:
        quantized = _Stage("True", "Quantized", _artifact_summary(artifact))
    else:
        outcome = job_outcome(observed.jobs.get(q_name), observed.pods.get(q_name, []), builders.QUANTIZE_CONTAINER)
        quantized, artifact, failure = _quantize_stage(model, a_hash, q_name, outcome, actions)
    if artifact:
        status["artifact"] = artifact
    elif old.get("artifact"):
        status["artifact"] = old["artifact"]  # the latest result, until a newer one replaces it

    # 2. The gate, then 3. the preflight and the Deployment.
    evaluation = None
    gate = _Stage("Unknown", "NotEvaluated", "the artifact has not been evaluated yet")
    evaluated = _Stage("Unknown", "WaitingForArtifact", "evaluation starts when the artifact is ready")
    preflight_error = None
    ready: _Stage
    phase_override: str | None = None

    if not spec.serving.enabled:
        evaluated = _Stage("Unknown", "ServingDisabled", "serving is disabled: the artifact is not evaluated")
        gate = _Stage("Unknown", "ServingDisabled", "serving is disabled: the artifact is not gated")
        for kind, present in (("Deployment", observed.deployment), ("Service", observed.service),
                              ("PodDisruptionBudget", observed.pdb), ("ServiceMonitor", observed.service_monitor)):
            if present:
                actions.append(Delete(API_VERSIONS[kind], kind, present["metadata"]["name"]))
        ready = _Stage("True", "ArtifactReady", f"serving is disabled; the artifact is at {artifact['path']}") \
            if artifact else _Stage("False", "ServingDisabled", "serving is disabled; the artifact is not ready yet")
        if old.get("evaluation"):
            status["evaluation"] = old["evaluation"]  # kept for when serving is enabled again
    else:
        if artifact and failure is None:
            evaluation = _record_for("key", e_key, old.get("evaluation"), served.get("evaluation"))
            if evaluation is None:
                outcome = job_outcome(observed.jobs.get(e_name), observed.pods.get(e_name, []),
                                      builders.EVALUATE_CONTAINER)
                evaluated, evaluation, failure = _evaluate_stage(model, e_key, a_hash, e_name, artifact, outcome, actions)
            if evaluation:
                status["evaluation"] = evaluation
                evaluated = _Stage("True", "Evaluated", f"served perplexity {evaluation.get('servedPerplexity')}")
                gate = _Stage("True" if evaluation["passed"] else "False", evaluation["reason"], evaluation["message"])
        if "evaluation" not in status and old.get("evaluation"):
            status["evaluation"] = old["evaluation"]

        # What to serve: the new artifact if it passed and fits the GPUs, else the last one that did.
        tp = spec.serving.tensor_parallel_size
        candidate = None
        if artifact and evaluation and evaluation["passed"]:
            preflight_error = preflight(artifact, tp)
            if preflight_error is None:
                candidate = {"artifact": artifact, "evaluation": evaluation}
        previous = served if served.get("artifact") and preflight(served["artifact"], tp) is None else None
        target = candidate or previous

        if target:
            dep_hash = _converge_serving(model, target["artifact"], observed, actions)
            status["serving"] = {**target, "servingHash": dep_hash}
            state, detail = rollout(observed.deployment, dep_hash, spec.serving.replicas)
            what = f"artifact {target['artifact']['hash']}"
            if state == "available" and target is candidate:
                ready = _Stage("True", "Serving", f"serving {what} ({detail})")
            elif state == "available":
                ready = _Stage("True", "ServingPreviousArtifact",
                               f"serving {what}, the last that passed the gate; {_why_not_current(quantized, evaluated, gate, preflight_error)}")
            elif state == "failed":
                ready = _Stage("False", "ProgressDeadlineExceeded", detail)
                if target is candidate and failure is None:
                    failure = {"stage": "Deploy", "key": dep_hash, "reason": "ProgressDeadlineExceeded", "message": detail}
            else:
                ready = _Stage("False", "RollingOut", f"rolling out {what}: {detail}")
                if target is candidate:
                    phase_override = DEPLOYING
        else:
            if served:
                status["serving"] = served  # the Deployment is left as it is
            ready = _Stage("False", "NothingToServe", "no artifact has passed the gate yet" if not served else
                           f"the serving artifact {served.get('artifact', {}).get('hash')} does not fit "
                           f"tensorParallelSize {tp}; the Deployment is left unchanged")
        if preflight_error and failure is None:
            failure = {"stage": "Preflight", "key": e_key, "reason": "TensorParallelMismatch", "message": preflight_error}

    # The phase, from the first stage that is not done.
    if failure:
        phase, message = FAILED, failure["message"]
    elif quantized.status != "True":
        phase, message = (PENDING if quantized.reason == "JobPending" else QUANTIZING), quantized.message
    elif not spec.serving.enabled:
        phase, message = READY, ready.message
    elif evaluated.status != "True":
        phase, message = EVALUATING, evaluated.message
    elif gate.status != "True":
        phase, message = GATE_FAILED, f"{gate.reason}: {gate.message}"
    elif phase_override:
        phase, message = phase_override, ready.message
    else:
        phase, message = READY, ready.message

    if artifact:
        status["baselinePerplexity"] = artifact.get("baselinePerplexity")
        served_ppl = (evaluation or {}).get("servedPerplexity")
        status["quantizedPerplexity"] = served_ppl if served_ppl is not None else artifact.get("fakequantPerplexity")
        status = {k: v for k, v in status.items() if v is not None}
    if failure:
        status["failure"] = failure
    status["phase"] = phase
    status["message"] = message
    status["conditions"] = _conditions(old.get("conditions", []), {
        "Quantized": quantized, "Evaluated": evaluated, "GatePassed": gate, "Ready": ready}, model.generation, now)
    events = _action_events(actions) + _phase_event(old.get("phase"), phase, message)
    return Decision(status, actions, events)


def _converge_serving(model: Model, artifact: dict, observed: Observed, actions: list[Action]) -> str:
    """Create or update the serving objects for `artifact`; returns the Deployment's content hash."""
    desired = {obj["kind"]: obj for obj in builders.serving_objects(model, artifact)}
    current = {"Deployment": observed.deployment, "Service": observed.service,
               "PodDisruptionBudget": observed.pdb, "ServiceMonitor": observed.service_monitor}
    for kind, obj in desired.items():
        present = current[kind]
        if present is None:
            actions.append(Create(obj))
        elif (present["metadata"].get("annotations") or {}).get(builders.ANNOTATION_HASH) != \
                obj["metadata"]["annotations"][builders.ANNOTATION_HASH]:
            actions.append(Update(obj))
    for kind in ("PodDisruptionBudget", "ServiceMonitor"):
        if kind not in desired and current[kind]:
            actions.append(Delete(API_VERSIONS[kind], kind, current[kind]["metadata"]["name"]))
    return desired["Deployment"]["metadata"]["annotations"][builders.ANNOTATION_HASH]


def _artifact_summary(artifact: dict) -> str:
    parts = [f"artifact at {artifact['path']}"]
    if artifact.get("sizeBeforeBytes") and artifact.get("sizeAfterBytes"):
        parts.append(f"{artifact['sizeBeforeBytes'] / 2**30:.2f} GiB -> {artifact['sizeAfterBytes'] / 2**30:.2f} GiB")
    if artifact.get("fakequantPerplexity") is not None:
        parts.append(f"perplexity {artifact.get('baselinePerplexity')} -> {artifact['fakequantPerplexity']} (quantizer)")
    return ", ".join(parts)


def _why_not_current(quantized: _Stage, evaluated: _Stage, gate: _Stage, preflight_error: str | None) -> str:
    if quantized.status != "True":
        return f"the current spec's artifact is not ready ({quantized.reason}: {quantized.message})"
    if evaluated.status != "True":
        return f"the current spec's artifact is not evaluated ({evaluated.reason})"
    if gate.status != "True":
        return f"the current spec's artifact failed the gate ({gate.reason}: {gate.message})"
    if preflight_error:
        return f"the current spec's artifact failed the preflight: {preflight_error}"
    return "the current spec's artifact is being rolled out"


def _quantize_stage(model: Model, a_hash: str, name: str, outcome: JobOutcome,
                    actions: list[Action]) -> tuple[_Stage, dict | None, dict | None]:
    """(condition, artifact record, failure) from the quantize Job; creates it when missing."""
    if outcome.state == "missing":
        actions.append(Create(builders.quantize_job(model)))
    if outcome.state in ("missing", "pending"):
        return _Stage("False", "JobPending", f"waiting for the quantize Job {name} to start"), None, None
    if outcome.state == "running":
        return _Stage("False", "Quantizing", f"the quantize Job {name} is running"), None, None
    if outcome.state == "succeeded" and outcome.result and outcome.result.get("status") == "Succeeded":
        artifact = _artifact_record(model, a_hash, outcome.result)
        return _Stage("True", "Quantized", _artifact_summary(artifact)), artifact, None
    if outcome.state == "succeeded":
        reason, message = "NoResult", (f"the quantize Job {name} succeeded but left no result in its Pod's "
                                       "termination message; delete the Job to run it again")
    else:
        reason, message = outcome.reason, f"the quantize Job {name} failed: {outcome.message}; fix the cause, " \
                                          "then delete the Job (or change the spec) to run it again"
    failure = {"stage": "Quantize", "key": a_hash, "reason": reason, "message": message}
    if outcome.exit_code is not None:
        failure["exitCode"] = outcome.exit_code
    return _Stage("False", reason, message), None, failure


def _evaluate_stage(model: Model, e_key: str, a_hash: str, name: str, artifact: dict, outcome: JobOutcome,
                    actions: list[Action]) -> tuple[_Stage, dict | None, dict | None]:
    """(condition, evaluation record, failure) from the evaluate Job; creates it when missing."""
    if outcome.state == "missing":
        actions.append(Create(builders.evaluate_job(model, artifact)))
    if outcome.state in ("missing", "pending", "running"):
        state = "running" if outcome.state == "running" else "pending"
        return _Stage("False", "Evaluating", f"the evaluate Job {name} is {state}"), None, None
    # A verdict, pass or fail, comes as a result; a failed gate is exit code 3, so a failed Job.
    if outcome.result and outcome.result.get("reason") in GATE_VERDICTS and "passed" in outcome.result:
        evaluation = _evaluation_record(model, e_key, a_hash, outcome.result, outcome.seconds)
        return _Stage("True", "Evaluated", f"served perplexity {evaluation.get('servedPerplexity')}"), evaluation, None
    if outcome.state == "succeeded":
        reason, message = "NoResult", (f"the evaluate Job {name} succeeded but left no verdict in its Pod's "
                                       "termination message; delete the Job to run it again")
    else:
        reason, message = outcome.reason, f"the evaluate Job {name} failed: {outcome.message}"
    failure = {"stage": "Evaluate", "key": e_key, "reason": reason, "message": message}
    if outcome.exit_code is not None:
        failure["exitCode"] = outcome.exit_code
    return _Stage("False", reason, message), None, failure


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
        actions: list[Action] = [Delete("v1", "PersistentVolumeClaim", st.claim_name)] if pvc else []
        return Deletion(actions, True, f"deleted the claim {st.claim_name} with its artifacts")
    outcome = job_outcome(cleanup, cleanup_pods, "cleanup")
    if outcome.state == "missing":
        # Stop vLLM first: it holds the artifact open.
        actions = [Delete("apps/v1", "Deployment", deployment["metadata"]["name"])] if deployment else []
        return Deletion([*actions, Create(builders.cleanup_job(model))], False, f"removing {where}")
    if outcome.state == "succeeded":
        return Deletion([], True, f"removed {where}")
    if outcome.state == "failed":
        return Deletion([], True, f"could not remove {where} ({outcome.reason}: {outcome.message}); "
                        "remove it by hand", warning=True)
    return Deletion([], False, f"removing {where}")
