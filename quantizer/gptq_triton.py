"""GPTQ's column loop as one Triton kernel per block (the drop-in for `gptq.solve_block_torch`).

The PyTorch loop launches ~8 small kernels per column, so a 4096-column matrix costs ~30k launches
and the GPU idles between them. Here one launch solves a whole block: each program owns BLOCK_M rows
and keeps their [BLOCK_M, B] slice of the block in registers for all B columns. Rows are independent
in GPTQ (the Hessian couples columns, never rows), so programs never communicate.

Per column j (a runtime loop, so the kernel body is not unrolled B times):
  w_j  = the tile's column j               (masked row reduction: registers cannot be indexed)
  q    = clamp(rint(w_j / scale_j) + zero_j, 0, maxq);  dq = scale_j * (q - zero_j)
  err  = (w_j - dq) / hinv[j, j]
  tile -= err[:, None] * hinv[j, :]         (hinv row j loaded from memory; zero left of j)
  codes[:, j] = q;  errors[:, j] = err

Bit-for-bit parity with the PyTorch path (same codes, same errors, not just close ones) is a design
goal, because it lets the tests compare integer codes exactly. Three things make it hold:
- Division uses `tl.math.div_rn` (IEEE round-to-nearest). Triton's `/` on float32 lowers to
  PTX `div.full.f32`, which is off by up to 2 ulp and would flip codes at rounding ties.
- The kernel is compiled with `enable_fp_fusion=False`, so `tile - err * h` and `w - scale * (q - z)`
  are a rounded multiply then a rounded subtract, as in PyTorch's separate elementwise kernels,
  instead of one fused multiply-add (which rounds once and differs in the last bit).
- Rounding is half-to-even like `torch.round`, with the classic magic-number trick
  `(x + 1.5 * 2^23) - 1.5 * 2^23`, exact in IEEE float32 for |x| <= 2^22. It is used instead of
  libdevice `rint` because the Triton interpreter (TRITON_INTERPRET=1, used by the CPU tests) cannot
  run libdevice calls, and one code path on GPU and CPU means the tested code is the code that runs.
  Inputs are first clamped to +-2^22: any |x/scale| that large lands outside [0, maxq] after adding
  the zero point either way, so the final clamp gives the same code as torch.

Column extraction is a sum of one value and zeros, which is exact, and the update of the columns
before j subtracts exact zeros (Hinv's lower triangle). With finite inputs (gptq_quantize checks them) every per-element
operation therefore matches PyTorch's float32 result; only the sign of a zero error can differ,
which compares equal. The errors @ Hinv matmul after the block stays in PyTorch (cuBLAS) in both
paths.

Block sizes above MAX_BLOCK_COLS are split into sub-blocks whose errors reach the later sub-blocks
by one matmul (GPTQ's lazy-batch identity): mathematically the same, equal to the PyTorch loop only
up to float rounding. The default block size (128) never splits.

Triton >= 3.2: uses only `tl.math.div_rn`, `triton.autotune(restore_value=...)` and the
`enable_fp_fusion` launch option. Tested bit-exact against the torch path with the interpreter of
triton 3.9 (CPU torch 2.13) and compiled on an H100 with triton 3.6.0 / torch 2.11.0+cu130.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest block the kernel keeps in registers: [BLOCK_M, 128] float32 is 16-64 registers per thread
# for the configs below, leaving room for the loop's temporaries without spilling.
MAX_BLOCK_COLS = 128

# Interpreter (CPU) default: one program per 64 rows keeps the Python-level loop count low.
INTERPRETER_BLOCK_M = 64

# |x| above this is rounded by clamping (see the module docstring); 1.5 * 2^23 is the rint constant.
# (tl.constexpr: jit code may only read globals that are compile-time constants.)
_RINT_LIMIT = tl.constexpr(4194304.0)  # 2^22
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def _gptq_block_kernel(
    w_ptr,  # [n_rows, n_cols] any strides; overwritten with the updated block (as the torch path)
    h_ptr,  # [n_cols, n_cols] upper Cholesky factor of H^-1 (this block's diagonal tile)
    scale_ptr,  # [n_rows, n_cols] each column's grid scale
    zero_ptr,  # [n_rows, n_cols] each column's grid zero point
    codes_ptr,  # [n_rows, n_cols] out, float32 integer-valued
    err_ptr,  # [n_rows, n_cols] out, scaled errors
    n_rows,
    n_cols,
    stride_wm,
    stride_wn,
    stride_hm,
    stride_hn,
    stride_sm,
    stride_sn,
    stride_zm,
    stride_zn,
    stride_om,
    stride_on,
    maxq,  # float32
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,  # n_cols rounded up to a power of two (tl.arange needs one)
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    # int64 row offsets: rows * stride exceeds 2^31 for the largest matrices (e.g. 28672 x 106496).
    rows64 = rows.to(tl.int64)
    w_offs = rows64[:, None] * stride_wm + cols[None, :] * stride_wn
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile = tl.load(w_ptr + w_offs, mask=tile_ok, other=0.0)

    # Pointers to column j of scale/zero/codes/errors and to row j of Hinv, advanced each column
    # (cheaper than recomputing j * stride, on the GPU and much more so in the interpreter).
    s_ptrs = scale_ptr + rows64 * stride_sm
    z_ptrs = zero_ptr + rows64 * stride_zm
    c_ptrs = codes_ptr + rows64 * stride_om
    e_ptrs = err_ptr + rows64 * stride_om
    h_ptrs = h_ptr + cols * stride_hn
    d_ptr = h_ptr

    for j in range(0, n_cols):
        # Column j of the registers: a one-hot masked sum (exact: one value plus zeros).
        w_j = tl.sum(tl.where((cols == j)[None, :], tile, 0.0), axis=1)
        scale = tl.load(s_ptrs, mask=row_ok, other=1.0)
        zero = tl.load(z_ptrs, mask=row_ok, other=0.0)
        # rint(w / scale), half to even, inline (a nested @jit helper costs a re-patch per call in
        # the interpreter): clamp to +-2^22, then x + 1.5*2^23 lies in [2^23, 2^24] where float32
        # spacing is 1, so the add rounds to an integer (ties to even: the constant is even) and
        # the subtract is exact.
        x = tl.math.div_rn(w_j, scale)
        x = tl.minimum(tl.maximum(x, -_RINT_LIMIT), _RINT_LIMIT)
        q = ((x + _RINT_MAGIC) - _RINT_MAGIC) + zero
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        dq = scale * (q - zero)
        err = tl.math.div_rn(w_j - dq, tl.load(d_ptr))
        # Row j of Hinv. Its entries left of the diagonal are the zeros of the upper-triangular
        # factor, so updating the whole tile changes only columns >= j (x - err * 0 == x), as the
        # torch path's w_block[:, i:] slice does; not masking them saves two ops per column.
        h_row = tl.load(h_ptrs, mask=col_ok, other=0.0)
        tile = tile - err[:, None] * h_row[None, :]
        tl.store(c_ptrs, q, mask=row_ok)
        tl.store(e_ptrs, err, mask=row_ok)
        s_ptrs += stride_sn
        z_ptrs += stride_zn
        c_ptrs += stride_on
        e_ptrs += stride_on
        h_ptrs += stride_hm
        d_ptr += stride_hm + stride_hn

    tl.store(w_ptr + w_offs, tile, mask=tile_ok)


# On the GPU the row-tile height is autotuned once per (rows, block width). Programs are the only
# parallelism (rows / BLOCK_M of them, each a 128-step dependent chain), so short matrices want small
# tiles and tall ones want tall tiles with few warps. Measured on an H100 (triton 3.6, one 128-column
# block): 4096 rows: 8/4 warps 134 us, 16/4 170 us; 14336 rows: 64/2 222 us, 32/1 268 us, 16/4
# 394 us; 28672 rows: 64/2 303 us, 16/4 632 us. restore_value makes the benchmarking runs leave the
# in-place block as it was.
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 8}, num_warps=4),
    triton.Config({"BLOCK_M": 16}, num_warps=4),
    triton.Config({"BLOCK_M": 32}, num_warps=1),
    triton.Config({"BLOCK_M": 64}, num_warps=2),
    triton.Config({"BLOCK_M": 64}, num_warps=4),
]
_gptq_block_kernel_tuned = triton.autotune(
    configs=_AUTOTUNE_CONFIGS, key=["n_rows", "n_cols"], restore_value=["w_ptr"]
)(_gptq_block_kernel)

INTERPRETED = type(_gptq_block_kernel).__name__ == "InterpretedFunction"


def tuned_configs() -> dict[str, str]:
    """The config autotuning picked per key (for benchmarks' reports); empty before any GPU run."""
    cache = getattr(_gptq_block_kernel_tuned, "cache", {}) or {}
    return {str(key): str(config) for key, config in cache.items()}


def _launch(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    block_m: int | None,
    num_warps: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    codes = torch.empty((rows, cols), device=w.device, dtype=torch.float32)
    errors = torch.empty_like(codes)
    if rows == 0 or cols == 0:
        return codes, errors
    block_b = max(16, triton.next_power_of_2(cols))
    args = (
        w, h, scale, zero, codes, errors, rows, cols,
        w.stride(0), w.stride(1), h.stride(0), h.stride(1),
        scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
        codes.stride(0), codes.stride(1), float(maxq),
    )  # fmt: skip
    if block_m is None and not INTERPRETED:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)  # noqa: E731
        _gptq_block_kernel_tuned[grid](*args, BLOCK_B=block_b, enable_fp_fusion=False)
    else:
        bm = block_m or INTERPRETER_BLOCK_M
        _gptq_block_kernel[(triton.cdiv(rows, bm),)](
            *args, BLOCK_M=bm, BLOCK_B=block_b, num_warps=num_warps or 4, enable_fp_fusion=False
        )
    return codes, errors


def solve_block_triton(
    w_block: torch.Tensor,
    hinv_block: torch.Tensor,
    scale_cols: torch.Tensor,
    zero_cols: torch.Tensor,
    maxq: int,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `gptq.solve_block_torch`: w_block [rows, B] float32 (may be a strided
    column slice; updated in place), hinv_block [B, B] upper-triangular, scale_cols/zero_cols
    [rows, B]. Returns codes [rows, B] (float32, integer valued) and errors [rows, B].

    Only the upper triangle of hinv_block is meaningful: a nonzero lower triangle would change the
    in-place w_block contents of already-solved columns (never the codes or errors).

    block_m/num_warps pin the kernel config (benchmark sweeps); by default it is autotuned on the
    GPU and INTERPRETER_BLOCK_M under TRITON_INTERPRET=1.
    """
    if w_block.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "solve_block_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported to run the kernel on the CPU; use gptq.solve_block_torch otherwise"
        )
    for name, t in (("w_block", w_block), ("hinv_block", hinv_block), ("scale_cols", scale_cols),
                    ("zero_cols", zero_cols)):  # fmt: skip
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    rows, cols = w_block.shape
    if (
        hinv_block.shape != (cols, cols)
        or scale_cols.shape != (rows, cols)
        or zero_cols.shape != (rows, cols)
    ):
        raise ValueError(
            f"shape mismatch: w_block {tuple(w_block.shape)}, hinv_block {tuple(hinv_block.shape)}, "
            f"scale_cols {tuple(scale_cols.shape)}, zero_cols {tuple(zero_cols.shape)}"
        )
    if cols <= MAX_BLOCK_COLS:
        return _launch(w_block, hinv_block, scale_cols, zero_cols, maxq, block_m, num_warps)

    # Wider than the register tile: sub-blocks, each one's error fed to the later ones at once.
    codes = torch.empty((rows, cols), device=w_block.device, dtype=torch.float32)
    errors = torch.empty_like(codes)
    for s in range(0, cols, MAX_BLOCK_COLS):
        e = min(s + MAX_BLOCK_COLS, cols)
        c, err = _launch(
            w_block[:, s:e], hinv_block[s:e, s:e], scale_cols[:, s:e], zero_cols[:, s:e], maxq,
            block_m, num_warps,
        )  # fmt: skip
        codes[:, s:e] = c
        errors[:, s:e] = err
        if e < cols:
            w_block[:, e:] -= err @ hinv_block[s:e, e:]
    return codes, errors
