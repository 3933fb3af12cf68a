"""What the built-in model's views cost on whole photographs: images/s of `Scorer.score_files`
(decode included, as `rali-edge score` runs it) with the resized view (the old preprocessing) and
with the 4 x 4 native-resolution views it uses (in eager PyTorch fp32, in calls of at most
CPU_TOKENS_PER_CALL tokens and, as before, a batch's views in one call; on the default path and in
int8; and 3 x 3, its views before, and 2 x 2), interleaved in one
process, medians; and decode alone, in the same two threads that score_files decodes in. What the
views cost per image is the scoring time less the decoding time.

    python bench/views_cost.py PHOTO.jpg [...]    # makes a 1 MP and a ~12 MP JPEG of each
    python bench/views_cost.py --also DIR PHOTO.jpg [...]   # and another model folder beside it
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    parser.add_argument("--also", type=Path, action="append", default=[], metavar="MODEL_DIR",
                        help="another model folder (e.g. a retrained candidate), timed beside the built-in model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, manifest = load_model(default_model_path())
    def views(**preprocess):
        return Scorer(model, type(manifest)(**{**vars(manifest), "preprocess": dict(manifest.preprocess, **preprocess)}))

    import rali_edge

    # The default path (`rali_edge.load("default")`: backend auto, its engine built on first use
    # into the engine cache) and int8; the rest eager PyTorch fp32, the views compared.
    auto = rali_edge.load("default")
    int8 = rali_edge.load("default", dtype="int8")
    whole_batches = Scorer(model, manifest)
    whole_batches.encoder.rows_per_call = None  # as the scorer once did: a batch's views in one call
    scorers = {"resized view (the built-in model's former preprocessing)": views(native_grid=0, resized_view=True),
               "4x4 native views (now, the built-in model), torch fp32": Scorer(model, manifest),
               "4x4 native views, torch fp32, a batch's views in one call (before)": whole_batches,
               f"4x4 native views, default path ({auto.backend} {auto.dtype_name})": auto,
               f"4x4 native views, --dtype int8 ({int8.backend} {int8.dtype_name})": int8,
               **{f"{d.name} (--also), its views, torch fp32": Scorer(*load_model(d)) for d in args.also},
               "3x3 native views": views(native_grid=3),
               "2x2 native views": views(native_grid=2)}
    assert PreprocessConfig.from_dict(manifest.preprocess).view_count == 16
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, px in (("1 MP", 1_000_000), ("12 MP", 12_000_000)):
            files = jpegs(args.photos, Path(tmp), px)
            times = {name: [] for name in ["decode only", *scorers]}
            for _ in range(args.repeats):
                t = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:  # as score_files decodes
                    list(pool.map(open_image, files))
                times["decode only"].append(time.perf_counter() - t)
                for name, scorer in scorers.items():
                    t = time.perf_counter()
                    list(scorer.score_files(files, batch_size=16))
                    times[name].append(time.perf_counter() - t)
            decode = statistics.median(times["decode only"]) / len(files)
            for name, ts in times.items():
                per_image = statistics.median(ts) / len(files)
                rows.append({"size": label, "path": name, "images": len(files),
                             "images_per_s": round(1 / per_image, 2), "ms_per_image": round(per_image * 1e3, 2),
                             "beyond_decode_ms": None if name == "decode only" else round((per_image - decode) * 1e3, 2),
                             "decode_ms": round(decode * 1e3, 2)})
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": 2, "rows": rows}, indent=1))
    print("| size | path | images/s | ms per image | beyond decoding, ms (bar: <= decoding) |\n|---|---|---|---|---|")
    for r in rows:
        extra = "" if r["beyond_decode_ms"] is None else f"{r['beyond_decode_ms']} (decoding {r['decode_ms']})"
        print(f"| {r['size']} | {r['path']} | {r['images_per_s']} | {r['ms_per_image']} | {extra} |")


if __name__ == "__main__":
    main()
