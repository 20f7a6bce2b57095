"""Both checkpoint formats load outside vLLM: in Transformers, with the logits of our fake-quant model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from quantizer.errors import InputError
from quantizer.formats import FORMATS, checkpoint_format, format_of
from quantizer.perplexity import load_dequantized_model, load_evaluation_windows
from tests.conftest import EVALUATION, TINY_MODEL


def _windows() -> torch.Tensor:
    from transformers import AutoTokenizer

    return load_evaluation_windows(EVALUATION, AutoTokenizer.from_pretrained(TINY_MODEL), 128, 8).ids


def test_transformers_loads_the_compressed_tensors_checkpoint_with_our_logits(checkpoints):
    # Imported here: importing it at collection decorates Triton kernels before tests/test_gptq_triton.py
    # can select the interpreter.
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints["gptq-g128"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = load_dequantized_model(path)
    ids = _windows()
    with torch.no_grad():
        theirs, ours = model(ids).logits, reference(ids).logits
    # The compressed-tensors integration decompresses to the same float weights we dequantize.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)


def test_transformers_loads_the_gptq_checkpoint_where_a_cpu_loader_exists(checkpoints):
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"Transformers 5.19 loads GPTQ checkpoints only through GPTQModel and optimum; missing here: "
            f"{', '.join(missing)}. GPTQModel ships only an sdist that builds C++/CUDA extensions, and its "
            "current release (7.7.0) needs torch>=2.14.1 and transformers>=5.20.2, newer than this "
            "project's pins (torch 2.13.0, transformers<5.20); the compressed-tensors format loads without it"
        )
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints["gptq-g128-gptq-format"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    ids = _windows()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_dequantized_model(path)(ids).logits, rtol=1e-3, atol=1e-2)


def test_a_format_is_named_or_refused():
    assert set(FORMATS) == {"compressed-tensors", "gptq"}
    assert format_of({"quant_method": "gptq"}).name == "gptq"
    with pytest.raises(InputError, match="--format awq: use one of compressed-tensors, gptq"):
        checkpoint_format("awq")
    with pytest.raises(InputError, match="quant_method 'awq': not a checkpoint kubequant reads"):
        format_of({"quant_method": "awq"})
