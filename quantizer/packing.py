"""GPTQ tensor packing in the layout vLLM 0.32 loads (docs/development.md, "The checkpoint contract").

Codes are a little-endian bit stream along the packed dimension, in int32 words: for 2/4/8 bits the
word r holds codes r*(32/bits) + i at bit offset bits*i (low bits first); for 3 bits the same stream
crosses word boundaries, as AutoGPTQ writes it. Everything is vectorized: no Python loop over
elements.
"""

from __future__ import annotations

import torch

from quantizer.gptq import QuantizedWeight

WORD_BITS = 32


def _bit_positions(length: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(length, device=device, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack non-negative codes (< 2^bits) along `dim` of a 2-D tensor into int32 words."""
    if dim == 1:
        return pack(codes.t(), bits, dim=0).t().contiguous()
    length = codes.shape[0]
    if (length * bits) % WORD_BITS:
        raise ValueError(f"cannot pack {length} {bits}-bit codes into whole 32-bit words")
    values = codes.to(torch.int64) & (2**bits - 1)
    word, offset = _bit_positions(length, bits, codes.device)
    n_words = length * bits // WORD_BITS
    words = torch.zeros((n_words + 1, *codes.shape[1:]), dtype=torch.int64, device=codes.device)
    # Bits never overlap, so adding is the same as OR-ing.
    words.index_add_(0, word, (values << offset.unsqueeze(1)) & 0xFFFFFFFF)
    spill = offset + bits > WORD_BITS
    if spill.any():
        words.index_add_(0, word[spill] + 1, values[spill] >> (WORD_BITS - offset[spill]).unsqueeze(1))
    return _to_int32(words[:n_words])


def unpack(words: torch.Tensor, bits: int, length: int, dim: int = 0) -> torch.Tensor:
    """Inverse of pack: `length` codes along `dim`, as int32."""
    if dim == 1:
        return unpack(words.t(), bits, length, dim=0).t().contiguous()
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    unsigned = torch.cat([unsigned, torch.zeros_like(unsigned[:1])])
    word, offset = _bit_positions(length, bits, words.device)
    low = unsigned[word] >> offset.unsqueeze(1)
    high = unsigned[word + 1] << (WORD_BITS - offset).unsqueeze(1)
    spill = (offset + bits > WORD_BITS).unsqueeze(1)
    values = torch.where(spill, low | high, low)
    return (values & (2**bits - 1)).to(torch.int32)


def gptq_tensors(qw: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    """The four tensors of one quantized Linear, on the CPU, in vLLM's layout.

    qweight [K * bits / 32, N] int32 packed along K; scales [K/G, N] float16; qzeros [K/G, N*bits/32]
    int32 packed along N in the v1 convention (stored zero = zero - 1); g_idx [K] int32 = arange(K)//G.
    """
    # Packed where the codes are (the GPU when there is one: int64 bit work on the CPU is slow),
    # then moved to the host for writing.
    codes = qw.codes.t().contiguous()  # [K, N]
    zeros = qw.zeros.t().round().to(torch.int64) - 1  # v1: stored zero = true zero - 1
    tensors = {
        "qweight": pack(codes, bits, dim=0),
        "scales": qw.scales.t().contiguous().to(torch.float16),
        "qzeros": pack(zeros & (2**bits - 1), bits, dim=1),
        "g_idx": qw.g_idx.to(torch.int32),
    }
    return {name: tensor.cpu() for name, tensor in tensors.items()}


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Weight [N, K] float32 from the stored tensors, reading the groups from g_idx as written."""
    qweight, scales, qzeros, g_idx = (tensors[k] for k in ("qweight", "scales", "qzeros", "g_idx"))
    k = qweight.shape[0] * WORD_BITS // bits
    n = qweight.shape[1]
    codes = unpack(qweight, bits, k, dim=0).float()  # [K, N]
    zeros = (unpack(qzeros, bits, n, dim=1).float() + 1)  # v1 convention
    g = g_idx.long()
    weight = scales.float()[g] * (codes - zeros[g])
    return weight.t().contiguous()
