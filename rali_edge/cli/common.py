"""Options and helpers shared by the commands that load a model."""

from __future__ import annotations

import functools

import click

BACKEND_HELP = "torch: PyTorch encoder; aoti, tensorrt, onnx: an engine from `rali-edge build` (needs --engine)."


def model_options(fn):
    """--model, --device, --dtype, --backend, --engine, --head: how to load the scorer."""

    @click.option("--model", "-m", type=click.Path(exists=True, file_okay=False),
                  help="A rali-edge model folder (from `rali-edge convert`/`fetch`/`fit-head`). Default: the built-in model.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
    @click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
                  help="Encoder precision (the head always runs in fp32).")
    @click.option("--backend", type=click.Choice(["torch", "aoti", "tensorrt", "onnx"]), default="torch", show_default=True, help=BACKEND_HELP)
    @click.option("--engine", type=click.Path(exists=True), help="Engine file for --backend aoti/tensorrt.")
    @click.option("--head", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
                  help="RALI head: the fused Triton kernel (auto picks it on CUDA) or eager PyTorch.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def load_scorer(model=None, device="cpu", dtype="fp32", backend="torch", engine=None, head="auto"):
    import rali_edge

    return rali_edge.load(model, device=device, dtype=dtype, backend=backend, engine=engine, head=head)
