"""`python -m quantizer quantize`: model directory in, vLLM-servable GPTQ checkpoint out."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantizer import __version__
from quantizer.calibration import Calibration, clamp_seq_len, is_token_file, load_calibration
from quantizer.checkpoint import MANIFEST_FILE, CheckpointWriter, sha256_file
from quantizer.contract import (
    COMPRESSED_TENSORS_FORMAT,
    DEFAULT_EXPERT_CALIBRATION,
    DEFAULT_FORMAT,
    QuantizeResult,
    mixed_group_sizes,
)
from quantizer.errors import InputError, UnservableRecipeError
from quantizer.families import is_row_parallel, linear_kind
from quantizer.formats import MIXED_NEEDS_COMPRESSED_TENSORS
from quantizer.gptq import QuantRecipe
from quantizer.mixed import MixedPrecision, Plan, choose, linear_bytes, scheme_units
from quantizer.perplexity import EvalWindows, load_evaluation_windows
from quantizer.pipeline import (
    PipelineResult,
    Resumed,
    SourceModel,
    check_linear_shapes,
    decoder_linears,
    peak_host_bytes,
    quantize_model,
)
from quantizer.sensitivity import error_gains, solo_gains

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
    format: str = DEFAULT_FORMAT  # the checkpoint's layout (quantizer/formats.py)
    expert_calibration: str = DEFAULT_EXPERT_CALIBRATION  # mixture-of-experts models (quantizer/experts.py)
    eval_text: Path | None = None
    eval_seq_len: int | None = None
    eval_max_windows: int | None = None
    eval_stride: int | None = None
    batch_size: int = 1
    offload_activations: bool = False
    source_repo: str | None = None
    source_revision: str | None = None
    progress: bool = True
    mixed: MixedPrecision | None = None  # the units that matter most at a finer setting (quantizer/mixed.py)


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


@dataclass
class QuantizeReport:
    """Everything one quantization measured: the manifest and the result are two views of it."""

    opts: QuantizeOptions
    unservable: list[str]
    calibration: Calibration
    pipeline: PipelineResult
    device: str
    size_before_bytes: int
    size_after_bytes: int
    seconds: float
    peak_host_bytes: int  # sampled after the checkpoint was written and verified
    plan: Plan | None = None

    def _row_parallel_in_features(self, experts: bool) -> list[int]:
        return sorted({s.shape[1] for s in self.pipeline.linears
                       if is_row_parallel(s.name) and ("*" in linear_kind(s.name)) == experts})

    def _perplexity(self) -> dict:
        p = self.pipeline
        if p.baseline_ppl is None:
            return {}
        return {"baseline_ppl": p.baseline_ppl, "fakequant_ppl": p.fakequant_ppl, "fakequant_kl": p.fakequant_kl,
                "fakequant_top1": p.fakequant_top1, "eval_windows": p.eval_windows, "eval_tokens": p.eval_tokens}

    def manifest(self) -> dict:
        opts, p = self.opts, self.pipeline
        row_parallel: dict[str, set[tuple[int, int]]] = {}
        for s in p.linears:
            if is_row_parallel(s.name):
                row_parallel.setdefault(linear_kind(s.name), set()).add(tuple(s.shape))
        return {
            "kind": "kubequant.io/checkpoint",
            "version": 1,
            "source": {"path": str(opts.model), "repo": opts.source_repo, "revision": opts.source_revision},
            "method": opts.method,
            "format": opts.format,
            "resumed_layers": p.resumed_layers,  # finished by a run that was stopped, not quantized again
            "recipe": opts.recipe.to_dict(),
            "unservable": self.unservable,
            "calibration": self.calibration.describe() | {"seed": opts.seed},
            "versions": library_versions(),
            "device": self.device,
            "solver": p.solver,
            "size_before_bytes": self.size_before_bytes,
            "size_after_bytes": self.size_after_bytes,
            "row_parallel_shapes": {k: [list(s) for s in sorted(v)] for k, v in row_parallel.items()},
            "group_size": opts.recipe.group_size,
            "timings": {
                "total_seconds": self.seconds,
                "stages": self.stage_seconds(),
                "layers": [round(s, 3) for s in p.layer_seconds],
            },
            "peak_memory": {"host_bytes": self.peak_host_bytes, "device_bytes": p.peak_device_bytes},
            "perplexity": self._perplexity(),
            "mixed_precision": self.plan.to_dict() if self.plan is not None else None,
            # Per mixture-of-experts block, the calibration tokens its router sent to each expert.
            "experts": {"calibration": p.expert_calibration, "routed_tokens": p.expert_tokens} if p.expert_tokens else None,
            "linears": [
                {"name": s.name, "shape": list(s.shape), "relative_error": s.relative_error, "damp": s.damp,
                 "seconds": round(s.seconds, 4)}
                for s in p.linears
            ],
        }

    def _experts_summary(self) -> dict:
        tokens = [n for counts in self.pipeline.expert_tokens.values() for n in counts]
        if not tokens:
            return {}
        return {"experts": {"calibration": self.pipeline.expert_calibration, "count": len(tokens),
                            "fewest_routed_tokens": min(tokens), "unrouted": sum(1 for n in tokens if n == 0)}}

    def stage_seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.pipeline.stage_seconds.items()}

    def result(self, manifest_sha256: str) -> QuantizeResult:
        p = self.pipeline
        perplexity = self._perplexity()
        worst = max(p.linears, key=lambda s: s.relative_error)
        errors = [s.relative_error for s in p.linears]
        return QuantizeResult(
            output=str(self.opts.output),
            recipe=self.opts.recipe.to_dict(),
            size_before_bytes=self.size_before_bytes,
            size_after_bytes=self.size_after_bytes,
            seconds=self.seconds,
            group_size=self.opts.recipe.group_size,
            row_parallel_in_features=self._row_parallel_in_features(experts=False),
            expert_in_features=self._row_parallel_in_features(experts=True) or None,
            group_sizes=mixed_group_sizes(self.opts.recipe.group_size, self.plan and self.plan.summary()),
            decoder_layers=len(self.pipeline.layer_seconds),
            baseline_ppl=perplexity.get("baseline_ppl"),
            fakequant_ppl=perplexity.get("fakequant_ppl"),
            fakequant_kl=perplexity.get("fakequant_kl"),
            fakequant_top1=perplexity.get("fakequant_top1"),
            details={
                "method": self.opts.method,
                "format": self.opts.format,
                "servable": not self.unservable,
                "solver": p.solver,
                "device": self.device,
                "calibration": {"samples": self.calibration.samples, "seq_len": self.calibration.seq_len,
                                "digest": self.calibration.digest},
                "quantized_linears": len(p.linears),
                **self._experts_summary(),
                **({"mixed_precision": self.plan.summary()} if self.plan is not None else {}),
                "mean_relative_error": sum(errors) / len(errors),
                "worst_linear": {"name": worst.name, "relative_error": worst.relative_error},
                **{k: v for k, v in perplexity.items() if k.startswith("eval_")},
                "stage_seconds": self.stage_seconds(),
                "peak_host_bytes": self.peak_host_bytes,
                "peak_device_bytes": p.peak_device_bytes,
                "manifest": MANIFEST_FILE,
                "manifest_sha256": manifest_sha256,
            },
        )


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def limit_heap_retention() -> None:
    """Keep freed memory out of the resident set. glibc keeps freed blocks in per-thread arenas and
    raises its mmap threshold as large blocks are freed, so the hundreds of matrix-sized temporaries of
    a mixture-of-experts layer's solves stayed resident: on Qwen3-30B-A3B shapes (CPU, GPTQ) the peak
    was 10.5 GiB at 1 layer and 16.6 GiB at 3. With blocks of 4 MiB and more mapped on their own
    (returned when freed) and two arenas it is 10.6 GiB at 3 layers (docs/benchmarks.md). A no-op
    where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 2)
        mallopt(_M_MMAP_THRESHOLD, 4 << 20)


def run_quantize(opts: QuantizeOptions) -> QuantizeResult:
    """Quantize, write the checkpoint atomically, return the machine-readable result."""
    started = time.perf_counter()
    limit_heap_retention()
    recipe = opts.recipe
    recipe.validate()
    unservable = recipe.unservable_reasons()
    if opts.method not in ("gptq", "rtn"):
        raise InputError(f"--method {opts.method}: use gptq or rtn")
    finer = None
    if opts.mixed is not None:
        opts.mixed.validate(recipe)
        if opts.format != COMPRESSED_TENSORS_FORMAT:
            raise InputError(MIXED_NEEDS_COMPRESSED_TENSORS)
        if opts.method != "gptq":
            raise InputError("--mixed-finer: the sensitivity is measured by GPTQ's solves; use --method gptq")
        finer = opts.mixed.finer_recipe(recipe)
        unservable += [f"--mixed-finer {opts.mixed.finer}: {r}" for r in (finer.unservable_reasons() if finer else [])]
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
    source = SourceModel.open(opts.model)
    if source.family.experts is not None and opts.format != COMPRESSED_TENSORS_FORMAT:
        raise InputError(
            f"--format {opts.format}: {source.config.architectures[0]} is a mixture of experts, whose checkpoints "
            f"are written in {COMPRESSED_TENSORS_FORMAT} only (vLLM 0.32 misreads symmetric GPTQ zero points in "
            f"its non-Marlin MoE path and cannot load Qwen3-MoE's dense layers from the GPTQ layout); use "
            f"--format {COMPRESSED_TENSORS_FORMAT}"
        )
    check_linear_shapes(source.config, source.weights, recipe.group_size)
    if finer is not None:
        check_linear_shapes(source.config, source.weights, finer.group_size)
    # Pre-tokenized calibration without evaluation text needs no tokenizer (synthetic models have none).
    needs_tokenizer = opts.eval_text is not None or not is_token_file(opts.calibration)
    tokenizer = source.tokenizer() if needs_tokenizer else None
    context = getattr(source.config, "max_position_embeddings", None)
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

    uniform_bytes = expected_checkpoint_bytes(source, recipe)
    _check_free_space(opts.output, uniform_bytes * (1 + (opts.mixed.budget_percent / 100 if opts.mixed else 0)))
    plan = None
    if opts.mixed is not None:
        plan = _plan(opts, source, recipe, finer, calibration, device, uniform_bytes)
        log.info("mixed precision: %d of %d units at %s, %s of the %s budget", len(plan.finer_units),
                 len(plan.scores), opts.mixed.finer, _size(plan.extra_bytes), _size(plan.budget_bytes))
    with CheckpointWriter(opts.output, recipe, overwrite=opts.overwrite, format_name=opts.format,
                          resume_key=resume_key(opts, source, calibration, device, plan), plan=plan) as writer:
        resumed = None
        if writer.resumed:
            resumed = Resumed(layers=len(writer.resumed), weights=writer.stored_layer,
                              stats=lambda index: writer.resumed[index]["linears"])
        pipeline = quantize_model(
            source,
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
            resumed=resumed,
            expert_calibration=opts.expert_calibration,
            recipe_for=plan.recipe_for if plan is not None else None,
        )
        # Embeddings, final norm and lm_head stay in the source dtype, copied as they are.
        layers_prefix = _layers_prefix(writer.quantized_shapes)
        for name in source.weights.names():
            if not name.startswith(layers_prefix):
                writer.add(name, source.weights.get(name))
        size_after = writer.finish(opts.model, __version__, allow_unservable=bool(unservable))
        report = QuantizeReport(
            opts=opts, unservable=unservable, calibration=calibration, pipeline=pipeline,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            size_before_bytes=source.weights.size_bytes(), size_after_bytes=size_after,
            seconds=round(time.perf_counter() - started, 2),
            peak_host_bytes=max(pipeline.peak_host_bytes, peak_host_bytes()), plan=plan,
        )
        writer.commit(report.manifest())
    return report.result(sha256_file(opts.output / MANIFEST_FILE))


def _plan(opts: QuantizeOptions, source: SourceModel, recipe: QuantRecipe, finer: QuantRecipe | None,
          calibration: Calibration, device: torch.device, uniform_bytes: int) -> Plan:
    """Mixed precision's plan: the sensitivity measured (quantizer/sensitivity.py), the units chosen."""
    started = time.perf_counter()

    def units(names: list[str]):
        return scheme_units(source.family, names)

    common = {"batch_size": opts.batch_size, "offload_activations": opts.offload_activations,
              "progress": opts.progress, "solver": opts.solver}
    if opts.mixed.sensitivity == "solo":
        # Scored on calibration windows its Hessians do not see, never on the evaluation text: the gate
        # measures there, and a plan chosen on it would pass the gate more easily than it deserves.
        windows = calibration.windows
        held = max(1, len(windows) // 8) if len(windows) > 1 else 0
        fit, scored = (windows[:-held], windows[-held:]) if held else (windows, windows)
        gains = solo_gains(source, recipe, finer, units, fit, EvalWindows(scored, [1] * len(scored)), device,
                           **common)
    else:
        gains = error_gains(source, recipe, finer, units, calibration.windows, device,
                            expert_calibration=opts.expert_calibration, **common)
    shapes = decoder_linears(source)
    plan = choose(opts.mixed, recipe, units(list(shapes)), shapes, gains, uniform_bytes,
                  source_bytes=_source_bytes_per_value(source))
    plan.seconds = time.perf_counter() - started
    return plan


def resume_key(opts: QuantizeOptions, source: SourceModel, calibration: Calibration, device: torch.device,
               plan: Plan | None = None) -> str:
    """What a run's output depends on, bit for bit: a partial output made with the same key is resumed.
    The source is named by its files' names and sizes (hashing a 70B model's weights would take longer
    than resuming saves); the libraries by their versions; the device by its type; mixed precision by
    the units its sensitivity pass chose (a pass that chose others starts afresh)."""
    files = sorted({(f.name, f.stat().st_size) for f in source.weights.file_of.values()})
    key = {"source": files, "config": source.config.to_dict(), "recipe": opts.recipe.to_dict(),
           "method": opts.method, "format": opts.format, "calibration": calibration.digest, "seed": opts.seed,
           "solver": opts.solver, "expert_calibration": opts.expert_calibration, "device": device.type, "batch_size": opts.batch_size, "versions": library_versions(),
           **(plan.key() if plan is not None else {})}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def expected_checkpoint_bytes(source: SourceModel, recipe: QuantRecipe) -> int:
    """About what the checkpoint takes: each decoder Linear's codes and 16-bit scales, the rest as it is
    in the source (from the safetensors headers; nothing is read)."""
    bytes_per_value = _source_bytes_per_value(source)
    total = 0.0
    for name in source.weights.names():
        shape = source.weights.shape(name)
        if len(shape) == 2 and name.endswith(".weight") and any(p.isdigit() for p in name.split(".")):
            total += linear_bytes(shape, recipe)
        else:
            total += math.prod(shape) * bytes_per_value
    return int(total)


def _source_bytes_per_value(source: SourceModel) -> float:
    values = sum(math.prod(source.weights.shape(name)) for name in source.weights.names())
    return source.weights.size_bytes() / (values or 1)


def _check_free_space(output: Path, needed: int) -> None:
    """Refuse before any work when the output's volume cannot hold the checkpoint (with 5% to spare)."""
    volume = next(p for p in (output, *output.parents) if p.exists())
    free = shutil.disk_usage(volume).free
    if free < needed * 1.05:
        raise InputError(f"--output {output}: its volume has {_size(free)} free and the checkpoint needs about "
                         f"{_size(needed)}; free space or write to a larger volume")


def _size(count: float) -> str:
    if count < 2**20:
        return f"{count / 2**10:.1f} KiB"
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _layers_prefix(quantized_shapes: dict[str, list[int]]) -> str:
    """'model.layers.' from names such as 'model.layers.0.self_attn.q_proj'."""
    any_name = next(iter(quantized_shapes))
    parts = any_name.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[:index]) + "."


def summary_lines(quantized: QuantizeResult) -> list[str]:
    result = quantized.to_dict()
    mb = 1 / 2**20
    lines = [
        f"quantized {result['quantized_linears']} linears -> {result['output']} "
        f"({result['method']}, {result['recipe']['bits']}-bit, group {result['recipe']['group_size']}, "
        f"act-order {'static' if result['recipe']['act_order'] else 'off'}, solver {result['solver']}, "
        f"{result['format']} format)",
        f"size {result['size_before_bytes'] * mb:.1f} MiB -> {result['size_after_bytes'] * mb:.1f} MiB "
        f"({result['size_before_bytes'] / result['size_after_bytes']:.2f}x smaller)",
        f"relative output error: mean {result['mean_relative_error']:.3e}, worst {result['worst_linear']['relative_error']:.3e} "
        f"({result['worst_linear']['name']})",
    ]
    if quantized.baseline_ppl is not None:
        lines.append(
            f"perplexity on {result['eval_tokens']} tokens: baseline {result['baseline_ppl']:.3f} -> "
            f"quantized {result['fakequant_ppl']:.3f} ({result['fakequant_ppl'] / result['baseline_ppl']:.4f}x); "
            f"KL to the source {result['fakequant_kl']:.4f} nats/token, top-1 agreement {result['fakequant_top1']:.2%}"
        )
    lines.append(
        f"took {result['seconds']:.1f} s; peak host memory {result['peak_host_bytes'] * mb:.0f} MiB"
        + (f", peak device memory {result['peak_device_bytes'] * mb:.0f} MiB" if result["peak_device_bytes"] else "")
    )
    if not result["servable"]:
        lines.append("WARNING: vLLM cannot serve this checkpoint (made with --allow-unservable)")
    return lines
