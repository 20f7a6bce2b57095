"""Layer error and solve time of every quantizer variant, side by side, on the same W and H.

    PYTHONPATH=<llm-compressor deps> python bench/layer_quality_bench.py            # CPU-sized shapes
    python bench/layer_quality_bench.py --quick                                       # a smoke run
    python bench/layer_quality_bench.py --shapes 4096x4096 --settings 4:128,4:32,3:128 --json out.json

Problems
  synthetic OUTxIN  gptq_layer_bench.synthetic_layer: correlated inputs with log-normal channel
                    scales and 10x outlier channels, 0.1% 10x outlier weights
  tiny-llama        every Linear of the bundled model with its real calibration Hessian (captured by
                    the layer pipeline while it quantizes the model with the default recipe, so later
                    layers see quantized inputs, as in a real run); one row sums the 28 layers

Paths (all 4-bit symmetric unless --settings says otherwise, static act-order, damp 0.01, block 128)
  rtn                 round-to-nearest, min-max scales
  lc-minmax           llm-compressor's GPTQ with its default observer          (bench/peers.py)
  lc-imatrix          llm-compressor's GPTQ with its imatrix_mse observer
  gptq                ours, min-max scales (plain GPTQ)
  gptq+diag / +cost   ours, scales searched with diag(H) / GPTQ's per-column cost as weights
  ...+full            full-range signed scales
  ...+refine1         one round of coordinate descent and scale re-fit after the pass
  ...+group           group-aware act-order (GPTQModel's default order)

Columns
  rel_err   ||(W - Wq) X||^2 / ||W X||^2, computed the same way for every path
            (quantizer.gptq.output_energy of W - Wq and of W); for tiny-llama, the sum over layers
            of the numerators over the sum of the denominators
  vs_lc     rel_err / lc-minmax's;  vs_imx: rel_err / lc-imatrix's
  time_s    wall time of one call (median of --repeats), the error evaluation not included
  vs_gptq   time_s / plain gptq's;  vs_lc_t: time_s / lc-imatrix's
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from gptq_layer_bench import synthetic_layer  # noqa: E402

from quantizer.gptq import QuantRecipe, gptq_quantize, output_energy, rtn_quantize  # noqa: E402
from quantizer.pipeline import MatrixQuantizer  # noqa: E402

CPU_SHAPES = ["4096x4096", "11008x4096", "4096x11008"]
QUICK_SHAPES = ["512x1024"]
SETTINGS = ["4:128", "4:32"]
# Our variants: the recipe fields beyond bits and group (PLAIN: plain GPTQ with min-max scales).
PLAIN = {"scale_search": "minmax", "full_range": False, "refine_sweeps": 0, "group_aware_order": False,
         "source_targets": 0.0}
OURS: dict[str, dict[str, Any]] = {
    "gptq": PLAIN,
    "gptq+diag": PLAIN | {"scale_search": "diag"},
    "gptq+cost": PLAIN | {"scale_search": "cost"},
    "gptq+cost+full": PLAIN | {"scale_search": "cost", "full_range": True},
    "gptq+cost+full+refine1": PLAIN | {"scale_search": "cost", "full_range": True, "refine_sweeps": 1},
    "gptq+group": PLAIN | {"group_aware_order": True},
    "gptq+cost+full+group": PLAIN | {"scale_search": "cost", "full_range": True, "group_aware_order": True},
}
PEERS = ("lc-minmax", "lc-imatrix")
PATHS = ("rtn", *PEERS, *OURS)

def quantizer_for(path: str) -> tuple[MatrixQuantizer, dict[str, Any]]:
    if path == "rtn":
        return (lambda w, h, recipe, name="": rtn_quantize(w, recipe, name)), {}
    if path in PEERS:
        return peers.llmcompressor_gptq("minmax" if path == "lc-minmax" else "imatrix_mse"), {}
    return gptq_quantize, OURS[path]


def run_path(path: str, problems: list[tuple[str, torch.Tensor, torch.Tensor]], recipe: QuantRecipe,
             repeats: int, energy: float) -> dict[str, Any]:  # fmt: skip
    """Time and error of one path over the problems; `energy` is their summed ||W X||^2."""
    quantize, fields = quantizer_for(path)
    recipe = QuantRecipe(**{**recipe.to_dict(), **fields})
    seconds, error = 0.0, 0.0
    for name, W, H in problems:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            q = quantize(W, H, recipe, name=name)
            if H.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds += statistics.median(times)
        error += output_energy(W - q.dequantized, H)
    return {"time_s": seconds, "rel_err": error / energy}


def tiny_llama_problems(device: torch.device, samples: int, seq_len: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    from transformers import AutoTokenizer

    from quantizer.calibration import load_calibration
    from quantizer.pipeline import SourceModel, quantize_model

    fixtures = ROOT / "tests" / "fixtures"
    tokenizer = AutoTokenizer.from_pretrained(fixtures / "tiny-llama")
    calibration = load_calibration(fixtures / "text" / "calibration.txt", tokenizer, samples, seq_len)
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def capture(weight, hessian, recipe, name="", block_solver=None):
        captured.append((name, weight.float().clone(), hessian.clone()))
        return gptq_quantize(weight, hessian, recipe, name=name, block_solver=block_solver)

    quantize_model(SourceModel.open(fixtures / "tiny-llama"), QuantRecipe(), calibration.windows, lambda *a: None, device,
                   progress=False, quantize_matrix=capture)  # fmt: skip
    return captured


def ratio(results: dict[str, dict[str, float]], path: str, key: str, of: str) -> float | None:
    return results[path][key] / results[of][key] if of in results else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma-separated OUTxIN (default {','.join(CPU_SHAPES)})")
    p.add_argument("--quick", action="store_true", help=f"shapes {','.join(QUICK_SHAPES)} only")
    p.add_argument("--no-tiny-llama", action="store_true", help="skip the bundled model's layers")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated BITS:GROUP (default %(default)s)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of %(default)s")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = [x for x in args.paths.split(",") if x]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    missing = peers.available()
    if missing:
        print(f"# {missing}: the lc-* paths are skipped")
        paths = [x for x in paths if x not in PEERS]
    shapes = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else CPU_SHAPES)

    problem_sets: list[tuple[str, list[tuple[str, torch.Tensor, torch.Tensor]]]] = []
    for shape in shapes:
        rows, cols = (int(x) for x in shape.lower().split("x"))
        W, H = synthetic_layer(rows, cols, device, args.seed)
        problem_sets.append((shape, [(shape, W, H)]))
    if not args.no_tiny_llama:
        problem_sets.append(("tiny-llama", tiny_llama_problems(device, 128, 256)))

    energies = {label: sum(output_energy(W, H) for _, W, H in problems) for label, problems in problem_sets}
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "peers": None if missing else peers.version()}  # fmt: skip
    print(f"# {env}")
    header = f"{'problem':>11} {'setting':>7} {'path':>24} {'rel_err':>10} {'vs_lc':>6} {'vs_imx':>6} {'time_s':>8} {'vs_gptq':>7} {'vs_lc_t':>7}"
    print(header)
    rows_out = []
    for label, problems in problem_sets:
        for setting in args.settings.split(","):
            bits, group = (int(x) for x in setting.split(":"))
            recipe = QuantRecipe(bits=bits, group_size=group, **PLAIN)
            if any(W.shape[1] % group for _, W, _ in problems):
                print(f"# {label}: group {group} does not divide every in_features; skipped")
                continue
            results = {path: run_path(path, problems, recipe, args.repeats, energies[label]) for path in paths}
            for path, r in results.items():
                row = {"problem": label, "setting": setting, "path": path, **r,
                       "vs_lc": ratio(results, path, "rel_err", "lc-minmax"),
                       "vs_imx": ratio(results, path, "rel_err", "lc-imatrix"),
                       "vs_gptq": ratio(results, path, "time_s", "gptq"),
                       "vs_lc_t": ratio(results, path, "time_s", "lc-imatrix")}  # fmt: skip
                rows_out.append(row)
                fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
                print(f"{label:>11} {setting:>7} {path:>24} {r['rel_err']:10.4e} {fmt(row['vs_lc'], '6.3f')} "
                      f"{fmt(row['vs_imx'], '6.3f')} {r['time_s']:8.2f} {fmt(row['vs_gptq'], '7.2f')} "
                      f"{fmt(row['vs_lc_t'], '7.2f')}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "args": vars(args) | {"json": str(args.json)}, "rows": rows_out},
                                        indent=2, default=str))  # fmt: skip
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
