"""The gate's decisions, table by table, including thresholds exactly at the boundary."""

from __future__ import annotations

import pytest

from quantizer.contract import ENGINE_MISMATCH, PASSED, PERPLEXITY_REGRESSION
from quantizer.errors import InputError
from quantizer.gate import GateThresholds, decide

# Powers of two keep served/baseline and served - baseline exact in floating point at the boundaries.
CASES = [
    # baseline, fakequant, served, thresholds, reason
    (8.0, 8.25, 8.25, GateThresholds(), PASSED),  # default ratio 1.05: 1.03125
    (8.0, 8.5, 8.5, GateThresholds(), PERPLEXITY_REGRESSION),  # 1.0625 > 1.05
    (8.0, 10.0, 10.0, GateThresholds(max_ppl_ratio=1.25), PASSED),  # exactly at the ratio
    (8.0, 10.0, 10.0, GateThresholds(max_ppl_ratio=1.2421875), PERPLEXITY_REGRESSION),
    (8.0, 8.5, 8.5, GateThresholds(max_ppl_increase=0.5), PASSED),  # exactly at the increase; no ratio check
    (8.0, 8.5, 8.5, GateThresholds(max_ppl_increase=0.25), PERPLEXITY_REGRESSION),
    (8.0, 8.5, 8.5, GateThresholds(max_ppl_increase=1.0, max_ppl_ratio=1.05), PERPLEXITY_REGRESSION),  # both apply
    (8.0, 8.5, 8.5, GateThresholds(max_ppl_increase=0.25, max_ppl_ratio=1.25), PERPLEXITY_REGRESSION),
    (8.0, 8.5, 8.5, GateThresholds(max_ppl_increase=0.5, max_ppl_ratio=1.0625), PASSED),
    (8.0, 8.0, 8.0, GateThresholds(), PASSED),  # no regression at all
    (8.0, 7.5, 7.5, GateThresholds(), PASSED),  # better than the baseline (noise) passes
    (8.0, 8.0, 8.0625, GateThresholds(engine_tolerance=0.0078125), PASSED),  # deviation exactly at tolerance
    (8.0, 8.0, 8.125, GateThresholds(engine_tolerance=0.01), ENGINE_MISMATCH),  # 1.5625% > 1%
    (8.0, 8.125, 8.0, GateThresholds(engine_tolerance=0.01), ENGINE_MISMATCH),  # served lower also mismatches
    (8.0, 8.0, 80.0, GateThresholds(max_ppl_ratio=20), ENGINE_MISMATCH),  # mismatch outranks the regression
]


@pytest.mark.parametrize("baseline,fakequant,served,thresholds,reason", CASES)
def test_decision_table(baseline, fakequant, served, thresholds, reason):
    decision = decide(baseline, fakequant, served, thresholds)
    assert decision.reason == reason
    assert decision.passed == (reason == PASSED)
    assert f"{served:.4f}" in decision.message  # the message quotes the numbers


def test_regression_message_names_the_failed_threshold():
    decision = decide(8.0, 8.5, 8.5, GateThresholds(max_ppl_increase=0.25, max_ppl_ratio=1.25))
    assert "increase 0.5000 > 0.2500" in decision.message and "ratio" not in decision.message.split(":")[-1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_ppl_ratio": 0.9}, "below 1"),
        ({"max_ppl_increase": -1.0}, "max-ppl-increase must be positive"),
        ({"engine_tolerance": 0.0}, "engine-tolerance must be positive"),
    ],
)
def test_invalid_thresholds(kwargs, message):
    with pytest.raises(InputError, match=message):
        GateThresholds(**kwargs)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_perplexities(bad):
    with pytest.raises(InputError, match="positive finite"):
        decide(8.0, bad, 8.0, GateThresholds())
