"""The Jobs: quantize (with its fetch containers), evaluate (the gate) and cleanup."""

from __future__ import annotations

import copy
from typing import Any

from kubequant.builders.meta import (
    ARTIFACTS_MOUNT,
    BASE_ENV,
    CONTAINER_SECURITY,
    EVALUATE_CONTAINER,
    FETCH_CONTAINER,
    FETCH_TEXTS_CONTAINER,
    LABEL_ARTIFACT,
    MODEL_DIR_MOUNT,
    POD_SECURITY,
    QUANTIZE_CONTAINER,
    SOURCE_SCORES_DIR,
    api_version,
    artifact_dir,
    artifact_hash,
    cleanup_job_name,
    evaluate_job_name,
    hub_text_dir,
    labels,
    model_dir,
    object_metadata,
    quantize_job_name,
)
from kubequant.builders.pods import (
    artifacts_volume,
    engine_env,
    engine_resources,
    gpu_tolerations,
    scratch_volume,
    serving_pod_parts,
    serving_scheduling,
    source_location,
    task_files,
    text_location,
)
from kubequant.spec import HubFile, HuggingFaceSource, Model, asks_gpus
from quantizer.contract import CPU, EXIT_BAD_INPUT, EXIT_GATE_FAILED


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
        "--expert-calibration", q.expert_calibration,
        "--source-targets", repr(q.source_targets),
        *(q.mixed_precision.cli_args(q.bits, q.group_size) if q.mixed_precision else []),
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


def quantize_job(model: Model) -> dict:
    spec, q = model.spec, model.spec.quantization
    a_hash = artifact_hash(model)
    volumes = [artifacts_volume(model, read_only=False)]
    mounts = [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT}]
    tmp_volume, tmp_mount = scratch_volume()
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

    cal_path, cal_volumes, cal_mounts = text_location(model, "calibration", q.calibration.text)
    eval_path, eval_volumes, eval_mounts = text_location(model, "evaluation", spec.evaluation.text)
    volumes += cal_volumes + eval_volumes
    mounts += cal_mounts + eval_mounts
    args = quantize_command(
        model, model_path=model_path, output=f"{ARTIFACTS_MOUNT}/{artifact_dir(model, a_hash)}",
        calibration=cal_path, evaluation=eval_path, provenance=provenance,
    )
    # The path is keyed by the recipe hash: whatever a failed attempt left there is the same artifact.
    args.append("--overwrite")

    scheduling: dict[str, Any] = {"nodeSelector": dict(q.node_selector)} if q.node_selector else {}
    if tolerations := gpu_tolerations(q.tolerations, asks_gpus(q.resources)):
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
    meta = object_metadata(model, name, component)
    meta["labels"] = copy.deepcopy(job_labels)
    return {"apiVersion": api_version("Job"), "kind": "Job", "metadata": meta, "spec": spec}


def _number(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


def evaluate_command(
    model: Model, *, artifact_path: str, eval_text: str, baseline_ppl: Any, fakequant_ppl: Any,
    source_path: str, prompts_path: str | None = None, tasks_path: str | None = None, python: str = "python",
    source_scores: str | None = None,
) -> list[str]:
    """The evaluator's command line for this spec: the Job's container and `kubequant run` share it.
    `source_scores`: the folder keeping the source model's scores, measured once for every candidate."""
    e, serving = model.spec.evaluation, model.spec.serving
    against_source: list[str] = []
    if e.compare_with_source:
        against_source = ["--baseline-model", source_path]
        if source_scores:
            against_source += ["--source-scores", source_scores]
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
    volumes, mounts = serving_pod_parts(model)
    text_path, text_volumes, text_mounts = text_location(model, "evaluation", e.text)
    source_path, prompts_path, tasks_path = "", None, None
    if e.compare_with_source:
        source_path, source_volumes, source_mounts = source_location(model)
        text_volumes, text_mounts = text_volumes + source_volumes, text_mounts + source_mounts
        if e.generation is not None:
            prompts_path, prompt_volumes, prompt_mounts = text_location(model, "prompts", e.generation.prompts)
            text_volumes, text_mounts = text_volumes + prompt_volumes, text_mounts + prompt_mounts
        if e.tasks is not None:
            tasks_path, task_volumes, task_mounts = task_files(e.tasks)
            text_volumes, text_mounts = text_volumes + task_volumes, text_mounts + task_mounts
    scores = None
    if e.compare_with_source:
        # The claim writable for this Pod, yet read-only where vLLM reads the artifact: only the model's
        # own folder (which its quantize Job made) is mounted writable, for the source model's scores.
        volumes = [artifacts_volume(model, read_only=False) if v["name"] == "artifacts" else v for v in volumes]
        text_mounts = [*text_mounts, {"name": "artifacts", "mountPath": MODEL_DIR_MOUNT, "subPath": model_dir(model)}]
        scores = f"{MODEL_DIR_MOUNT}/{SOURCE_SCORES_DIR}"
    args = evaluate_command(
        model, artifact_path=f"{ARTIFACTS_MOUNT}/{artifact['path']}", eval_text=text_path,
        baseline_ppl=artifact.get("baselinePerplexity"), fakequant_ppl=artifact.get("fakequantPerplexity"),
        source_path=source_path, prompts_path=prompts_path, tasks_path=tasks_path, source_scores=scores,
    )
    return _job(
        model, evaluate_job_name(model), "evaluate",
        {"name": EVALUATE_CONTAINER, "image": e.image, "command": args, "env": engine_env(model),
         "resources": engine_resources(model),
         "volumeMounts": mounts + text_mounts},
        volumes + text_volumes, backoff_limit=e.backoff_limit,
        permanent_exit_codes=[EXIT_BAD_INPUT, EXIT_GATE_FAILED],
        artifact=artifact.get("hash") or artifact_hash(model), scheduling=serving_scheduling(model),
    )


def cleanup_job(model: Model) -> dict:
    """Removes kubequant/<name>/ from a claim the operator did not create (retention policy Delete)."""
    tmp_volume, tmp_mount = scratch_volume()
    return _job(
        model, cleanup_job_name(model), "cleanup",
        {"name": "cleanup", "image": model.spec.quantization.image,
         "command": ["python", "-c", "import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True)",
                     f"{ARTIFACTS_MOUNT}/{model_dir(model)}"],
         "env": [{"name": "HOME", "value": "/tmp"}],
         "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
         "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT}, tmp_mount]},
        [artifacts_volume(model, read_only=False), tmp_volume], backoff_limit=2, ttl_seconds_after_finished=600,
    )
