"""Decoder families other than Llama's layout (quantizer/families.py): each quantized from a tiny model
made here, served by vLLM on the CPU at the fake-quant perplexity in both formats, and loaded by
Transformers from the compressed-tensors checkpoint with our logits."""

from __future__ import annotations

import pytest
import torch

from quantizer import contract
from quantizer.families import FAMILIES, SUPPORTED_ARCHITECTURES, family_of
from quantizer.perplexity import load_dequantized_model
from tests.conftest import quantize
from tests.families import gemma3_tiny, phi3_from_tiny_llama
from tests.test_evaluate import _gate_args, evaluate_with_vllm
from tests.test_formats import _windows


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return phi3_from_tiny_llama(tmp_path_factory.mktemp("phi3") / "tiny-phi3")


@pytest.fixture(scope="module")
def phi3_checkpoints(phi3, tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3-quantized")
    made = {}
    for fmt in contract.CHECKPOINT_FORMATS:
        code, result = quantize(root / fmt, "--group-size", "32", "--format", fmt, model=phi3)
        assert code == 0, result
        made[fmt] = (root / fmt, result)
    return made


def test_every_architecture_has_one_family():
    assert len(SUPPORTED_ARCHITECTURES) == len(set(SUPPORTED_ARCHITECTURES))
    for family in FAMILIES:
        assert family.row_parallel and set(family.row_parallel) <= family.linears
        for architecture in family.architectures:
            assert family_of([architecture]) is family


def test_the_phi3_fixture_is_the_tiny_llama_fused(phi3):
    from transformers import AutoModelForCausalLM

    from tests.conftest import TINY_MODEL

    ids = _windows()[:2]
    with torch.no_grad():
        llama = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()(ids).logits
        fused = AutoModelForCausalLM.from_pretrained(phi3, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(fused, llama, rtol=1e-4, atol=1e-4)


def test_phi3_quantizes_its_fused_linears(phi3_checkpoints):
    _, result = phi3_checkpoints[contract.COMPRESSED_TENSORS_FORMAT]
    assert result["status"] == contract.SUCCEEDED
    # A trained model's perplexity (the tiny Llama's function), and GPTQ's small increase on it.
    assert result["baseline_ppl"] < 100 and result["fakequant_ppl"] / result["baseline_ppl"] < 1.10
    assert result["row_parallel_in_features"] == [128, 384]


def test_transformers_loads_the_phi3_checkpoint_with_our_logits(phi3_checkpoints):
    from transformers import AutoModelForCausalLM

    path, _ = phi3_checkpoints[contract.COMPRESSED_TENSORS_FORMAT]
    ids = _windows()[:2]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
        ours = load_dequantized_model(path)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("fmt", contract.CHECKPOINT_FORMATS)
def test_vllm_serves_phi3_at_the_fake_quant_perplexity(phi3_checkpoints, fmt, tmp_path):
    path, quantized = phi3_checkpoints[fmt]
    code, result = evaluate_with_vllm(path, tmp_path, *_gate_args(quantized))
    assert code == 0, result
    assert result["reason"] == "Passed" and result["engine"].startswith("vllm")
    assert abs(result["served_ppl"] / result["fakequant_ppl"] - 1) < 0.005


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return gemma3_tiny(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")


@pytest.fixture(scope="module")
def gemma3_checkpoints(gemma3, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-quantized")
    made = {}
    for fmt in contract.CHECKPOINT_FORMATS:
        code, result = quantize(root / fmt, "--group-size", "32", "--format", fmt, model=gemma3)
        assert code == 0, result
        made[fmt] = (root / fmt, result)
    return made


def test_gemma3_baseline_is_transformers_perplexity_with_each_kind_of_layer(gemma3, gemma3_checkpoints):
    # The pipeline runs each layer with its kind's mask and rotary embeddings (sliding window 64 inside
    # 256-token windows): its baseline is what Transformers computes for the whole model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.perplexity import load_evaluation_windows, torch_perplexity
    from tests.conftest import EVALUATION

    _, result = gemma3_checkpoints[contract.COMPRESSED_TENSORS_FORMAT]
    windows = load_evaluation_windows(EVALUATION, AutoTokenizer.from_pretrained(gemma3), 256, 24)
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    reference = torch_perplexity(model, windows).ppl
    assert result["baseline_ppl"] == pytest.approx(reference, rel=1e-4)
    assert result["fakequant_ppl"] != result["baseline_ppl"]


def test_transformers_loads_the_gemma3_checkpoint_with_our_logits(gemma3_checkpoints):
    from transformers import AutoModelForCausalLM

    path, _ = gemma3_checkpoints[contract.COMPRESSED_TENSORS_FORMAT]
    ids = _windows()[:2]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
        ours = load_dequantized_model(path)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("fmt", contract.CHECKPOINT_FORMATS)
def test_vllm_serves_gemma3_at_the_fake_quant_perplexity(gemma3_checkpoints, fmt, tmp_path):
    path, quantized = gemma3_checkpoints[fmt]
    code, result = evaluate_with_vllm(path, tmp_path, *_gate_args(quantized), "--dtype", "bfloat16")
    assert code == 0, result
    assert result["reason"] == "Passed" and result["engine"].startswith("vllm")
    assert abs(result["served_ppl"] / result["fakequant_ppl"] - 1) < 0.01
