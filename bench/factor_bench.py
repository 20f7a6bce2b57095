"""The Hessian factorization GPTQ needs, side by side: the triangular inverse of the Cholesky factor
as one triangular solve against the identity (what gptq.py did before) vs by halves
(quantizer.gptq.lower_triangular_inverse), plus the Cholesky itself for scale.

    python bench/factor_bench.py                  # n = 4096 and 11008, the CPU's torch threads
    python bench/factor_bench.py --sizes 28672 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantizer.gptq import lower_triangular_inverse


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096,11008")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'n':>6} {'cholesky_s':>10} {'solve_eye_s':>11} {'halves_s':>9} {'speedup':>8} {'max|diff|':>10}")
    for n in (int(x) for x in args.sizes.split(",")):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, n // 2, generator=g, device=device)
        h = x @ x.T / n + 0.01 * torch.eye(n, device=device)
        chol_s, lower = timed(lambda h=h: torch.linalg.cholesky(h), device, args.repeats)
        eye = torch.eye(n, device=device)
        solve_s, by_solve = timed(lambda lower=lower, eye=eye: torch.linalg.solve_triangular(lower, eye, upper=False),
                                  device, args.repeats)  # fmt: skip
        halves_s, by_halves = timed(lambda lower=lower: lower_triangular_inverse(lower), device, args.repeats)
        diff = float((by_solve - by_halves).abs().max())
        print(f"{n:>6} {chol_s:10.2f} {solve_s:11.2f} {halves_s:9.2f} {solve_s / halves_s:8.2f} {diff:10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
