"""Packing in vLLM's GPTQ layout: round trips and the exact bit layout of the contract."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantizer.gptq import QuantRecipe, gptq_quantize
from quantizer.packing import dequantize_gptq, gptq_tensors, pack, unpack


@pytest.mark.parametrize("bits,dim", list(itertools.product((2, 3, 4, 8), (0, 1))))
def test_pack_unpack_round_trip(bits, dim):
    shape = (64, 96) if dim == 0 else (96, 64)
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    words = pack(codes, bits, dim=dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == 64 * bits // 32
    assert torch.equal(unpack(words, bits, 64, dim=dim), codes.to(torch.int32))


def test_4bit_layout_is_low_nibble_first():
    # Word r holds rows r*8 + i at bit offset 4*i (the contract's layout).
    codes = torch.arange(16).remainder(16).view(16, 1)
    words = pack(codes, 4, dim=0)
    assert words[0, 0].item() == 0x76543210
    assert words[1, 0].item() & 0xFFFFFFFF == 0xFEDCBA98


def test_pack_refuses_partial_words():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack(torch.zeros(12, 4, dtype=torch.int32), 4)


@pytest.mark.parametrize(
    "bits,group,sym", [(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32, 128) for s in (True, False)]
)
def test_gptq_tensors_dequantize_to_the_solver_output(bits, group, sym):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q = gptq_quantize(w, torch.eye(256), QuantRecipe(bits=bits, group_size=group, sym=sym))
    tensors = gptq_tensors(q, bits)
    k, n = 256, 64
    groups = 1 if group == -1 else k // group
    assert tensors["qweight"].shape == (k * bits // 32, n)
    assert tensors["scales"].shape == (groups, n) and tensors["scales"].dtype == torch.float16
    assert tensors["qzeros"].shape == (groups, n * bits // 32)
    assert torch.equal(tensors["g_idx"], (torch.arange(k) // (k if group == -1 else group)).int())
    # float16 scales: agreement to fp16 precision.
    torch.testing.assert_close(dequantize_gptq(tensors, bits), q.dequantized, rtol=2e-3, atol=2e-3)


def test_symmetric_4bit_qzeros_are_v1_sevens():
    q = gptq_quantize(torch.randn(64, 128), torch.eye(128), QuantRecipe())
    assert torch.all(gptq_tensors(q, 4)["qzeros"] == 0x77777777)
