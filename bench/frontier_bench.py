"""The size/quality frontier through written checkpoints served by vLLM: uniform settings, mixed precision
at three budgets, 8-bit (on a GPU: vLLM's CPU kernel serves 4-bit only) and the source.

    python bench/frontier_bench.py                         # the tiny Llama, CPU, calibration seed 0
    python bench/frontier_bench.py --models tiny-qwen3-moe --seed 1 --json out.json --svg out.svg

Each point is what a user gets: `python -m quantizer quantize` writes the checkpoint (mixed precision with
`--mixed-finer 4:32 --mixed-budget P`, P a share of what uniform 4:32 adds over 4:128), `python -m
quantizer evaluate` serves it in vLLM against the source served by the same engine (its scores measured
once, `--source-scores`) and reports the served perplexity, the KL divergence to the source over the top
log-probabilities vLLM returns, and top-1 agreement. Size is the checkpoint's weights on disk. Mixed
precision should reach a lower KL than the uniform setting of the same size; the table says where it does
not. `--svg` draws KL against size.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from quantizer.contract import MANIFEST_FILE  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MODELS = {"tiny-llama": FIXTURES / "tiny-llama", "tiny-qwen3-moe": FIXTURES / "tiny-qwen3-moe"}
SHARES = (0.25, 0.5, 0.75)  # of what uniform fine adds over uniform coarse


def run(args: list[str], what: str) -> dict:
    """A quantizer CLI command in its own process (vLLM spawns engines); its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        done = subprocess.run([sys.executable, "-m", "quantizer", *args, "--result-file", result.name],
                              capture_output=True, text=True)
        data = json.loads(Path(result.name).read_text() or "{}")
    if done.returncode not in (0, 3) or data.get("status") != "Succeeded":
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return data


def point(name: str, model: Path, work: Path, args, quantize_args: list[str] | None, serve: bool = True) -> dict[str, Any]:
    """Quantize (None: the source itself) and serve (unless not `serve`: then only the quantizer's own
    exact KL of its fake-quant model); size, KL, top-1, served perplexity."""
    started = time.perf_counter()
    checkpoint, quantized = model, None
    if quantize_args is not None:
        checkpoint = work / name
        quantized = run(["quantize", "--model", str(model), "--output", str(checkpoint), "--calibration",
                         str(args.calibration), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                         "--seed", str(args.seed), "--eval-text", str(args.eval_text), "--eval-seq-len",
                         str(args.seq_len), "--eval-max-windows", str(args.max_windows), "--no-progress",
                         *(["--device", "cpu"] if args.device == "cpu" else []), *quantize_args], f"quantize {name}")
    size = quantized["size_after_bytes"] if quantized else sum(
        f.stat().st_size for f in model.glob("*.safetensors"))
    if quantized is None:
        return {"name": name, "size_bytes": size, "kl": 0.0, "top1": 1.0, "served_ppl": None, "fakequant_kl": 0.0,
                "seconds": 0.0}
    if not serve:
        return {"name": name, "size_bytes": size, "kl": None, "top1": None, "served_ppl": None,
                "fakequant_kl": quantized["fakequant_kl"], "seconds": round(time.perf_counter() - started, 1)}
    evaluated = run(["evaluate", "--model", str(checkpoint), "--eval-text", str(args.eval_text), "--seq-len",
                     str(args.seq_len), "--max-windows", str(args.max_windows), "--baseline-model", str(model),
                     "--source-scores", str(work / "source-scores"), "--baseline-ppl", repr(quantized["baseline_ppl"]),
                     "--fakequant-ppl", repr(quantized["fakequant_ppl"]), "--max-ppl-ratio", "10",
                     "--engine-tolerance", "1"], f"evaluate {name}")
    mixed = mixed_plan(checkpoint)
    return {"name": name, "size_bytes": size, "kl": evaluated["kl_divergence"]["mean"],
            "top1": evaluated["top_token_agreement"], "served_ppl": evaluated["served_ppl"],
            "baseline_ppl": evaluated["baseline_ppl"], "fakequant_kl": quantized["fakequant_kl"],
            "mixed": mixed, "seconds": round(time.perf_counter() - started, 1)}


def mixed_plan(checkpoint: Path) -> dict[str, Any] | None:
    """Mixed precision's plan from the checkpoint's manifest: the summary the result gives too, and the
    units kept finer, which the result leaves out."""
    plan = json.loads((checkpoint / MANIFEST_FILE).read_text()).get("mixed_precision")
    if plan is None:
        return None
    units = plan.pop("units", [])
    return plan | {"finer_unit_names": [u["unit"] for u in units if u["finer"]]}


def run_model(model: Path, args) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"frontier-{model.name}-"))
    points = [point(f"uniform {s}", model, work, args, ["--bits", s.split(":")[0], "--group-size", s.split(":")[1]])
              for s in (args.coarse, args.between, args.fine)]
    coarse, fine = points[0]["size_bytes"], points[-1]["size_bytes"]
    for share in args.shares:
        budget = 100 * share * (fine - coarse) / coarse
        points.append(point(f"mixed {share:.0%} ({args.sensitivity})", model, work, args, [
            "--bits", args.coarse.split(":")[0], "--group-size", args.coarse.split(":")[1],
            "--mixed-finer", args.fine, "--mixed-budget", f"{budget:.4f}", "--mixed-sensitivity", args.sensitivity]))
    # vLLM's CPU kernel serves 4-bit only: on a CPU the 8-bit checkpoint is written and measured by the
    # quantizer's fake-quant model alone.
    points.append(point("uniform 8:128", model, work, args, ["--bits", "8", "--group-size", "128"],
                        serve=args.device != "cpu"))
    points.append(point("source", model, work, args, None))
    return {"model": model.name, "seed": args.seed, "points": sorted(points, key=lambda p: p["size_bytes"])}


def print_model(result: dict[str, Any]) -> None:
    print(f"\n## {result['model']} (calibration seed {result['seed']})")
    print("| checkpoint | size (KiB) | KL to the source (vLLM) | top-1 | served perplexity | exact KL (fake-quant) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for p in result["points"]:
        ppl = f"{p['served_ppl']:.4f}" if p["served_ppl"] else "-"
        kl, top1 = (f"{p['kl']:.5g}", f"{p['top1']:.2%}") if p["kl"] is not None else ("not served", "-")
        print(f"| {p['name']} | {p['size_bytes'] / 1024:.1f} | {kl} | {top1} | {ppl} | {p['fakequant_kl']:.5g} |")
    uniform = [p for p in result["points"] if p["name"].startswith("uniform") and p["kl"] is not None]
    for p in (p for p in result["points"] if p["name"].startswith("mixed")):
        # The uniform settings around it, interpolated at its size: mixed should sit below the line.
        below = max((u for u in uniform if u["size_bytes"] <= p["size_bytes"]), key=lambda u: u["size_bytes"])
        above = min((u for u in uniform if u["size_bytes"] >= p["size_bytes"]), key=lambda u: u["size_bytes"])
        span = above["size_bytes"] - below["size_bytes"]
        at = (p["size_bytes"] - below["size_bytes"]) / span if span else 0
        served, exact = ((below[k] + (above[k] - below[k]) * at) for k in ("kl", "fakequant_kl"))
        print(f"{p['name']}: KL {p['kl']:.5g} vs {served:.5g} for uniform settings at its size ({p['kl'] / served:.2f}x); "
              f"exact {p['fakequant_kl']:.5g} vs {exact:.5g} ({p['fakequant_kl'] / exact:.2f}x)")


def svg(results: list[dict[str, Any]], path: Path) -> None:
    """KL against size, one panel per model: uniform settings as a line, mixed precision as points."""
    width, height, pad = 420, 300, 50
    panels = []
    for index, result in enumerate(results):
        points = [p for p in result["points"] if p["name"] != "source" and p["kl"] is not None]
        xs = [p["size_bytes"] / 1024 for p in points]
        ys = [p["kl"] for p in points]
        x0, x1, y1 = min(xs), max(xs), max(ys) * 1.1

        def at(x: float, y: float, x0=x0, x1=x1, y1=y1) -> tuple[float, float]:
            return (pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad), height - pad - y / y1 * (height - 2 * pad))

        parts = [f'<g transform="translate({index * width},0)">',
                 f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{result["model"]}</text>',
                 f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
                 f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
                 f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="11">checkpoint size (KiB)</text>',
                 f'<text x="14" y="{height / 2}" font-size="11" transform="rotate(-90 14 {height / 2})" '
                 f'text-anchor="middle">KL to the source</text>']
        uniform = [at(p["size_bytes"] / 1024, p["kl"]) for p in points if p["name"].startswith("uniform")]
        parts.append('<polyline fill="none" stroke="#888" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in uniform) + '"/>')
        for p in points:
            x, y = at(p["size_bytes"] / 1024, p["kl"])
            colour = "#d62728" if p["name"].startswith("mixed") else "#1f77b4"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
            parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="9">{p["name"]}</text>')
        for tick in (x0, x1):
            parts.append(f'<text x="{at(tick, 0)[0]:.1f}" y="{height - pad + 14}" font-size="9" '
                         f'text-anchor="middle">{tick:.0f}</text>')
        parts.append(f'<text x="{pad - 4}" y="{pad + 4}" font-size="9" text-anchor="end">{y1:.4f}</text>')
        parts.append("</g>")
        panels.append("\n".join(parts))
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(results)}" height="{height}">\n'
                    + "\n".join(panels) + "\n</svg>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama", help="fixture names or model folders, comma-separated")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or auto/cuda to add 8-bit (served on a GPU)")
    parser.add_argument("--coarse", default="4:128")
    parser.add_argument("--between", default="4:64")
    parser.add_argument("--fine", default="4:32")
    parser.add_argument("--sensitivity", default="solo")
    parser.add_argument("--shares", type=lambda v: [float(s) for s in v.split(",")], default=list(SHARES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--svg", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = []
    for name in args.models.split(","):
        result = run_model(MODELS.get(name, Path(name)), args)
        print_model(result)
        results.append(result)
    if args.json:
        env = {"machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - started, 1),
               "argv": sys.argv[1:]}
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    if args.svg:
        svg(results, args.svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
