"""Options and helpers shared by the commands that load a model."""

from __future__ import annotations

import functools

import click

from rali_edge.engines.backends import BACKENDS, TABLE, default_backend

BACKEND_HELP = (f"auto: the fastest path here, its engine built on first use and cached (RALI_EDGE_BACKEND changes "
                f"the default); torch: PyTorch encoder; {', '.join(e.name for e in TABLE)}: an engine from "
                "`rali-edge build` (needs --engine).")
ENGINE_HELP = (f"Engine file from `rali-edge build` ({', '.join(f'{e.name} {e.suffix}' for e in TABLE)}), or a folder "
               "holding one; without --backend, the engine's sidecar names the backend.")


class ModelFolder(click.ParamType):
    """`default` (the built-in model) or an existing model folder."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        from rali_edge.scoring import DEFAULT_MODEL

        if value == DEFAULT_MODEL:
            return value
        return click.Path(exists=True, file_okay=False).convert(value, param, ctx)


MODEL = ModelFolder()


class OutputFile(click.ParamType):
    """A file this command will write: checked when the options are parsed, so that a typo in
    the path fails at once and not after the work (its folder must exist and be writable)."""

    name = "FILE"

    def __init__(self, stdout_dash: bool = False):
        self.stdout_dash = stdout_dash  # "-" means standard output

    def convert(self, value, param, ctx):
        from pathlib import Path

        from rali_edge.outputs import why_not_writable

        if self.stdout_dash and value == "-":
            return value
        path = Path(value)
        if path.is_dir() and path.suffix.lower() != ".parquet":  # a parquet output is a folder of parts
            self.fail(f"{value} is a folder; give a file name", param, ctx)
        reason = why_not_writable(path)
        if reason:
            self.fail(f"cannot write {value}: {reason}", param, ctx)
        return str(path)


class OutputFolder(click.ParamType):
    """A folder this command will write files into (made if missing): checked when the options are
    parsed, by trying, so that a path no file can be written to fails before the work."""

    name = "DIR"

    def convert(self, value, param, ctx):
        from rali_edge.outputs import why_not_writable

        reason = why_not_writable(value, folder=True)
        if reason:
            self.fail(f"cannot write into {value}: {reason}", param, ctx)
        return str(value)


OUTPUT_FILE = OutputFile()
OUTPUT_FOLDER = OutputFolder()
OUTPUT_FILE_OR_STDOUT = OutputFile(stdout_dash=True)
DEMO_NOTE = ("note: the built-in model is a small demonstration model, not a general quality model; for real "
             "accuracy get the published RALI weights: rali-edge fetch (--quiet hides this)")


DTYPE_HELP = ("Encoder precision (the head always runs in fp32). auto: with --backend auto, the fastest precision "
              "whose scores stay within 1e-3 of fp32 here (bf16 on CPUs with bf16 instructions, fp16 on GPUs, when a "
              "measurement made once and cached says so), else fp32. int8: an ONNX Runtime engine on the CPU, "
              "refused when it moves scores by more than 0.02 on the fidelity images.")


def backend_options(fn):
    """--device, --dtype, --backend, --engine, --head, --no-cache: how a model runs."""

    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
    @click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto",
                  show_default=True, help=DTYPE_HELP)
    @click.option("--backend", type=click.Choice(BACKENDS), default=default_backend, show_default="auto",
                  help=BACKEND_HELP)
    @click.option("--engine", type=click.Path(exists=True), help=ENGINE_HELP)
    @click.option("--head", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
                  help="RALI head: the fused Triton kernel (auto picks it on CUDA) or eager PyTorch.")
    @click.option("--no-cache", "no_cache", is_flag=True,
                  help="Do not read or write the engine cache (--backend auto then runs eager PyTorch).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def model_options(fn):
    """--model and backend_options: which model, and how it runs."""

    @click.option("--model", "-m", type=MODEL, default="default",
                  help="A rali-edge model folder (from `rali-edge convert`/`fetch`/`fit-head`), or `default`: the built-in model.")
    @backend_options
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def load_scorer(model=None, device="cpu", dtype="auto", backend=None, engine=None, head="auto", no_cache=False,
                quiet=False):
    """rali_edge.load with the commands' options; `quiet`: no notes on stderr (auto's first use included)."""
    import rali_edge

    progress = None
    if quiet:
        from rali_edge.engines.progress import Progress

        progress = Progress(quiet=True)
    return rali_edge.load(model, device=device, dtype=dtype, backend=backend, engine=engine, head=head,
                          cache=not no_cache, progress=progress)
