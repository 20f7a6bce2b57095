"""Whole-model GPTQ beside llm-compressor and GPTQModel: one synthetic model, one calibration, each tool
end to end in its own process, every checkpoint scored the same way.

    python bench/pipeline_peers_bench.py --shape llama3-8b --samples 128 --seq-len 2048 --workdir /tmp/kqp --json out.json
    python bench/pipeline_peers_bench.py --shape llama3-70b --layers 4 --tools ours   # a 70B's first layers, projected
    python bench/pipeline_peers_bench.py --shape tiny --samples 16 --seq-len 256         # the CPU run

The model is random (bench/quantize_model_bench.py writes it as sharded safetensors, so every tool
reads it from disk); the calibration is random token ids written once as input_ids [samples, seq_len],
the same rows for every tool (ours reads the file through `--calibration`, the peers get its rows).
Tools, each with 4-bit symmetric weights, group 128, static act-order, dampening 0.01, lm_head kept:
  ours            run_quantize, the call behind `python -m quantizer quantize` (compressed-tensors checkpoint)
  llmcompressor   `oneshot` with GPTQModifier (min-max observer, its default), the sequential pipeline
  llmcompressor-best  the same with its `imatrix_mse` observer and the activations kept on the GPU
  gptqmodel       GPTQModel.load + quantize + save with desc_act (static act-order)
  gptqmodel-best  GPTQModel with its default ordering (act_group_aware) and its MSE grid search (mse=2.4)
Per tool: wall time of the process (imports, load, quantize, save), the time the tool's own calls
took, peak GPU memory (torch's allocator), peak host RSS, and the mean layer error of the checkpoint
it saved: ||(W - Q) X||^2 / ||W X||^2 per Linear, X the inputs the FP16 model gives each layer on
the calibration rows (`--score-samples` of them), so every tool is measured against the same X.
Peers import from PEERS_SITE (bench/peer_wheels.sh then bench/install_peers.sh), put first on their
PYTHONPATH only; ours runs without it. A tool that fails or passes --timeout is reported as such and
the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quantize_model_bench import SHAPES, write_synthetic_model  # noqa: E402

TOOLS = ("ours", "llmcompressor", "llmcompressor-best", "gptqmodel", "gptqmodel-best")
BITS, GROUP, DAMP = 4, 128, 0.01


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_gpu_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


class ResidentSampler:
    """The process's resident set every `interval` seconds on a thread: whether host memory stays
    flat as the layers go by (the peak alone cannot tell growth from one early spike)."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        start = time.perf_counter()
        while not self._stop.wait(interval):
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.samples.append((time.perf_counter() - start, pages * os.sysconf("SC_PAGE_SIZE")))

    def __enter__(self) -> ResidentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Peak resident bytes in each quarter of the run."""
        if len(self.samples) < 4:
            return {}
        end = self.samples[-1][0]
        quarters = [max((rss for t, rss in self.samples if q * end / 4 <= t <= (q + 1) * end / 4), default=0)
                    for q in range(4)]
        return {"rss_peak_by_quarter_bytes": quarters}


def _rows(calibration: Path) -> torch.Tensor:
    return load_file(calibration)["input_ids"].to(torch.long)


# ---------------------------------------------------------------------------------------------------
# The peers, each run in-process by `_peer` (in its own interpreter)
# ---------------------------------------------------------------------------------------------------


def run_llmcompressor(model_dir: Path, calibration: Path, output: Path, best: bool) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    rows = _rows(calibration)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    loaded = time.perf_counter()
    weights = QuantizationArgs(num_bits=BITS, type="int", symmetric=True, strategy="group", group_size=GROUP,
                               actorder="static", observer="imatrix_mse" if best else "minmax")
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], block_size=128, dampening_frac=DAMP)
    dataset = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()})
    on_gpu = "cuda" if torch.cuda.is_available() else "cpu"
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=rows.shape[0],
            max_seq_length=rows.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
            sequential_offload_device=on_gpu if best else "cpu")
    quantized = time.perf_counter()
    model.save_pretrained(output, save_compressed=True)
    saved = time.perf_counter()
    import llmcompressor

    return {"version": f"llmcompressor {llmcompressor.__version__}", "load_s": loaded - start,
            "quantize_s": quantized - loaded, "save_s": saved - quantized}


def run_gptqmodel(model_dir: Path, calibration: Path, output: Path, best: bool) -> dict:
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    rows = _rows(calibration)
    start = time.perf_counter()
    options = {"act_group_aware": True, "mse": 2.4} if best else {"desc_act": True, "act_group_aware": False}
    config = QuantizeConfig(bits=BITS, group_size=GROUP, sym=True, damp_percent=DAMP, **options)
    model = GPTQModel.load(str(model_dir), config)
    loaded = time.perf_counter()
    data = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)} for row in rows]
    model.quantize(data, batch_size=1)
    quantized = time.perf_counter()
    model.save(str(output))
    saved = time.perf_counter()
    return {"version": f"gptqmodel {gptqmodel.__version__}", "load_s": loaded - start,
            "quantize_s": quantized - loaded, "save_s": saved - quantized}


def run_ours(model_dir: Path, calibration: Path, output: Path) -> dict:
    """run_quantize, the CLI's own call, after the imports it would do lazily (as the peers' are)."""
    import compressed_tensors  # noqa: F401 - imported up front, as the peers' libraries are
    import transformers  # noqa: F401

    from quantizer.gptq import QuantRecipe
    from quantizer.quantize import QuantizeOptions, run_quantize

    rows = _rows(calibration)
    recipe = QuantRecipe(bits=BITS, group_size=GROUP, sym=True, act_order=True, damp=DAMP)
    start = time.perf_counter()
    result = run_quantize(QuantizeOptions(model=model_dir, output=output, calibration=calibration, recipe=recipe,
                                          samples=rows.shape[0], seq_len=rows.shape[1], overwrite=True))
    done = time.perf_counter()
    details = result.to_dict()
    return {"version": "kubequant", "quantize_s": done - start, "load_s": 0.0, "save_s": 0.0,
            "stage_seconds": details["stage_seconds"], "solver": details["solver"],
            "own_mean_layer_error": details["mean_relative_error"]}


PEERS = {
    "ours": run_ours,
    "llmcompressor": lambda m, c, o: run_llmcompressor(m, c, o, best=False),
    "llmcompressor-best": lambda m, c, o: run_llmcompressor(m, c, o, best=True),
    "gptqmodel": lambda m, c, o: run_gptqmodel(m, c, o, best=False),
    "gptqmodel-best": lambda m, c, o: run_gptqmodel(m, c, o, best=True),
}


# ---------------------------------------------------------------------------------------------------
# One scorer for every checkpoint
# ---------------------------------------------------------------------------------------------------


def score(model_dir: Path, calibration: Path, samples: int, checkpoints: dict[str, Path]) -> dict:
    """Per-Linear ||(W - Q) X||^2 / ||W X||^2 of each checkpoint, X from the FP model: our pipeline
    runs the source model with a matrix "quantizer" that scores every checkpoint's weight for that
    Linear against the Hessian it is handed, and gives back W itself, so the inputs stay FP."""
    from quantizer.checkpoint import quantized_parts, read_quantization_config
    from quantizer.formats import format_of
    from quantizer.gptq import QuantizedWeight, QuantRecipe, relative_output_error
    from quantizer.pipeline import SourceModel, quantize_model

    readers = {}
    for tool, directory in checkpoints.items():
        qconfig = read_quantization_config(directory)
        fmt = format_of(qconfig)
        readers[tool] = (fmt, fmt.scheme(qconfig), quantized_parts(directory, fmt))
    errors: dict[str, dict[str, float]] = {tool: {} for tool in checkpoints}

    def scorer(weight, hessian, recipe, name="", block_solver=None):
        for tool, (fmt, scheme, parts) in readers.items():
            layer = name.removesuffix(".weight")
            if layer not in parts:
                raise SystemExit(f"{tool}: {checkpoints[tool]} has no quantized {layer}")
            q = fmt.dequantize({part: header.read() for part, header in parts[layer].items()}, scheme)
            errors[tool][layer] = relative_output_error(weight.float(), q.to(weight.device).float(), hessian)
        rows, cols = weight.shape
        return QuantizedWeight(codes=torch.zeros(rows, cols, dtype=torch.int32), scales=torch.ones(rows, 1),
                               zeros=torch.zeros(rows, 1), dequantized=weight, group_size=cols, damp=0.0,
                               relative_error=0.0)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = QuantRecipe(bits=BITS, group_size=GROUP, sym=True, act_order=True, damp=DAMP)
    quantize_model(SourceModel.open(model_dir), recipe, _rows(calibration)[:samples], lambda *a: None, device,
                   quantize_matrix=scorer, progress=False)
    return {tool: {"mean_layer_error": sum(e.values()) / len(e), "linears": len(e), "per_linear": e}
            for tool, e in errors.items()}


# ---------------------------------------------------------------------------------------------------
# The run: one subprocess per tool, then the scorer
# ---------------------------------------------------------------------------------------------------


def _environment(tool: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tool != "ours" and os.environ.get("PEERS_SITE"):
        env["PYTHONPATH"] = os.pathsep.join([os.environ["PEERS_SITE"], str(ROOT)])
    else:
        env["PYTHONPATH"] = str(ROOT)
    if tool.startswith("gptqmodel") and (os.cpu_count() or 1) < 4:
        # Its default CPU pool is half the cores, below the two workers its own model loader asks for.
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    return env


def run_tool(tool: str, model_dir: Path, calibration: Path, output: Path, timeout: float) -> dict:
    report = output.parent / f"{tool}.json"
    command = [sys.executable, __file__, "_peer", "--tool", tool, "--model", str(model_dir),
               "--calibration", str(calibration), "--output", str(output), "--report", str(report)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=_environment(tool), timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "ok": False, "why": f"did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if done.returncode != 0 or not report.exists():
        return {"tool": tool, "ok": False, "why": f"exit {done.returncode} (its output is above)"}
    data = json.loads(report.read_text())
    return {"tool": tool, "ok": True, "process_wall_s": round(wall, 1), **data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, help="decoder layers to write (default: the shape's depth)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, run in order, of {', '.join(TOOLS)}")
    parser.add_argument("--score-samples", type=int, default=32, help="calibration rows the scorer's X comes from")
    parser.add_argument("--no-score", action="store_true", help="skip the common layer-error scoring")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per tool")
    parser.add_argument("--workdir", type=Path, help="model, calibration and checkpoints (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="reuse the model and calibration already in --workdir")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tools = args.tools.split(",")
    if unknown := [t for t in tools if t not in TOOLS]:
        parser.error(f"--tools: unknown {unknown}; choose from {', '.join(TOOLS)}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kq-peers-"))
    depth = args.layers or SHAPES[args.shape][2]
    model_dir = workdir / f"synthetic-{args.shape}-{depth}layers"
    calibration = workdir / f"calibration-{args.samples}x{args.seq_len}.safetensors"
    write_seconds = None
    if not (args.reuse and model_dir.exists()):
        shutil.rmtree(model_dir, ignore_errors=True)
        start = time.perf_counter()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        write_synthetic_model(model_dir, args.shape, torch.bfloat16, device, layers=depth)
        write_seconds = round(time.perf_counter() - start, 1)
    if not (args.reuse and calibration.exists()):
        vocab = SHAPES[args.shape][5]
        ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids.to(torch.int32)}, calibration)

    runs = []
    for tool in tools:
        output = workdir / "out" / tool
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(output, ignore_errors=True)
        print(f"== {tool}", flush=True)
        runs.append(run_tool(tool, model_dir, calibration, output, args.timeout))
        print(json.dumps(runs[-1]), flush=True)

    finished = {r["tool"]: workdir / "out" / r["tool"] for r in runs if r["ok"]}
    scores = {}
    if finished and not args.no_score:
        print("== scoring", ", ".join(finished), flush=True)
        scores = score(model_dir, calibration, min(args.score_samples, args.samples), finished)
    for run in runs:
        if run["tool"] in scores:
            run["mean_layer_error"] = scores[run["tool"]]["mean_layer_error"]
            run["layer_errors"] = scores[run["tool"]]["per_linear"]

    report = {
        "shape": args.shape, "layers": depth, "shape_depth": SHAPES[args.shape][2],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "driver": _driver(), "torch": torch.__version__, "samples": args.samples, "seq_len": args.seq_len,
        "score_samples": min(args.score_samples, args.samples), "model_write_seconds": write_seconds, "runs": runs,
        "ratios_to_ours": _ratios(runs), "projection": _projection(runs, depth, SHAPES[args.shape][2]),
    }
    _print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(workdir)


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _ratios(runs: list[dict]) -> dict:
    """Each peer's figure divided by ours: above 1 means ours is faster, smaller or more exact."""
    ours = next((r for r in runs if r["tool"] == "ours" and r["ok"]), None)
    if ours is None:
        return {}
    out = {}
    for run in runs:
        if run["tool"] == "ours" or not run["ok"]:
            continue
        ratio = {"process_wall": run["process_wall_s"] / ours["process_wall_s"],
                 "work": run["work_s"] / ours["work_s"]}
        for key in ("peak_gpu_bytes", "peak_host_bytes", "mean_layer_error"):
            if ours.get(key) and run.get(key) is not None:
                ratio[key.removesuffix("_bytes")] = run[key] / ours[key]
        out[run["tool"]] = {k: round(v, 3) for k, v in ratio.items()}
    return out


def _projection(runs: list[dict], layers: int, depth: int) -> dict | None:
    """Ours at the shape's full depth from a run over its first layers: the per-layer time times the
    depth plus what is paid once. A projection, not a measurement."""
    ours = next((r for r in runs if r["tool"] == "ours" and r["ok"]), None)
    if ours is None or layers >= depth:
        return None
    stages = ours["stage_seconds"]
    per_layer = sum(stages.values()) / layers
    return {"layers_measured": layers, "depth": depth, "seconds_per_layer": round(per_layer, 2),
            "projected_work_s": round(ours["work_s"] + per_layer * (depth - layers), 1),
            "note": "projection: per-layer time of the measured layers times the remaining depth"}


def _print_summary(report: dict) -> None:
    print(f"\n{report['shape']} ({report['layers']} layers), {report['samples']} x {report['seq_len']} calibration, "
          f"{report['device']}")
    print(f"{'tool':<20} {'wall s':>8} {'work s':>11} {'GPU GiB':>8} {'RSS GiB':>8} {'layer err':>10}  RSS by quarter GiB")
    for run in report["runs"]:
        if not run["ok"]:
            print(f"{run['tool']:<20} {run['why']}")
            continue
        err = run.get("mean_layer_error")
        print(f"{run['tool']:<20} {run['process_wall_s']:>8.1f} {run['work_s']:>11.1f} "
              f"{run['peak_gpu_bytes'] / 2**30:>8.2f} {run['peak_host_bytes'] / 2**30:>8.2f} "
              f"{err if err is None else f'{err:.3e}':>10}  "
              + " ".join(f"{q / 2**30:.2f}" for q in run.get("rss_peak_by_quarter_bytes", [])))
    for tool, ratio in report["ratios_to_ours"].items():
        print(f"{tool} / ours: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    if report["projection"]:
        p = report["projection"]
        print(f"projection to {p['depth']} layers: {p['projected_work_s']} s ({p['seconds_per_layer']} s per layer)")


def _peer_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="pipeline_peers_bench.py _peer")
    parser.add_argument("--tool", choices=sorted(PEERS), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    with ResidentSampler() as rss:
        figures = PEERS[args.tool](args.model, args.calibration, args.output)
    figures.update(peak_gpu_bytes=_peak_gpu_bytes(), peak_host_bytes=_peak_rss_bytes(), **rss.summary())
    figures["work_s"] = round(figures["load_s"] + figures["quantize_s"] + figures["save_s"], 2)
    args.report.write_text(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_peer"]:
        _peer_main(sys.argv[2:])
    else:
        main()
