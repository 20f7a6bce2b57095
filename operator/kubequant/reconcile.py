"""The reconciler's one decision: (QuantizedModel, observed children, now) -> (actions, new status, events).

Pure and level-triggered: it reads only its arguments, so a restarted operator, a missed watch event
or a resync tick all reach the same decision from the same state. Results that the cluster does not
keep forever (a Pod's termination message) are copied into the status once observed.

The flow for the artifact the spec asks for is a table of stages (STAGES), run in order:
    quantize (Job -> artifact record) -> preflight -> gate (evaluate Job -> verdict) -> serve.
Each returns its conditions, the records it keeps in status and the actions it needs; the phase is
derived in one place, from the first stage that failed or is not done.

Safe rollout: the Deployment is only ever built from an artifact that passed the gate. While a new
artifact is quantized or evaluated, or when it fails, the last one that passed keeps serving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubequant import builders
from kubequant.spec import AUTOSCALING_METRICS, Model, SpecError, parse_model
from quantizer.contract import GATE_VERDICTS, EvaluateResult, QuantizeResult, decode

PENDING, QUANTIZING, EVALUATING, DEPLOYING, READY, FAILED, GATE_FAILED = (
    "Pending", "Quantizing", "Evaluating", "Deploying", "Ready", "Failed", "GateFailed")
PHASES = (PENDING, QUANTIZING, EVALUATING, DEPLOYING, READY, FAILED, GATE_FAILED)
CONDITION_TYPES = ("Quantized", "Evaluated", "GatePassed", "Ready")
# Conditions of the children a spec may ask for: present only when it does.
OPTIONAL_CONDITION_TYPES = ("Autoscaling", "InferencePoolReady")
# What a missing CRD means, for the kinds a cluster may lack (builders.OPTIONAL_KINDS).
MISSING_API = {
    "ServiceMonitor": "the monitoring.coreos.com CRDs (Prometheus Operator) are not installed",
    "LeaderWorkerSet": "the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1) is not installed: install "
                       "LeaderWorkerSet (https://lws.sigs.k8s.io) or set serving.nodes to 1",
    "InferencePool": "the InferencePool API (inference.networking.k8s.io/v1) is not installed: install the "
                     "Gateway API Inference Extension CRDs or turn serving.inferencePool off",
}
MESSAGE_LIMIT = 1024


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
    leader_worker_set: dict | None = None
    hpa: dict | None = None
    inference_pool: dict | None = None
    missing_kinds: frozenset[str] = frozenset()  # of builders.OPTIONAL_KINDS: CRDs the cluster does not serve

    def serving(self) -> dict[str, dict | None]:
        """The serving children by kind, present or None."""
        return {"Deployment": self.deployment, "LeaderWorkerSet": self.leader_worker_set, "Service": self.service,
                "PodDisruptionBudget": self.pdb, "ServiceMonitor": self.service_monitor,
                "HorizontalPodAutoscaler": self.hpa, "InferencePool": self.inference_pool}


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


@dataclass(frozen=True)
class JobOutcome:
    state: str  # missing, pending, waiting (its Pod cannot run: reason, message), running, succeeded, failed
    result: dict | None = None  # the main container's termination message, decoded
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
                return JobOutcome("succeeded", result=decode(terminated.get("message")), seconds=seconds)
        return JobOutcome("succeeded", seconds=seconds)

    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        seconds = _duration(status.get("startTime"), failed.get("lastTransitionTime"))
        for name, terminated in terminations:
            code = terminated.get("exitCode")
            if code in (None, 0):
                continue
            result = decode(terminated.get("message"))
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

    stuck = pod_waiting(pods)
    if stuck:
        return JobOutcome("waiting", reason=stuck[0], message=redact(stuck[1]))
    if (status.get("active") or 0) > 0 or (status.get("ready") or 0) > 0:
        return JobOutcome("running")
    return JobOutcome("pending")


# A container that waits for one of these waits until someone acts (a missing Secret or image, a
# registry that refuses): nothing runs, and the model must say so rather than "running".
STUCK_CONTAINER_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


def pod_waiting(pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) when the newest Pod cannot run: the scheduler cannot place it (a claim that is
    missing or unbound, no node with the GPUs, a quota, a taint: PodScheduled is False with the
    scheduler's words), or a container cannot start. None while it runs, starts or ended."""
    if not pods:
        return None
    pod = max(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("reason") or "Unschedulable", condition.get("message") or "the Pod cannot be scheduled"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_CONTAINER_REASONS:
            return waiting["reason"], f"container {cs.get('name')}: {waiting.get('message') or waiting['reason']}"
    return None


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


# ---- records kept in status ---------------------------------------------------------------------

def _artifact_record(model: Model, a_hash: str, result: QuantizeResult) -> dict:
    record = {
        "hash": a_hash,
        "path": builders.artifact_dir(model, a_hash),
        "baselinePerplexity": result.baseline_ppl,
        "fakequantPerplexity": result.fakequant_ppl,
        "sizeBeforeBytes": result.size_before_bytes,
        "sizeAfterBytes": result.size_after_bytes,
        "seconds": result.seconds,
        "groupSize": result.group_size,
        "rowParallelInFeatures": result.row_parallel_in_features,
        "decoderLayers": result.decoder_layers,
    }
    return {k: v for k, v in record.items() if v is not None}


def _evaluation_record(model: Model, e_key: str, a_hash: str, verdict: EvaluateResult, seconds: float | None) -> dict:
    record = {
        "key": e_key,
        "artifactHash": a_hash,
        "passed": verdict.passed,
        "reason": verdict.reason,
        "message": redact(verdict.message),
        "servedPerplexity": verdict.served_ppl,
        "klDivergence": verdict.kl_divergence and {k: verdict.kl_divergence.get(k) for k in ("mean", "p99", "max")},
        "topTokenAgreement": verdict.top_token_agreement,
        "generationMatch": verdict.generation_match,
        "throughput": verdict.throughput and [_throughput_row(row) for row in verdict.throughput],
        "tasks": verdict.tasks and [_task_row(row) for row in verdict.tasks],
        "tensorParallelSize": model.spec.serving.tensor_parallel_size,
        "seconds": seconds,
    }
    return {k: v for k, v in record.items() if v is not None}


_THROUGHPUT_FIELDS = {"batch_size": "batchSize", "output_tokens_per_second": "outputTokensPerSecond",
                      "time_to_first_token_seconds": "timeToFirstTokenSeconds",
                      "source_output_tokens_per_second": "sourceOutputTokensPerSecond", "speedup": "speedup"}


def _throughput_row(row: dict) -> dict:
    return {camel: row[name] for name, camel in _THROUGHPUT_FIELDS.items() if isinstance(row, dict) and name in row}


_TASK_FIELDS = ("task", "metric", "source", "quantized", "drop", "stderr", "samples")


def _task_row(row: dict) -> dict:
    return {name: row[name] for name in _TASK_FIELDS if isinstance(row, dict) and row.get(name) is not None}


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


@dataclass
class _Context:
    """One model's decision in progress: the inputs, and what the stages before have found."""

    model: Model
    observed: Observed
    old: dict  # the status as it was
    a_hash: str
    e_key: str
    conditions: dict[str, _Stage] = field(default_factory=dict)
    artifact: dict | None = None  # the record of the artifact the spec asks for, once quantized
    evaluation: dict | None = None  # its verdict, once evaluated
    candidate: dict | None = None  # {"artifact", "evaluation"} when it passed the gate and the preflight
    preflight_error: str | None = None
    failure: dict | None = None  # the first stage's failure

    @property
    def served(self) -> dict:
        return self.old.get("serving") or {}

    @property
    def serving_enabled(self) -> bool:
        return self.model.spec.serving.enabled


@dataclass
class _StageResult:
    """What one stage decided: its conditions, the status records it keeps, the actions it needs,
    and, when the model stands at this stage, its phase and message (None: the stage is done)."""

    conditions: dict[str, _Stage] = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    failure: dict | None = None
    phase: str | None = None
    message: str = ""


def _quantize(ctx: _Context) -> _StageResult:
    """The artifact: recorded, reused from what serves (a reverted spec), or the quantize Job's result."""
    model = ctx.model
    out = _StageResult()
    artifact = _record_for("hash", ctx.a_hash, ctx.old.get("artifact"), ctx.served.get("artifact"))
    if artifact:
        quantized = _Stage("True", "Quantized", _artifact_summary(artifact))
    else:
        name = builders.quantize_job_name(model)
        outcome = job_outcome(ctx.observed.jobs.get(name), ctx.observed.pods.get(name, []),
                              builders.QUANTIZE_CONTAINER)
        quantized, artifact, out.failure = _quantize_job(model, ctx.a_hash, name, outcome, out.actions)
        out.phase = PENDING if outcome.state in ("missing", "pending", "waiting") else QUANTIZING
    ctx.artifact = artifact
    out.conditions["Quantized"] = quantized
    if artifact or ctx.old.get("artifact"):
        out.records["artifact"] = artifact or ctx.old["artifact"]  # the latest result, until a newer one
    if quantized.status != "True":
        out.message = quantized.message
    else:
        out.phase = None
    return out


def _gate(ctx: _Context) -> _StageResult:
    """The evaluate Job: the artifact measured in the serving engine, and the verdict."""
    out = _StageResult()
    if ctx.old.get("evaluation"):
        out.records["evaluation"] = ctx.old["evaluation"]  # kept until a newer verdict replaces it
    if not ctx.serving_enabled:
        out.conditions["Evaluated"] = _Stage("Unknown", "ServingDisabled",
                                             "serving is disabled: the artifact is not evaluated")
        out.conditions["GatePassed"] = _Stage("Unknown", "ServingDisabled", "serving is disabled: the artifact is not gated")
        return out
    evaluated = _Stage("Unknown", "WaitingForArtifact", "evaluation starts when the artifact is ready")
    gate = _Stage("Unknown", "NotEvaluated", "the artifact has not been evaluated yet")
    evaluation, waiting = None, False
    if ctx.artifact and ctx.preflight_error:
        evaluated = _Stage("Unknown", "PreflightFailed", f"not evaluated: {ctx.preflight_error}")
    elif ctx.artifact and ctx.failure is None:
        evaluation = _record_for("key", ctx.e_key, ctx.old.get("evaluation"), ctx.served.get("evaluation"))
        if evaluation is None:
            name = builders.evaluate_job_name(ctx.model)
            outcome = job_outcome(ctx.observed.jobs.get(name), ctx.observed.pods.get(name, []),
                                  builders.EVALUATE_CONTAINER)
            evaluated, evaluation, out.failure = _evaluate_job(ctx.model, ctx.e_key, ctx.a_hash, name, ctx.artifact,
                                                               outcome, out.actions)
            waiting = outcome.state == "waiting"
        if evaluation:
            out.records["evaluation"] = evaluation
            evaluated = _Stage("True", "Evaluated", f"served perplexity {evaluation.get('servedPerplexity')}")
            gate = _Stage("True" if evaluation["passed"] else "False", evaluation["reason"], evaluation["message"])
    ctx.evaluation = evaluation
    out.conditions.update(Evaluated=evaluated, GatePassed=gate)
    if evaluated.status != "True":
        out.phase, out.message = PENDING if waiting else EVALUATING, evaluated.message
    elif gate.status != "True":
        out.phase, out.message = GATE_FAILED, f"{gate.reason}: {gate.message}"
    return out


def _preflight(ctx: _Context) -> _StageResult:
    """Does the artifact fit the GPUs (whole groups per tensor-parallel shard)? Checked before the gate,
    which would otherwise hold GPUs for a tensor parallelism vLLM refuses."""
    out = _StageResult()
    if not (ctx.serving_enabled and ctx.artifact):
        return out
    serving = ctx.model.spec.serving
    ctx.preflight_error = preflight(ctx.artifact, serving.tensor_parallel_size, serving.nodes)
    if ctx.preflight_error:
        reason = "PipelineParallelMismatch" if ctx.preflight_error.startswith("serving.nodes") else "TensorParallelMismatch"
        out.failure = {"stage": "Preflight", "key": ctx.e_key, "reason": reason, "message": ctx.preflight_error}
    return out


def _serve(ctx: _Context) -> _StageResult:
    """The serving workload and its companions: the new artifact if it passed and fits, else the last
    one that did."""
    if not ctx.serving_enabled:
        return _serving_disabled(ctx)
    model, observed, served = ctx.model, ctx.observed, ctx.served
    out = _StageResult()
    tp = model.spec.serving.tensor_parallel_size
    kind = builders.workload_kind(model)
    if ctx.artifact and ctx.evaluation and ctx.evaluation["passed"] and not ctx.preflight_error:
        ctx.candidate = {"artifact": ctx.artifact, "evaluation": ctx.evaluation}
    previous = served if served.get("artifact") and \
        preflight(served["artifact"], tp, model.spec.serving.nodes) is None else None
    if not ctx.candidate and previous and (previous.get("evaluation") or {}).get("tensorParallelSize") != tp:
        return _serving_unchanged(ctx, f"the artifact is gated again at tensorParallelSize {tp}")
    target = ctx.candidate or previous
    if target and kind in observed.missing_kinds:
        out.records["serving"] = served
        out.conditions["Ready"] = _Stage("False", f"{kind}NotInstalled", f"serving.nodes is {model.spec.serving.nodes}: "
                                         f"{MISSING_API[kind]}; what serves now is left as it is")
        return out
    if not target:
        if served:
            out.records["serving"] = served  # the workload is left as it is
        out.conditions["Ready"] = _Stage("False", "NothingToServe", "no artifact has passed the gate yet" if not served
                                         else f"the serving artifact {served.get('artifact', {}).get('hash')} does "
                                         f"not fit tensorParallelSize {tp}; the {kind} is left unchanged")
        return out
    dep_hash = _converge_serving(model, target["artifact"], observed, out)
    workload = observed.serving()[kind]
    replicas = desired_replicas(model, workload)
    out.records["serving"] = {**target, "servingHash": dep_hash, "workload": kind, "replicas": replicas}
    state, detail = rollout(workload, dep_hash, replicas, kind)
    if state == "available":
        # A layout change (nodes 1 <-> n) retires the other workload once the new one serves.
        other = "Deployment" if kind == "LeaderWorkerSet" else "LeaderWorkerSet"
        if observed.serving()[other]:
            out.actions.append(Delete(builders.api_version(other), other, model.name))
    what = f"artifact {target['artifact']['hash']}"
    current = target is ctx.candidate
    layout = _layout_note(model, target)
    if state == "available" and current:
        ready = _Stage("True", "Serving", f"serving {what} ({detail}){layout}")
    elif state == "available":
        ready = _Stage("True", "ServingPreviousArtifact",
                       f"serving {what}, the last that passed the gate; {_why_not_current(ctx)}")
    elif state == "failed":
        ready = _Stage("False", "ProgressDeadlineExceeded", detail)
        if current:
            out.failure = {"stage": "Deploy", "key": dep_hash, "reason": "ProgressDeadlineExceeded", "message": detail}
    else:
        ready = _Stage("False", "RollingOut", f"rolling out {what}: {detail}")
        if current:
            out.phase, out.message = DEPLOYING, ready.message
    out.conditions["Ready"] = ready
    return out


def desired_replicas(model: Model, workload: dict | None) -> int:
    """The replicas the workload should have: the spec's, or, under an autoscaler, what the
    autoscaler set (at least its minimum)."""
    a = model.spec.serving.autoscaling
    if a is None:
        return model.spec.serving.replicas
    current = ((workload or {}).get("spec") or {}).get("replicas")
    return max(a.min_replicas, min(a.max_replicas, current)) if isinstance(current, int) else a.min_replicas


def _layout_note(model: Model, target: dict) -> str:
    """Which layout the gate measured, when it is not the one that serves."""
    s = model.spec.serving
    if s.nodes == 1:
        return ""
    gated = (target.get("evaluation") or {}).get("tensorParallelSize")
    return (f"; {s.nodes} nodes x {s.tensor_parallel_size} GPUs (pipeline parallel across nodes): the gate "
            f"measured tensorParallelSize {gated} on one node, and pipeline stages split layers, not matrices, "
            "so each layer computes as it was gated")


def _autoscaling_condition(model: Model, hpa: dict | None) -> _Stage:
    a = model.spec.serving.autoscaling
    assert a is not None
    metric, _ = AUTOSCALING_METRICS[a.metric]
    if hpa is None:
        return _Stage("Unknown", "Creating", "the HorizontalPodAutoscaler is being created")
    status = hpa.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("AbleToScale", "ScalingActive") and cond.get("status") == "False":
            return _Stage("False", cond.get("reason") or "NotScaling", redact(cond.get("message") or ""))
    current = status.get("currentReplicas")
    return _Stage("True", "Scaling", f"{current if current is not None else '?'} replicas within "
                  f"{a.min_replicas}..{a.max_replicas}, holding {metric} at {a.target} per Pod")


def _inference_pool_condition(model: Model, observed: Observed) -> _Stage:
    pool = model.spec.serving.inference_pool
    assert pool is not None
    if "InferencePool" in observed.missing_kinds:
        return _Stage("False", "InferencePoolNotInstalled", MISSING_API["InferencePool"])
    if observed.inference_pool is None:
        return _Stage("Unknown", "Creating", "the InferencePool is being created")
    return _Stage("True", "Created", f"InferencePool {model.name} selects the serving Pods on port "
                  f"{builders.VLLM_PORT}; endpoint picker {pool.endpoint_picker}:{pool.endpoint_picker_port} "
                  f"({pool.failure_mode})")


def _serving_unchanged(ctx: _Context, why: str) -> _StageResult:
    """What serves was measured at other serving settings: the workload stays as it is until the gate
    has measured them."""
    served = ctx.served
    kind = "LeaderWorkerSet" if ctx.observed.leader_worker_set and not ctx.observed.deployment else "Deployment"
    workload = ctx.observed.serving()[kind]
    replicas = ((workload or {}).get("spec") or {}).get("replicas") or ctx.model.spec.serving.replicas
    state, detail = rollout(workload, served.get("servingHash", ""), replicas, kind)
    what = f"artifact {served['artifact']['hash']}"
    ready = _Stage("True", "ServingPreviousArtifact", f"serving {what} as it was; {why} before the {kind} "
                   f"changes") if state == "available" else _Stage("False", "RollingOut", f"rolling out {what}: {detail}")
    return _StageResult(conditions={"Ready": ready}, records={"serving": served})


def _serving_disabled(ctx: _Context) -> _StageResult:
    out = _StageResult()
    for kind, present in ctx.observed.serving().items():
        if present:
            out.actions.append(Delete(builders.api_version(kind), kind, present["metadata"]["name"]))
    out.conditions["Ready"] = _Stage("True", "ArtifactReady", f"serving is disabled; the artifact is at "
                                     f"{ctx.artifact['path']}") if ctx.artifact else \
        _Stage("False", "ServingDisabled", "serving is disabled; the artifact is not ready yet")
    return out


# The stages in order. Each sees what the earlier ones found; the model's phase is that of the first
# stage that failed or is not done, READY when none.
STAGES = (_quantize, _preflight, _gate, _serve)


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
    ctx = _Context(model, observed, old, builders.artifact_hash(model), builders.evaluation_key(model))
    actions = _housekeeping(model, observed, (builders.quantize_job_name(model), builders.evaluate_job_name(model)))
    status: dict[str, Any] = {"artifactHash": ctx.a_hash, "observedGeneration": model.generation}
    standing: _StageResult | None = None  # the first stage that failed or is not done
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
    status["phase"] = phase
    status["message"] = message
    status["conditions"] = _conditions(old.get("conditions", []), ctx.conditions, model.generation, now)
    events = _action_events(actions) + _phase_event(old.get("phase"), phase, message)
    return Decision(status, actions, events)


def _converge_serving(model: Model, artifact: dict, observed: Observed, out: _StageResult) -> str:
    """Create or update the serving objects for `artifact` (the conditions of the optional ones into
    `out`); returns the workload's content hash."""
    desired = {obj["kind"]: obj for obj in builders.serving_objects(model, artifact)}
    current = observed.serving()
    for kind, obj in desired.items():
        present = current[kind]
        if kind in observed.missing_kinds:
            continue  # its condition says so; nothing to create until the CRD is there
        if present is None:
            out.actions.append(Create(obj))
        elif (present["metadata"].get("annotations") or {}).get(builders.ANNOTATION_HASH) != \
                obj["metadata"]["annotations"][builders.ANNOTATION_HASH]:
            out.actions.append(Update(obj))
    for kind in ("PodDisruptionBudget", "ServiceMonitor", "HorizontalPodAutoscaler", "InferencePool"):
        if kind not in desired and current[kind]:
            out.actions.append(Delete(builders.api_version(kind), kind, current[kind]["metadata"]["name"]))
    if model.spec.serving.autoscaling:
        out.conditions["Autoscaling"] = _autoscaling_condition(model, observed.hpa)
    if model.spec.serving.inference_pool:
        out.conditions["InferencePoolReady"] = _inference_pool_condition(model, observed)
    workload = desired[builders.workload_kind(model)]
    return workload["metadata"]["annotations"][builders.ANNOTATION_HASH]


def _artifact_summary(artifact: dict) -> str:
    parts = [f"artifact at {artifact['path']}"]
    if artifact.get("sizeBeforeBytes") and artifact.get("sizeAfterBytes"):
        parts.append(f"{artifact['sizeBeforeBytes'] / 2**30:.2f} GiB -> {artifact['sizeAfterBytes'] / 2**30:.2f} GiB")
    if artifact.get("fakequantPerplexity") is not None:
        parts.append(f"perplexity {artifact.get('baselinePerplexity')} -> {artifact['fakequantPerplexity']} (quantizer)")
    return ", ".join(parts)


def _why_not_current(ctx: _Context) -> str:
    quantized, evaluated, gate = (ctx.conditions[k] for k in ("Quantized", "Evaluated", "GatePassed"))
    if quantized.status != "True":
        return f"the current spec's artifact is not ready ({quantized.reason}: {quantized.message})"
    if ctx.preflight_error:
        return f"the current spec's artifact failed the preflight: {ctx.preflight_error}"
    if evaluated.status != "True":
        return f"the current spec's artifact is not evaluated ({evaluated.reason})"
    if gate.status != "True":
        return f"the current spec's artifact failed the gate ({gate.reason}: {gate.message})"
    return "the current spec's artifact is being rolled out"


def _quantize_job(model: Model, a_hash: str, name: str, outcome: JobOutcome,
                  actions: list[Action]) -> tuple[_Stage, dict | None, dict | None]:
    """(condition, artifact record, failure) from the quantize Job; creates it when missing."""
    if outcome.state == "missing":
        actions.append(Create(builders.quantize_job(model)))
    if outcome.state in ("missing", "pending"):
        return _Stage("False", "JobPending", f"waiting for the quantize Job {name} to start"), None, None
    if outcome.state == "waiting":
        return _Stage("False", outcome.reason, f"the quantize Job {name} is waiting: {outcome.message}"), None, None
    if outcome.state == "running":
        return _Stage("False", "Quantizing", f"the quantize Job {name} is running"), None, None
    result = QuantizeResult.from_dict(outcome.result) if outcome.state == "succeeded" else None
    if result:
        artifact = _artifact_record(model, a_hash, result)
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


def _evaluate_job(model: Model, e_key: str, a_hash: str, name: str, artifact: dict, outcome: JobOutcome,
                  actions: list[Action]) -> tuple[_Stage, dict | None, dict | None]:
    """(condition, evaluation record, failure) from the evaluate Job; creates it when missing."""
    if outcome.state == "missing":
        actions.append(Create(builders.evaluate_job(model, artifact)))
    if outcome.state == "waiting":
        return _Stage("False", outcome.reason, f"the evaluate Job {name} is waiting: {outcome.message}"), None, None
    if outcome.state in ("missing", "pending", "running"):
        state = "running" if outcome.state == "running" else "pending"
        return _Stage("False", "Evaluating", f"the evaluate Job {name} is {state}"), None, None
    # A verdict, pass or fail, comes as a result; a failed gate is exit code 3, so a failed Job.
    verdict = EvaluateResult.from_dict(outcome.result)
    if verdict and verdict.reason in GATE_VERDICTS:
        evaluation = _evaluation_record(model, e_key, a_hash, verdict, outcome.seconds)
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
