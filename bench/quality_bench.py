"""Quality of GPTQ variants vs RTN, side by side in one run: perplexity after quantization.

    python bench/quality_bench.py                                  # the bundled tiny model
    python bench/quality_bench.py --model DIR --calibration PATH --eval-text PATH --seq-len 2048

Each row quantizes the same model with the same calibration windows and measures baseline and
fake-quant perplexity on the same evaluation windows (the pipeline's two activation streams), so
the rows compare directly. Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantizer.calibration import load_calibration  # noqa: E402
from quantizer.gptq import QuantRecipe  # noqa: E402
from quantizer.perplexity import load_evaluation_windows  # noqa: E402
from quantizer.pipeline import quantize_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

VARIANTS = [
    # label, method, recipe
    ("RTN g128", "rtn", QuantRecipe(group_size=128)),
    ("GPTQ g128 act-order", "gptq", QuantRecipe(group_size=128)),
    ("GPTQ g128 no act-order", "gptq", QuantRecipe(group_size=128, act_order=False)),
    ("GPTQ g128 act-order + clip search", "gptq", QuantRecipe(group_size=128, scale_search="clip")),
    ("RTN g32", "rtn", QuantRecipe(group_size=32)),
    ("GPTQ g32 act-order", "gptq", QuantRecipe(group_size=32)),
    ("GPTQ g32 act-order + clip search", "gptq", QuantRecipe(group_size=32, scale_search="clip")),
    ("RTN 3-bit g32 (unservable)", "rtn", QuantRecipe(bits=3, group_size=32)),
    ("GPTQ 3-bit g32 act-order (unservable)", "gptq", QuantRecipe(bits=3, group_size=32)),
    ("GPTQ 3-bit g32 no act-order (unservable)", "gptq", QuantRecipe(bits=3, group_size=32, act_order=False)),
    ("GPTQ 3-bit g32 act-order + clip (unservable)", "gptq", QuantRecipe(bits=3, group_size=32, scale_search="clip")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "tiny-llama")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len)
    windows = load_evaluation_windows(args.eval_text, tokenizer, args.seq_len, args.max_windows)
    device = torch.device(args.device)
    rows = []
    print(f"{'variant':46s} {'baseline':>9s} {'quantized':>9s} {'increase':>9s} {'vs RTN':>7s} {'seconds':>8s}")
    rtn_increase = {}
    for label, method, recipe in VARIANTS:
        start = time.perf_counter()
        result = quantize_model(args.model, recipe, calibration.windows, lambda *a: None, device,
                                eval_windows=windows, method=method, progress=False)
        seconds = time.perf_counter() - start
        increase = result.fakequant_ppl - result.baseline_ppl
        key = (recipe.bits, recipe.group_size)
        if method == "rtn":
            rtn_increase[key] = increase
        ratio = increase / rtn_increase[key] if key in rtn_increase else float("nan")
        rows.append({"variant": label, "baseline_ppl": result.baseline_ppl, "quantized_ppl": result.fakequant_ppl,
                     "increase": increase, "increase_vs_rtn": ratio, "seconds": round(seconds, 2)})
        print(f"{label:46s} {result.baseline_ppl:9.3f} {result.fakequant_ppl:9.3f} {increase:9.3f} {ratio:7.2f} {seconds:8.1f}")
    print(f"# {args.model.name}: calibration {calibration.samples} x {calibration.seq_len}, "
          f"evaluation {len(windows)} windows x {windows.ids.shape[1]} tokens, device {device}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
