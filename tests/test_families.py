"""Decoder families other than Llama's layout (quantizer/families.py): each quantized from a tiny model
made here, served by vLLM on the CPU at the fake-quant perplexity in both formats, and loaded by
Transformers from the compressed-tensors checkpoint with our logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from quantizer import contract
from quantizer.families import FAMILIES, SUPPORTED_ARCHITECTURES, family_of
from quantizer.perplexity import load_dequantized_model
from tests.conftest import EVALUATION, TINY_MODEL, quantize
from tests.families import gemma3_tiny, phi3_from_tiny_llama
from tests.test_evaluate import _gate_args, evaluate_with_vllm
from tests.test_formats import _windows


@dataclass(frozen=True)
class Tiny:
    make: object  # (folder) -> the model's folder
    dtype: str  # what vLLM serves it in
    tolerance: float  # |served / fake-quant - 1| allowed (bfloat16 rounds more than float16)


TINIES = {
    "phi3": Tiny(phi3_from_tiny_llama, "float16", 0.005),
    "gemma3": Tiny(gemma3_tiny, "bfloat16", 0.01),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return {name: tiny.make(tmp_path_factory.mktemp(name) / f"tiny-{name}") for name, tiny in TINIES.items()}


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    """(family, format) -> (checkpoint, quantize result): GPTQ at group 32, made once."""
    made = {}
    for name, model in tiny_models.items():
        root = tmp_path_factory.mktemp(f"{name}-quantized")
        for fmt in contract.CHECKPOINT_FORMATS:
            code, result = quantize(root / fmt, "--group-size", "32", "--format", fmt, model=model)
            assert code == 0, result
            made[name, fmt] = (root / fmt, result)
    return made


def test_every_architecture_has_one_family():
    assert len(SUPPORTED_ARCHITECTURES) == len(set(SUPPORTED_ARCHITECTURES))
    for family in FAMILIES:
        assert family.row_parallel and set(family.row_parallel) <= family.linears
        for architecture in family.architectures:
            assert family_of([architecture]) is family


def test_the_phi3_fixture_is_the_tiny_llama_fused(tiny_models):
    from transformers import AutoModelForCausalLM

    ids = _windows()[:2]
    with torch.no_grad():
        llama = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()(ids).logits
        fused = AutoModelForCausalLM.from_pretrained(tiny_models["phi3"], dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(fused, llama, rtol=1e-4, atol=1e-4)


def test_phi3_quantizes_its_fused_linears(checkpoints):
    _, result = checkpoints["phi3", contract.COMPRESSED_TENSORS_FORMAT]
    assert result["status"] == contract.SUCCEEDED
    # A trained model's perplexity (the tiny Llama's function), and GPTQ's small increase on it.
    assert result["baseline_ppl"] < 100 and result["fakequant_ppl"] / result["baseline_ppl"] < 1.10
    assert result["row_parallel_in_features"] == [128, 384]


def test_gemma3_baseline_is_transformers_perplexity_with_each_kind_of_layer(tiny_models, checkpoints):
    # The pipeline runs each layer with its kind's mask and rotary embeddings (sliding window 64 inside
    # 256-token windows): its baseline is what Transformers computes for the whole model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.perplexity import load_evaluation_windows, torch_perplexity

    _, result = checkpoints["gemma3", contract.COMPRESSED_TENSORS_FORMAT]
    windows = load_evaluation_windows(EVALUATION, AutoTokenizer.from_pretrained(tiny_models["gemma3"]), 256, 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"], dtype=torch.float32).eval()
    assert result["baseline_ppl"] == pytest.approx(torch_perplexity(model, windows).ppl, rel=1e-4)
    assert result["fakequant_ppl"] != result["baseline_ppl"]


@pytest.mark.parametrize("family", TINIES)
def test_transformers_loads_the_checkpoint_with_our_logits(checkpoints, family):
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints[family, contract.COMPRESSED_TENSORS_FORMAT]
    ids = _windows()[:2]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
        ours = load_dequantized_model(path)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("fmt", contract.CHECKPOINT_FORMATS)
@pytest.mark.parametrize("family", TINIES)
def test_vllm_serves_it_at_the_fake_quant_perplexity(checkpoints, family, fmt, tmp_path):
    path, quantized = checkpoints[family, fmt]
    code, result = evaluate_with_vllm(path, tmp_path, *_gate_args(quantized), "--dtype", TINIES[family].dtype)
    assert code == 0, result
    assert result["reason"] == "Passed" and result["engine"].startswith("vllm")
    assert abs(result["served_ppl"] / result["fakequant_ppl"] - 1) < TINIES[family].tolerance
