"""`python -m quantizer evaluate`: perplexity of a checkpoint in the serving engine, and the gate.

The baseline and fake-quant perplexities normally come from the quantization pass (its result JSON),
measured on the same windows: the same text, seq_len and max_windows. What is missing is measured
here: the fake-quant reference from the checkpoint's own tensors in PyTorch (float32, g_idx read as
written), the baseline from --baseline-model with the same engine as the served number.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantizer.checkpoint import read_quantization_config
from quantizer.contract import EvaluateResult
from quantizer.errors import InputError
from quantizer.gate import GateThresholds, decide
from quantizer.perplexity import (
    EvalWindows,
    Perplexity,
    load_dequantized_model,
    load_evaluation_windows,
    torch_perplexity,
)

log = logging.getLogger(__name__)

ENGINES = ("vllm", "torch")


@dataclass
class EvaluateOptions:
    model: Path
    eval_text: Path
    seq_len: int = 2048
    max_windows: int | None = None
    stride: int | None = None
    jsonl_field: str = "text"
    baseline_ppl: float | None = None
    fakequant_ppl: float | None = None
    baseline_model: Path | None = None
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    engine: str = "vllm"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "float16"
    gpu_memory_utilization: float = 0.9


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _measure(model_dir: Path, windows: EvalWindows, opts: EvaluateOptions, engine: str) -> Perplexity:
    if engine == "torch":
        if "quantization_config" in _config(model_dir):
            model = load_dequantized_model(model_dir)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return torch_perplexity(model, windows, engine="torch")
    from quantizer.vllm_engine import served_perplexity

    measured = served_perplexity(
        model_dir,
        windows.ids.tolist(),
        score_from=windows.score_from,
        dtype=opts.dtype,
        max_model_len=opts.max_model_len,
        tensor_parallel_size=opts.tensor_parallel_size,
        gpu_memory_utilization=opts.gpu_memory_utilization,
    )
    return Perplexity(
        ppl=measured["ppl"], nll_sum=measured["nll_sum"], tokens_scored=measured["tokens_scored"],
        windows=measured["windows"], engine=f"vllm {measured.get('vllm_version', '')}".strip(),
    )


def run_evaluate(opts: EvaluateOptions) -> EvaluateResult:
    """Measure, decide, and return the verdict (contract.exit_code maps a failed gate to its code)."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    if opts.engine not in ENGINES:
        raise InputError(f"--engine {opts.engine}: use one of {', '.join(ENGINES)}")
    if not opts.model.is_dir():
        raise InputError(f"--model {opts.model}: not a directory; pass the quantized checkpoint directory")
    qconfig = read_quantization_config(opts.model)
    if opts.baseline_ppl is None and opts.baseline_model is None:
        raise InputError("no baseline: pass --baseline-ppl (from the quantize result) or --baseline-model DIR")
    if opts.baseline_model is not None and not (opts.baseline_model / "config.json").exists():
        raise InputError(f"--baseline-model {opts.baseline_model}: no config.json; pass the unquantized model directory")
    context = _config(opts.model).get("max_position_embeddings")
    if context and opts.seq_len > context:
        raise InputError(f"--seq-len {opts.seq_len} exceeds the model's context {context}; lower it")
    if opts.tensor_parallel_size < 1:
        raise InputError(f"--tensor-parallel-size {opts.tensor_parallel_size} must be at least 1")
    windows = load_evaluation_windows(
        opts.eval_text, AutoTokenizer.from_pretrained(opts.model), opts.seq_len, opts.max_windows, opts.jsonl_field,
        opts.stride,
    )

    fakequant = opts.fakequant_ppl
    if fakequant is None:
        fakequant = _measure(opts.model, windows, opts, "torch").ppl
    baseline = opts.baseline_ppl
    if baseline is None:
        baseline = _measure(opts.baseline_model, windows, opts, opts.engine).ppl
    served = _measure(opts.model, windows, opts, opts.engine)
    decision = decide(baseline, fakequant, served.ppl, opts.thresholds)
    return EvaluateResult(
        passed=decision.passed, reason=decision.reason, message=decision.message, baseline_ppl=baseline,
        fakequant_ppl=fakequant, served_ppl=served.ppl, engine=served.engine,
        details={
            "ppl_ratio": decision.ppl_ratio,
            "ppl_increase": decision.ppl_increase,
            "engine_deviation": decision.engine_deviation,
            "windows": served.windows,
            "tokens_scored": served.tokens_scored,
            "seq_len": opts.seq_len,
            "recipe": {k: qconfig.get(k) for k in ("bits", "group_size", "sym", "desc_act")},
            "thresholds": {
                "max_ppl_increase": opts.thresholds.max_ppl_increase,
                "max_ppl_ratio": opts.thresholds.effective_ratio(),
                "engine_tolerance": opts.thresholds.engine_tolerance,
            },
            "tensor_parallel_size": opts.tensor_parallel_size,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


def summary_lines(result: EvaluateResult) -> list[str]:
    verdict = "PASSED" if result.passed else f"FAILED ({result.reason})"
    details = result.details
    return [
        f"gate {verdict}: {result.message}",
        f"baseline {result.baseline_ppl:.4f} | fake-quant {result.fakequant_ppl:.4f} | "
        f"served {result.served_ppl:.4f} ({result.engine}, {details['windows']} windows x {details['seq_len']} "
        f"tokens) in {details['seconds']:.1f} s",
    ]
