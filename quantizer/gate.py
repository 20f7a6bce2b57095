"""The quality gate: may this quantized model replace what serves?

It passes only when (1) the serving engine agrees with our own measurement of the same weights,
|served / fakequant - 1| <= engine_tolerance, and (2) the regression against the FP16/BF16 baseline
is within every threshold given (absolute increase and/or ratio; ratio 1.05 when none is given).
Disagreement is its own reason, checked first: it means the checkpoint or the engine's kernels do
not compute what we quantized (a packing bug, a permuted g_idx that vLLM ignores), and then the
served number says nothing about the recipe. Boundaries pass: a ratio exactly at the limit is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantizer.contract import ENGINE_MISMATCH, PASSED, PERPLEXITY_REGRESSION
from quantizer.errors import InputError

DEFAULT_MAX_RATIO = 1.05
DEFAULT_ENGINE_TOLERANCE = 0.01


@dataclass(frozen=True)
class GateThresholds:
    max_ppl_increase: float | None = None
    max_ppl_ratio: float | None = None
    engine_tolerance: float = DEFAULT_ENGINE_TOLERANCE

    def __post_init__(self) -> None:
        for name in ("max_ppl_increase", "max_ppl_ratio", "engine_tolerance"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"{name.replace('_', '-')} must be positive (got {value})")
        if self.max_ppl_ratio is not None and self.max_ppl_ratio < 1:
            raise InputError(f"max-ppl-ratio {self.max_ppl_ratio} is below 1: no quantized model could pass")

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

    def to_dict(self) -> dict:
        return asdict(self)


def decide(baseline_ppl: float, fakequant_ppl: float, served_ppl: float, thresholds: GateThresholds) -> GateDecision:
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
    failures = []
    max_ratio = thresholds.effective_ratio()
    if max_ratio is not None and ratio > max_ratio:
        failures.append(f"ratio {ratio:.4f} > {max_ratio:.4f}")
    if thresholds.max_ppl_increase is not None and increase > thresholds.max_ppl_increase:
        failures.append(f"increase {increase:.4f} > {thresholds.max_ppl_increase:.4f}")
    summary = f"perplexity {baseline_ppl:.4f} -> {served_ppl:.4f} (x{ratio:.4f}, {increase:+.4f})"
    if failures:
        return GateDecision(
            passed=False, reason=PERPLEXITY_REGRESSION,
            message=f"{summary}: {' and '.join(failures)}", **numbers,
        )
    return GateDecision(passed=True, reason=PASSED, message=f"{summary}: within the thresholds", **numbers)
