"""The stages of one model, in order (STAGES): quantize -> preflight -> gate -> serve. Each returns its
conditions, the status records it keeps and the actions it needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubequant import builders
from kubequant.reconcile.checks import preflight, preflight_reason, rollout
from kubequant.reconcile.jobs import JobOutcome, job_outcome, pod_waiting, redact
from kubequant.reconcile.outcomes import (
    DEPLOYING,
    EVALUATING,
    GATE_FAILED,
    MISSING_API,
    PENDING,
    QUANTIZING,
    Action,
    Create,
    Delete,
    Observed,
    Update,
)
from kubequant.reconcile.records import artifact_record, evaluation_record, record_for, status_records
from kubequant.spec import AUTOSCALING_METRICS, Model
from quantizer.contract import GATE_VERDICTS, EvaluateResult, QuantizeResult

# ---- the decision -------------------------------------------------------------------------------

@dataclass
class Stage:
    """One condition-to-be: status True/False/Unknown, reason, message."""

    status: str
    reason: str
    message: str


@dataclass
class Context:
    """One model's decision in progress: the inputs, and what the stages before have found."""

    model: Model
    observed: Observed
    old: dict  # the status as it was
    a_hash: str
    e_key: str
    conditions: dict[str, Stage] = field(default_factory=dict)
    artifact: dict | None = None  # the record of the artifact the spec asks for, once quantized
    evaluation: dict | None = None  # its verdict, once evaluated
    candidate: dict | None = None  # {"artifact", "evaluation"} when it passed the gate and the preflight
    recipe_name: str | None = None  # the recipe candidate's name, when the spec lists candidates
    preflight_error: str | None = None
    failure: dict | None = None  # the first stage's failure

    @property
    def served(self) -> dict:
        return self.old.get("serving") or {}

    @property
    def serving_enabled(self) -> bool:
        return self.model.spec.serving.enabled


@dataclass
class StageResult:
    """What one stage decided: its conditions, the status records it keeps, the actions it needs,
    and, when the model stands at this stage, its phase and message (None: the stage is done)."""

    conditions: dict[str, Stage] = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    failure: dict | None = None
    phase: str | None = None
    message: str = ""


def _quantize(ctx: Context) -> StageResult:
    """The artifact: recorded, reused from what serves (a reverted spec), or the quantize Job's result."""
    model = ctx.model
    out = StageResult()
    artifact = record_for("hash", ctx.a_hash, status_records(ctx.old, "artifact"))
    if artifact:
        quantized = Stage("True", "Quantized", _artifact_summary(artifact))
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


def _gate(ctx: Context) -> StageResult:
    """The evaluate Job: the artifact measured in the serving engine, and the verdict."""
    out = StageResult()
    if ctx.old.get("evaluation"):
        out.records["evaluation"] = ctx.old["evaluation"]  # kept until a newer verdict replaces it
    if not ctx.serving_enabled:
        out.conditions["Evaluated"] = Stage("Unknown", "ServingDisabled",
                                             "serving is disabled: the artifact is not evaluated")
        out.conditions["GatePassed"] = Stage("Unknown", "ServingDisabled", "serving is disabled: the artifact is not gated")
        return out
    evaluated = Stage("Unknown", "WaitingForArtifact", "evaluation starts when the artifact is ready")
    gate = Stage("Unknown", "NotEvaluated", "the artifact has not been evaluated yet")
    evaluation, waiting = None, False
    if ctx.artifact and ctx.preflight_error:
        evaluated = Stage("Unknown", "PreflightFailed", f"not evaluated: {ctx.preflight_error}")
    elif ctx.artifact and ctx.failure is None:
        evaluation = record_for("key", ctx.e_key, status_records(ctx.old, "evaluation"))
        if evaluation is None:
            name = builders.evaluate_job_name(ctx.model)
            outcome = job_outcome(ctx.observed.jobs.get(name), ctx.observed.pods.get(name, []),
                                  builders.EVALUATE_CONTAINER)
            evaluated, evaluation, out.failure = _evaluate_job(ctx.model, ctx.e_key, ctx.a_hash, name, ctx.artifact,
                                                               outcome, out.actions)
            waiting = outcome.state == "waiting"
        if evaluation:
            out.records["evaluation"] = evaluation
            evaluated = Stage("True", "Evaluated", f"served perplexity {evaluation.get('servedPerplexity')}")
            gate = Stage("True" if evaluation["passed"] else "False", evaluation["reason"], evaluation["message"])
    ctx.evaluation = evaluation
    out.conditions.update(Evaluated=evaluated, GatePassed=gate)
    if evaluated.status != "True":
        out.phase, out.message = PENDING if waiting else EVALUATING, evaluated.message
    elif gate.status != "True":
        out.phase, out.message = GATE_FAILED, f"{gate.reason}: {gate.message}"
    return out


def _fits(artifact: dict, serving) -> str | None:
    """preflight() of an artifact under the spec's serving settings."""
    return preflight(artifact, serving.tensor_parallel_size, serving.nodes, serving.extra_args, dict(serving.env))


def _preflight(ctx: Context) -> StageResult:
    """Does the artifact fit the GPUs (whole groups per tensor-parallel shard)? Checked before the gate,
    which would otherwise hold GPUs for a tensor parallelism vLLM refuses."""
    out = StageResult()
    if not (ctx.serving_enabled and ctx.artifact):
        return out
    serving = ctx.model.spec.serving
    ctx.preflight_error = _fits(ctx.artifact, serving)
    if ctx.preflight_error:
        reason = preflight_reason(ctx.preflight_error)
        out.failure = {"stage": "Preflight", "key": ctx.e_key, "reason": reason, "message": ctx.preflight_error}
    return out


def _serve(ctx: Context) -> StageResult:
    """The serving workload and its companions: the new artifact if it passed and fits, else the last
    one that did."""
    if not ctx.serving_enabled:
        return _serving_disabled(ctx)
    model, observed, served = ctx.model, ctx.observed, ctx.served
    out = StageResult()
    tp = model.spec.serving.tensor_parallel_size
    kind = builders.workload_kind(model)
    if ctx.artifact and ctx.evaluation and ctx.evaluation["passed"] and not ctx.preflight_error:
        ctx.candidate = {"artifact": ctx.artifact, "evaluation": ctx.evaluation}
        if ctx.recipe_name:
            ctx.candidate["candidate"] = ctx.recipe_name
    previous = served if served.get("artifact") and _fits(served["artifact"], model.spec.serving) is None else None
    if not ctx.candidate and previous and (previous.get("evaluation") or {}).get("tensorParallelSize") != tp:
        return _serving_unchanged(ctx, f"the artifact is gated again at tensorParallelSize {tp}")
    target = ctx.candidate or previous
    if target and kind in observed.missing_kinds:
        out.records["serving"] = served
        out.conditions["Ready"] = Stage("False", f"{kind}NotInstalled", f"serving.nodes is {model.spec.serving.nodes}: "
                                         f"{MISSING_API[kind]}; what serves now is left as it is")
        return out
    if not target:
        if served:
            out.records["serving"] = served  # the workload is left as it is
        out.conditions["Ready"] = Stage("False", "NothingToServe", "no artifact has passed the gate yet" if not served
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
        ready = Stage("True", "Serving", f"serving {what} ({detail}){layout}")
    elif state == "available":
        ready = Stage("True", "ServingPreviousArtifact",
                       f"serving {what}, the last that passed the gate; {_why_not_current(ctx)}")
    elif state == "failed":
        ready = Stage("False", "ProgressDeadlineExceeded", detail)
        if current:
            out.failure = {"stage": "Deploy", "key": dep_hash, "reason": "ProgressDeadlineExceeded", "message": detail}
    elif stuck := pod_waiting(observed.server_pods):
        # A vLLM Pod the scheduler cannot place (no node with the GPUs free, a quota, a taint) or
        # whose image cannot be pulled: the rollout waits on it, and says why.
        ready = Stage("False", stuck[0], f"rolling out {what}: a vLLM Pod is waiting: {stuck[1]}")
        if current:
            out.phase, out.message = DEPLOYING, ready.message
    else:
        ready = Stage("False", "RollingOut", f"rolling out {what}: {detail}")
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


def _autoscaling_condition(model: Model, hpa: dict | None) -> Stage:
    a = model.spec.serving.autoscaling
    assert a is not None
    metric, _ = AUTOSCALING_METRICS[a.metric]
    if hpa is None:
        return Stage("Unknown", "Creating", "the HorizontalPodAutoscaler is being created")
    status = hpa.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("AbleToScale", "ScalingActive") and cond.get("status") == "False":
            return Stage("False", cond.get("reason") or "NotScaling", redact(cond.get("message") or ""))
    current = status.get("currentReplicas")
    return Stage("True", "Scaling", f"{current if current is not None else '?'} replicas within "
                  f"{a.min_replicas}..{a.max_replicas}, holding {metric} at {a.target} per Pod")


def _inference_pool_condition(model: Model, observed: Observed) -> Stage:
    pool = model.spec.serving.inference_pool
    assert pool is not None
    if "InferencePool" in observed.missing_kinds:
        return Stage("False", "InferencePoolNotInstalled", MISSING_API["InferencePool"])
    if observed.inference_pool is None:
        return Stage("Unknown", "Creating", "the InferencePool is being created")
    return Stage("True", "Created", f"InferencePool {model.name} selects the serving Pods on port "
                  f"{builders.VLLM_PORT}; endpoint picker {pool.endpoint_picker}:{pool.endpoint_picker_port} "
                  f"({pool.failure_mode})")


def _serving_unchanged(ctx: Context, why: str) -> StageResult:
    """What serves was measured at other serving settings: the workload stays as it is until the gate
    has measured them."""
    served = ctx.served
    kind = "LeaderWorkerSet" if ctx.observed.leader_worker_set and not ctx.observed.deployment else "Deployment"
    workload = ctx.observed.serving()[kind]
    replicas = ((workload or {}).get("spec") or {}).get("replicas") or ctx.model.spec.serving.replicas
    state, detail = rollout(workload, served.get("servingHash", ""), replicas, kind)
    what = f"artifact {served['artifact']['hash']}"
    ready = Stage("True", "ServingPreviousArtifact", f"serving {what} as it was; {why} before the {kind} "
                   f"changes") if state == "available" else Stage("False", "RollingOut", f"rolling out {what}: {detail}")
    return StageResult(conditions={"Ready": ready}, records={"serving": served})


def _serving_disabled(ctx: Context) -> StageResult:
    out = StageResult()
    for kind, present in ctx.observed.serving().items():
        if present:
            out.actions.append(Delete(builders.api_version(kind), kind, present["metadata"]["name"]))
    out.conditions["Ready"] = Stage("True", "ArtifactReady", f"serving is disabled; the artifact is at "
                                     f"{ctx.artifact['path']}") if ctx.artifact else \
        Stage("False", "ServingDisabled", "serving is disabled; the artifact is not ready yet")
    return out


# The stages in order. Each sees what the earlier ones found; the model's phase is that of the first
# stage that failed or is not done, READY when none.
STAGES = (_quantize, _preflight, _gate, _serve)


def _converge_serving(model: Model, artifact: dict, observed: Observed, out: StageResult) -> str:
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


def _why_not_current(ctx: Context) -> str:
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
                  actions: list[Action]) -> tuple[Stage, dict | None, dict | None]:
    """(condition, artifact record, failure) from the quantize Job; creates it when missing."""
    if outcome.state == "missing":
        actions.append(Create(builders.quantize_job(model)))
    if outcome.state in ("missing", "pending"):
        return Stage("False", "JobPending", f"waiting for the quantize Job {name} to start"), None, None
    if outcome.state == "waiting":
        return Stage("False", outcome.reason, f"the quantize Job {name} is waiting: {outcome.message}"), None, None
    if outcome.state == "running":
        return Stage("False", "Quantizing", f"the quantize Job {name} is running"), None, None
    result = QuantizeResult.from_dict(outcome.result) if outcome.state == "succeeded" else None
    if result:
        artifact = artifact_record(model, a_hash, result)
        return Stage("True", "Quantized", _artifact_summary(artifact)), artifact, None
    if outcome.state == "succeeded":
        reason, message = "NoResult", (f"the quantize Job {name} succeeded but left no result in its Pod's "
                                       "termination message; delete the Job to run it again")
    else:
        reason, message = outcome.reason, f"the quantize Job {name} failed: {outcome.message}; fix the cause, " \
                                          "then delete the Job (or change the spec) to run it again"
    failure = {"stage": "Quantize", "key": a_hash, "reason": reason, "message": message}
    if outcome.exit_code is not None:
        failure["exitCode"] = outcome.exit_code
    return Stage("False", reason, message), None, failure


def _evaluate_job(model: Model, e_key: str, a_hash: str, name: str, artifact: dict, outcome: JobOutcome,
                  actions: list[Action]) -> tuple[Stage, dict | None, dict | None]:
    """(condition, evaluation record, failure) from the evaluate Job; creates it when missing."""
    if outcome.state == "missing":
        actions.append(Create(builders.evaluate_job(model, artifact)))
    if outcome.state == "waiting":
        return Stage("False", outcome.reason, f"the evaluate Job {name} is waiting: {outcome.message}"), None, None
    if outcome.state in ("missing", "pending", "running"):
        state = "running" if outcome.state == "running" else "pending"
        return Stage("False", "Evaluating", f"the evaluate Job {name} is {state}"), None, None
    # A verdict, pass or fail, comes as a result; a failed gate is exit code 3, so a failed Job.
    verdict = EvaluateResult.from_dict(outcome.result)
    if verdict and verdict.reason in GATE_VERDICTS:
        evaluation = evaluation_record(model, e_key, a_hash, verdict, outcome.seconds)
        return Stage("True", "Evaluated", f"served perplexity {evaluation.get('servedPerplexity')}"), evaluation, None
    if outcome.state == "succeeded":
        reason, message = "NoResult", (f"the evaluate Job {name} succeeded but left no verdict in its Pod's "
                                       "termination message; delete the Job to run it again")
    else:
        reason, message = outcome.reason, f"the evaluate Job {name} failed: {outcome.message}"
    failure = {"stage": "Evaluate", "key": e_key, "reason": reason, "message": message}
    if outcome.exit_code is not None:
        failure["exitCode"] = outcome.exit_code
    return Stage("False", reason, message), None, failure
