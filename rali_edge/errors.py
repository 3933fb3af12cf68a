"""Errors that rali-edge reports to users. Each one says what is wrong and what to do;
the CLI prints the message (never a traceback) and exits with the code of its class."""

import json
from pathlib import Path


class RaliEdgeError(Exception):
    exit_code = 1


class UsageError(RaliEdgeError):
    """Options or arguments that cannot work together (click's own usage errors are 2 as well)."""

    exit_code = 2


class ModelFormatError(RaliEdgeError):
    """A model folder or file is missing, malformed or of the wrong shape."""

    exit_code = 3


class UnsafePickleError(ModelFormatError):
    """A pickle asked to import or call something outside the allow-list."""


class ImageError(RaliEdgeError):
    """One input could not be read as an image; other inputs go on."""


class EngineMismatchError(RaliEdgeError):
    """An engine was built for another GPU, TensorRT version or model."""

    exit_code = 3


class NetworkError(RaliEdgeError):
    """A download could not reach its server or find its files (offline, a proxy, an outage): an
    environment problem, like a missing library."""

    exit_code = 4


class MissingDependencyError(RaliEdgeError):
    """An optional library (TensorRT, OpenCV, pynvml...) or a device (CUDA) is not available."""

    exit_code = 4


class OutputError(RaliEdgeError):
    """An output could not be written once the work had started (a full disk, a device that refuses
    writes): an environment problem. What was written before stays."""

    exit_code = 4


class OutputClosed(OutputError):
    """The reader of standard output went away (`rali-edge score ... | head`): what it read was
    written; the command stops quietly."""


class DatasetError(UsageError):
    """A dataset file cannot be read or has no usable labels."""


class SourceError(UsageError):
    """A stream SOURCE argument names nothing that can be read."""


class SourceOpenError(RaliEdgeError):
    """A stream source exists but could not be opened or read right now (retried for live sources)."""


class ModelLoadError(ModelFormatError):
    """The model or engine could not be loaded (any reason the loader did not classify itself)."""


class ScoringError(RaliEdgeError):
    """The scorer failed while a stream or a Ray run ran (out of GPU memory, an engine error, a lost cluster...)."""


class FidelityCheckFailed(RaliEdgeError):
    """An engine's scores differ from fp32 PyTorch by more than --max-score-diff. `short`: the
    measured difference against the limit alone, for messages that quote it."""

    def __init__(self, message: str, short: str | None = None):
        super().__init__(message)
        self.short = short or message


class PrecisionRefused(FidelityCheckFailed):
    """The engine cache's reduced-precision (int8) build of a model failed the fidelity check: the
    model cannot be scored at that precision here, so nothing was scored (like a model that
    cannot be loaded)."""

    exit_code = 3


def read_json_object(path: str | Path, where: str, error: type[RaliEdgeError] = ModelFormatError) -> dict:
    """The JSON object in `path` (a manifest, a sidecar, a config), or `error` saying what is
    wrong with it, named `where`: missing, not JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{where}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: a JSON object expected, not {type(data).__name__}")
    return data
