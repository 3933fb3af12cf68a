"""The fused Triton head (rali_edge.kernels.rali_head) against float64 references.

On a CPU these run under TRITON_INTERPRET=1 (tests/conftest.py). The float64 reference is the *published*
PrototypeScorer (`PrototypeHead.__call__`), fed the float64 layernorm of the class token with the folded bias
appended as an extra input channel of value 1 ([n, 1] @ [W, b].T = n @ W.T + b): an implementation
independent of both the kernel and the eager head. Both the kernel and the eager fp32 head
(`rali_head_torch`, the kernel's PyTorch twin) are measured against it, on the same inputs.

Tolerances (max abs error over the batch):
- fp32-class precisions ("3xtf32", PyTorch's default setting, and "ieee"): kernel error <= 2 x eager error
  + atol, atol = U32 * (logit_scale * score_range + 4 * max|score|), U32 = 2**-24: one fp32 rounding of
  every logit (|sim| <= 1, times logit_scale) moves the score by at most logit_scale * U32 * score_range,
  and the final sums are worth a few roundings of the score. At logit_scale 100 that is 2.5e-5 on scores in
  1..5 (errors seen: 3e-6, eager's the same); tf32 operands already give 1e-3, a masking bug more.
- "tf32" / "bf16" (PyTorch's "high" / "medium" settings): error <= U * logit_scale * score_range, the first-
  order effect of operand rounding with unit roundoff U (2**-11 for tf32, 2**-9 for bf16, rounding to
  nearest) on every similarity; the errors seen are about 5-10% of that bound.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from rali_edge.kernels.rali_head import (
    INTERPRETED,
    HeadConfig,
    _round_to_tf32,
    pick_config,
    rali_head_triton,
)

from rali_edge.head import PrototypeHead, rali_head_torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23, the spacing of fp32 at 1
U32 = EPS32 / 2  # unit roundoff of round-to-nearest
LN_EPS = 1e-5
PUBLISHED_LOGIT_SCALE = 1 / 0.07  # tau = 0.07, the published default
# Where the kernel runs: interpreted on the CPU (TRITON_INTERPRET=1, set by conftest on machines without
# a GPU), compiled on CUDA otherwise; every test below then runs on the GPU too.
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")


def make_head(D, P, K, seed=0):
    """Folded-head buffers as PrototypeHead.fold leaves them: fp32, prototypes normalised in float64 then rounded."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(P, D, generator=g) / D**0.5
    bias = torch.randn(P, generator=g) * 0.5
    prototypes = F.normalize(torch.randn(K, P, generator=g, dtype=torch.float64), dim=-1).float()
    proto_scores = torch.rand(K, generator=g) * 4 + 1
    return tuple(t.to(DEVICE) for t in (weight, bias, prototypes, proto_scores))


def make_cls(B, D, dtype=torch.float32, seed=1):
    # A shared offset per channel plus large rows: the layernorm has a mean to remove, as on real class tokens.
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g) * 3 + torch.randn(D, generator=g) * 2).to(dtype).to(DEVICE)


def float64_reference(cls, weight, bias, prototypes, proto_scores, logit_scale):
    cls, weight, bias, prototypes, proto_scores = (t.cpu() for t in (cls, weight, bias, prototypes, proto_scores))
    n = F.layer_norm(cls.double(), (cls.shape[1],), eps=LN_EPS)
    embedding = torch.cat([n, torch.ones_like(n[:, :1])], dim=1)
    e = embedding.shape[1]
    f64 = {"dtype": torch.float64}
    published = PrototypeHead(torch.zeros(e, **f64), torch.ones(e, **f64),
                              torch.cat([weight.double(), bias.double()[:, None]], dim=1),
                              prototypes.double(), proto_scores.double(), logit_scale)
    return published(embedding, return_weights=True)


def fp32_atol(logit_scale, proto_scores):
    score_range = float(proto_scores.max() - proto_scores.min())
    return U32 * (logit_scale * score_range + 4 * float(proto_scores.abs().max())), U32 * (2 * logit_scale + 4)


def max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def assert_fp32_class(cls, head, logit_scale, precision=None, config=None):
    """Kernel error against the float64 reference <= 2 x the eager head's + atol, for scores and weights."""
    score, weights = rali_head_triton(cls, *head, logit_scale, LN_EPS, return_weights=True,
                                      precision=precision, config=config)
    eager_score, eager_weights = rali_head_torch(cls.cpu(), *(t.cpu() for t in head), logit_scale, LN_EPS,
                                                     return_weights=True)
    ref_score, ref_weights = float64_reference(cls.cpu(), *(t.cpu() for t in head), logit_scale)
    atol_score, atol_weights = fp32_atol(logit_scale, head[3])
    assert score.dtype == weights.dtype == torch.float32
    assert score.shape == (cls.shape[0],) and weights.shape == (cls.shape[0], head[2].shape[0])
    assert max_err(score, ref_score) <= 2 * max_err(eager_score, ref_score) + atol_score
    assert max_err(weights, ref_weights) <= 2 * max_err(eager_weights, ref_weights) + atol_weights
    return score, weights


SHAPES = [  # (B, D, P, K): B = 1, 3, 37; D, P, K not powers of two, every last tile ragged
    (1, 100, 40, 30),
    (3, 72, 50, 17),
    (37, 130, 48, 250),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,D,P,K", SHAPES)
def test_matches_float64_reference(B, D, P, K, dtype):
    head = make_head(D, P, K)
    assert_fp32_class(make_cls(B, D, dtype), head, PUBLISHED_LOGIT_SCALE)


@pytest.mark.parametrize("precision", ["ieee", "3xtf32"])
def test_fp32_class_precisions(precision):
    B, D, P, K = SHAPES[2]
    assert_fp32_class(make_cls(B, D), make_head(D, P, K, seed=2), 100.0, precision=precision)


@pytest.mark.parametrize("precision,unit_roundoff", [("tf32", 2.0**-11), ("bf16", 2.0**-9)])
def test_reduced_precisions_within_rounding_bound(precision, unit_roundoff):
    B, D, P, K = SHAPES[2]
    head = make_head(D, P, K, seed=3)
    cls = make_cls(B, D)
    score, weights = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS, return_weights=True,
                                      precision=precision)
    ref_score, ref_weights = float64_reference(cls, *head, PUBLISHED_LOGIT_SCALE)
    score_range = float(head[3].max() - head[3].min())
    assert max_err(score, ref_score) <= unit_roundoff * PUBLISHED_LOGIT_SCALE * score_range
    assert max_err(weights, ref_weights) <= unit_roundoff * PUBLISHED_LOGIT_SCALE * 2
    # ...and the rounding really happened: the result differs from the fp32-class one.
    assert max_err(score, rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS, precision="ieee")) > 0


@triton.jit
def round_to_tf32_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _round_to_tf32(tl.load(x_ptr + offs, mask=offs < N)), mask=offs < N)


def test_tf32_rounding_is_to_nearest_even():
    """The kernel rounds tf32 operands itself (the hardware would truncate): exact against float64 rounding
    of the mantissa to 10 bits, ties to even, on random values, ties and values next to powers of two."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4000, generator=g) * torch.logspace(-20, 20, 4000, dtype=torch.float64).float()
    step = torch.tensor(2.0**-13)  # 13 dropped bits: a tie in the last kept bit of 1.0
    special = torch.tensor([1.0, -1.0, 0.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2.0 - 2.0**-20, 3.0e38])
    x = torch.cat([x, special, 1 + step * torch.arange(-64, 64)]).to(DEVICE)
    y = torch.empty_like(x)
    round_to_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    x, y = x.cpu(), y.cpu()
    mantissa, exponent = torch.frexp(x.double())  # x = m * 2**e, 0.5 <= |m| < 1: keep 11 bits of m
    expected = torch.ldexp(torch.round(mantissa * 2.0**11) / 2.0**11, exponent).float()  # round(): ties to even
    assert torch.equal(y, expected)


def test_precision_follows_torch_setting():
    B, D, P, K = SHAPES[1]
    head, cls = make_head(D, P, K), make_cls(B, D)
    before = torch.get_float32_matmul_precision()
    try:
        for setting, precision in [("highest", "3xtf32"), ("high", "tf32"), ("medium", "bf16")]:
            torch.set_float32_matmul_precision(setting)
            implicit = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)
            explicit = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS, precision=precision)
            assert torch.equal(implicit, explicit), setting
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    "config",
    [
        HeadConfig(block_b=16, block_d=16, block_p=16, p_splits=1),  # one program per row block
        HeadConfig(block_b=16, block_d=32, block_p=16, p_splits=4),  # 4 splits, the last one shorter
        HeadConfig(block_b=32, block_d=64, block_p=32, p_splits=2),  # tiles wider than D and P's remainders
        HeadConfig(block_b=64, block_d=128, block_p=64, p_splits=1),  # every tile ragged, rows mostly padding
    ],
)
def test_tilings_agree(config):
    B, D, P, K = 37, 100, 50, 30
    head = make_head(D, P, K, seed=4)
    assert_fp32_class(make_cls(B, D), head, PUBLISHED_LOGIT_SCALE, config=config)


@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_extreme_logit_scales_stay_finite(logit_scale):
    B, D, P, K = SHAPES[2]
    head = make_head(D, P, K, seed=5)
    score, weights = assert_fp32_class(make_cls(B, D), head, logit_scale)
    assert torch.isfinite(score).all() and torch.isfinite(weights).all()
    # Softmax weights: non-negative, and each row sums to 1 up to fp32 summation of K terms.
    assert (weights >= 0).all()
    assert torch.allclose(weights.double().sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=K * EPS32)


def test_constant_rows_give_the_bias_score():
    """An all-zero or constant class-token row layer-norms to 0, so z = bias: the score is finite and is
    softmax(normalize(bias) @ prototypes.T * logit_scale) @ proto_scores, the same for every such row."""
    D, P, K = 72, 50, 17
    head = make_head(D, P, K, seed=6)
    cls = make_cls(5, D)
    cls[1] = 0.0
    cls[3] = 7.25  # constant: zero variance, centred to 0 as well
    score, weights = assert_fp32_class(cls, head, PUBLISHED_LOGIT_SCALE)
    _, bias, prototypes, proto_scores = head
    bias, prototypes, proto_scores = bias.cpu(), prototypes.cpu(), proto_scores.cpu()
    bias_weights = torch.softmax(F.normalize(bias.double(), dim=0) @ prototypes.double().T * PUBLISHED_LOGIT_SCALE, 0)
    atol_score, atol_weights = fp32_atol(PUBLISHED_LOGIT_SCALE, proto_scores)
    for row in (1, 3):
        assert max_err(weights[row], bias_weights) <= atol_weights
        assert max_err(score[row], bias_weights @ proto_scores.double()) <= atol_score


def test_zero_projection_gives_uniform_weights():
    """weight = bias = 0 makes z = 0 exactly: normalize(0) = 0, every similarity is 0, the softmax is
    uniform (1/K) and the score is the mean of the prototype scores. Rows of all kinds, no NaN."""
    D, P, K = 72, 50, 17
    _, _, prototypes, proto_scores = make_head(D, P, K, seed=7)
    cls = make_cls(4, D)
    cls[2] = 0.0
    score, weights = rali_head_triton(cls, torch.zeros(P, D, device=DEVICE), torch.zeros(P, device=DEVICE),
                                      prototypes, proto_scores, 100.0, LN_EPS, return_weights=True)
    assert torch.equal(weights.cpu(), torch.full((4, K), 1.0 / K))  # exp(0) = 1 everywhere, one division
    assert max_err(score, proto_scores.double().mean().expand(4)) <= 4 * EPS32 * float(proto_scores.max())


def test_split_launches_leave_counters_reset_and_are_deterministic():
    B, D, P, K = 20, 64, 80, 30
    head = make_head(D, P, K, seed=8)
    cls = make_cls(B, D)
    config = HeadConfig(block_b=16, block_d=32, block_p=16, p_splits=5)
    first = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS, config=config)
    from rali_edge.kernels import rali_head

    stream = torch.cuda.current_stream(DEVICE).cuda_stream if DEVICE.type == "cuda" else 0
    arrivals, _ = rali_head._WORKSPACES[(cls.device, stream)]
    assert not arrivals.any()  # every row block's counter went back to 0
    second = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS, config=config)
    assert torch.equal(first, second)  # fixed summation order of the splits: bitwise the same


def test_strided_class_tokens_and_half_buffers():
    """The class token is usually a view of the whole hidden state ([B, tokens, D][:, 0]); and fp16
    buffers are read as they are, i.e. the result is that of the eager head on the same fp16 buffers."""
    B, D, P, K = 6, 72, 50, 17
    head = make_head(D, P, K, seed=9)
    hidden = torch.randn(B, 5, D).half().to(DEVICE)
    cls = hidden[:, 0]
    assert not cls.is_contiguous()
    assert_fp32_class(cls, head, PUBLISHED_LOGIT_SCALE)
    half_head = tuple(t.half() for t in head)
    assert_fp32_class(cls, half_head, PUBLISHED_LOGIT_SCALE)


def test_empty_batch():
    head = make_head(32, 16, 16)
    score, weights = rali_head_triton(torch.zeros(0, 32, device=DEVICE), *head, 14.0, LN_EPS, return_weights=True)
    assert score.shape == (0,) and weights.shape == (0, 16)


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda a: {**a, "cls": a["cls"][0]}, ValueError),  # 1-D
        (lambda a: {**a, "cls": a["cls"].double()}, TypeError),
        (lambda a: {**a, "weight": a["weight"][:, :-1]}, ValueError),  # D mismatch
        (lambda a: {**a, "prototypes": a["prototypes"][:, :-1]}, ValueError),  # P mismatch
        (lambda a: {**a, "proto_scores": a["proto_scores"][:-1]}, ValueError),  # K mismatch
    ],
)
def test_bad_inputs_raise_clear_errors(change, error):
    weight, bias, prototypes, proto_scores = make_head(32, 16, 16)
    args = {"cls": make_cls(2, 32), "weight": weight, "bias": bias, "prototypes": prototypes,
            "proto_scores": proto_scores}
    with pytest.raises(error):
        rali_head_triton(**change(args), logit_scale=14.0, ln_eps=LN_EPS)
    with pytest.raises(ValueError):
        rali_head_triton(**args, logit_scale=14.0, ln_eps=LN_EPS, precision="fp8")


@pytest.mark.parametrize("B", [1, 8, 37, 64, 512, 4096])
@pytest.mark.parametrize("P,K", [(512, 250), (40, 30), (768, 1000)])
def test_heuristic_configs_are_valid(B, P, K):
    for sm_count in (4, 16, 132):  # interpreter, Orin, H100
        cfg = pick_config(B, 1024, P, K, sm_count)
        assert min(cfg.block_b, cfg.block_d, cfg.block_p) >= 16  # tl.dot's smallest tile
        for block in (cfg.block_b, cfg.block_d, cfg.block_p):
            assert block & (block - 1) == 0
        n_ptiles = -(-P // cfg.block_p)
        per_split = -(-n_ptiles // cfg.p_splits)
        assert 1 <= cfg.p_splits <= n_ptiles and (cfg.p_splits - 1) * per_split < n_ptiles  # none empty


def test_a_python_logit_scale_is_copied_to_the_device_once():
    """A float logit scale becomes one cached device tensor: a copy per call would be a second GPU
    operation per head and is not allowed inside a CUDA-graph capture."""
    from rali_edge.kernels.rali_head import _scale_on

    cpu = torch.device("cpu")
    assert _scale_on(14.0, cpu) is _scale_on(14.0, cpu)
    assert float(_scale_on(14.0, cpu)) == 14.0 and float(_scale_on(20.0, cpu)) == 20.0
    buffer = torch.tensor(3.0)
    assert _scale_on(buffer, cpu).data_ptr() == buffer.data_ptr()  # a buffer already there: used as it is


def test_a_grown_workspace_keeps_the_old_buffers_alive():
    """A captured CUDA graph replays the workspace pointers it saw: growing the workspace must not
    free them (the allocator would hand them to another tensor the replay then overwrites)."""
    import weakref

    from rali_edge.kernels.rali_head import _workspace

    device = torch.device("cpu")
    arrivals, partial = _workspace(device, 1, 16)
    old = weakref.ref(partial)
    grown_arrivals, grown = _workspace(device, 1, partial.numel() * 4)
    assert grown.numel() >= partial.numel() * 4 and grown_arrivals is arrivals
    del partial
    assert old() is not None
    assert _workspace(device, 1, 16)[1] is grown  # big enough: reused


# ---- compiled for real GPUs, without one: Triton's own ptxas ----------------------------------------------

_AOT_SCRIPT = """
import json, sys, torch
from rali_edge.kernels.rali_head import compile_for_gpu
out = []
for arch, B, dtype, precision in json.loads(sys.argv[1]):
    kernel = compile_for_gpu(arch, B, dtype=getattr(torch, dtype), precision=precision, return_weights=B == 1)
    ptx = kernel.asm["ptx"]
    target = [line.split()[1] for line in ptx.splitlines() if line.startswith(".target")]
    ttir = kernel.asm["ttir"]
    declared = {p.name for p in kernel.src.fn.params if p.is_constexpr}  # BLOCK_B, ...: constants by declaration
    out.append({"arch": arch, "B": B, "precision": precision, "target": target, "shared": kernel.metadata.shared,
                "hopper_only": [op for op in ("wgmma", "cp.async.bulk", "setmaxnreg", "elect.sync") if op in ptx],
                "constant": sorted(k for k, v in kernel.src.signature.items() if v == "constexpr" and k not in declared),
                "B_hinted": "%B: i32 {tt.divisibility = 16" in ttir})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_compiles_for_orin_and_ampere_without_hopper_instructions():
    """Jetson Orin is sm_87: the kernel must build there, in every precision, for the split (B=1) and the
    single-split (B=4096) paths, with no Hopper-only instructions, and fit sm_86/89's 99 KiB of shared memory.
    The arguments are specialised as the JIT does on a GPU: ints equal to 1 are constants (B=1, unit
    strides), an int divisible by 16 gets a divisibility hint (B=4096, not B=37)."""
    pytest.importorskip("triton.backends.compiler")
    cases = [[87, B, "float16", p] for B in (1, 4096) for p in ("3xtf32", "tf32", "bf16", "ieee")]
    cases += [[87, 64, "bfloat16", "3xtf32"], [87, 37, "float32", "3xtf32"], [80, 64, "float16", "3xtf32"],
              [89, 512, "float16", "3xtf32"]]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for r in results:
        assert r["target"] == [f"sm_{r['arch']}"], r
        assert r["hopper_only"] == [], r
        assert r["shared"] <= 99 * 1024, r
        unit_strides = {"stride_cd", "stride_wd", "stride_bias", "stride_pp", "stride_ps"}
        assert set(r["constant"]) == unit_strides | ({"B"} if r["B"] == 1 else set()), r
        assert r["B_hinted"] == (r["B"] % 16 == 0), r


# ---- compiled kernels on a GPU (TRITON_INTERPRET=0 pytest -m gpu) -----------------------------------------

needs_compiled = pytest.mark.skipif(INTERPRETED, reason="kernels are interpreted: run with TRITON_INTERPRET=0")
FULL = (1024, 512, 250)  # ViT-L hidden size, published PCA dims and prototype count


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 37, 512, 4096])
def test_gpu_matches_float64_reference(B, dtype):
    D, P, K = FULL
    head = tuple(t.cuda() for t in make_head(D, P, K))
    assert_fp32_class(make_cls(B, D, dtype).cuda(), head, PUBLISHED_LOGIT_SCALE)
    assert_fp32_class(make_cls(B, D, dtype).cuda(), head, 100.0)


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("B", [1, 64, 4096])
def test_gpu_tf32_within_rounding_bound(B):
    """PyTorch's "high" setting: tf32 products, same bound as on the CPU (rounded to nearest in the kernel,
    so the hardware's truncation never applies)."""
    D, P, K = FULL
    head = tuple(t.cuda() for t in make_head(D, P, K))
    cls = make_cls(B, D).cuda()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        score = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)
    finally:
        torch.set_float32_matmul_precision(before)
    ref_score, _ = float64_reference(cls.cpu(), *(t.cpu() for t in head), PUBLISHED_LOGIT_SCALE)
    assert max_err(score, ref_score) <= 2.0**-11 * PUBLISHED_LOGIT_SCALE * float(head[3].max() - head[3].min())


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("B", [1, 64, 4096])
def test_gpu_one_launch_and_repeatable(B):
    """Speed sanity without a clock: the whole head is one kernel launch, and repeated (split) launches
    give bitwise the same result (counters reset, fixed summation order)."""
    D, P, K = FULL
    head = tuple(t.cuda() for t in make_head(D, P, K))
    cls = make_cls(B, D, torch.float16).cuda()
    first = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)  # compiles, allocates the workspace
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        again = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    assert torch.equal(first, again)


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_head_captures_in_a_cuda_graph(B):
    """The head with the published float logit scale is capturable (no host copy inside) and its
    replay gives the eager launch's scores, also after the workspace grew for a bigger batch."""
    D, P, K = FULL
    head = tuple(t.cuda() for t in make_head(D, P, K))
    cls = make_cls(B, D, torch.float16).cuda()
    expected = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)  # this stream's workspace
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = rali_head_triton(cls, *head, PUBLISHED_LOGIT_SCALE, LN_EPS)
        # B = 256 runs split (B = 4096 would not): its partial sums need a bigger workspace on this stream.
        rali_head_triton(make_cls(256, D, torch.float16).cuda(), *head, PUBLISHED_LOGIT_SCALE, LN_EPS)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.gpu
@needs_compiled
def test_gpu_head_runs_on_the_device_of_its_tensors():
    """--device cuda:1: the launch goes to cuda:1 while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    D, P, K = FULL
    head = make_head(D, P, K)
    cls = make_cls(37, D)
    on0 = rali_head_triton(cls.cuda(0), *(t.cuda(0) for t in head), PUBLISHED_LOGIT_SCALE, LN_EPS)
    with torch.cuda.device(0):
        on1 = rali_head_triton(cls.cuda(1), *(t.cuda(1) for t in head), PUBLISHED_LOGIT_SCALE, LN_EPS)
    assert on1.device == torch.device("cuda:1") and torch.equal(on1.cpu(), on0.cpu())
