"""What the built-in model's views cost on whole photographs: images/s of `Scorer.score_files`
(decode included, as `rali-edge score` runs it) with the resized view (the old preprocessing) and
with the 3 x 3 native-resolution views, interleaved in one process, medians; and decode alone.

    python bench/views_cost.py PHOTO.jpg [...]    # makes a 1 MP and a ~12 MP JPEG of each
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from rali_edge.images import open_image
from rali_edge.model_file import load_model
from rali_edge.preprocess import PreprocessConfig
from rali_edge.scoring import Scorer, default_model_path


def jpegs(photos: list[Path], folder: Path, pixels: int) -> list[str]:
    out = []
    for p in photos:
        im = Image.open(p).convert("RGB")
        k = (pixels / (im.width * im.height)) ** 0.5
        if k < 1:
            im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.LANCZOS)
        path = folder / f"{p.stem}-{im.width}x{im.height}.jpg"
        im.save(path, quality=90)
        out.append(str(path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, manifest = load_model(default_model_path())
    resized = dict(manifest.preprocess, native_grid=0, resized_view=True)
    scorers = {"resized view (before)": Scorer(model, type(manifest)(**{**vars(manifest), "preprocess": resized})),
               "3x3 native views (now)": Scorer(model, manifest)}
    assert PreprocessConfig.from_dict(manifest.preprocess).view_count == 9
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, px in (("1 MP", 1_000_000), ("12 MP", 12_000_000)):
            files = jpegs(args.photos, Path(tmp), px)
            times = {name: [] for name in ["decode only", *scorers]}
            for _ in range(args.repeats):
                t = time.perf_counter()
                for f in files:
                    open_image(f)
                times["decode only"].append(time.perf_counter() - t)
                for name, scorer in scorers.items():
                    t = time.perf_counter()
                    list(scorer.score_files(files, batch_size=16))
                    times[name].append(time.perf_counter() - t)
            for name, ts in times.items():
                rows.append({"size": label, "path": name, "images": len(files),
                             "images_per_s": round(len(files) / statistics.median(ts), 2)})
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": 2, "rows": rows}, indent=1))
    print("| size | path | images/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['path']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()
