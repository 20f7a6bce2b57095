"""Per-layer GPTQ time: our PyTorch column loop vs our Triton block kernel vs llm-compressor.

Every path quantizes the same W [out, in] with the same synthetic correlated Hessian H [in, in]
(H = S (F F^T / k + 0.1 I) S: a rank-k shared factor correlates the channels, S gives them
log-normal scales plus a few 10x outlier channels, like a transformer layer's inputs).

Paths
  torch          quantizer.gptq.gptq_quantize(..., block_solver=solve_block_torch)
  triton         quantizer.gptq.gptq_quantize(..., block_solver=solve_block_triton)   (CUDA only)
  llmcompressor  llm-compressor 0.14's weight observer and quantize_weight (bench/peers.py), when it
                 imports: --lc-observer imatrix_mse (default, its best) or minmax; static act-order,
                 its own Triton kernel where it has one; the observer's time is in its time_s
Our paths run the recipe given by the flags (default: the default recipe, --scale-search minmax
--no-full-range for plain GPTQ). For the quality of each variant side by side, see
bench/layer_quality_bench.py.

Columns
  time_s     wall time of one whole-layer call, CUDA-synchronized, median of --repeats runs after
             --warmup runs (the warm-up absorbs Triton compilation and autotuning)
  GFLOP/s    nominal FLOPs / time_s, with the same count for every path (so GFLOP/s ratios are
             speed ratios):  FLOPs = out * in * (in - 1)  +  (4/3) * in^3
             - out * in * (in - 1): GPTQ's error feedback, one multiply-add (2 FLOPs) for every row
               and every column pair i < j, whether done as rank-1 updates inside a block or as the
               lazy-batch matmul after it;
             - (4/3) in^3: the classic factorization's count, Cholesky of H (in^3/3),
               cholesky_inverse (2 in^3/3), Cholesky of H^-1 (in^3/3); llm-compressor does that,
               ours needs 2/3 in^3 (one Cholesky of the flipped H, one triangular inverse) but is
               credited with the same nominal count.
             Not counted: quantization arithmetic and the scale search (O(out * in) each), and
             the ||W X||^2 matmul of the error gptq_quantize reports (out x in x in, inside our
             time_s); llm-compressor's error is measured after its timed call.
  speedup    torch time_s / this path's time_s
  loop_s     time spent inside the block solver alone (one extra run, synchronized around each
             block; the torch path's cost is dominated by ~8 kernel launches per column)
  rel_err    ||(W - Wq) X||^2 / ||W X||^2 = quantizer.gptq.relative_output_error(W, Wq, H)
  peak_GiB   peak CUDA memory allocated during one call, above what W and H already hold
  code_diff  fraction of integer codes that differ from the torch path (expected 0 for triton:
             the kernel is bit-exact by design; llm-compressor returns no codes)

Usage
  python bench/gptq_layer_bench.py                         # all shapes, CUDA
  python bench/gptq_layer_bench.py --quick                 # small shapes (CPU smoke test)
  python bench/gptq_layer_bench.py --shapes 4096x4096,8192x28672 --bits 8 --group -1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

import peers

from quantizer.contract import GROUP_SIZES, QUANTIZABLE_BITS, SCALE_SEARCHES
from quantizer.gptq import (
    QuantRecipe,
    gptq_quantize,
    relative_output_error,
    solve_block_torch,
)

# (out, in) of the usual Llama/Mistral projections: attention 4096^2, MLP up/gate and down of
# Mistral-7B (14336) and Llama-2-7B (11008), and a 70B-class down projection (28672 inputs).
FULL_SHAPES = ["4096x4096", "14336x4096", "4096x14336", "8192x28672", "11008x4096", "4096x11008"]
QUICK_SHAPES = ["256x512", "512x1024", "1024x512"]
PATHS = ("torch", "triton", "llmcompressor")


def parse_shape(text: str) -> tuple[int, int]:
    out, _, inp = text.lower().partition("x")
    return int(out), int(inp)


def nominal_flops(rows: int, cols: int) -> float:
    return rows * cols * (cols - 1) + 4.0 / 3.0 * cols**3


def synthetic_layer(
    rows: int, cols: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] and a positive-definite, correlated H [cols, cols] (see the docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, device=device) * 0.02
    W = torch.where(torch.rand(rows, cols, generator=g, device=device) < 0.001, W * 10, W)
    k = min(512, cols)
    F = torch.randn(cols, k, generator=g, device=device)
    s = torch.exp(0.5 * torch.randn(cols, generator=g, device=device))
    outliers = torch.randperm(cols, generator=g, device=device)[: max(1, cols // 256)]
    s[outliers] *= 10.0
    H = F @ F.T / k
    H.diagonal().add_(0.1)
    H = s[:, None] * H * s[None, :]
    return W, H


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One GPTQ implementation: run() quantizes the layer and returns what the table needs."""

    def __init__(self, name: str, run: Callable[[], dict[str, Any]], loop_run: Callable[[], float] | None):
        self.name = name
        self.run = run
        self.loop_run = loop_run


def timed_solver(solver: Callable, device: torch.device, acc: list[float]) -> Callable:
    def wrapped(*args: Any) -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = solver(*args)
        sync(device)
        acc[0] += time.perf_counter() - t0
        return out

    return wrapped


def ours(name: str, solver: Callable, W: torch.Tensor, H: torch.Tensor, recipe: QuantRecipe) -> Runner:
    def run() -> dict[str, Any]:
        q = gptq_quantize(W, H, recipe, name=name, block_solver=solver)
        return {"codes": q.codes, "dequantized": q.dequantized, "rel_err": q.relative_error}

    def loop_run() -> float:
        acc = [0.0]
        gptq_quantize(W, H, recipe, name=name, block_solver=timed_solver(solver, H.device, acc))
        return acc[0]

    return Runner(name, run, loop_run)


def llmcompressor_path(W: torch.Tensor, H: torch.Tensor, recipe: QuantRecipe, observer: str) -> tuple[Runner | None, str]:
    """llm-compressor 0.14's observer and GPTQ (bench/peers.py) on the same W and H; its own Triton
    block kernel when it supports the recipe. Returns the runner, or None and why it is skipped."""
    missing = peers.available()
    if missing:
        return None, missing
    quantize = peers.llmcompressor_gptq(observer)

    def run() -> dict[str, Any]:
        q = quantize(W, H, recipe)
        return {"codes": None, "dequantized": q.dequantized, "rel_err": None}  # measured after timing

    return Runner("llmcompressor", run, None), f"{peers.version()}, observer {observer}"


def measure(path: Runner, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    for _ in range(warmup):
        path.run()
    base = 0
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    result: dict[str, Any] = {}
    for _ in range(repeats):
        result = {}  # let the previous run's outputs go before the next one allocates
        sync(device)
        t0 = time.perf_counter()
        result = path.run()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    loop_s = path.loop_run() if path.loop_run else None
    return {
        "times_s": times,
        "time_s": statistics.median(times),
        "loop_s": loop_s,
        "peak_GiB": peak,
        **result,
    }


def bench_shape(
    rows: int,
    cols: int,
    recipe: QuantRecipe,
    device: torch.device,
    paths: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    W, H = synthetic_layer(rows, cols, device, args.seed)
    runners: list[Runner] = []
    notes: dict[str, str] = {}
    if "torch" in paths:
        runners.append(ours("torch", solve_block_torch, W, H, recipe))
    if "triton" in paths:
        if device.type != "cuda":
            notes["triton"] = "skipped: needs CUDA"
        else:
            try:
                from quantizer.gptq_triton import solve_block_triton
            except ImportError as exc:
                notes["triton"] = f"skipped: {exc}"
            else:
                runners.append(ours("triton", solve_block_triton, W, H, recipe))
    if "llmcompressor" in paths:
        runner, note = llmcompressor_path(W, H, recipe, args.lc_observer)
        notes["llmcompressor"] = note
        if runner:
            runners.append(runner)

    flops = nominal_flops(rows, cols)
    results: dict[str, dict[str, Any]] = {}
    for runner in runners:
        try:
            results[runner.name] = measure(runner, device, args.warmup, args.repeats)
            if results[runner.name]["rel_err"] is None:
                results[runner.name]["rel_err"] = relative_output_error(W, results[runner.name]["dequantized"], H)
        except Exception as exc:  # one broken path must not hide the others' numbers
            notes[runner.name] = f"failed: {type(exc).__name__}: {exc}"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ref = results.get("torch")
    row: dict[str, Any] = {"shape": f"{rows}x{cols}", "out": rows, "in": cols, "nominal_gflop": flops / 1e9}
    row["paths"] = {}
    for name, r in results.items():
        entry = {
            "time_s": r["time_s"],
            "times_s": r["times_s"],
            "gflops": flops / r["time_s"] / 1e9,
            "speedup_vs_torch": ref["time_s"] / r["time_s"] if ref else None,
            "loop_s": r["loop_s"],
            "loop_speedup_vs_torch": (
                ref["loop_s"] / r["loop_s"] if ref and ref["loop_s"] and r["loop_s"] else None
            ),
            "rel_err": r["rel_err"],
            "peak_GiB": r["peak_GiB"],
            "code_diff_vs_torch": None,
            "max_abs_dequant_diff_vs_torch": None,
        }
        if ref is not None and name != "torch":
            if r["codes"] is not None:
                entry["code_diff_vs_torch"] = float((r["codes"] != ref["codes"]).float().mean())
            entry["max_abs_dequant_diff_vs_torch"] = float(
                (r["dequantized"] - ref["dequantized"]).abs().max()
            )
        row["paths"][name] = entry
    row["notes"] = notes
    return row


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'shape':>11} {'path':>13} {'time_s':>9} {'GFLOP/s':>9} {'speedup':>8} {'loop_s':>9} "
        f"{'loop_x':>8} {'rel_err':>10} {'peak_GiB':>9} {'code_diff':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for name, e in row["paths"].items():
            print(
                f"{row['shape']:>11} {name:>13} {fmt(e['time_s'], '9.4f')} {fmt(e['gflops'], '9.1f')} "
                f"{fmt(e['speedup_vs_torch'], '8.2f')} {fmt(e['loop_s'], '9.4f')} "
                f"{fmt(e['loop_speedup_vs_torch'], '8.1f')} {fmt(e['rel_err'], '10.3e')} "
                f"{fmt(e['peak_GiB'], '9.2f')} {fmt(e['code_diff_vs_torch'], '9.2e')}"
            )
        for name, note in row["notes"].items():
            if not note.startswith("llmcompressor "):
                print(f"{row['shape']:>11} {name:>13} {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma-separated OUTxIN (default: {','.join(FULL_SHAPES)})")
    p.add_argument("--quick", action="store_true", help=f"small shapes {','.join(QUICK_SHAPES)}")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of %(default)s")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--bits", type=int, default=4, choices=QUANTIZABLE_BITS)
    p.add_argument("--group", type=int, default=128, choices=GROUP_SIZES)
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--scale-search", choices=SCALE_SEARCHES, default=QuantRecipe.scale_search)
    p.add_argument("--full-range", action=argparse.BooleanOptionalAction, default=QuantRecipe.full_range)
    p.add_argument("--refine-sweeps", type=int, default=QuantRecipe.refine_sweeps)
    p.add_argument("--lc-observer", choices=peers.OBSERVERS, default="imatrix_mse",
                   help="llm-compressor's weight observer (default: its best, imatrix_mse)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (CPU runs)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = (
        QUICK_SHAPES
        if args.quick and not args.shapes
        else (args.shapes.split(",") if args.shapes else FULL_SHAPES)
    )
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    recipe = QuantRecipe(
        bits=args.bits, group_size=args.group, sym=args.sym, act_order=args.act_order,
        damp=args.damp, block_size=args.block_size, scale_search=args.scale_search,
        full_range=args.full_range, refine_sweeps=args.refine_sweeps,
    )  # fmt: skip
    recipe.validate()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    print(f"# {env}")
    print(f"# recipe {recipe.to_dict()}; warmup {args.warmup}, median of {args.repeats}")

    rows_out = []
    for shape in shapes:
        rows, cols = parse_shape(shape)
        effective = recipe.group_size if recipe.group_size != -1 else cols
        if cols % effective:
            print(f"# {shape}: skipped, in_features {cols} not divisible by group {effective}")
            continue
        row = bench_shape(rows, cols, recipe, device, paths, args)
        rows_out.append(row)
        print_table([row])
        sys.stdout.flush()

    print()
    print_table(rows_out)
    notes = {n: v for r in rows_out for n, v in r["notes"].items()}
    for name, note in sorted(notes.items()):
        print(f"# {name}: {note}")
    if device.type == "cuda":
        try:
            from quantizer.gptq_triton import tuned_configs

            env["triton_configs"] = tuned_configs()
            print(f"# triton autotuned configs: {env['triton_configs']}")
        except ImportError:
            pass
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"env": env, "recipe": recipe.to_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                   "results": rows_out}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
