"""`python -m quantizer evaluate`: perplexity of a checkpoint in the serving engine, and the gate.

The baseline and fake-quant perplexities normally come from the quantization pass (its result JSON),
measured on the same windows: the same text, seq_len and max_windows. What is missing is measured
here: the fake-quant reference from the checkpoint's own tensors in PyTorch (float32, g_idx read as
written), the baseline from --baseline-model with the same engine as the served number.

With --baseline-model the unquantized model is served by the same engine with the same settings, on
the same windows and prompts: its perplexity is then the baseline of the regression check, and the
two models' next-token distributions and greedy completions are compared (quantizer/agreement.py),
and with --tasks both are scored on lm-evaluation-harness tasks (quantizer/tasks.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantizer import source_scores
from quantizer.agreement import distribution_agreement, generation_agreement
from quantizer.checkpoint import read_quantization_config
from quantizer.contract import EvaluateResult
from quantizer.errors import InputError
from quantizer.formats import format_of
from quantizer.gate import GateThresholds, decide
from quantizer.perplexity import (
    EngineScores,
    EvalWindows,
    Perplexity,
    load_dequantized_model,
    load_evaluation_windows,
    load_prompts,
    torch_scores,
)
from quantizer.tasks import compare_tasks, load_tasks, score_tasks, torch_harness_model

log = logging.getLogger(__name__)

ENGINES = ("vllm", "torch")
# Each task is a row of the result, which the operator reads from a 4 KiB termination message.
MAX_TASKS = 8


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
    dtype: str = "auto"  # vLLM's: the checkpoint's own dtype, as `vllm serve` runs it
    gpu_memory_utilization: float = 0.9
    top_logprobs: int = 20  # per token, for the KL divergence against --baseline-model
    generation_prompts: Path | None = None
    max_new_tokens: int = 32
    throughput_batches: tuple[int, ...] = ()
    throughput_tokens: int = 64
    tasks: tuple[Path, ...] = ()  # lm-evaluation-harness task YAMLs, or directories of them
    task_limit: int | None = None  # documents per task (all when None)
    source_scores: Path | None = None  # a folder keeping the source model's scores (quantizer/source_scores.py)


@dataclass
class _Request:
    """What to ask an engine besides the perplexity: top-k log-probabilities, completions."""

    top_k: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    max_new_tokens: int = 0
    throughput_batches: tuple[int, ...] = ()
    throughput_tokens: int = 0
    tasks: list[dict] = field(default_factory=list)  # lm-evaluation-harness task configs
    task_limit: int | None = None


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _torch_model(model_dir: Path) -> torch.nn.Module:
    """The model in float32 PyTorch; a checkpoint dequantized from its own tensors."""
    if "quantization_config" in _config(model_dir):
        return load_dequantized_model(model_dir)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _measure(model_dir: Path, windows: EvalWindows, opts: EvaluateOptions, engine: str,
             request: _Request | None = None) -> EngineScores:
    request = request or _Request()
    if engine == "torch":
        model = _torch_model(model_dir)
        scores = torch_scores(model, windows, top_k=request.top_k, prompts=request.prompts,
                              max_new_tokens=request.max_new_tokens, engine="torch")
        if request.tasks:
            from transformers import AutoTokenizer

            harness = torch_harness_model(model, AutoTokenizer.from_pretrained(model_dir))
            scores.tasks = score_tasks(harness, request.tasks, limit=request.task_limit)
        return scores
    from quantizer.vllm_engine import served_scores

    measured = served_scores(
        model_dir,
        windows.ids.tolist(),
        score_from=windows.score_from,
        dtype=opts.dtype,
        max_model_len=opts.max_model_len,
        tensor_parallel_size=opts.tensor_parallel_size,
        gpu_memory_utilization=opts.gpu_memory_utilization,
        top_k=request.top_k,
        prompts=request.prompts,
        max_new_tokens=request.max_new_tokens,
        throughput_batches=request.throughput_batches,
        throughput_tokens=request.throughput_tokens,
        tasks=request.tasks,
        task_limit=request.task_limit,
    )
    perplexity = Perplexity(
        ppl=measured["ppl"], nll_sum=measured["nll_sum"], tokens_scored=measured["tokens_scored"],
        windows=measured["windows"], engine=f"vllm {measured.get('vllm_version', '')}".strip(),
    )
    return EngineScores(perplexity, measured["top"], measured["generations"], measured["throughput"],
                        measured["tasks"])


def run_evaluate(opts: EvaluateOptions) -> EvaluateResult:
    """Measure, decide, and return the verdict (contract.exit_code maps a failed gate to its code)."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    if opts.engine not in ENGINES:
        raise InputError(f"--engine {opts.engine}: use one of {', '.join(ENGINES)}")
    if not opts.model.is_dir():
        raise InputError(f"--model {opts.model}: not a directory; pass the quantized checkpoint directory")
    qconfig = read_quantization_config(opts.model)
    scheme = format_of(qconfig).scheme(qconfig)
    if opts.baseline_ppl is None and opts.baseline_model is None:
        raise InputError("no baseline: pass --baseline-ppl (from the quantize result) or --baseline-model DIR")
    if opts.baseline_model is not None and not (opts.baseline_model / "config.json").exists():
        raise InputError(f"--baseline-model {opts.baseline_model}: no config.json; pass the unquantized model directory")
    if opts.source_scores is not None and opts.baseline_model is None:
        raise InputError("--source-scores keeps the source model's scores: it needs --baseline-model DIR")
    if opts.source_scores is not None and opts.source_scores.exists() and not opts.source_scores.is_dir():
        raise InputError(f"--source-scores {opts.source_scores}: not a folder; pass a folder to keep the scores in")
    context = _config(opts.model).get("max_position_embeddings")
    if context and opts.seq_len > context:
        raise InputError(f"--seq-len {opts.seq_len} exceeds the model's context {context}; lower it")
    if opts.tensor_parallel_size < 1:
        raise InputError(f"--tensor-parallel-size {opts.tensor_parallel_size} must be at least 1")
    opts.thresholds.check_inputs(source=opts.baseline_model is not None, prompts=opts.generation_prompts is not None,
                                 tasks=bool(opts.tasks))
    if opts.tasks and opts.baseline_model is None:
        raise InputError("--tasks compares the task scores with the unquantized model: pass --baseline-model DIR")
    if opts.task_limit is not None and opts.task_limit < 1:
        raise InputError(f"--task-limit {opts.task_limit} must be at least 1")
    task_configs = load_tasks(opts.tasks) if opts.tasks else []
    if len(task_configs) > MAX_TASKS:
        raise InputError(f"--tasks names {len(task_configs)} tasks; at most {MAX_TASKS} fit the gate's result")
    if any(b < 1 for b in opts.throughput_batches) or opts.throughput_tokens < 1:
        raise InputError("--throughput-batches and --throughput-tokens must be positive")
    batches = opts.throughput_batches
    if batches and opts.engine != "vllm":
        if opts.thresholds.min_speedup is not None:
            raise InputError("--min-speedup gates on the serving engine's throughput: it needs --engine vllm")
        log.warning("throughput is measured in vLLM only: not measured with --engine %s", opts.engine)
        batches = ()
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    windows = load_evaluation_windows(opts.eval_text, tokenizer, opts.seq_len, opts.max_windows, opts.jsonl_field,
                                      opts.stride)
    # What is compared with the unquantized model, asked of both engines alike.
    request = _Request(throughput_batches=batches, throughput_tokens=opts.throughput_tokens)
    if opts.baseline_model is not None:
        request.top_k = opts.top_logprobs
        if opts.generation_prompts is not None:
            request.prompts = load_prompts(opts.generation_prompts, tokenizer, opts.jsonl_field)
            request.max_new_tokens = opts.max_new_tokens
        request.tasks, request.task_limit = task_configs, opts.task_limit

    fakequant = opts.fakequant_ppl
    if fakequant is None:
        fakequant = _measure(opts.model, windows, opts, "torch").perplexity.ppl
    reference, source_seconds, reused = _reference(opts, windows, request) if opts.baseline_model else (None, 0.0, False)
    served_started = time.perf_counter()
    served = _measure(opts.model, windows, opts, opts.engine, request)
    served_seconds = time.perf_counter() - served_started
    tasks = compare_tasks(reference.tasks, served.tasks) if reference else []
    # The engine's own baseline when it was measured: both perplexities then come from one engine.
    baseline = reference.perplexity.ppl if reference else opts.baseline_ppl
    distributions = distribution_agreement(reference.top, served.top) if reference else None
    generations = generation_agreement(reference.generations, served.generations) \
        if reference and request.prompts else None
    throughput = _throughput_table(served.throughput, reference.throughput if reference else [])
    decision = decide(baseline, fakequant, served.perplexity.ppl, opts.thresholds, distributions, generations,
                      throughput, tasks)
    details = {
        "ppl_ratio": decision.ppl_ratio,
        "ppl_increase": decision.ppl_increase,
        "engine_deviation": decision.engine_deviation,
        "windows": served.perplexity.windows,
        "tokens_scored": served.perplexity.tokens_scored,
        "seq_len": opts.seq_len,
        "recipe": {"format": format_of(qconfig).name, "bits": scheme.bits, "group_size": scheme.group_size,
                   "sym": scheme.sym},
        "thresholds": {
            "max_ppl_increase": opts.thresholds.max_ppl_increase,
            "max_ppl_ratio": opts.thresholds.effective_ratio(),
            "engine_tolerance": opts.thresholds.engine_tolerance,
            "max_kl_divergence": opts.thresholds.max_kl_divergence,
            "min_top_token_agreement": opts.thresholds.min_top_token_agreement,
            "min_generation_match": opts.thresholds.min_generation_match,
            "min_speedup": opts.thresholds.min_speedup,
            "max_accuracy_drop": opts.thresholds.max_accuracy_drop,
        },
        "tensor_parallel_size": opts.tensor_parallel_size,
    }
    if reference and opts.baseline_ppl is not None:
        details["quantizer_baseline_ppl"] = opts.baseline_ppl  # the torch-side figure, for comparison
    if distributions:
        details["top_logprobs"] = request.top_k
    if generations:
        details["generations"] = generations.to_dict()
    if reference:
        details["source"] = {"scores": "reused" if reused else "measured", "seconds": round(source_seconds, 2)}
    details["served_seconds"] = round(served_seconds, 2)
    details["seconds"] = round(time.perf_counter() - started, 2)
    return EvaluateResult(
        passed=decision.passed, reason=decision.reason, message=decision.message, baseline_ppl=baseline,
        fakequant_ppl=fakequant, served_ppl=served.perplexity.ppl, engine=served.perplexity.engine,
        kl_divergence={"mean": distributions.kl_mean, "p99": distributions.kl_p99, "max": distributions.kl_max}
        if distributions else None,
        top_token_agreement=distributions.top1_agreement if distributions else None,
        generation_match=generations.exact_match if generations else None,
        throughput=throughput or None,
        tasks=[task.to_dict() for task in tasks] or None,
        details=details,
    )


def _reference(opts: EvaluateOptions, windows: EvalWindows, request: _Request) -> tuple[EngineScores, float, bool]:
    """The source model's scores: (scores, seconds spent on them, whether they were kept from before).
    With --source-scores they are measured once per key and read back after that."""
    started = time.perf_counter()
    assert opts.baseline_model is not None
    path = None
    if opts.source_scores is not None:
        settings = {"dtype": opts.dtype, "tensor_parallel_size": opts.tensor_parallel_size,
                    "max_model_len": opts.max_model_len,
                    # It sizes the KV cache: throughput, never the numbers, depends on it.
                    **({"gpu_memory_utilization": opts.gpu_memory_utilization} if request.throughput_batches else {})}
        # The tasks by their files (a config may hold what has no stable text, such as a function).
        asked = {**asdict(request), "tasks": [source_scores.files_fingerprint(t) for t in opts.tasks]}
        key = source_scores.source_key(opts.baseline_model, windows, opts.engine, settings, asked)
        path = opts.source_scores / f"{key}.safetensors"
        kept = source_scores.load(path)
        if kept is not None:
            log.info("the source model's scores from %s: measured before, not served again", path)
            return kept, time.perf_counter() - started, True
    scores = _measure(opts.baseline_model, windows, opts, opts.engine, request)
    if path is not None:
        source_scores.save(path, scores)
        log.info("the source model's scores kept in %s for the next evaluation", path)
    return scores, time.perf_counter() - started, False


def _throughput_table(quantized: list[dict], source: list[dict]) -> list[dict]:
    """The quantized model's rows, each with the source model's tokens/s and the speedup when measured."""
    by_batch = {row["batch_size"]: row for row in source}
    table = []
    for row in quantized:
        row = dict(row)
        if row["batch_size"] in by_batch:
            source_rate = by_batch[row["batch_size"]]["output_tokens_per_second"]
            row["source_output_tokens_per_second"] = source_rate
            row["source_time_to_first_token_seconds"] = by_batch[row["batch_size"]]["time_to_first_token_seconds"]
            row["speedup"] = row["output_tokens_per_second"] / source_rate
        table.append(row)
    return table


def summary_lines(result: EvaluateResult) -> list[str]:
    verdict = "PASSED" if result.passed else f"FAILED ({result.reason})"
    details = result.details
    lines = [
        f"gate {verdict}: {result.message}",
        f"baseline {result.baseline_ppl:.4f} | fake-quant {result.fakequant_ppl:.4f} | "
        f"served {result.served_ppl:.4f} ({result.engine}, {details['windows']} windows x {details['seq_len']} "
        f"tokens) in {details['seconds']:.1f} s",
    ]
    if result.kl_divergence is not None:
        kl = result.kl_divergence
        lines.append(f"against the unquantized model: KL mean {kl['mean']:.4f} | p99 {kl['p99']:.4f} | "
                     f"max {kl['max']:.4f} nats; top-1 agreement {result.top_token_agreement:.2%}")
    if result.generation_match is not None:
        lines.append(f"greedy completions matching: {result.generation_match:.0%} "
                     f"(first difference at token {details['generations']['mean_first_difference']:.1f} on average)")
    for row in result.throughput or []:
        line = (f"batch {row['batch_size']}: {row['output_tokens_per_second']:.1f} output tokens/s, first token in "
                f"{row['time_to_first_token_seconds']:.3f} s")
        if "speedup" in row:
            line += f" ({row['speedup']:.2f}x the source model's {row['source_output_tokens_per_second']:.1f})"
        lines.append(line)
    for task in result.tasks or []:
        stderr = f" +- {task['stderr']:.4f}" if task["stderr"] is not None else ""
        lines.append(f"task {task['task']} ({task['samples']} documents): {task['metric']} {task['source']:.4f} -> "
                     f"{task['quantized']:.4f}{stderr} (drop {task['drop']:+.4f})")
    return lines
