"""The manifests: valid Kubernetes 1.33 (kubernetes-validate, strict), deterministic, and what we promise."""

from __future__ import annotations

import dataclasses
import json
import re

import kubernetes_validate
import pytest
import yaml
from kubequant import builders
from kubequant.cli import main as cli_main
from kubequant.spec import Model, SpecError, parse_model, parse_spec

from tests.operator_support import crd
from tests.operator_support.objects import QUANTIZE_RESULT, example, with_spec

K8S_VERSION = "1.33.0"
ARTIFACT = {"hash": "0123456789", "path": "kubequant/m/0123456789", "baselinePerplexity": 12.5,
            "fakequantPerplexity": 12.9, **{"groupSize": QUANTIZE_RESULT["group_size"]}}


def _models() -> dict[str, Model]:
    hf_no_token = example()
    del hf_no_token["spec"]["source"]["huggingface"]["tokenSecretRef"]
    config_maps = with_spec(example("tiny.yaml"), "quantization.calibration.text",
                            {"configMap": {"name": "texts", "key": "calibration.jsonl"}})
    config_maps = with_spec(config_maps, "evaluation.text", {"configMap": {"name": "texts", "key": "eval.txt"}})
    other_claim = with_spec(example("tiny.yaml"), "source.pvc.claimName", "models")
    quantize_only = with_spec(with_spec(example("tiny.yaml"), "serving.enabled", False), "quantization.bits", 3)
    scheduled = with_spec(example(), "serving.nodeSelector", {"gpu": "h100"})
    scheduled = with_spec(scheduled, "quantization.activeDeadlineSeconds", 7200)
    bodies = {"tiny": example("tiny.yaml"), "llama": example(), "hf-no-token": hf_no_token,
              "config-maps": config_maps, "other-claim": other_claim, "quantize-only": quantize_only,
              "scheduled": scheduled}
    return {name: parse_model(body) for name, body in bodies.items()}


MODELS = _models()


def _every_object(model: Model) -> list[dict]:
    objs = [builders.quantize_job(model), builders.evaluate_job(model, ARTIFACT), builders.deployment(model, ARTIFACT),
            builders.service(model), builders.pod_disruption_budget(model), builders.persistent_volume_claim(model),
            builders.cleanup_job(model)]
    return objs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builders_are_valid_kubernetes(name):
    for obj in _every_object(MODELS[name]):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_validation_catches_unknown_fields():
    job = builders.quantize_job(MODELS["tiny"])
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_service_monitor_shape():
    # kubernetes-validate has no schema for custom resources: check what Prometheus Operator reads.
    sm = builders.service_monitor(MODELS["llama"])
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    service = builders.service(MODELS["llama"])
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert service["spec"]["ports"][0]["name"] == "http"


def test_names_are_deterministic_and_short():
    model = dataclasses.replace(MODELS["llama"], name="m" * 40)
    names = [builders.quantize_job_name(model), builders.evaluate_job_name(model), builders.cleanup_job_name(model)]
    assert all(len(n) <= 63 for n in names)
    again = parse_model(example())
    assert builders.quantize_job(again) == builders.quantize_job(MODELS["llama"])
    assert builders.deployment(again, ARTIFACT) == builders.deployment(MODELS["llama"], ARTIFACT)


# What must not requantize, what must.
SAME_ARTIFACT = [("serving.replicas", 4), ("serving.extraArgs", ["--enable-prefix-caching"]),
                 ("serving.tensorParallelSize", 4), ("quantization.image", "registry/q:2"),
                 ("quantization.resources", {"limits": {"memory": "1Ti"}}), ("evaluation.maxPerplexityRatio", 1.2),
                 ("storage.retentionPolicy", "Delete"), ("quantization.backoffLimit", 5)]
NEW_ARTIFACT = [("quantization.groupSize", 64), ("quantization.actOrder", False), ("quantization.dampPercent", 0.5),
                ("quantization.scaleSearch", "minmax"), ("quantization.fullRange", False),
                ("quantization.refineSweeps", 1), ("quantization.groupAwareOrder", True),
                ("quantization.sourceTargets", 0.5), ("quantization.calibration.samples", 256), ("quantization.calibration.text", {"path": "other.txt"}),
                ("source.huggingface.revision", "main"), ("evaluation.seqLen", 4096)]


@pytest.mark.parametrize(("path", "value"), SAME_ARTIFACT)
def test_serving_and_job_settings_keep_the_artifact(path, value):
    changed = parse_model(with_spec(example(), path, value))
    assert builders.artifact_hash(changed) == builders.artifact_hash(MODELS["llama"])
    assert builders.quantize_job_name(changed) == builders.quantize_job_name(MODELS["llama"])


@pytest.mark.parametrize(("path", "value"), NEW_ARTIFACT)
def test_recipe_and_source_make_a_new_artifact(path, value):
    changed = parse_model(with_spec(example(), path, value))
    assert builders.artifact_hash(changed) != builders.artifact_hash(MODELS["llama"])


def test_thresholds_change_only_the_evaluation():
    changed = parse_model(with_spec(example(), "evaluation.maxPerplexityIncrease", 0.1))
    assert builders.artifact_hash(changed) == builders.artifact_hash(MODELS["llama"])
    assert builders.evaluation_key(changed) != builders.evaluation_key(MODELS["llama"])


def _container(obj: dict, init: bool = False) -> dict:
    return obj["spec"]["template"]["spec"]["initContainers" if init else "containers"][0]


def test_a_hub_mirror_is_the_downloads_endpoint_and_changes_no_artifact():
    mirrored = parse_model(with_spec(example(), "source.huggingface.endpoint", "https://hub.internal.example/"))
    fetch = _container(builders.quantize_job(mirrored), init=True)
    assert {"name": "HF_ENDPOINT", "value": "https://hub.internal.example"} in fetch["env"]
    assert not any(e["name"] == "HF_ENDPOINT" for e in _container(builders.quantize_job(MODELS["llama"]), init=True)["env"])
    # The same repo at the same revision: the same bytes, so the same artifact.
    assert builders.artifact_hash(mirrored) == builders.artifact_hash(MODELS["llama"])
    with pytest.raises(SpecError, match=r"spec\.source\.huggingface\.endpoint must be an http\(s\) URL"):
        parse_model(with_spec(example(), "source.huggingface.endpoint", "hub.internal.example"))
    assert crd.validate(with_spec(example(), "source.huggingface.endpoint", "ftp://hub"))


def test_quantize_job_from_hugging_face():
    model = MODELS["llama"]
    job = builders.quantize_job(model)
    fetch, quantize = _container(job, init=True), _container(job)
    assert fetch["command"][:4] == ["python", "-m", "quantizer", "fetch"]
    # The token is a reference to the Secret, in the fetch container only.
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in fetch["env"]
    assert "HF_TOKEN" not in str(quantize)
    args = quantize["command"]
    source = fetch["command"][fetch["command"].index("--output") + 1]
    assert args[args.index("--model") + 1] == source
    assert args[args.index("--output") + 1] == f"/artifacts/{builders.artifact_dir(model)}"
    assert args[args.index("--damp") + 1] == "0.01"
    for flag, value in [("--bits", "4"), ("--group-size", "128"), ("--samples", "128"), ("--seq-len", "2048"),
                        ("--eval-max-windows", "64"), ("--source-revision", model.spec.source.revision)]:
        assert args[args.index(flag) + 1] == value
    assert "--act-order" in args and "--sym" in args and "--overwrite" in args
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["backoffLimit"] == 1
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]  # bad input: no retry
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_quantize_job_from_a_claim():
    tiny = builders.quantize_job(MODELS["tiny"])
    assert _container(tiny)["command"][4:6] == ["--model", "/artifacts/tiny-llama"]  # same claim: mounted once
    assert [v["name"] for v in tiny["spec"]["template"]["spec"]["volumes"]] == ["artifacts", "tmp"]
    other = builders.quantize_job(MODELS["other-claim"])
    assert _container(other)["command"][4:6] == ["--model", "/source/tiny-llama"]
    assert {"name": "source", "mountPath": "/source", "readOnly": True} in _container(other)["volumeMounts"]


def test_text_from_config_maps():
    job = builders.quantize_job(MODELS["config-maps"])
    args = _container(job)["command"]
    assert args[args.index("--calibration") + 1] == "/texts/calibration/calibration.jsonl"
    assert args[args.index("--eval-text") + 1] == "/texts/evaluation/eval.txt"


def test_quantize_only_allows_unservable_recipes():
    assert "--allow-unservable" in _container(builders.quantize_job(MODELS["quantize-only"]))["command"]
    assert "--allow-unservable" not in _container(builders.quantize_job(MODELS["tiny"]))["command"]


def test_evaluate_job_runs_the_gate_like_serving():
    model = MODELS["llama"]
    job = builders.evaluate_job(model, ARTIFACT)
    container = _container(job)
    args = container["command"]
    for flag, value in [("--model", "/artifacts/kubequant/m/0123456789"), ("--baseline-ppl", "12.5"),
                        ("--fakequant-ppl", "12.9"), ("--tensor-parallel-size", "2"), ("--max-ppl-ratio", "1.05"),
                        ("--max-ppl-increase", "0.5"), ("--engine-tolerance", "0.01"), ("--max-windows", "64")]:
        assert args[args.index(flag) + 1] == value
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3]  # verdicts: no retry
    assert job["spec"]["template"]["spec"]["tolerations"] == model.spec.serving.tolerations


def test_the_gate_serves_the_source_model_beside_the_artifact():
    # A Hugging Face source: the evaluate Job reads the copy the quantize Job's fetch put on the claim.
    model = parse_model(with_spec(with_spec(example(), "evaluation.maxKLDivergence", 0.05),
                                  "evaluation.generation", {"prompts": {"configMap": {"name": "p", "key": "p.txt"}},
                                                            "minExactMatch": 0.5}))
    evaluate = _container(builders.evaluate_job(model, ARTIFACT))
    fetch = builders.quantize_job(model)["spec"]["template"]["spec"]["initContainers"][0]["command"]
    args = evaluate["command"]
    assert args[args.index("--baseline-model") + 1] == fetch[fetch.index("--output") + 1]
    assert args[args.index("--max-kl-divergence") + 1] == "0.05"
    assert args[args.index("--generation-prompts") + 1] == "/texts/prompts/p.txt"
    assert args[args.index("--max-new-tokens") + 1] == "32" and args[args.index("--min-generation-match") + 1] == "0.5"
    # Room for a window's token or a prompt's completion, whichever is longer.
    assert args[args.index("--max-model-len") + 1] == str(model.spec.evaluation.seq_len + 32)
    assert {"name": "prompts-text", "mountPath": "/texts/prompts", "readOnly": True} in evaluate["volumeMounts"]

    # A PVC source on another claim is mounted read-only; without compareWithSource nothing of it.
    tiny = parse_model(with_spec(example("tiny.yaml"), "source.pvc", {"claimName": "models", "path": "tiny"}))
    job = builders.evaluate_job(tiny, ARTIFACT)
    args = _container(job)["command"]
    assert args[args.index("--baseline-model") + 1] == "/source/tiny"
    assert {"name": "source", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} \
        in job["spec"]["template"]["spec"]["volumes"]
    plain = parse_model(with_spec(example(), "evaluation.compareWithSource", False))
    assert "--baseline-model" not in _container(builders.evaluate_job(plain, ARTIFACT))["command"]
    # Throughput at the batch sizes of the spec, with room in the model length for its completions.
    fast = parse_model(with_spec(example(), "evaluation.throughput", {"minSpeedup": 1.5, "maxNewTokens": 128}))
    args = _container(builders.evaluate_job(fast, ARTIFACT))["command"]
    assert args[args.index("--throughput-batches") + 1] == "1,16,64" and args[args.index("--min-speedup") + 1] == "1.5"
    assert args[args.index("--max-model-len") + 1] == str(fast.spec.evaluation.seq_len + 128)
    # The comparison is part of the verdict's key: changing it gates again, never quantizes again.
    assert builders.evaluation_key(plain) != builders.evaluation_key(MODELS["llama"])
    assert builders.artifact_hash(plain) == builders.artifact_hash(MODELS["llama"])


def test_the_checkpoint_format_reaches_the_quantizer_and_keys_the_artifact():
    default = parse_model(example("tiny.yaml"))
    gptq = parse_model(with_spec(example("tiny.yaml"), "quantization.format", "gptq"))
    command = _container(builders.quantize_job(default))["command"]
    assert command[command.index("--format") + 1] == "compressed-tensors"
    command = _container(builders.quantize_job(gptq))["command"]
    assert command[command.index("--format") + 1] == "gptq"
    assert builders.artifact_hash(gptq) != builders.artifact_hash(default)  # another artifact, quantized again
    with pytest.raises(SpecError, match=r"spec\.quantization\.format must be one of compressed-tensors, gptq"):
        parse_model(with_spec(example("tiny.yaml"), "quantization.format", "awq"))


def test_the_gate_scores_tasks_from_the_claim_or_a_config_map():
    on_claim = parse_model(with_spec(example("tiny.yaml"), "evaluation.tasks",
                                     {"path": "tasks", "limit": 100, "maxAccuracyDrop": 0.05}))
    args = _container(builders.evaluate_job(on_claim, ARTIFACT))["command"]
    assert args[args.index("--tasks") + 1] == "/artifacts/tasks"
    assert args[args.index("--task-limit") + 1] == "100" and args[args.index("--max-accuracy-drop") + 1] == "0.05"
    # A ConfigMap is one directory: every key a file (the task YAMLs and their data).
    in_config_map = parse_model(with_spec(example("tiny.yaml"), "evaluation.tasks", {"configMap": {"name": "evals"}}))
    job = builders.evaluate_job(in_config_map, ARTIFACT)
    args = _container(job)["command"]
    assert args[args.index("--tasks") + 1] == "/texts/tasks"
    assert "--task-limit" not in args and "--max-accuracy-drop" not in args
    assert {"name": "tasks", "configMap": {"name": "evals"}} in job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tasks", "mountPath": "/texts/tasks", "readOnly": True} in _container(job)["volumeMounts"]
    # Tasks are part of the verdict, not of the artifact.
    looser = parse_model(with_spec(example("tiny.yaml"), "evaluation.tasks",
                                   {"path": "tasks", "limit": 100, "maxAccuracyDrop": 0.1}))
    assert builders.evaluation_key(looser) != builders.evaluation_key(on_claim)
    assert builders.artifact_hash(looser) == builders.artifact_hash(on_claim)
    with pytest.raises(SpecError, match="exactly one of path or configMap"):
        parse_model(with_spec(example("tiny.yaml"), "evaluation.tasks", {"limit": 10}))
    with pytest.raises(SpecError, match=r"generation, tasks and throughput\.minSpeedup compare with the source"):
        parse_model(with_spec(with_spec(example(), "evaluation.compareWithSource", False),
                              "evaluation.tasks", {"path": "tasks"}))


def test_sliding_windows_reach_both_jobs_and_the_engine_gets_room_for_its_token():
    model = parse_model(with_spec(example(), "evaluation.stride", 512))
    quantize = _container(builders.quantize_job(model))["command"]
    evaluate = _container(builders.evaluate_job(model, ARTIFACT))["command"]
    assert quantize[quantize.index("--eval-stride") + 1] == "512"
    assert evaluate[evaluate.index("--stride") + 1] == "512"
    # vLLM counts the one token it generates against the model length.
    assert evaluate[evaluate.index("--max-model-len") + 1] == str(model.spec.evaluation.seq_len + 1)
    assert builders.artifact_hash(model) != builders.artifact_hash(MODELS["llama"])


def test_deployment_serves_vllm_safely():
    model = MODELS["llama"]
    dep = builders.deployment(model, ARTIFACT)
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["vllm", "serve"]
    assert container["args"] == [
        "/artifacts/kubequant/m/0123456789", "--tensor-parallel-size", "2", "--served-model-name",
        "llama-3-8b-instruct", "--max-model-len", "8192", "--gpu-memory-utilization", "0.9", "--port", "8000",
        "--enable-prefix-caching"]
    assert "--quantization" not in container["args"]  # vLLM reads GPTQ from config.json
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["enableServiceLinks"] is False
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "llama-3-8b-artifacts", "readOnly": True}} \
        in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 1800
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_content_hash_tracks_every_change():
    a = builders.deployment(MODELS["llama"], ARTIFACT)
    b = builders.deployment(parse_model(with_spec(example(), "serving.replicas", 3)), ARTIFACT)
    assert a["metadata"]["annotations"][builders.ANNOTATION_HASH] != b["metadata"]["annotations"][builders.ANNOTATION_HASH]


def test_claim_is_never_owned():
    pvc = builders.persistent_volume_claim(MODELS["llama"])
    assert "ownerReferences" not in pvc["metadata"]
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}}}


def test_spec_defaults_are_the_crds():
    minimal = {"source": {"pvc": {"claimName": "c", "path": "m"}},
               "quantization": {"calibration": {"text": {"path": "c.txt"}}},
               "evaluation": {"text": {"path": "e.txt"}}, "storage": {"claimName": "c"}}
    defaulted = crd.apply_defaults({"spec": minimal})["spec"]
    assert parse_spec(minimal) == parse_spec(defaulted)
    assert crd.validate({"apiVersion": "kubequant.io/v1alpha1", "kind": "QuantizedModel",
                         "metadata": {"name": "m"}, "spec": minimal}) == []


@pytest.mark.parametrize(("path", "value", "words"), [
    ("serving.tensorParallelSize", 6, "power of two"),
    ("quantization.bits", 3, "vLLM serves"),
    ("serving.extraArgs", ["--port=9000"], "--port"),
    ("evaluation.maxPerplexityRatio", 0.5, "at least 1.0"),
    ("evaluation.text", {"path": "a", "configMap": {"name": "b", "key": "c"}}, "exactly one"),
    ("source.pvc", {"claimName": "c", "path": "m"}, "exactly one of huggingface or pvc"),
    ("serving.replicas", "two", "spec.serving.replicas must be of type int"),
    ("serving.enabled", "yes", "spec.serving.enabled must be of type bool"),
    ("quantization.calibration.samples", 1.5, "samples must be of type int"),
    ("quantization.scaleSearch", "best", "scaleSearch must be one of minmax, clip, diag, cost"),
    ("quantization.refineSweeps", 9, "refineSweeps must be between 0 and 8"),
    ("quantization.sourceTargets", 1.5, "sourceTargets must be between 0"),
])
def test_spec_errors_name_the_field(path, value, words):
    with pytest.raises(SpecError, match=words):
        parse_model(with_spec(example(), path, value))


def test_group_aware_order_needs_act_order():
    with pytest.raises(SpecError, match=r"spec\.quantization\.groupAwareOrder .* needs actOrder true"):
        parse_model(with_spec(with_spec(example(), "quantization.groupAwareOrder", True), "quantization.actOrder", False))


def test_the_recipe_defaults_and_choices_are_the_quantizers():
    # The spec's defaults are the CRD's (applied by the apiserver) and must be the quantizer's own.
    from quantizer import gptq

    q = parse_model(example("tiny.yaml")).spec.quantization
    recipe = gptq.QuantRecipe()
    assert (q.scale_search, q.full_range, q.refine_sweeps, q.group_aware_order, q.source_targets) == \
        (recipe.scale_search, recipe.full_range, recipe.refine_sweeps, recipe.group_aware_order, recipe.source_targets)
    assert (q.act_order, q.symmetric, q.damp_percent / 100) == \
        (recipe.act_order, recipe.sym, recipe.damp)


def test_images_come_from_the_spec_else_the_operator_for_the_device(monkeypatch):
    gpu = parse_model(example())
    assert (gpu.spec.quantization.image, gpu.spec.evaluation.image, gpu.spec.serving.image) == (
        "ghcr.io/kubequant/kubequant-quantizer:0.1.0", "ghcr.io/kubequant/kubequant-evaluator:0.1.0",
        "vllm/vllm-openai:v0.32.0")
    # The tiny example runs without GPUs: the CPU images, the evaluator's serving too (vLLM's CPU build).
    cpu = parse_model(example("tiny.yaml"))
    assert (cpu.spec.quantization.image, cpu.spec.evaluation.image, cpu.spec.serving.image) == (
        "ghcr.io/kubequant/kubequant-quantizer:0.1.0-cpu", "ghcr.io/kubequant/kubequant-evaluator:0.1.0-cpu",
        "ghcr.io/kubequant/kubequant-evaluator:0.1.0-cpu")
    monkeypatch.setenv("KUBEQUANT_VLLM_IMAGE", "registry.local/vllm:v0.32.0")
    monkeypatch.setenv("KUBEQUANT_EVALUATOR_CPU_IMAGE", "registry.local/evaluator:cpu")
    assert parse_model(example()).spec.serving.image == "registry.local/vllm:v0.32.0"
    assert parse_model(example("tiny.yaml")).spec.serving.image == "registry.local/evaluator:cpu"
    assert parse_model(example("tiny.yaml")).spec.evaluation.image == "registry.local/evaluator:cpu"
    pinned = parse_model(with_spec(example("tiny.yaml"), "serving.image", "vllm/vllm-openai:v0.31.0"))
    assert pinned.spec.serving.image == "vllm/vllm-openai:v0.31.0"


def test_a_cpu_model_asks_for_no_gpu_anywhere():
    model = parse_model(with_spec(example("tiny.yaml"), "serving.tolerations", []))
    quantize, evaluate = builders.quantize_job(model), builders.evaluate_job(model, ARTIFACT)
    server = builders.deployment(model, ARTIFACT)
    for obj in (quantize, evaluate, server):
        pod = obj["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"]), obj["metadata"]["name"]
        assert not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or [])
    command = _container(quantize)["command"]
    assert command[command.index("--device") + 1] == "cpu"
    # vLLM's CPU backend: eager (the image has no compiler for torch.compile), and a KV cache of the
    # Pod's size, not a fraction of the node's memory.
    for container in (_container(evaluate), _container(server)):
        assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"} in container["env"]
    assert "--enforce-eager" in _container(server)["args"]
    sized = parse_model(with_spec(example("tiny.yaml"), "serving.extraArgs", ["--kv-cache-memory-bytes=2147483648"]))
    assert not any(e["name"] == "VLLM_CPU_KVCACHE_SPACE" for e in _container(builders.deployment(sized, ARTIFACT))["env"])
    # The GPU example keeps its GPUs, and no CPU-only setting.
    gpu = _container(builders.deployment(MODELS["llama"], ARTIFACT))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 2 and "--enforce-eager" not in gpu["args"]
    assert not any(e["name"] == "VLLM_CPU_KVCACHE_SPACE" for e in gpu["env"])
    # Moving serving to the CPU gates again (other kernels); the artifact stays.
    on_gpu = parse_model(with_spec(example("tiny.yaml"), "serving.device", "gpu"))
    assert builders.evaluation_key(on_gpu) != builders.evaluation_key(model)
    assert builders.artifact_hash(on_gpu) == builders.artifact_hash(model)


@pytest.mark.parametrize(("path", "value", "problem"), [
    ("serving.tensorParallelSize", 2, "spec.serving.device cpu serves on one CPU Pod"),
    ("serving.resources", {"limits": {"nvidia.com/gpu": 1}}, "spec.serving.resources asks for GPUs, but device is cpu"),
    ("quantization.resources", {"limits": {"nvidia.com/gpu": 1}},
     "spec.quantization.resources asks for GPUs, but device is cpu"),
    ("quantization.bits", 8, "spec.serving.enabled needs a recipe vLLM serves on CPUs: quantization.bits 4"),
    ("serving.device", "tpu", "spec.serving.device must be gpu or cpu"),
])
def test_cpu_specs_that_cannot_run_name_the_field(path, value, problem):
    with pytest.raises(SpecError, match=re.escape(problem)):
        parse_model(with_spec(example("tiny.yaml"), path, value))


def test_operator_cli_parses():
    from kubequant.cli import build_parser

    args = build_parser().parse_args(["operator", "-n", "ml", "-n", "ai", "--metrics-port", "0"])
    assert (args.namespace, args.metrics_port, args.all_namespaces) == (["ml", "ai"], 0, False)


def test_render_cli(capsys):
    assert cli_main(["render", "-f", "examples/llama-3-8b-tp2.yaml", "-n", "team"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Job", "Job", "Deployment", "Service",
                                         "PodDisruptionBudget", "ServiceMonitor"]
    assert {d["metadata"]["namespace"] for d in docs} == {"team"}
    for doc in docs[:-1]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_render_cli_refuses_an_invalid_spec(tmp_path, capsys):
    body = with_spec(example(), "serving.tensorParallelSize", 3)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    assert cli_main(["render", "-f", str(path)]) == 2
    assert "power of two" in capsys.readouterr().err


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_tolerations(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"].get("tolerations", [])


def test_gpu_pods_tolerate_the_gpu_taint():
    """GPU nodes carry nvidia.com/gpu:NoSchedule: a Pod that asks for GPUs tolerates it, others do not."""
    # No tolerations in the spec; quantizes on the CPU, evaluates and serves on GPUs.
    tiny = parse_model(with_spec(example("tiny.yaml"), "serving.device", "gpu"))
    assert gpu_tolerations(builders.quantize_job(tiny)) == []
    assert gpu_tolerations(builders.evaluate_job(tiny, ARTIFACT)) == [GPU_TOLERATION]
    assert gpu_tolerations(builders.deployment(tiny, ARTIFACT)) == [GPU_TOLERATION]
    # On the CPU nothing asks for GPUs, so nothing tolerates their taint.
    assert gpu_tolerations(builders.deployment(MODELS["tiny"], ARTIFACT)) == []
    # The spec's own tolerations are kept, and one that covers the taint is not doubled.
    llama = MODELS["llama"]
    assert gpu_tolerations(builders.quantize_job(llama)) == llama.spec.quantization.tolerations
    assert gpu_tolerations(builders.deployment(llama, ARTIFACT)) == llama.spec.serving.tolerations
    other = parse_model(with_spec(with_spec(example("tiny.yaml"), "serving.device", "gpu"), "serving.tolerations",
                                  [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]))
    assert gpu_tolerations(builders.deployment(other, ARTIFACT)) == [*other.spec.serving.tolerations, GPU_TOLERATION]
    everything = parse_model(with_spec(with_spec(example("tiny.yaml"), "serving.device", "gpu"), "serving.tolerations",
                                       [{"operator": "Exists"}]))
    assert gpu_tolerations(builders.evaluate_job(everything, ARTIFACT)) == [{"operator": "Exists"}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("spec: [unclosed\n", "not valid YAML at line 2, column 1"),
        ("- a\n- b\n", "document 1 is a list, not a Kubernetes object"),
    ],
    ids=["missing", "broken", "not-an-object"],
)
@pytest.mark.parametrize("command", ["render", "run"])
def test_cli_bad_file_is_one_line_and_exit_2(tmp_path, capsys, command, content, message):
    path = tmp_path / "qm.yaml"
    if content is not None:
        path.write_text(content)
    args = ["render", "-f", str(path)] if command == "render" else \
        ["run", "-f", str(path), "--workdir", str(tmp_path / "w"), "--no-serve"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and len(err.strip().splitlines()) == 1, err


def test_every_spec_error_is_reported_at_once():
    body = with_spec(with_spec(with_spec(example(), "quantization.bits", 5), "serving.replicas", "two"),
                     "storage.retentionPolicy", "Keep")
    body["metadata"]["name"] = "Not_A_Name"
    with pytest.raises(SpecError) as raised:
        parse_model(body)
    assert [p.split(" ")[0] for p in raised.value.problems] == [
        "metadata.name", "spec.quantization.bits", "spec.serving.replicas", "spec.storage.retentionPolicy"]
    assert str(raised.value) == "; ".join(raised.value.problems)


def test_a_number_hashes_the_same_however_it_is_spelled():
    # The apiserver stores `dampPercent: 1.0` as 1 and `maxPerplexityRatio: 2` as 2: the names and
    # paths the operator computes from the stored object are those `kubequant render` computes from the file.
    as_written = with_spec(with_spec(example(), "quantization.dampPercent", 1.0), "evaluation.maxPerplexityRatio", 2.0)
    as_stored = with_spec(with_spec(example(), "quantization.dampPercent", 1), "evaluation.maxPerplexityRatio", 2)
    written, stored = parse_model(as_written), parse_model(as_stored)
    assert builders.quantize_job_name(written) == builders.quantize_job_name(stored)
    assert builders.evaluate_job_name(written) == builders.evaluate_job_name(stored)
    assert builders.artifact_dir(written) == builders.artifact_dir(stored)
    # A different number still hashes differently.
    other = parse_model(with_spec(example(), "quantization.dampPercent", 1.5))
    assert builders.quantize_job_name(other) != builders.quantize_job_name(written)


def test_texts_from_a_hub_dataset_are_fetched_onto_the_claim_by_the_quantize_job():
    # The 8B example's texts come from Salesforce/wikitext at a pinned revision: they exist before the
    # claim does, so the example runs on a new, empty claim.
    model = parse_model(example())
    job = builders.quantize_job(model)
    pod = job["spec"]["template"]["spec"]
    fetches = {c["name"]: c["command"] for c in pod["initContainers"]}
    texts = fetches[builders.FETCH_TEXTS_CONTAINER]
    out = texts[texts.index("--output") + 1]
    assert texts[:4] == ["python", "-m", "quantizer", "fetch"] and "--repo-type" in texts
    assert texts[texts.index("--repo") + 1] == "Salesforce/wikitext"
    files = [texts[i + 1] for i, arg in enumerate(texts) if arg == "--file"]
    assert files == ["wikitext-2-raw-v1/train-00000-of-00001.parquet", "wikitext-2-raw-v1/test-00000-of-00001.parquet"]
    # Fetched after the model (the first init container), read by the quantizer and the evaluator from there.
    assert [c["name"] for c in pod["initContainers"]] == [builders.FETCH_CONTAINER, builders.FETCH_TEXTS_CONTAINER]
    command = pod["containers"][0]["command"]
    assert command[command.index("--calibration") + 1] == f"{out}/{files[0]}"
    assert command[command.index("--eval-text") + 1] == f"{out}/{files[1]}"
    evaluate = builders.evaluate_job(model, ARTIFACT)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert evaluate[evaluate.index("--eval-text") + 1] == f"{out}/{files[1]}"
    # Another revision is another calibration: another artifact.
    moved = with_spec(example(), "quantization.calibration.text.huggingface.revision", "0" * 40)
    assert builders.artifact_hash(parse_model(moved)) != builders.artifact_hash(model)
    # A text on the claim needs no fetch.
    assert "initContainers" not in builders.quantize_job(parse_model(example("tiny.yaml")))["spec"]["template"]["spec"]


@pytest.mark.parametrize(("text", "words"), [
    ({"path": "a.txt", "huggingface": {"repo": "r/d", "revision": "x", "file": "f.parquet"}},
     "must set exactly one of path, configMap or huggingface"),
    ({"huggingface": {"repo": "r/d", "revision": "x", "file": "../f.parquet"}}, "relative to the root of the repository"),
    ({"huggingface": {"repo": "r/d", "file": "f.parquet"}}, "revision"),
    ({"huggingface": {"repo": "r/d", "revision": "x", "file": "f", "endpoint": "hub"}}, "must be an http(s) URL"),
])
def test_a_bad_hub_text_names_the_field(text, words):
    with pytest.raises(SpecError, match=re.escape(words)):
        parse_model(with_spec(example(), "quantization.calibration.text", text))


def test_serving_env_reaches_the_gate_and_serving_and_gates_again():
    env = [{"name": "VLLM_MARLIN_INPUT_DTYPE", "value": "fp8"}, {"name": "HF_HUB_OFFLINE", "value": "0"}]
    model = parse_model(with_spec(example("tiny.yaml"), "serving.env", env))
    assert model.spec.serving.env == (("VLLM_MARLIN_INPUT_DTYPE", "fp8"), ("HF_HUB_OFFLINE", "0"))
    for container in (_container(builders.evaluate_job(model, ARTIFACT)), _container(builders.deployment(model, ARTIFACT))):
        names = [e["name"] for e in container["env"]]
        assert {"name": "VLLM_MARLIN_INPUT_DTYPE", "value": "fp8"} in container["env"]
        assert names.count("HF_HUB_OFFLINE") == 1 and {"name": "HF_HUB_OFFLINE", "value": "0"} in container["env"]
    plain = parse_model(example("tiny.yaml"))
    # Another engine setting measures again; the artifact stays.
    assert builders.evaluation_key(model) != builders.evaluation_key(plain)
    assert builders.artifact_hash(model) == builders.artifact_hash(plain)


@pytest.mark.parametrize(("env", "message"), [
    ([{"name": "1BAD", "value": "x"}], "spec.serving.env: '1BAD' is not an environment variable name"),
    ([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "spec.serving.env: A is set twice"),
    ([{"name": "A", "value": 1}], 'spec.serving.env[0].value must be a string; quote it: "1"'),
    ([{"value": "1"}], "spec.serving.env[0]"),
])
def test_bad_serving_env_names_the_field(env, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_model(with_spec(example("tiny.yaml"), "serving.env", env))


def test_expert_calibration_reaches_the_quantize_job_and_only_a_change_requantizes():
    plain = parse_model(example("tiny.yaml"))
    routed = parse_model(with_spec(example("tiny.yaml"), "quantization.expertCalibration", "routed"))
    command = _container(builders.quantize_job(routed))["command"]
    assert command[command.index("--expert-calibration") + 1] == "routed"
    assert builders.artifact_hash(routed) != builders.artifact_hash(plain)
    explicit = parse_model(with_spec(example("tiny.yaml"), "quantization.expertCalibration", "all"))
    assert builders.artifact_hash(explicit) == builders.artifact_hash(plain)  # the default: the hash as before
    with pytest.raises(SpecError, match=re.escape("spec.quantization.expertCalibration must be")):
        parse_model(with_spec(example("tiny.yaml"), "quantization.expertCalibration", "some"))
