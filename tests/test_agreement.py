"""KL divergence, top-1 agreement and generation agreement against the unquantized model: the pure
functions, then the evaluator's checks on the tiny model (sane passes, damaged but faithfully served
fails on the distributions even where perplexity lets it through)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantizer import contract
from quantizer.agreement import distribution_agreement, generation_agreement, quantile, token_kl
from quantizer.cli import main as quantizer_main
from tests.conftest import EVALUATION, FIXTURES, TINY_MODEL, damaged_copy

PROMPTS = FIXTURES / "text" / "prompts.txt"
WINDOWS = ["--eval-text", str(EVALUATION), "--seq-len", "256", "--max-windows", "24"]
CHECKS = ["--baseline-model", str(TINY_MODEL), "--generation-prompts", str(PROMPTS), "--max-new-tokens", "16",
          "--max-ppl-ratio", "1.1", "--max-kl-divergence", "0.03", "--min-top-token-agreement", "0.85"]


def _top(logits: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, tokens = torch.log_softmax(logits.double(), -1).topk(k)
    return list(zip(tokens.tolist(), values.tolist(), strict=True))


def test_token_kl_is_exact_when_k_covers_the_vocabulary():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        p, q = torch.randn(50, generator=generator) * 2, torch.randn(50, generator=generator) * 2
        exact = float((p.double().softmax(-1) * (p.double().log_softmax(-1) - q.double().log_softmax(-1))).sum())
        assert token_kl(_top(p, 50), _top(q, 50)) == pytest.approx(exact, rel=1e-9)
        assert 0 <= token_kl(_top(p, 5), _top(q, 5)) <= exact * 1.5  # coarsened: of the same order


def test_identical_distributions_agree_completely():
    logits = [torch.randn(100, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    tops = [_top(x, 20) for x in logits]
    agreement = distribution_agreement(tops, tops)
    assert agreement.kl_mean == agreement.kl_max == 0 and agreement.top1_agreement == 1 and agreement.tokens == 8


def test_a_flipped_top_token_counts_against_agreement():
    same, flipped = [(1, math.log(0.6)), (2, math.log(0.3))], [(2, math.log(0.6)), (1, math.log(0.3))]
    agreement = distribution_agreement([same, same], [same, flipped])
    assert agreement.top1_agreement == 0.5 and agreement.kl_max > 0 and agreement.kl_mean == agreement.kl_max / 2


def test_generation_agreement():
    result = generation_agreement([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [1, 2, 9, 4], [0, 6, 7, 8]])
    assert result.exact_match == pytest.approx(1 / 3)
    assert result.mean_first_difference == pytest.approx((4 + 2 + 0) / 3)
    assert result.prompts == 3 and result.new_tokens == 4
    with pytest.raises(ValueError, match="one per prompt"):
        generation_agreement([[1]], [])


def test_quantile_interpolates():
    assert quantile([0.0, 1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.96)
    assert quantile([5.0], 0.99) == 5.0


def _evaluate(model: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    result_file = tmp_path / "evaluate.json"
    code = quantizer_main(["evaluate", "--model", str(model), *WINDOWS, "--result-file", str(result_file), *extra])
    return code, json.loads(result_file.read_text())


def test_the_sane_checkpoint_passes_every_check(checkpoints, tmp_path):
    path, _ = checkpoints["gptq-g128"]
    code, result = _evaluate(path, tmp_path, "--engine", "torch", *CHECKS)
    assert code == 0, result["message"]
    assert result["reason"] == contract.PASSED
    assert 0 < result["kl_divergence"]["mean"] < 0.03 and result["kl_divergence"]["p99"] <= result["kl_divergence"]["max"]
    assert 0.85 <= result["top_token_agreement"] < 1
    assert 0 <= result["generation_match"] <= 1
    assert result["generations"]["prompts"] == 10 and result["generations"]["new_tokens"] == 16
    # Measured in the same engine as the quantized model, the baseline is the quantizer's own figure.
    assert result["baseline_ppl"] == pytest.approx(checkpoints["gptq-g128"][1]["baseline_ppl"], rel=1e-4)


def test_damage_that_perplexity_lets_through_fails_on_the_distributions(checkpoints, tmp_path):
    path, _ = checkpoints["gptq-g128"]
    bad = damaged_copy(path, tmp_path / "bad", step=4, layers="model.layers.1.")
    code, result = _evaluate(bad, tmp_path, "--engine", "torch", *CHECKS)
    assert code == contract.EXIT_GATE_FAILED
    assert result["reason"] == contract.KL_DIVERGENCE  # the first failed check
    assert result["ppl_ratio"] < 1.1  # perplexity alone would have passed it
    assert "mean KL divergence" in result["message"] and "top-1 agreement" in result["message"]
    assert result["kl_divergence"]["mean"] > 0.03 and result["top_token_agreement"] < 0.85
    assert abs(result["engine_deviation"]) < 0.01  # served as written: no EngineMismatch


def test_agreement_thresholds_without_the_unquantized_model_are_bad_input(checkpoints, tmp_path):
    path, quantized = checkpoints["gptq-g128"]
    code, result = _evaluate(path, tmp_path, "--engine", "torch", "--baseline-ppl", repr(quantized["baseline_ppl"]),
                             "--max-kl-divergence", "0.05")
    assert code == contract.EXIT_BAD_INPUT and "--baseline-model" in result["message"]
    code, result = _evaluate(path, tmp_path, "--engine", "torch", "--baseline-model", str(TINY_MODEL),
                             "--min-top-token-agreement", "1.5")
    assert code == contract.EXIT_BAD_INPUT and "between 0 and 1" in result["message"]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_measures_the_same_distributions_as_torch(checkpoints, tmp_path):
    """The unquantized and the quantized model both served by vLLM: top-k prompt logprobs and greedy
    completions from the engine give the torch engine's figures."""
    path, _ = checkpoints["gptq-g128"]
    result_file = tmp_path / "vllm.json"
    tasks = ["--tasks", str(FIXTURES / "tasks"), "--task-limit", "50"]
    done = subprocess.run([sys.executable, "-m", "quantizer", "evaluate", "--model", str(path), *WINDOWS, *CHECKS,
                           "--engine", "vllm", "--throughput-batches", "1,4", "--throughput-tokens", "8", *tasks,
                           "--result-file", str(result_file)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    served = json.loads(result_file.read_text())
    assert done.returncode == 0, done.stderr[-3000:]
    _, reference = _evaluate(path, tmp_path, "--engine", "torch", *CHECKS, *tasks)
    # The harness's vLLM backend scores the task as its torch backend does (float16 against float32:
    # a document or two of 50 may flip).
    (served_task,), (reference_task,) = served["tasks"], reference["tasks"]
    assert served_task["samples"] == reference_task["samples"] == 50
    assert served_task["source"] == pytest.approx(reference_task["source"], abs=0.041)
    assert served_task["quantized"] == pytest.approx(reference_task["quantized"], abs=0.041)
    assert served["engine"].startswith("vllm") and served["reason"] == contract.PASSED
    assert served["kl_divergence"]["mean"] == pytest.approx(reference["kl_divergence"]["mean"], abs=0.005)
    assert served["top_token_agreement"] == pytest.approx(reference["top_token_agreement"], abs=0.02)
    assert served["baseline_ppl"] == pytest.approx(reference["baseline_ppl"], rel=0.01)
    # Throughput in the engine, both models, per batch size (timings vary: only their shape is checked).
    assert [row["batch_size"] for row in served["throughput"]] == [1, 4]
    for row in served["throughput"]:
        assert row["output_tokens_per_second"] > 0 and row["source_output_tokens_per_second"] > 0
        assert row["speedup"] == pytest.approx(row["output_tokens_per_second"] / row["source_output_tokens_per_second"])
        assert row["time_to_first_token_seconds"] > 0
    assert "throughput" not in reference or reference["throughput"] is None  # the torch engine measures none


def test_a_speedup_below_the_threshold_fails_the_gate():
    from quantizer.gate import GateThresholds, decide

    rows = [{"batch_size": 1, "speedup": 2.5}, {"batch_size": 64, "speedup": 1.2}]
    decision = decide(10.0, 10.0, 10.0, GateThresholds(min_speedup=1.5), throughput=rows)
    assert decision.reason == contract.INSUFFICIENT_SPEEDUP and "1.20x" in decision.message and "batch 64" in decision.message
    assert decide(10.0, 10.0, 10.0, GateThresholds(min_speedup=1.1), throughput=rows).passed
