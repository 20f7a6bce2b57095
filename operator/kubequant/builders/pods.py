"""The parts of the Pods the Jobs and the servers run: texts, volumes, engine resources, scheduling."""

from __future__ import annotations

import copy
from typing import Any

from kubequant.builders.meta import (
    ARTIFACTS_MOUNT,
    BASE_ENV,
    SOURCE_MOUNT,
    TEXTS_MOUNT,
    hub_text_dir,
    model_dir,
    source_hash,
)
from kubequant.spec import GPU_RESOURCE, HuggingFaceSource, Model, Tasks, TextSource
from quantizer.contract import CPU, CPU_KVCACHE_SPACE_GIB


def text_location(model: Model, which: str, text: TextSource) -> tuple[str, list[dict], list[dict]]:
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


def task_files(tasks: Tasks) -> tuple[str, list[dict], list[dict]]:
    """(path inside the Pod, volumes, mounts) for the task YAMLs: on the claim, or a ConfigMap's keys
    as the files of one directory."""
    if tasks.path:
        return f"{ARTIFACTS_MOUNT}/{tasks.path}", [], []
    mount = f"{TEXTS_MOUNT}/tasks"
    return (mount, [{"name": "tasks", "configMap": {"name": tasks.config_map}}],
            [{"name": "tasks", "mountPath": mount, "readOnly": True}])


def artifacts_volume(model: Model, read_only: bool) -> dict:
    return {"name": "artifacts",
            "persistentVolumeClaim": {"claimName": model.spec.storage.claim_name, "readOnly": read_only}}


def scratch_volume() -> tuple[dict, dict]:
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def engine_resources(model: Model) -> dict:
    """The evaluate Job's and the serving Pods' resources: the spec's, plus tensorParallelSize GPUs
    unless vLLM runs on the CPU."""
    s = model.spec.serving
    if s.device == CPU:
        return copy.deepcopy(s.resources) if s.resources else {}
    return _gpu_resources(s.resources, s.tensor_parallel_size)


def engine_env(model: Model) -> list[dict]:
    """The environment of vLLM's containers (the gate's and serving's alike, so the gate measures the
    engine that serves): on the CPU, the KV cache it may reserve of the host's memory (otherwise a
    fraction of the whole node's, past the Pod's limit), unless extraArgs set it; then serving.env,
    whose variables replace those of the same name."""
    env = copy.deepcopy(BASE_ENV)
    s = model.spec.serving
    if s.device == CPU and not any(a.startswith("--kv-cache-memory-bytes") for a in s.extra_args):
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(CPU_KVCACHE_SPACE_GIB)})
    own = {name for name, _ in s.env}
    return [e for e in env if e["name"] not in own] + [{"name": name, "value": value} for name, value in s.env]


def _gpu_resources(resources: dict, gpus: int) -> dict:
    """Copy of `resources` asking for exactly `gpus` NVIDIA GPUs (the limit; requests follow it)."""
    out = copy.deepcopy(resources) if resources else {}
    out.setdefault("limits", {})[GPU_RESOURCE] = gpus
    out.get("requests", {}).pop(GPU_RESOURCE, None)
    if "requests" in out and not out["requests"]:
        del out["requests"]
    return out


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


def serving_pod_parts(model: Model) -> tuple[list[dict], list[dict]]:
    """Volumes and mounts shared by the evaluate Job and the Deployment: what vLLM needs."""
    tmp_volume, tmp_mount = scratch_volume()
    volumes = [
        artifacts_volume(model, read_only=True),
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


def gpu_tolerations(tolerations: list, wants_gpus: bool) -> list:
    """`tolerations`, plus the GPU nodes' taint when the Pod asks for GPUs and none covers it.

    GPU nodes carry the taint nvidia.com/gpu:NoSchedule so that only GPU Pods land there (what the
    ExtendedResourceToleration admission plugin adds, where a cluster enables it)."""
    out = copy.deepcopy(tolerations) if tolerations else []
    covered = any(t.get("key") == GPU_RESOURCE or (not t.get("key") and t.get("operator") == "Exists") for t in out)
    if wants_gpus and not covered:
        out.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return out


def serving_scheduling(model: Model) -> dict:
    out: dict[str, Any] = {}
    if model.spec.serving.node_selector:
        out["nodeSelector"] = dict(model.spec.serving.node_selector)
    # The evaluate Job and the Deployment ask for tensorParallelSize GPUs unless vLLM runs on the CPU.
    tolerations = gpu_tolerations(model.spec.serving.tolerations, wants_gpus=model.spec.serving.device != CPU)
    if tolerations:
        out["tolerations"] = tolerations
    return out
