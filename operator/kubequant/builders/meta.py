"""What every child shares: the kinds, names and hashes, labels, metadata, security contexts.

Names are deterministic: the quantize Job is named by the hash of everything that determines the
artifact (source + recipe + the texts), the evaluate Job by that plus the gate's thresholds. A
restarted operator therefore finds its Jobs instead of duplicating them, and a spec change that
does not touch those inputs (replicas, extraArgs, images, resources) reuses the artifact.
Objects that are updated in place (the serving workload and its companions) carry the hash of
their own content in an annotation, so drift is detected without comparing defaulted fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubequant.spec import GROUP, KIND, PLURAL, VERSION, HubFile, HuggingFaceSource, Model, TextSource
from quantizer.contract import CPU, DEFAULT_EXPERT_CALIBRATION, DEFAULT_SOURCE_TARGETS

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


# The evaluate Job's one writable folder of the claim: the model's own (kubequant/<name>), where the
# source model's scores are kept for the next candidate's evaluation (quantizer/source_scores.py).
MODEL_DIR_MOUNT = "/model-dir"
SOURCE_SCORES_DIR = "source-scores"  # in the model's folder


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
                   "refineSweeps": q.refine_sweeps, "groupAwareOrder": q.group_aware_order, "format": q.format,
                   # Only when not the default, so that the hashes of existing models stay as they were.
                   **({"expertCalibration": q.expert_calibration}
                      if q.expert_calibration != DEFAULT_EXPERT_CALIBRATION else {}),
                   **({"sourceTargets": q.source_targets} if q.source_targets != DEFAULT_SOURCE_TARGETS else {}),
                   **({"mixedPrecision": q.mixed_precision.identity(q.bits, q.group_size)}
                      if q.mixed_precision else {})},
        "calibration": {"text": _text_id(q.calibration.text), "field": q.calibration.jsonl_field,
                        "samples": q.calibration.samples, "seqLen": q.calibration.seq_len},
        "evaluation": {"text": _text_id(e.text), "field": e.jsonl_field, "seqLen": e.seq_len,
                       "maxWindows": e.max_windows, "stride": e.stride},
    })


def evaluation_key(model: Model) -> str:
    """The artifact, the gate and the serving settings its numbers depend on: changing a threshold or
    the tensor parallelism, the device or vLLM's environment evaluates again (vLLM's TP kernels sum in
    another order, its CPU kernels are others, its environment picks kernels), never quantizes again;
    replicas, extraArgs or resources change neither."""
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
                    **({"device": CPU} if model.spec.serving.device == CPU else {}),
                    **({"env": dict(model.spec.serving.env)} if model.spec.serving.env else {})},
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


def object_metadata(model: Model, name: str, component: str, owned: bool = True, **extra: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": model.namespace, "labels": labels(model, component), **extra}
    # `kubequant render` has no uid: the objects it prints are adopted by nobody.
    if owned and model.uid:
        meta["ownerReferences"] = [owner_reference(model)]
    return meta


def with_content_hash(obj: dict) -> dict:
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
