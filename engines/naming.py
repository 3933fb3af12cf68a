"""Engine file names, their JSON sidecars, and the check that an engine fits this model and machine.

An engine is only valid for one model, one precision and batch range, and (TensorRT) one GPU
compute capability and one TensorRT version, or (AOTInductor) one torch version and device. The
name says all that at a glance:

    rali-vitl14-336.trt10.3.sm87.fp16.b1-8.plan          TensorRT, head inside the engine
    rali-vitl14-336.trt10.3.sm87.fp16.b1-8.enc.plan      TensorRT, class token out (head outside)
    rali-vitl14-336.aoti.torch2.13.cpu-x86_64.fp32.b1-16.pt2
    rali-vitl14-336.opset18.fp16.b1-16.onnx

and `<engine>.json` next to it records the rest. `check_compatible` compares that record with the
model and the machine before anything is deserialised: TensorRT aborts (or crashes) on a foreign
plan, and loading an engine of another model would give wrong scores without any error at all.

No torch or TensorRT import here: the torch-free TensorRT runner uses this module too.
"""

from __future__ import annotations

import json
import platform as _platform
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rali_edge import __version__
from rali_edge.engines import backends
from rali_edge.engines.backends import SUFFIX, TARGETS
from rali_edge.errors import EngineMismatchError, UsageError, read_json_object

SIDECAR_FORMAT = "rali-edge-engine"
SIDECAR_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # int8: ONNX only (engines/onnx.py)
OUTPUTS = ("score", "class_token")
DEFAULT_BATCH = "1:8:16"
INPUT_NAME = "pixels"
ONNX_OPSET = 18  # the ONNX and TensorRT engines are exported at this opset
HEAD_PREFIX = "rali_head/"  # the exported head's node names: what the TensorRT builder keeps in fp32


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """`MIN:OPT:MAX`, `MIN:MAX` (opt = max) or `MAX` (1:MAX:MAX)."""
        parts = str(text).strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) == 1:
            values = [1, values[0], values[0]]
        elif len(values) == 2:
            values = [values[0], values[1], values[1]]
        if len(values) != 3:
            raise UsageError(f"--batch {text!r}: expected MIN:OPT:MAX, e.g. 1:8:16")
        lo, opt, hi = values
        if not 1 <= lo <= opt <= hi:
            raise UsageError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
        return cls(lo, opt, hi)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def run_chunks(self, rows, run, concat):
        """`run` over `rows` (a tensor or array, at least one row) in chunks this profile accepts:
        at most `max` rows each, a short chunk padded to `min` with copies of its last row, whose
        outputs are dropped. `concat`: torch.cat or np.concatenate (this module imports neither).
        The one batching rule of every engine runner."""
        outs = []
        for start in range(0, len(rows), self.max):
            chunk = rows[start : start + self.max]
            n = len(chunk)
            if n < self.min:
                chunk = concat([chunk, *[chunk[-1:]] * (self.min - n)])
            outs.append(run(chunk)[:n])
        return concat(outs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RuntimeInfo:
    """What the machine that builds or loads an engine has. None = not present / not known."""

    platform: str = field(default_factory=lambda: _platform.system().lower())
    cpu_arch: str = field(default_factory=_platform.machine)
    device_type: str = "cpu"  # "cpu" or "cuda"
    tensorrt_version: str | None = None
    cuda_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None  # "sm87"
    torch_version: str | None = None
    device_model: str | None = None  # e.g. "NVIDIA Jetson AGX Orin Developer Kit"

    def to_dict(self) -> dict:
        return asdict(self)


def device_model() -> str | None:
    """The board name on Jetson and other device-tree machines (/proc/device-tree/model), else None."""
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00 \n") or None
    except OSError:
        return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """This CPU's instruction-set flags (Linux /proc/cpuinfo: x86 `flags`, Arm `Features`); empty
    elsewhere."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This CPU's name: /proc/cpuinfo's `model name` (x86) or `Hardware` (some Arm boards), else
    what Python's platform module says."""
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    named = (line.split(":", 1)[1].strip() for line in lines if line.lower().startswith(("model name", "hardware")))
    return next(named, None) or _platform.processor() or _platform.machine()


def compute_capability_tag(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


def base_version(version: str | None) -> str:
    """'2.13.0+cu126' -> '2.13.0'; '10.3.0.30' -> '10.3.0' (TensorRT's 4th field is the build)."""
    if not version:
        return ""
    return ".".join(re.split(r"[+\-a-zA-Z ]", str(version))[0].split(".")[:3])


def major_minor(version: str | None) -> str:
    return ".".join(base_version(version).split(".")[:2])


def slug(name: str) -> str:
    """A model name safe in a file name: 'RALI ViT-L/14@336' -> 'rali-vit-l-14-336'."""
    s = re.sub(r"[^a-z0-9._]+", "-", name.strip().lower()).strip("-.")
    return s or "model"


def engine_filename(model_name: str, target: str, precision: str, batch: BatchRange, outputs: str,
                    runtime: RuntimeInfo, opset: int | None = None) -> str:
    """The file name of an engine; see the module docstring for examples."""
    parts = [slug(model_name), *backends.backend(target).name_parts(runtime, opset), precision, f"b{batch.min}-{batch.max}"]
    if outputs == "class_token":
        parts.append("enc")
    return ".".join(parts) + SUFFIX[target]


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


@dataclass
class EngineInfo:
    """The sidecar: everything needed to judge whether an engine may run here, for this model."""

    target: str
    precision: str
    outputs: str
    batch: BatchRange
    image_size: tuple[int, int]  # (height, width) the engine takes
    model_name: str
    model_sha256: str
    runtime: RuntimeInfo
    build_options: dict = field(default_factory=dict)  # what `rali-edge build` was given
    preprocess: dict = field(default_factory=dict)  # the model's PreprocessConfig (for torch-free runners)
    onnx_opset: int | None = None
    typing: str | None = None  # TensorRT: "weak" (builder flags + fp32 constraints) or "strong"
    rali_edge_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    fidelity: dict | None = None  # filled by the fidelity check at the end of the build

    def to_dict(self) -> dict:
        return {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "target": self.target,
            "precision": self.precision,
            "outputs": self.outputs,
            "batch": self.batch.to_dict(),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, *self.image_size], "dtype": "float32"},
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "rali_edge_version": self.rali_edge_version,
            "created": self.created,
            "onnx_opset": self.onnx_opset,
            "tensorrt": {"version": self.runtime.tensorrt_version, "typing": self.typing},
            "cuda_version": self.runtime.cuda_version,
            "gpu": {"name": self.runtime.gpu_name, "compute_capability": self.runtime.compute_capability},
            "torch_version": self.runtime.torch_version,
            "device": {"type": self.runtime.device_type, "cpu_arch": self.runtime.cpu_arch,
                       "platform": self.runtime.platform, "model": self.runtime.device_model},
            "build_options": self.build_options,
            "preprocess": self.preprocess,
            "fidelity": self.fidelity,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "sidecar") -> EngineInfo:
        if d.get("format") != SIDECAR_FORMAT:
            raise EngineMismatchError(f"{where}: not a rali-edge engine sidecar (format is {d.get('format')!r})")
        if d.get("format_version", 0) > SIDECAR_VERSION:
            raise EngineMismatchError(
                f"{where}: written by a newer rali-edge (sidecar version {d['format_version']}); upgrade rali-edge"
            )
        try:
            runtime = RuntimeInfo(
                platform=d["device"]["platform"],
                cpu_arch=d["device"]["cpu_arch"],
                device_type=d["device"]["type"],
                tensorrt_version=d["tensorrt"]["version"],
                cuda_version=d.get("cuda_version"),
                gpu_name=d["gpu"]["name"],
                compute_capability=d["gpu"]["compute_capability"],
                torch_version=d.get("torch_version"),
                device_model=d["device"].get("model"),
            )
            return cls(
                target=d["target"],
                precision=d["precision"],
                outputs=d["outputs"],
                batch=BatchRange(**d["batch"]),
                image_size=tuple(d["input"]["shape"][2:4]),
                model_name=d["model"]["name"],
                model_sha256=d["model"]["sha256"],
                runtime=runtime,
                build_options=d.get("build_options", {}),
                preprocess=d.get("preprocess", {}),
                onnx_opset=d.get("onnx_opset"),
                typing=d["tensorrt"].get("typing"),
                rali_edge_version=d.get("rali_edge_version", ""),
                created=d.get("created", ""),
                fidelity=d.get("fidelity"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineMismatchError(f"{where}: malformed sidecar ({type(e).__name__}: {e})") from None

    def rebuild_command(self, model: str = "<model folder>") -> str:
        """The `rali-edge build` line that makes this engine again, for this machine."""
        head = "engine" if self.outputs == "score" else "triton"
        cmd = (f"rali-edge build {model} --target {self.target} --precision {self.precision} "
               f"--batch {self.batch} --head {head}")
        return cmd + backends.backend(self.target).rebuild_options(self)


def write_sidecar(engine_path: str | Path, info: EngineInfo) -> Path:
    path = sidecar_path(engine_path)
    path.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    return path


def engines_in(folder: str | Path, target: str | None = None) -> list[Path]:
    """The engines in `folder` (files with an engine suffix and their sidecar), of `target` if given."""
    suffixes = [SUFFIX[target]] if target else list(SUFFIX.values())
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix in suffixes and sidecar_path(p).is_file())


def resolve_engine(path: str | Path, target: str | None = None) -> Path:
    """--engine PATH: an engine file as given; a folder holding exactly one engine (of `target`,
    if given) is that engine; a folder with none or several says so and names them."""
    path = Path(path)
    if not path.is_dir():
        return path
    kind = f"{target} " if target else ""
    found = engines_in(path, target)
    if len(found) == 1:
        return found[0]
    if not found:
        raise EngineMismatchError(f"--engine {path} is a folder with no {kind}engine in it (an engine is a "
                                  f"{'/'.join(SUFFIX[target] for target in ([target] if target else TARGETS))} "
                                  "file with its .json sidecar); build one with `rali-edge build`")
    raise EngineMismatchError(f"--engine {path} is a folder with {len(found)} {kind}engines; name one: "
                              + ", ".join(p.name for p in found))


def read_sidecar(engine_path: str | Path) -> EngineInfo:
    engine = Path(engine_path)
    if engine.is_dir():
        raise EngineMismatchError(f"{engine} is a folder, not an engine file; name the engine in it")
    path = sidecar_path(engine)
    if not engine.exists():
        raise EngineMismatchError(f"{engine}: engine file not found")
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine}: its sidecar {path.name} is missing. rali-edge only runs engines together with the "
            "sidecar that `rali-edge build` writes next to them (it says which model, GPU and TensorRT/torch "
            "version the engine is for); copy it along with the engine, or rebuild: "
            "rali-edge build <model folder> --target ..."
        )
    return EngineInfo.from_dict(read_json_object(path, str(path), EngineMismatchError), str(path))


def check_compatible(info: EngineInfo, model_sha256: str | None, runtime: RuntimeInfo, backend: str | None = None,
                     model_ref: str = "<model folder>") -> list[str]:
    """Raise EngineMismatchError naming every difference that makes the engine unusable here, with
    the command that rebuilds it; return warnings for differences that do not (other GPU of the
    same compute capability, other CUDA minor version...)."""
    problems: list[str] = []
    warnings: list[str] = []
    if backend is not None and backend != info.target:
        # Nothing to rebuild: the engine is fine, only read by another backend.
        raise EngineMismatchError(f"it is an engine for --backend {info.target}, not --backend {backend}")
    if model_sha256 is not None and info.model_sha256 != model_sha256:
        problems.append(
            f"it was built for another model: {info.model_name} (weights sha256 {info.model_sha256[:12]}...), "
            f"but the model given has weights sha256 {model_sha256[:12]}..."
        )
    backend_problems, backend_warnings = backends.backend(info.target).compatibility(info.runtime, runtime)
    problems += backend_problems
    warnings += backend_warnings
    if info.fidelity is not None and not info.fidelity.get("passed", True):
        warnings.append(
            f"this engine FAILED its fidelity check when built (max |score diff| "
            f"{info.fidelity.get('max_abs_diff')} > {info.fidelity.get('max_score_diff')})"
        )
    if problems:
        raise EngineMismatchError(
            "cannot use engine: " + "; ".join(problems)
            + f". Rebuild it on this machine for this model: {info.rebuild_command(model_ref)}"
        )
    return warnings


__all__ = [
    "BatchRange",
    "EngineInfo",
    "RuntimeInfo",
    "base_version",
    "check_compatible",
    "engine_filename",
    "engines_in",
    "read_sidecar",
    "resolve_engine",
    "sidecar_path",
    "slug",
    "write_sidecar",
]
