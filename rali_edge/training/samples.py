"""Write the bundled sample images (rali_edge/assets/samples/): whole held-out photographs
(never seen in training) at their own sizes (300-512 pixels on the short side), clean and with a
few distortions, as JPEG quality 85, plus LICENSES.md: the path users take, whole photographs
through `rali-edge score` (the default model looks at them through 4 x 4 native-resolution views).

    python -m rali_edge.training.samples --out rali_edge/assets/samples
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from rali_edge.distortions import distort
from rali_edge.training.data import HELDOUT_SOURCES, SOURCES, load_source

# (photograph, [(distortion, level), ...]): levels high enough to show at full-photo size.
SAMPLES = (
    ("chelsea", [("blur", 3), ("noise", 3), ("jpeg", 4), ("underexpose", 4)]),
    ("coffee", [("pixelate", 3), ("motion", 3), ("jpeg2000", 4), ("contrast", 4)]),
    ("astronaut", [("blur", 4), ("noise", 4), ("overexpose", 3), ("jpeg", 5)]),
)
JPEG_QUALITY = 85  # 95 doubled the files (the noisy ones compress least); 85 keeps them under 700 KB
SEED = 0


def make_sample_images() -> dict[str, bytes]:
    """File name -> JPEG bytes, the same on every run."""
    files = {}
    for name, distortions in SAMPLES:
        assert name in HELDOUT_SOURCES, f"{name} is a training image; samples must be held out"
        clean = load_source(name)
        versions = [("clean", clean)] + [
            (f"{kind}-{level}", distort(clean, kind, level, np.random.default_rng([SEED, i])))
            for i, (kind, level) in enumerate(distortions)
        ]
        for label, pixels in versions:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
            files[f"{name}_{label}.jpg"] = buf.getvalue()
    return files


def licences_text() -> str:
    lines = [
        "# Sample images: sources and licences",
        "",
        "Whole photographs shipped inside scikit-image, held out of the default model's training,",
        f"at its own size, distorted with `rali_edge.distortions` and saved as JPEG quality {JPEG_QUALITY}",
        "(`python -m rali_edge.training.samples`). The name says the distortion and its level (1..5).",
        "",
        "| files | photograph | licence | credit | origin |",
        "|---|---|---|---|---|",
    ]
    for name, _ in SAMPLES:
        s = SOURCES[name]
        lines.append(f"| `{name}_*.jpg` | scikit-image `data.{name}()` | {s.licence} | {s.credit} | {s.origin} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the bundled sample images.")
    parser.add_argument("--out", type=Path, default=Path("rali_edge/assets/samples"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for file, data in make_sample_images().items():
        (args.out / file).write_bytes(data)
        total += len(data)
    (args.out / "LICENSES.md").write_text(licences_text())
    print(f"wrote {len(make_sample_images())} images ({total / 1000:.0f} KB) and LICENSES.md to {args.out}")


if __name__ == "__main__":
    main()
