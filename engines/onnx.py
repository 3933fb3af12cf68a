"""ONNX engines: the engine function exported to an ONNX file, run by ONNX Runtime on the CPU.

The file is portable (no machine code inside), so the sidecar's machine record is not compared;
only the model's weights hash and the image size are.

int8: the fp32 export with ONNX Runtime's dynamic quantization of the encoder's weight matmuls
(int8 weights per output channel, uint8 activations quantized per batch at run time; MatMulInteger
runs on AVX-512 VNNI / AVX-VNNI where the CPU has them, on AVX2 otherwise). The patch convolution,
the attention's activation-by-activation matmuls, every layernorm and softmax and the whole head
stay fp32. The MLPs' second linear layers (fc2, a third of the FLOPs) are the hard part: their
inputs come out of the GELU, one-sided and heavy-tailed, and one uint8 scale per batch for them
moved the built-in model's scores by up to 0.049 (0.012 with fc2 in fp32). So int8 has two forms,
tried fastest first, the fidelity check keeping the first that passes (`forms`):

- "smoothed": fc2 in int8 too, after SmoothQuant's smoothing (Xiao et al. 2023, alpha 0.5): each
  input channel j of fc2 is divided by s_j = max|x_j|^0.5 / max|w_j|^0.5 and fc2's weight row j
  multiplied by it (exact in fp32), so that the activations' outlier channels share their range
  with the weights. max|x_j| comes from a calibration set of our own (`calibration_set`: a
  training photograph, clean and distorted), never from the fidelity check's images, which then
  judge the form on images its scales were not fitted to. On the built-in model this form moves
  the bundled samples' scores by up to 0.019 (limit 0.02; calibrated on those samples themselves,
  as the builder once did, it moved them by 0.022-0.025 and was refused);
- "mlp-out-fp32": fc2 stays fp32.

Both forms quantize the same fp32 export: the first form's is kept in the build's scratch folder
for the second (a ViT-L export takes minutes), which then does not load the weights at all.

Without VNNI the weights use 7 bits (`reduce_range`): ONNX Runtime's u8s8 kernels for AVX2/AVX-512
without VNNI can saturate with 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rali_edge.engines.backends import Backend, BuildRequest
from rali_edge.engines.naming import HEAD_PREFIX, ONNX_OPSET, EngineInfo, cpu_flags
from rali_edge.errors import EngineMismatchError, MissingDependencyError, UsageError


def onnx_session(path: str | Path | bytes):
    """An ONNX Runtime CPU session for an exported engine (a file, or a serialized model)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("running ONNX files needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No spin-waiting between calls: the encoder always runs beside decoding threads or Ray's
    # decoding tasks, and spinning threads take their cores. Measured on 2 cores, 800-1000 1 MP
    # JPEGs: the local path 29 -> 31-33 images/s with 15% less CPU; a Ray actor 25% less CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail...)
        raise EngineMismatchError(f"{path}: ONNX Runtime cannot load this file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); rebuild it with `rali-edge build --target onnx`") from None


class OnnxRuntimeEncoder:
    """EncoderBackend running an exported ONNX file with ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, info: EngineInfo):
        self.outputs, self.batch = info.outputs, info.batch
        self.device = torch.device("cpu")
        self.session = onnx_session(path)
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.batch.run_chunks(x, self._run, np.concatenate))

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {"pixels": np.ascontiguousarray(chunk)})[0]


class OnnxBackend(Backend):
    name = "onnx"
    precisions = ("fp32", "fp16", "int8")
    requires = ("onnxruntime", "onnx", "onnxscript")
    install = "pip install onnx onnxruntime onnxscript"

    def auto_precisions(self, device: str, dtype: str) -> list[str]:
        # MLAS's fp32 against MKL's is what auto measures; int8 (never within 1e-3) only by name.
        if str(device).startswith("cuda"):
            return []
        return {"auto": ["fp32"], "fp32": ["fp32"], "int8": ["int8"]}.get(dtype, [])

    def probe_runner(self, shapes, precision: str, device: str):
        from rali_edge.engines.probe import onnx_runner

        return onnx_runner(shapes, precision) if precision == "fp32" else None

    def build_steps(self, request: BuildRequest) -> int:
        return 2 if request.precision == "int8" else 1  # int8: export, then quantize

    def forms(self, request: BuildRequest) -> list[str | None]:
        return list(INT8_FORMS) if request.precision == "int8" else [None]

    def run_device(self, device: str | None) -> str:
        return "cpu"  # the CPU execution provider, whatever device the scorer was asked for

    def check_request(self, request: BuildRequest) -> None:
        if request.precision == "bf16":
            raise UsageError(
                "--target onnx --precision bf16 is not supported: ONNX Runtime has no bf16 kernels for most "
                "operators on CPU. Use fp16 or fp32 for ONNX; bf16 works with --target tensorrt and --target aoti."
            )

    def opset(self) -> int:
        return ONNX_OPSET

    def name_parts(self, runtime, opset: int | None) -> list[str]:
        return [f"opset{opset}"]

    def build(self, load_model, path: Path, request: BuildRequest, info: EngineInfo, progress, written: list[Path]) -> None:
        from rali_edge.engines.export import export_onnx  # building only: scoring loads a built file

        batch = request.batch
        if request.precision != "int8":
            with progress.step(f"exporting ONNX (opset {info.onnx_opset}, {request.precision}, batch {batch.min}-{batch.max})"):
                export_onnx(load_model(), path, request.precision, request.outputs, batch.min, batch.max)
            return
        fp32 = request.scratch / "encoder.fp32.onnx"
        reused = fp32.exists()  # exported by an earlier form of this build
        with progress.step(f"exporting ONNX (opset {info.onnx_opset}, fp32, batch {batch.min}-{batch.max})"
                           + (": reusing the earlier form's export" if reused else "")):
            if not reused:  # the weights are loaded only for the export: the quantizer holds the graph twice
                export_onnx(load_model(), fp32, "fp32", request.outputs, batch.min, batch.max)
        vnni = has_vnni()
        form = request.form or INT8_FORMS[-1]
        smoothed = form == "smoothed"
        with progress.step(f"quantizing to int8, {form} ({'VNNI' if vnni else 'no VNNI on this CPU: 7-bit weights'})"):
            source = request.scratch / "encoder.smoothed.onnx" if smoothed else fp32
            if smoothed:
                calibration = calibration_set(info.preprocess)
                smooth_mlp_outputs(fp32, source, calibration.pixels, batch)
            kept = quantize_int8(source, path, reduce_range=not vnni, mlp_out_fp32=not smoothed)
            if smoothed:
                source.unlink()  # a ViT-L copy is 1.2 GB: the next form needs only the fp32 export
        info.build_options["int8"] = {"form": form, "reduce_range": not vnni, "fp32_nodes_excluded": kept,
                                      **({"smooth_alpha": SMOOTH_ALPHA, "calibration": calibration.description}
                                         if smoothed else {})}

    def open(self, path: Path, info: EngineInfo, device: str) -> OnnxRuntimeEncoder:
        return OnnxRuntimeEncoder(path, info)


def has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI); not
    known (not Linux): no, and the safe 7-bit weights."""
    return bool(cpu_flags(cpuinfo) & {"avx512_vnni", "avx_vnni"})


INT8_FORMS = ("smoothed", "mlp-out-fp32")  # fastest first (module doc)
SMOOTH_ALPHA = 0.5  # SmoothQuant's default: the outliers' range split evenly between x and w


def _is_mlp_out(node) -> bool:
    from rali_edge.engines.export import node_scopes

    return any(scope.endswith(".mlp.fc2") for scope in node_scopes(node))


CALIBRATION_LEVEL = 3  # of each distortion: the middle level


@dataclass
class CalibrationSet:
    pixels: np.ndarray  # every image's views, [rows, 3, H, W]
    description: str  # what the sidecar records


def calibration_set(preprocess: dict) -> CalibrationSet:
    """The smoothed form's calibration set: the packaged raccoon photograph (a public-domain
    training photograph, rali_edge/training/photos) clean and with each distortion of DISTORTIONS
    at CALIBRATION_LEVEL, so that noise, compression and tones all reach the activations. None of
    them is a bundled sample (the default fidelity images). Where Pillow has no JPEG 2000 codec,
    that distortion is made with WebP (distortions.py), and the description says so."""
    from importlib.resources import files

    from PIL import features

    from rali_edge.distortions import DISTORTIONS, distort
    from rali_edge.images import open_image
    from rali_edge.preprocess import PreprocessConfig, Preprocessor

    photo = np.asarray(open_image(str(files("rali_edge.training") / "photos" / "raccoon.jpg")))
    images = [photo] + [distort(photo, kind, CALIBRATION_LEVEL) for kind in DISTORTIONS]
    pixels = Preprocessor(PreprocessConfig.from_dict(preprocess))(images).numpy()
    jpeg2000 = "" if features.check("jpg_2000") else "; jpeg2000 made with WebP (no OpenJPEG in this Pillow)"
    return CalibrationSet(pixels, f"raccoon.jpg clean and {len(DISTORTIONS)} distortions at level "
                                  f"{CALIBRATION_LEVEL} ({len(images)} images, {len(pixels)} views{jpeg2000})")


def smooth_mlp_outputs(fp32: Path, out: Path, pixels: np.ndarray, batch, alpha: float = SMOOTH_ALPHA) -> int:
    """Write to `out` the fp32 ONNX file `fp32` with every fc2 MatMul taking x / s and weight rows
    w_j * s_j (the same function in exact arithmetic; module doc), s from the largest |x_j| seen
    on `pixels` ([rows, 3, H, W], run in chunks the export's batch profile `batch` accepts).
    Returns how many layers."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(fp32))
    graph = proto.graph
    weights = {t.name: t for t in graph.initializer}
    layers = [n for n in graph.node if n.op_type == "MatMul" and _is_mlp_out(n) and n.input[1] in weights]
    x_max = _channel_max(proto, [n.input[0] for n in layers], pixels, batch, out.parent)
    for i, (node, amax) in enumerate(zip(layers, x_max)):
        w = numpy_helper.to_array(weights[node.input[1]])  # [in, out]: the export's transposed weight
        scale = (np.maximum(amax, 1e-6) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-6) ** (1 - alpha))
        scale = scale.astype(np.float32)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None], node.input[1]))
        inverse, smoothed = f"smooth_{i}_inverse_scale", f"{node.input[0]}_smoothed"
        graph.initializer.append(numpy_helper.from_array(1.0 / scale, inverse))
        mul = helper.make_node("Mul", [node.input[0], inverse], [smoothed], name=f"smooth_{i}")
        mul.metadata_props.extend(node.metadata_props)  # the same module scope (`.mlp.fc2`)
        node.input[0] = smoothed
        graph.node.insert(list(graph.node).index(node), mul)
    onnx.save(proto, str(out))
    return len(layers)


def _channel_max(proto, names: list[str], pixels: np.ndarray, batch, folder: Path) -> list[np.ndarray]:
    """Largest |value| per channel (last axis) of the tensors `names` over `pixels`, by ONNX
    Runtime on a copy of the graph that outputs them, in the chunks `batch` (the export's batch
    profile) accepts: a fixed-batch export takes no other batch size. A short chunk's padding
    repeats its last row, which cannot change a maximum. The copy is written in `folder` (the
    build's scratch, beside the engine): a ViT-L copy is 1.2 GB, and /tmp is RAM-backed (tmpfs) on
    some systems."""
    import tempfile

    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        onnx.save(probe, f"{tmp}/probe.onnx")
        del probe
        session = onnx_session(f"{tmp}/probe.onnx")
    found = [None] * len(names)

    def observe(chunk: np.ndarray) -> np.ndarray:
        for i, value in enumerate(session.run(None, {"pixels": np.ascontiguousarray(chunk)})):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            found[i] = m if found[i] is None else np.maximum(found[i], m)
        return chunk  # run_chunks wants rows back; only `found` matters

    batch.run_chunks(pixels, observe, np.concatenate)
    return found


def quantize_int8(fp32: Path, out: Path, reduce_range: bool, mlp_out_fp32: bool = True) -> int:
    """ONNX Runtime's dynamic int8 quantization of the encoder's weight matmuls (with
    `mlp_out_fp32`, but the MLPs' second layers: module doc); returns how many nodes were kept in
    fp32 by name."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32), load_external_data=False).graph
    kept = [n.name for n in graph.node if n.name.startswith(HEAD_PREFIX) or (mlp_out_fp32 and _is_mlp_out(n))]
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process is printed on the root logger
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=kept,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    return len(kept)


BACKEND = OnnxBackend()

__all__ = ["BACKEND", "INT8_FORMS", "OnnxRuntimeEncoder", "calibration_set", "has_vnni", "quantize_int8",
           "smooth_mlp_outputs"]
