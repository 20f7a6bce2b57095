"""The quality gate: may this quantized model replace what serves?

It passes only when (1) the serving engine agrees with our own measurement of the same weights,
|served / fakequant - 1| <= engine_tolerance, (2) the perplexity regression against the FP16/BF16
baseline is within every threshold given (absolute increase and/or ratio; ratio 1.05 when none is
given), and (3) each agreement threshold given holds against the unquantized model served by the same
engine (quantizer/agreement.py): mean KL divergence of the next-token distributions, top-1 agreement,
exact-match rate of greedy generations, the speed-up, and the drop of each lm-evaluation-harness task's
score (quantizer/tasks.py).
Disagreement is its own reason, checked first: it means the checkpoint or the engine's kernels do
not compute what we quantized (a packing bug, a permuted g_idx that vLLM ignores), and then the
served number says nothing about the recipe. Otherwise the reason is the first check that failed and
the message gives every failed check with its numbers. Boundaries pass: a value exactly at a limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantizer.agreement import DistributionAgreement, GenerationAgreement
from quantizer.contract import (
    ENGINE_MISMATCH,
    GENERATION_MISMATCH,
    INSUFFICIENT_SPEEDUP,
    KL_DIVERGENCE,
    PASSED,
    PERPLEXITY_REGRESSION,
    TASK_ACCURACY_DROP,
    TOP_TOKEN_AGREEMENT,
)
from quantizer.errors import InputError
from quantizer.tasks import TaskComparison

DEFAULT_MAX_RATIO = 1.05
DEFAULT_ENGINE_TOLERANCE = 0.01
NEEDS_SOURCE = ("--max-kl-divergence, --min-top-token-agreement, --min-generation-match, --min-speedup and "
                "--max-accuracy-drop compare with the unquantized model: pass --baseline-model DIR")


@dataclass(frozen=True)
class GateThresholds:
    max_ppl_increase: float | None = None
    max_ppl_ratio: float | None = None
    engine_tolerance: float = DEFAULT_ENGINE_TOLERANCE
    max_kl_divergence: float | None = None  # mean KL(FP16 || quantized) per token, nats
    min_top_token_agreement: float | None = None  # share of tokens, 0..1
    min_generation_match: float | None = None  # share of prompts, 0..1
    min_speedup: float | None = None  # quantized over source output tokens/s at the largest batch
    max_accuracy_drop: float | None = None  # per task, source minus quantized score (0..1 for accuracies)

    def __post_init__(self) -> None:
        for name in ("max_ppl_increase", "max_ppl_ratio", "engine_tolerance", "max_kl_divergence", "min_speedup"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive (got {value})")
        if self.max_ppl_ratio is not None and self.max_ppl_ratio < 1:
            raise InputError(f"--max-ppl-ratio {self.max_ppl_ratio} is below 1: no quantized model could pass")
        for name in ("min_top_token_agreement", "min_generation_match"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise InputError(f"--{name.replace('_', '-')} is a share: between 0 and 1 (got {value})")
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:
            raise InputError(f"--max-accuracy-drop must be 0 or more (got {self.max_accuracy_drop})")

    @property
    def needs_reference(self) -> bool:
        """Whether a threshold compares against the unquantized model in the engine."""
        return self.max_kl_divergence is not None or self.min_top_token_agreement is not None \
            or self.min_generation_match is not None or self.min_speedup is not None \
            or self.max_accuracy_drop is not None

    def check_inputs(self, *, source: bool, prompts: bool, tasks: bool = False) -> None:
        """Bad input, before anything is measured, when a threshold needs what will not be measured."""
        if self.needs_reference and not source:
            raise InputError(NEEDS_SOURCE)
        if self.min_generation_match is not None and not prompts:
            raise InputError("--min-generation-match needs --generation-prompts PATH")
        if self.max_accuracy_drop is not None and not tasks:
            raise InputError("--max-accuracy-drop needs --tasks PATH (lm-evaluation-harness task YAMLs)")

    def effective_ratio(self) -> float | None:
        if self.max_ppl_increase is None and self.max_ppl_ratio is None:
            return DEFAULT_MAX_RATIO
        return self.max_ppl_ratio


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    message: str
    baseline_ppl: float
    fakequant_ppl: float
    served_ppl: float
    ppl_ratio: float
    ppl_increase: float
    engine_deviation: float


def decide(baseline_ppl: float, fakequant_ppl: float, served_ppl: float, thresholds: GateThresholds,
           distributions: DistributionAgreement | None = None,
           generations: GenerationAgreement | None = None, throughput: list[dict] | None = None,
           tasks: list[TaskComparison] | None = None) -> GateDecision:
    for name, value in (("baseline", baseline_ppl), ("fakequant", fakequant_ppl), ("served", served_ppl)):
        if not value > 0 or value != value or value == float("inf"):
            raise InputError(f"{name} perplexity must be a positive finite number (got {value})")
    ratio = served_ppl / baseline_ppl
    increase = served_ppl - baseline_ppl
    deviation = served_ppl / fakequant_ppl - 1
    numbers = dict(
        baseline_ppl=baseline_ppl, fakequant_ppl=fakequant_ppl, served_ppl=served_ppl,
        ppl_ratio=ratio, ppl_increase=increase, engine_deviation=deviation,
    )
    if abs(deviation) > thresholds.engine_tolerance:
        return GateDecision(
            passed=False, reason=ENGINE_MISMATCH,
            message=(
                f"the serving engine measured perplexity {served_ppl:.4f} where our reference on the same weights "
                f"measured {fakequant_ppl:.4f} ({deviation:+.2%}, tolerance {thresholds.engine_tolerance:.2%}): "
                "the checkpoint is not served as quantized"
            ),
            **numbers,
        )
    failures: list[tuple[str, str]] = []  # (reason, what failed with its numbers), in the checks' order
    max_ratio = thresholds.effective_ratio()
    regression = []
    if max_ratio is not None and ratio > max_ratio:
        regression.append(f"ratio {ratio:.4f} > {max_ratio:.4f}")
    if thresholds.max_ppl_increase is not None and increase > thresholds.max_ppl_increase:
        regression.append(f"increase {increase:.4f} > {thresholds.max_ppl_increase:.4f}")
    summary = f"perplexity {baseline_ppl:.4f} -> {served_ppl:.4f} (x{ratio:.4f}, {increase:+.4f})"
    if regression:
        failures.append((PERPLEXITY_REGRESSION, f"{summary}: {' and '.join(regression)}"))
    if distributions is None and (thresholds.max_kl_divergence is not None
                                  or thresholds.min_top_token_agreement is not None):
        raise InputError(NEEDS_SOURCE)
    if distributions is not None:
        kl, agreement = distributions.kl_mean, distributions.top1_agreement
        if thresholds.max_kl_divergence is not None and kl > thresholds.max_kl_divergence:
            failures.append((KL_DIVERGENCE, f"mean KL divergence {kl:.4f} > {thresholds.max_kl_divergence:.4f} "
                             f"(p99 {distributions.kl_p99:.4f}, max {distributions.kl_max:.4f} over "
                             f"{distributions.tokens} tokens)"))
        if thresholds.min_top_token_agreement is not None and agreement < thresholds.min_top_token_agreement:
            failures.append((TOP_TOKEN_AGREEMENT, f"top-1 agreement {agreement:.2%} < "
                             f"{thresholds.min_top_token_agreement:.2%}"))
        summary += f", KL {kl:.4f}, top-1 agreement {agreement:.2%}"
    if thresholds.min_generation_match is not None:
        if generations is None:
            raise InputError("--min-generation-match needs generations: pass --generation-prompts and --baseline-model")
        if generations.exact_match < thresholds.min_generation_match:
            failures.append((GENERATION_MISMATCH, f"{generations.exact_match:.2%} of {generations.prompts} greedy "
                             f"completions match < {thresholds.min_generation_match:.2%} (first difference at "
                             f"token {generations.mean_first_difference:.1f} of {generations.new_tokens} on average)"))
    if generations is not None:
        summary += f", {generations.exact_match:.0%} of completions match"
    largest = max(throughput or [], key=lambda row: row["batch_size"], default=None)
    if thresholds.min_speedup is not None:
        if largest is None or "speedup" not in largest:
            raise InputError("--min-speedup needs the throughput of both models: pass --throughput-batches "
                             "and --baseline-model (with --engine vllm)")
        if largest["speedup"] < thresholds.min_speedup:
            failures.append((INSUFFICIENT_SPEEDUP, f"{largest['speedup']:.2f}x the source model's output tokens/s at "
                             f"batch {largest['batch_size']} < {thresholds.min_speedup:.2f}x"))
    if largest is not None and "speedup" in largest:
        summary += f", {largest['speedup']:.2f}x the source's tokens/s at batch {largest['batch_size']}"
    if thresholds.max_accuracy_drop is not None and not tasks:
        raise InputError("--max-accuracy-drop needs task scores of both models: pass --tasks and --baseline-model")
    for task in tasks or []:
        line = f"{task.task} {task.metric} {task.source:.4f} -> {task.quantized:.4f}"
        if task.stderr is not None:
            line += f" (stderr {task.stderr:.4f})"
        if thresholds.max_accuracy_drop is not None and task.drop > thresholds.max_accuracy_drop:
            failures.append((TASK_ACCURACY_DROP, f"{line}: drop {task.drop:.4f} > {thresholds.max_accuracy_drop:.4f}"))
        summary += f", {line}"
    if failures:
        return GateDecision(passed=False, reason=failures[0][0], message="; ".join(m for _, m in failures),
                            **numbers)
    return GateDecision(passed=True, reason=PASSED, message=f"{summary}: within the thresholds", **numbers)
