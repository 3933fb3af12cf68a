"""The whole RALI head in one Triton kernel: class token [B, D] -> score [B] (and optionally the K softmax weights).

On a Jetson every kernel launch costs tens of microseconds and the eager head is a chain of about ten small
kernels (layernorm, matmul + bias, norm, clamp, divide, matmul, scale, softmax, matmul). Here it is one launch.

What one program computes, for BLOCK_B rows of the batch and one slice of the P columns (a "split"):
    n   = (x - mean(x)) / sqrt(var(x) + eps)       plain layernorm: gamma/beta are folded into weight/bias
    z   = n @ weight.T + bias                      [BLOCK_B, P-slice], tiled over D with tl.dot, fp32 accumulator
    sim = z @ prototypes.T, |z|^2                  partial sums over the P-slice, second tl.dot
Normalising z is a per-row scalar, so it is applied after the P loop: sim / max(|z|, 1e-12) equals
normalize(z) @ prototypes.T. When the P columns are split over several programs (so that a small batch still
keeps many SMs busy pulling the weight matrix, which is what a small batch costs), each program writes its
partial sim and |z|^2, and the last program to arrive on a row block (an atomic counter) adds the partials in
split order (deterministic), finishes softmax(sim * logit_scale) and the score, and resets the counter so the
next launch needs no memset.

Precision. The eager head computes in fp32 whatever the input dtype, and so does this kernel: fp16/bf16 class
tokens only make the input read smaller. The layernorm, |z|, softmax and score are fp32; both products take
fp32 tiles and accumulate in fp32 on tensor cores, at the precision PyTorch's own fp32 matmuls are allowed
(`torch.set_float32_matmul_precision`, see `precision_for_torch_setting`):
- "highest" (PyTorch's default) -> "3xtf32": each operand split into two tf32 parts, three tf32 products
  (CUTLASS's 3xTF32): about 21 bits of fp32's 24, at tensor-core speed rather than fp32 FMA speed;
- "high" -> "tf32": operands rounded to nearest tf32 (10-bit mantissa), one product;
- "medium" -> "bf16": operands rounded to bf16 (8-bit mantissa), one product.
"ieee" (fp32 FMA, no tensor cores) can be asked for explicitly. Operands are rounded in the kernel with
integer ops, not left to the hardware (which truncates tf32), so the TRITON_INTERPRET=1 run on a CPU, whose
tl.dot ignores input_precision, computes the same roundings and the tests check them.
Its PyTorch twin, the reference of the tests and the benchmark, is `rali_edge.head.rali_head_torch`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rali_edge.head import NORMALIZE_EPS

SUPPORTED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("3xtf32", "tf32", "bf16", "ieee")
# The finishing program of a row block reads every split's partial sims; beyond this many bytes that
# single program becomes the tail of the launch, so fewer splits are used.
_FINISH_READ_BUDGET = 256 * 1024


@triton.jit
def _round_to_tf32(x):
    # Round-to-nearest-even to 10 mantissa bits, on the bits: tl.dot in tf32 mode would drop them (a
    # bias toward zero). Integer ops only, so the interpreter runs it as well (its tl.dot ignores precision).
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (((bits >> 13) & 1) + 0xFFF)) & -8192  # -8192 == 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b for fp32 tiles a, b, at one of the precisions of the module doc."""
    if PRECISION == "3xtf32":
        # a*b ~= a_hi*b_hi + a_hi*b_lo + a_lo*b_hi, each factor exactly tf32 (the 3xTF32 of CUTLASS): about
        # 21 of fp32's 24 bits on tensor cores. Small terms first.
        a_hi = _round_to_tf32(a)
        b_hi = _round_to_tf32(b)
        a_lo = _round_to_tf32(a - a_hi)
        b_lo = _round_to_tf32(b - b_hi)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    elif PRECISION == "tf32":
        return tl.dot(_round_to_tf32(a), _round_to_tf32(b), acc, input_precision="tf32")
    elif PRECISION == "bf16":
        if INTERPRET:
            # The interpreter keeps bf16 as raw uint16 and its tl.dot would multiply those integers:
            # round to bf16 and multiply in fp32 (exact products, as on tensor cores).
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                          input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)  # input_precision: fp32 only
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _finish_rows(
    sim, sumsq, rows, row_ok, offs_k, k_ok, proto_score_ptr, stride_ps, score_ptr, weights_out_ptr, K,
    logit_scale_ptr, norm_eps, RETURN_WEIGHTS: tl.constexpr,
):
    # normalize(z) @ protos.T == (z @ protos.T) / max(|z|, eps): an all-zero z gives sim 0 -> uniform weights.
    inv_norm = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sumsq), norm_eps))
    logit_scale = tl.load(logit_scale_ptr).to(tl.float32)  # read on the GPU: no host sync per call
    logits = sim * (inv_norm * logit_scale)[:, None]
    logits = tl.where(k_ok[None, :], logits, float("-inf"))  # padded prototypes get no weight
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    denom = tl.sum(e, axis=1)
    proto_scores = tl.load(proto_score_ptr + offs_k * stride_ps, mask=k_ok, other=0.0).to(tl.float32)
    score = tl.div_rn(tl.sum(e * proto_scores[None, :], axis=1), denom)
    tl.store(score_ptr + rows, score, mask=row_ok)
    if RETURN_WEIGHTS:
        w = e / denom[:, None]
        out = weights_out_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(out, w, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _rali_head_kernel(
    cls_ptr, weight_ptr, bias_ptr, proto_ptr, proto_score_ptr,
    score_ptr, weights_out_ptr, partial_sim_ptr, partial_sumsq_ptr, arrivals_ptr,
    B, D, P, K,
    stride_cb, stride_cd, stride_wp, stride_wd, stride_bias, stride_pk, stride_pp, stride_ps,
    logit_scale_ptr, ln_eps, norm_eps,
    p_per_split,  # P columns handled by one split, a multiple of BLOCK_P
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr,
    N_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, RETURN_WEIGHTS: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    # int64: cls may be a strided view of the whole [B, tokens, D] hidden state, past 2**31 elements.
    row_ptrs = cls_ptr + rows.to(tl.int64)[:, None] * stride_cb
    offs_d = tl.arange(0, BLOCK_D)

    # Layernorm statistics, two passes (mean, then squared deviations): CLIP class tokens carry large
    # outlier channels, and E[x^2] - E[x]^2 would cancel in fp32.
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        m = row_ok[:, None] & (d < D)[None, :]
        acc += tl.load(row_ptrs + d[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / D
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        m = row_ok[:, None] & (d < D)[None, :]
        x = tl.load(row_ptrs + d[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, x - mean[:, None], 0.0)
        acc += xc * xc
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(acc, axis=1) / D + ln_eps))

    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    sim = tl.zeros([BLOCK_B, K_PAD], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_B], dtype=tl.float32)
    p_begin = pid_s * p_per_split
    p_end = tl.minimum(p_begin + p_per_split, P)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + offs_p
        p_ok = p < P
        z = tl.zeros([BLOCK_B, BLOCK_P], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            x = tl.load(row_ptrs + d[None, :] * stride_cd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # Padded D columns must be 0 after centring too (0 - mean is not 0).
            n = tl.where(d_ok[None, :], (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            w_t = tl.load(  # weight.T tile [BLOCK_D, BLOCK_P]
                weight_ptr + p[None, :] * stride_wp + d[:, None] * stride_wd,
                mask=d_ok[:, None] & p_ok[None, :], other=0.0,
            )
            z = _dot(n, w_t.to(tl.float32), z, PRECISION, INTERPRET)
        z += tl.load(bias_ptr + p * stride_bias, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        sumsq += tl.sum(z * z, axis=1)  # padded P columns are exactly 0 (masked weight and bias)
        protos_t = tl.load(  # prototypes.T tile [BLOCK_P, K_PAD]
            proto_ptr + offs_k[None, :] * stride_pk + p[:, None] * stride_pp,
            mask=p_ok[:, None] & k_ok[None, :], other=0.0,
        )
        sim = _dot(z, protos_t.to(tl.float32), sim, PRECISION, INTERPRET)

    if N_SPLITS == 1:
        _finish_rows(sim, sumsq, rows, row_ok, offs_k, k_ok, proto_score_ptr, stride_ps, score_ptr,
                     weights_out_ptr, K, logit_scale_ptr, norm_eps, RETURN_WEIGHTS)
    else:
        # Workspace layout: partial_sim [N_SPLITS, B, K], partial_sumsq [N_SPLITS, B]; int64 offsets.
        rows64 = rows.to(tl.int64)
        batch64 = tl.cast(B, tl.int64)
        sim_ptrs = partial_sim_ptr + rows64[:, None] * K + offs_k[None, :]
        sumsq_ptrs = partial_sumsq_ptr + rows64
        sim_mask = row_ok[:, None] & k_ok[None, :]
        tl.store(sim_ptrs + pid_s * batch64 * K, sim, mask=sim_mask)
        tl.store(sumsq_ptrs + pid_s * batch64, sumsq, mask=row_ok)
        # Every thread's stores are done before the one thread that takes the ticket (the barrier); the
        # atomic is acq_rel at GPU scope, which publishes them to the program that arrives last.
        tl.debug_barrier()
        ticket = tl.atomic_add(arrivals_ptr + pid_b, 1)
        if ticket == N_SPLITS - 1:
            sim = tl.zeros([BLOCK_B, K_PAD], dtype=tl.float32)
            sumsq = tl.zeros([BLOCK_B], dtype=tl.float32)
            for s in range(N_SPLITS):  # split order, so the sum is the same on every run
                # .cg: read from L2, never from a line this SM cached on an earlier launch.
                sim += tl.load(sim_ptrs + s * batch64 * K, mask=sim_mask, other=0.0, cache_modifier=".cg")
                sumsq += tl.load(sumsq_ptrs + s * batch64, mask=row_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + pid_b, 0)  # ready for the next launch, no memset needed
            _finish_rows(sim, sumsq, rows, row_ok, offs_k, k_ok, proto_score_ptr, stride_ps, score_ptr,
                         weights_out_ptr, K, logit_scale_ptr, norm_eps, RETURN_WEIGHTS)


INTERPRETED = type(_rali_head_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class HeadConfig:
    """Tiling of one launch. `p_splits` programs share the P columns of a row block."""

    block_b: int
    block_d: int
    block_p: int
    p_splits: int
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that the split path is the one exercised on CPU too
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[device]


def pick_config(B: int, D: int, P: int, K: int, sm_count: int) -> HeadConfig:
    """Heuristic tiling (no autotuning: it cannot run under the interpreter, and on a Jetson its first-call
    cost is seconds). bench/head.py --sweep times the alternatives on a real GPU."""
    # Rows per program: 16 (the smallest MMA tile) for small batches, so that row padding wastes little;
    # never 64: the [BLOCK_B, K_PAD] fp32 sim accumulator and the softmax over it then spill registers
    # (seen in the cubins for sm_87 and sm_90 at K = 250), 32 with 8 warps does not.
    block_b = 16 if B <= 64 else 32
    # Narrow P tiles: the [BLOCK_P, K_PAD] prototype tile of the second product sits in registers twice
    # (3xtf32's two halves), and more P tiles give a small batch more splits.
    block_p = 16
    block_d = min(64, max(16, _next_pow2(D)))
    n_btiles = triton.cdiv(B, block_b)
    n_ptiles = triton.cdiv(P, block_p)
    # Enough programs to keep every SM reading the weight; bounded by what the finishing program reads.
    splits = max(1, min(n_ptiles, round(sm_count / n_btiles)))
    splits = max(1, min(splits, _FINISH_READ_BUDGET // (min(B, block_b) * K * 4)))
    splits = triton.cdiv(n_ptiles, triton.cdiv(n_ptiles, splits))  # no empty splits
    num_warps = 4 if block_b == 16 else 8
    return HeadConfig(block_b, block_d, block_p, splits, num_warps=num_warps, num_stages=2)


_WORKSPACES: dict = {}
# Workspaces replaced by bigger ones are kept, never freed: a captured CUDA graph replays the pointers
# it was captured with, and freeing them would let the caching allocator hand that memory to another
# tensor that the replay then overwrites. They are small (counters, and partial sums of B x K floats).
_RETIRED: list = []


def _workspace(device: torch.device, n_btiles: int, n_partial: int):
    """Per (device, stream) buffers for split launches, grown on demand and reused: the arrival counters
    start at zero once and every launch leaves them at zero. Kept per stream because two launches in flight
    on different streams must not share counters. (Allocate once before a CUDA-graph capture.)"""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    arrivals, partial = old = _WORKSPACES.get(key, (None, None))
    if arrivals is None or arrivals.numel() < n_btiles:
        arrivals = torch.zeros(max(n_btiles, 64), dtype=torch.int32, device=device)
    if partial is None or partial.numel() < n_partial:
        partial = torch.empty(max(n_partial, 1 << 16), dtype=torch.float32, device=device)
    _RETIRED.extend(t for t in old if t is not None and t is not arrivals and t is not partial)
    _WORKSPACES[key] = (arrivals, partial)
    return arrivals, partial


def precision_for_torch_setting() -> str:
    """The kernel's precision under PyTorch's fp32-matmul switch (`torch.set_float32_matmul_precision`),
    so that the kernel and PyTorch's own matmuls are compared at the same setting."""
    return {"highest": "3xtf32", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]


def _check_inputs(cls, weight, bias, prototypes, proto_scores):
    if cls.dim() != 2:
        raise ValueError(f"class tokens must be [B, D], got shape {tuple(cls.shape)}")
    if cls.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(f"class tokens must be float32, float16 or bfloat16, got {cls.dtype}")
    D = cls.shape[1]
    P, K = weight.shape[0], prototypes.shape[0]
    expected = {"weight": (P, D), "bias": (P,), "prototypes": (K, P), "proto_scores": (K,)}
    for name, t in zip(expected, (weight, bias, prototypes, proto_scores)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for class tokens of width {D}, "
                             f"got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_INPUT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != cls.device:
            raise ValueError(f"{name} is on {t.device} but the class tokens are on {cls.device}")
    if min(D, P, K) < 1:
        raise ValueError(f"empty head: D={D}, P={P}, K={K}")
    if cls.device.type != "cuda" and not INTERPRETED:
        raise ValueError("the Triton head needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


_SCALES: dict = {}


def _scale_on(logit_scale, device) -> torch.Tensor:
    """The logit scale as a one-element fp32 tensor on `device`. A buffer already there is used
    as it is: float() of a CUDA tensor would wait for the GPU on every call. A Python number is
    copied to the device once and kept: a copy per call would be a second operation on the GPU
    (and a host-to-device copy is not allowed while a CUDA graph is being captured)."""
    if torch.is_tensor(logit_scale) and logit_scale.device == device and logit_scale.dtype == torch.float32:
        return logit_scale.reshape(1)
    if isinstance(logit_scale, (int, float)):
        key = (float(logit_scale), device)
        if key not in _SCALES:
            _SCALES[key] = torch.tensor([float(logit_scale)], dtype=torch.float32, device=device)
        return _SCALES[key]
    return torch.as_tensor(logit_scale, dtype=torch.float32).reshape(1).to(device)


def _launch_plan(cls, weight, bias, prototypes, proto_scores, logit_scale, ln_eps, score, weights_out,
                 return_weights, precision, cfg: HeadConfig, workspace):
    """(grid, positional args, keyword meta-parameters) of one launch."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    B, D = cls.shape
    P, K = weight.shape[0], prototypes.shape[0]
    n_btiles = triton.cdiv(B, cfg.block_b)
    p_tiles_per_split = triton.cdiv(triton.cdiv(P, cfg.block_p), cfg.p_splits)
    n_splits = triton.cdiv(triton.cdiv(P, cfg.block_p), p_tiles_per_split)
    if n_splits > 1:
        arrivals, partial = workspace(cls.device, n_btiles, n_splits * B * (K + 1))
        partial_sim, partial_sumsq = partial, partial[n_splits * B * K:]
    else:  # never read: the single-split kernel is compiled without the workspace code
        arrivals, partial_sim, partial_sumsq = score, score, score
    args = [
        cls, weight, bias, prototypes, proto_scores,
        score, weights_out, partial_sim, partial_sumsq, arrivals,
        B, D, P, K,
        cls.stride(0), cls.stride(1), weight.stride(0), weight.stride(1), bias.stride(0),
        prototypes.stride(0), prototypes.stride(1), proto_scores.stride(0),
        _scale_on(logit_scale, cls.device), float(ln_eps), NORMALIZE_EPS,
        p_tiles_per_split * cfg.block_p,
    ]
    meta = {
        "BLOCK_B": cfg.block_b, "BLOCK_D": cfg.block_d, "BLOCK_P": cfg.block_p, "K_PAD": max(16, _next_pow2(K)),
        "N_SPLITS": n_splits, "PRECISION": precision, "RETURN_WEIGHTS": bool(return_weights),
        "INTERPRET": INTERPRETED, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
    }
    return (n_btiles, n_splits), args, meta


def rali_head_triton(cls, weight, bias, prototypes, proto_scores, logit_scale, ln_eps: float,
                     return_weights=False, *, precision: str | None = None, config: HeadConfig | None = None):
    """Fused RALI head, same signature and result as rali_edge.head.rali_head_torch.

    cls [B, D] fp32/fp16/bf16 (any strides); weight [P, D], bias [P], prototypes [K, P] (unit rows),
    proto_scores [K] in fp32 (fp16/bf16 buffers are read as they are: half the bytes, with their own
    rounding). Returns score [B] fp32, and the softmax weights [B, K] fp32 if return_weights.
    `precision` ("3xtf32", "tf32", "bf16" or "ieee") overrides `precision_for_torch_setting()`;
    `config` overrides the tiling heuristic (tests and the benchmark's sweep).
    """
    _check_inputs(cls, weight, bias, prototypes, proto_scores)
    B, D = cls.shape
    P, K = weight.shape[0], prototypes.shape[0]
    device = cls.device
    score = torch.empty(B, dtype=torch.float32, device=device)
    weights_out = torch.empty(B, K, dtype=torch.float32, device=device) if return_weights else score
    if B == 0:
        return (score, weights_out) if return_weights else score

    precision = precision or precision_for_torch_setting()
    cfg = config or pick_config(B, D, P, K, _sm_count(device))
    # The launch goes to the current device and its stream: make that the tensors' device (cuda:1's
    # pointers launched on cuda:0 would fault or read another GPU's memory).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        grid, args, meta = _launch_plan(cls, weight, bias, prototypes, proto_scores, logit_scale, ln_eps, score,
                                        weights_out, return_weights, precision, cfg, _workspace)
        _rali_head_kernel[grid](*args, **meta)
    return (score, weights_out) if return_weights else score


def head_bytes_and_flops(B: int, D: int, P: int, K: int, cls_bytes: int, weight_bytes: int = 4) -> tuple[int, int]:
    """Least bytes any implementation moves (read the inputs and buffers once, write the scores) and the
    FLOPs of the two products (2 per multiply-add); the layernorm and softmax are O(B*(D+K)), left out."""
    nbytes = B * D * cls_bytes + P * D * weight_bytes + 4 * (P + K * P + K) + 4 * B
    flops = 2 * B * D * P + 2 * B * P * K
    return nbytes, flops


def compile_for_gpu(arch: int, B: int, D: int = 1024, P: int = 512, K: int = 250, dtype=torch.float16,
                    precision: str = "3xtf32", return_weights: bool = False, config: HeadConfig | None = None,
                    sm_count: int = 16):
    """Compile the kernel ahead of time for NVIDIA compute capability `arch` (87 = Jetson Orin) without a GPU,
    with Triton's own ptxas: checks that it builds there and what it uses (`.asm["ptx"]`, `.metadata.shared`,
    and the cubin's registers: `cuobjdump --dump-resource-usage`). The launch's arguments are specialised by
    the JIT's own binder, as a launch on that GPU would be (ints equal to 1 become constants, ints and
    pointers divisible by 16 get divisibility hints), so this is the kernel the JIT would compile there.
    Needs TRITON_INTERPRET unset when this module is imported."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if INTERPRETED:
        raise RuntimeError("compile_for_gpu needs the compiled kernel: import with TRITON_INTERPRET unset")
    cls = torch.empty(B, D, dtype=dtype)
    head = (torch.empty(P, D), torch.empty(P), torch.empty(K, P), torch.empty(K))
    score = torch.empty(B)
    weights_out = torch.empty(B, K) if return_weights else score

    def workspace(device, n_btiles, n_partial):
        return torch.empty(n_btiles, dtype=torch.int32), torch.empty(n_partial)

    cfg = config or pick_config(B, D, P, K, sm_count)
    _, args, meta = _launch_plan(cls, *head, 14.0, 1e-5, score, weights_out, return_weights, precision, cfg,
                                 workspace)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = _rali_head_kernel
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, _ = bind(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound_args, specialization, {})
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options={"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]})


__all__ = [
    "INTERPRETED",
    "PRECISIONS",
    "HeadConfig",
    "compile_for_gpu",
    "head_bytes_and_flops",
    "pick_config",
    "precision_for_torch_setting",
    "rali_head_triton",
]
