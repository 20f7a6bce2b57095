"""Serving past one node and past one replica: the LeaderWorkerSet (serving.nodes), the
HorizontalPodAutoscaler (serving.autoscaling) and the InferencePool (serving.inferencePool), as
built (valid Kubernetes, vLLM's multi-node arguments) and as the reconciler drives them (a missing
CRD is a condition, a layout change keeps serving, scaling never quantizes or gates again)."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kubequant import builders
from kubequant.reconcile import Update
from kubequant.spec import SpecError, parse_model

from tests.operator_support.objects import PASSED, QUANTIZE_RESULT, available, example, with_spec
from tests.test_operator_builders import ARTIFACT, K8S_VERSION
from tests.test_operator_reconcile import Sim, condition, kinds

MULTI_NODE = with_spec(with_spec(example(), "serving.nodes", 2), "serving.tensorParallelSize", 8)
AUTOSCALED = with_spec(example(), "serving.autoscaling", {"minReplicas": 1, "maxReplicas": 4, "target": "3"})
POOLED = with_spec(example(), "serving.inferencePool", {"endpointPicker": {"name": "llama-epp"}})


def _container(pod_template: dict) -> dict:
    [container] = pod_template["spec"]["containers"]
    return container


def test_multi_node_serving_is_a_leader_worker_set_with_vllms_layout():
    model = parse_model(MULTI_NODE)
    objs = {o["kind"]: o for o in builders.serving_objects(model, ARTIFACT)}
    assert "Deployment" not in objs
    lws = objs["LeaderWorkerSet"]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["replicas"] == model.spec.serving.replicas
    leader, worker = _container(template["leaderTemplate"]), _container(template["workerTemplate"])
    script = leader["command"][2]
    # Tensor parallel within a node, pipeline parallel across nodes, over Ray (vLLM's multi-node docs).
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2 --distributed-executor-backend ray" in script
    assert script.startswith("ray start --head") and '= "2" ]' in script
    assert "$LWS_LEADER_ADDRESS:6379" in worker["command"][2] and "--block" in worker["command"][2]
    for pod_template, container in ((template["leaderTemplate"], leader), (template["workerTemplate"], worker)):
        assert container["resources"]["limits"][builders.GPU_RESOURCE] == 8
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                      **{"spec": pod_template["spec"]}}, K8S_VERSION, strict=True)
    assert "startupProbe" in leader and "startupProbe" not in worker  # only the leader serves HTTP
    # The Service (and the pool) reach the leaders only: workers hold pipeline stages.
    assert objs["Service"]["spec"]["selector"][builders.LWS_WORKER_INDEX_LABEL] == "0"
    for kind in ("Service", "PodDisruptionBudget"):
        kubernetes_validate.validate(objs[kind], K8S_VERSION, strict=True)


def test_autoscaling_leaves_the_replicas_to_a_hpa_on_vllms_queue():
    model = parse_model(AUTOSCALED)
    objs = {o["kind"]: o for o in builders.serving_objects(model, ARTIFACT)}
    assert "replicas" not in objs["Deployment"]["spec"]
    hpa = objs["HorizontalPodAutoscaler"]
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": model.name}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"] == {"metric": {"name": "vllm_num_requests_waiting"},
                              "target": {"type": "AverageValue", "averageValue": "3"}}
    assert "PodDisruptionBudget" in objs  # up to 4 replicas: one may go at a time
    across = parse_model(with_spec(with_spec(AUTOSCALED, "serving.nodes", 2), "serving.autoscaling.metric", "kvCacheUsage"))
    hpa = {o["kind"]: o for o in builders.serving_objects(across, ARTIFACT)}["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_kv_cache_usage_perc"


def test_the_inference_pool_selects_the_serving_pods():
    model = parse_model(POOLED)
    pool = {o["kind"]: o for o in builders.serving_objects(model, ARTIFACT)}["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"] == {"selector": {"matchLabels": builders.selector(model)}, "targetPorts": [{"number": 8000}],
                            "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002},
                                                  "failureMode": "FailClose"}}


@pytest.mark.parametrize(("path", "value", "message"), [
    ("serving.autoscaling", {"minReplicas": 3, "maxReplicas": 2}, "maxReplicas must be at least minReplicas"),
    ("serving.autoscaling", {"maxReplicas": 2, "metric": "gpuUtilization"}, "metric must be numRequestsWaiting or kvCacheUsage"),
    ("serving.autoscaling", {"minReplicas": 2}, "serving.autoscaling.maxReplicas is required"),
    ("serving.inferencePool", {"endpointPicker": {"port": 9002}}, "endpointPicker.name is required"),
    ("serving.nodes", 0, "serving.nodes must be at least 1"),
])
def test_bad_scaling_specs_name_the_field(path, value, message):
    with pytest.raises(SpecError, match=message):
        parse_model(with_spec(example(), path, value))


def _ready(body: dict, missing: frozenset[str] = frozenset()) -> Sim:
    sim = Sim(body)
    sim.missing = missing
    sim.step()
    sim.finish("quantize", "succeeded", QUANTIZE_RESULT)
    sim.step()
    sim.finish("evaluate", "succeeded", PASSED)
    return sim


def _make_available(sim: Sim, kind: str, replicas: int) -> None:
    sim.objs[(kind, sim.model.name)] = available(sim.objs[(kind, sim.model.name)], replicas=replicas)


def test_without_the_leader_worker_set_crd_the_model_says_so_and_keeps_serving():
    sim = _ready(example())
    sim.step()
    _make_available(sim, "Deployment", 2)
    assert sim.step().status["phase"] == "Ready"
    sim.missing = frozenset({"LeaderWorkerSet"})
    sim.set_spec("serving.nodes", 2)
    decision = sim.step()
    ready = condition(decision, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "LeaderWorkerSetNotInstalled")
    assert "lws.sigs.k8s.io" in ready["message"] and "serving.nodes to 1" in ready["message"]
    assert not [k for k in kinds(decision) if k.startswith("Delete") or "LeaderWorkerSet" in k]
    assert ("Deployment", sim.model.name) in sim.objs  # what served still serves


def test_going_multi_node_retires_the_deployment_only_once_the_groups_serve():
    sim = _ready(example())
    sim.step()
    _make_available(sim, "Deployment", 2)
    sim.step()
    sim.set_spec("serving.nodes", 2)
    decision = sim.step()
    assert kinds(decision) == ["Create LeaderWorkerSet", "Update Service"]
    assert ("Deployment", sim.model.name) in sim.objs
    assert condition(decision, "Ready")["reason"] == "RollingOut"
    _make_available(sim, "LeaderWorkerSet", 2)
    decision = sim.step()
    assert kinds(decision) == ["Delete Deployment"]
    ready = condition(decision, "Ready")
    assert ready["reason"] == "Serving" and "2/2 groups available" in ready["message"]
    assert "the gate measured tensorParallelSize" in ready["message"]
    assert decision.status["serving"]["workload"] == "LeaderWorkerSet"


def test_scaling_changes_replicas_without_quantizing_or_gating_again():
    sim = _ready(AUTOSCALED)
    decision = sim.step()
    assert kinds(decision) == ["Create Deployment", "Create Service", "Create PodDisruptionBudget",
                               "Create ServiceMonitor", "Create HorizontalPodAutoscaler"]
    assert condition(decision, "Autoscaling")["reason"] == "Creating"
    _make_available(sim, "Deployment", 1)
    assert sim.step().status["phase"] == "Ready"
    # The autoscaler scales the Deployment to 3, through the scale subresource.
    sim.objs[("Deployment", sim.model.name)]["spec"]["replicas"] = 3
    sim.objs[("HorizontalPodAutoscaler", sim.model.name)]["status"] = {
        "currentReplicas": 3, "desiredReplicas": 3,
        "conditions": [{"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound"}]}
    decision = sim.step()
    assert kinds(decision) == [], "scaling is not a spec change: no Job, no update"
    assert decision.status["phase"] == "Deploying" and decision.status["serving"]["replicas"] == 3
    _make_available(sim, "Deployment", 3)
    decision = sim.step()
    assert decision.status["phase"] == "Ready"
    scaling = condition(decision, "Autoscaling")
    assert scaling["status"] == "True" and "3 replicas within 1..4" in scaling["message"]
    # Without the metrics adapter the HPA cannot scale: its reason and message come through.
    sim.objs[("HorizontalPodAutoscaler", sim.model.name)]["status"]["conditions"] = [
        {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric",
         "message": "unable to get metric vllm_num_requests_waiting"}]
    scaling = condition(sim.step(), "Autoscaling")
    assert (scaling["status"], scaling["reason"]) == ("False", "FailedGetPodsMetric")
    # Turning autoscaling off gives the replicas back to the spec and removes the HPA.
    sim.set_spec("serving.autoscaling", {"enabled": False, "maxReplicas": 4})
    decision = sim.step()
    assert kinds(decision) == ["Update Deployment", "Delete HorizontalPodAutoscaler"]
    update = next(a for a in decision.actions if isinstance(a, Update))
    assert update.obj["spec"]["replicas"] == sim.model.spec.serving.replicas
    assert all(c["type"] != "Autoscaling" for c in decision.status["conditions"])


def test_the_inference_pool_condition_follows_its_crd():
    sim = _ready(POOLED, missing=frozenset({"InferencePool"}))
    decision = sim.step()
    assert "Create InferencePool" not in kinds(decision)
    pool = condition(decision, "InferencePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "InferencePoolNotInstalled")
    sim.missing = frozenset()
    decision = sim.step()
    assert "Create InferencePool" in kinds(decision)
    assert condition(sim.step(), "InferencePoolReady")["status"] == "True"
