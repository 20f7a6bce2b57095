"""The operator against the real control plane, under the chart's RBAC.

The operator is `kubequant operator` in a process of its own, authenticated with a token of the
chart's ServiceAccount. The real scheduler binds the Job and Deployment Pods to KWOK's simulated
nodes; the real Job, Deployment, ReplicaSet and garbage-collector controllers move them along. The
test plays the kubelet for Job Pods (tests/kube/kubelet.py): the lifecycle test runs their real
commands (the quantizer and the evaluator, vLLM on the CPU, on the tiny model); the others write the
terminated state a command would leave.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubequant import builders
from kubequant.spec import parse_model

from tests.kube.controlplane import ControlPlane, wait_for
from tests.kube.kubelet import Kubelet
from tests.kube.lws import LeaderWorkerSetController
from tests.kube.models import (
    OPERATOR_NAMESPACE,
    PASSED,
    QUANTIZE_RESULT,
    REGRESSED,
    SERVICE_ACCOUNT,
    Models,
    data_volume,
    example,
    install_operator_rbac,
)
from tests.kube.operator_process import OperatorProcess

pytestmark = pytest.mark.controlplane
WATCHED = ["kq-life", "kq-tp", "kq-faults", "kq-delete", "kq-lws", "kq-waiting", "kq-serve-wait", "kq-moe",
           "kq-search"]
SA = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}"


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    install_operator_rbac(control_plane, WATCHED)
    return control_plane.token_kubeconfig(SERVICE_ACCOUNT, OPERATOR_NAMESPACE,
                                          tmp_path_factory.mktemp("operator") / "kubeconfig")


def _models(cluster: ControlPlane, namespace: str, tmp_path: Path) -> Models:
    return Models(cluster, namespace, Kubelet(cluster, namespace, tmp_path))


@pytest.fixture
def operator(operator_kubeconfig: Path, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(operator_kubeconfig, WATCHED, tmp_path / "operator.log")
    with process:
        yield process


def test_the_service_account_can_do_what_it_needs_and_no_more(control_plane: ControlPlane, operator_kubeconfig):
    def can(*args: str) -> bool:
        done = control_plane.kubectl("auth", "can-i", f"--as={SA}", *args, check=False)
        return done.stdout.strip() == "yes"

    needed = [("create", "jobs", "-n", "kq-life"), ("patch", "deployments", "-n", "kq-faults"),
              ("patch", "quantizedmodels/status", "-n", "kq-tp"), ("list", "pods", "-n", "kq-delete"),
              ("watch", "pods", "-n", "kq-waiting"),
              ("create", "events", "-n", "kq-life"), ("create", "persistentvolumeclaims", "-n", "kq-life"),
              ("watch", "customresourcedefinitions.apiextensions.k8s.io")]
    refused = [("get", "secrets", "-n", "kq-life"), ("list", "secrets", "-A"), ("delete", "namespaces"),
               ("create", "jobs", "-n", "default"), ("create", "pods", "-n", "kq-life"),
               ("delete", "quantizedmodels", "-n", "kq-life"), ("update", "clusterroles"),
               ("create", "rolebindings", "-n", "kq-life"), ("delete", "persistentvolumes"),
               ("patch", "nodes"), ("create", "serviceaccounts/token", "-n", OPERATOR_NAMESPACE)]
    assert [a for a in needed if not can(*a)] == []
    assert [a for a in refused if can(*a)] == []


@pytest.mark.slow
@pytest.mark.vllm
def test_a_mixture_of_experts_is_quantized_gated_and_served(control_plane: ControlPlane, operator, tmp_path: Path):
    """examples/tiny-moe.yaml: the trained tiny Qwen3-MoE through the real Jobs' commands (GPTQ per
    expert; vLLM on the CPU serving it beside the source) to Ready, its experts' sizes in status."""
    ns = "kq-moe"
    models = _models(control_plane, ns, tmp_path)
    data = data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    models.apply(example("tiny-moe.yaml"))
    for job in ("quantize", "evaluate"):
        pod = models.kubelet.running_pod(models.wait_job("tiny-moe", job))
        terminated = models.kubelet.run(pod, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        assert terminated["exitCode"] == 0, Path(terminated["log"]).read_text()[-3000:]
    verdict = json.loads(terminated["message"])
    assert verdict["reason"] == "Passed" and verdict["engine"].startswith("vllm")
    status = models.wait_phase("tiny-moe", "Ready", timeout=120)
    assert status["quantizedPerplexity"] == pytest.approx(verdict["served_ppl"])
    assert status["artifact"]["expertInFeatures"] == [128]  # each expert's intermediate size
    manifest = json.loads((data / status["artifact"]["path"] / "kubequant.json").read_text())
    assert manifest["experts"]["calibration"] == "all" and len(manifest["experts"]["routed_tokens"]) == 4


@pytest.mark.slow
@pytest.mark.vllm
def test_tiny_model_lifecycle_with_the_real_quantizer_and_evaluator(control_plane: ControlPlane, operator,
                                                                    tmp_path: Path):
    """quantize (real CLI) -> evaluate (vLLM on the CPU) -> serve -> Ready; then a serving-only change,
    and a stricter gate that fails without touching what serves."""
    ns = "kq-life"
    models = _models(control_plane, ns, tmp_path)
    data = data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    models.apply(example("tiny.yaml"))

    quantize = models.wait_job("tiny-llama", "quantize")
    pod = models.kubelet.running_pod(quantize)
    assert pod["spec"]["nodeName"] == "cpu-1"  # no GPU asked for: the GPU nodes' taint keeps it off them
    models.wait_phase("tiny-llama", "Quantizing")
    terminated = models.kubelet.run(pod)
    assert terminated["exitCode"] == 0, Path(terminated["log"]).read_text()[-3000:]

    evaluate = models.wait_job("tiny-llama", "evaluate")
    pod = models.kubelet.running_pod(evaluate)
    assert pod["spec"]["nodeName"] == "cpu-1"  # serving.device cpu: vLLM's CPU backend, no GPU asked for
    models.wait_phase("tiny-llama", "Evaluating")
    terminated = models.kubelet.run(pod, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert terminated["exitCode"] == 0, Path(terminated["log"]).read_text()[-3000:]
    verdict = json.loads(terminated["message"])
    assert verdict["reason"] == "Passed" and verdict["engine"].startswith("vllm")

    # The Deployment's Pods are scheduled on a GPU node and become Ready (KWOK); the Deployment
    # controller reports them available; the operator then says Ready.
    status = models.wait_phase("tiny-llama", "Ready", timeout=120)
    control_plane.kubectl("wait", "--for=condition=Ready", "qm/tiny-llama", "-n", ns, "--timeout=30s")
    assert {c["type"]: c["status"] for c in status["conditions"]} == \
        {"Quantized": "True", "Evaluated": "True", "GatePassed": "True", "Ready": "True"}
    assert status["observedGeneration"] == models.get("tiny-llama")["metadata"]["generation"]
    assert status["quantizedPerplexity"] == pytest.approx(verdict["served_ppl"])
    artifact = data / status["artifact"]["path"]
    assert (artifact / "kubequant.json").is_file() and (artifact / "config.json").is_file()
    assert [p["spec"]["nodeName"] for p in models.serving_pods("tiny-llama")] == ["cpu-1"]

    header, row = control_plane.kubectl("get", "qm", "-n", ns).stdout.splitlines()
    assert header.split()[:2] == ["NAME", "PHASE"]
    cells = row.split()
    assert cells[:4] == ["tiny-llama", "Ready", "4", "32"] and cells[8] == "True"
    assert float(cells[4]) == pytest.approx(status["baselinePerplexity"], rel=1e-3)
    assert float(cells[5]) == pytest.approx(status["quantizedPerplexity"], rel=1e-3)
    # The source model served beside the artifact: the agreement is kept in status (the schema has it).
    assert status["evaluation"]["klDivergence"]["mean"] == pytest.approx(verdict["kl_divergence"]["mean"])
    assert status["evaluation"]["topTokenAgreement"] == pytest.approx(verdict["top_token_agreement"])
    assert float(cells[6]) == pytest.approx(verdict["kl_divergence"]["mean"], rel=1e-3)
    assert float(cells[7]) == pytest.approx(verdict["top_token_agreement"], rel=1e-3)
    wait_for("the phase Events", lambda: {("Normal", p) for p in ("Quantizing", "Evaluating", "Deploying", "Ready")}
             <= set(models.events("tiny-llama")))
    labels = {"namespace": ns, "model": "tiny-llama"}
    assert operator.sample("kubequant_gate_outcomes_total", {**labels, "outcome": "Passed"}) == 1
    assert operator.sample("kubequant_quantized_perplexity", labels) == pytest.approx(status["quantizedPerplexity"])
    assert operator.sample("kubequant_top_token_agreement", labels) == pytest.approx(verdict["top_token_agreement"])
    # The task from the claim, scored in the engine for both models (lm-evaluation-harness).
    (task,) = status["evaluation"]["tasks"]
    assert task == {k: v for k, v in verdict["tasks"][0].items() if v is not None}
    assert task["task"] == "python_identifier" and task["samples"] == 100
    assert operator.sample("kubequant_task_score", {**labels, "task": "python_identifier", "metric": "acc",
                                                    "of": "source"}) == pytest.approx(task["source"])

    # A serving-only change: the Deployment follows, nothing is quantized or evaluated again.
    jobs = {j["metadata"]["uid"] for j in models.jobs("tiny-llama")}
    models.patch_spec("tiny-llama", "serving.replicas", 2)
    wait_for("two serving replicas", lambda: (models.deployment("tiny-llama") or {}).get("spec", {}).get("replicas") == 2)
    models.wait_phase("tiny-llama", "Ready", timeout=120)
    assert {j["metadata"]["uid"] for j in models.jobs("tiny-llama")} == jobs
    served_args = models.deployment("tiny-llama")["spec"]["template"]["spec"]["containers"][0]["args"]
    generation = models.deployment("tiny-llama")["metadata"]["generation"]

    # A gate the same artifact cannot pass: a new evaluate Job (no requantization), a real verdict
    # PerplexityRegression (exit code 3), and the Deployment untouched.
    models.patch_spec("tiny-llama", "evaluation", {"maxPerplexityRatio": 1.0, "maxPerplexityIncrease": 0.000001})
    strict = models.wait_job("tiny-llama", "evaluate", exclude={evaluate})
    terminated = models.kubelet.run(models.kubelet.running_pod(strict), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert terminated["exitCode"] == 3, Path(terminated["log"]).read_text()[-3000:]
    status = models.wait_phase("tiny-llama", "GateFailed")
    gate = next(c for c in status["conditions"] if c["type"] == "GatePassed")
    assert (gate["status"], gate["reason"]) == ("False", "PerplexityRegression")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and "failed the gate" in ready["message"]
    deployment = models.deployment("tiny-llama")
    assert deployment["metadata"]["generation"] == generation
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == served_args
    assert len(models.jobs("tiny-llama", "quantize")) == 1
    wait_for("a GateFailed Warning", lambda: ("Warning", "GateFailed") in models.events("tiny-llama"))


@pytest.mark.slow
@pytest.mark.vllm
def test_the_first_candidate_that_passes_serves_and_a_restart_measures_nothing_again(
        control_plane: ControlPlane, operator_kubeconfig: Path, tmp_path: Path):
    """The tiny model at 4-bit g128 with g32 as a candidate, under a KL bound between the two (vLLM on the
    CPU measures about 0.0097 and 0.0071): the real quantizer and evaluator, g128 fails the gate, the
    operator is killed and started again, g32 is quantized and evaluated (nothing of g128 again), passes
    and serves; status, the printer column, Events and metrics name both."""
    ns = "kq-search"
    models = _models(control_plane, ns, tmp_path)
    data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    # Every operator started here is stopped at the end, also when an assertion fails: a stray one would
    # reconcile the next tests' namespaces beside theirs.
    with contextlib.ExitStack() as operators:
        process = operators.enter_context(OperatorProcess(operator_kubeconfig, WATCHED, tmp_path / "operator.log"))
        models.apply(example("tiny.yaml", "search", quantization__groupSize=128, evaluation__maxKLDivergence=0.0084,
                             quantization__candidates=[{"groupSize": 32, "name": "finer"}]))

        def run(job: str, exit_code: int) -> dict:
            terminated = models.kubelet.run(models.kubelet.running_pod(job), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
            assert terminated["exitCode"] == exit_code, Path(terminated["log"]).read_text()[-3000:]
            return json.loads(terminated["message"])

        first_quantize = models.wait_job("search", "quantize")
        run(first_quantize, 0)
        first_evaluate = models.wait_job("search", "evaluate")
        rejected = run(first_evaluate, 3)
        assert rejected["reason"] == "KLDivergence" and rejected["kl_divergence"]["mean"] > 0.0084
        # The verdict lands; the operator moves on to the candidate (its Event posted: Events are best
        # effort, an operator killed before posting one does not post it again), then is killed and
        # started again.
        finer_quantize = models.wait_job("search", "quantize", exclude={first_quantize})
        wait_for("the CandidateRejected Event", lambda: ("Warning", "CandidateRejected") in models.events("search"))
        process.kill()
        process = operators.enter_context(OperatorProcess(operator_kubeconfig, WATCHED, tmp_path / "operator.log"))
        status = models.wait_phase("search", "Quantizing")
        assert [(c["name"], c["state"]) for c in status["candidates"]] == [("w4-g128", "GateFailed"),
                                                                           ("finer", "Quantizing")]
        assert status["candidates"][0]["evaluation"]["klDivergence"]["mean"] == \
            pytest.approx(rejected["kl_divergence"]["mean"])
        run(finer_quantize, 0)
        finer_evaluate = models.wait_job("search", "evaluate", exclude={first_evaluate})
        passed = run(finer_evaluate, 0)
        assert passed["reason"] == "Passed" and passed["kl_divergence"]["mean"] <= 0.0084

        status = models.wait_phase("search", "Ready", timeout=120)
        assert [(c["name"], c["state"]) for c in status["candidates"]] == [("w4-g128", "GateFailed"), ("finer", "Passed")]
        assert status["serving"]["candidate"] == status["candidate"] == "finer"
        assert status["serving"]["artifact"]["groupSize"] == 32 and status["candidates"][0]["artifact"]["groupSize"] == 128
        # Each recipe was quantized and evaluated once, across the restart.
        assert sorted(j["metadata"]["name"] for j in models.jobs("search")) == \
            sorted([first_quantize, first_evaluate, finer_quantize, finer_evaluate])
        header, row = control_plane.kubectl("get", "qm", "search", "-n", ns).stdout.splitlines()
        assert row[header.index("CANDIDATE"):].split()[0] == "finer"  # kubectl aligns the columns
        events = models.events("search")
        assert ("Warning", "CandidateRejected") in events and ("Normal", "CandidatePassed") in events
        labels = {"namespace": ns, "model": "search"}
        assert process.sample("kubequant_candidate_passed", {**labels, "candidate": "finer"}) == 1
        assert process.sample("kubequant_candidate_kl_divergence", {**labels, "candidate": "finer"}) == \
            pytest.approx(passed["kl_divergence"]["mean"])


def test_tensor_parallel_pods_land_where_two_gpus_fit(control_plane: ControlPlane, operator, tmp_path: Path):
    """The 8B example at TP 2 with 2 replicas: only the 8-GPU node fits a 2-GPU Pod. Midway the
    apiserver restarts; the operator watches again and finishes."""
    ns = "kq-tp"
    models = _models(control_plane, ns, tmp_path)
    # The example asks for a new ReadWriteMany claim; its volume waits for it, pre-bound.
    data_volume(control_plane, ns, "llama-3-8b-artifacts", tmp_path / "claim", size="100Gi",
                access_mode="ReadWriteMany", create_claim=False)
    models.apply(example("llama-3-8b-tp2.yaml"))
    wait_for("the claim to bind", lambda: (control_plane.get("pvc", "llama-3-8b-artifacts", ns) or {})
             .get("status", {}).get("phase") == "Bound")
    quantize = models.wait_job("llama-3-8b", "quantize")
    assert models.kubelet.running_pod(quantize)["spec"]["nodeName"] in ("gpu-1", "gpu-8")
    models.finish(quantize, QUANTIZE_RESULT)

    evaluate = models.wait_job("llama-3-8b", "evaluate")
    assert models.kubelet.running_pod(evaluate)["spec"]["nodeName"] == "gpu-8"
    control_plane.restart("kube-apiserver")
    models.finish(evaluate, PASSED)
    models.wait_phase("llama-3-8b", "Ready", timeout=120)
    pods = models.serving_pods("llama-3-8b")
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {"gpu-8"}
    for kind in ("service", "poddisruptionbudget"):
        assert control_plane.get(kind, "llama-3-8b", ns) is not None, kind


def test_job_failures_and_operator_kills_in_every_phase(control_plane: ControlPlane, operator_kubeconfig,
                                                        tmp_path: Path):
    """Three models; the operator killed with SIGKILL and started again between every step: the same
    outcomes, no duplicate child. A quantize Pod OOMKilled and an evaluate Pod exiting 1 fail their
    models with that reason."""
    ns = "kq-faults"
    models = _models(control_plane, ns, tmp_path)
    data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    names = ("good", "worse", "broken")

    def children() -> dict[str, int]:
        return {n: len(models.jobs(n)) + (models.deployment(n) is not None) for n in names}

    def restart(previous: OperatorProcess | None, expect: dict[str, str]) -> OperatorProcess:
        if previous is not None:
            previous.kill()
        process = OperatorProcess(operator_kubeconfig, WATCHED, tmp_path / "operator.log").start()
        for name, phase in expect.items():
            models.wait_phase(name, phase)
        return process

    process = restart(None, {})
    for name in names:
        models.apply(example("tiny.yaml", name))
    quantize = {n: models.wait_job(n, "quantize") for n in names}
    for name in names:
        models.kubelet.running_pod(quantize[name])
    process = restart(process, dict.fromkeys(names, "Quantizing"))
    assert children() == dict.fromkeys(names, 1)

    models.finish(quantize["good"], QUANTIZE_RESULT)
    models.finish(quantize["worse"], QUANTIZE_RESULT)
    process.kill()  # the results land while no operator runs
    models.finish(quantize["broken"], None, exit_code=137, reason="OOMKilled")
    process = restart(None, {"good": "Evaluating", "worse": "Evaluating", "broken": "Failed"})
    assert children() == {"good": 2, "worse": 2, "broken": 1}
    broken = models.status("broken")
    assert broken["failure"]["reason"] == "OOMKilled" and broken["failure"]["exitCode"] == 137
    quantized = next(c for c in broken["conditions"] if c["type"] == "Quantized")
    assert quantized["reason"] == "OOMKilled" and "memory" in quantized["message"]

    evaluate = {n: models.wait_job(n, "evaluate") for n in ("good", "worse")}
    models.finish(evaluate["good"], PASSED)
    models.finish(evaluate["worse"], REGRESSED, exit_code=3)
    # The Deployment's Pods start at once on KWOK's nodes: Deploying passes quickly into Ready.
    process = restart(process, {"good": "Ready", "worse": "GateFailed", "broken": "Failed"})
    assert children() == {"good": 3, "worse": 2, "broken": 1}
    assert models.deployment("worse") is None  # a failed gate never deploys
    process = restart(process, {"good": "Ready", "worse": "GateFailed", "broken": "Failed"})
    assert children() == {"good": 3, "worse": 2, "broken": 1}
    assert len(models.serving_pods("good")) == 1

    # An evaluate Pod that crashes (exit 1, no verdict): Failed, with the exit code in the condition.
    models.apply(example("tiny.yaml", "crashing"))
    models.finish(models.wait_job("crashing", "quantize"), QUANTIZE_RESULT)
    models.finish(models.wait_job("crashing", "evaluate"), None, exit_code=1)
    status = models.wait_phase("crashing", "Failed")
    evaluated = next(c for c in status["conditions"] if c["type"] == "Evaluated")
    assert status["failure"]["exitCode"] == 1 and "exited with code 1" in evaluated["message"]
    process.stop()


@pytest.mark.slow
def test_bad_input_on_the_claim_fails_once_naming_the_file(control_plane: ControlPlane, operator, tmp_path: Path):
    """The real quantizer, run by the test's kubelet, on what a user's claim may hold: a missing model
    path, a missing or too short calibration file, a truncated safetensors file. Each ends the model
    in Failed with InvalidInput and a message naming the path, after one Pod (exit code 2 is never
    retried): no crash loop."""
    ns = "kq-faults"
    models = _models(control_plane, ns, tmp_path)
    claim = data_volume(control_plane, ns, "bad-inputs", tmp_path / "claim", with_fixtures=True)
    (claim / "text" / "short.txt").write_text("x = 1\n")
    shutil.copytree(claim / "tiny-llama", claim / "truncated-llama")
    weights = claim / "truncated-llama" / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    on_claim = {"source__pvc__claimName": "bad-inputs", "storage__claimName": "bad-inputs"}
    cases = {
        "no-model": ({"source__pvc__path": "missing-llama"}, "missing-llama: not a directory"),
        "no-calibration": ({"quantization__calibration__text__path": "text/missing.txt"}, "text/missing.txt"),
        "short-calibration": ({"quantization__calibration__text__path": "text/short.txt"}, "fewer than one window"),
        "truncated": ({"source__pvc__path": "truncated-llama"}, "model.safetensors is not a complete safetensors file"),
    }
    for name, (changes, _) in cases.items():
        models.apply(example("tiny.yaml", name, **on_claim, **changes))
    for name, (_, words) in cases.items():
        job = models.wait_job(name, "quantize")
        terminated = models.kubelet.run(models.kubelet.running_pod(job))
        assert terminated["exitCode"] == 2, Path(terminated["log"]).read_text()[-2000:]
        status = models.wait_phase(name, "Failed")
        assert status["failure"]["reason"] == "InvalidInput" and words in status["failure"]["message"], status
        quantized = next(c for c in status["conditions"] if c["type"] == "Quantized")
        assert quantized["status"] == "False" and words in quantized["message"]
        assert len(models.kubelet.job_pods(job)) == 1  # not retried


def test_a_pod_the_scheduler_cannot_place_is_waiting_not_running(control_plane: ControlPlane, operator,
                                                                 tmp_path: Path):
    """The Job counts its Pending Pod as active. Before the claim exists the real scheduler cannot
    place the quantize Pod: the model is Pending with the scheduler's words, and the metric agrees;
    once the claim is there the Pod is scheduled and the model is Quantizing."""
    ns = "kq-waiting"
    models = _models(control_plane, ns, tmp_path)
    models.apply(example("tiny.yaml", "no-claim-yet"))  # nothing holds kubequant-data in this namespace yet

    def quantized() -> dict:
        return next((c for c in models.status("no-claim-yet").get("conditions") or [] if c["type"] == "Quantized"), {})

    condition = wait_for("the scheduler's reason in the Quantized condition",
                         lambda: (c := quantized()).get("reason") == "Unschedulable" and c, timeout=60,
                         describe=lambda: json.dumps(models.status("no-claim-yet"), indent=1)[:2000])
    assert 'persistentvolumeclaim "kubequant-data" not found' in condition["message"], condition
    status = models.status("no-claim-yet")
    assert status["phase"] == "Pending" and "is waiting" in status["message"], status
    assert (operator.sample("kubequant_models", {"phase": "Pending"}) or 0) >= 1

    data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    models.wait_phase("no-claim-yet", "Quantizing", timeout=120)


def test_a_vllm_pod_the_scheduler_cannot_place_is_named_in_the_ready_condition(control_plane: ControlPlane, operator,
                                                                              tmp_path: Path):
    """Gated, then served while no node takes new Pods (every node cordoned once the gate passed, as
    when a cluster has no capacity left): the real scheduler leaves the vLLM Pod Pending, and the
    model's Ready condition carries its words."""
    ns = "kq-serve-wait"
    models = _models(control_plane, ns, tmp_path)
    data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    models.apply(example("tiny.yaml", "no-room"))
    models.finish(models.wait_job("no-room", "quantize"), QUANTIZE_RESULT)
    evaluate = models.wait_job("no-room", "evaluate")
    models.kubelet.running_pod(evaluate)  # bound and running before the nodes close
    nodes = [n["metadata"]["name"] for n in json.loads(control_plane.kubectl("get", "nodes", "-o", "json").stdout)["items"]]
    try:
        control_plane.kubectl("cordon", *nodes)
        models.finish(evaluate, PASSED)

        def ready() -> dict:
            return next((c for c in models.status("no-room").get("conditions") or [] if c["type"] == "Ready"), {})

        condition = wait_for("the scheduler's reason in the Ready condition",
                             lambda: (c := ready()).get("reason") == "Unschedulable" and c, timeout=90,
                             describe=lambda: json.dumps(models.status("no-room"), indent=1)[:2000])
        assert "a vLLM Pod is waiting" in condition["message"] and "unschedulable" in condition["message"], condition
        assert models.status("no-room")["phase"] == "Deploying"
    finally:
        control_plane.kubectl("uncordon", *nodes)
    models.wait_phase("no-room", "Ready", timeout=120)


def test_deletion_honours_the_retention_policy(control_plane: ControlPlane, operator, tmp_path: Path):
    """Delete: vLLM stops, a cleanup Job (its real command) removes the artifacts, the garbage
    collector removes the children through their ownerReferences; a created claim goes too.
    Retain: the created claim stays."""
    ns = "kq-delete"
    models = _models(control_plane, ns, tmp_path)
    data = data_volume(control_plane, ns, "kubequant-data", tmp_path / "claim", with_fixtures=True)
    for claim in ("keep-claim", "wipe-claim"):
        data_volume(control_plane, ns, claim, tmp_path / claim, create_claim=False)
    models.apply(example("tiny.yaml", "wipe", storage__retentionPolicy="Delete"))
    models.apply(example("tiny.yaml", "keep"))
    for name, policy in (("keep-claim", "Retain"), ("wipe-claim", "Delete")):
        models.apply(example("tiny.yaml", name, storage={"claimName": name, "create": True, "size": "1Gi",
                                                          "retentionPolicy": policy}))
    models.finish(models.wait_job("wipe", "quantize"), QUANTIZE_RESULT)
    models.finish(models.wait_job("wipe", "evaluate"), PASSED)
    models.wait_phase("wipe", "Ready")
    (data / "kubequant" / "wipe" / "artifact").mkdir(parents=True)
    for name in ("keep", "keep-claim", "wipe-claim"):
        models.wait_job(name, "quantize")
    owned = {name: [j["metadata"]["name"] for j in models.jobs(name)] for name in ("wipe", "keep")}

    for name in ("keep", "wipe", "keep-claim", "wipe-claim"):
        control_plane.kubectl("delete", "qm", name, "-n", ns, "--wait=false")
    cleanup = wait_for("the cleanup Job", lambda: next(iter(models.jobs("wipe", "cleanup")), None))
    wait_for("vLLM to stop", lambda: models.deployment("wipe") is None)
    assert models.get("wipe") is not None  # the finalizer waits for the cleanup
    terminated = models.kubelet.run(models.kubelet.running_pod(cleanup["metadata"]["name"]))
    assert terminated["exitCode"] == 0
    assert not (data / "kubequant" / "wipe").exists() and (data / "tiny-llama").is_dir()

    for name in ("keep", "wipe", "keep-claim", "wipe-claim"):
        wait_for(f"{name} to go", lambda n=name: models.get(n) is None)
    for name, jobs in owned.items():
        wait_for(f"the garbage collector to remove {name}'s Jobs",
                 lambda js=jobs: all(control_plane.get("job", j, ns) is None for j in js))
    assert control_plane.get("service", "wipe", ns) is None
    assert control_plane.get("pvc", "keep-claim", ns) is not None
    wait_for("the deleted claim to go", lambda: (c := control_plane.get("pvc", "wipe-claim", ns)) is None
             or c["metadata"].get("deletionTimestamp"))
    assert control_plane.get("pvc", "kubequant-data", ns) is not None  # not the operator's to delete


def _gpu_nodes(names: list[str], gpus: int, pool: str) -> list[dict]:
    """KWOK-managed GPU Nodes of a pool of their own (a test's, so others' Pods cannot fill them)."""
    return [{"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                          "labels": {"kubernetes.io/hostname": name, "type": "kwok", "kubequant.io/test-pool": pool}},
             "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
             "status": {"capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)},
                        "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}}}
            for name in names]


def test_two_node_groups_with_the_upstream_leader_worker_set_controller(control_plane: ControlPlane,
                                                                         operator_kubeconfig, tmp_path: Path):
    """serving.nodes 2 at TP 2 with an InferencePool, on two simulated 4-GPU nodes of its own: the
    operator creates a LeaderWorkerSet, the upstream LWS controller (and its webhooks) makes the leader
    and worker Pods, the real scheduler places them, and the model is Ready. Then twice the replicas:
    a second group fills the 8 GPUs, no new Job; deleting the model removes the groups, their Pods and
    the pool. The operator starts after the CRDs, as it would in a cluster that has them: it watches
    LeaderWorkerSets then (one started before them sees their changes at its periodic resync)."""
    ns = "kq-lws"
    models = _models(control_plane, ns, tmp_path)
    data_volume(control_plane, ns, "llama-3-8b-artifacts", tmp_path / "claim", size="100Gi",
                access_mode="ReadWriteMany", create_claim=False)
    nodes = _gpu_nodes(["gpu-lws-a", "gpu-lws-b"], 4, "lws")
    control_plane.apply(*nodes)
    try:
        with LeaderWorkerSetController(control_plane, tmp_path / "lws-manager.log"), \
                OperatorProcess(operator_kubeconfig, WATCHED, tmp_path / "operator.log"):
            _two_node_lifecycle(control_plane, models, ns)
    finally:
        for node in nodes:
            control_plane.kubectl("delete", "node", node["metadata"]["name"], "--ignore-not-found", "--wait=false")


def _two_node_lifecycle(control_plane: ControlPlane, models: Models, ns: str) -> None:
    models.apply(example("llama-3-8b-tp2.yaml", serving__nodes=2, serving__replicas=1,
                         serving__nodeSelector={"kubequant.io/test-pool": "lws"},
                         serving__inferencePool={"endpointPicker": {"name": "llama-epp"}}))
    models.finish(models.wait_job("llama-3-8b", "quantize"), QUANTIZE_RESULT)
    models.finish(models.wait_job("llama-3-8b", "evaluate"), PASSED)
    status = models.wait_phase("llama-3-8b", "Ready", timeout=180)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "1/1 groups available" in ready["message"] and "the gate measured" in ready["message"]
    assert next(c for c in status["conditions"] if c["type"] == "InferencePoolReady")["status"] == "True"
    pods = models.serving_pods("llama-3-8b")
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    index = "leaderworkerset.sigs.k8s.io/worker-index"
    assert sorted(p["metadata"]["labels"][index] for p in pods) == ["0", "1"]  # the LWS webhook: a leader, a worker
    assert {p["spec"]["nodeName"] for p in pods} <= {"gpu-lws-a", "gpu-lws-b"}
    leader = next(p for p in pods if p["metadata"]["labels"][index] == "0")
    assert "--pipeline-parallel-size 2" in leader["spec"]["containers"][0]["command"][2]
    assert control_plane.get("deployment", "llama-3-8b", ns) is None
    assert control_plane.get("inferencepool", "llama-3-8b", ns) is not None
    jobs = {j["metadata"]["name"] for j in models.jobs("llama-3-8b")}

    models.patch_spec("llama-3-8b", "serving.replicas", 2)
    wait_for("the second group", lambda: len(models.serving_pods("llama-3-8b")) == 4, timeout=120)
    status = models.wait_phase("llama-3-8b", "Ready", timeout=120)
    assert "2/2 groups available" in next(c for c in status["conditions"] if c["type"] == "Ready")["message"]
    assert {j["metadata"]["name"] for j in models.jobs("llama-3-8b")} == jobs  # nothing quantized or gated again
    pods = models.serving_pods("llama-3-8b")
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["gpu-lws-a", "gpu-lws-a", "gpu-lws-b", "gpu-lws-b"]

    # serving.autoscaling's HPA on the LeaderWorkerSet, as the real apiserver admits it.
    body = example("llama-3-8b-tp2.yaml", serving__nodes=2, serving__autoscaling={"maxReplicas": 3})
    body["metadata"].update(namespace=ns, uid="00000000-0000-0000-0000-000000000000")
    hpa = builders.horizontal_pod_autoscaler(parse_model(body))
    control_plane.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(hpa))

    control_plane.kubectl("delete", "qm", "llama-3-8b", "-n", ns, "--wait=false")
    wait_for("the model to go", lambda: models.get("llama-3-8b") is None, timeout=120)
    wait_for("the groups to go", lambda: not models.serving_pods("llama-3-8b")
             and control_plane.get("leaderworkerset", "llama-3-8b", ns) is None, timeout=120)
    wait_for("the pool to go", lambda: control_plane.get("inferencepool", "llama-3-8b", ns) is None)
