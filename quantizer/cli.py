"""Command line of the quantization and evaluation Jobs.

Exit codes (quantizer.contract): 0 success, 2 bad input (the message names the field and the fix),
3 a gate that did not pass, 1 anything else. The JSON result goes to --result-file, by default /dev/termination-log when it exists, where
Kubernetes picks it up as the container's termination message for the operator.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from quantizer import contract, termination
from quantizer.contract import (
    CHECKPOINT_FORMATS,
    DEFAULT_EXPERT_CALIBRATION,
    DEFAULT_FORMAT,
    DEFAULT_MIXED_SENSITIVITY,
    EVALUATION_FAILED,
    EXPERT_CALIBRATIONS,
    INVALID_INPUT,
    MIXED_SENSITIVITIES,
    SCALE_SEARCHES,
    DoneResult,
    FailedResult,
    Result,
)
from quantizer.errors import InputError
from quantizer.gptq import QuantRecipe

DEFAULT_RECIPE = QuantRecipe()

TERMINATION_LOG = Path("/dev/termination-log")


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a Hugging Face model directory with GPTQ")
    p.add_argument("--model", type=Path, required=True, help="source model directory (safetensors)")
    p.add_argument("--output", type=Path, required=True, help="checkpoint directory to create (must not exist)")
    p.add_argument("--calibration", type=Path, required=True, help="calibration text (.txt, .jsonl or a directory), or token ids already windowed: a .safetensors file with input_ids [windows, tokens]")
    p.add_argument("--jsonl-field", default="text", help="text field of JSONL records (default: text)")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (vLLM serves 4 and 8)")
    p.add_argument("--group-size", type=int, default=128, help="-1 (per row), 32, 64, 128 or 256")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="static activation order (default on)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric grid (default on; vLLM serves only symmetric)")
    p.add_argument("--damp", type=float, default=0.01, help="dampening as a fraction of mean(diag H)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block size")
    p.add_argument("--scale-search", choices=SCALE_SEARCHES, default=DEFAULT_RECIPE.scale_search,
                   help="group scales: minmax; clip (unweighted search); diag or cost (search weighted by "
                        "diag(H) or by GPTQ's per-column cost)")
    p.add_argument("--full-range", action=argparse.BooleanOptionalAction, default=DEFAULT_RECIPE.full_range,
                   help="symmetric scale -max/2^(bits-1) with the sign kept: every level in use")
    p.add_argument("--refine-sweeps", type=int, default=DEFAULT_RECIPE.refine_sweeps,
                   help="coordinate-descent + scale re-fit rounds after GPTQ (0: off)")
    p.add_argument("--group-aware-order", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_RECIPE.group_aware_order,
                   help="act-order by whole groups (GPTQModel's) instead of column by column")
    p.add_argument("--source-targets", type=float, default=DEFAULT_RECIPE.source_targets,
                   help="how far each Linear's target follows the unquantized model's inputs (GPTAQ): "
                        "0 is plain GPTQ, 1 the whole correction")
    p.add_argument("--mixed-finer", metavar="BITS:GROUP|unquantized",
                   help="mixed precision: the units that matter most at this finer setting (4:32, 8:128, "
                        "unquantized), chosen by a sensitivity pass; needs --mixed-budget and compressed-tensors")
    p.add_argument("--mixed-budget", type=float, metavar="PERCENT",
                   help="mixed precision: the checkpoint may grow by at most this share of the uniform "
                        "recipe's size, in percent (for example 5)")
    p.add_argument("--mixed-sensitivity", choices=MIXED_SENSITIVITIES, default=DEFAULT_MIXED_SENSITIVITY,
                   help="how a unit's gain from the finer setting is measured (quantizer/mixed.py)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="rtn is the baseline")
    p.add_argument("--expert-calibration", choices=EXPERT_CALIBRATIONS, default=DEFAULT_EXPERT_CALIBRATION,
                   help="mixture-of-experts models: each expert's Hessians from the tokens routed to it, or "
                        "from every calibration token (the forward pass keeps the router's choice)")
    p.add_argument("--solver", choices=("auto", "torch", "triton"), default="auto",
                   help="GPTQ column loop: auto = Triton on CUDA, PyTorch elsewhere")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--offload-activations", action="store_true", help="keep activations in host memory")
    p.add_argument("--eval-text", type=Path, help="also measure baseline and fake-quant perplexity on this text")
    p.add_argument("--eval-seq-len", type=int, help="evaluation window (default: --seq-len)")
    p.add_argument("--eval-max-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--eval-stride", type=int, help="sliding windows every N tokens (default: non-overlapping)")
    p.add_argument("--format", choices=CHECKPOINT_FORMATS, default=DEFAULT_FORMAT,
                   help=f"checkpoint layout (default {DEFAULT_FORMAT}, what llm-compressor writes and vLLM's docs "
                        "recommend; gptq: AutoGPTQ's layout)")
    p.add_argument("--allow-unservable", action="store_true",
                   help="write recipes vLLM cannot serve (marked in the manifest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (atomically, once the new checkpoint is complete)")
    p.add_argument("--source-repo", help="provenance: Hugging Face repo the model came from")
    p.add_argument("--source-revision", help="provenance: the pinned revision")
    p.add_argument("--result-file", type=Path, help="JSON result (default /dev/termination-log if present)")
    p.add_argument("--no-progress", action="store_true")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a checkpoint against its format's vLLM contract and its manifest")
    p.add_argument("model", type=Path)
    p.add_argument("--allow-unservable", action="store_true")
    p.add_argument("--result-file", type=Path)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="measure perplexity in the serving engine and apply the quality gate")
    p.add_argument("--model", type=Path, required=True, help="the quantized checkpoint directory")
    p.add_argument("--eval-text", type=Path, required=True, help="evaluation text: .txt, .jsonl or a directory")
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (same as the quantize pass)")
    p.add_argument("--max-windows", type=int, help="at most this many windows, spread evenly")
    p.add_argument("--stride", type=int, help="sliding windows every N tokens (default: non-overlapping)")
    p.add_argument("--baseline-ppl", type=float, help="FP16/BF16 perplexity from the quantize result")
    p.add_argument("--fakequant-ppl", type=float,
                   help="our perplexity of the quantized weights (measured from the checkpoint when omitted)")
    p.add_argument("--baseline-model", type=Path,
                   help="the unquantized model, served by the same engine: its perplexity is the baseline, and "
                        "the KL divergence, top-1 agreement and generations are compared with it")
    p.add_argument("--max-ppl-increase", type=float, help="largest allowed absolute perplexity increase")
    p.add_argument("--max-ppl-ratio", type=float, help="largest allowed served/baseline ratio (1.05 if no threshold)")
    p.add_argument("--engine-tolerance", type=float, default=0.01, help="allowed |served/fakequant - 1|")
    p.add_argument("--max-kl-divergence", type=float,
                   help="largest allowed mean KL(unquantized || quantized) per token, nats (needs --baseline-model)")
    p.add_argument("--min-top-token-agreement", type=float,
                   help="least share of tokens whose most likely successor is the same (needs --baseline-model)")
    p.add_argument("--generation-prompts", type=Path,
                   help="prompts, one per line (.txt) or record (.jsonl): greedy completions are compared")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per greedy completion (default 32)")
    p.add_argument("--min-generation-match", type=float,
                   help="least share of completions equal to the unquantized model's, token for token")
    p.add_argument("--throughput-batches", type=lambda v: tuple(int(b) for b in v.split(",")), default=(),
                   help="batch sizes, for example 1,16,64: output tokens/s and time to first token in vLLM "
                        "(and the speedup over the source model with --baseline-model)")
    p.add_argument("--throughput-tokens", type=int, default=64, help="tokens per request of the throughput runs")
    p.add_argument("--min-speedup", type=float,
                   help="least quantized/source output tokens/s at the largest batch (needs --throughput-batches)")
    p.add_argument("--tasks", type=Path, nargs="+", default=(),
                   help="lm-evaluation-harness task YAMLs or directories of them (local data, relative data_files "
                        "taken from the YAML's directory): both models are scored on each (needs --baseline-model)")
    p.add_argument("--task-limit", type=int, help="at most this many documents per task (default: all)")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="largest allowed drop of each task's score below the unquantized model's, e.g. 0.02")
    p.add_argument("--source-scores", type=Path,
                   help="a folder to keep the source model's scores in (with --baseline-model): measured once per "
                        "source, engine, windows and request, then read back instead of serving the source again")
    p.add_argument("--top-logprobs", type=int, default=20,
                   help="log-probabilities per token for the KL divergence (default 20)")
    p.add_argument("--engine", choices=("vllm", "torch"), default="vllm", help="torch: for machines without vLLM")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", default="auto",
                   help="vLLM's activation dtype (default auto: the checkpoint's, as vllm serve runs it; Gemma 3 "
                        "runs in bfloat16 only)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--result-file", type=Path)


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download a Hugging Face model, or files of a dataset, at a pinned revision "
                                     "(token from HF_TOKEN)")
    p.add_argument("--repo", required=True, help="for example meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--revision", required=True, help="a commit sha (or tag) to pin")
    p.add_argument("--output", type=Path, required=True, help="directory to download into")
    p.add_argument("--repo-type", choices=("model", "dataset"), default="model",
                   help="model: its weights, configs and tokenizer; dataset: the --file paths only")
    p.add_argument("--file", action="append", default=[], dest="files", metavar="PATH",
                   help="a file of the repository to download (repeatable; required for a dataset)")
    p.add_argument("--result-file", type=Path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quantizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_verify(sub)
    _add_evaluate(sub)
    _add_fetch(sub)
    return parser


def write_result(result: Result, path: Path | None) -> None:
    if path is None and TERMINATION_LOG.exists():
        path = TERMINATION_LOG
    if path is not None:
        path.write_text(result.encode(), encoding="utf-8")


def _quantize(args) -> Result:
    from quantizer.quantize import QuantizeOptions, run_quantize, summary_lines

    recipe = QuantRecipe(
        bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
        damp=args.damp, block_size=args.block_size, scale_search=args.scale_search, full_range=args.full_range,
        refine_sweeps=args.refine_sweeps, group_aware_order=args.group_aware_order,
        source_targets=args.source_targets,
    )
    result = run_quantize(
        QuantizeOptions(
            model=args.model, output=args.output, calibration=args.calibration, recipe=recipe,
            samples=args.samples, seq_len=args.seq_len, seed=args.seed, jsonl_field=args.jsonl_field,
            device=args.device, method=args.method, solver=args.solver, allow_unservable=args.allow_unservable, overwrite=args.overwrite,
            format=args.format, expert_calibration=args.expert_calibration,
            eval_text=args.eval_text, eval_seq_len=args.eval_seq_len, eval_max_windows=args.eval_max_windows,
            eval_stride=args.eval_stride,
            batch_size=args.batch_size, offload_activations=args.offload_activations,
            source_repo=args.source_repo, source_revision=args.source_revision, progress=not args.no_progress,
            mixed=_mixed_precision(args),
        )
    )
    print("\n".join(summary_lines(result)))
    return result


def _mixed_precision(args):
    from quantizer.mixed import MixedPrecision

    if args.mixed_finer is None and args.mixed_budget is None:
        return None
    if args.mixed_finer is None or args.mixed_budget is None:
        raise InputError("mixed precision needs both --mixed-finer (the finer setting) and --mixed-budget "
                         "(the size it may add, in percent)")
    return MixedPrecision(args.mixed_finer, args.mixed_budget, args.mixed_sensitivity)


def _evaluate(args) -> Result:
    from quantizer.evaluate import EvaluateOptions, run_evaluate, summary_lines
    from quantizer.gate import GateThresholds

    result = run_evaluate(
        EvaluateOptions(
            model=args.model, eval_text=args.eval_text, seq_len=args.seq_len, max_windows=args.max_windows, stride=args.stride,
            jsonl_field=args.jsonl_field, baseline_ppl=args.baseline_ppl, fakequant_ppl=args.fakequant_ppl,
            baseline_model=args.baseline_model,
            thresholds=GateThresholds(
                args.max_ppl_increase, args.max_ppl_ratio, args.engine_tolerance,
                max_kl_divergence=args.max_kl_divergence, min_top_token_agreement=args.min_top_token_agreement,
                min_generation_match=args.min_generation_match, min_speedup=args.min_speedup,
                max_accuracy_drop=args.max_accuracy_drop,
            ),
            tasks=tuple(args.tasks), task_limit=args.task_limit,
            throughput_batches=args.throughput_batches, throughput_tokens=args.throughput_tokens,
            top_logprobs=args.top_logprobs, generation_prompts=args.generation_prompts,
            max_new_tokens=args.max_new_tokens,
            engine=args.engine, tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
            dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization, source_scores=args.source_scores,
        )
    )
    print("\n".join(summary_lines(result)))
    return result


def _verify(args) -> Result:
    from quantizer.checkpoint import verify_checkpoint, verify_manifest

    summary = verify_checkpoint(args.model, allow_unservable=args.allow_unservable)
    files = verify_manifest(args.model)
    print(f"{args.model}: OK, {summary['quantized_linears']} quantized linears match vLLM's {summary['format']} "
          f"contract; {files} files match the manifest's digests")
    return DoneResult(details={"format": summary["format"], "quantized_linears": summary["quantized_linears"],
                               "files_verified": files})


def _fetch(args) -> Result:
    """The model files only (safetensors, configs, tokenizer): no .bin/.pt duplicates, no other formats."""
    import os

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{args.repo_type} {args.repo} on {constants.ENDPOINT}"  # HF_ENDPOINT: the Hub, or a mirror of it
    if args.repo_type == "dataset" and not args.files:
        raise InputError("--file: name the dataset's files to download (a dataset may hold many gigabytes)")
    patterns = args.files or ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        path = snapshot_download(
            repo_id=args.repo,
            repo_type=args.repo_type,
            revision=args.revision,
            local_dir=args.output,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=patterns,
        )
    except GatedRepoError as exc:
        raise InputError(f"--repo {where} is gated: accept its licence on the Hub and provide HF_TOKEN") from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"--revision {args.revision} does not exist in {where}; pin an existing commit") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(f"--repo {where} not found (or private: provide HF_TOKEN, or a token it accepts)") from exc
    except LocalEntryNotFoundError as exc:
        # A mirror (olah, for one) answers a revision it does not have with a plain 404 on the file list,
        # not the Hub's RevisionNotFound: the same bad input. A network failure stays retryable.
        if isinstance(exc.__cause__, RemoteEntryNotFoundError):
            raise InputError(f"--revision {args.revision} was not found in {where}; pin an existing commit") from exc
        raise
    missing = [name for name in args.files if not (Path(path) / name).is_file()]
    if missing:  # allow_patterns that match nothing download nothing, silently
        raise InputError(f"--file {', '.join(missing)}: not in {where} at {args.revision}")
    print(f"fetched {args.repo_type} {args.repo}@{args.revision} into {path}")
    return DoneResult(details={"repo": args.repo, "revision": args.revision, "output": str(path)})


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, whether from Python's own writes or from safetensors' (which reports it in its message)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


COMMANDS = {"quantize": _quantize, "verify": _verify, "evaluate": _evaluate, "fetch": _fetch}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from quantizer.checkpoint import CheckpointError

    try:
        with termination.handled():
            result = COMMANDS[args.command](args)
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        result = FailedResult(reason=INVALID_INPUT, message=str(exc))
    except termination.Terminated as exc:
        print(f"error: {exc}", file=sys.stderr)
        result = FailedResult(reason=contract.TERMINATED, message=str(exc))
    except Exception as exc:
        if _disk_full(exc):
            message = f"the output volume is full ({exc}); the partial output was removed: free space or use a larger volume"
            print(f"error: {message}", file=sys.stderr)
            result = FailedResult(reason=contract.DISK_FULL, message=message)
        else:
            logging.getLogger("quantizer").exception("failed")
            # The evaluator's failures are gate reasons too, so the operator can tell them apart.
            reason = EVALUATION_FAILED if args.command == "evaluate" else contract.ERROR
            result = FailedResult(reason=reason, message=f"{type(exc).__name__}: {exc}")
    write_result(result, args.result_file)
    return contract.exit_code(result)
