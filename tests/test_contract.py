"""The quantizer/operator contract: results survive the termination message's limit, are read back
typed, map to the exit codes the Jobs act on, and the operator reaches all of it without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kubequant import builders, reconcile
from kubequant.reconcile.records import artifact_record
from kubequant.spec import parse_model

from quantizer import contract
from quantizer.contract import (
    RESULT_LIMIT_BYTES,
    DoneResult,
    EvaluateResult,
    FailedResult,
    QuantizeResult,
    decode,
)
from tests.operator_support.objects import example


def _quantize_result(**details) -> QuantizeResult:
    return QuantizeResult(
        output="/artifacts/kubequant/m/abc", recipe={"bits": 4, "group_size": 128, "sym": True},
        size_before_bytes=16_060_000_000, size_after_bytes=5_700_000_000, seconds=1234.5, group_size=128,
        row_parallel_in_features=[4096, 11008], baseline_ppl=6.1, fakequant_ppl=6.3, details=details,
    )


def test_a_result_too_long_keeps_every_field_the_operator_reads():
    # A model with very long Linear names and many stages: the details alone pass the limit.
    result = _quantize_result(worst_linear={"name": "model.layers.0." + "x" * 5000, "relative_error": 0.01},
                              stage_seconds={f"stage{i}": 1.0 for i in range(50)})
    text = result.encode()
    assert len(text.encode()) <= RESULT_LIMIT_BYTES
    read = QuantizeResult.from_dict(decode(text))
    assert read is not None and read.fields() == result.fields()
    assert read.details == {}  # the details went, every field stayed

    # Read as the reconciler reads it: the tensor-parallel preflight still sees the row-parallel sizes
    # (11008 columns split over 4 GPUs are 2752, not whole groups of 128).
    model = parse_model(example())
    record = artifact_record(model, "abc", read)
    assert record["groupSize"] == 128 and record["rowParallelInFeatures"] == [4096, 11008]
    assert "tensorParallelSize 4" in reconcile.preflight(record, 4)


def test_a_result_that_fits_is_sent_whole():
    result = _quantize_result(quantized_linears=224, solver="triton")
    data = decode(result.encode())
    assert data == result.to_dict() and data["status"] == contract.SUCCEEDED
    assert QuantizeResult.from_dict(data) == result


def test_a_long_failure_message_is_shortened_not_cut_mid_json():
    failed = FailedResult(reason=contract.ERROR, message="é" * 5000)  # two bytes each
    text = failed.encode()
    assert len(text.encode()) <= RESULT_LIMIT_BYTES
    read = FailedResult.from_dict(json.loads(text))
    assert read.reason == contract.ERROR and read.message.endswith("...") and len(read.message) > 1000


@pytest.mark.parametrize(("change", "why"), [
    ({"status": contract.FAILED}, "another status"),
    ({"row_parallel_in_features": None}, "a list that is null"),
    ({"group_size": "128"}, "a number as a string"),
    ({"seconds": True}, "a boolean for a number"),
    ({"size_after_bytes": 1.5}, "a fraction of a byte"),
])
def test_a_result_of_the_wrong_shape_is_no_result(change, why):
    assert QuantizeResult.from_dict(_quantize_result().to_dict() | change) is None, why


def test_a_missing_field_is_no_result_but_a_missing_optional_one_is():
    data = _quantize_result().to_dict()
    assert QuantizeResult.from_dict({k: v for k, v in data.items() if k != "group_size"}) is None
    without_ppl = QuantizeResult.from_dict({k: v for k, v in data.items() if not k.endswith("_ppl")})
    assert without_ppl is not None and without_ppl.baseline_ppl is None
    assert QuantizeResult.from_dict(None) is None and decode("not json") is None and decode("[1]") is None


def _verdict(passed: bool, reason: str) -> EvaluateResult:
    return EvaluateResult(passed=passed, reason=reason, message="m", baseline_ppl=6.0, fakequant_ppl=6.1,
                          served_ppl=6.1, engine="vllm 0.32.0")


@pytest.mark.parametrize(("result", "code"), [
    (_quantize_result(), contract.EXIT_OK),
    (DoneResult(details={"quantized_linears": 28}), contract.EXIT_OK),
    (_verdict(True, contract.PASSED), contract.EXIT_OK),
    (_verdict(False, contract.PERPLEXITY_REGRESSION), contract.EXIT_GATE_FAILED),
    (_verdict(False, contract.ENGINE_MISMATCH), contract.EXIT_GATE_FAILED),
    (FailedResult(reason=contract.INVALID_INPUT, message="--model: no config.json"), contract.EXIT_BAD_INPUT),
    (FailedResult(reason=contract.EVALUATION_FAILED, message="vLLM died"), contract.EXIT_ERROR),
    (FailedResult(reason=contract.ERROR, message="CUDA error"), contract.EXIT_ERROR),
])
def test_exit_codes(result, code):
    assert contract.exit_code(result) == code


def test_the_jobs_fail_at_once_on_the_contracts_permanent_exit_codes():
    model = parse_model(example())

    def codes(job: dict) -> list[int]:
        [rule] = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
        return rule["onExitCodes"]["values"]

    assert codes(builders.quantize_job(model)) == [contract.EXIT_BAD_INPUT]
    artifact = {"hash": "abc", "path": "kubequant/m/abc", "baselinePerplexity": 6.0, "fakequantPerplexity": 6.1}
    assert tuple(codes(builders.evaluate_job(model, artifact))) == contract.PERMANENT_EXIT_CODES


def test_the_operator_side_needs_no_torch():
    # The operator image has no torch: the contract, the reconciler, the CLI and `kubequant run` import
    # without it (the Dockerfile checks the same in the image).
    code = ("import sys; sys.modules['torch'] = None; "
            "import quantizer.contract, kubequant.reconcile, kubequant.local, kubequant.cli, kubequant.k8s")
    subprocess.run([sys.executable, "-c", code], check=True)
