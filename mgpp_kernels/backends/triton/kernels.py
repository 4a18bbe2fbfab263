"""Triton kernels of one MGPP step (docs/spec.md §2-3), the Triton twin of csrc/core (step.h, formats.h,
selection.h, layout.h).

Every kernel covers many tensors in one launch: it reads a device-side int64 table with one row
per tensor (addresses, sizes, per-tensor flags) and an int32 block table that maps each program
to (tensor row, block within the tensor). Per-step values (lr, betas, λ_t's constants, step
counts, the GradScaler scale, the rank k and τ) are read from device memory, never passed as
launch arguments, so a launch depends only on the cached tables and the dtypes.

The per-element math is csrc/core/step.h's, operation by operation: the same exp polynomial
with its exponent-bit construction, the same reciprocal estimate and Newton steps for the
logistic, the exponent's argument as fma(c2·θ, θ, c1), the spike/slab weight as
fma(ρ0, 1/σ0² − 1/σ1², 1/σ1²), the lerp form of AdamW with the denominator
fma(√v, 1/√(1 − β2^k), ε), IEEE division and square root for AdamW (div_rn, sqrt_rn; Triton's `/`
and tl.sqrt are approximate on NVIDIA GPUs), and 16-bit stores rounded to nearest even with
integer operations (the interpreter's plain casts truncate). step.h's mul_add is tl.fma here: one
rounding on a GPU; the interpreter rounds it twice, as step.h does on a target without FMA. The
kernels launch with Triton's defaults (multiply-add fusion on). tests/test_rounding.py checks
that the cpu backend and these kernels agree within a few ulp per operation (docs/spec.md §4).

Where Triton cannot follow the header:
- β^k of the bias corrections (prepare_kernel) is exp2(k·log2 β) in float64, Triton having no
  pow: it may differ from std::pow by a few float64 ulp, which the float32 rounding of
  lr / (1 − β1^k) and 1/√(1 − β2^k) that follows absorbs except where the float64 value lies
  within those ulp of a float32 rounding boundary (none for β ∈ {0.8, 0.9, 0.95, 0.99, 0.999,
  0.9999} and k ≤ 20000).
- float16 widens with a hardware conversion instead of formats.h's bit arithmetic: the same
  value for every input (a NaN's payload may differ).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops import layout

# Helpers called from the kernels. Under the interpreter they run as plain Python inside the
# kernel's interpretation: an interpreted @triton.jit call re-patches triton.language on every
# call (about 2 ms each), which would make a program instance of the update kernel cost ~40 ms.
device_function = (lambda fn: fn) if triton.knobs.runtime.interpret else triton.jit


def _columns(names: tuple[str, ...], wanted: tuple[str, ...] | None = None
             ) -> tuple[tl.constexpr, ...]:
    """The constexpr index in `names` of each of `wanted` (default: every name, in order)."""
    return tuple(tl.constexpr(names.index(name)) for name in (wanted or names))


# Storage formats: layout.KERNEL_DTYPES's codes (checked against csrc/core/formats.h at import).
F32, BF16, F16 = (tl.constexpr(layout.KERNEL_DTYPES.index(dtype))
                  for dtype in (torch.float32, torch.bfloat16, torch.float16))

# Radix histogram of |x| float32 key bits, the layout of mgpp_kernels.ops.layout (the Python copy
# of csrc/core/layout.h): 16 high bits, then 15 low bits.
LOW_BITS = tl.constexpr(layout.LOW_BITS)
HIGH_BINS = tl.constexpr(layout.HIGH_BINS)
LOW_BINS = tl.constexpr(layout.LOW_BINS)
# csrc/core/selection.h's kNaNKeyFloor and kNotCandidateKey.
NAN_KEY_FLOOR = tl.constexpr(0x7F800001)
NOT_CANDIDATE_KEY = tl.constexpr(0x7FFFFFFF)

# The float64 step scalars of one update group, in layout.STEP_SCALARS order.
NUM_STEP_SCALARS = tl.constexpr(layout.NUM_STEP_SCALARS)
(S_LR, S_BETA1, S_BETA2, S_EPS, S_WEIGHT_DECAY, S_PRIOR_ON, S_C1, S_C2, S_INV_N, S_INV_SIGMA0_SQ,
 S_INV_SIGMA1_SQ) = _columns(layout.STEP_SCALARS, (
    "lr", "beta1", "beta2", "eps", "weight_decay", "prior_on", "c1", "c2", "inv_n",
    "inv_sigma0_sq", "inv_sigma1_sq"))

# The block table (int32, one row per program): the tensor's row in the launch's table and the
# block's index within the tensor.
BLOCK_TABLE = ("tensor", "block")
BLOCK_COLUMNS = tl.constexpr(len(BLOCK_TABLE))
B_TENSOR, B_BLOCK = _columns(BLOCK_TABLE)
# The update table (int64, one row per tensor): addresses, numel, the tensor's row of scalars
# and the pool (its event's index) whose level-0 histogram counts its updated values on an event,
# -1 for none.
UPDATE_TABLE = ("param", "grad", "exp_avg", "exp_avg_sq", "keep_mask", "numel", "row", "pool")
UPDATE_COLUMNS = tl.constexpr(len(UPDATE_TABLE))
U_PARAM, U_GRAD, U_EXP_AVG, U_EXP_AVG_SQ, U_KEEP_MASK, U_NUMEL, U_ROW, U_POOL = _columns(
    UPDATE_TABLE)
# The value table of the histogram and threshold kernels (int64, one row per tensor).
VALUE_TABLE = ("data", "numel", "keep_mask")
VALUE_COLUMNS = tl.constexpr(len(VALUE_TABLE))
V_DATA, V_NUMEL, V_KEEP_MASK = _columns(VALUE_TABLE)
# The prepare table (int64, one row per tensor of the step): its step count's address, its group.
PREPARE_TABLE = ("step", "group")
PREPARE_COLUMNS = tl.constexpr(len(PREPARE_TABLE))
P_STEP, P_GROUP = _columns(PREPARE_TABLE)
# The float32 row of per-tensor scalars that prepare_kernel writes for update_kernel; the prior's
# six are in the step scalars' order, from prior_on on.
SCALAR_ROW = ("decay", "beta2", "one_minus_beta1", "one_minus_beta2", "step_size",
              "inv_bc2_sqrt", "eps", "inv_grad_scale", "prior_on", "c1", "c2", "inv_n",
              "inv_sigma0_sq", "inv_sigma1_sq")
ROW_WIDTH = tl.constexpr(len(SCALAR_ROW))
(R_DECAY, R_BETA2, R_ONE_MINUS_BETA1, R_ONE_MINUS_BETA2, R_STEP_SIZE, R_INV_BC2_SQRT, R_EPS,
 R_INV_GRAD_SCALE, R_PRIOR_ON, R_C1, R_C2, R_INV_N, R_INV_SIGMA0_SQ,
 R_INV_SIGMA1_SQ) = _columns(SCALAR_ROW)
NUM_PRIOR_SCALARS = tl.constexpr(len(SCALAR_ROW) - SCALAR_ROW.index("prior_on"))
# The device schedule (layout.SCHEDULE_COLUMNS rows) and the step's row written from it (CURRENT).
SCHEDULE_WIDTH = tl.constexpr(len(layout.SCHEDULE_COLUMNS))
CURRENT_WIDTH = tl.constexpr(len(layout.CURRENT))
C_PRIOR_ON, C_C1, C_K, C_FREEZE, C_SKIP = _columns(
    layout.CURRENT, ("prior_on", "c1", "k", "freeze", "skip"))
# Selection state (layout.SELECTION, csrc/core/layout.h): rank of τ among the keys in play, τ's
# key bits, keys below τ, keys in the bin the last level chose.
SEL_RANK, SEL_KEY, SEL_BELOW, SEL_EQUAL = _columns(layout.SELECTION,
                                                   ("rank", "key", "below", "equal"))


# ---- storage formats ---------------------------------------------------------------------------

@device_function
def _typed_pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A pointer to float32 or to the uint16 bits of a 16-bit format, from an int64 address."""
    if DTYPE == F32:
        pointer = address.to(tl.pointer_type(tl.float32))
    else:
        pointer = address.to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        # True for every tensor of the table (the host checks it): 128-bit loads.
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@device_function
def _bits_to_f32(raw, DTYPE: tl.constexpr):
    """Widens loaded storage to float32 (exact for every format)."""
    if DTYPE == F32:
        value = raw
    elif DTYPE == BF16:
        value = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = raw.to(tl.float16, bitcast=True).to(tl.float32)
    return value


@device_function
def _load(pointers, in_bounds):
    """Loads raw storage; in_bounds None: a full block, loaded without a mask."""
    if in_bounds is None:
        raw = tl.load(pointers)
    else:
        raw = tl.load(pointers, mask=in_bounds, other=0)
    return raw


@device_function
def _f32_to_bf16_bits(x):
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FC0, rounded).to(tl.uint16)  # canonical NaN, as torch


@device_function
def _f32_to_f16_bits(x):
    # Scale up then down by powers of two so that float rounding does the round-to-nearest-even
    # at float16's precision, including overflow to inf and gradual underflow.
    scale_to_inf = tl.full(x.shape, 0x77800000, tl.uint32).to(tl.float32, bitcast=True)   # 2^112
    scale_to_zero = tl.full(x.shape, 0x08800000, tl.uint32).to(tl.float32, bitcast=True)  # 2^-110
    w = x.to(tl.uint32, bitcast=True)
    magnitude = (w & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    base = (magnitude * scale_to_inf) * scale_to_zero
    shl1_w = w + w
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    bias = tl.where(bias < 0x71000000, 0x71000000, bias)
    base = ((bias >> 1) + 0x07800000).to(tl.float32, bitcast=True) + base
    bits = base.to(tl.uint32, bitcast=True)
    nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
    nan = 0x7E00 | ((w >> 13) & 0x03FF)  # quieted, the payload's high bits kept
    return ((sign >> 16) | tl.where(shl1_w > 0xFF000000, nan, nonsign)).to(tl.uint16)


@device_function
def _f32_to_bits(x, DTYPE: tl.constexpr):
    """Narrows float32 to the storage format, rounding to nearest even."""
    if DTYPE == F32:
        stored = x
    elif DTYPE == BF16:
        stored = _f32_to_bf16_bits(x)
    else:
        stored = _f32_to_f16_bits(x)
    return stored


@device_function
def _abs_key(x):
    """|x| as its float32 bits: orders like the value for non-negative floats (NaN above inf)."""
    return (x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


# ---- spike-and-slab prior and AdamW ------------------------------------------------------------

@device_function
def _exp_for_logistic(x):
    """exp(x) for 1 / (1 + exp(x)): csrc/core/step.h's exp_for_logistic (relative error 2e-7)."""
    max_finite = 88.72283935546875  # ln(FLT_MAX)
    # NaN fails both comparisons and is clamped to -86, so that the exponent bits below are
    # defined for every input; the last line returns NaN for it.
    clamped = tl.where(x >= -86.0, tl.where(x <= max_finite, x, max_finite), -86.0)
    # shifted = 1.5·2^23 + n, n = x·log2 e rounded to an integer: n is in the low bits.
    shifted = tl.fma(clamped, 1.44269504088896341, 12582912.0)
    n = shifted - 12582912.0
    # r = x - n·ln2 with ln2 split in two (Cody-Waite) so r keeps full precision.
    r = tl.fma(n, -0.693359375, clamped)
    r = tl.fma(n, 2.12194440e-4, r)
    # exp(r): step.h's degree-5 minimax polynomial with the constant term 1.
    p = tl.full(r.shape, 8.289568126e-3, tl.float32)
    p = tl.fma(p, r, 4.190196842e-2)
    p = tl.fma(p, r, 1.666767001e-1)
    p = tl.fma(p, r, 4.999912083e-1)
    p = tl.fma(p, r, 9.999997020e-1)
    e_r = tl.fma(p, r, 1.0)
    # 2^n in the exponent bits, as two factors so that n = 128 does not overflow the exponent.
    n_bits = shifted.to(tl.int32, bitcast=True) - 0x4B400000
    half_scale = ((n_bits + 126) << 23).to(tl.float32, bitcast=True)
    result = (e_r * half_scale) * 2.0
    return tl.where(x > max_finite, float("inf"), tl.where(x == x, result, x))


@device_function
def _reciprocal_from_one(d):
    """1/d for 1 <= d < 2^125: csrc/core/step.h's reciprocal_from_one (relative error 1.4e-7)."""
    y = (0x7EF311C3 - d.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    e = tl.fma(-d, y, 1.0)
    y = tl.fma(y, e, y)
    e = tl.fma(-d, y, 1.0)
    return tl.fma(y, tl.fma(e, e, e), y)


@device_function
def _prior_gradient(theta, c1, c2, inv_n, inv_sigma0_sq, inv_sigma1_sq):
    """(θ/n)·(ρ0/σ0² + (1 − ρ0)/σ1²), ρ0 = 1 / (1 + exp(c1 + c2·θ²)), in step.h's order."""
    denom = 1.0 + _exp_for_logistic(tl.fma(c2 * theta, theta, c1))
    # ρ0 flushed to 0 at or below 2^-125 (exactly 0 where exp overflows); NaN stays NaN.
    rho0 = tl.where(denom >= 4.2535295865117308e37, 0.0, _reciprocal_from_one(denom))  # 2^125
    weight = tl.fma(rho0, inv_sigma0_sq - inv_sigma1_sq, inv_sigma1_sq)
    return (theta * inv_n) * weight


# ---- the fused step ----------------------------------------------------------------------------

@device_function
def _runs(current, SCHEDULED: tl.constexpr, SLOT: tl.constexpr):
    """Whether a launch does its work this step. On the host schedule, always: the host launches
    only what runs. On the device schedule, as the step's row says: SLOT C_SKIP, unless the step
    is skipped (the update); C_K, when it prunes (the event's kernels); C_FREEZE, when it
    freezes the mask (the keep masks' writes)."""
    if SCHEDULED:
        value = tl.load(current + SLOT)
        if SLOT == C_SKIP:
            runs = value == 0.0
        else:
            runs = value != 0.0
    else:
        runs = True
    return runs


@device_function
def _program_block(table, block_table, COLUMNS: tl.constexpr, NUMEL: tl.constexpr,
                   BLOCK: tl.constexpr):
    """This program's block: its tensor's row of `table` (COLUMNS int64 columns, the tensor's
    numel in column NUMEL), the block's first element and the tensor's numel."""
    block_row = block_table + BLOCK_COLUMNS * tl.program_id(0)
    entry = table + tl.load(block_row + B_TENSOR).to(tl.int64) * COLUMNS
    start = tl.load(block_row + B_BLOCK).to(tl.int64) * BLOCK
    return entry, start, tl.load(entry + NUMEL)


@triton.jit
def schedule_kernel(table, num_rows, position, found_inf, current, HAS_FOUND_INF: tl.constexpr):
    """The first launch of a step on the device schedule, one program: copies the row of
    t = position (the last row for every t beyond the table) into `current`, with k = 0 and the
    skip flag set when found_inf != 0, and advances t unless the step is skipped."""
    t = tl.load(position)
    if HAS_FOUND_INF:
        skip = tl.load(found_inf).to(tl.float32) != 0.0
    else:
        skip = t < 0   # false: a tensor flag like the found_inf one
    row = table + tl.minimum(t, num_rows - 1) * SCHEDULE_WIDTH
    for j in tl.static_range(SCHEDULE_WIDTH):
        value = tl.load(row + j)
        if j == C_K:
            value = tl.where(skip, 0.0, value)
        tl.store(current + j, value)
    tl.store(current + C_SKIP, tl.where(skip, 1.0, 0.0).to(tl.float64))
    tl.store(position, tl.where(skip, t, t + 1))


@triton.jit
def prepare_kernel(prepare_table, scalars, grad_scale, rows, num_tensors, current,
                   HAS_GRAD_SCALE: tl.constexpr, SCHEDULED: tl.constexpr, BLOCK: tl.constexpr):
    """Per tensor of the step: increments its step count k and writes the float32 scalars of its
    AdamW update and its group's prior. As torch.optim.AdamW, every constant derived from the
    hyperparameters (1 − lr·wd, 1 − β1, 1 − β2, lr / (1 − β1^k), 1/√(1 − β2^k)) is computed in
    float64 and rounded once to float32, as csrc/core/step.h's adamw_scalars: 1 − β2 rounded from
    β2's float32 value would be off by 1.3e-5 relative for β2 = 0.999, beyond docs/spec.md §4's bound on
    v when g² dominates it.

    k lives in a float32 tensor on the device, addressed by the table. SCHEDULED (the device
    schedule): `current` gives the prior's on/off and c1 of this t, and a skipped step leaves k
    where it is.
    """
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = index < num_tensors
    entry = prepare_table + index.to(tl.int64) * PREPARE_COLUMNS
    group = tl.load(entry + P_GROUP, mask=valid, other=0)
    step_pointer = tl.load(entry + P_STEP, mask=valid, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_pointer, mask=valid, other=0.0)
    step = step + tl.where(_runs(current, SCHEDULED, C_SKIP), 1.0, 0.0)
    tl.store(step_pointer, step, mask=valid)
    s = scalars + group * NUM_STEP_SCALARS
    lr = tl.load(s + S_LR, mask=valid, other=0.0)
    beta1 = tl.load(s + S_BETA1, mask=valid, other=0.5)
    beta2 = tl.load(s + S_BETA2, mask=valid, other=0.5)
    # β^k in float64 as exp2(k·log2 β): within a few float64 ulp of std::pow, far below the
    # float32 rounding that follows (β = 0 gives log2 = -inf and β^k = 0).
    k = step.to(tl.float64)
    bias_correction1 = 1.0 - tl.exp2(k * tl.log2(beta1))
    bias_correction2 = 1.0 - tl.exp2(k * tl.log2(beta2))
    one = tl.full([BLOCK], 1.0, tl.float32)
    if HAS_GRAD_SCALE:
        # 1 / scale in float32, as the CPU op: the update multiplies the gradients by it.
        inv_grad_scale = tl.div_rn(one, one * tl.load(grad_scale).to(tl.float32))
    else:
        inv_grad_scale = one
    weight_decay = tl.load(s + S_WEIGHT_DECAY, mask=valid, other=0.0)
    eps = tl.load(s + S_EPS, mask=valid, other=0.0)
    row = rows + index.to(tl.int64) * ROW_WIDTH
    tl.store(row + R_DECAY, (1.0 - lr * weight_decay).to(tl.float32), mask=valid)
    tl.store(row + R_BETA2, beta2.to(tl.float32), mask=valid)
    tl.store(row + R_ONE_MINUS_BETA1, (1.0 - beta1).to(tl.float32), mask=valid)
    tl.store(row + R_ONE_MINUS_BETA2, (1.0 - beta2).to(tl.float32), mask=valid)
    tl.store(row + R_STEP_SIZE, (lr / bias_correction1).to(tl.float32), mask=valid)
    tl.store(row + R_INV_BC2_SQRT, (1.0 / tl.sqrt(bias_correction2)).to(tl.float32), mask=valid)
    tl.store(row + R_EPS, eps.to(tl.float32), mask=valid)
    tl.store(row + R_INV_GRAD_SCALE, inv_grad_scale, mask=valid)
    # The prior's six scalars (on/off, c1, c2, 1/n, 1/σ0², 1/σ1²), in the same order in both.
    for j in tl.static_range(NUM_PRIOR_SCALARS):
        prior_scalar = tl.load(s + S_PRIOR_ON + j, mask=valid, other=0.0)
        if SCHEDULED:   # this t's on/off (times the group's) and c1, from the step's row
            if j == 0:
                prior_scalar = prior_scalar * tl.load(current + C_PRIOR_ON)
            if j == 1:
                prior_scalar = tl.where(valid, tl.load(current + C_C1), 0.0)
        tl.store(row + R_PRIOR_ON + j, prior_scalar.to(tl.float32), mask=valid)


@device_function
def _update_block(param, grad, exp_avg, exp_avg_sq, keep_mask_address, offsets, in_bounds, row,
                  histogram, counts, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                  COUNT: tl.constexpr):
    """Prior gradient + AdamW + frozen mask on one block (pointers already at the block start);
    where `counts` (an event of the tensor's pool), adds |θ_new| as stored to the pool's level-0
    histogram."""
    theta = _bits_to_f32(_load(param + offsets, in_bounds), PARAM_DTYPE)
    g = _bits_to_f32(_load(grad + offsets, in_bounds), PARAM_DTYPE)
    m = _bits_to_f32(_load(exp_avg + offsets, in_bounds), STATE_DTYPE)
    v = _bits_to_f32(_load(exp_avg_sq + offsets, in_bounds), STATE_DTYPE)
    if tl.load(row + R_PRIOR_ON) != 0.0:
        g = tl.fma(g, tl.load(row + R_INV_GRAD_SCALE),
                   _prior_gradient(theta, tl.load(row + R_C1), tl.load(row + R_C2),
                                   tl.load(row + R_INV_N), tl.load(row + R_INV_SIGMA0_SQ),
                                   tl.load(row + R_INV_SIGMA1_SQ)))
    else:
        g = g * tl.load(row + R_INV_GRAD_SCALE)
    # torch.optim.AdamW's order of operations (csrc/core/step.h adamw_update).
    theta = theta * tl.load(row + R_DECAY)
    # torch's lerp: from the nearer end, so that β1 = 0 (weight 1) gives m = g exactly.
    weight = tl.load(row + R_ONE_MINUS_BETA1)
    difference = g - m
    m = tl.where(weight < 0.5, tl.fma(difference, weight, m),
                 tl.fma(-difference, 1.0 - weight, g))
    v = tl.fma(v, tl.load(row + R_BETA2), tl.load(row + R_ONE_MINUS_BETA2) * (g * g))
    denom = tl.fma(tl.sqrt_rn(v), tl.load(row + R_INV_BC2_SQRT), tl.load(row + R_EPS))
    theta = tl.fma(tl.div_rn(m, denom), -tl.load(row + R_STEP_SIZE), theta)
    if keep_mask_address != 0:
        keep_mask = keep_mask_address.to(tl.pointer_type(tl.uint8))
        mask_bytes = _load(keep_mask + (offsets >> 3), in_bounds).to(tl.int32)
        theta = tl.where(((mask_bytes >> (offsets & 7)) & 1) != 0, theta, 0.0)
    stored = _f32_to_bits(theta, PARAM_DTYPE)
    tl.store(param + offsets, stored, mask=in_bounds)
    tl.store(exp_avg + offsets, _f32_to_bits(m, STATE_DTYPE), mask=in_bounds)
    tl.store(exp_avg_sq + offsets, _f32_to_bits(v, STATE_DTYPE), mask=in_bounds)
    if COUNT:
        if counts:
            key = _abs_key(_bits_to_f32(stored, PARAM_DTYPE))
            tl.atomic_add(histogram + (key >> LOW_BITS), 1, mask=in_bounds, sem="relaxed")


@triton.jit
def update_kernel(update_table, block_table, rows, histograms, currents,
                  PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COUNT: tl.constexpr,
                  SCHEDULED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK of one tensor per program: the fused MGPP update (docs/spec.md §2) of the tensors
    of one (parameter dtype, state dtype) pair. COUNT: this may be an event step; a tensor whose
    table row names a pool (U_POOL >= 0) adds its updated values to that pool's row of the level-0
    `histograms` ([pools × HIGH_BINS]). SCHEDULED: the pool's row of `currents` ([pools ×
    CURRENT], the step's rows of the device schedule) says whether the pool prunes (k != 0), and
    the first row whether the step is skipped (then nothing is written; every row says it)."""
    if _runs(currents, SCHEDULED, C_SKIP):
        _update_program(update_table, block_table, rows, histograms, currents, PARAM_DTYPE,
                        STATE_DTYPE, COUNT, SCHEDULED, ALIGNED, BLOCK)


@device_function
def _update_program(update_table, block_table, rows, histograms, currents,
                    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COUNT: tl.constexpr,
                    SCHEDULED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    entry, start, numel = _program_block(update_table, block_table, UPDATE_COLUMNS, U_NUMEL, BLOCK)
    param = _typed_pointer(tl.load(entry + U_PARAM), PARAM_DTYPE, ALIGNED) + start
    grad = _typed_pointer(tl.load(entry + U_GRAD), PARAM_DTYPE, ALIGNED) + start
    exp_avg = _typed_pointer(tl.load(entry + U_EXP_AVG), STATE_DTYPE, ALIGNED) + start
    exp_avg_sq = _typed_pointer(tl.load(entry + U_EXP_AVG_SQ), STATE_DTYPE, ALIGNED) + start
    keep_mask_address = tl.load(entry + U_KEEP_MASK)
    keep_mask_address = tl.where(keep_mask_address != 0, keep_mask_address + start // 8, 0)
    row = rows + tl.load(entry + U_ROW) * ROW_WIDTH
    pool = tl.load(entry + U_POOL)
    pool_row = tl.maximum(pool, 0)   # any row for a tensor outside every pool: never counted
    histogram = histograms + pool_row * HIGH_BINS
    counts = (pool >= 0) & _runs(currents + pool_row * CURRENT_WIDTH, SCHEDULED, C_K)
    offsets = tl.arange(0, BLOCK)
    # Full blocks run without a bounds mask so that their loads vectorise; the tail block masks.
    if start + BLOCK <= numel:
        _update_block(param, grad, exp_avg, exp_avg_sq, keep_mask_address, offsets, None, row,
                      histogram, counts, PARAM_DTYPE, STATE_DTYPE, COUNT)
    else:
        _update_block(param, grad, exp_avg, exp_avg_sq, keep_mask_address, offsets,
                      offsets < numel - start, row, histogram, counts, PARAM_DTYPE, STATE_DTYPE,
                      COUNT)


# ---- exact global threshold --------------------------------------------------------------------

@device_function
def _keep_candidate_keys(key, GROUP_SIZE: tl.constexpr, GROUP_TILE: tl.constexpr,
                         PRUNABLE: tl.constexpr):
    """csrc/core/selection.h keep_candidate_keys on a tile of groups, one group per row of
    GROUP_TILE lanes (GROUP_SIZE rounded up to a power of two; the lanes from GROUP_SIZE on are
    no element): keys not among the PRUNABLE smallest of their group become NOT_CANDIDATE_KEY,
    the lower index being the smaller of equal keys. Each key's rank counts the smaller ones of
    its row, [groups, lane, other lane] in registers."""
    lane = tl.arange(0, GROUP_TILE)
    mine, other = key[:, :, None], key[:, None, :]
    smaller = (other < mine) | ((other == mine) & (lane[None, None, :] < lane[None, :, None]))
    smaller = smaller & (lane < GROUP_SIZE)[None, None, :]
    rank = tl.sum(smaller.to(tl.int32), 2)
    return tl.where(rank < PRUNABLE, key, NOT_CANDIDATE_KEY)


@device_function
def _group_keys(data, remaining, DTYPE: tl.constexpr, GROUPS: tl.constexpr,
                GROUP_SIZE: tl.constexpr, GROUP_TILE: tl.constexpr, PRUNABLE: tl.constexpr):
    """The N:M ranking keys of a block of GROUPS whole groups (`data` at its start, `remaining`
    elements from there to the tensor's end, a multiple of GROUP_SIZE), as a [GROUPS, GROUP_TILE]
    tile: the elements' offsets (group g's element j at g·GROUP_SIZE + j), which lanes are
    elements, and their keys (csrc/cpu/kernels.cpp block_keys)."""
    lane = tl.arange(0, GROUP_TILE)[None, :]
    offsets = tl.arange(0, GROUPS)[:, None] * GROUP_SIZE + lane
    in_bounds = (lane < GROUP_SIZE) & (offsets < remaining)
    key = _abs_key(_bits_to_f32(_load(data + offsets, in_bounds), DTYPE))
    return offsets, in_bounds, _keep_candidate_keys(key, GROUP_SIZE, GROUP_TILE, PRUNABLE)


@device_function
def _below_threshold(key, tau_key, AT_TAU: tl.constexpr):
    """csrc/core/selection.h below_threshold: key < τ's, or <= where AT_TAU (N:M); comparisons
    with a NaN τ are false."""
    if AT_TAU:
        below = key < tau_key + 1
    else:
        below = key < tau_key
    return below & (tau_key < NAN_KEY_FLOOR)


@device_function
def _count_keys(key, counted, histogram, high_bin, LEVEL: tl.constexpr):
    """Adds the keys where `counted` (None: all) to the level's histogram: LEVEL 0 their high
    bits; LEVEL 1 the low bits of those whose high bits are `high_bin`."""
    if LEVEL == 0:
        tl.atomic_add(histogram + (key >> LOW_BITS), 1, mask=counted, sem="relaxed")
    else:
        match = (key >> LOW_BITS) == high_bin
        if counted is not None:
            match = match & counted
        tl.atomic_add(histogram + (key & (LOW_BINS - 1)), 1, mask=match, sem="relaxed")


@triton.jit
def histogram_kernel(value_table, block_table, histogram, selection, current, DTYPE: tl.constexpr,
                     LEVEL: tl.constexpr, SCHEDULED: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCK: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_TILE: tl.constexpr,
                     PRUNABLE: tl.constexpr):
    """Adds the radix histogram of |x| over the table's tensors. LEVEL 0: HIGH_BINS counters of
    the key's high bits over all elements; LEVEL 1: LOW_BINS counters of the low bits of the
    elements whose high bits are the bin chosen at level 0 (selection[SEL_KEY]). An N:M pool
    (GROUP_SIZE = M > 0; BLOCK elements are whole groups) counts the keys of its ranking, every
    non-candidate as NOT_CANDIDATE_KEY. SCHEDULED: only on an event step (k != 0 in `current`)."""
    if _runs(current, SCHEDULED, C_K):
        _histogram_program(value_table, block_table, histogram, selection, DTYPE, LEVEL, ALIGNED,
                           BLOCK, GROUP_SIZE, GROUP_TILE, PRUNABLE)


@device_function
def _histogram_program(value_table, block_table, histogram, selection, DTYPE: tl.constexpr,
                       LEVEL: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                       GROUP_SIZE: tl.constexpr, GROUP_TILE: tl.constexpr,
                       PRUNABLE: tl.constexpr):
    entry, start, numel = _program_block(value_table, block_table, VALUE_COLUMNS, V_NUMEL, BLOCK)
    data = _typed_pointer(tl.load(entry + V_DATA), DTYPE, ALIGNED) + start
    if LEVEL == 0:
        high_bin = 0
    else:
        high_bin = tl.load(selection + SEL_KEY) >> LOW_BITS
    if GROUP_SIZE != 0:
        _, in_bounds, key = _group_keys(data, numel - start, DTYPE, BLOCK // GROUP_SIZE,
                                        GROUP_SIZE, GROUP_TILE, PRUNABLE)
        _count_keys(key, in_bounds, histogram, high_bin, LEVEL)
    else:
        offsets = tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            key = _abs_key(_bits_to_f32(_load(data + offsets, None), DTYPE))
            _count_keys(key, None, histogram, high_bin, LEVEL)
        else:
            in_bounds = offsets < numel - start
            key = _abs_key(_bits_to_f32(_load(data + offsets, in_bounds), DTYPE))
            _count_keys(key, in_bounds, histogram, high_bin, LEVEL)


@triton.jit
def select_kernel(histogram, selection, rank_source, tau, current, LEVEL: tl.constexpr,
                  SCHEDULED: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Radix selection (csrc/core/selection.h select_bin), one program: finds the bin that holds
    the rank-th smallest key, updates selection = [rank, key, below, equal], writes τ = the key's
    float, and zeroes the histogram for its next use. LEVEL 0 starts from rank = rank_source[0]
    (the float64 k of the staged host values, or of `current`); LEVEL 1 continues from selection.
    SCHEDULED: only on an event step (k != 0 in `current`), so that `selection` and τ keep the
    last event's values in between."""
    if _runs(current, SCHEDULED, C_K):
        _select_program(histogram, selection, rank_source, tau, LEVEL, BINS, CHUNK)


@device_function
def _select_program(histogram, selection, rank_source, tau, LEVEL: tl.constexpr,
                    BINS: tl.constexpr, CHUNK: tl.constexpr):
    if LEVEL == 0:
        rank = tl.load(rank_source).to(tl.int64)
    else:
        rank = tl.load(selection + SEL_RANK)
    before = rank * 0          # keys in the bins scanned so far
    chosen = rank * 0 + (BINS - 1)
    chosen_before = rank * 0   # keys below the chosen bin
    chosen_count = rank * 0    # keys in the chosen bin
    found = rank * 0
    last_count = rank * 0
    for chunk in range(0, BINS, CHUNK):
        bins = chunk + tl.arange(0, CHUNK)
        counts = tl.load(histogram + bins)
        tl.store(histogram + bins, tl.zeros_like(counts))
        cumulative = before + tl.cumsum(counts, 0)
        first = tl.min(tl.where(cumulative >= rank, bins, BINS), 0)
        hit = (found == 0) & (first < BINS)
        chosen = tl.where(hit, first, chosen)
        chosen_before = tl.where(hit, before + tl.sum(tl.where(bins < first, counts, 0), 0),
                                 chosen_before)
        chosen_count = tl.where(hit, tl.sum(tl.where(bins == first, counts, 0), 0), chosen_count)
        found = tl.where(hit, 1, found)
        last_count = tl.sum(tl.where(bins == BINS - 1, counts, 0), 0) + last_count
        before = before + tl.sum(counts, 0)
    # No bin reaches the rank (k above the count): the last bin, as select_bin's loop ends.
    chosen_before = tl.where(found != 0, chosen_before, before - last_count)
    chosen_count = tl.where(found != 0, chosen_count, last_count)
    # record_bin: the rank within the chosen bin, its count, τ's key bits and the keys below.
    tl.store(selection + SEL_RANK, rank - chosen_before)
    tl.store(selection + SEL_EQUAL, chosen_count)
    if LEVEL == 0:
        key = chosen << LOW_BITS
        below = chosen_before
    else:
        key = tl.load(selection + SEL_KEY) | chosen
        below = tl.load(selection + SEL_BELOW) + chosen_before
    tl.store(selection + SEL_KEY, key)
    tl.store(selection + SEL_BELOW, below)
    tl.store(tau, key.to(tl.int32).to(tl.float32, bitcast=True))


@device_function
def _store_keep_mask(keep, keep_mask_address, valid_elements, SIZE: tl.constexpr):
    """Packs the keep flags of SIZE consecutive elements (int32 0/1, in element order, from a
    multiple of 8 on) into their mask bytes: element i is bit i % 8 of byte i // 8. Only the
    bytes of the first `valid_elements` elements are written (None: all)."""
    bits = tl.reshape(keep, (SIZE // 8, 8)) << tl.arange(0, 8)[None, :]
    packed = tl.sum(bits, axis=1).to(tl.uint8)
    byte_offsets = tl.arange(0, SIZE // 8)
    keep_mask = keep_mask_address.to(tl.pointer_type(tl.uint8))
    if valid_elements is None:
        tl.store(keep_mask + byte_offsets, packed)
    else:
        tl.store(keep_mask + byte_offsets, packed, mask=byte_offsets * 8 < valid_elements)


@device_function
def _threshold_block(data, keep_mask_address, offsets, in_bounds, tau_key, freezes,
                     DTYPE: tl.constexpr, WRITE_MASKS: tl.constexpr, BLOCK: tl.constexpr):
    key = _abs_key(_bits_to_f32(_load(data + offsets, in_bounds), DTYPE))
    below = _below_threshold(key, tau_key, False)
    zero = tl.zeros([BLOCK], tl.float32)
    if in_bounds is None:
        tl.store(data + offsets, _f32_to_bits(zero, DTYPE), mask=below)
        keep = (~below).to(tl.int32)
    else:
        tl.store(data + offsets, _f32_to_bits(zero, DTYPE), mask=below & in_bounds)
        keep = ((~below) & in_bounds).to(tl.int32)
    if WRITE_MASKS:
        if freezes:
            if in_bounds is None:
                _store_keep_mask(keep, keep_mask_address, None, BLOCK)
            else:
                _store_keep_mask(keep, keep_mask_address, tl.sum(in_bounds.to(tl.int32), 0),
                                 BLOCK)


@device_function
def _threshold_groups(data, keep_mask_address, remaining, tau_key, freezes, DTYPE: tl.constexpr,
                      WRITE_MASKS: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                      GROUP_TILE: tl.constexpr, PRUNABLE: tl.constexpr):
    """_threshold_block for a block of whole N:M groups: zeroes the candidates with |x| <= τ."""
    offsets, in_bounds, key = _group_keys(data, remaining, DTYPE, GROUPS, GROUP_SIZE, GROUP_TILE,
                                          PRUNABLE)
    below = _below_threshold(key, tau_key, True) & in_bounds
    zero = tl.zeros([GROUPS, GROUP_TILE], tl.float32)
    tl.store(data + offsets, _f32_to_bits(zero, DTYPE), mask=below)
    if WRITE_MASKS:
        if freezes:
            # The tile's flags in element order (lane j of group g is element g·GROUP_SIZE + j).
            TILE: tl.constexpr = GROUPS * GROUP_TILE
            keep = tl.reshape(((~below) & in_bounds).to(tl.int32), (TILE,))
            element = tl.arange(0, TILE)
            lane = tl.minimum((element // GROUP_SIZE) * GROUP_TILE + element % GROUP_SIZE,
                              TILE - 1)
            keep = tl.where(element < GROUPS * GROUP_SIZE, tl.gather(keep, lane, 0), 0)
            _store_keep_mask(keep, keep_mask_address,
                             tl.minimum(remaining, GROUPS * GROUP_SIZE), TILE)


@triton.jit
def threshold_kernel(value_table, block_table, selection, current, DTYPE: tl.constexpr,
                     WRITE_MASKS: tl.constexpr, SCHEDULED: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCK: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_TILE: tl.constexpr,
                     PRUNABLE: tl.constexpr):
    """Zeroes every |x| < τ (τ's key at selection[SEL_KEY]); for an N:M pool (GROUP_SIZE = M > 0;
    BLOCK elements are whole groups, a multiple of 8), every candidate with |x| <= τ. With
    WRITE_MASKS, also writes each tensor's packed keep mask (the freeze). SCHEDULED: only on an
    event step (k != 0 in `current`), and the masks (WRITE_MASKS: the table has them) only when
    it freezes."""
    if _runs(current, SCHEDULED, C_K):
        _threshold_program(value_table, block_table, selection,
                           _runs(current, SCHEDULED, C_FREEZE), DTYPE, WRITE_MASKS, ALIGNED, BLOCK,
                           GROUP_SIZE, GROUP_TILE, PRUNABLE)


@device_function
def _threshold_program(value_table, block_table, selection, freezes, DTYPE: tl.constexpr,
                       WRITE_MASKS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                       GROUP_SIZE: tl.constexpr, GROUP_TILE: tl.constexpr,
                       PRUNABLE: tl.constexpr):
    entry, start, numel = _program_block(value_table, block_table, VALUE_COLUMNS, V_NUMEL, BLOCK)
    data = _typed_pointer(tl.load(entry + V_DATA), DTYPE, ALIGNED) + start
    keep_mask_address = tl.load(entry + V_KEEP_MASK) + start // 8
    tau_key = tl.load(selection + SEL_KEY)
    if GROUP_SIZE != 0:
        _threshold_groups(data, keep_mask_address, numel - start, tau_key, freezes, DTYPE,
                          WRITE_MASKS, BLOCK // GROUP_SIZE, GROUP_SIZE, GROUP_TILE, PRUNABLE)
    else:
        offsets = tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            _threshold_block(data, keep_mask_address, offsets, None, tau_key, freezes, DTYPE,
                             WRITE_MASKS, BLOCK)
        else:
            _threshold_block(data, keep_mask_address, offsets, offsets < numel - start, tau_key,
                             freezes, DTYPE, WRITE_MASKS, BLOCK)
