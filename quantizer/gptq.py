"""GPTQ: accurate post-training quantization of one weight matrix.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv:2210.17323). The steps below carry the paper's names:

1. Hessian H = 2/n * sum_i x_i x_i^T of the layer's inputs (accumulated by the model pipeline).
2. Dead inputs (H_ii = 0) are pinned: H_ii = 1 and their weight column is zeroed.
3. Activation order: columns are processed in decreasing diag(H). Two orders keep the checkpoint's
   g_idx at arange(K) // G, the only form vLLM 0.32 serves correctly:
   - static: columns one by one in decreasing diag(H); every group's scale is still taken over its
     contiguous original columns (scattered in processing order);
   - group-aware (GPTQModel's default; Gafni et al., arXiv:2505.14638): whole groups in decreasing
     max diag(H), the columns inside each group in decreasing diag(H).
4. Dampening: H += lambda * I with lambda = damp * mean(diag(H)), raised stepwise if Cholesky fails.
5. The upper Cholesky factor R of H^-1 replaces repeated inverse updates (the paper's Step 3).
6. Lazy batch updates: columns are solved in blocks of B (128); inside a block each quantized
   column's error is fed back to the block's remaining columns (rank-1 updates); the remaining
   columns of the matrix receive the block's error at once, as one matmul (the paper's Step 2).

A group's scale is chosen at the start of the block in which the first of its columns is reached,
from the weights as they are then (all earlier blocks' error already fed back); in group-aware order
blocks never straddle a group, so that is exactly when the group starts. Without act-order this is
IST-DASLab's reference; with static act-order it is its natural generalisation.

Beyond the paper, in the same servable format (integer codes, one fp16 scale per row and group):
- Scale search: per row and group, the shrink factor of the range (1.0 down to 0.2, fp16-rounded
  candidates, so the stored scale is the one whose codes were chosen) with the least error
  |w - q|^3 weighted by input importance: diag(H) ("diag"), or GPTQ's own cost of an error in each
  column, 1 / [H^-1]_jj of the columns not yet quantized = 1 / R_jj^2 in processing order ("cost").
- Full-range symmetric scale: scale = -m / 2^(bits-1) with m the group's element of largest |w|,
  sign kept, so m lands exactly on code 0 and all 2^bits levels are used (scales may be negative).
- Refinement after the pass: coordinate descent over the codes with the scales fixed, then a
  least-squares re-fit of each row's scales given the codes; neither step increases the objective.

The reported error comes from the solve itself: with Delta = W - Wq and E the block solver's scaled
errors, Delta = E R, so Delta (H + lambda I) Delta^T = ||E||^2 and the undamped ||Delta X||^2 is
||E||^2 - lambda ||Delta||^2; ||W X||^2 comes from the Cholesky factor at half a matmul.

All math is float32 on whatever device the inputs are on: CUDA when present, else the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from quantizer.contract import (
    DEFAULT_SOURCE_TARGETS,
    GROUP_SIZES,
    QUANTIZABLE_BITS,
    SCALE_SEARCHES,
    unservable_reasons,
)
from quantizer.errors import InputError

log = logging.getLogger(__name__)

# Orders of the columns: none, static act-order, group-aware act-order.
ORDERS = ("none", "static", "group")

# The unweighted clipping search: shrink factors and IST-DASLab's error norm (it favours outliers less than L2).
CLIP_SHRINK_GRID = tuple(1.0 - 0.025 * i for i in range(9))  # 1.0 ... 0.8
CLIP_ERROR_NORM = 2.4
# The importance-weighted search: factors 1.0 ... 0.2, then around each group's best factor at halved
# steps (the error is close to unimodal in the factor at this resolution): 15 candidates, step 0.0125.
SEARCH_COARSE_GRID = tuple(1.0 - 0.1 * i for i in range(9))  # 1.0 ... 0.2
SEARCH_REFINE_STEPS = (0.05, 0.025, 0.0125)
SEARCH_MIN_SHRINK = 0.2
# The importance-weighted search's error norm: sum_j importance_j |w_j - q_j|^p. The search rounds
# the group to nearest, but GPTQ then feeds each column's rounding error forward onto the columns not
# yet quantized; what it cannot repair is a clipped weight's large error. A cube weighs those more than
# a square does: with p = 2 the search clipped more than GPTQ could make good (at 3 bits on an 8-layer
# model its layer error and KL were worse than plain min-max GPTQ's), with p = 3 both are the lowest
# measured (bench/model_quality_bench.py, docs/benchmarks.md).
SEARCH_ERROR_NORM = 3.0
# Rows searched at once: a working set that stays in cache across the candidates.
SEARCH_CHUNK_ELEMENTS = 2**17
DAMP_GROWTH = 10.0
MAX_DAMP = 1.0
FP16_MAX = 65504.0


class GPTQError(InputError):
    """A matrix that cannot be quantized as asked; the message names the layer and the fix."""


@dataclass(frozen=True)
class QuantRecipe:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = True  # static act-order (order="static"); False means order="none"
    damp: float = 0.01
    block_size: int = 128
    # The defaults won at model level in bench/quality_bench.py (docs/benchmarks.md).
    scale_search: str = "cost"
    full_range: bool = True  # symmetric grids only (an asymmetric grid uses every level already)
    refine_sweeps: int = 0
    group_aware_order: bool = False  # with act_order: whole groups in order (order="group")
    source_targets: float = DEFAULT_SOURCE_TARGETS  # quantizer.pipeline.SourceTargets

    def validate(self) -> None:
        if self.bits not in QUANTIZABLE_BITS:
            raise GPTQError(f"bits={self.bits} is not supported; use one of {QUANTIZABLE_BITS}")
        if self.group_size not in GROUP_SIZES:
            raise GPTQError(
                f"group_size={self.group_size} is not supported; use one of {GROUP_SIZES}"
            )
        if not 0.0 < self.damp < 1.0:
            raise GPTQError(f"damp={self.damp} must be in (0, 1); 0.01 is the usual choice")
        if self.block_size <= 0:
            raise GPTQError(f"block_size={self.block_size} must be positive")
        if self.scale_search not in SCALE_SEARCHES:
            raise GPTQError(f"scale_search={self.scale_search!r}: use one of {', '.join(SCALE_SEARCHES)}")
        if self.refine_sweeps < 0:
            raise GPTQError(f"refine_sweeps={self.refine_sweeps} must be 0 or more (0 turns refinement off)")
        if not 0.0 <= self.source_targets <= 1.0:
            raise GPTQError(f"source_targets={self.source_targets} must be in [0, 1] (0: plain GPTQ's targets)")
        if self.group_aware_order and not self.act_order:
            raise GPTQError("group_aware_order=true is a kind of act-order: it needs act_order=true")

    @property
    def order(self) -> str:
        if not self.act_order:
            return "none"
        return "group" if self.group_aware_order else "static"

    def unservable_reasons(self) -> list[str]:
        """Why vLLM 0.32 would refuse a checkpoint made with this recipe (empty when it serves it)."""
        return unservable_reasons(self.bits, self.group_size, self.sym)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


@dataclass
class QuantizedWeight:
    """One quantized matrix. Row r, column c: dequantized = scales[r, g] * (codes[r, c] - zeros[r, g])
    with g = c // group_size (group_size = in_features for per-channel quantization)."""

    codes: torch.Tensor  # [out, in] int32 in [0, 2^bits - 1]
    scales: torch.Tensor  # [out, in / group_size] float32, each exactly representable in fp16
    zeros: torch.Tensor  # [out, in / group_size] float32, integer valued; 2^(bits-1) when symmetric
    dequantized: torch.Tensor  # [out, in] float32
    group_size: int
    damp: float  # the dampening actually used (raised when Cholesky failed)
    relative_error: float  # ||(W - Wq) X||^2 / ||W X||^2, from the undamped Hessian

    @property
    def g_idx(self) -> torch.Tensor:
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size


# ---------------------------------------------------------------------------------------------------
# The quantization grid
# ---------------------------------------------------------------------------------------------------


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as the checkpoint stores it (fp16), so codes are chosen for the stored value;
    a zero (all-zero group) or an underflow gets a unit grid, whose codes then dequantize to 0."""
    stored = scale.clamp(-FP16_MAX, FP16_MAX).half().float()
    return torch.where(stored == 0, torch.ones_like(stored), stored)


def _range_scale(w: torch.Tensor, bits: int, full_range: bool) -> torch.Tensor:
    """The symmetric grid's scale before any shrinking or rounding ([..., n] -> [...])."""
    if full_range:
        # The signed extreme m lands on code 0: scale * (0 - 2^(bits-1)) = m.
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return -extreme / 2 ** (bits - 1)
    return 2 * w.abs().amax(dim=-1) / (2**bits - 1)


def shrunk_grid(
    w: torch.Tensor, bits: int, sym: bool, shrink: torch.Tensor | float = 1.0, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point over the last dim of w ([..., n] -> [...], [...]) for the range shrunk by
    `shrink` (1.0: min-max; a tensor gives each row of [...] its own factor)."""
    maxq = 2**bits - 1
    if sym:
        scale = _fp16_scale(shrink * _range_scale(w, bits, full_range))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    xmin = w.amin(dim=-1).clamp(max=0) * shrink
    xmax = w.amax(dim=-1).clamp(min=0) * shrink
    scale = _fp16_scale((xmax - xmin) / maxq)
    return scale, torch.round(-xmin / scale)


def quantize_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of w on the grid (scale, zero broadcast against w)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


class _GridErrors:
    """Error of w [..., n] on shrunk grids, many candidates over one cached working set."""

    def __init__(self, w: torch.Tensor, recipe: QuantRecipe, importance: torch.Tensor | None, norm: float):
        self.w, self.recipe, self.importance, self.norm = w, recipe, importance, norm
        self.range_scale = _range_scale(w, recipe.bits, recipe.full_range) if recipe.sym else None
        self.buffer = torch.empty_like(w)
        zero = 2 ** (recipe.bits - 1)
        self.low, self.high = -zero, recipe.maxq - zero

    def __call__(self, shrink: torch.Tensor | float) -> torch.Tensor:
        t = self.buffer
        if self.range_scale is None:  # asymmetric: the zero point moves with the range
            scale, zero = shrunk_grid(self.w, self.recipe.bits, False, shrink)
            _, dq = quantize_to_grid(self.w, scale.unsqueeze(-1), zero.unsqueeze(-1), self.recipe.maxq)
            torch.sub(dq, self.w, out=t)
        else:  # symmetric: codes centred on the zero point, clamped to its levels
            scale = _fp16_scale(shrink * self.range_scale).unsqueeze(-1)
            torch.div(self.w, scale, out=t)
            t.round_().clamp_(self.low, self.high).mul_(scale).sub_(self.w)
        t.abs_().pow_(self.norm) if self.norm != 2 else t.square_()
        if self.importance is not None:
            t.mul_(self.importance)
        return t.sum(dim=-1)


def search_grid(
    w: torch.Tensor, recipe: QuantRecipe, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of least error over shrink factors of the range, for every row of [..., n] at once.

    recipe.scale_search "clip": factors CLIP_SHRINK_GRID, unweighted |w - q(w)|^2.4.
    Otherwise: |w - q(w)|^SEARCH_ERROR_NORM weighted by `importance` (broadcast against w's trailing dims), over
    SEARCH_COARSE_GRID, then each row's best factor +- each of SEARCH_REFINE_STEPS in turn. Factor
    1.0 (min-max) is a candidate, so the result is never worse than min-max by the searched measure."""
    clip = recipe.scale_search == "clip"
    grid, norm, weights = (CLIP_SHRINK_GRID, CLIP_ERROR_NORM, None) if clip else (
        SEARCH_COARSE_GRID, SEARCH_ERROR_NORM, importance)  # fmt: skip
    if weights is not None:
        weights = weights.expand(w.shape[1:])
    best_shrink = torch.ones(w.shape[:-1], device=w.device)
    per_row = max(1, math.prod(w.shape[1:]))
    chunk = max(1, SEARCH_CHUNK_ELEMENTS // per_row)
    for r1 in range(0, w.shape[0], chunk):
        part = slice(r1, r1 + chunk)
        errors = _GridErrors(w[part], recipe, weights, norm)
        best_err = torch.full(errors.w.shape[:-1], float("inf"), device=w.device)
        best = best_shrink[part]

        def consider(shrink: torch.Tensor | float, best_err=best_err, best=best, errors=errors) -> None:
            err = errors(shrink)
            better = err < best_err
            best_err.copy_(torch.where(better, err, best_err))
            best.copy_(torch.where(better, shrink, best))

        for shrink in grid:
            consider(shrink)
        if not clip:
            for step in SEARCH_REFINE_STEPS:
                centre = best.clone()
                for sign in (1, -1):
                    consider((centre + sign * step).clamp(SEARCH_MIN_SHRINK, 1.0))
    return shrunk_grid(w, recipe.bits, recipe.sym, best_shrink, recipe.full_range)


def group_grid(
    w: torch.Tensor, recipe: QuantRecipe, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of w [rows, ..., n] as the recipe chooses it (importance: w.shape[1:])."""
    if recipe.scale_search == "minmax":
        return shrunk_grid(w, recipe.bits, recipe.sym, full_range=recipe.full_range)
    return search_grid(w, recipe, importance)  # without a Hessian (RTN): unweighted


def effective_group_size(in_features: int, recipe: QuantRecipe, name: str = "") -> int:
    group = in_features if recipe.group_size == -1 else recipe.group_size
    if in_features % group:
        raise GPTQError(
            f"{name or 'weight'}: in_features={in_features} is not divisible by group_size={group}; "
            f"choose a group size that divides {in_features} (or -1 for one group per row)"
        )
    return group


def rtn_quantize(weight: torch.Tensor, recipe: QuantRecipe, name: str = "") -> QuantizedWeight:
    """Round-to-nearest on the same grid as GPTQ: the baseline GPTQ must beat."""
    recipe.validate()
    w = weight.float()
    rows, cols = w.shape
    group = effective_group_size(cols, recipe, name)
    grouped = w.reshape(rows, cols // group, group)
    scale, zero = group_grid(grouped, recipe)
    q, dq = quantize_to_grid(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), recipe.maxq)
    return QuantizedWeight(
        codes=q.reshape(rows, cols).to(torch.int32),
        scales=scale,
        zeros=zero,
        dequantized=dq.reshape(rows, cols),
        group_size=group,
        damp=0.0,
        relative_error=float("nan"),
    )


# ---------------------------------------------------------------------------------------------------
# The column loop of one block: the hot loop, also implemented as a Triton kernel (gptq_triton.py)
# ---------------------------------------------------------------------------------------------------

BlockSolver = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]
]


def solve_block_torch(
    w_block: torch.Tensor,
    hinv_block: torch.Tensor,
    scale_cols: torch.Tensor,
    zero_cols: torch.Tensor,
    maxq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the columns of one block in order, feeding each column's error forward.

    w_block [rows, B] (modified in place), hinv_block [B, B] (upper Cholesky factor of H^-1),
    scale_cols/zero_cols [rows, B] (each column's group grid). Returns the codes [rows, B] and the
    scaled errors [rows, B] that the caller propagates to the columns after the block.
    """
    # Transposed copies, so that each column of the block is one contiguous row: on CPUs the
    # strided column walk of a [rows, B] slice of a wide matrix costs more than the arithmetic.
    # (Elementwise IEEE arithmetic does not depend on layout: results are bit-identical.)
    w_t = w_block.t().contiguous()
    scale_t, zero_t = scale_cols.t().contiguous(), zero_cols.t().contiguous()
    codes = torch.empty_like(w_t)
    errors = torch.empty_like(w_t)
    for i in range(w_t.shape[0]):
        w = w_t[i]
        q, dq = quantize_to_grid(w, scale_t[i], zero_t[i], maxq)
        err = (w - dq) / hinv_block[i, i]
        # Optimal Brain Quantizer update of the block's remaining columns (rank 1).
        w_t[i:] -= hinv_block[i, i:].unsqueeze(1) * err.unsqueeze(0)
        codes[i] = q
        errors[i] = err
    w_block.copy_(w_t.t())
    return codes.t(), errors.t()


SOLVERS = ("auto", "torch", "triton")


def default_block_solver(device: torch.device, solver: str = "auto") -> tuple[str, BlockSolver]:
    """The Triton kernel on CUDA when Triton imports, else the PyTorch loop (the reference).
    `solver` forces one: "torch" anywhere, "triton" only on CUDA."""
    if solver not in SOLVERS:
        raise InputError(f"solver {solver!r}: use one of {', '.join(SOLVERS)}")
    if solver == "triton":
        if device.type != "cuda":
            raise InputError("solver 'triton' needs a CUDA device; use 'auto' or 'torch' here")
        from quantizer.gptq_triton import solve_block_triton

        return "triton", solve_block_triton
    if solver == "auto" and device.type == "cuda":
        try:
            from quantizer.gptq_triton import solve_block_triton
        except ImportError as exc:  # pragma: no cover - depends on the GPU image
            log.warning("Triton unavailable (%s); using the PyTorch column loop", exc)
        else:
            return "triton", solve_block_triton
    return "torch", solve_block_torch


# ---------------------------------------------------------------------------------------------------
# GPTQ on one matrix
# ---------------------------------------------------------------------------------------------------


def upper_cholesky_of_inverse(
    hessian: torch.Tensor, damp: float, name: str = ""
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor R of (H + lambda I)^-1 (so that H^-1 = R^T R), lambda = damp * mean(diag H);
    the dampening grows by DAMP_GROWTH while the factorization fails, up to MAX_DAMP."""
    _, upper, damp_used = _factor(hessian, damp, name)
    return upper, damp_used


def _factor(hessian: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(L, R, damp used) with J (H + lambda I) J = L L^T and R = J L^-1 J (J: the exchange matrix).

    Then (H + lambda I)^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular: one Cholesky
    and one triangular inverse (2/3 n^3 FLOPs) instead of Cholesky, cholesky_inverse and a second
    Cholesky (4/3 n^3), with no second chance to fail. L also gives ||W X||^2 at half a matmul.
    """
    mean_diag = torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    current = damp
    while True:
        damped = hessian + (current * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(torch.flip(damped, dims=(0, 1)))
        if info.item() == 0:
            upper = torch.flip(lower_triangular_inverse(lower), dims=(0, 1))
            if torch.isfinite(upper).all():
                return lower, upper, current
        if current >= MAX_DAMP:
            raise GPTQError(
                f"{name or 'weight'}: the Hessian is not positive definite even with dampening "
                f"{current:g}; calibrate with more or more varied samples"
            )
        raised = min(current * DAMP_GROWTH, MAX_DAMP)
        log.warning(
            "%s: Cholesky failed with dampening %g; retrying with %g", name or "weight", current, raised
        )
        current = raised


# Below this size a triangular inverse is one triangular solve against the identity.
TRIANGULAR_INVERSE_BASE = 1024


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], so the work is matmuls
    (2/3 n^3 FLOPs) where a triangular solve against the identity costs n^3 (1.6x faster on CPUs)."""
    n = lower.shape[0]
    if n <= TRIANGULAR_INVERSE_BASE:
        eye = torch.eye(n, device=lower.device, dtype=lower.dtype)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    h = n // 2
    inverse = torch.zeros_like(lower)
    top, bottom = lower_triangular_inverse(lower[:h, :h]), lower_triangular_inverse(lower[h:, h:])
    inverse[:h, :h], inverse[h:, h:] = top, bottom
    inverse[h:, :h] = -(bottom @ (lower[h:, :h] @ top))
    return inverse


def _damped_energy(weight: torch.Tensor, lower: torch.Tensor, block: int = TRIANGULAR_INVERSE_BASE) -> float:
    """W (H + lambda I) W^T summed, from J (H + lambda I) J = L L^T: ||W J L||^2, with only the nonzero
    blocks of the triangular factor multiplied (half a matmul). Column block k of W J L needs W's
    first n - k0 columns and L's rows k0.. of that block, reversed."""
    n = lower.shape[0]
    total = torch.zeros((), device=weight.device, dtype=torch.float64)
    for k0 in range(0, n, block):
        part = weight[:, : n - k0] @ torch.flip(lower[k0:, k0 : k0 + block], dims=(0,))
        total += torch.sum(part.square(), dtype=torch.float64)
    return float(total)


def column_order(diag_h: torch.Tensor, group: int, order: str) -> torch.Tensor:
    """Processing order of the columns (a permutation of arange(in)), as step 3 describes."""
    cols = diag_h.shape[0]
    if order == "none":
        return torch.arange(cols, device=diag_h.device)
    if order == "static":
        return torch.argsort(diag_h, descending=True)
    per_group = diag_h.view(cols // group, group)
    groups = torch.argsort(per_group.amax(dim=1), descending=True)
    within = torch.argsort(per_group[groups], dim=1, descending=True)
    return (groups.unsqueeze(1) * group + within).flatten()


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X||^2 = sum((W @ H) * W) (up to H's constant), the denominator of the reported error.
    On GPUs its matmul runs in TF32, which moves the figure by about 1e-3 relative."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return float(torch.sum((weight @ hessian) * weight, dtype=torch.float64))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    recipe: QuantRecipe,
    name: str = "",
    block_solver: BlockSolver | None = None,
) -> QuantizedWeight:
    """Quantize W [out, in] given H [in, in] (on H's device, float32); see the module docstring."""
    recipe.validate()
    device = hessian.device
    W = weight.to(device=device, dtype=torch.float32, copy=True)
    H = hessian.to(dtype=torch.float32, copy=True)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise GPTQError(f"{name or 'weight'}: Hessian shape {tuple(H.shape)} does not match {cols} inputs")
    if not torch.isfinite(W).all():
        raise GPTQError(f"{name or 'weight'}: the weight holds NaN or inf values; the source model is broken")
    if not torch.isfinite(H).all():
        raise GPTQError(f"{name or 'weight'}: the Hessian holds NaN or inf (activations overflowed)")
    group = effective_group_size(cols, recipe, name)
    n_groups = cols // group
    if block_solver is None:
        _, block_solver = default_block_solver(device)

    # Step 2: dead inputs never reach the layer; pin them so H stays invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    refine_H = H.clone() if recipe.refine_sweeps else None

    # Step 3: activation order.
    perm = column_order(torch.diag(H), group, recipe.order)
    inv_perm = torch.argsort(perm)
    pinned_W, W = W, W[:, perm]  # Delta = pinned_W - Wq, in the original column order
    H = H[perm][:, perm]

    # Steps 4-5.
    lower, Hinv, damp_used = _factor(H, recipe.damp, name)
    damping = damp_used * float(torch.mean(torch.diag(H)))
    # ||W X||^2 for the reported error: dead columns are zero in W, so the pinned H gives the same.
    output_energy = _damped_energy(W, lower) - damping * float(torch.sum(W.square(), dtype=torch.float64))
    importance = torch.diag(H) if recipe.scale_search == "diag" else 1.0 / torch.diag(Hinv).square()
    del H, lower

    group_of_pos = perm // group  # group of the column at each processing position
    # Processing positions of each group's (contiguous, original) columns: [n_groups, group].
    group_positions = inv_perm.view(n_groups, group)
    first_pos = group_positions.amin(dim=1)

    scales = torch.empty(rows, n_groups, device=device)
    zeros = torch.empty(rows, n_groups, device=device)
    codes = torch.empty_like(W)
    block_size = recipe.block_size
    if recipe.order == "group" and group < cols and group % block_size:
        block_size = math.gcd(block_size, group)  # a group starts where a block starts
    squared_errors = torch.zeros((), device=device, dtype=torch.float64)  # ||E||^2

    # Step 6: blocks with lazy batch updates.
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        starting = torch.nonzero((first_pos >= i1) & (first_pos < i2)).flatten()
        if starting.numel():
            # [rows, n_starting, group]: all these columns sit at positions >= i1, so they are current.
            positions = group_positions[starting]
            scale, zero = group_grid(W[:, positions], recipe, importance[positions])
            scales[:, starting] = scale
            zeros[:, starting] = zero
        block_groups = group_of_pos[i1:i2]
        block_codes, block_errors = block_solver(
            W[:, i1:i2], Hinv[i1:i2, i1:i2], scales[:, block_groups], zeros[:, block_groups], recipe.maxq
        )
        codes[:, i1:i2] = block_codes
        squared_errors += torch.sum(block_errors.square(), dtype=torch.float64)
        W[:, i2:].addmm_(block_errors, Hinv[i1:i2, i2:], alpha=-1)
    del W, Hinv

    codes = codes[:, inv_perm]
    damped_error = float(squared_errors)
    if refine_H is not None:
        refine_H.diagonal().add_(damping)
        codes, scales, damped_error = refine(pinned_W, refine_H, codes, scales, zeros, recipe, block_size)
    codes = codes.to(torch.int32)
    g_idx = torch.arange(cols, device=device) // group
    dequantized = scales[:, g_idx] * (codes - zeros[:, g_idx])
    # Delta (H + lambda I) Delta^T = ||E||^2 (module docstring); the undamped error drops lambda ||Delta||^2.
    error = damped_error - damping * float(torch.sum((pinned_W - dequantized).square(), dtype=torch.float64))
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        dequantized=dequantized,
        group_size=group,
        damp=damp_used,
        relative_error=_relative(max(error, 0.0), output_energy),
    )


# ---------------------------------------------------------------------------------------------------
# Refinement after the GPTQ pass
# ---------------------------------------------------------------------------------------------------

# Rows of the per-row scale systems solved at once (each [n_groups, n_groups]), to bound memory.
REFIT_ROW_CHUNK_BYTES = 256 * 2**20


def refine(
    weight: torch.Tensor,
    damped_h: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    recipe: QuantRecipe,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """recipe.refine_sweeps rounds of coordinate descent on the codes, then a least-squares re-fit of
    the scales, on f = sum_r (w_r - q_r) H (w_r - q_r)^T with H damped as in the solve.

    G = (W - Wq) H carries the state: moving q_rj by t changes f by t^2 H_jj - 2 t G_rj, so
    q_rj + G_rj / H_jj is the exact minimizer along the coordinate and its nearest grid point the
    best code. Columns go in blocks whose updates reach the other columns as one matmul (as in
    GPTQ's step 6). Returns the codes, the scales and f, tracked exactly through every step."""
    cols = weight.shape[1]
    group = cols // scales.shape[1]
    g_idx = torch.arange(cols, device=weight.device) // group
    codes, scales = codes.float().clone(), scales.clone()
    dequantized = scales[:, g_idx] * (codes - zeros[:, g_idx])
    gradient = (weight - dequantized) @ damped_h
    objective = float(torch.sum((weight - dequantized) * gradient, dtype=torch.float64))
    for sweep in range(recipe.refine_sweeps):
        objective += _descend_codes(codes, dequantized, gradient, scales, zeros, damped_h, recipe.maxq, block_size)
        centred = codes - zeros[:, g_idx]
        step, change = _refit_scales(centred, gradient, scales, damped_h, group)
        objective += change
        scales += step
        delta_q = step[:, g_idx] * centred
        dequantized += delta_q
        if sweep + 1 < recipe.refine_sweeps:
            gradient -= delta_q @ damped_h
    return codes, scales, objective


def _descend_codes(
    codes: torch.Tensor, dequantized: torch.Tensor, gradient: torch.Tensor, scales: torch.Tensor,
    zeros: torch.Tensor, damped_h: torch.Tensor, maxq: int, block_size: int,
) -> float:  # fmt: skip
    """One coordinate-descent sweep over all columns, in place; returns the change of f (<= 0).

    Inside a block a move reaches only the block's later columns, which are still to be visited
    (the rest of G is brought up to date after the block, by matmuls), so G_rj is current when
    column j is visited and stays as it was then until the block ends."""
    cols = codes.shape[1]
    group = cols // scales.shape[1]
    change = torch.zeros((), device=codes.device, dtype=torch.float64)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        g = torch.arange(i1, i2, device=codes.device) // group
        # Transposed block copies: each column is one contiguous row (see solve_block_torch).
        grad_t = gradient[:, i1:i2].t().contiguous()
        dq_t = dequantized[:, i1:i2].t().contiguous()
        codes_t = codes[:, i1:i2].t().contiguous()
        scale_t, zero_t = scales[:, g].t().contiguous(), zeros[:, g].t().contiguous()
        h_block = damped_h[i1:i2, i1:i2]
        h_diag = torch.diagonal(h_block).unsqueeze(1)
        moves = torch.empty_like(dq_t)
        for j in range(i2 - i1):
            q, dq = quantize_to_grid(dq_t[j] + grad_t[j] / h_diag[j], scale_t[j], zero_t[j], maxq)
            torch.sub(dq, dq_t[j], out=moves[j])
            grad_t[j + 1 :].addr_(h_block[j, j + 1 :], moves[j], alpha=-1)
            dq_t[j], codes_t[j] = dq, q
        change += torch.sum(moves * (h_diag * moves - 2 * grad_t), dtype=torch.float64)
        moves = moves.t()
        gradient[:, i1:i2] = grad_t.t() - moves @ torch.tril(h_block)  # its own move and the later ones
        dequantized[:, i1:i2] = dq_t.t()
        codes[:, i1:i2] = codes_t.t()
        gradient[:, :i1].addmm_(moves, damped_h[i1:i2, :i1], alpha=-1)
        gradient[:, i2:].addmm_(moves, damped_h[i1:i2, i2:], alpha=-1)
    return float(change)


def _refit_scales(
    centred_codes: torch.Tensor, gradient: torch.Tensor, scales: torch.Tensor, damped_h: torch.Tensor, group: int
) -> tuple[torch.Tensor, float]:
    """The least-squares step of each row's scales s given its codes c = q - z: f(s + d) - f(s) =
    d^T A d - 2 d^T r with A_gh = c_g H_gh c_h^T and r_g = c_g . G_g, so d = A^-1 r (a ridge keeps
    groups whose codes are all zero where they are). The new scales are rounded to fp16 and a row
    keeps its old ones unless f decreases. Returns the step and the change of f (<= 0)."""
    rows, cols = centred_codes.shape
    n_groups = cols // group
    residual = (centred_codes * gradient).view(rows, n_groups, group).sum(dim=-1)
    steps = torch.zeros_like(scales)
    change = torch.zeros((), device=scales.device, dtype=torch.float64)
    chunk = max(1, REFIT_ROW_CHUNK_BYTES // (4 * n_groups * max(n_groups, group)))
    for r1 in range(0, rows, chunk):
        r2 = min(r1 + chunk, rows)
        c = centred_codes[r1:r2]
        system = torch.empty(r2 - r1, n_groups, n_groups, device=scales.device)
        for h in range(n_groups):  # A is symmetric: the groups from h on give row h and column h
            start = h * group
            coupled = c[:, start : start + group] @ damped_h[start : start + group, start:]
            block = (c[:, start:] * coupled).view(r2 - r1, n_groups - h, group).sum(dim=-1)
            system[:, h:, h] = block
            system[:, h, h:] = block
        diag = system.diagonal(dim1=1, dim2=2)
        ridge = 1e-6 * diag.mean(dim=1, keepdim=True).clamp(min=1e-30)
        diag += ridge
        solution, info = torch.linalg.solve_ex(system, residual[r1:r2])
        diag -= ridge
        proposed = _fp16_scale(scales[r1:r2] + solution) - scales[r1:r2]
        proposed = torch.where((info == 0).unsqueeze(1) & torch.isfinite(proposed), proposed, 0.0)
        gain = torch.einsum("rg,rgh,rh->r", proposed, system, proposed) - 2 * (proposed * residual[r1:r2]).sum(1)
        better = gain < 0
        steps[r1:r2] = torch.where(better.unsqueeze(1), proposed, 0.0)
        change += torch.sum(torch.where(better, gain, 0.0), dtype=torch.float64)
    return steps, float(change)


def _relative(error: float, energy: float) -> float:
    if energy <= 0:
        return 0.0 if error <= 0 else math.inf
    return error / energy


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Wq) X||^2 / ||W X||^2 expressed with H = 2/n X X^T (the constant cancels), computed
    directly: two [out, in] x [in, in] matmuls (TF32 on GPUs). gptq_quantize gets the same figure from
    its own solve; this is the check for it and the metric for other quantizers."""
    delta = weight.float() - quantized.float()
    return _relative(output_energy(delta, hessian), output_energy(weight.float(), hessian))
