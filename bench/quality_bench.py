"""Model quality of every quantizer variant, side by side in one run: perplexity after quantization.

    PYTHONPATH=<llm-compressor deps> python bench/quality_bench.py        # the bundled tiny model
    python bench/quality_bench.py --model DIR --calibration PATH --eval-text PATH --seq-len 2048

Each row quantizes the same model with the same calibration windows through the same layer pipeline
(the quantizer of each Linear swapped, the Hessians the pipeline's own) and measures baseline and
fake-quant perplexity on the same held-out windows, so the rows compare directly. The paths are
those of bench/layer_quality_bench.py (rtn, llm-compressor with its default and imatrix_mse
observers, our variants); settings beyond what vLLM serves (3-bit) are measured as fake-quant only.
Nothing is written to disk.
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
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from layer_quality_bench import PATHS, PEERS, PLAIN, quantizer_for  # noqa: E402

from quantizer.calibration import load_calibration  # noqa: E402
from quantizer.contract import DEFAULT_EXPERT_CALIBRATION, EXPERT_CALIBRATIONS  # noqa: E402
from quantizer.gptq import QuantRecipe  # noqa: E402
from quantizer.perplexity import load_evaluation_windows  # noqa: E402
from quantizer.pipeline import SourceModel, quantize_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
SETTINGS = ("4:128", "4:32", "3:128")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "tiny-llama")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated BITS:GROUP")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of %(default)s")
    parser.add_argument("--expert-calibrations", default=DEFAULT_EXPERT_CALIBRATION,
                        help="mixtures of experts: comma-separated subset of " + ",".join(EXPERT_CALIBRATIONS)
                             + "; each path runs once per mode (dense models: give one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    paths = [x for x in args.paths.split(",") if x]
    missing = peers.available()
    if missing:
        print(f"# {missing}: the lc-* paths are skipped")
        paths = [x for x in paths if x not in PEERS]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len)
    windows = load_evaluation_windows(args.eval_text, tokenizer, args.seq_len, args.max_windows)
    device = torch.device(args.device)
    rows = []
    print(f"{'setting':>7} {'experts':>7} {'path':>24} {'baseline':>9} {'quantized':>9} {'increase':>9} {'vs imx':>7} "
          f"{'seconds':>8}")
    for setting in args.settings.split(","):
        bits, group = (int(x) for x in setting.split(":"))
        for experts in args.expert_calibrations.split(","):
            increases = {}
            for path in paths:
                quantize, fields = quantizer_for(path)
                recipe = QuantRecipe(bits=bits, group_size=group, **(PLAIN | fields))
                start = time.perf_counter()
                result = quantize_model(SourceModel.open(args.model), recipe, calibration.windows, lambda *a: None,
                                        device, eval_windows=windows, method="rtn" if path == "rtn" else "gptq",
                                        progress=False, quantize_matrix=quantize, expert_calibration=experts)  # fmt: skip
                seconds = time.perf_counter() - start
                increase = result.fakequant_ppl - result.baseline_ppl
                increases[path] = increase
                vs_imatrix = increase / increases["lc-imatrix"] if "lc-imatrix" in increases else float("nan")
                tokens = [n for counts in result.expert_tokens.values() for n in counts]
                rows.append({"setting": setting, "expert_calibration": result.expert_calibration or None,
                             "path": path, "baseline_ppl": result.baseline_ppl,
                             "quantized_ppl": result.fakequant_ppl, "increase": increase,
                             "increase_vs_lc_imatrix": vs_imatrix, "seconds": round(seconds, 2),
                             "fewest_routed_tokens": min(tokens) if tokens else None})  # fmt: skip
                print(f"{setting:>7} {result.expert_calibration or '-':>7} {path:>24} {result.baseline_ppl:9.3f} "
                      f"{result.fakequant_ppl:9.3f} {increase:9.4f} {vs_imatrix:7.3f} {seconds:8.1f}", flush=True)  # fmt: skip
    print(f"# {args.model.name}: calibration {calibration.samples} x {calibration.seq_len}, "
          f"evaluation {len(windows)} windows x {windows.ids.shape[1]} tokens, device {device}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
