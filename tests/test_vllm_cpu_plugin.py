"""The PyTorch `_C::cpu_gemm_wna16` (quantizer.vllm_cpu_plugin) against vLLM's own code, and
quantizer.vllm_engine.served_perplexity.

Weights go through vLLM 0.32's real path: `AutoGPTQConfig` -> `AutoGPTQLinearMethod.create_weights`
-> `process_weights_after_loading` (CPUWNA16's repacking) -> `apply` (the op call). Only the op at
the end is ours. The end-to-end test serves a tiny GPTQ Llama through `served_perplexity` and
compares with a float32 PyTorch model built from `dequantize_gptq` of the same tensors. Tests
marked `vllm` skip where vLLM is not importable; the rest need only torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from quantizer import vllm_cpu_plugin as plugin
from quantizer.gptq import QuantRecipe, rtn_quantize
from quantizer.packing import dequantize_gptq, gptq_tensors

BITS = 4
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(scope="session")
def vllm_cpu() -> None:
    """Skip unless vLLM imports and runs on its CPU backend (imported here, not at collection,
    so that `-m "not vllm"` does not pay for importing it)."""
    pytest.importorskip("vllm", reason="vLLM is not importable (the vllm-cpu extra)", exc_type=ImportError)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the plugin is for vLLM's CPU backend")


needs_vllm_cpu = pytest.mark.usefixtures("vllm_cpu")
# Tests that force vLLM's AVX2 library (the one without the op) in a fresh interpreter.
needs_x86 = pytest.mark.skipif(not X86, reason="vLLM's AVX2/AVX-512 library split exists on x86 only")


def _serves_with_forced_avx2_library() -> bool:
    """Whether a whole model can run on vLLM's AVX2 library here. On hosts with AVX-512 BF16 or AMX,
    vLLM prepacks unquantized weights with ops that only its AVX-512 library has
    (`_C.convert_weight_packed`), whichever library was loaded; there vLLM also has its own
    cpu_gemm_wna16 and the plugin stays inert, so there is nothing for the plugin to serve."""
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


needs_avx2_serving = pytest.mark.skipif(
    not _serves_with_forced_avx2_library(),
    reason="this host has AVX-512 BF16/AMX: vLLM runs its own cpu_gemm_wna16 and cannot serve a model on "
    "its AVX2 library (it calls _C.convert_weight_packed, which only the AVX-512 library has)",
)


# ---------------------------------------------------------------------------------------------------
# One quantized Linear, built and repacked by vLLM
# ---------------------------------------------------------------------------------------------------


def random_gptq_tensors(n: int, k: int, group_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    recipe = QuantRecipe(bits=BITS, group_size=group_size, sym=True, act_order=False)
    return gptq_tensors(rtn_quantize(weight, recipe), BITS)


@pytest.fixture
def single_rank(vllm_cpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's parameters ask for their tensor-parallel rank; a lone layer has no process group."""
    import vllm.model_executor.parameter as parameter

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    # On AMX hosts vLLM runs bf16 layers through its W4A8 kernel (int4_scaled_mm_cpu, another
    # packing) unless told not to; the layer under test is the W4A16 one, which calls cpu_gemm_wna16.
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "0")


def vllm_gptq_linear(
    tensors: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype
) -> tuple[torch.nn.Module, object]:
    """A layer holding `tensors` exactly as vLLM loads and repacks them, and its linear method."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQLinearMethod

    k = tensors["qweight"].shape[0] * 32 // BITS
    n = tensors["qweight"].shape[1]
    config = AutoGPTQConfig.from_config(
        {"quant_method": "gptq", "bits": BITS, "group_size": group_size, "desc_act": False, "sym": True}
    )
    method = AutoGPTQLinearMethod(config)
    layer = torch.nn.Module()
    # vLLM's Linear layers always have the attribute (None without a bias); its bf16 weight
    # processing on AVX-512 BF16/AMX hosts reads it.
    layer.register_parameter("bias", None)
    method.create_weights(layer, k, [n], k, n, dtype, weight_loader=None)
    for name in ("qweight", "scales", "qzeros"):
        getattr(layer, name).data.copy_(tensors[name])
    method.process_weights_after_loading(layer)
    if type(method.kernel).__name__ != "CPUWNA16LinearKernel" or getattr(layer, "use_w4a8", False):
        pytest.skip(f"vLLM chose {type(method.kernel).__name__}, which does not call cpu_gemm_wna16")
    return layer, method


SHAPES = [  # (K in, N out, group size)
    (128, 96, 32),
    (256, 64, 64),
    (384, 128, 128),
    (256, 160, -1),
    (512, 256, 128),
]


@pytest.mark.vllm
@needs_vllm_cpu
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize(("k", "n", "group_size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_matches_dequantized_reference(
    monkeypatch: pytest.MonkeyPatch, k: int, n: int, group_size: int, dtype: torch.dtype
) -> None:
    tensors = random_gptq_tensors(n, k, group_size, seed=k + n)
    layer, method = vllm_gptq_linear(tensors, group_size, dtype)
    # vLLM loads the float16 scales into the run dtype; bfloat16 rounds them.
    reference_weight = dequantize_gptq({**tensors, "scales": tensors["scales"].to(dtype)}, BITS)

    # The layout: our unpacking of vLLM's repacked tensor gives back the stored weight, bit for bit.
    ours = plugin.dequantize_cpu_wna16(layer.qweight, layer.scales, None, torch.float32)
    assert torch.equal(ours, reference_weight)

    # The whole call: vLLM's apply() -> ops.cpu_gemm_wna16 -> torch.ops._C.cpu_gemm_wna16 = ours.
    monkeypatch.setattr(torch.ops._C, plugin.OP_NAME, plugin.cpu_gemm_wna16, raising=False)
    generator = torch.Generator().manual_seed(1)
    for rows, with_bias in ((1, False), (7, True), (33, True)):
        x = torch.randn(rows, k, generator=generator).to(dtype)
        bias = torch.randn(n, generator=generator).to(dtype) if with_bias else None
        out = method.apply(layer, x, bias)
        expected = x.float() @ reference_weight.T
        if bias is not None:
            expected += bias.float()
        assert out.dtype == dtype and out.shape == (rows, n)
        # Rounding the weight and the output to a 16-bit type is all that separates them (seen:
        # 6e-4 in float16, 4e-3 in bfloat16, relative to the largest output).
        rel = 2e-3 if dtype == torch.float16 else 1.5e-2
        err = (out.float() - expected).abs().max().item()
        assert err <= rel * expected.abs().max().item(), f"max |error| {err}"

    # Three-dimensional activations are flattened by vLLM's wrapper, as for the C++ op.
    x3 = torch.randn(2, 3, k, generator=generator).to(dtype)
    assert torch.equal(
        method.apply(layer, x3, None), method.apply(layer, x3.reshape(6, k), None).reshape(2, 3, n)
    )


@pytest.mark.vllm
@needs_vllm_cpu
@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize(("k", "n", "group_size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_matches_native_op(k: int, n: int, group_size: int, dtype: torch.dtype) -> None:
    """Where vLLM's C++ op exists (AVX-512 builds), ours must give the same numbers."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's library)

    if plugin._library is not None or not plugin.op_is_registered():
        pytest.skip("vLLM's own cpu_gemm_wna16 is not available on this host")
    tensors = random_gptq_tensors(n, k, group_size, seed=k * n)
    layer, _ = vllm_gptq_linear(tensors, group_size, dtype)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(9, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    native = torch.empty(9, n, dtype=dtype)
    ours = torch.empty(9, n, dtype=dtype)
    args = (layer.scales, None, bias, plugin.PACK_FACTOR, layer.isa_hint)
    torch.ops._C.cpu_gemm_wna16(x, layer.qweight, native, *args)
    plugin.cpu_gemm_wna16(x, layer.qweight, ours, *args)
    # Only the float32 summation order differs: at most one unit in the last place of the output.
    ulp = torch.finfo(dtype).eps * native.float().abs().clamp_min(1.0)
    assert ((ours.float() - native.float()).abs() <= ulp).all()


def zero_point_case(
    k: int, n: int, groups: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-made uint4 weights with zero points in vLLM's repacked layout, built independently of
    the plugin (16-channel blocks, nibbles low first). Returns x, q_weight, scales, packed zeros
    and the float32 weight [N, K] they stand for."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.int32)
    zero_points = torch.randint(0, 16, (groups, n), generator=generator, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=generator) + 0.5).half()
    shifts = torch.arange(8) * 4

    def as_int32(words: torch.Tensor) -> torch.Tensor:
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    blocks = codes.reshape(n // 16, 2, 8, k).permute(0, 3, 1, 2)  # [N/16, K, 2, 8]
    q_weight = as_int32((blocks.to(torch.int64) << shifts).sum(-1)).reshape(n // 16, 2 * k)
    packed_zeros = as_int32((zero_points.reshape(groups, n // 8, 8).to(torch.int64) << shifts).sum(-1))
    group_of_k = torch.arange(k) // (k // groups)
    weight = (codes - zero_points.t()[:, group_of_k]).float() * scales.float().t()[:, group_of_k]
    x = torch.randn(4, k, generator=generator).half()
    return x, q_weight, scales, packed_zeros, weight


def test_op_with_zero_points_and_cache() -> None:
    """The zero-point form (uint4, what vLLM passes for AWQ-style checkpoints) and the cache."""
    x, q_weight, scales, packed_zeros, weight = zero_point_case(k=64, n=32, groups=2, seed=3)
    out = torch.empty(4, 32, dtype=torch.float16)
    plugin.cpu_gemm_wna16(x, q_weight, out, scales, packed_zeros, None, 8, "vec")
    expected = x.float() @ weight.half().float().T
    assert (out.float() - expected).abs().max() <= 2e-3 * expected.abs().max()

    # A second call reuses the cached weight; rewriting the scales in place invalidates it.
    cached = plugin._weight_cache[id(q_weight)][1]
    plugin.cpu_gemm_wna16(x, q_weight, out, scales, packed_zeros, None, 8, "vec")
    assert plugin._weight_cache[id(q_weight)][1] is cached
    scales.mul_(2)
    doubled = torch.empty_like(out)
    plugin.cpu_gemm_wna16(x, q_weight, doubled, scales, packed_zeros, None, 8, "vec")
    assert plugin._weight_cache[id(q_weight)][1] is not cached
    assert torch.allclose(doubled.float(), 2 * out.float(), rtol=2e-3, atol=1e-2)
    del q_weight  # the cache does not keep freed weights alive
    assert not any(entry[1] is cached for entry in plugin._weight_cache.values())


@pytest.mark.vllm
@needs_vllm_cpu
@pytest.mark.parametrize(("k", "n", "groups"), [(64, 32, 2), (256, 96, 4), (128, 64, 1)])
def test_op_with_zero_points_matches_native_op(k: int, n: int, groups: int) -> None:
    import vllm._custom_ops  # noqa: F401

    if plugin._library is not None or not plugin.op_is_registered():
        pytest.skip("vLLM's own cpu_gemm_wna16 is not available on this host")
    x, q_weight, scales, packed_zeros, _ = zero_point_case(k, n, groups, seed=k + groups)
    native = torch.empty(4, n, dtype=torch.float16)
    ours = torch.empty(4, n, dtype=torch.float16)
    torch.ops._C.cpu_gemm_wna16(x, q_weight, native, scales, packed_zeros, None, 8, "vec")
    plugin.cpu_gemm_wna16(x, q_weight, ours, scales, packed_zeros, None, 8, "vec")
    ulp = torch.finfo(torch.float16).eps * native.float().abs().clamp_min(1.0)
    assert ((ours.float() - native.float()).abs() <= ulp).all()


# ---------------------------------------------------------------------------------------------------
# register(): inert where the op exists, registers once where it does not
# ---------------------------------------------------------------------------------------------------


@pytest.mark.vllm
@needs_vllm_cpu
def test_register_is_idempotent_and_inert_where_the_op_exists(caplog: pytest.LogCaptureFixture) -> None:
    import vllm._custom_ops  # noqa: F401

    native = plugin._library is None and plugin.op_is_registered()
    plugin.register()
    first = plugin._library
    assert plugin.op_is_registered()
    if native:  # vLLM's C++ op is left alone
        assert first is None
    with caplog.at_level(logging.INFO, logger=plugin.LOGGER_NAME):
        plugin.register()
    assert plugin._library is first
    assert not caplog.records


@pytest.mark.vllm
@needs_vllm_cpu
def test_register_does_nothing_when_the_op_exists_or_off_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(*args: object, **kwargs: object) -> None:
        raise AssertionError("register() must not touch the dispatcher here")

    monkeypatch.setattr(plugin, "_library", None)
    monkeypatch.setattr(torch.library, "Library", no_library)
    monkeypatch.setattr(plugin, "op_is_registered", lambda: True)
    plugin.register()  # AVX-512 host: vLLM's op is there
    monkeypatch.setattr(plugin, "op_is_registered", lambda: False)
    monkeypatch.setattr(plugin, "_vllm_runs_on_cpu", lambda: False)
    plugin.register()  # GPU host
    assert plugin._library is None


FORCE_AVX2 = """
import torch
# Load vLLM's AVX2 library even on an AVX-512 host: the one without cpu_gemm_wna16.
torch.cpu._is_avx512_supported = lambda: False
"""


def run_python(script: str, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `script` in a fresh interpreter (vLLM's libraries load once per process); its last
    stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        # Outside the checkout, so the child imports the installed package, as vLLM's processes do.
        cwd=tempfile.gettempdir(),
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.vllm
@needs_vllm_cpu
@needs_x86
@pytest.mark.slow
def test_register_fills_the_missing_op_in_a_fresh_process() -> None:
    result = run_python(
        FORCE_AVX2
        + """
import json, logging
logging.basicConfig(level=logging.INFO)
import vllm._custom_ops as ops
from quantizer import vllm_cpu_plugin as plugin
missing_before = not plugin.op_is_registered()
plugin.register()
plugin.register()
x = torch.randn(3, 64).half()
q_weight = torch.randint(-2**31, 2**31 - 1, (2, 128), dtype=torch.int32)
scales = (torch.rand(2, 32) * 0.1).half()
via_vllm = ops.cpu_gemm_wna16(x, q_weight, scales, None, None, 8, "vec")
direct = torch.empty(3, 32, dtype=torch.float16)
plugin.cpu_gemm_wna16(x, q_weight, direct, scales, None, None, 8, "vec")
compiled = torch.compile(lambda t: ops.cpu_gemm_wna16(t, q_weight, scales, None, None, 8, "vec"), fullgraph=True)
print(json.dumps({"missing_before": missing_before, "registered": plugin.op_is_registered(),
                  "same": torch.equal(via_vllm, direct), "compiled_same": torch.equal(compiled(x), direct)}))
""",
        timeout=300,
    )
    assert result == {"missing_before": True, "registered": True, "same": True, "compiled_same": True}


# ---------------------------------------------------------------------------------------------------
# End to end: a tiny GPTQ Llama served by vLLM vs a float32 PyTorch reference
# ---------------------------------------------------------------------------------------------------

TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    # Larger than Llama's 0.02 so that the random model predicts something (ppl well below the
    # vocabulary size) and a wrong weight would move the perplexity visibly.
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
}
QUANT_CONFIG = {"quant_method": "gptq", "bits": BITS, "group_size": 128, "desc_act": False, "sym": True}


def write_tiny_gptq_llama(
    directory: Path, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random tiny Llama as a GPTQ checkpoint vLLM loads. Returns two float32 state dicts: the
    reference (decoder Linears replaced by `dequantize_gptq` of the stored tensors) and the
    unquantized model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.float16)
    model.save_pretrained(directory)
    for stale in directory.glob("*.safetensors*"):
        stale.unlink()

    stored: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    recipe = QuantRecipe(bits=BITS, group_size=QUANT_CONFIG["group_size"], sym=True, act_order=False)
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LLAMA_LINEARS:
            tensors = gptq_tensors(rtn_quantize(tensor.float(), recipe, name=module), BITS)
            stored.update({f"{module}.{key}": value for key, value in tensors.items()})
            reference[name] = dequantize_gptq(tensors, BITS)
        else:
            stored[name] = tensor.contiguous()
            reference[name] = tensor.float()
    save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})
    unquantized = {name: tensor.float() for name, tensor in model.state_dict().items()}

    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "quantize_config.json").write_text(json.dumps(QUANT_CONFIG, indent=2))
    return reference, unquantized


def reference_perplexity(state_dict: dict[str, torch.Tensor], windows: list[list[int]]) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).float().eval()
    model.load_state_dict(state_dict)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            tokens = torch.tensor([ids])
            logprobs = model(tokens).logits.float().log_softmax(-1)[0, :-1]
            nll -= logprobs.gather(-1, tokens[0, 1:, None]).sum().item()
            count += len(ids) - 1
    return math.exp(nll / count)


def random_windows(count: int, length: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (count, length), generator=generator).tolist()


SERVE = """
import json, os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, where the patch holds
from quantizer import vllm_cpu_plugin as plugin
from quantizer.vllm_engine import served_perplexity
request = json.loads(os.environ["KUBEQUANT_TEST_REQUEST"])
result = served_perplexity(request["model_dir"], request["windows"], dtype="float16")
result["torch_op"] = plugin._library is not None
print(json.dumps(result))
"""


@pytest.mark.vllm
@needs_vllm_cpu
@needs_x86
@needs_avx2_serving
@pytest.mark.slow
def test_served_perplexity_matches_float32_reference(tmp_path: Path) -> None:
    windows = random_windows(count=4, length=64)
    reference_state, unquantized_state = write_tiny_gptq_llama(tmp_path)
    expected = reference_perplexity(reference_state, windows)
    # The test can tell the quantized model from the original one (seen: 1.1% apart, the served
    # one within 0.01% of the reference); otherwise agreement would prove nothing.
    tolerance = 2e-3
    assert abs(reference_perplexity(unquantized_state, windows) / expected - 1) > 3 * tolerance

    request = json.dumps({"model_dir": str(tmp_path), "windows": windows})
    served = run_python(FORCE_AVX2 + SERVE, timeout=400, env={"KUBEQUANT_TEST_REQUEST": request})

    assert served["torch_op"], "vLLM did not run the GPTQ layers through the plugin's op"
    assert served["engine"] == "vllm" and served["windows"] == 4
    assert served["tokens_scored"] == 4 * 63
    assert abs(served["ppl"] / expected - 1) < tolerance, (served["ppl"], expected)


def test_served_perplexity_explains_a_missing_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantizer.vllm_engine import VLLMUnavailableError, served_perplexity

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(VLLMUnavailableError, match="needs vLLM"):
        served_perplexity("unused", [[1, 2, 3]])


@pytest.mark.parametrize(
    ("windows", "max_model_len", "message"),
    [
        ([], None, "at least one window"),
        ([[1, 2], [3]], None, "window 1 has 1"),
        ([[1, 2, 3]], 3, "too short"),
    ],
)
def test_served_perplexity_rejects_bad_requests_before_starting_vllm(
    monkeypatch: pytest.MonkeyPatch, windows: list[list[int]], max_model_len: int | None, message: str
) -> None:
    from quantizer.vllm_engine import served_perplexity

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match=message):
        served_perplexity("unused", windows, max_model_len=max_model_len)
