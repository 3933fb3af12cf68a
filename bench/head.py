"""Benchmark of the RALI head: fused Triton kernel vs eager PyTorch vs torch.compile of the same head.

    python bench/head.py --out bench/results/head-<device>.md

For B in {1, 8, 64, 512, 4096}, D=1024, P=512, K=250, fp16 and fp32 class tokens; every time is the median of
`triton.testing.do_bench` (which clears the L2 before each run, so the weights come from DRAM as they would
after the encoder). All three run at the same fp32-matmul setting (`--fp32-precision`, PyTorch's default
"highest"; the kernel follows it, see rali_edge/kernels/rali_head.py).

Next to each kernel time: achieved GB/s and TFLOP/s against the device's ceilings measured here (a big
device-to-device copy, big matmuls, an empty kernel launch), and the floor: the largest of
bytes / copy bandwidth, FLOPs / matmul rate at the kernel's operand precision, and one launch.
Writes the table as markdown to --out and as JSON next to it (same name, .json). Without a CUDA GPU it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

D, P, K = 1024, 512, 250  # ViT-L/14 hidden size, published PCA dims, prototypes
LN_EPS = 1e-5
LOGIT_SCALE = 1 / 0.07


def import_from_checkout():
    """Let `python bench/head.py` run from a checkout that was never pip-installed (a bare GPU machine):
    kernels/ only becomes rali_edge.kernels through the install's package-dir mapping."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import rali_edge

    try:
        import rali_edge.kernels
    except ImportError:
        rali_edge.__path__.append(str(root))  # root/kernels is then found as rali_edge.kernels


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="markdown table path (JSON written next to it)")
    ap.add_argument("--batches", default="1,8,64,512,4096")
    ap.add_argument("--dtypes", default="fp16,fp32")
    ap.add_argument("--fp32-precision", default="highest", choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision for all three implementations")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode; 'none' skips torch.compile")
    ap.add_argument("--sweep", action="store_true", help="also time alternative tilings of the kernel")
    return ap.parse_args()


def no_gpu_exit():
    if not torch.cuda.is_available():
        print("bench/head.py: no CUDA GPU visible to PyTorch; the head benchmark needs one. Nothing measured.")
        sys.exit(0)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench/head.py: TRITON_INTERPRET=1 would time the interpreter; unset it. Nothing measured.")
        sys.exit(0)


def bench_us(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def loop_us(fn, seconds=0.2) -> float:
    """Back-to-back calls, host overhead included. do_bench enqueues a big L2-clearing memset before each
    timed call, and the host's launch work hides behind it; on a Jetson's small CPU that work is the cost."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def measure_ceilings() -> dict:
    """Copy bandwidth, matmul rates at each operand precision the kernel can use, and an empty launch."""
    import triton

    @triton.jit
    def _empty(x_ptr):
        pass

    free, _ = torch.cuda.mem_get_info()
    n_bytes = min(1 << 30, free // 8)  # Orin Nano: stay far from the shared memory's limit
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda")
    copy_us = bench_us(partial(torch.Tensor.copy_, torch.empty_like(src), src))
    del src

    n = 8192 if free > 8 * 8192 * 8192 * 4 else 4096
    rates = {}
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    for name, dtype, tf32 in [("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        rates[name] = 2 * n**3 / (bench_us(partial(torch.matmul, a, b)) * 1e-6) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])

    x = torch.empty(1, device="cuda")
    launch_us = bench_us(lambda: _empty[(1,)](x))
    return {"copy_GBps": 2 * n_bytes / (copy_us * 1e-6) / 1e9, "matmul_n": n,
            "matmul_TFLOPs": rates, "empty_launch_us": launch_us}


def make_inputs(B: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": g}
    weight = torch.randn(P, D, **kw) / D**0.5
    bias = torch.randn(P, **kw) * 0.5
    prototypes = F.normalize(torch.randn(K, P, **kw), dim=-1)
    proto_scores = torch.rand(K, **kw) * 4 + 1
    cls = (torch.randn(B, D, **kw) * 3 + torch.randn(D, **kw) * 2).to(dtype)
    return cls, (weight, bias, prototypes, proto_scores, LOGIT_SCALE, LN_EPS)


def kernel_floor_us(B, cls_bytes, precision, ceilings) -> tuple[float, str, int, int]:
    from rali_edge.kernels.rali_head import head_bytes_and_flops

    nbytes, flops = head_bytes_and_flops(B, D, P, K, cls_bytes)
    products = {"3xtf32": ("tf32", 3), "tf32": ("tf32", 1), "bf16": ("bf16", 1), "ieee": ("fp32", 1)}
    rate_name, passes = products[precision]
    floors = {
        "bytes": nbytes / (ceilings["copy_GBps"] * 1e9) * 1e6,
        f"{passes}x{rate_name} FLOPs": passes * flops / (ceilings["matmul_TFLOPs"][rate_name] * 1e12) * 1e6,
        "launch": ceilings["empty_launch_us"],
    }
    which = max(floors, key=floors.get)
    return floors[which], which, nbytes, flops


def sweep_configs(B):
    from rali_edge.kernels.rali_head import HeadConfig

    for block_b in (16, 32, 64):
        if block_b > max(16, B * 2):
            continue
        for block_p in (16, 32, 64):
            for splits in (1, 2, 4, 8, 16, 32):
                if splits > P // block_p:
                    continue
                yield HeadConfig(block_b, 64, block_p, splits, num_warps=8 if block_b >= 64 else 4)


def run(args) -> dict:
    from rali_edge.head import rali_head_torch
    from rali_edge.model import DTYPES
    from rali_edge.kernels.rali_head import pick_config, precision_for_torch_setting, rali_head_triton

    torch.set_float32_matmul_precision(args.fp32_precision)
    precision = precision_for_torch_setting()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}; "
          f"torch {torch.__version__}; fp32 matmul precision {args.fp32_precision} -> kernel {precision}")
    t0 = time.time()
    ceilings = measure_ceilings()
    print(f"ceilings ({time.time() - t0:.0f} s): copy {ceilings['copy_GBps']:.0f} GB/s (read + write), matmul "
          + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in ceilings["matmul_TFLOPs"].items())
          + f" ({ceilings['matmul_n']}^3), empty launch {ceilings['empty_launch_us']:.1f} us")

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for B in (int(b) for b in args.batches.split(",")):
            cls, head = make_inputs(B, dtype)
            eager = rali_head_torch(cls, *head)
            fused = rali_head_triton(cls, *head)
            row = {"dtype": dtype_name, "B": B, "config": repr(pick_config(B, D, P, K, props.multi_processor_count)),
                   "max_abs_diff_vs_eager": (fused - eager).abs().max().item()}
            fused_call, eager_call = partial(rali_head_triton, cls, *head), partial(rali_head_torch, cls, *head)
            row["triton_us"] = bench_us(fused_call)
            row["eager_us"] = bench_us(eager_call)
            row["triton_loop_us"] = loop_us(fused_call)
            row["eager_loop_us"] = loop_us(eager_call)
            row["compile_us"] = row["compile_loop_us"] = None
            if args.compile_mode != "none":
                try:
                    torch._dynamo.reset()
                    compiled = torch.compile(rali_head_torch, mode=args.compile_mode, dynamic=False)
                    t0 = time.time()
                    row["compile_max_abs_diff_vs_eager"] = (compiled(cls, *head) - eager).abs().max().item()
                    row["compile_s"] = time.time() - t0
                    row["compile_us"] = bench_us(partial(compiled, cls, *head))
                    row["compile_loop_us"] = loop_us(partial(compiled, cls, *head))
                except Exception as exc:  # noqa: BLE001 - a benchmark row, not a crash: say why there is no number
                    row["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            floor, which, nbytes, flops = kernel_floor_us(B, cls.element_size(), precision, ceilings)
            t = row["triton_us"]
            row.update(
                speedup_vs_eager=row["eager_us"] / t,
                speedup_vs_compile=row["compile_us"] / t if row["compile_us"] else None,
                bytes=nbytes, flops=flops,
                GBps=nbytes / (t * 1e-6) / 1e9, TFLOPs=flops / (t * 1e-6) / 1e12,
                floor_us=floor, floor_is=which, times_floor=t / floor,
            )
            if args.sweep:
                best = min(((bench_us(partial(fused_call, config=c)), c) for c in sweep_configs(B)),
                           key=lambda tc: tc[0])
                row["sweep_best_us"], row["sweep_best_config"] = best[0], repr(best[1])
            rows.append(row)
            print(format_row(row, ceilings), flush=True)
    return {"device": props.name, "sm": f"sm_{props.major}{props.minor}", "torch": torch.__version__,
            "triton": __import__("triton").__version__, "fp32_precision": args.fp32_precision,
            "kernel_precision": precision, "shape": {"D": D, "P": P, "K": K}, "ceilings": ceilings, "rows": rows}


HEADER = ("| dtype | B | fused us | eager us | compile us | x eager | x compile | GB/s (% copy) | TFLOP/s | "
          "floor us (bound) | x floor | max abs diff vs eager |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r, ceilings) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    return (f"| {r['dtype']} | {r['B']} | {r['triton_us']:.1f} | {r['eager_us']:.1f} | {f(r['compile_us'], '.1f')} | "
            f"{r['speedup_vs_eager']:.2f} | {f(r['speedup_vs_compile'], '.2f')} | "
            f"{r['GBps']:.0f} ({100 * r['GBps'] / ceilings['copy_GBps']:.0f}%) | {r['TFLOPs']:.2f} | "
            f"{r['floor_us']:.1f} ({r['floor_is']}) | {r['times_floor']:.1f} | {r['max_abs_diff_vs_eager']:.1e} |")


def markdown(result) -> str:
    c = result["ceilings"]
    lines = [
        f"# RALI head: fused Triton kernel vs eager vs torch.compile on {result['device']} ({result['sm']})",
        "",
        (
            f"D={D}, P={P}, K={K}; torch {result['torch']}, triton {result['triton']}; fp32 matmul precision "
            f"`{result['fp32_precision']}` for all three (kernel: `{result['kernel_precision']}`). Median of "
            "`triton.testing.do_bench`, L2 cleared before each run."
        ),
        "",
        f"Measured ceilings: copy {c['copy_GBps']:.0f} GB/s (bytes read + written), matmul "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in c["matmul_TFLOPs"].items())
        + f" ({c['matmul_n']}^3), empty Triton launch {c['empty_launch_us']:.1f} us.",
        (
            "Floor = max(least bytes / copy bandwidth, FLOPs x passes / matmul rate at the kernel's operand "
            "precision, one launch); `x floor` = fused time / floor."
        ),
        "",
        HEADER,
        *(format_row(r, c) for r in result["rows"]),
    ]
    lines += ["", "Back-to-back calls, host overhead included (us per call; no L2 clearing):", "",
              "| dtype | B | fused | eager | compile | x eager | x compile |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fused, eager, comp = r["triton_loop_us"], r["eager_loop_us"], r["compile_loop_us"]
        lines.append(f"| {r['dtype']} | {r['B']} | {fused:.1f} | {eager:.1f} | "
                     + (f"{comp:.1f} | {eager / fused:.2f} | {comp / fused:.2f} |" if comp
                        else f"n/a | {eager / fused:.2f} | n/a |"))
    if any("sweep_best_us" in r for r in result["rows"]):
        lines += ["", "| dtype | B | heuristic config | us | best swept config | us |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['B']} | `{r['config']}` | {r['triton_us']:.1f} | `{r['sweep_best_config']}` | "
                  f"{r['sweep_best_us']:.1f} |" for r in result["rows"]]
    errors = [f"- {r['dtype']} B={r['B']}: torch.compile failed: {r['compile_error']}" for r in result["rows"]
              if "compile_error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main():
    args = parse_args()
    no_gpu_exit()
    import_from_checkout()
    result = run(args)
    print()
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(result))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
