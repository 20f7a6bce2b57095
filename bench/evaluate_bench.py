"""The evaluator's costs, side by side in one run:

1. tokens scored per second by vLLM vs our torch backend, on the same checkpoint and windows;
2. what measuring baseline and fake-quant perplexity in the quantization pass adds to it.

    python bench/evaluate_bench.py                 # the bundled tiny model (CPU here, GPU when present)

vLLM's engine start is reported apart from its scoring rate: the gate pays it once per rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantizer.calibration import load_calibration  # noqa: E402
from quantizer.gptq import QuantRecipe  # noqa: E402
from quantizer.perplexity import load_dequantized_model, load_evaluation_windows, torch_perplexity  # noqa: E402
from quantizer.pipeline import SourceModel, quantize_model  # noqa: E402
from quantizer.quantize import QuantizeOptions, run_quantize  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "tiny-llama")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from quantizer.vllm_engine import served_perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len)
    windows = load_evaluation_windows(args.eval_text, tokenizer, args.seq_len)
    device = torch.device(args.device)
    recipe = QuantRecipe()
    report: dict = {"device": str(device), "eval_windows": len(windows), "seq_len": args.seq_len}

    with tempfile.TemporaryDirectory() as tmp:
        # 2. The pass without and with the two evaluation streams.
        timings = {}
        for label, eval_windows in (("without", None), ("with", windows)):
            start = time.perf_counter()
            quantize_model(SourceModel.open(args.model), recipe, calibration.windows, lambda *a: None, device,
                           eval_windows=eval_windows, progress=False)
            timings[label] = time.perf_counter() - start
        report["pass_seconds_without_eval"] = round(timings["without"], 2)
        report["pass_seconds_with_eval"] = round(timings["with"], 2)
        report["eval_overhead"] = round(timings["with"] / timings["without"] - 1, 3)

        # The checkpoint the gate scores, written exactly as `python -m quantizer quantize` writes it.
        out = Path(tmp) / "ckpt"
        run_quantize(QuantizeOptions(model=args.model, output=out, calibration=args.calibration, recipe=recipe,
                                     samples=args.samples, seq_len=args.seq_len, device=args.device, progress=False))

        # 1. Scoring rate, torch vs vLLM.
        tokens = windows.tokens_scored
        start = time.perf_counter()
        model = load_dequantized_model(out, device=str(device))
        loaded = time.perf_counter()
        reference = torch_perplexity(model, windows)
        scored = time.perf_counter()
        report["torch"] = {"ppl": reference.ppl, "load_seconds": round(loaded - start, 2),
                           "tokens_per_second": round(tokens / (scored - loaded), 1)}
        start = time.perf_counter()
        served = served_perplexity(out, windows.ids.tolist())
        total = time.perf_counter() - start
        # Scoring alone: a second generate would need the engine kept alive; estimate it by
        # timing the whole call minus a call on a single window.
        start = time.perf_counter()
        served_perplexity(out, windows.ids[:1].tolist())
        startup = time.perf_counter() - start
        report["vllm"] = {"ppl": served["ppl"], "call_seconds": round(total, 2),
                          "single_window_call_seconds": round(startup, 2),
                          "tokens_per_second": round(tokens / max(total - startup, 1e-9), 1)}
        report["engine_deviation"] = served["ppl"] / reference.ppl - 1
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
