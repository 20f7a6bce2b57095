"""The decision function, without kopf or an API: tables of (state -> decision) and short scenarios.

`Sim` plays the API for the pure function: it stores what the actions create, and the test moves
Jobs and Deployments along as their controllers would.
"""

from __future__ import annotations

import copy

import pytest
from kubequant import builders
from kubequant.reconcile import (
    Create,
    Decision,
    Delete,
    Observed,
    Update,
    decide,
    decide_deletion,
    job_outcome,
    preflight,
    preflight_reason,
    rollout,
)
from kubequant.spec import parse_model

from tests.operator_support.objects import (
    PASSED,
    QUANTIZE_RESULT,
    REGRESSED,
    available,
    example,
    pending_pod,
    pod,
    with_spec,
    with_status,
)

NOW = "2026-01-02T03:04:05Z"


class Sim:
    """The cluster's state as the pure function sees it, moved by its actions and by the test."""

    def __init__(self, body: dict):
        self.body = copy.deepcopy(body)
        self.objs: dict[tuple[str, str], dict] = {}
        self.pods: dict[str, list[dict]] = {}
        self.server_pods: list[dict] = []
        self.missing: frozenset[str] = frozenset()  # CRDs the simulated cluster lacks

    @property
    def model(self):
        return parse_model(self.body)

    def observed(self) -> Observed:
        get = {kind: obj for (kind, _), obj in self.objs.items() if kind != "Job"}
        return Observed(
            jobs={name: obj for (kind, name), obj in self.objs.items() if kind == "Job"},
            pods=copy.deepcopy(self.pods),
            server_pods=copy.deepcopy(self.server_pods),
            deployment=get.get("Deployment"), service=get.get("Service"), pdb=get.get("PodDisruptionBudget"),
            service_monitor=get.get("ServiceMonitor"), pvc=get.get("PersistentVolumeClaim"),
            leader_worker_set=get.get("LeaderWorkerSet"), hpa=get.get("HorizontalPodAutoscaler"),
            inference_pool=get.get("InferencePool"), missing_kinds=self.missing,
        )

    def step(self, now: str = NOW) -> Decision:
        decision = decide(self.body, self.observed(), now)
        for action in decision.actions:
            if isinstance(action, Delete):
                self.objs.pop((action.kind, action.name), None)
                continue
            key = (action.obj["kind"], action.obj["metadata"]["name"])
            if isinstance(action, Create):
                assert key not in self.objs, f"duplicate {key}"
            self.objs[key] = copy.deepcopy(action.obj)
        self.body["status"] = decision.status
        return decision

    def job(self, component: str) -> dict:
        [job] = [o for (k, _), o in self.objs.items() if k == "Job"
                 and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        return job

    def finish(self, component: str, state: str, result: dict | None = None, **pod_kwargs) -> None:
        job = self.job(component)
        name = job["metadata"]["name"]
        self.objs[("Job", name)] = with_status(job, state)
        if state in ("succeeded", "failed"):
            container = {"quantize": "quantize", "evaluate": "evaluate"}[component]
            code = pod_kwargs.pop("exit_code", 0 if state == "succeeded" else 1)
            self.pods[name] = [pod(job, pod_kwargs.pop("container", container), exit_code=code, result=result,
                                   **pod_kwargs)]

    def deployment_available(self) -> None:
        self.objs[("Deployment", self.model.name)] = available(self.objs[("Deployment", self.model.name)])

    def set_spec(self, path: str, value) -> None:
        self.body = with_spec(self.body, path, value)

    def to_ready(self) -> None:
        self.step()
        self.finish("quantize", "succeeded", QUANTIZE_RESULT)
        self.step()
        self.finish("evaluate", "succeeded", PASSED)
        self.step()
        self.deployment_available()
        assert self.step().status["phase"] == "Ready"


def kinds(decision: Decision) -> list[str]:
    out = []
    for a in decision.actions:
        kind = a.kind if isinstance(a, Delete) else a.obj["kind"]
        if kind == "Job" and not isinstance(a, Delete):
            kind = f"Job/{a.obj['metadata']['labels']['app.kubernetes.io/component']}"
        out.append(f"{type(a).__name__} {kind}")
    return out


def condition(decision: Decision, kind: str) -> dict:
    return next(c for c in decision.status["conditions"] if c["type"] == kind)


def tiny() -> dict:
    return example("tiny.yaml")


def tiny_on_gpus() -> dict:
    """The tiny example served by vLLM on GPUs (where tensor parallelism applies)."""
    return with_spec(tiny(), "serving.device", "gpu")


# ---- one step from a state: (name, body, how the test moves the cluster first, phase, actions) -----

def _fresh(sim):
    pass


def _quantize_pending(sim):
    sim.step()


def _quantize_running(sim):
    sim.step()
    sim.finish("quantize", "running")


def _quantized(sim):
    sim.step()
    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)


def _evaluating(sim):
    _quantized(sim)
    sim.step()
    sim.finish("evaluate", "running")


def _passed(sim):
    _quantized(sim)
    sim.step()
    sim.finish("evaluate", "succeeded", PASSED)


def _regressed(sim):
    _quantized(sim)
    sim.step()
    sim.finish("evaluate", "failed", REGRESSED, exit_code=3)


def _deploying(sim):
    _passed(sim)
    sim.step()


def _available(sim):
    _deploying(sim)
    sim.deployment_available()


STEPS = [
    ("new model", example(), _fresh, "Pending", ["Create PersistentVolumeClaim", "Create Job/quantize"]),
    ("new model, existing claim", tiny(), _fresh, "Pending", ["Create Job/quantize"]),
    ("quantize Job not started", tiny(), _quantize_pending, "Pending", []),
    ("quantize Job running", tiny(), _quantize_running, "Quantizing", []),
    ("quantized", tiny(), _quantized, "Evaluating", ["Create Job/evaluate"]),
    ("evaluating", tiny(), _evaluating, "Evaluating", []),
    ("gate passed", tiny(), _passed, "Deploying", ["Create Deployment", "Create Service"]),
    ("gate passed, 2 replicas + monitor", example(), _passed, "Deploying",
     ["Create Deployment", "Create Service", "Create PodDisruptionBudget", "Create ServiceMonitor"]),
    ("gate failed, nothing served before", tiny(), _regressed, "GateFailed", []),
    ("rolling out", tiny(), _deploying, "Deploying", []),
    ("available", tiny(), _available, "Ready", []),
    ("quantize only", with_spec(tiny(), "serving.enabled", False), _quantized, "Ready", []),
]


@pytest.mark.parametrize(("what", "body", "setup", "phase", "actions"), STEPS, ids=[s[0] for s in STEPS])
def test_step(what, body, setup, phase, actions):
    sim = Sim(body)
    setup(sim)
    decision = sim.step()
    assert decision.status["phase"] == phase
    assert kinds(decision) == actions
    # Level-triggered: the same state again decides nothing new.
    again = sim.step()
    assert kinds(again) == [] and again.status["phase"] == phase and again.events == []


# ---- failures: (name, how the Job ends, phase, failure reason, words in the message) ------------------

FAILURES = [
    ("OOMKilled", dict(state="failed", exit_code=137, reason="OOMKilled"), "OOMKilled", "ran out of memory"),
    ("bad input", dict(state="failed", exit_code=2, result={"status": "Failed", "reason": "InvalidInput",
                                                             "message": "--calibration: no such file"}),
     "InvalidInput", "--calibration: no such file"),
    ("crash without result", dict(state="failed", exit_code=1), "Error", "exited with code 1"),
    ("terminated (SIGTERM) on every try", dict(state="failed", exit_code=1, result={
        "status": "Failed", "reason": "Terminated",
        "message": "terminated by SIGTERM after 12 decoder layers; the partial output was removed"}),
     "Terminated", "after 12 decoder layers"),
    ("disk full", dict(state="failed", exit_code=1, result={
        "status": "Failed", "reason": "DiskFull", "message": "the output volume is full"}), "DiskFull", "volume is full"),
    ("success without result", dict(state="succeeded", exit_code=0), "NoResult", "termination message"),
    ("gated repo in the fetch init container",
     dict(state="failed", exit_code=2, container="fetch", init=True,
          result={"status": "Failed", "reason": "InvalidInput", "message": "gated: use HF_TOKEN hf_abcdefghijklmnop"}),
     "InvalidInput", "fetch: gated"),
]


@pytest.mark.parametrize(("what", "end", "reason", "words"), FAILURES, ids=[f[0] for f in FAILURES])
def test_quantize_failure(what, end, reason, words):
    sim = Sim(tiny())
    sim.step()
    end = dict(end)
    sim.finish("quantize", end.pop("state"), end.pop("result", None), **end)
    decision = sim.step()
    assert decision.status["phase"] == "Failed"
    failure = decision.status["failure"]
    assert failure["stage"] == "Quantize" and failure["reason"] == reason
    assert words in failure["message"]
    assert condition(decision, "Quantized")["status"] == "False"
    assert "hf_abcdefghijklmnop" not in str(decision.status) + str(decision.events)
    assert decision.actions == []  # no retry loop: the Job's backoffLimit already retried
    assert any(e.type == "Warning" and e.reason == "Failed" for e in decision.events)


def test_evaluate_job_crash_is_failed_not_gate_failed():
    sim = Sim(tiny())
    _quantized(sim)
    sim.step()
    sim.finish("evaluate", "failed", exit_code=137, reason="OOMKilled")
    decision = sim.step()
    assert decision.status["phase"] == "Failed"
    assert decision.status["failure"]["stage"] == "Evaluate"
    assert condition(decision, "GatePassed")["status"] == "Unknown"


def test_gate_failure_records_the_verdict():
    sim = Sim(tiny())
    _regressed(sim)
    decision = sim.step()
    assert decision.status["phase"] == "GateFailed"
    gate = condition(decision, "GatePassed")
    assert (gate["status"], gate["reason"]) == ("False", "PerplexityRegression")
    assert decision.status["evaluation"]["servedPerplexity"] == 14.2
    assert decision.status["quantizedPerplexity"] == 14.2 and decision.status["baselinePerplexity"] == 12.5
    assert condition(decision, "Ready")["reason"] == "NothingToServe"


# ---- safe rollout -------------------------------------------------------------------------------------

def _deployment_args(sim: Sim) -> list[str]:
    return sim.objs[("Deployment", sim.model.name)]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_recipe_change_keeps_serving_until_the_new_artifact_passes():
    sim = Sim(tiny())
    sim.to_ready()
    old_path = _deployment_args(sim)[0]
    old_hash = sim.body["status"]["serving"]["artifact"]["hash"]

    sim.set_spec("quantization.calibration.samples", 64)
    decision = sim.step()
    # The finished Jobs of the old recipe go (their results are in status); no Update of the Deployment.
    assert kinds(decision) == ["Delete Job", "Delete Job", "Create Job/quantize"]
    assert decision.status["phase"] == "Pending"
    ready = condition(decision, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ServingPreviousArtifact")
    assert ready["lastTransitionTime"] == NOW and old_hash in ready["message"]

    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
    assert kinds(sim.step()) == ["Create Job/evaluate"]
    sim.finish("evaluate", "failed", REGRESSED, exit_code=3)
    decision = sim.step()
    assert decision.status["phase"] == "GateFailed" and decision.actions == []
    assert _deployment_args(sim)[0] == old_path
    ready = condition(decision, "Ready")
    assert ready["status"] == "True" and "failed the gate" in ready["message"]

    # A new recipe that passes replaces it; the superseded Jobs go.
    sim.set_spec("quantization.dampPercent", 2.0)
    decision = sim.step()
    assert kinds(decision) == ["Delete Job", "Delete Job", "Create Job/quantize"]
    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
    sim.step()
    sim.finish("evaluate", "succeeded", PASSED)
    decision = sim.step()
    assert kinds(decision) == ["Update Deployment"]
    assert decision.status["phase"] == "Deploying"
    assert _deployment_args(sim)[0] != old_path
    assert decision.status["serving"]["artifact"]["hash"] == decision.status["artifactHash"]
    sim.deployment_available()
    assert sim.step().status["phase"] == "Ready"


def test_serving_only_change_never_requantizes():
    sim = Sim(tiny())
    sim.to_ready()
    sim.set_spec("serving.replicas", 3)
    sim.set_spec("serving.extraArgs", ["--enable-prefix-caching"])
    decision = sim.step()
    assert kinds(decision) == ["Update Deployment", "Create PodDisruptionBudget"]
    assert decision.status["phase"] == "Deploying"
    assert "--enable-prefix-caching" in _deployment_args(sim)
    sim.deployment_available()
    assert sim.step().status["phase"] == "Ready"
    sim.set_spec("serving.replicas", 1)
    assert kinds(sim.step()) == ["Update Deployment", "Delete PodDisruptionBudget"]


def test_threshold_change_evaluates_again_without_quantizing():
    sim = Sim(tiny())
    sim.to_ready()
    sim.set_spec("evaluation.maxPerplexityRatio", 1.01)
    decision = sim.step()
    assert kinds(decision) == ["Delete Job", "Create Job/evaluate"]  # the old verdict's Job goes
    assert sim.job("quantize")  # the artifact's Job stays: same recipe
    assert decision.status["phase"] == "Evaluating"
    assert condition(decision, "Ready")["status"] == "True"


def test_reverting_to_the_served_recipe_reuses_its_artifact():
    sim = Sim(tiny())
    sim.to_ready()
    served = sim.body["status"]["serving"]["artifact"]["hash"]
    sim.set_spec("quantization.calibration.samples", 64)
    sim.step()
    sim.set_spec("quantization.calibration.samples", 32)
    decision = sim.step()
    assert decision.status["artifactHash"] == served
    assert kinds(decision) == ["Delete Job"]  # only the superseded quantize Job
    assert decision.status["phase"] == "Ready"


def test_serving_disabled_removes_the_serving_objects():
    sim = Sim(tiny())
    sim.to_ready()
    sim.set_spec("serving.enabled", False)
    decision = sim.step()
    assert kinds(decision) == ["Delete Deployment", "Delete Service"]
    assert decision.status["phase"] == "Ready"
    assert condition(decision, "Ready")["reason"] == "ArtifactReady"


# ---- preflight ----------------------------------------------------------------------------------------

def test_tensor_parallel_preflight_blocks_the_rollout():
    sim = Sim(tiny_on_gpus())
    sim.to_ready()
    sim.set_spec("serving.tensorParallelSize", 4)
    sim.body["status"]["serving"]["artifact"]["rowParallelInFeatures"] = [4096, 11008]
    sim.body["status"]["artifact"]["rowParallelInFeatures"] = [4096, 11008]
    decision = sim.step()
    # The Deployment is left as it is, and no evaluate Job holds GPUs for a TP vLLM would refuse: only
    # the Job of the old verdict (measured at the old TP) goes.
    assert kinds(decision) == ["Delete Job"]
    assert decision.status["phase"] == "Failed"
    failure = decision.status["failure"]
    assert failure["reason"] == "TensorParallelMismatch"
    assert "11008 -> 2752" in failure["message"] and "tensorParallelSize 2" in failure["message"]
    assert condition(decision, "Evaluated")["reason"] == "PreflightFailed"


def test_the_agreement_with_the_source_model_lands_in_status():
    sim = Sim(tiny())
    sim.step()
    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
    sim.step()
    verdict = {**PASSED, "kl_divergence": {"mean": 0.012, "p99": 0.068, "max": 0.21}, "top_token_agreement": 0.902,
               "generation_match": 0.2, "generations": {"prompts": 10},
               "throughput": [{"batch_size": 16, "output_tokens_per_second": 900.0, "time_to_first_token_seconds": 0.2,
                               "source_output_tokens_per_second": 500.0, "speedup": 1.8}],
               "tasks": [{"task": "python_identifier", "metric": "acc", "source": 0.2, "quantized": 0.19,
                          "drop": 0.01, "stderr": None, "samples": 100}]}
    sim.finish("evaluate", "succeeded", verdict)
    evaluation = sim.step().status["evaluation"]
    assert evaluation["klDivergence"] == {"mean": 0.012, "p99": 0.068, "max": 0.21}
    assert evaluation["topTokenAgreement"] == 0.902 and evaluation["generationMatch"] == 0.2
    assert "generations" not in evaluation  # details stay in the Job's result
    assert evaluation["throughput"] == [{"batchSize": 16, "outputTokensPerSecond": 900.0, "timeToFirstTokenSeconds": 0.2,
                                         "sourceOutputTokensPerSecond": 500.0, "speedup": 1.8}]
    # An unmeasured standard error is left out rather than written as null (the schema types it a number).
    assert evaluation["tasks"] == [{"task": "python_identifier", "metric": "acc", "source": 0.2, "quantized": 0.19,
                                    "drop": 0.01, "samples": 100}]


def test_a_tensor_parallel_change_is_gated_before_the_deployment_changes():
    sim = Sim(tiny_on_gpus())
    sim.to_ready()
    serving_hash = sim.body["status"]["serving"]["servingHash"]
    sim.set_spec("serving.tensorParallelSize", 2)
    decision = sim.step()
    assert kinds(decision) == ["Delete Job", "Create Job/evaluate"]  # a new verdict, at TP 2
    assert sim.job("evaluate")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert sim.job("quantize")  # the same artifact
    assert decision.status["phase"] == "Evaluating"
    ready = condition(decision, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "ServingPreviousArtifact"
    assert "gated again at tensorParallelSize 2" in ready["message"]
    assert decision.status["serving"]["servingHash"] == serving_hash
    assert "--tensor-parallel-size" in _deployment_args(sim)
    assert _deployment_args(sim)[_deployment_args(sim).index("--tensor-parallel-size") + 1] == "1"

    sim.finish("evaluate", "succeeded", PASSED)
    decision = sim.step()
    assert kinds(decision) == ["Update Deployment"]
    args = _deployment_args(sim)
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert decision.status["serving"]["evaluation"]["tensorParallelSize"] == 2
    sim.deployment_available()
    assert sim.step().status["phase"] == "Ready"


def test_a_failed_gate_at_the_new_tensor_parallelism_keeps_the_deployment():
    sim = Sim(tiny_on_gpus())
    sim.to_ready()
    sim.set_spec("serving.tensorParallelSize", 2)
    sim.step()
    sim.finish("evaluate", "failed", REGRESSED, exit_code=3)
    decision = sim.step()
    assert kinds(decision) == []
    assert decision.status["phase"] == "GateFailed"
    args = _deployment_args(sim)
    assert args[args.index("--tensor-parallel-size") + 1] == "1"


@pytest.mark.parametrize(("features", "group", "tp", "ok"), [
    ([4096, 14336], 128, 2, True),
    ([4096, 14336], 128, 8, True),
    ([4096, 11008], 128, 4, False),  # Llama-2-7B down_proj
    ([5120, 13824], 128, 8, False),  # Llama-2-13B down_proj
    ([5120, 13824], -1, 8, True),    # no groups: only the split itself must be whole
    ([384], 32, 4, True),
    ([384], 128, 2, False),
    ([], 128, 4, True),              # nothing reported: nothing to refuse
])
def test_preflight(features, group, tp, ok):
    assert (preflight({"groupSize": group, "rowParallelInFeatures": features}, tp) is None) == ok


# ---- rollout and Jobs -------------------------------------------------------------------------------

def test_rollout_states():
    model = parse_model(tiny())
    dep = builders.deployment(model, {"hash": "h", "path": "p"})
    desired = dep["metadata"]["annotations"][builders.ANNOTATION_HASH]
    assert rollout(None, desired, 1)[0] == "progressing"
    assert rollout(dep, "other", 1)[0] == "progressing"
    assert rollout(available(dep), desired, 1)[0] == "available"
    stale = available(dep)
    stale["metadata"]["generation"] = 2
    assert rollout(stale, desired, 1)[0] == "progressing"
    surge = available(dep)
    surge["status"]["replicas"] = 2  # an old Pod still there
    assert rollout(surge, desired, 1)[0] == "progressing"
    stuck = available(dep)
    stuck["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                      "message": "ReplicaSet has timed out progressing."}]
    assert rollout(stuck, desired, 1) == ("failed", "ReplicaSet has timed out progressing.")


def test_stuck_rollout_fails():
    sim = Sim(tiny())
    _deploying(sim)
    dep = available(sim.objs[("Deployment", "tiny-llama")], replicas=0)
    dep["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": "ReplicaSet has timed out progressing."}]
    sim.objs[("Deployment", "tiny-llama")] = dep
    decision = sim.step()
    assert decision.status["phase"] == "Failed"
    assert decision.status["failure"]["reason"] == "ProgressDeadlineExceeded"


def test_job_outcome_picks_the_newest_pod():
    job = with_status(builders.quantize_job(parse_model(tiny())), "failed")
    old = pod(job, "quantize", exit_code=137, reason="OOMKilled", created="2026-01-01T00:00:00Z")
    new = pod(job, "quantize", exit_code=1, result={"status": "Failed", "reason": "Error", "message": "boom"},
              created="2026-01-01T00:10:00Z")
    outcome = job_outcome(job, [old, new], "quantize")
    assert (outcome.state, outcome.reason, outcome.message, outcome.exit_code) == ("failed", "Error", "boom", 1)
    assert outcome.seconds == 1800.0


# ---- status conventions -------------------------------------------------------------------------------

def test_conditions_follow_api_conventions():
    sim = Sim(tiny())
    first = sim.step("2026-01-01T00:00:00Z")
    assert [c["type"] for c in first.status["conditions"]] == ["Quantized", "Evaluated", "GatePassed", "Ready"]
    assert all(c["observedGeneration"] == 1 and c["reason"] and c["message"] for c in first.status["conditions"])
    sim.finish("quantize", "running")
    second = sim.step("2026-01-01T00:05:00Z")
    # Still False: the transition time stays even though the reason moved on.
    quantized = condition(second, "Quantized")
    assert (quantized["reason"], quantized["lastTransitionTime"]) == ("Quantizing", "2026-01-01T00:00:00Z")
    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
    third = sim.step("2026-01-01T00:10:00Z")
    assert condition(third, "Quantized")["lastTransitionTime"] == "2026-01-01T00:10:00Z"
    assert third.status["observedGeneration"] == 1


def test_one_event_per_phase_transition():
    sim = Sim(tiny())
    first = sim.step()
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "Created"), ("Normal", "Pending")]
    assert sim.step().events == []


def test_invalid_spec_fails_without_touching_anything():
    sim = Sim(tiny())
    sim.to_ready()
    sim.set_spec("serving.tensorParallelSize", 3)
    decision = sim.step()
    assert decision.actions == []
    assert decision.status["phase"] == "Failed"
    assert decision.status["failure"]["reason"] == "InvalidSpec"
    assert "power of two" in decision.status["message"]
    assert condition(decision, "Ready")["reason"] == "ServingPreviousArtifact"
    assert decision.status["serving"]  # kept: it is what still runs


# ---- deletion -----------------------------------------------------------------------------------------

def _deletion(body, cleanup=None, pods=(), pvc=None, deployment=None):
    return decide_deletion(parse_model(body), cleanup, list(pods), pvc, deployment)


def test_retain_keeps_everything():
    deletion = _deletion(tiny())
    assert deletion.done and deletion.actions == []


def test_delete_removes_a_created_claim():
    body = with_spec(example(), "storage.retentionPolicy", "Delete")
    deletion = _deletion(body, pvc={"metadata": {"name": "llama-3-8b-artifacts"}})
    assert deletion.done
    assert [(type(a), a.kind, a.name) for a in deletion.actions] == \
        [(Delete, "PersistentVolumeClaim", "llama-3-8b-artifacts")]


def test_delete_cleans_an_existing_claim_with_a_job():
    body = with_spec(tiny(), "storage.retentionPolicy", "Delete")
    model = parse_model(body)
    first = _deletion(body, deployment={"metadata": {"name": "tiny-llama"}})
    assert not first.done
    assert [type(a) for a in first.actions] == [Delete, Create]
    job = first.actions[1].obj
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "/artifacts/kubequant/tiny-llama"
    assert not _deletion(body, cleanup=with_status(job, "running")).done
    assert _deletion(body, cleanup=with_status(job, "succeeded")).done
    failed = _deletion(body, cleanup=with_status(job, "failed"))
    assert failed.done and failed.warning and builders.model_dir(model) in failed.message


def test_update_action_carries_the_full_object():
    sim = Sim(tiny())
    sim.to_ready()
    sim.set_spec("serving.gpuMemoryUtilization", 0.5)
    [action] = sim.step().actions
    assert isinstance(action, Update) and action.obj["kind"] == "Deployment"
    assert "0.5" in action.obj["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("component", ["quantize", "evaluate"])
def test_a_pod_that_cannot_run_is_waiting_not_running(component):
    # The Job counts its Pending Pod as active; the model must not say "running" while the scheduler
    # cannot place it (a missing claim here) or its image cannot be pulled.
    sim = Sim(tiny())
    sim.step()
    if component == "evaluate":
        sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
        sim.step()
    job = sim.job(component)
    name = job["metadata"]["name"]
    sim.objs[("Job", name)] = with_status(job, "running")
    unbound = '0/3 nodes are available: persistentvolumeclaim "kubequant-data" not found. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.'
    sim.pods[name] = [pending_pod(job, unschedulable=unbound)]
    decision = sim.step()
    stage = condition(decision, "Quantized" if component == "quantize" else "Evaluated")
    assert decision.status["phase"] == "Pending"
    assert stage["status"] == "False" and stage["reason"] == "Unschedulable"
    assert "persistentvolumeclaim \"kubequant-data\" not found" in stage["message"]
    assert "running" not in decision.status["message"] and name in decision.status["message"]

    sim.pods[name] = [pending_pod(job, waiting=("ImagePullBackOff", 'Back-off pulling image "r/q:1"'))]
    decision = sim.step()
    assert decision.status["phase"] == "Pending"
    assert condition(decision, "Quantized" if component == "quantize" else "Evaluated")["reason"] == "ImagePullBackOff"

    # Scheduled and started: running again.
    sim.pods[name] = []
    decision = sim.step()
    assert decision.status["phase"] == ("Quantizing" if component == "quantize" else "Evaluating")
    assert "is running" in decision.status["message"]


def test_a_vllm_pod_that_cannot_be_scheduled_is_named_in_the_ready_condition():
    # No node with the GPUs (or CPUs) free: the Deployment just waits; the model says why.
    sim = Sim(tiny())
    sim.step()
    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
    sim.step()
    sim.finish("evaluate", "succeeded", PASSED)
    sim.step()
    labels = sim.objs[("Deployment", sim.model.name)]["spec"]["template"]["metadata"]["labels"]
    sim.server_pods = [{"metadata": {"name": "tiny-llama-abc", "labels": labels, "creationTimestamp": NOW},
                        "status": {"phase": "Pending", "conditions": [{
                            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": "0/3 nodes are available: 3 Insufficient cpu."}]}}]
    decision = sim.step()
    ready = condition(decision, "Ready")
    assert decision.status["phase"] == "Deploying"
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
    assert "a vLLM Pod is waiting: 0/3 nodes are available: 3 Insufficient cpu." in ready["message"]
    assert "Insufficient cpu" in decision.status["message"]
    sim.server_pods = []
    assert condition(sim.step(), "Ready")["reason"] == "RollingOut"


def test_preflight_splits_experts_unless_they_are_placed_whole():
    # Qwen3-30B-A3B: o_proj reads 32 heads x 128 = 4096; each expert's intermediate size is 768.
    artifact = {"groupSize": 128, "rowParallelInFeatures": [4096], "expertInFeatures": [768]}
    assert preflight(artifact, 2) is None  # 384 columns per GPU: 3 groups
    refused = preflight(artifact, 4)  # 192 columns per GPU: not whole groups of 128
    assert refused and "768 -> 192" in refused and preflight_reason(refused) == "TensorParallelMismatch"
    # Expert parallelism places whole experts on each GPU: only the attention is split.
    for flag in ("--enable-expert-parallel", "-ep"):
        assert preflight(artifact, 8, extra_args=(flag,)) is None


def test_preflight_refuses_int8_marlin_activations_for_full_range_scales():
    artifact = {"groupSize": 128, "rowParallelInFeatures": [4096], "fullRangeScales": True}
    env = {"VLLM_MARLIN_INPUT_DTYPE": "int8"}
    refused = preflight(artifact, 1, env=env)
    assert refused and refused.startswith("spec.serving.env VLLM_MARLIN_INPUT_DTYPE=int8")
    assert "vLLM issue 48905" in refused and "fullRange false" in refused
    assert preflight_reason(refused) == "UnsafeEngineSetting"
    # Scales of one sign, or another input dtype: nothing to refuse.
    assert preflight(artifact | {"fullRangeScales": False}, 1, env=env) is None
    assert preflight(artifact, 1, env={"VLLM_MARLIN_INPUT_DTYPE": "fp8"}) is None
