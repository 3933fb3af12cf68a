"""Build an engine for a model and prove that it scores like fp32 PyTorch: what `rali-edge build` runs.

    from rali_edge.engines.builder import build
    built = build("default", "onnx", output="engines/")      # -> Built(engine, info, fidelity)
    rali_edge.load("default", engine=built.engine)

The steps are the backend's (engines/backends.py) plus the fidelity check; `Progress` prints
them with their durations (stderr by default; `Progress(quiet=True)` prints nothing).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from rali_edge.engines.backends import TABLE, BuildRequest, backend
from rali_edge.engines.progress import Progress
from rali_edge.engines.fidelity import DEFAULT_MAX_SCORE_DIFF, FidelityReport, check_engine, fidelity_images
from rali_edge.engines.naming import (
    DEFAULT_BATCH,
    BatchRange,
    EngineInfo,
    engine_filename,
    sidecar_path,
    write_sidecar,
)
from rali_edge.errors import FidelityCheckFailed, UsageError

HEADS = {"engine": "score", "triton": "class_token"}  # --head: what the engine outputs


@dataclass
class Built:
    engine: Path
    info: EngineInfo
    fidelity: FidelityReport | None  # None when built with check=False


def resolve_output(output: str | Path | None, filename: str, suffix: str) -> Path:
    """-o: a file name with the target's suffix is used as given; anything else is a folder."""
    if output is None:
        return Path.cwd() / filename
    path = Path(output)
    if path.suffix == suffix and not path.is_dir():
        folder = path.parent
    elif path.exists() and not path.is_dir():
        raise UsageError(f"-o {output} is an existing file, not a folder or a {suffix} engine name; give a folder "
                         f"(the engine gets its descriptive name there) or a file name ending in {suffix}")
    else:
        folder, path = path, path / filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"-o {output}: cannot create the folder {folder} ({e.strerror or e})") from None
    return path


def build(model: str | Path | None, target: str, *, precision: str | None = None, batch: str | BatchRange = DEFAULT_BATCH,
          head: str = "engine", device: str | None = None, output: str | Path | None = None, check: bool = True,
          calib_dir: str | Path | None = None, max_score_diff: float = DEFAULT_MAX_SCORE_DIFF, keep_failed: bool = False,
          progress: Progress | None = None, announce: bool = True, **options) -> Built:
    """Build a `target` engine (one of backends.TARGETS) of `model` (a folder, a name, or None for
    the built-in model), write its sidecar, and (check=True) run the fidelity check on the images
    of `calib_dir` (default: the bundled samples). `options`: the backend's own BuildRequest fields
    (workspace_gib, timing_cache, typing, keep_onnx for TensorRT). `announce`: say where the
    engine is (the engine cache says it itself, once the engine is in its place).

    Raises UsageError for options the backend does not take, MissingDependencyError when its
    library is missing (both before any work), FidelityCheckFailed when the engine moves scores by
    more than `max_score_diff` (the engine is deleted unless keep_failed). A build that is
    interrupted or fails otherwise leaves no files."""
    from rali_edge.model_file import load_model, read_manifest
    from rali_edge.scoring import model_path

    chosen = backend(target)
    internal = sorted({"form", "scratch"} & set(options))  # the builder's own: it sets them per form
    if internal:
        raise UsageError(f"build() does not take {', '.join(internal)}")
    foreign = [name for name in options if name not in chosen.options]
    if foreign:
        flags = {field: flag for entry in TABLE for field, flag in backend(entry.name).options.items()}
        raise UsageError(f"--target {target} does not take {', '.join(flags.get(f, f) for f in foreign)}")
    if head not in HEADS:
        raise UsageError(f"--head {head!r}: choose one of {', '.join(HEADS)}")
    batch = batch if isinstance(batch, BatchRange) else BatchRange.parse(batch)
    device = device or chosen.default_device()
    request = BuildRequest(precision=precision or chosen.default_precision(device), batch=batch, outputs=HEADS[head],
                           device=device, **options)
    chosen.check_request(request)
    if request.precision not in chosen.precisions:
        raise UsageError(f"--target {target} --precision {request.precision}: {target} engines are "
                         f"{', '.join(chosen.precisions)}")
    images = fidelity_images(calib_dir) if check else []
    if images and not any(_decodes(p) for p in images):  # before minutes of building, not after
        raise UsageError(f"--calib-dir {calib_dir}: none of its {len(images)} images can be read; the fidelity "
                         "check needs images it can score")
    path = model_path(model)
    manifest = read_manifest(path)
    progress = progress or Progress()
    progress.total = chosen.build_steps(request) + int(check)

    runtime = chosen.runtime(device)
    opset = chosen.opset()
    engine = resolve_output(output, engine_filename(manifest.name, target, request.precision, batch, request.outputs,
                                                    runtime, opset), chosen.suffix)
    size = manifest.encoder.image_size
    info = EngineInfo(target=target, precision=request.precision, outputs=request.outputs, batch=batch,
                      image_size=(size, size), model_name=manifest.name, model_sha256=manifest.weights_sha256,
                      runtime=runtime, build_options={"target": target, "precision": request.precision,
                                                      "batch": str(batch), "head": head},
                      preprocess=manifest.preprocess, onnx_opset=opset)
    # Built and checked under a hidden name, then renamed: a failed build never touches an engine
    # already at `engine` (an earlier, checked build of the same name).
    work = engine.with_name(f".{engine.stem}.building{engine.suffix}")
    written = [work, sidecar_path(work)]
    forms = chosen.forms(request) if check else chosen.forms(request)[-1:]
    # The scratch folder outlives each form (a later form may reuse an earlier one's export) and
    # goes when the build ends, however it ends.
    with tempfile.TemporaryDirectory(dir=engine.parent, prefix=f".{engine.name}.scratch-") as scratch:
        for i, form in enumerate(forms):
            attempt = replace(request, form=form, scratch=Path(scratch))
            info.fidelity = None  # an earlier form's failed check is not this one's
            last = i == len(forms) - 1
            try:
                # The backend loads the model itself, when and if it needs it: it can free the weights
                # once it is done with them (TensorRT builds want that memory), and a form that reuses an
                # earlier form's export does not load them at all (seconds and 1.2 GB for ViT-L).
                chosen.build(lambda: load_model(path)[0], work, attempt, info, progress, written)
                write_sidecar(work, info)
                if announce:
                    progress.note(f"engine: {engine} ({work.stat().st_size / 2**20:.1f} MiB)")
                report = _check(path, work, engine, info, images, max_score_diff, keep_failed and last, device,
                                progress) if check else None
            except FidelityCheckFailed as e:  # the check kept (keep_failed) or deleted the engine
                if last:
                    if work.exists():
                        _publish(written, engine)
                    raise
                progress.note(f"{request.precision} as {form} failed the fidelity check ({e.short}); "
                              f"building it as {forms[i + 1]}")
                progress.total += chosen.build_steps(attempt) + 1
                continue
            except BaseException:  # interrupted, or failed before its check passed: no unchecked engine stays
                for p in written:
                    p.unlink(missing_ok=True)
                raise
            _publish(written, engine)
            return Built(engine, info, report)


def _publish(written: list[Path], engine: Path) -> None:
    """Rename the files built under the hidden name (engine, sidecar, extras such as TensorRT's
    kept ONNX file) to the engine's name; the engine first, so a sidecar always names a whole engine."""
    work = written[0]
    for p in written:
        if p.exists() and p.name.startswith(work.name):
            os.replace(p, p.with_name(engine.name + p.name[len(work.name):]))


def build_auto(model: str | Path | None = None, device: str = "cpu", dtype: str = "auto",
               progress: Progress | None = None):
    """What `rali-edge build --target auto` runs: every candidate auto weighs here measured again,
    each with its trial (engines/auto.py), the verdict kept, and the engine auto then runs built
    into the cache. Returns (that engine, or None when auto runs eager PyTorch; the Verdict)."""
    from rali_edge.engines import auto, cache
    from rali_edge.model_file import read_manifest
    from rali_edge.scoring import model_path

    path = model_path(model)
    manifest = read_manifest(path)
    verdict = auto.decide(path, manifest, device, dtype, progress, try_all=True)
    backend, precision = verdict.choice
    engine = None if backend == "torch" else cache.cached_engine(path, manifest, backend, precision, device, progress)
    return engine, verdict


def _decodes(path: Path) -> bool:
    from rali_edge.errors import ImageError
    from rali_edge.images import open_image

    try:
        open_image(path)
    except ImageError:
        return False
    return True


def _check(model_path: Path, engine: Path, final: Path, info: EngineInfo, images: list[Path], max_score_diff: float,
           keep_failed: bool, device: str, progress: Progress) -> FidelityReport:
    """Check `engine` (built under its hidden name); messages name `final`, where it will be."""
    with progress.step(f"fidelity check on {len(images)} images against fp32 PyTorch"):
        report = check_engine(model_path, engine, info.target, images, max_score_diff, device=device)
    info.fidelity = report.to_dict()
    write_sidecar(engine, info)
    progress.note(f"fidelity: {report.summary()}")
    if not report.passed:
        if not keep_failed:
            engine.unlink(missing_ok=True)
            sidecar_path(engine).unlink(missing_ok=True)
            where = "the engine was deleted (--keep-failed keeps it)"
        else:
            where = f"the engine is kept at {final}, marked as failed in its sidecar"
        short = f"fidelity check failed: max |score diff| {report.max_abs_diff:.4f} > {max_score_diff}"
        raise FidelityCheckFailed(
            f"{short} (worst image: {report.worst_image}); {where}. Try --precision fp32, or raise --max-score-diff "
            "if this difference is acceptable for your use.", short)
    return report


def check(engine: str | Path, model: str | Path | None = None, calib_dir: str | Path | None = None,
          max_score_diff: float = DEFAULT_MAX_SCORE_DIFF, device: str | None = None, batch_size: int = 8) -> FidelityReport:
    """Score the images of `calib_dir` with `engine` and with fp32 PyTorch (what `rali-edge
    check-engine` runs); the engine runs where it was built unless `device` says otherwise."""
    from rali_edge.engines.naming import read_sidecar
    from rali_edge.scoring import model_path

    info = read_sidecar(engine)
    return check_engine(model_path(model), engine, info.target, fidelity_images(calib_dir), max_score_diff,
                        device=device or info.runtime.device_type, batch_size=batch_size)


__all__ = ["Built", "HEADS", "Progress", "build", "build_auto", "check", "resolve_output"]
