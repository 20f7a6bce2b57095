"""`python -m quantizer quantize`: model directory in, vLLM-servable GPTQ checkpoint out."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantizer import __version__
from quantizer.calibration import clamp_seq_len, load_calibration
from quantizer.checkpoint import MANIFEST_FILE, CheckpointWriter, sha256_file
from quantizer.errors import InputError, UnservableRecipeError
from quantizer.gptq import QuantRecipe
from quantizer.perplexity import load_evaluation_windows
from quantizer.pipeline import (
    ROW_PARALLEL,
    SafetensorsCheckpoint,
    check_linear_shapes,
    load_config,
    quantize_model,
)

log = logging.getLogger(__name__)


@dataclass
class QuantizeOptions:
    model: Path
    output: Path
    calibration: Path
    recipe: QuantRecipe
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    jsonl_field: str = "text"
    device: str = "auto"
    method: str = "gptq"
    solver: str = "auto"
    allow_unservable: bool = False
    overwrite: bool = False
    eval_text: Path | None = None
    eval_seq_len: int | None = None
    eval_max_windows: int | None = None
    eval_stride: int | None = None
    batch_size: int = 1
    offload_activations: bool = False
    source_repo: str | None = None
    source_revision: str | None = None
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def library_versions() -> dict:
    import safetensors
    import transformers

    versions = {
        "kubequant": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def run_quantize(opts: QuantizeOptions) -> dict:
    """Quantize, write the checkpoint atomically, return the machine-readable result."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    recipe = opts.recipe
    recipe.validate()
    unservable = recipe.unservable_reasons()
    if opts.method not in ("gptq", "rtn"):
        raise InputError(f"--method {opts.method}: use gptq or rtn")
    if unservable and not opts.allow_unservable:
        raise UnservableRecipeError(
            "vLLM 0.32 cannot serve this recipe: " + "; ".join(unservable)
            + ". Use 4-bit symmetric with group -1/32/64/128, or pass --allow-unservable for experiments"
        )
    if opts.output.exists() and not opts.overwrite:
        raise InputError(
            f"--output {opts.output} already exists; choose a new directory, remove it, or pass --overwrite"
        )
    device = resolve_device(opts.device)
    config = load_config(opts.model)
    source = SafetensorsCheckpoint(opts.model)
    check_linear_shapes(config, source, recipe.group_size)
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    context = getattr(config, "max_position_embeddings", None)
    seq_len = clamp_seq_len(opts.seq_len, context, "calibration")
    calibration = load_calibration(opts.calibration, tokenizer, opts.samples, seq_len, opts.seed, opts.jsonl_field)
    eval_windows = None
    if opts.eval_text is not None:
        eval_seq_len = opts.eval_seq_len or seq_len
        if context and eval_seq_len > context:
            raise InputError(f"--eval-seq-len {eval_seq_len} exceeds the model's context {context}; lower it")
        eval_windows = load_evaluation_windows(
            opts.eval_text, tokenizer, eval_seq_len, opts.eval_max_windows, opts.jsonl_field, opts.eval_stride
        )

    with CheckpointWriter(opts.output, recipe, overwrite=opts.overwrite) as writer:
        pipeline = quantize_model(
            opts.model,
            recipe,
            calibration.windows,
            writer.add_layer,
            device,
            eval_windows=eval_windows,
            method=opts.method,
            batch_size=opts.batch_size,
            offload_activations=opts.offload_activations,
            progress=opts.progress,
            solver=opts.solver,
        )
        # Embeddings, final norm and lm_head stay in the source dtype, copied as they are.
        layers_prefix = _layers_prefix(writer.quantized_shapes)
        for name in source.names():
            if not name.startswith(layers_prefix):
                writer.add(name, source.get(name))
        errors = [s.relative_error for s in pipeline.linears]
        worst = max(pipeline.linears, key=lambda s: s.relative_error)
        row_parallel = {
            suffix: sorted({tuple(s.shape) for s in pipeline.linears if s.name.endswith(suffix)})
            for suffix in ROW_PARALLEL
        }
        manifest = {
            "kind": "kubequant.io/checkpoint",
            "version": 1,
            "source": {"path": str(opts.model), "repo": opts.source_repo, "revision": opts.source_revision},
            "method": opts.method,
            "recipe": recipe.to_dict(),
            "unservable": unservable if opts.allow_unservable and unservable else [],
            "calibration": calibration.describe() | {"seed": opts.seed},
            "versions": library_versions(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "solver": pipeline.solver,
            "size_before_bytes": source.size_bytes(),
            "row_parallel_shapes": {k: [list(s) for s in v] for k, v in row_parallel.items()},
            "group_size": recipe.group_size,
            "timings": {
                "total_seconds": round(time.perf_counter() - started, 3),
                "stages": {k: round(v, 3) for k, v in pipeline.stage_seconds.items()},
                "layers": [round(s, 3) for s in pipeline.layer_seconds],
            },
            "peak_memory": {"host_bytes": pipeline.peak_host_bytes, "device_bytes": pipeline.peak_device_bytes},
            "perplexity": _perplexity_block(pipeline),
            "linears": [
                {"name": s.name, "shape": list(s.shape), "relative_error": s.relative_error, "damp": s.damp,
                 "seconds": round(s.seconds, 4)}
                for s in pipeline.linears
            ],
        }
        manifest = writer.commit(opts.model, manifest, __version__)

    return {
        "status": "Succeeded",
        "output": str(opts.output),
        "method": opts.method,
        "recipe": recipe.to_dict(),
        "servable": not unservable,
        "solver": pipeline.solver,
        "device": manifest["device"],
        "calibration": {"samples": calibration.samples, "seq_len": calibration.seq_len, "digest": calibration.digest},
        "size_before_bytes": manifest["size_before_bytes"],
        "size_after_bytes": manifest["size_after_bytes"],
        "quantized_linears": len(pipeline.linears),
        "group_size": recipe.group_size,
        # What the operator's tensor-parallel preflight needs, without reading the artifact volume.
        "row_parallel_in_features": sorted({s.shape[1] for s in pipeline.linears if s.name.endswith(ROW_PARALLEL)}),
        "mean_relative_error": sum(errors) / len(errors),
        "worst_linear": {"name": worst.name, "relative_error": worst.relative_error},
        **_perplexity_block(pipeline),
        "seconds": round(time.perf_counter() - started, 2),
        "stage_seconds": manifest["timings"]["stages"],
        "peak_host_bytes": pipeline.peak_host_bytes,
        "peak_device_bytes": pipeline.peak_device_bytes,
        "manifest": MANIFEST_FILE,
        "manifest_sha256": sha256_file(opts.output / MANIFEST_FILE),
    }


def _layers_prefix(quantized_shapes: dict[str, list[int]]) -> str:
    """'model.layers.' from names such as 'model.layers.0.self_attn.q_proj'."""
    any_name = next(iter(quantized_shapes))
    parts = any_name.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[:index]) + "."


def _perplexity_block(pipeline) -> dict:
    if pipeline.baseline_ppl is None:
        return {}
    return {
        "baseline_ppl": pipeline.baseline_ppl,
        "fakequant_ppl": pipeline.fakequant_ppl,
        "eval_windows": pipeline.eval_windows,
        "eval_tokens": pipeline.eval_tokens,
    }


def summary_lines(result: dict) -> list[str]:
    mb = 1 / 2**20
    lines = [
        f"quantized {result['quantized_linears']} linears -> {result['output']} "
        f"({result['method']}, {result['recipe']['bits']}-bit, group {result['recipe']['group_size']}, "
        f"act-order {'static' if result['recipe']['act_order'] else 'off'}, solver {result['solver']})",
        f"size {result['size_before_bytes'] * mb:.1f} MiB -> {result['size_after_bytes'] * mb:.1f} MiB "
        f"({result['size_before_bytes'] / result['size_after_bytes']:.2f}x smaller)",
        f"relative output error: mean {result['mean_relative_error']:.3e}, worst {result['worst_linear']['relative_error']:.3e} "
        f"({result['worst_linear']['name']})",
    ]
    if "baseline_ppl" in result:
        lines.append(
            f"perplexity on {result['eval_tokens']} tokens: baseline {result['baseline_ppl']:.3f} -> "
            f"quantized {result['fakequant_ppl']:.3f} ({result['fakequant_ppl'] / result['baseline_ppl']:.4f}x)"
        )
    lines.append(
        f"took {result['seconds']:.1f} s; peak host memory {result['peak_host_bytes'] * mb:.0f} MiB"
        + (f", peak device memory {result['peak_device_bytes'] * mb:.0f} MiB" if result["peak_device_bytes"] else "")
    )
    if not result["servable"]:
        lines.append("WARNING: vLLM cannot serve this checkpoint (made with --allow-unservable)")
    return lines
