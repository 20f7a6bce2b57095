"""The Triton block solver against the PyTorch column loop.

Without a GPU (CI, laptops) the kernel runs on the CPU through Triton's interpreter; with CUDA the
same tests run the compiled kernel on the GPU against the PyTorch path on the GPU.

The kernel is built to be bit-for-bit equal to `solve_block_torch` (IEEE division, no fused
multiply-add, half-to-even rounding; see quantizer/gptq_triton.py), so integer codes, scales and
dequantized weights are compared exactly: no mismatch from float ties is tolerated (none occurs)
for blocks of up to 128 columns.

The interpreter runs each Triton op in Python (~2 ms per column of a 64-row block), so the full
bits x group x act_order x sym product (128 GPTQ runs over the two shapes, ~80 s on 2 cores)
is only run on the GPU or with KUBEQUANT_TRITON_FULL=1. By default a Latin-square subset (32 runs)
covers every (bits, group), (bits, act_order+sym) and (group, act_order+sym) pair.
"""

from __future__ import annotations

import importlib
import itertools
import os

import pytest

torch = pytest.importorskip("torch")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    # Must precede the first `import triton` kernel decoration (@triton.jit picks the interpreter
    # when it runs), and stays set: the interpreter reads it again at launch. This affects every
    # Triton kernel of this pytest process, which on a machine without CUDA could not run anyway.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

from quantizer import gptq_triton  # noqa: E402
from quantizer.contract import GROUP_SIZES, QUANTIZABLE_BITS  # noqa: E402
from quantizer.gptq import (  # noqa: E402
    QuantRecipe,
    gptq_quantize,
    solve_block_torch,
)

if gptq_triton.INTERPRETED == ON_GPU:  # imported earlier in this process in the other mode
    gptq_triton = importlib.reload(gptq_triton)
solve_block_triton = gptq_triton.solve_block_triton

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
FULL_PRODUCT = ON_GPU or os.environ.get("KUBEQUANT_TRITON_FULL") == "1"
ROWS = 64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These matrices are tiny: torch's CPU thread pool costs ~25x more than it saves on 2 cores
    (0.4 s instead of 0.015 s per GPTQ run of the reference path)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ACT_SYM = list(itertools.product((True, False), (True, False)))  # (act_order, sym)


def correlated_hessian(cols: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    """H = X X^T / n for inputs X [cols, n] with correlated channels and a few outlier channels,
    like a transformer layer's activations (diag(H) then spans ~3 orders of magnitude)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = mix @ torch.randn(cols, n, generator=g)
    X[torch.randperm(cols, generator=g)[: max(2, cols // 64)]] *= 20.0
    return (X @ X.T / n).to(DEVICE)


def random_weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[torch.rand(rows, cols, generator=g) < 0.002] *= 10.0  # a few large weights widen some groups
    return W.to(DEVICE)


def recipe_grid(cols: int) -> list[tuple[int, int, bool, bool]]:
    groups = [g for g in GROUP_SIZES if g == -1 or cols % g == 0]
    if FULL_PRODUCT:
        return [(b, g, a, s) for b in QUANTIZABLE_BITS for g in groups for a, s in ACT_SYM]
    return [
        (b, g, *ACT_SYM[(bi + gi) % len(ACT_SYM)])
        for bi, b in enumerate(QUANTIZABLE_BITS)
        for gi, g in enumerate(groups)
    ]


CASES = [(cols, *r) for cols in (256, 192) for r in recipe_grid(cols)]  # 192: ragged last block (64)


@pytest.mark.parametrize(
    ("cols", "bits", "group", "act_order", "sym"),
    CASES,
    ids=[f"c{c}-w{b}-g{g}-{'act' if a else 'seq'}-{'sym' if s else 'asym'}" for c, b, g, a, s in CASES],
)
def test_gptq_triton_matches_torch(cols: int, bits: int, group: int, act_order: bool, sym: bool) -> None:
    W = random_weight(ROWS, cols)
    H = correlated_hessian(cols)
    recipe = QuantRecipe(bits=bits, group_size=group, sym=sym, act_order=act_order)
    ref = gptq_quantize(W, H, recipe, block_solver=solve_block_torch)
    out = gptq_quantize(W, H, recipe, block_solver=solve_block_triton)

    mismatches = int((ref.codes != out.codes).sum())
    assert mismatches == 0, f"{mismatches} of {ref.codes.numel()} codes differ"
    assert torch.equal(ref.scales, out.scales) and torch.equal(ref.zeros, out.zeros)
    torch.testing.assert_close(out.dequantized, ref.dequantized, rtol=0, atol=0)
    assert out.relative_error == pytest.approx(ref.relative_error, rel=1e-6)
    assert out.damp == ref.damp


def _block_inputs(rows: int, B: int, bits: int, seed: int = 3):
    """One block as gptq_quantize hands it over: a strided column slice of a wider W, the
    diagonal tile of the upper Cholesky factor of H^-1, per-column grids of groups of 32."""
    W = random_weight(rows, B + 40, seed)
    H = correlated_hessian(B + 40, seed=seed) + 0.01 * torch.eye(B + 40, device=DEVICE)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    i1 = 24
    w_block, hinv = W[:, i1 : i1 + B], U[i1 : i1 + B, i1 : i1 + B]
    maxq = 2**bits - 1
    groups = w_block.reshape(rows, -1, 32) if B % 32 == 0 else w_block.unsqueeze(1)
    scale = (2 * groups.abs().amax(-1) / maxq).clamp(min=1e-8)
    per_group = groups.shape[-1]
    scale_cols = scale.repeat_interleave(per_group, dim=1)
    zero_cols = torch.full_like(scale_cols, (maxq + 1) / 2)
    return W, w_block, hinv, scale_cols, zero_cols, maxq


@pytest.mark.parametrize(("rows", "B", "block_m"), [(64, 128, None), (70, 96, 32), (5, 17, 16)])
def test_solve_block_matches_torch(rows: int, B: int, block_m: int | None) -> None:
    """Direct block test: ragged rows (70 = 2 x 32 + 6), a non-power-of-two width, tiny shapes,
    a strided input; also the in-place update of w_block must match."""
    W, w_block, hinv, scale_cols, zero_cols, maxq = _block_inputs(rows, B, bits=4)
    W_ref = W.clone()
    w_ref = W_ref[:, 24 : 24 + B]
    c_ref, e_ref = solve_block_torch(w_ref, hinv, scale_cols, zero_cols, maxq)
    c_tri, e_tri = solve_block_triton(w_block, hinv, scale_cols, zero_cols, maxq, block_m=block_m)
    assert c_tri.dtype == torch.float32 and c_tri.shape == (rows, B)
    assert torch.equal(c_tri, c_ref)
    assert torch.equal(e_tri, e_ref)
    assert torch.equal(W, W_ref)  # the block updated in place, the columns around it untouched


def test_solve_block_transposed_strides() -> None:
    """A column-major w_block (stride (1, rows)) and non-contiguous grids take the same path."""
    _, w_block, hinv, scale_cols, zero_cols, maxq = _block_inputs(48, 64, bits=3)
    w_t = w_block.t().contiguous().t()
    c_ref, e_ref = solve_block_torch(w_block.clone(), hinv, scale_cols, zero_cols, maxq)
    c_tri, e_tri = solve_block_triton(w_t, hinv, scale_cols.t().contiguous().t(), zero_cols, maxq)
    assert torch.equal(c_tri, c_ref) and torch.equal(e_tri, e_ref)


def test_rounding_ties_are_half_to_even() -> None:
    """w / scale exactly at k + 0.5 (and at -(k + 0.5)): codes must follow torch.round (half to
    even), not half away from zero. Hinv = I so every column sees its own input unchanged."""
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 6.5, 7.5, 0.0, 100.5, -100.5])
    rows, B = halves.numel(), 8
    w = halves[:, None].repeat(1, B) * torch.arange(1, B + 1)[None, :] / 4  # scale 0.25 * (j + 1)
    scale = torch.arange(1, B + 1, dtype=torch.float32)[None, :].repeat(rows, 1) / 4
    w, scale = w.to(DEVICE), scale.to(DEVICE)
    zero = torch.full((rows, B), 8.0, device=DEVICE)
    eye = torch.eye(B, device=DEVICE)
    c_ref, e_ref = solve_block_torch(w.clone(), eye, scale, zero, 15)
    c_tri, e_tri = solve_block_triton(w.clone(), eye, scale, zero, 15)
    assert torch.equal(c_tri, c_ref) and torch.equal(e_tri, e_ref)
    assert c_ref[:9, 0].tolist() == [8.0, 10.0, 10.0, 12.0, 8.0, 6.0, 6.0, 14.0, 15.0]


def test_wide_block_is_split() -> None:
    """B > MAX_BLOCK_COLS runs as sub-blocks joined by a matmul: equal up to float rounding."""
    B = gptq_triton.MAX_BLOCK_COLS + 64
    _, w_block, hinv, scale_cols, zero_cols, maxq = _block_inputs(32, B, bits=4)
    w_ref = w_block.clone()
    c_ref, e_ref = solve_block_torch(w_ref, hinv, scale_cols, zero_cols, maxq)
    c_tri, e_tri = solve_block_triton(w_block, hinv, scale_cols, zero_cols, maxq)
    # A code may flip only where w/scale sits within rounding noise of a .5 tie.
    assert (c_tri != c_ref).float().mean() <= 0.002
    torch.testing.assert_close(w_block, w_ref, rtol=1e-4, atol=1e-5)
    same = c_tri == c_ref
    torch.testing.assert_close(e_tri[same], e_ref[same], rtol=1e-3, atol=1e-5)
