"""llm-compressor's GPTQ as a drop-in for quantizer.gptq.gptq_quantize, on the same W and H.

llm-compressor 0.14's GPTQModifier computes each weight's qparams with its weight observer before
GPTQ (from the original weights) and keeps them fixed through the solve:
  minmax       the default observer (min-max group scales)
  imatrix_mse  its importance-weighted grid search (llm-compressor >= 0.11): |error|^3 (its default norm)
               weighted by the per-input-channel mean of x^2 collected by a forward hook; here that
               importance is diag(H), which is 2 mean(x^2) (the observer normalizes it away)
then `quantize_weight(weights, hessians, scale, zero_point, ...)` with static act-order.

llm-compressor needs only its own package, compressed-tensors and a few pure-Python modules for
these two calls; benchmarks put them on PYTHONPATH (pip install --no-deps --target DIR ...).
"""

from __future__ import annotations

from typing import Any

import torch

from quantizer.gptq import QuantizedWeight, QuantRecipe

OBSERVERS = ("minmax", "imatrix_mse")


def available() -> str | None:
    """None when llm-compressor imports, else why not."""
    try:
        import llmcompressor  # noqa: F401
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: F401
        from llmcompressor.observers.imatrix import IMatrixMSEObserver  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"llm-compressor not importable ({type(exc).__name__}: {exc})"
    return None


def version() -> str:
    import compressed_tensors
    import llmcompressor

    return f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}"


def quantization_args(recipe: QuantRecipe, observer: str) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    args: dict[str, Any] = {"num_bits": recipe.bits, "type": "int", "symmetric": recipe.sym}
    if recipe.group_size == -1:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=recipe.group_size)
    if recipe.act_order:
        args["actorder"] = "static"
    if observer == "imatrix_mse":
        args["observer"] = "imatrix_mse"
    return QuantizationArgs(**args)


def observer_qparams(weight: torch.Tensor, hessian: torch.Tensor, qargs: Any, observer: str):
    """Scale and zero point [rows, groups] as llm-compressor's weight observer computes them."""
    if observer == "imatrix_mse":
        from llmcompressor.observers.imatrix import IMatrixMSEObserver

        obs = IMatrixMSEObserver("weight", qargs)
        # What its forward hook would have summed: mean(x^2) per input channel (diag(H) / 2).
        obs._imatrix_sum = torch.diag(hessian).float() / 2
        obs._imatrix_count = torch.tensor(1, device=hessian.device)
        obs(weight)
        qparams = obs.get_qparams()
        return qparams["scale"], qparams["zero_point"]
    from compressed_tensors.quantization.utils import calculate_qparams

    rows, cols = weight.shape
    group = cols if qargs.group_size is None else qargs.group_size
    grouped = weight.reshape(rows, cols // group, group)
    return calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), qargs)


def llmcompressor_gptq(observer: str):
    """A MatrixQuantizer (quantizer.pipeline) running llm-compressor's observer and GPTQ."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer {observer!r}: use one of {OBSERVERS}")

    def quantize(weight: torch.Tensor, hessian: torch.Tensor, recipe: QuantRecipe, name: str = "",
                 block_solver: Any = None) -> QuantizedWeight:  # fmt: skip
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

        qargs = quantization_args(recipe, observer)
        W = weight.to(hessian.device, torch.float32)
        scale, zero_point = observer_qparams(W, hessian, qargs, observer)
        # quantize_weight overwrites its inputs: hand it copies, as its modifier does.
        wq, *_ = quantize_weight(
            W.unsqueeze(0).clone(), hessian.unsqueeze(0).clone(), scale.unsqueeze(0), zero_point.unsqueeze(0),
            None, qargs, blocksize=recipe.block_size, percdamp=recipe.damp,
        )  # fmt: skip
        dequantized = wq[0].float()
        rows, cols = W.shape
        scale = scale.reshape(rows, -1).float()
        zero = (zero_point.reshape(rows, -1).float() + 2 ** (recipe.bits - 1)) if recipe.sym else zero_point.float()
        group = cols // scale.shape[1]
        g_idx = torch.arange(cols, device=W.device) // group
        codes = torch.clamp(torch.round(dequantized / scale[:, g_idx]) + zero[:, g_idx], 0, recipe.maxq)
        # No error metric inside the timed call (it costs two [out, in] x [in, in] matmuls): the
        # benches measure every path's error the same way, outside their timing.
        return QuantizedWeight(
            codes=codes.to(torch.int32), scales=scale, zeros=zero, dequantized=dequantized, group_size=group,
            damp=recipe.damp, relative_error=float("nan"),
        )  # fmt: skip

    return quantize
