"""End to end: the real kopf operator against the API emulator, the test playing the cluster.

Each test starts an emulator and the operator (well under a second), creates QuantizedModels and
moves Jobs and Deployments along as their controllers would, then checks what the operator did.
"""

from __future__ import annotations

import os

# Read when kubequant.handlers is imported: no metrics port, no timer (every change must work
# through events alone, and a pending timer slows kopf's exit by 5 s), quick retries of deletion.
os.environ.setdefault("KUBEQUANT_METRICS_PORT", "0")
os.environ.setdefault("KUBEQUANT_RESYNC_SECONDS", "0")
os.environ.setdefault("KUBEQUANT_DELETE_RETRY_SECONDS", "0.2")

import pytest
from prometheus_client import REGISTRY

from tests.operator_support.cluster import (
    DEPLOYMENTS,
    JOBS,
    PDBS,
    PVCS,
    QM,
    SERVICE_MONITORS,
    SERVICES,
    Cluster,
    emulated_cluster,
    running_operator,
)
from tests.operator_support.objects import PASSED, QUANTIZE_RESULT, REGRESSED, example, with_spec

pytestmark = pytest.mark.asyncio


def _args(cluster: Cluster, name: str) -> list[str]:
    return cluster.get(DEPLOYMENTS, name)["spec"]["template"]["spec"]["containers"][0]["args"]


async def _to_ready(cluster: Cluster, name: str, body: dict | None = None) -> dict:
    if body is not None:
        await cluster.create(QM, body)
    job = await cluster.wait_job(name, "quantize")
    await cluster.finish_job(job, result=QUANTIZE_RESULT)
    evaluate = await cluster.wait_job(name, "evaluate")
    await cluster.finish_job(evaluate, result=PASSED)
    await cluster.wait_phase(name, "Deploying")
    await cluster.make_available(name)
    return await cluster.wait_phase(name, "Ready")


async def _change_spec(cluster: Cluster, name: str, path: str, value) -> None:
    body = with_spec(cluster.get(QM, name), path, value)
    await cluster.patch(QM, name, {"spec": body["spec"]})


def _ready(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


async def test_happy_path_to_ready(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        await cluster.create(QM, example())
        assert await cluster.wait("the claim", lambda: cluster.get(PVCS, "llama-3-8b-artifacts"))
        job = await cluster.wait_job("llama-3-8b", "quantize")
        await cluster.wait_phase("llama-3-8b", "Pending")
        await cluster.start_job(job)
        await cluster.wait_phase("llama-3-8b", "Quantizing")
        await cluster.finish_job(job, result=QUANTIZE_RESULT)
        evaluate = await cluster.wait_job("llama-3-8b", "evaluate")
        await cluster.wait_phase("llama-3-8b", "Evaluating")
        await cluster.finish_job(evaluate, result=PASSED)
        await cluster.wait_phase("llama-3-8b", "Deploying")
        for resource in (SERVICES, PDBS, SERVICE_MONITORS):
            assert cluster.get(resource, "llama-3-8b"), resource
        await cluster.make_available("llama-3-8b")
        status = await cluster.wait_phase("llama-3-8b", "Ready")

        assert {c["type"]: c["status"] for c in status["conditions"]} == \
            {"Quantized": "True", "Evaluated": "True", "GatePassed": "True", "Ready": "True"}
        assert (status["baselinePerplexity"], status["quantizedPerplexity"]) == (12.5, 13.0)
        assert _args(cluster, "llama-3-8b")[0] == f"/artifacts/{status['artifact']['path']}"
        qm = cluster.get(QM, "llama-3-8b")
        assert "kubequant.io/finalizer" in qm["metadata"]["finalizers"]
        assert status["observedGeneration"] == qm["metadata"]["generation"]
        assert len(cluster.jobs("llama-3-8b")) == 2
        await cluster.wait("the phase Events", lambda: {("Normal", p) for p in
                           ("Pending", "Quantizing", "Evaluating", "Deploying", "Ready")} <= set(cluster.events("llama-3-8b")))
        labels = {"namespace": "ml", "model": "llama-3-8b"}
        assert REGISTRY.get_sample_value("kubequant_gate_outcomes_total", {**labels, "outcome": "Passed"}) >= 1
        assert REGISTRY.get_sample_value("kubequant_quantized_perplexity", labels) == 13.0
        assert REGISTRY.get_sample_value("kubequant_models", {"phase": "Ready"}) >= 1


async def test_gate_failure_keeps_the_old_version_serving(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        await _to_ready(cluster, "tiny-llama", example("tiny.yaml"))
        served = _args(cluster, "tiny-llama")
        generation = cluster.get(DEPLOYMENTS, "tiny-llama")["metadata"]["generation"]

        await _change_spec(cluster, "tiny-llama", "quantization.groupSize", 64)
        job = await cluster.wait_job("tiny-llama", "quantize")
        await cluster.finish_job(job, result=QUANTIZE_RESULT)
        evaluate = await cluster.wait_job("tiny-llama", "evaluate")
        await cluster.finish_job(evaluate, exit_code=3, result=REGRESSED)
        status = await cluster.wait_phase("tiny-llama", "GateFailed")

        assert _args(cluster, "tiny-llama") == served
        assert cluster.get(DEPLOYMENTS, "tiny-llama")["metadata"]["generation"] == generation
        gate = next(c for c in status["conditions"] if c["type"] == "GatePassed")
        assert (gate["status"], gate["reason"]) == ("False", "PerplexityRegression")
        assert _ready(status)["status"] == "True" and "failed the gate" in _ready(status)["message"]
        await cluster.wait("a Warning Event", lambda: ("Warning", "GateFailed") in cluster.events("tiny-llama"))


async def test_job_failure_oom_killed(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        await cluster.create(QM, example("tiny.yaml"))
        job = await cluster.wait_job("tiny-llama", "quantize")
        await cluster.finish_job(job, exit_code=137, reason="OOMKilled")
        status = await cluster.wait_phase("tiny-llama", "Failed")
        assert status["failure"]["reason"] == "OOMKilled" and status["failure"]["exitCode"] == 137
        assert "memory" in status["message"]
        assert len(cluster.jobs("tiny-llama")) == 1  # no retry loop beyond the Job's backoffLimit

        # Deleting the failed Job (after raising the limit) runs it again.
        await _change_spec(cluster, "tiny-llama", "quantization.resources", {"limits": {"memory": "16Gi"}})
        await cluster.delete(JOBS, job["metadata"]["name"])
        await cluster.wait("a new quantize Job", lambda: cluster.jobs("tiny-llama", "quantize"))
        await cluster.wait_phase("tiny-llama", "Pending")


async def test_spec_change_rolls_out_safely(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        await _to_ready(cluster, "tiny-llama", example("tiny.yaml"))
        served = _args(cluster, "tiny-llama")

        await _change_spec(cluster, "tiny-llama", "quantization.calibration.samples", 64)
        job = await cluster.wait_job("tiny-llama", "quantize")
        status = await cluster.wait_phase("tiny-llama", "Pending")
        assert _ready(status)["reason"] == "ServingPreviousArtifact"
        await cluster.finish_job(job, result=QUANTIZE_RESULT)
        evaluate = await cluster.wait_job("tiny-llama", "evaluate")
        await cluster.wait_phase("tiny-llama", "Evaluating")
        assert _args(cluster, "tiny-llama") == served  # untouched until the gate passes
        await cluster.finish_job(evaluate, result=PASSED)
        status = await cluster.wait_phase("tiny-llama", "Deploying")
        assert _args(cluster, "tiny-llama")[0] == f"/artifacts/{status['artifact']['path']}" != served[0]
        await cluster.make_available("tiny-llama")
        await cluster.wait_phase("tiny-llama", "Ready")


async def test_serving_only_change_does_not_requantize(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        await _to_ready(cluster, "tiny-llama", example("tiny.yaml"))
        jobs = [j["metadata"]["uid"] for j in cluster.jobs("tiny-llama")]

        await _change_spec(cluster, "tiny-llama", "serving.replicas", 2)
        await cluster.wait("the PodDisruptionBudget", lambda: cluster.get(PDBS, "tiny-llama"))
        await cluster.wait_phase("tiny-llama", "Deploying")
        assert cluster.get(DEPLOYMENTS, "tiny-llama")["spec"]["replicas"] == 2
        await cluster.make_available("tiny-llama")
        await cluster.wait_phase("tiny-llama", "Ready")
        assert [j["metadata"]["uid"] for j in cluster.jobs("tiny-llama")] == jobs


async def test_operator_restarted_in_every_phase(tmp_path):
    """Three models, the operator restarted between every step: same outcomes, no duplicate children."""
    async with emulated_cluster(tmp_path) as cluster:

        def children() -> dict[str, int]:
            counts = {}
            for name in ("good", "worse", "broken"):
                counts[name] = len(cluster.jobs(name)) + len(cluster.list(DEPLOYMENTS, name))
            return counts

        async def restart(expect: dict[str, str]) -> None:
            since = cluster.requests_so_far()
            async with running_operator(cluster):
                for name, phase in expect.items():
                    await cluster.wait_observed(name, since)  # resumed, even if nothing changed
                    await cluster.wait_phase(name, phase)
                seen = children()
            assert children() == seen

        bodies = {name: example("tiny.yaml", model_name=name) for name in ("good", "worse", "broken")}
        async with running_operator(cluster):
            for body in bodies.values():
                await cluster.create(QM, body)
            for name in bodies:
                await cluster.wait_job(name, "quantize")
        await restart({"good": "Pending", "worse": "Pending", "broken": "Pending"})
        assert children() == {"good": 1, "worse": 1, "broken": 1}

        for name in bodies:
            await cluster.start_job(cluster.jobs(name, "quantize")[0])
        await restart({"good": "Quantizing", "worse": "Quantizing", "broken": "Quantizing"})

        await cluster.finish_job(cluster.jobs("good", "quantize")[0], result=QUANTIZE_RESULT)
        await cluster.finish_job(cluster.jobs("worse", "quantize")[0], result=QUANTIZE_RESULT)
        await cluster.finish_job(cluster.jobs("broken", "quantize")[0], exit_code=137, reason="OOMKilled")
        await restart({"good": "Evaluating", "worse": "Evaluating", "broken": "Failed"})
        assert children() == {"good": 2, "worse": 2, "broken": 1}

        await cluster.finish_job(cluster.jobs("good", "evaluate")[0], result=PASSED)
        await cluster.finish_job(cluster.jobs("worse", "evaluate")[0], exit_code=3, result=REGRESSED)
        await restart({"good": "Deploying", "worse": "GateFailed", "broken": "Failed"})
        assert children() == {"good": 3, "worse": 2, "broken": 1}

        await cluster.make_available("good")
        await restart({"good": "Ready", "worse": "GateFailed", "broken": "Failed"})
        await restart({"good": "Ready", "worse": "GateFailed", "broken": "Failed"})
        assert children() == {"good": 3, "worse": 2, "broken": 1}
        assert len(cluster.list(SERVICES, "good")) == 1


async def test_deletion_honours_the_retention_policy(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        keep = example("tiny.yaml", model_name="keep")
        wipe = with_spec(example("tiny.yaml", model_name="wipe"), "storage.retentionPolicy", "Delete")
        keep_claim = with_spec(example(model_name="keep-claim"), "storage.claimName", "keep-claim")
        wipe_claim = with_spec(with_spec(example(model_name="wipe-claim"), "storage.claimName", "wipe-claim"),
                               "storage.retentionPolicy", "Delete")
        await _to_ready(cluster, "wipe", wipe)  # serving, so that deleting it must stop vLLM first
        for body in (keep, keep_claim, wipe_claim):
            await cluster.create(QM, body)
            await cluster.wait_job(body["metadata"]["name"], "quantize")

        for name in ("keep", "wipe", "keep-claim", "wipe-claim"):
            await cluster.delete(QM, name)

        # Delete with a claim it did not create: vLLM stops, a Job removes kubequant/wipe/.
        cleanup = await cluster.wait("the cleanup Job", lambda: cluster.get(JOBS, "wipe-cleanup"))
        command = cleanup["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[-1] == "/artifacts/kubequant/wipe"
        await cluster.wait("vLLM to stop", lambda: cluster.get(DEPLOYMENTS, "wipe") is None)
        assert cluster.get(QM, "wipe") is not None  # the finalizer waits for the cleanup
        await cluster.finish_job(cleanup)

        for name in ("keep", "wipe", "keep-claim", "wipe-claim"):
            await cluster.wait(f"{name} to go", lambda n=name: cluster.get(QM, n) is None)
            assert cluster.jobs(name) == [] and cluster.get(DEPLOYMENTS, name) is None  # garbage-collected
        assert cluster.get(PVCS, "keep-claim") is not None  # Retain: the created claim stays (not owned)
        assert cluster.get(PVCS, "wipe-claim") is None  # Delete: it goes


async def test_invalid_resource_fails_until_fixed(tmp_path):
    async with emulated_cluster(tmp_path) as cluster, running_operator(cluster):
        # The CRD's CEL rules refuse this in a real cluster; the operator must not trust that.
        await cluster.create(QM, with_spec(example("tiny.yaml"), "serving.tensorParallelSize", 3))
        status = await cluster.wait_phase("tiny-llama", "Failed")
        assert status["failure"]["reason"] == "InvalidSpec" and "power of two" in status["message"]
        assert cluster.jobs("tiny-llama") == []
        await cluster.wait("a Warning Event", lambda: ("Warning", "Failed") in cluster.events("tiny-llama"))

        await _change_spec(cluster, "tiny-llama", "serving.tensorParallelSize", 1)
        await cluster.wait_job("tiny-llama", "quantize")
        status = await cluster.wait_phase("tiny-llama", "Pending")
        assert "failure" not in status
