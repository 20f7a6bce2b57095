"""The gate's cost against the quantize time, and what it measures against the source model.

    python bench/gate_bench.py --json out.json            # the bundled tiny model, vLLM's CPU backend
    python bench/gate_bench.py --model DIR --calibration TXT --eval-text TXT --prompts TXT --seq-len 2048

For each recipe (4-bit g128, 4-bit g32, 3-bit g128): `python -m quantizer quantize`, then `python -m
quantizer evaluate` three times, as the evaluate Job runs it: perplexity and the engine check only;
with the source model served beside the artifact (KL divergence, top-1 agreement, greedy generations);
and that plus the lm-evaluation-harness tasks (--tasks, the tiny model's shipped task by default). Every
step is its own process, timed from outside. vLLM 0.32 serves no 3-bit GPTQ: that recipe is evaluated
with the torch engine, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RECIPES = {  # name: (quantize flags, engine)
    "4-bit g128": (["--bits", "4", "--group-size", "128"], "vllm"),
    "4-bit g32": (["--bits", "4", "--group-size", "32"], "vllm"),
    "3-bit g128": (["--bits", "3", "--group-size", "128", "--allow-unservable"], "torch"),
}


def _run(args: list[str], result_file: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantizer", *args, "--result-file", str(result_file)],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not result_file.exists():
        raise SystemExit(f"{args[0]} exited {done.returncode} without a result:\n{done.stderr[-3000:]}")
    return seconds, json.loads(result_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "tiny-llama")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--prompts", type=Path, default=FIXTURES / "text" / "prompts.txt")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tasks", type=Path, default=FIXTURES / "tasks", help="task YAMLs, or a directory of them")
    parser.add_argument("--task-limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.recipes.split(","):
            flags, engine = RECIPES[name]
            out = work / name.replace(" ", "-")
            quantize_seconds, quantized = _run(
                ["quantize", "--model", str(args.model), "--output", str(out), "--calibration", str(args.calibration),
                 "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--eval-text", str(args.eval_text),
                 "--eval-seq-len", str(args.seq_len), "--eval-max-windows", str(args.max_windows), "--no-progress",
                 *flags], work / f"{out.name}.quantize.json")
            common = ["evaluate", "--model", str(out), "--eval-text", str(args.eval_text), "--seq-len", str(args.seq_len),
                      "--max-windows", str(args.max_windows), "--engine", engine,
                      "--baseline-ppl", repr(quantized["baseline_ppl"]), "--fakequant-ppl", repr(quantized["fakequant_ppl"]),
                      "--max-ppl-ratio", "100"]  # measure, do not stop: the bench reports, the gate decides
            plain_seconds, plain = _run(common, work / f"{out.name}.plain.json")
            with_source = [*common, "--baseline-model", str(args.model), "--generation-prompts", str(args.prompts),
                           "--max-new-tokens", str(args.max_new_tokens)]
            full_seconds, full = _run(with_source, work / f"{out.name}.full.json")
            tasks_seconds, tasked = _run([*with_source, "--tasks", str(args.tasks),
                                          *(["--task-limit", str(args.task_limit)] if args.task_limit else [])],
                                         work / f"{out.name}.tasks.json")
            row = {
                "recipe": name, "engine": full["engine"],
                "quantize_seconds": round(quantize_seconds, 1),
                "evaluate_seconds_perplexity_only": round(plain_seconds, 1),
                "evaluate_seconds_with_source": round(full_seconds, 1),
                "evaluate_seconds_with_source_and_tasks": round(tasks_seconds, 1),
                "gate_over_quantize": round(full_seconds / quantize_seconds, 2),
                "served_ppl": round(plain["served_ppl"], 4),
                "served_over_baseline_ppl": round(full["served_ppl"] / full["baseline_ppl"], 4),
                "kl_mean": round(full["kl_divergence"]["mean"], 5), "kl_p99": round(full["kl_divergence"]["p99"], 4),
                "kl_max": round(full["kl_divergence"]["max"], 4),
                "top1_agreement": round(full["top_token_agreement"], 4),
                "generation_match": full["generation_match"],
                "mean_first_difference": full["generations"]["mean_first_difference"],
                "tasks": [{k: task[k] for k in ("task", "metric", "source", "quantized", "drop", "stderr", "samples")}
                          for task in tasked["tasks"]],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"model": str(args.model), "seq_len": args.seq_len, "max_windows": args.max_windows,
              "prompts": str(args.prompts), "max_new_tokens": args.max_new_tokens, "tasks": str(args.tasks),
              "task_limit": args.task_limit, "rows": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
