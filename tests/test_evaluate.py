"""The evaluator on the tiny model: vLLM agrees with our reference; corrupted or over-quantized
checkpoints fail the gate with the right reason; bad input exits with 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantizer import contract
from quantizer.cli import main as quantizer_main
from tests.conftest import EVALUATION, TINY_MODEL, quantize

EVAL_ARGS = ["--eval-text", str(EVALUATION), "--seq-len", "256", "--max-windows", "24"]


def evaluate_in_process(model: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    result_file = tmp_path / "evaluate.json"
    code = quantizer_main(["evaluate", "--model", str(model), *EVAL_ARGS, "--result-file", str(result_file), *extra])
    return code, json.loads(result_file.read_text())


def evaluate_with_vllm(model: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    """vLLM spawns engine processes: run the CLI as its own process, as the evaluation Job does."""
    result_file = tmp_path / "evaluate.json"
    done = subprocess.run(
        [sys.executable, "-m", "quantizer", "evaluate", "--model", str(model), *EVAL_ARGS,
         "--result-file", str(result_file), "--engine", "vllm", *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result_file.exists(), done.stderr[-3000:]
    # A result written and then a crash on the way out is still a failed Job: say where it died.
    assert done.returncode >= 0, f"the evaluator died of signal {-done.returncode}:\n{done.stderr[-3000:]}"
    return done.returncode, json.loads(result_file.read_text())


def _gate_args(result: dict) -> list[str]:
    return ["--baseline-ppl", repr(result["baseline_ppl"]), "--fakequant-ppl", repr(result["fakequant_ppl"])]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_both_formats_as_quantized(checkpoints, tmp_path):
    """vLLM loads each format with no quantization flag; its perplexity matches our reference, and the
    two layouts of the same weights serve at the same perplexity."""
    served = {}
    for name in ("gptq-g128", "gptq-g128-gptq-format"):
        path, quantized = checkpoints[name]
        code, result = evaluate_with_vllm(path, tmp_path, *_gate_args(quantized))
        assert code == 0, result
        assert result["reason"] == "Passed" and result["engine"].startswith("vllm")
        assert result["tokens_scored"] == quantized["eval_tokens"]
        assert result["baseline_ppl"] <= result["fakequant_ppl"]
        assert abs(result["served_ppl"] / result["fakequant_ppl"] - 1) < 0.005
        assert result["recipe"]["format"] == quantized["format"]
        served[quantized["format"]] = result["served_ppl"]
    assert served[contract.COMPRESSED_TENSORS_FORMAT] == pytest.approx(served[contract.GPTQ_FORMAT], rel=1e-4)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_negative_full_range_scales(checkpoints, tmp_path):
    """Full-range scales carry the sign of each group's extreme: about half are negative. vLLM's
    kernel computes scale * (q - 8) as we do, so its perplexity still matches our reference."""
    path, quantized = checkpoints["full-range-g32"]
    scales = torch.cat([t.flatten() for file in path.glob("model-*.safetensors")
                        for name, t in load_file(file).items() if name.endswith(".weight_scale")])  # fmt: skip
    assert 0.3 < float((scales < 0).float().mean()) < 0.7
    code, result = evaluate_with_vllm(path, tmp_path, *_gate_args(quantized))
    assert code == 0, result
    assert result["reason"] == "Passed"
    assert abs(result["served_ppl"] / result["fakequant_ppl"] - 1) < 0.005


@pytest.mark.vllm
@pytest.mark.slow
def test_permuted_g_idx_is_an_engine_mismatch(checkpoints, tmp_path):
    """vLLM ignores g_idx; our reference honours it. Without --fakequant-ppl the reference is measured
    from the checkpoint as written, so a permuted g_idx shows up as a disagreement."""
    path, quantized = checkpoints["gptq-g128-gptq-format"]  # compressed-tensors stores no g_idx for static order
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    for file in bad.glob("model-*.safetensors"):
        tensors = load_file(file)
        for name in [n for n in tensors if n.endswith("mlp.down_proj.g_idx")]:
            tensors[name] = tensors[name][torch.randperm(tensors[name].numel(), generator=torch.Generator().manual_seed(0))]
        save_file(tensors, file, metadata={"format": "pt"})
    code, result = evaluate_with_vllm(bad, tmp_path, "--baseline-ppl", repr(quantized["baseline_ppl"]))
    assert code == 3, result
    assert result["reason"] == "EngineMismatch", result["message"]


@pytest.mark.parametrize(("name", "scales", "channels"), [("gptq-g128", ".weight_scale", 0),
                                                         ("gptq-g128-gptq-format", ".scales", 1)])
def test_swapped_scales_are_an_engine_mismatch(checkpoints, tmp_path, name, scales, channels):
    path, quantized = checkpoints[name]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    for file in bad.glob("model-*.safetensors"):
        tensors = load_file(file)
        # Every quantized Linear of decoder layer 0 gets its output channels' scales end for end.
        for name in [n for n in tensors if n.startswith("model.layers.0.") and n.endswith(scales)]:
            tensors[name] = tensors[name].flip(channels).contiguous()
        save_file(tensors, file, metadata={"format": "pt"})
    code, result = evaluate_in_process(bad, tmp_path, "--engine", "torch", *_gate_args(quantized))
    assert code == 3
    assert result["reason"] == "EngineMismatch" and "not served as quantized" in result["message"]


def test_over_quantized_recipe_is_a_regression(tmp_path):
    code, quantized = quantize(tmp_path / "q2", "--bits", "2", "--group-size", "32", "--allow-unservable")
    assert code == 0
    code, result = evaluate_in_process(tmp_path / "q2", tmp_path, "--engine", "torch", *_gate_args(quantized))
    assert code == 3
    assert result["reason"] == "PerplexityRegression"
    assert result["served_ppl"] > 1.05 * result["baseline_ppl"]
    assert result["engine"] == "torch"


def test_torch_engine_passes_a_good_checkpoint(checkpoints, tmp_path):
    path, quantized = checkpoints["gptq-g128"]
    code, result = evaluate_in_process(path, tmp_path, "--engine", "torch", *_gate_args(quantized))
    assert code == 0 and result["passed"] and result["reason"] == "Passed"
    assert len(json.dumps(result)) < 4096


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty-text", "fewer than one window"),
        ("short-text", "fewer than one window"),
        ("long-seq", "exceeds the model's context"),
        ("not-a-checkpoint", "not a quantized checkpoint"),
        ("no-baseline", "no baseline"),
    ],
)
def test_bad_input(checkpoints, tmp_path, capsys, case, message):
    path, quantized = checkpoints["gptq-g128"]
    args = ["evaluate", "--model", str(path), "--eval-text", str(EVALUATION), "--seq-len", "256",
            "--engine", "torch", "--result-file", str(tmp_path / "r.json")]
    gate = _gate_args(quantized)
    if case == "empty-text":
        (tmp_path / "e.txt").write_text("")
        args[4] = str(tmp_path / "e.txt")
    elif case == "short-text":
        (tmp_path / "s.txt").write_text("x = 1\n")
        args[4] = str(tmp_path / "s.txt")
    elif case == "long-seq":
        args[6] = "100000"
    elif case == "not-a-checkpoint":
        args[2] = str(TINY_MODEL)
    elif case == "no-baseline":
        gate = []
    assert quantizer_main(args + gate) == 2
    assert message in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["reason"] == "InvalidInput"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_agrees_on_sliding_windows(checkpoints, tmp_path):
    """Sliding windows score only their new tokens, in vLLM exactly as in our reference."""
    path, quantized = checkpoints["gptq-g128"]
    # The baseline was measured on non-overlapping windows: only the engine agreement matters here.
    code, result = evaluate_with_vllm(path, tmp_path, "--stride", "128", "--baseline-ppl", repr(quantized["baseline_ppl"]),
                                      "--max-ppl-ratio", "2")
    assert code == 0, result
    assert abs(result["engine_deviation"]) < 0.005
    assert result["tokens_scored"] < quantized["eval_tokens"]
