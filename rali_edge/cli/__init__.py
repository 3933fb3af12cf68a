"""The `rali-edge` command line. One module per command; each is imported only when it runs,
so `rali-edge --help` answers at once instead of waiting for torch to import."""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading

import click

from rali_edge import __version__

# command name -> (module under rali_edge.cli, one-line help shown by `rali-edge --help`)
COMMANDS = {
    "score": ("score", "Score images, folders or globs (default: the built-in model)."),
    "convert": ("convert", "Convert a published RALI folder into a rali-edge model (safe: no pickled code runs)."),
    "fetch": ("fetch", "Download the published RALI weights from the hub and convert them."),
    "eval": ("evaluate", "Measure SRCC/PLCC of a model or engine on labelled images."),
    "fit-head": ("fit_head", "Fit a RALI prototype head to your own labelled images."),
    "build": ("build", "Build an engine (TensorRT, AOTInductor or ONNX) and check its accuracy."),
    "check-engine": ("build", "Check an engine's scores against fp32 PyTorch."),
    "profile": ("profile", "Latency, throughput, power and energy per image, against the MLLM baseline."),
    "stream": ("stream", "Score live camera streams, video files or image folders."),
    "serve": ("serve", "Serve scores over HTTP (REST, KServe v2 / Triton), batching across requests."),
    "cache": ("cache", "List or clear the engines --backend auto built on first use."),
}

# Exit codes, the same for every command.
EXIT_OK = 0
EXIT_SOME_FAILED = 1  # some inputs could not be scored; the others were
EXIT_USAGE = 2  # bad options or arguments (click's own code)
EXIT_MODEL = 3  # the model or engine could not be loaded (wrong file, other GPU, other TensorRT...)
EXIT_ENVIRONMENT = 4  # a needed library, device or network is missing (TensorRT, CUDA, OpenCV, fetch offline...), a full disk
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C; what was scored before was written


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"rali_edge.cli.{COMMANDS[name][0]}")
        return getattr(module, name.replace("-", "_") + "_command")

    def invoke(self, ctx):
        # One place turns every rali-edge error into a one-line message and its exit code.
        from rali_edge.errors import RaliEdgeError

        try:
            with _terminate_as_interrupt():
                return super().invoke(ctx)
        except RaliEdgeError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            # The one rule for Ctrl-C: commands that have results keep them (score, eval, stream,
            # profile say what they kept); every command exits 130 without a traceback.
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (docker stop, systemd, a batch scheduler's time limit) stops a command as Ctrl-C
    does, keeping what it had finished; `stream` installs its own handlers for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rali-edge")
def main():
    """rali-edge: fast no-reference image quality scores (RALI) on Jetson, GPUs and CPUs.

    Scores run from 1 (very poor) to 5 (excellent). Without --model, commands use the small
    built-in model; `rali-edge fetch` gets the published RALI weights for real accuracy.

    \b
    Exit codes: 0 all done, 1 some inputs failed (the rest were scored),
    2 usage error, 3 model/engine cannot be loaded, 4 missing library, device or network,
    or an output that cannot be written (a full disk), 130 interrupted (results so far were written).
    """

