"""What other views would do to the built-in model's accuracy: the whole-photograph set
(`rali_edge.training.whole_photos`, built once) scored with native grids of 1 x 1 to 4 x 4
views and 8 x 8 (each file decoded once). Schemes: fewer views for small photographs (the only
way to make the views cost no more than decoding at 1 MP, see views_cost.py), and more views, or
the most textured of 64 (where blur and JPEG show), pooled into the score. Judged by the same
summary as TRAINING.md's table and the comparison with BRISQUE and PIQE.

    python bench/views_quality.py [--model DIR]    # prints the tables; about 4 minutes on two cores
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from rali_edge.images import open_image
from rali_edge.model_file import load_model
from rali_edge.preprocess import Preprocessor, PreprocessConfig
from rali_edge.scoring import Scorer, default_model_path
from rali_edge.training.whole_photos import MAIN_DISTORTIONS, default_set_dir, read_set, size_band, summarize

GRIDS = (1, 2, 3, 4, 8)
MID = "1000-3999 px"  # the size band where the shipped model ranks blur and JPEG worst


def adaptive(pixels_per_view: float, smallest: int, below: float = 0.0):
    """g x g views with g = sqrt(pixels / pixels_per_view) rounded, within smallest..4; photographs
    under `below` pixels keep 4 x 4."""
    return lambda px: 4 if px < below else max(smallest, min(4, round(math.sqrt(px / pixels_per_view))))


def grid(g: int):
    """The mean of a g x g grid's views."""
    return lambda px, views: float(np.mean(views[g][0]))


def by_size(rule):
    """A grid chosen by the photograph's pixel count."""
    return lambda px, views: float(np.mean(views[rule(px)][0]))


def most_textured(n: int):
    """The mean of the n views of the 8 x 8 grid with the most detail (mean |Laplacian|)."""
    return lambda px, views: float(np.mean(views[8][0][np.argsort(views[8][1])[-n:]]))


def quantile(q: float):
    """A low quantile of the 8 x 8 grid's view scores: the photograph as bad as its worse views."""
    return lambda px, views: float(np.percentile(views[8][0], q))


SCHEMES = {
    "4 x 4 everywhere (shipped)": grid(4),
    "3 x 3 everywhere": grid(3),
    "2 x 2 everywhere": grid(2),
    "by size, 1 view per 250k pixels, 2 x 2 at least": by_size(adaptive(250e3, 2)),
    "by size, 1 view per 250k pixels, 1 x 1 at least": by_size(adaptive(250e3, 1)),
    "4 x 4 under 0.6 MP, else by size (2 x 2 at ~1 MP)": by_size(adaptive(250e3, 2, below=6e5)),
    "8 x 8 everywhere (4x the views)": grid(8),
    "the 16 most textured of 8 x 8": most_textured(16),
    "the 8 most textured of 8 x 8": most_textured(8),
    "the 4 most textured of 8 x 8": most_textured(4),
    "8 x 8, the lowest quarter's edge (25th percentile)": quantile(25),
}


def texture(views_hwc: np.ndarray) -> np.ndarray:
    """Mean |Laplacian| of each view's luminance: how much fine detail it has."""
    y = views_hwc.astype(np.float32).mean(-1)
    lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    return np.abs(lap).mean((1, 2))


def grid_scores(rows: list[dict], model_dir) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per file: grid -> (its views' scores, their texture)."""
    model, manifest = load_model(model_dir)
    scorer = Scorer(model, manifest)
    grids = {g: Preprocessor(PreprocessConfig.from_dict(dict(manifest.preprocess, native_grid=g))) for g in GRIDS}
    out = []
    with ThreadPoolExecutor(2) as pool:  # two files decoding ahead, no more: the set is 3 GB of pixels
        ahead = deque(pool.submit(open_image, r["file"]) for r in rows[:2])
        for i in range(len(rows)):
            img = ahead.popleft().result()
            if i + 2 < len(rows):
                ahead.append(pool.submit(open_image, rows[i + 2]["file"]))
            views = {}
            for g, pre in grids.items():
                pixels = pre.views_uint8(img)
                views[g] = (scorer.score_views(torch.from_numpy(pre.normalize(pixels))).float().numpy(), texture(pixels))
            out.append(views)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(default_model_path()), help="a model folder (default: the built-in model)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = read_set(default_set_dir() / "labels.csv")
    start = time.perf_counter()
    views = grid_scores(rows, args.model)
    kinds, lines, versus = None, [], []
    for name, rule in SCHEMES.items():
        chosen = [rule(int(r["width"]) * int(r["height"]), v) for r, v in zip(rows, views)]
        summary = summarize(rows, chosen)
        pk = summary["per_distortion"]
        kinds = kinds or list(pk)
        lines.append(f"| {name} | {summary['main_mean']:.3f} | {summary['srcc']:.3f} | "
                     + " | ".join(f"{pk[k]['within_photo_mean']:.2f}" for k in kinds) + " |")
        versus.append(f"| {name} | " + " | ".join(
            f"{pk[k]['within_photo_mean']:.3f} / {pk[k]['pooled_srcc']:.3f} / {pk[k]['within_photo_by_size'].get(MID, float('nan')):.3f}"
            for k in MAIN_DISTORTIONS) + " |")
    print(f"{args.model}: {len(rows)} files, {time.perf_counter() - start:.0f} s\n")
    print("| views | mean within-photo rank, blur/noise/jpeg (goal 0.85) | SRCC, whole set | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    print("\n".join(lines))
    print(f"\nWithin-photo rank / pooled SRCC / within-photo rank at {MID}, as whole_photos --peers compares them:\n")
    print("| views | " + " | ".join(MAIN_DISTORTIONS) + " |")
    print("|---|" + "---|" * len(MAIN_DISTORTIONS))
    print("\n".join(versus))


if __name__ == "__main__":
    main()
