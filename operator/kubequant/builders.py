"""Pure functions from a Model to the manifests of its children (plain dicts, ready to POST).

Names are deterministic: the quantize Job is named by the hash of everything that determines the
artifact (source + recipe + the texts), the evaluate Job by that plus the gate's thresholds. A
restarted operator therefore finds its Jobs instead of duplicating them, and a spec change that
does not touch those inputs (replicas, extraArgs, images, resources) reuses the artifact.
Objects that are updated in place (the serving workload and its companions) carry the hash of
their own content in an annotation, so drift is detected without comparing defaulted fields.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shlex
from typing import Any

from kubequant.spec import (
    AUTOSCALING_METRICS,
    GPU_RESOURCE,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    HubFile,
    HuggingFaceSource,
    Model,
    Tasks,
    TextSource,
    asks_gpus,
)
from quantizer.contract import CPU, CPU_KVCACHE_SPACE_GIB, EXIT_BAD_INPUT, EXIT_GATE_FAILED

# kind -> (apiVersion, plural) of everything the operator reads or writes: the builders, the
# reconciler's deletes and the API paths of k8s.py all take them from here.
KINDS: dict[str, tuple[str, str]] = {
    KIND: (f"{GROUP}/{VERSION}", PLURAL),
    "Job": ("batch/v1", "jobs"),
    "Pod": ("v1", "pods"),
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "LeaderWorkerSet": ("leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "InferencePool": ("inference.networking.k8s.io/v1", "inferencepools"),
}
# Kinds from CRDs a cluster may lack: their absence is a condition, never a crash.
OPTIONAL_KINDS = ("ServiceMonitor", "LeaderWorkerSet", "InferencePool")


def api_version(kind: str) -> str:
    return KINDS[kind][0]


LABEL_MODEL = f"{GROUP}/model"
LABEL_ARTIFACT = f"{GROUP}/artifact"
ANNOTATION_HASH = f"{GROUP}/hash"
ANNOTATION_RETENTION = f"{GROUP}/retention-policy"
MANAGED_BY = "kubequant"

ARTIFACTS_MOUNT = "/artifacts"
SOURCE_MOUNT = "/source"
TEXTS_MOUNT = "/texts"
VLLM_PORT = 8000
# Container names: the reconciler reads results from these containers' termination messages.
QUANTIZE_CONTAINER = "quantize"
FETCH_CONTAINER = "fetch"
FETCH_TEXTS_CONTAINER = "fetch-texts"
EVALUATE_CONTAINER = "evaluate"


def _canonical(data: Any) -> Any:
    """Numbers as JSON means them: the apiserver stores `dampPercent: 1.0` as `1`, so a float that is
    a whole number hashes as that integer, whoever parsed the spec (kubectl's file or the stored object)."""
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict):
        return {key: _canonical(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_canonical(value) for value in data]
    return data


def digest(data: Any, length: int = 10) -> str:
    """A short, stable hash of JSON-able data (key order and a number's spelling do not matter)."""
    text = json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _text_id(text: TextSource) -> dict:
    if text.hub:  # the endpoint is where it comes from, not what it is
        return {"huggingface": {"repo": text.hub.repo, "revision": text.hub.revision, "file": text.hub.file}}
    return {"path": text.path} if text.path else {"configMap": text.config_map, "key": text.key}


def hub_text_dir(model: Model, hub: HubFile) -> str:
    """Where the quantize Job fetches a dataset's files on the claim, keyed by repo@revision."""
    return f"{model_dir(model)}/datasets/{digest({'repo': hub.repo, 'revision': hub.revision})}"


def source_hash(model: Model) -> str:
    src = model.spec.source
    if isinstance(src, HuggingFaceSource):
        return digest({"repo": src.repo, "revision": src.revision})
    return digest({"claim": src.claim_name, "path": src.path})


def artifact_hash(model: Model) -> str:
    """Everything that changes the artifact or the perplexities the quantize Job measures."""
    q, e = model.spec.quantization, model.spec.evaluation
    return digest({
        "source": source_hash(model),
        "recipe": {"bits": q.bits, "groupSize": q.group_size, "actOrder": q.act_order, "sym": q.symmetric,
                   "damp": q.damp_percent, "scaleSearch": q.scale_search, "fullRange": q.full_range,
                   "refineSweeps": q.refine_sweeps, "groupAwareOrder": q.group_aware_order, "format": q.format},
        "calibration": {"text": _text_id(q.calibration.text), "field": q.calibration.jsonl_field,
                        "samples": q.calibration.samples, "seqLen": q.calibration.seq_len},
        "evaluation": {"text": _text_id(e.text), "field": e.jsonl_field, "seqLen": e.seq_len,
                       "maxWindows": e.max_windows, "stride": e.stride},
    })


def evaluation_key(model: Model) -> str:
    """The artifact, the gate and the serving settings its numbers depend on: changing a threshold or
    the tensor parallelism or the device evaluates again (vLLM's TP kernels sum in another order, its
    CPU kernels are others), never quantizes again; replicas, extraArgs or resources change neither."""
    e = model.spec.evaluation
    return digest({
        "artifact": artifact_hash(model),
        "gate": {"increase": e.max_perplexity_increase, "ratio": e.max_perplexity_ratio,
                 "engine": e.engine_tolerance, "dtype": e.dtype, "compareWithSource": e.compare_with_source,
                 "kl": e.max_kl_divergence, "top1": e.min_top_token_agreement,
                 "generation": e.generation and {"prompts": _text_id(e.generation.prompts),
                                                 "maxNewTokens": e.generation.max_new_tokens,
                                                 "minExactMatch": e.generation.min_exact_match},
                 "throughput": e.throughput and {"batchSizes": list(e.throughput.batch_sizes),
                                                 "maxNewTokens": e.throughput.max_new_tokens,
                                                 "minSpeedup": e.throughput.min_speedup},
                 "tasks": e.tasks and {"path": e.tasks.path, "configMap": e.tasks.config_map, "limit": e.tasks.limit,
                                       "maxAccuracyDrop": e.tasks.max_accuracy_drop}},
        # The device only when it is not the default, so that the keys of GPU models stay as they were.
        "serving": {"tensorParallelSize": model.spec.serving.tensor_parallel_size,
                    **({"device": CPU} if model.spec.serving.device == CPU else {})},
    })


# Names. Model names are at most 40 characters (CRD rule), so every name stays a DNS-1123 label.
def quantize_job_name(model: Model) -> str:
    return f"{model.name}-quantize-{artifact_hash(model)}"


def evaluate_job_name(model: Model) -> str:
    return f"{model.name}-eval-{evaluation_key(model)}"


def cleanup_job_name(model: Model) -> str:
    return f"{model.name}-cleanup"


def model_dir(model: Model) -> str:
    """Everything this model writes on the storage claim lives under here (Delete removes it)."""
    return f"kubequant/{model.name}"


def artifact_dir(model: Model, hash_: str | None = None) -> str:
    """Path of an artifact relative to the root of the storage claim."""
    return f"{model_dir(model)}/{hash_ or artifact_hash(model)}"


def labels(model: Model, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vllm" if component == "server" else "kubequant",
        "app.kubernetes.io/instance": model.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_MODEL: model.name,
    }


def selector(model: Model) -> dict[str, str]:
    return {"app.kubernetes.io/instance": model.name, "app.kubernetes.io/component": "server"}


def owner_reference(model: Model) -> dict:
    return {"apiVersion": api_version(KIND), "kind": KIND, "name": model.name, "uid": model.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(model: Model, name: str, component: str, owned: bool = True, **extra: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": model.namespace, "labels": labels(model, component), **extra}
    # `kubequant render` has no uid: the objects it prints are adopted by nobody.
    if owned and model.uid:
        meta["ownerReferences"] = [owner_reference(model)]
    return meta


def _with_hash(obj: dict) -> dict:
    obj["metadata"].setdefault("annotations", {})[ANNOTATION_HASH] = digest(obj, 16)
    return obj


# The kubequant images' user (65532); vLLM's image runs as any user given a writable HOME.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,  # the Jobs write to the claim
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
# Non-root with a writable HOME for the caches of torch, Triton and vLLM.
BASE_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]


def _texts(model: Model, which: str, text: TextSource) -> tuple[str, list[dict], list[dict]]:
    """(path inside the Pod, volumes, mounts) for a text source."""
    if text.path:
        return f"{ARTIFACTS_MOUNT}/{text.path}", [], []
    if text.hub:  # fetched onto the claim by the quantize Job's fetch-texts container
        return f"{ARTIFACTS_MOUNT}/{hub_text_dir(model, text.hub)}/{text.hub.file}", [], []
    volume = f"{which}-text"
    mount = f"{TEXTS_MOUNT}/{which}"
    return (
        f"{mount}/{text.key}",
        [{"name": volume, "configMap": {"name": text.config_map, "items": [{"key": text.key, "path": text.key}]}}],
        [{"name": volume, "mountPath": mount, "readOnly": True}],
    )


def _task_files(tasks: Tasks) -> tuple[str, list[dict], list[dict]]:
    """(path inside the Pod, volumes, mounts) for the task YAMLs: on the claim, or a ConfigMap's keys
    as the files of one directory."""
    if tasks.path:
        return f"{ARTIFACTS_MOUNT}/{tasks.path}", [], []
    mount = f"{TEXTS_MOUNT}/tasks"
    return (mount, [{"name": "tasks", "configMap": {"name": tasks.config_map}}],
            [{"name": "tasks", "mountPath": mount, "readOnly": True}])


def _artifacts_volume(model: Model, read_only: bool) -> dict:
    return {"name": "artifacts",
            "persistentVolumeClaim": {"claimName": model.spec.storage.claim_name, "readOnly": read_only}}


def _scratch() -> tuple[dict, dict]:
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def _engine_resources(model: Model) -> dict:
    """The evaluate Job's and the serving Pods' resources: the spec's, plus tensorParallelSize GPUs
    unless vLLM runs on the CPU."""
    s = model.spec.serving
    if s.device == CPU:
        return copy.deepcopy(s.resources) if s.resources else {}
    return _gpu_resources(s.resources, s.tensor_parallel_size)


def _engine_env(model: Model) -> list[dict]:
    """The environment of vLLM's containers; on the CPU, the KV cache it may reserve of the host's
    memory (otherwise a fraction of the whole node's, past the Pod's limit), unless extraArgs set it."""
    env = copy.deepcopy(BASE_ENV)
    s = model.spec.serving
    if s.device == CPU and not any(a.startswith("--kv-cache-memory-bytes") for a in s.extra_args):
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(CPU_KVCACHE_SPACE_GIB)})
    return env


def _gpu_resources(resources: dict, gpus: int) -> dict:
    """Copy of `resources` asking for exactly `gpus` NVIDIA GPUs (the limit; requests follow it)."""
    out = copy.deepcopy(resources) if resources else {}
    out.setdefault("limits", {})[GPU_RESOURCE] = gpus
    out.get("requests", {}).pop(GPU_RESOURCE, None)
    if "requests" in out and not out["requests"]:
        del out["requests"]
    return out


def _pod_failure_policy(container: str, exit_codes: list[int]) -> dict:
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": exit_codes}},
        # A drained node or a preempted Pod is not the Job's fault: do not count it against backoffLimit.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def quantize_command(
    model: Model, *, model_path: str, output: str, calibration: str, evaluation: str,
    provenance: list[str] | tuple[str, ...] = (), python: str = "python",
) -> list[str]:
    """The quantizer's command line for this spec: the Job's container and `kubequant run` share it."""
    q, e = model.spec.quantization, model.spec.evaluation
    args = [
        python, "-m", "quantizer", "quantize",
        "--model", model_path,
        "--output", output,
        "--calibration", calibration,
        "--jsonl-field", q.calibration.jsonl_field,
        "--bits", str(q.bits),
        "--group-size", str(q.group_size),
        "--act-order" if q.act_order else "--no-act-order",
        "--sym" if q.symmetric else "--no-sym",
        "--damp", repr(q.damp_percent / 100),
        "--scale-search", q.scale_search,
        "--format", q.format,
        "--full-range" if q.full_range else "--no-full-range",
        "--refine-sweeps", str(q.refine_sweeps),
        "--group-aware-order" if q.group_aware_order else "--no-group-aware-order",
        "--samples", str(q.calibration.samples),
        "--seq-len", str(q.calibration.seq_len),
        "--eval-text", evaluation,
        "--eval-seq-len", str(e.seq_len),
        *(["--eval-max-windows", str(e.max_windows)] if e.max_windows else []),
        *(["--eval-stride", str(e.stride)] if e.stride else []),
        *(["--device", CPU] if q.device == CPU else []),
        *provenance,
    ]
    if not model.spec.serving.enabled:
        args.append("--allow-unservable")
    return args


def source_location(model: Model) -> tuple[str, list[dict], list[dict]]:
    """(path inside the Pod, volumes, mounts) of the unquantized source model. A Hugging Face model is
    on the storage claim (the quantize Job's fetch container puts it there, keyed by repo@revision),
    which every Job mounts already; a PVC source on another claim is mounted read-only at /source."""
    spec = model.spec
    src = spec.source
    if isinstance(src, HuggingFaceSource):
        return f"{ARTIFACTS_MOUNT}/{model_dir(model)}/sources/{source_hash(model)}", [], []
    if src.claim_name == spec.storage.claim_name:  # one claim mounted twice confuses some CSI drivers
        return f"{ARTIFACTS_MOUNT}/{src.path}", [], []
    return (f"{SOURCE_MOUNT}/{src.path}",
            [{"name": "source", "persistentVolumeClaim": {"claimName": src.claim_name, "readOnly": True}}],
            [{"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True}])


def quantize_job(model: Model) -> dict:
    spec, q = model.spec, model.spec.quantization
    a_hash = artifact_hash(model)
    volumes = [_artifacts_volume(model, read_only=False)]
    mounts = [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT}]
    tmp_volume, tmp_mount = _scratch()
    volumes.append(tmp_volume)
    mounts.append(tmp_mount)
    init_containers = []
    provenance: list[str] = []

    src = spec.source
    model_path, source_volumes, source_mounts = source_location(model)
    volumes += source_volumes
    mounts += source_mounts
    if isinstance(src, HuggingFaceSource):
        # Downloaded onto the claim, keyed by repo@revision, so a retry or a new recipe resumes it.
        init_containers.append(_fetch_container(
            FETCH_CONTAINER, q.image, ["--repo", src.repo, "--revision", src.revision, "--output", model_path],
            tmp_mount, endpoint=src.endpoint, token=(src.token_secret, src.token_key) if src.token_secret else None))
        provenance = ["--source-repo", src.repo, "--source-revision", src.revision]
    init_containers += _fetch_texts_containers(model, tmp_mount)

    cal_path, cal_volumes, cal_mounts = _texts(model, "calibration", q.calibration.text)
    eval_path, eval_volumes, eval_mounts = _texts(model, "evaluation", spec.evaluation.text)
    volumes += cal_volumes + eval_volumes
    mounts += cal_mounts + eval_mounts
    args = quantize_command(
        model, model_path=model_path, output=f"{ARTIFACTS_MOUNT}/{artifact_dir(model, a_hash)}",
        calibration=cal_path, evaluation=eval_path, provenance=provenance,
    )
    # The path is keyed by the recipe hash: whatever a failed attempt left there is the same artifact.
    args.append("--overwrite")

    scheduling: dict[str, Any] = {"nodeSelector": dict(q.node_selector)} if q.node_selector else {}
    if tolerations := _tolerations(q.tolerations, asks_gpus(q.resources)):
        scheduling["tolerations"] = tolerations
    return _job(
        model, quantize_job_name(model), "quantize",
        {"name": QUANTIZE_CONTAINER, "image": q.image, "command": args, "env": copy.deepcopy(BASE_ENV),
         "resources": copy.deepcopy(q.resources), "volumeMounts": mounts},
        volumes, backoff_limit=q.backoff_limit, permanent_exit_codes=[EXIT_BAD_INPUT], artifact=a_hash,
        init_containers=init_containers, scheduling=scheduling,
        active_deadline_seconds=q.active_deadline_seconds,
    )


def _fetch_container(name: str, image: str, args: list[str], tmp_mount: dict, *, endpoint: str | None,
                     token: tuple[str, str] | None = None) -> dict:
    """`python -m quantizer fetch ARGS` onto the claim, from the Hub or the mirror at `endpoint`."""
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if endpoint:
        env.append({"name": "HF_ENDPOINT", "value": endpoint})
    if token:
        # Only a reference: the token reaches the fetch container's environment, nothing else.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token[0], "key": token[1]}}})
    return {
        "name": name,
        "image": image,
        "command": ["python", "-m", "quantizer", "fetch", *args],
        "env": env,
        "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT}, tmp_mount],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }


def _fetch_texts_containers(model: Model, tmp_mount: dict) -> list[dict]:
    """One fetch per dataset repo@revision (and endpoint) of the calibration and evaluation texts: the
    texts exist on the Hub before the claim does, so the shipped examples run on a new, empty claim."""
    wanted: dict[tuple, list[str]] = {}
    for text in (model.spec.quantization.calibration.text, model.spec.evaluation.text):
        if text.hub:
            files = wanted.setdefault((text.hub.repo, text.hub.revision, text.hub.endpoint), [])
            if text.hub.file not in files:
                files.append(text.hub.file)
    containers = []
    for number, ((repo, revision, endpoint), files) in enumerate(wanted.items()):
        output = f"{ARTIFACTS_MOUNT}/{hub_text_dir(model, HubFile(repo, revision, files[0]))}"
        args = ["--repo-type", "dataset", "--repo", repo, "--revision", revision, "--output", output,
                *[arg for file in files for arg in ("--file", file)]]
        name = FETCH_TEXTS_CONTAINER + (f"-{number}" if number else "")
        containers.append(_fetch_container(name, model.spec.quantization.image, args, tmp_mount, endpoint=endpoint))
    return containers


def _job(model: Model, name: str, component: str, container: dict, volumes: list[dict], *, backoff_limit: int,
         permanent_exit_codes: list[int] | None = None, artifact: str | None = None,
         init_containers: list[dict] | None = None, scheduling: dict | None = None,
         active_deadline_seconds: int | None = None, ttl_seconds_after_finished: int | None = None) -> dict:
    """A Job of one container (after `init_containers`), run once per Pod as the kubequant user.

    `permanent_exit_codes` fail the Job at once: a retry cannot help (bad input, a failed gate).
    `artifact` labels the Job and its Pods with the artifact hash they work on."""
    job_labels = labels(model, component)
    if artifact:
        job_labels[LABEL_ARTIFACT] = artifact
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [{**container, "securityContext": copy.deepcopy(CONTAINER_SECURITY)}],
        "volumes": volumes,
        **(scheduling or {}),
    }
    spec: dict[str, Any] = {"backoffLimit": backoff_limit}
    if permanent_exit_codes:
        spec["podFailurePolicy"] = _pod_failure_policy(container["name"], permanent_exit_codes)
    if active_deadline_seconds:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    if ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = ttl_seconds_after_finished
    spec["template"] = {"metadata": {"labels": job_labels}, "spec": pod_spec}
    meta = _metadata(model, name, component)
    meta["labels"] = copy.deepcopy(job_labels)
    return {"apiVersion": api_version("Job"), "kind": "Job", "metadata": meta, "spec": spec}


def _serving_pod_parts(model: Model) -> tuple[list[dict], list[dict]]:
    """Volumes and mounts shared by the evaluate Job and the Deployment: what vLLM needs."""
    tmp_volume, tmp_mount = _scratch()
    volumes = [
        _artifacts_volume(model, read_only=True),
        # NCCL between tensor-parallel workers uses /dev/shm; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": model.spec.serving.shm_size}},
        tmp_volume,
    ]
    mounts = [
        {"name": "artifacts", "mountPath": ARTIFACTS_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        tmp_mount,
    ]
    return volumes, mounts


def _tolerations(tolerations: list, wants_gpus: bool) -> list:
    """`tolerations`, plus the GPU nodes' taint when the Pod asks for GPUs and none covers it.

    GPU nodes carry the taint nvidia.com/gpu:NoSchedule so that only GPU Pods land there (what the
    ExtendedResourceToleration admission plugin adds, where a cluster enables it)."""
    out = copy.deepcopy(tolerations) if tolerations else []
    covered = any(t.get("key") == GPU_RESOURCE or (not t.get("key") and t.get("operator") == "Exists") for t in out)
    if wants_gpus and not covered:
        out.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return out


def _scheduling(model: Model) -> dict:
    out: dict[str, Any] = {}
    if model.spec.serving.node_selector:
        out["nodeSelector"] = dict(model.spec.serving.node_selector)
    # The evaluate Job and the Deployment ask for tensorParallelSize GPUs unless vLLM runs on the CPU.
    tolerations = _tolerations(model.spec.serving.tolerations, wants_gpus=model.spec.serving.device != CPU)
    if tolerations:
        out["tolerations"] = tolerations
    return out


def _number(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


def evaluate_command(
    model: Model, *, artifact_path: str, eval_text: str, baseline_ppl: Any, fakequant_ppl: Any,
    source_path: str, prompts_path: str | None = None, tasks_path: str | None = None, python: str = "python",
) -> list[str]:
    """The evaluator's command line for this spec: the Job's container and `kubequant run` share it."""
    e, serving = model.spec.evaluation, model.spec.serving
    against_source: list[str] = []
    if e.compare_with_source:
        against_source = ["--baseline-model", source_path]
        if e.max_kl_divergence is not None:
            against_source += ["--max-kl-divergence", repr(float(e.max_kl_divergence))]
        if e.min_top_token_agreement is not None:
            against_source += ["--min-top-token-agreement", repr(float(e.min_top_token_agreement))]
        if e.generation is not None:
            against_source += ["--generation-prompts", str(prompts_path), "--max-new-tokens",
                               str(e.generation.max_new_tokens)]
            if e.generation.min_exact_match is not None:
                against_source += ["--min-generation-match", repr(float(e.generation.min_exact_match))]
        if e.throughput is not None and e.throughput.min_speedup is not None:
            against_source += ["--min-speedup", repr(float(e.throughput.min_speedup))]
        if e.tasks is not None:
            against_source += ["--tasks", str(tasks_path)]
            if e.tasks.limit is not None:
                against_source += ["--task-limit", str(e.tasks.limit)]
            if e.tasks.max_accuracy_drop is not None:
                against_source += ["--max-accuracy-drop", repr(float(e.tasks.max_accuracy_drop))]
    throughput = [] if e.throughput is None else [
        "--throughput-batches", ",".join(map(str, e.throughput.batch_sizes)),
        "--throughput-tokens", str(e.throughput.max_new_tokens)]
    new_tokens = max([1] + ([e.generation.max_new_tokens] if e.generation else [])
                     + ([e.throughput.max_new_tokens] if e.throughput else []))
    return [
        python, "-m", "quantizer", "evaluate",
        "--model", artifact_path,
        "--eval-text", eval_text,
        "--jsonl-field", e.jsonl_field,
        "--seq-len", str(e.seq_len),
        *(["--max-windows", str(e.max_windows)] if e.max_windows else []),
        *(["--stride", str(e.stride)] if e.stride else []),
        "--baseline-ppl", _number(baseline_ppl),
        "--fakequant-ppl", _number(fakequant_ppl),
        *(["--max-ppl-increase", repr(float(e.max_perplexity_increase))] if e.max_perplexity_increase else []),
        *(["--max-ppl-ratio", repr(float(e.max_perplexity_ratio))] if e.max_perplexity_ratio else []),
        "--engine-tolerance", repr(float(e.engine_tolerance)),
        *against_source,
        *throughput,
        "--tensor-parallel-size", str(serving.tensor_parallel_size),
        # vLLM counts the one token it generates against the model length; a completion, all of its
        # tokens (prompts are taken to be shorter than a window).
        "--max-model-len", str(e.seq_len + new_tokens),
        "--dtype", e.dtype,
        "--gpu-memory-utilization", repr(float(serving.gpu_memory_utilization)),
    ]


def evaluate_job(model: Model, artifact: dict) -> dict:
    """The gate: vLLM with the serving tensor parallelism and GPUs measures the artifact.

    `artifact` is the status record of the quantize result (path, baselinePerplexity,
    fakequantPerplexity)."""
    e = model.spec.evaluation
    volumes, mounts = _serving_pod_parts(model)
    text_path, text_volumes, text_mounts = _texts(model, "evaluation", e.text)
    source_path, prompts_path, tasks_path = "", None, None
    if e.compare_with_source:
        source_path, source_volumes, source_mounts = source_location(model)
        text_volumes, text_mounts = text_volumes + source_volumes, text_mounts + source_mounts
        if e.generation is not None:
            prompts_path, prompt_volumes, prompt_mounts = _texts(model, "prompts", e.generation.prompts)
            text_volumes, text_mounts = text_volumes + prompt_volumes, text_mounts + prompt_mounts
        if e.tasks is not None:
            tasks_path, task_volumes, task_mounts = _task_files(e.tasks)
            text_volumes, text_mounts = text_volumes + task_volumes, text_mounts + task_mounts
    args = evaluate_command(
        model, artifact_path=f"{ARTIFACTS_MOUNT}/{artifact['path']}", eval_text=text_path,
        baseline_ppl=artifact.get("baselinePerplexity"), fakequant_ppl=artifact.get("fakequantPerplexity"),
        source_path=source_path, prompts_path=prompts_path, tasks_path=tasks_path,
    )
    return _job(
        model, evaluate_job_name(model), "evaluate",
        {"name": EVALUATE_CONTAINER, "image": e.image, "command": args, "env": _engine_env(model),
         "resources": _engine_resources(model),
         "volumeMounts": mounts + text_mounts},
        volumes + text_volumes, backoff_limit=e.backoff_limit,
        permanent_exit_codes=[EXIT_BAD_INPUT, EXIT_GATE_FAILED],
        artifact=artifact.get("hash") or artifact_hash(model), scheduling=_scheduling(model),
    )


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
    volumes, mounts = _serving_pod_parts(model)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    startup_period = 10
    container = {
        **container,
        "image": s.image,
        "env": _engine_env(model),
        "resources": _engine_resources(model),
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
            **_scheduling(model),
        },
    }


def _serving_child(model: Model, kind: str, spec: dict) -> dict:
    """A serving object named after the model, with the hash of its content."""
    return _with_hash({"apiVersion": api_version(kind), "kind": kind,
                       "metadata": _metadata(model, model.name, "server"), "spec": spec})


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
    meta = _metadata(model, model.name, "server")
    meta["labels"][f"{GROUP}/metrics"] = "true"  # vLLM's /metrics is on the same port
    return _with_hash({
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
    meta = _metadata(model, model.name, "server")
    meta["labels"].update(s.service_monitor_labels)
    return _with_hash({
        "apiVersion": api_version("ServiceMonitor"),
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {**selector(model), f"{GROUP}/metrics": "true"}},
            "namespaceSelector": {"matchNames": [model.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": s.service_monitor_interval}],
        },
    })


def persistent_volume_claim(model: Model) -> dict:
    """The artifact claim, when the spec asks for one. Never owned: Retain must outlive the model."""
    st = model.spec.storage
    spec: dict[str, Any] = {"accessModes": [st.access_mode], "resources": {"requests": {"storage": st.size}}}
    if st.storage_class_name:
        spec["storageClassName"] = st.storage_class_name
    meta = _metadata(model, st.claim_name, "storage", owned=False)
    meta["annotations"] = {ANNOTATION_RETENTION: st.retention_policy}
    return {"apiVersion": api_version("PersistentVolumeClaim"), "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def cleanup_job(model: Model) -> dict:
    """Removes kubequant/<name>/ from a claim the operator did not create (retention policy Delete)."""
    tmp_volume, tmp_mount = _scratch()
    return _job(
        model, cleanup_job_name(model), "cleanup",
        {"name": "cleanup", "image": model.spec.quantization.image,
         "command": ["python", "-c", "import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True)",
                     f"{ARTIFACTS_MOUNT}/{model_dir(model)}"],
         "env": [{"name": "HOME", "value": "/tmp"}],
         "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
         "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT}, tmp_mount]},
        [_artifacts_volume(model, read_only=False), tmp_volume], backoff_limit=2, ttl_seconds_after_finished=600,
    )


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


def render(model: Model) -> list[dict]:
    """Every object the operator would create for a new model, for review and GitOps.

    The evaluate Job and the Deployment need the quantize result: they are shown for the
    artifact the spec asks for, with the perplexities left as placeholders."""
    placeholder = {"hash": artifact_hash(model), "path": artifact_dir(model),
                   "baselinePerplexity": "<baseline_ppl>", "fakequantPerplexity": "<fakequant_ppl>"}
    objs = [persistent_volume_claim(model)] if model.spec.storage.create else []
    objs.append(quantize_job(model))
    if model.spec.serving.enabled:
        objs.append(evaluate_job(model, placeholder))
        objs += serving_objects(model, placeholder)
    return objs
