"""QuantizedModels, and Jobs/Pods/Deployments in the states a cluster would put them in."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from quantizer import contract
from quantizer.contract import EvaluateResult, QuantizeResult

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMESPACE = "ml"

# Results as the quantizer's Jobs write them: built by the contract's own types, so they cannot drift.
QUANTIZE_RESULT = QuantizeResult(
    output="/artifacts/x", recipe={"bits": 4, "group_size": 128, "sym": True, "act_order": True},
    baseline_ppl=12.5, fakequant_ppl=12.9, size_before_bytes=16_000_000_000, size_after_bytes=5_600_000_000,
    seconds=1800.0, group_size=128, row_parallel_in_features=[4096, 14336],
).to_dict()
PASSED = EvaluateResult(passed=True, reason=contract.PASSED, message="served 13.0 <= 1.05 x 12.5", served_ppl=13.0,
                        baseline_ppl=12.5, fakequant_ppl=12.9, engine="vllm 0.32.0",
                        kl_divergence={"mean": 0.021, "p99": 0.19, "max": 1.4}, top_token_agreement=0.93,
                        generation_match=0.6).to_dict()
REGRESSED = EvaluateResult(passed=False, reason=contract.PERPLEXITY_REGRESSION, message="served 14.2 > 1.05 x 12.5",
                           served_ppl=14.2, baseline_ppl=12.5, fakequant_ppl=12.9, engine="vllm 0.32.0").to_dict()


def example(name: str = "llama-3-8b-tp2.yaml", *, model_name: str | None = None, uid: str = "uid-1",
            generation: int = 1) -> dict:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    body["metadata"].update(namespace=NAMESPACE, uid=uid, generation=generation)
    if model_name:
        body["metadata"]["name"] = model_name
    return body


def with_spec(body: dict, path: str, value) -> dict:
    """A copy of `body` with spec.<path> set (dotted path), and the generation bumped."""
    body = copy.deepcopy(body)
    node = body["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    body["metadata"]["generation"] = body["metadata"].get("generation", 1) + 1
    return body


def job_status(state: str, start: str = "2026-01-01T00:00:00Z", end: str = "2026-01-01T00:30:00Z") -> dict:
    if state == "pending":
        return {}
    if state == "running":
        return {"active": 1, "startTime": start}
    if state == "succeeded":
        return {"succeeded": 1, "startTime": start, "completionTime": end,
                "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}
    if state == "failed":
        return {"failed": 1, "startTime": start, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": end,
             "message": "Job has reached the specified backoff limit"}]}
    raise ValueError(state)


def with_status(job: dict, state: str) -> dict:
    job = copy.deepcopy(job)
    job["status"] = job_status(state)
    return job


def pod(job: dict, container: str, *, exit_code: int, result: dict | None = None, reason: str | None = None,
        message: str | None = None, init: bool = False, created: str = "2026-01-01T00:00:01Z") -> dict:
    """A finished Pod of `job`, as the Job controller and the kubelet leave it."""
    terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
    if result is not None:
        terminated["message"] = json.dumps(result)
    elif message is not None:
        terminated["message"] = message
    name = job["metadata"]["name"]
    labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": name, "batch.kubernetes.io/job-name": name}
    statuses = [{"name": container, "state": {"terminated": terminated}}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-{exit_code}x", "namespace": job["metadata"]["namespace"], "labels": labels,
                     "creationTimestamp": created},
        "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                   "initContainerStatuses" if init else "containerStatuses": statuses},
    }


def pending_pod(job: dict, *, unschedulable: str | None = None, waiting: tuple[str, str] | None = None,
                created: str = "2026-01-01T00:00:01Z") -> dict:
    """A Pod of `job` that does not run: the scheduler's PodScheduled=False with its message, or a
    container waiting for a (reason, message), as the scheduler and the kubelet report them."""
    name = job["metadata"]["name"]
    labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": name, "batch.kubernetes.io/job-name": name}
    status: dict = {"phase": "Pending"}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": unschedulable}]
    if waiting:
        status["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        status["containerStatuses"] = [{"name": "quantize", "state": {"waiting": {"reason": waiting[0],
                                                                                "message": waiting[1]}}}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-pending", "namespace": job["metadata"]["namespace"], "labels": labels,
                         "creationTimestamp": created},
            "status": status}


def available(deployment: dict, replicas: int | None = None, generation: int | None = None) -> dict:
    """The Deployment as its controller reports it once every replica is updated and available."""
    dep = copy.deepcopy(deployment)
    n = dep["spec"]["replicas"] if replicas is None else replicas
    gen = generation or dep["metadata"].get("generation", 1)
    dep["metadata"]["generation"] = gen
    dep["status"] = {"observedGeneration": gen, "replicas": n, "updatedReplicas": n, "readyReplicas": n,
                     "availableReplicas": n,
                     "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}
    return dep
