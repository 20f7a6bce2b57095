"""Host memory of the real quantize path (writer, verify, manifest) at two depths of one model shape.

    python bench/checkpoint_memory_bench.py --workdir /tmp/kq-mem --depths 8,32 --json out.json

Each depth runs `python -m quantizer quantize` as the Job does, in its own process, on a synthetic
model of the shape (llama3-8b: hidden 4096, intermediate 14336, vocab 128256) written to --workdir
as sharded safetensors. Round-to-nearest with min-max scales keeps the run short on a CPU: the
memory that could grow with depth is in the checkpoint writer, the verification and the copy of the
outer tensors, which do not depend on the method. The process's resident set is sampled every 50 ms,
split at the moment the commit starts (the index appears in the writer's temporary directory), and
its true peak comes from the kernel (wait4's ru_maxrss). Flat in depth: the deep model's peak is the
shallow one's. The manifest's own figure (peak_memory.host_bytes) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from quantize_model_bench import MOE_SHAPES, SHAPES, write_synthetic_model  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GIB = 2**30


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _model(workdir: Path, shape: str, depth: int) -> Path:
    path = workdir / f"synthetic-{shape}-{depth}layers"
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        write_synthetic_model(path, shape, torch.bfloat16, torch.device("cpu"), layers=depth)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    # Any tokenizer whose ids are below the vocabulary size serves: the text does not set the cost.
    for name in TOKENIZER_FILES:
        shutil.copy2(ROOT / "tests/fixtures/tiny-llama" / name, path / name)
    return path


def measure(model: Path, output: Path, calibration: Path, method: str = "rtn", samples: int = 2,
            seq_len: int = 128) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    result_file = output.parent / f"{output.name}.result.json"
    recipe = ["--method", "rtn", "--scale-search", "minmax"] if method == "rtn" else ["--method", "gptq"]
    command = [sys.executable, "-m", "quantizer", "quantize", "--model", str(model), "--output", str(output),
               "--calibration", str(calibration), *recipe,
               "--samples", str(samples), "--seq-len", str(seq_len), "--device", "cpu", "--no-progress",
               "--result-file", str(result_file)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    samples: list[tuple[float, int, bool]] = []  # (seconds, rss, committing)
    done = threading.Event()

    def sample() -> None:
        committing = False
        while not done.is_set():
            committing = committing or any(output.parent.glob(f".{output.name}.partial-*/model.safetensors.index.json"))
            rss = _rss_bytes(process.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss, committing))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
    result = json.loads(result_file.read_text())
    manifest = json.loads((output / "kubequant.json").read_text())
    before = [rss for _, rss, committing in samples if not committing]
    during = [rss for _, rss, committing in samples if committing]
    return {
        "layers": json.loads((model / "config.json").read_text())["num_hidden_layers"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "checkpoint_gib": round(result["size_after_bytes"] / GIB, 2),
        "shards": len([f for f in output.iterdir() if f.suffix == ".safetensors"]),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),  # Linux: KiB
        "sampled_peak_before_commit_gib": round(max(before, default=0) / GIB, 2),
        "sampled_peak_during_commit_gib": round(max(during, default=0) / GIB, 2),
        "manifest_peak_host_gib": round(manifest["peak_memory"]["host_bytes"] / GIB, 2),
        "layer_seconds": manifest["timings"]["layers"],
        "stage_seconds": manifest["timings"]["stages"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES | MOE_SHAPES), default="llama3-8b")
    parser.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                        help="rtn (min-max) keeps a CPU run short; gptq adds the Hessians (one per expert) to the peak")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--depths", default="8,32", help="comma-separated numbers of decoder layers")
    parser.add_argument("--workdir", type=Path, required=True, help="synthetic models and checkpoints (reused)")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    calibration = args.workdir / "calibration.txt"
    shutil.copy2(ROOT / "tests/fixtures/text/calibration.txt", calibration)
    runs = []
    for depth in (int(d) for d in args.depths.split(",")):
        model = _model(args.workdir, args.shape, depth)
        output = args.workdir / f"checkpoint-{depth}layers"
        run = measure(model, output, calibration, args.method, args.samples, args.seq_len)
        print(json.dumps(run), flush=True)
        runs.append(run)
        if not args.keep_checkpoints:
            shutil.rmtree(output)
    report = {"shape": args.shape, "method": args.method, "samples": args.samples, "seq_len": args.seq_len,
              "machine": os.uname().machine, "cpus": os.cpu_count(),
              "torch": torch.__version__, "runs": runs}
    if len(runs) > 1:
        report["peak_rss_ratio_deepest_over_shallowest"] = round(runs[-1]["peak_rss_gib"] / runs[0]["peak_rss_gib"], 3)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
