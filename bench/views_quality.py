"""What fewer views would cost the built-in model in accuracy: the whole-photograph set
(`rali_edge.training.whole_photos`, built once) scored with native grids of 1 x 1 to 4 x 4
views (each file decoded once), and view schemes that give small photographs fewer views
(the only way to make the views cost no more than decoding at 1 MP, see views_cost.py), judged
by the same summary as TRAINING.md's table.

    python bench/views_quality.py            # prints the table; about 2 minutes on two cores
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from rali_edge.images import open_image
from rali_edge.model_file import load_model
from rali_edge.preprocess import Preprocessor, PreprocessConfig
from rali_edge.scoring import Scorer, default_model_path
from rali_edge.training.whole_photos import default_set_dir, read_set, summarize

GRIDS = (1, 2, 3, 4)


def adaptive(pixels_per_view: float, smallest: int, below: float = 0.0):
    """g x g views with g = sqrt(pixels / pixels_per_view) rounded, within smallest..4; photographs
    under `below` pixels keep 4 x 4."""
    return lambda px: 4 if px < below else max(smallest, min(4, round(math.sqrt(px / pixels_per_view))))


SCHEMES = {
    "4 x 4 everywhere (shipped)": lambda px: 4,
    "3 x 3 everywhere": lambda px: 3,
    "2 x 2 everywhere": lambda px: 2,
    "by size, 1 view per 250k pixels, 2 x 2 at least": adaptive(250e3, 2),
    "by size, 1 view per 250k pixels, 1 x 1 at least": adaptive(250e3, 1),
    "4 x 4 under 0.6 MP, else by size (2 x 2 at ~1 MP)": adaptive(250e3, 2, below=6e5),
}


def grid_scores(rows: list[dict]) -> dict[int, list[float]]:
    model, manifest = load_model(default_model_path())
    scorer = Scorer(model, manifest)
    grids = {g: Preprocessor(PreprocessConfig.from_dict(dict(manifest.preprocess, native_grid=g))) for g in GRIDS}
    out: dict[int, list[float]] = {g: [] for g in GRIDS}
    with ThreadPoolExecutor(2) as pool:  # two files decoding ahead, no more: the set is 3 GB of pixels
        ahead = deque(pool.submit(open_image, r["file"]) for r in rows[:2])
        for i in range(len(rows)):
            img = ahead.popleft().result()
            if i + 2 < len(rows):
                ahead.append(pool.submit(open_image, rows[i + 2]["file"]))
            for g, pre in grids.items():
                out[g].append(float(scorer.score_views(pre.views_tensor(img)).mean()))
    return out


def main() -> None:
    torch.set_num_threads(2)
    rows = read_set(default_set_dir() / "labels.csv")
    start = time.perf_counter()
    scores = grid_scores(rows)
    kinds = None
    lines = []
    for name, rule in SCHEMES.items():
        chosen = [scores[rule(int(r["width"]) * int(r["height"]))][i] for i, r in enumerate(rows)]
        summary = summarize(rows, chosen)
        kinds = kinds or list(summary["per_distortion"])
        lines.append(f"| {name} | {summary['main_mean']:.3f} | {summary['srcc']:.3f} | "
                     + " | ".join(f"{summary['per_distortion'][k]['within_photo_mean']:.2f}" for k in kinds) + " |")
    print(f"{len(rows)} files, {time.perf_counter() - start:.0f} s\n")
    print("| views | mean within-photo rank, blur/noise/jpeg (goal 0.85) | SRCC, whole set | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
