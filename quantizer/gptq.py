"""GPTQ: accurate post-training quantization of one weight matrix.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv:2210.17323). The steps below carry the paper's names:

1. Hessian H = 2/n * sum_i x_i x_i^T of the layer's inputs (accumulated by the model pipeline).
2. Dead inputs (H_ii = 0) are pinned: H_ii = 1 and their weight column is zeroed.
3. Static activation order: columns are processed in decreasing diag(H), but every group's scale is
   taken over its *contiguous original* columns, so the checkpoint's g_idx stays arange(K) // G, the
   only form vLLM 0.32 serves correctly.
4. Dampening: H += lambda * I with lambda = damp * mean(diag(H)), raised stepwise if Cholesky fails.
5. The upper Cholesky factor of H^-1 replaces repeated inverse updates (the paper's Step 3).
6. Lazy batch updates: columns are solved in blocks of B (128); inside a block each quantized
   column's error is fed back to the block's remaining columns (rank-1 updates); the remaining
   columns of the matrix receive the block's error at once, as one matmul (the paper's Step 2).

A group's scale is computed at the start of the block in which the first of its columns is reached,
from the weights as they are then (all earlier blocks' error already fed back). Without act-order
this is exactly IST-DASLab's reference; with static act-order it is its natural generalisation.

All math is float32 on whatever device the inputs are on: CUDA when present, else the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from quantizer.errors import InputError

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)
# What vLLM 0.32 serves (../shared/notes/vllm-gptq-contract.md): symmetric 4- or 8-bit, these groups.
SERVABLE_BITS = (4, 8)
SERVABLE_GROUP_SIZES = (-1, 32, 64, 128)

# Shrink factors tried by the optional clipping search (1.0 = no clipping).
CLIP_SHRINK_GRID = tuple(1.0 - 0.025 * i for i in range(9))  # 1.0 ... 0.8
# IST-DASLab's grid search measures the clipping error with this norm (it favours outliers less than L2).
CLIP_ERROR_NORM = 2.4
DAMP_GROWTH = 10.0
MAX_DAMP = 1.0


class GPTQError(InputError):
    """A matrix that cannot be quantized as asked; the message names the layer and the fix."""


@dataclass(frozen=True)
class QuantRecipe:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = False

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise GPTQError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise GPTQError(
                f"group_size={self.group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
            )
        if not 0.0 < self.damp < 1.0:
            raise GPTQError(f"damp={self.damp} must be in (0, 1); 0.01 is the usual choice")
        if self.block_size <= 0:
            raise GPTQError(f"block_size={self.block_size} must be positive")

    def unservable_reasons(self) -> list[str]:
        """Why vLLM 0.32 would refuse a checkpoint made with this recipe (empty when it serves it)."""
        reasons = []
        if not self.sym:
            reasons.append("asymmetric grids (sym=false) are not served by vLLM's GPTQ kernels")
        if self.bits not in SERVABLE_BITS:
            reasons.append(f"{self.bits}-bit GPTQ is not served by vLLM (only 4 and 8)")
        if self.group_size not in SERVABLE_GROUP_SIZES:
            reasons.append(f"group_size {self.group_size} is not served by vLLM (only -1, 32, 64, 128)")
        return reasons

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
    scales: torch.Tensor  # [out, in / group_size] float32
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


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the min-max grid over the last dim of w ([..., n] -> [...], [...])."""
    maxq = 2**bits - 1
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * xmax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = None
    # An all-zero group would get scale 0: give it a unit grid (its codes then dequantize to 0).
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if zero is None:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of w on the grid (scale, zero broadcast against w)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def search_clipped_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid parameters after shrinking the range by the factor (from CLIP_SHRINK_GRID) that gives
    each row of w the least |w - q(w)|^2.4 error. Factor 1.0 is in the grid, so never worse."""
    maxq = 2**bits - 1
    xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    best_err = torch.full(w.shape[:-1], float("inf"), device=w.device)
    best_scale = torch.ones(w.shape[:-1], device=w.device)
    best_zero = torch.zeros(w.shape[:-1], device=w.device)
    for shrink in CLIP_SHRINK_GRID:
        clipped = torch.cat([xmin * shrink, xmax * shrink], dim=-1)
        scale, zero = grid_params(clipped, bits, sym)
        _, dq = quantize_to_grid(w, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq)
        err = (dq - w).abs().pow(CLIP_ERROR_NORM).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def group_grid(w: torch.Tensor, recipe: QuantRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    if recipe.clip_search:
        return search_clipped_grid(w, recipe.bits, recipe.sym)
    return grid_params(w, recipe.bits, recipe.sym)


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
    the dampening grows by DAMP_GROWTH while the factorization fails, up to MAX_DAMP.

    With J the exchange matrix (reversed identity) and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J)
    and J L^-1 J is upper triangular: one Cholesky and one triangular inverse (2/3 n^3 FLOPs) instead
    of Cholesky, cholesky_inverse and a second Cholesky (4/3 n^3), with no second chance to fail.
    """
    mean_diag = torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    current = damp
    while True:
        damped = hessian + (current * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(torch.flip(damped, dims=(0, 1)))
        if info.item() == 0:
            upper = torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), dims=(0, 1))
            if torch.isfinite(upper).all():
                return upper, current
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

    original_W = W.clone()
    original_H = H.clone()

    # Step 2: dead inputs never reach the layer; pin them so H stays invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # Step 3: static activation order.
    if recipe.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols, device=device)
    inv_perm = torch.argsort(perm)
    W = W[:, perm]
    H = H[perm][:, perm]

    # Steps 4-5.
    Hinv, damp_used = upper_cholesky_of_inverse(H, recipe.damp, name)
    del H

    group_of_pos = perm // group  # group of the column at each processing position
    # Processing positions of each group's (contiguous, original) columns: [n_groups, group].
    group_positions = inv_perm.view(n_groups, group)
    first_pos = group_positions.amin(dim=1)

    scales = torch.empty(rows, n_groups, device=device)
    zeros = torch.empty(rows, n_groups, device=device)
    codes = torch.empty_like(W)

    # Step 6: blocks with lazy batch updates.
    for i1 in range(0, cols, recipe.block_size):
        i2 = min(i1 + recipe.block_size, cols)
        starting = torch.nonzero((first_pos >= i1) & (first_pos < i2)).flatten()
        if starting.numel():
            # [rows, n_starting, group]: all these columns sit at positions >= i1, so they are current.
            group_weights = W[:, group_positions[starting]]
            scale, zero = group_grid(group_weights, recipe)
            scales[:, starting] = scale
            zeros[:, starting] = zero
        block_groups = group_of_pos[i1:i2]
        block_codes, block_errors = block_solver(
            W[:, i1:i2], Hinv[i1:i2, i1:i2], scales[:, block_groups], zeros[:, block_groups], recipe.maxq
        )
        codes[:, i1:i2] = block_codes
        W[:, i2:] -= block_errors @ Hinv[i1:i2, i2:]

    codes = codes[:, inv_perm].to(torch.int32)
    g_idx = torch.arange(cols, device=device) // group
    dequantized = scales[:, g_idx] * (codes - zeros[:, g_idx])
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        dequantized=dequantized,
        group_size=group,
        damp=damp_used,
        relative_error=relative_output_error(original_W, dequantized, original_H),
    )


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Wq) X||^2 / ||W X||^2 expressed with H = 2/n X X^T (the constant cancels).

    A reported metric, not part of the solve: on GPUs its two [out, in] x [in, in] matmuls (as costly
    as GPTQ's own updates) run in TF32, which moves the figure by about 1e-3 relative."""
    delta = weight - quantized
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        num = torch.sum((delta @ hessian) * delta)
        den = torch.sum((weight @ hessian) * weight)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return float(num / den)
