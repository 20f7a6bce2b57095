"""The serving children: the vLLM Deployment (or LeaderWorkerSet across nodes), its Service, and the
PodDisruptionBudget, ServiceMonitor, HorizontalPodAutoscaler and InferencePool when asked for."""

from __future__ import annotations

import copy
import math
import shlex

from kubequant.builders.meta import (
    ARTIFACTS_MOUNT,
    CONTAINER_SECURITY,
    LABEL_ARTIFACT,
    POD_SECURITY,
    VLLM_PORT,
    api_version,
    labels,
    object_metadata,
    selector,
    with_content_hash,
)
from kubequant.builders.pods import engine_env, engine_resources, serving_pod_parts, serving_scheduling
from kubequant.spec import AUTOSCALING_METRICS, GROUP, Model
from quantizer.contract import CPU


def vllm_serve_args(model: Model, artifact_path: str, port: int = VLLM_PORT) -> list[str]:
    """`vllm serve`'s arguments for this spec: the Deployment and `kubequant run` share them. No
    --quantization flag: vLLM detects GPTQ from the checkpoint's config.json. Across nodes, vLLM's
    documented layout: tensor parallel within a node, pipeline parallel across them, over Ray."""
    s = model.spec.serving
    multi_node = ["--pipeline-parallel-size", str(s.nodes), "--distributed-executor-backend", "ray"] \
        if s.nodes > 1 else []
    return [
        artifact_path,
        "--tensor-parallel-size", str(s.tensor_parallel_size),
        *multi_node,
        "--served-model-name", model.served_model_name,
        "--max-model-len", str(s.max_model_len),
        "--gpu-memory-utilization", repr(float(s.gpu_memory_utilization)),
        "--port", str(port),
        # The CPU image has no C++ compiler for torch.compile; eager mode also starts in seconds.
        *(["--enforce-eager"] if s.device == CPU else []),
        *s.extra_args,
    ]


def vllm_args(model: Model, artifact_path: str) -> list[str]:
    return vllm_serve_args(model, f"{ARTIFACTS_MOUNT}/{artifact_path}")


def _server_pod(model: Model, artifact: dict, container: dict, http: bool = True) -> dict:
    """A serving Pod template: `container` (vLLM or a Ray worker) with the artifact, /dev/shm, GPUs
    and the probes when it serves HTTP."""
    s = model.spec.serving
    volumes, mounts = serving_pod_parts(model)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    startup_period = 10
    container = {
        **container,
        "image": s.image,
        "env": engine_env(model),
        "resources": engine_resources(model),
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    if http:
        container.update({
            "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
            "startupProbe": {**probe, "periodSeconds": startup_period,
                             "failureThreshold": math.ceil(s.startup_timeout_seconds / startup_period)},
            "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {**probe, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
        })
    return {
        "metadata": {
            "labels": {**labels(model, "server"), LABEL_ARTIFACT: artifact["hash"]},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(VLLM_PORT),
                            "prometheus.io/path": "/metrics"} if http else {},
        },
        "spec": {
            # Service links would put VLLM_PORT=tcp://... into the environment, which vLLM reads.
            "enableServiceLinks": False,
            "securityContext": {k: copy.deepcopy(v) for k, v in POD_SECURITY.items() if k != "fsGroup"},
            "terminationGracePeriodSeconds": 60,
            "containers": [container],
            "volumes": volumes,
            **serving_scheduling(model),
        },
    }


def _serving_child(model: Model, kind: str, spec: dict) -> dict:
    """A serving object named after the model, with the hash of its content."""
    return with_content_hash({"apiVersion": api_version(kind), "kind": kind,
                       "metadata": object_metadata(model, model.name, "server"), "spec": spec})


def _replicas(model: Model) -> dict:
    """spec.replicas, unless an autoscaler owns it (then the workload leaves it to the HPA)."""
    return {} if model.spec.serving.autoscaling else {"replicas": model.spec.serving.replicas}


def deployment(model: Model, artifact: dict) -> dict:
    """vLLM serving `artifact` (a status record that passed the gate) on one node."""
    s = model.spec.serving
    vllm = {"name": "vllm", "command": ["vllm", "serve"], "args": vllm_args(model, artifact["path"])}
    return _serving_child(model, "Deployment", {
            **_replicas(model),
            "selector": {"matchLabels": selector(model)},
            # Old Pods keep serving until new ones pass readiness: a rollout never drops below `replicas`.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": s.startup_timeout_seconds + 600,
            "revisionHistoryLimit": 3,
            "template": _server_pod(model, artifact, vllm),
    })


RAY_PORT = 6379


# Set by the LeaderWorkerSet controller in every Pod of a group.
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"


LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def multi_node_leader_command(model: Model, artifact_path: str) -> str:
    """The leader: a Ray head, a wait until every node of the group has joined, then vLLM over them."""
    s = model.spec.serving
    alive = ('python3 -c "import ray; ray.init(address=\'auto\', logging_level=\'ERROR\'); '
             'print(sum(n[\'Alive\'] for n in ray.nodes()))"')
    return (f"ray start --head --port={RAY_PORT} --num-gpus={s.tensor_parallel_size} --disable-usage-stats && "
            f'until [ "$({alive} 2>/dev/null)" = "{s.nodes}" ]; do echo "waiting for {s.nodes} Ray nodes"; sleep 5; done && '
            f"exec vllm serve {shlex.join(vllm_args(model, artifact_path))}")


def multi_node_worker_command(model: Model) -> str:
    return (f"exec ray start --address=${LWS_LEADER_ADDRESS}:{RAY_PORT} --num-gpus={model.spec.serving.tensor_parallel_size} "
            "--block --disable-usage-stats")


def leader_worker_set(model: Model, artifact: dict) -> dict:
    """vLLM across serving.nodes nodes: one group per replica, a leader (Ray head and the OpenAI
    server) and nodes - 1 workers, each Pod with tensorParallelSize GPUs. A Pod that fails recreates
    its group: a pipeline stage cannot be replaced alone."""
    s = model.spec.serving
    leader = {"name": "vllm", "command": ["/bin/sh", "-c", multi_node_leader_command(model, artifact["path"])]}
    worker = {"name": "ray-worker", "command": ["/bin/sh", "-c", multi_node_worker_command(model)]}
    return _serving_child(model, "LeaderWorkerSet", {
            **_replicas(model),
            "leaderWorkerTemplate": {
                "size": s.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _server_pod(model, artifact, leader),
                "workerTemplate": _server_pod(model, artifact, worker, http=False),
            },
            # A new group joins before an old one leaves: serving never drops below `replicas` groups.
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1}},
            "startupPolicy": "LeaderCreated",
    })


def optional_kinds(model: Model) -> tuple[str, ...]:
    """The OPTIONAL_KINDS this spec's serving needs (their CRDs are checked before they are used)."""
    s = model.spec.serving
    wanted = {"LeaderWorkerSet": s.nodes > 1, "InferencePool": s.inference_pool is not None}
    return tuple(kind for kind, needed in wanted.items() if needed and s.enabled)


def workload_kind(model: Model) -> str:
    return "LeaderWorkerSet" if model.spec.serving.nodes > 1 else "Deployment"


def server_selector(model: Model) -> dict[str, str]:
    """The Pods that answer requests: every Deployment Pod, or each group's leader."""
    if model.spec.serving.nodes > 1:
        return {**selector(model), LWS_WORKER_INDEX_LABEL: "0"}
    return selector(model)


def horizontal_pod_autoscaler(model: Model) -> dict:
    """Replicas (Deployment Pods, or LeaderWorkerSet groups) on a vLLM gauge averaged over the
    serving Pods, served to the custom metrics API by a Prometheus adapter (docs/install.md)."""
    a = model.spec.serving.autoscaling
    assert a is not None
    _, adapter_name = AUTOSCALING_METRICS[a.metric]
    return _serving_child(model, "HorizontalPodAutoscaler", {
            "scaleTargetRef": {"apiVersion": api_version(workload_kind(model)), "kind": workload_kind(model),
                               "name": model.name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": adapter_name},
                                                  "target": {"type": "AverageValue", "averageValue": a.target}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds}},
    })


def inference_pool(model: Model) -> dict:
    """The serving Pods as an InferencePool, so that an inference gateway's endpoint picker routes
    each request by queue depth and KV-cache use (vLLM's /metrics)."""
    pool = model.spec.serving.inference_pool
    assert pool is not None
    return _serving_child(model, "InferencePool", {
            "selector": {"matchLabels": server_selector(model)},
            "targetPorts": [{"number": VLLM_PORT}],
            "endpointPickerRef": {"name": pool.endpoint_picker, "port": {"number": pool.endpoint_picker_port},
                                  "failureMode": pool.failure_mode},
    })


def service(model: Model) -> dict:
    s = model.spec.serving
    meta = object_metadata(model, model.name, "server")
    meta["labels"][f"{GROUP}/metrics"] = "true"  # vLLM's /metrics is on the same port
    return with_content_hash({
        "apiVersion": api_version("Service"),
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": s.service_type,
            "selector": server_selector(model),
            "ports": [{"name": "http", "port": s.service_port, "targetPort": "http", "protocol": "TCP"}],
        },
    })


def pod_disruption_budget(model: Model) -> dict:
    return _serving_child(model, "PodDisruptionBudget", {"maxUnavailable": 1, "selector": {"matchLabels": selector(model)}})


def service_monitor(model: Model) -> dict:
    s = model.spec.serving
    meta = object_metadata(model, model.name, "server")
    meta["labels"].update(s.service_monitor_labels)
    return with_content_hash({
        "apiVersion": api_version("ServiceMonitor"),
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {**selector(model), f"{GROUP}/metrics": "true"}},
            "namespaceSelector": {"matchNames": [model.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": s.service_monitor_interval}],
        },
    })


def serving_objects(model: Model, artifact: dict) -> list[dict]:
    """The workload (Deployment, or LeaderWorkerSet across nodes), the Service and, when asked for,
    the PodDisruptionBudget, ServiceMonitor, HorizontalPodAutoscaler and InferencePool."""
    s = model.spec.serving
    workload = leader_worker_set(model, artifact) if s.nodes > 1 else deployment(model, artifact)
    objs = [workload, service(model)]
    if s.replicas > 1 or (s.autoscaling and s.autoscaling.max_replicas > 1):
        objs.append(pod_disruption_budget(model))
    if s.service_monitor:
        objs.append(service_monitor(model))
    if s.autoscaling:
        objs.append(horizontal_pod_autoscaler(model))
    if s.inference_pool:
        objs.append(inference_pool(model))
    return objs
