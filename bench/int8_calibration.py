"""The built-in model's smoothed int8 form (engines/onnx.py) calibrated two ways, each judged as the
fidelity check judges it (max |score diff| against fp32 PyTorch on the bundled samples): on the
bundled samples themselves (the judged images: what the builder once did) and on
`calibration_set` (a training photograph, clean and distorted: the builder now).

    python bench/int8_calibration.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from rali_edge.engines import onnx as engines_onnx
from rali_edge.engines.export import export_onnx
from rali_edge.engines.fidelity import fidelity_images
from rali_edge.engines.naming import BatchRange
from rali_edge.model_file import load_model
from rali_edge.preprocess import PreprocessConfig, Preprocessor
from rali_edge.scoring import Scorer, default_model_path

BATCH = BatchRange(1, 16, 16)  # the default build's profile


def int8_scores(fp32: Path, calibration: np.ndarray, views: list[np.ndarray], work: Path) -> np.ndarray:
    """Each image's score (the mean of its views') by the smoothed int8 form calibrated on `calibration`."""
    smoothed, int8 = work / "smoothed.onnx", work / "int8.onnx"
    engines_onnx.smooth_mlp_outputs(fp32, smoothed, calibration, BATCH)
    engines_onnx.quantize_int8(smoothed, int8, reduce_range=not engines_onnx.has_vnni(), mlp_out_fp32=False)
    session = engines_onnx.onnx_session(int8)

    def run(chunk):
        return session.run(None, {"pixels": np.ascontiguousarray(chunk)})[0]

    return np.array([BATCH.run_chunks(v, run, np.concatenate).mean() for v in views])


def main() -> None:
    model, manifest = load_model(default_model_path())
    preprocess = Preprocessor(PreprocessConfig.from_dict(manifest.preprocess))
    samples = [str(p) for p in fidelity_images(None)]
    views = [preprocess([p]).numpy() for p in samples]
    fp32_scores = np.array(Scorer(model, manifest).score(samples))
    sets = {"the bundled samples (the judged images; the builder once)": np.concatenate(views),
            "calibration_set (now)": engines_onnx.calibration_set(manifest.preprocess).pixels}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", "fp32", "score", BATCH.min, BATCH.max)
        for name, pixels in sets.items():
            diff = np.abs(int8_scores(fp32, pixels, views, Path(tmp)) - fp32_scores).max()
            print(f"calibrated on {name}: max |score diff| {diff:.4f} on {len(samples)} bundled samples (limit 0.02)")


if __name__ == "__main__":
    main()
