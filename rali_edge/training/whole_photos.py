"""Held-out evaluation through the user's path: whole photographs at their own sizes.

Every photograph here was never trained on: the three held-out photographs inside scikit-image
(300-600 pixels on the long side) and every photograph in Debian's two lomiri wallpaper packages
(1.5-20 MP, 1365-6028 pixels on the long side). Each is saved clean and with every distortion
at every level (`rali_edge.distortions`), whole, as JPEG quality 95 (what a camera or an editor
writes), and scored with `Scorer.score_files` at the default settings, exactly as
`rali-edge score` does. Nothing is cropped or picked by the evaluator.

Reported per distortion: the rank correlation of score against level within each photograph
(clean = level 0; 1 means every photograph's six versions come out in order), its mean over the
photographs, and the SRCC against the labels pooled over all photographs; and the SRCC over the
whole set. Labels are MS-SSIM against the original photograph mapped to 1..5 as in training,
computed on up to four 512-pixel windows at native resolution (MS-SSIM of a 13 MP photograph
takes half a minute; four windows give the same ranks within a photograph, where the
distortions are uniform).

    python -m rali_edge.training.whole_photos --model default              # build the set once, score, print
    python -m rali_edge.training.whole_photos --model DIR --update-report DIR   # and put it in DIR/TRAINING.md

The set (about 3 GB, 840 files) is built once into ~/.cache/rali-edge/whole-photos (--set moves it;
about 15 minutes on two cores); it is also a CSV dataset for `rali-edge eval MODEL SET/labels.csv`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from rali_edge.distortions import DISTORTIONS, LEVELS, MS_SSIM_MIN_SIZE, distort, ms_ssim, ms_ssim_to_score
from rali_edge.errors import RaliEdgeError
from rali_edge.evaluation import correlations, srcc
from rali_edge.scoring import load
from rali_edge.training import data, debian_photos

SET_VERSION = 1  # bump when the files or labels change, so that an old set is not reused
JPEG_QUALITY = 95
LABEL_WINDOW = 512
SEED = 0
# The built-in model's goals: the mean within-photo rank over these three, and every other one.
MAIN_DISTORTIONS = ("blur", "noise", "jpeg")
GOAL_MAIN, GOAL_OTHER = 0.85, 0.8


@dataclass(frozen=True)
class WholePhoto:
    name: str
    package: str  # "scikit-image" (rali_edge.training.data) or a Debian package (debian_photos)
    licence: str
    credit: str


_LOMIRI_16 = "lomiri-wallpapers-16.04"
PHOTOS = {
    p.name: p
    for p in (
        # The held-out training-set photographs: their licences are recorded once, in data.SOURCES.
        *[WholePhoto(n, "scikit-image", data.SOURCES[n].licence, data.SOURCES[n].credit)
          for n in ("chelsea", "astronaut", "coffee")],
        WholePhoto("Picture_1A", _LOMIRI_16, "CC-BY-4.0", 'Trevor "Freespace"'),
        WholePhoto("Picture_0B", _LOMIRI_16, "CC-BY-4.0", 'Trevor "Freespace"'),
        WholePhoto("friends", _LOMIRI_16, "CC-BY-4.0", "Aitzol Berasategi"),
        WholePhoto("aitzgorri", _LOMIRI_16, "CC-BY-4.0", "Aitzol Berasategi"),
        WholePhoto("life", _LOMIRI_16, "CC-BY-4.0", "Aitzol Berasategi"),
        WholePhoto("Wine", _LOMIRI_16, "CC-BY-4.0", "Jakub Mede"),
        WholePhoto("picosdeeuropa", _LOMIRI_16, "CC-BY-4.0", "Aitzol Berasategi"),
        WholePhoto("Dragonfly", _LOMIRI_16, "CC-BY-SA-4.0", '"Bolly"'),
        WholePhoto("sunset", _LOMIRI_16, "CC-BY-4.0", "Aitzol Berasategi"),
        WholePhoto("Bridge", _LOMIRI_16, "CC-BY-SA-4.0", "Sander Klootwijk"),
        WholePhoto("seeding", _LOMIRI_16, "CC0-1.0", "Clemens Engelhardt"),
        WholePhoto("Kleiber", "lomiri-wallpapers-20.04", "CC-BY-SA-3.0", "Lukas Baubkus"),
    )
}


def load_photo(name: str) -> np.ndarray:
    """The photograph at its own size, RGB uint8."""
    if PHOTOS[name].package == "scikit-image":
        return data.load_source(name)  # never shrunk: only Debian training photographs are
    with Image.open(debian_photos.photo_path(name)) as f:
        return np.asarray(f.convert("RGB"))


def default_set_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rali-edge" / "whole-photos" / f"v{SET_VERSION}"


# --- the set ---------------------------------------------------------------------------------
COLUMNS = ("path", "mos", "photo", "distortion", "level", "width", "height")


def label_windows(height: int, width: int, size: int = LABEL_WINDOW) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of the windows the label is measured on: the centres of the four
    quadrants, size x size, clamped inside the image; one window of the whole image when it is
    smaller than two windows a side."""
    if min(height, width) < 2 * size:
        return [(0, 0, height, width)]
    return [(min(max(cy - size // 2, 0), height - size), min(max(cx - size // 2, 0), width - size), size, size)
            for cy in (height // 4, 3 * height // 4) for cx in (width // 4, 3 * width // 4)]


def label(reference: np.ndarray, image: np.ndarray) -> float:
    """1..5 from the mean MS-SSIM of `image` against `reference` over label_windows."""
    values = [ms_ssim(reference[t:t + h, l:l + w], image[t:t + h, l:l + w])
              for t, l, h, w in label_windows(*reference.shape[:2])]
    return ms_ssim_to_score(float(np.mean(values)))


def _versions(kinds, levels):
    return [("clean", 0)] + [(kind, level) for kind in kinds for level in levels]


def _file_name(kind: str, level: int) -> str:
    return "clean.jpg" if kind == "clean" else f"{kind}-{level}.jpg"


def _build_photo(args) -> list[dict]:
    """Write one photograph's versions (skipping files already there) and return their rows."""
    out, index, name, load, kinds, levels, seed = args
    import torch

    torch.set_num_threads(1)  # one process per photograph
    photo = load(name)
    if min(photo.shape[:2]) < MS_SSIM_MIN_SIZE:
        raise RaliEdgeError(f"{name} is {photo.shape[1]}x{photo.shape[0]}: labels need {MS_SSIM_MIN_SIZE} pixels a side")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, level in _versions(kinds, levels):
        path = folder / _file_name(kind, level)
        if not path.exists():
            pixels = photo if kind == "clean" else distort(
                photo, kind, level, np.random.default_rng([seed, index, list(DISTORTIONS).index(kind), level]))
            part = path.with_name(path.name + ".part")
            Image.fromarray(pixels).save(part, format="JPEG", quality=JPEG_QUALITY)
            part.replace(path)  # a killed build leaves no half-written image behind
        with Image.open(path) as f:
            saved = np.asarray(f.convert("RGB"))
        rows.append({"path": f"{name}/{path.name}", "mos": round(label(photo, saved), 4), "photo": name,
                     "distortion": kind, "level": level, "width": photo.shape[1], "height": photo.shape[0]})
    return rows


def build_set(out: Path, photos: Iterable[str] | None = None, kinds: Iterable[str] = tuple(DISTORTIONS),
              levels: Iterable[int] = LEVELS, seed: int = SEED, workers: int = 2,
              load: Callable[[str], np.ndarray] = load_photo, log=print) -> Path:
    """Write every photograph clean and distorted into `out` and `out/labels.csv`; returns the
    CSV. Files already written are kept, so an interrupted build goes on where it stopped.
    `load` (name -> RGB uint8 array) runs in the worker processes, one photograph each."""
    out = Path(out)
    names, kinds, levels = list(photos or PHOTOS), list(kinds), list(levels)
    labels = out / "labels.csv"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, name, load, kinds, levels, seed) for i, name in enumerate(names)]
    rows, t0 = [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, photo_rows in enumerate(pool.map(_build_photo, jobs), start=1):
            rows += photo_rows
            log(f"{photo_rows[0]['photo']}: {len(photo_rows)} files ({done}/{len(jobs)}, {time.perf_counter() - t0:.0f} s)")
    part = labels.with_name(labels.name + ".part")
    with open(part, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    part.replace(labels)
    return labels


def read_set(labels: Path) -> list[dict]:
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(COLUMNS) - set(rows[0]):
        raise RaliEdgeError(f"{labels} is not a whole-photograph set (columns {', '.join(COLUMNS)}); rebuild it")
    for row in rows:
        row["mos"], row["level"] = float(row["mos"]), int(row["level"])
        row["file"] = str(labels.parent / row["path"])
    return rows


# --- metrics ---------------------------------------------------------------------------------
def within_photo_rank(rows: list[dict], scores: list[float], kind: str) -> dict[str, float]:
    """Photograph -> SRCC of score against minus the level over its clean version and its
    versions with `kind` (1: score falls with every level)."""
    by_photo: dict[str, list[tuple[int, float]]] = {}
    for row, score in zip(rows, scores):
        if row["distortion"] in ("clean", kind):
            by_photo.setdefault(row["photo"], []).append((row["level"], score))
    return {photo: srcc([-level for level, _ in pairs], [s for _, s in pairs])
            for photo, pairs in by_photo.items() if len(pairs) > 2}


# Sizes by the long side: web pictures, photographs of a few megapixels (screens, phones' reduced
# sizes), and those at a camera's full size; a model may rank one well and another badly.
SIZE_BANDS = ((0, 1000, "under 1000 px"), (1000, 4000, "1000-3999 px"), (4000, 10**9, "4000 px and over"))


def size_band(row: dict) -> str:
    long_side = max(int(row["width"]), int(row["height"]))
    return next(name for low, high, name in SIZE_BANDS if low <= long_side < high)


def summarize(rows: list[dict], scores: list[float]) -> dict:
    kinds = list(dict.fromkeys(r["distortion"] for r in rows if r["distortion"] != "clean"))
    overall = correlations(scores, [r["mos"] for r in rows])
    per_kind = {}
    for kind in kinds:
        ranks = within_photo_rank(rows, scores, kind)
        keep = [i for i, r in enumerate(rows) if r["distortion"] in ("clean", kind)]
        per_kind[kind] = {
            "within_photo_mean": round(float(np.mean(list(ranks.values()))), 4),
            "within_photo_min": round(float(min(ranks.values())), 4),
            "pooled_srcc": round(srcc([scores[i] for i in keep], [rows[i]["mos"] for i in keep]), 4),
            "within_photo": {p: round(v, 4) for p, v in ranks.items()},
            "within_photo_by_size": _mean_by_size(rows, ranks),
        }
    photos = list(dict.fromkeys(r["photo"] for r in rows))
    main = {k: per_kind[k]["within_photo_mean"] for k in MAIN_DISTORTIONS if k in per_kind}
    return {
        "images": len(rows),
        "photos": {p: next(f"{r['width']}x{r['height']}" for r in rows if r["photo"] == p) for p in photos},
        "srcc": round(overall.srcc, 4), "plcc": round(overall.plcc, 4), "krcc": round(overall.krcc, 4),
        "per_distortion": per_kind,
        "main_distortions": list(main),
        "main_mean": round(float(np.mean(list(main.values()))), 4) if main else None,
        "clean_scores": {r["photo"]: round(s, 4) for r, s in zip(rows, scores) if r["distortion"] == "clean"},
    }


def _mean_by_size(rows: list[dict], ranks: dict[str, float]) -> dict[str, float]:
    """Size band -> the mean within-photo rank of its photographs."""
    band = {r["photo"]: size_band(r) for r in rows}
    by_size: dict[str, list[float]] = {}
    for photo, value in ranks.items():
        by_size.setdefault(band[photo], []).append(value)
    return {name: round(float(np.mean(by_size[name])), 4) for _, _, name in SIZE_BANDS if name in by_size}


def evaluate(model: str | Path | None, labels: Path, batch_size: int = 16, workers: int = 2, log=print) -> dict:
    """Score the set with `rali_edge.load(model)` and `score_files` at the CLI's defaults."""
    rows = read_set(Path(labels))
    scorer = load(model)
    t0, scores = time.perf_counter(), []
    for result in scorer.score_files([r["file"] for r in rows], batch_size=batch_size, workers=workers):
        if result.error is not None:
            raise RaliEdgeError(f"{result.path}: {result.error}; rebuild the set (delete {Path(labels).parent})")
        scores.append(result.score)
        if len(scores) % 100 == 0:
            log(f"scored {len(scores)}/{len(rows)} ({time.perf_counter() - t0:.0f} s)")
    summary = summarize(rows, scores)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["model_sha256"] = scorer.model_sha256
    return summary


def report_lines(summary: dict) -> list[str]:
    """Markdown for TRAINING.md and the CLI."""
    pk = summary["per_distortion"]
    sizes = ", ".join(f"{p} {s}" for p, s in summary["photos"].items())
    lines = [
        f"{len(summary['photos'])} whole photographs never trained on, at their own sizes ({sizes}), each clean and with",
        f"every distortion at five levels ({summary['images']} JPEG files, quality {JPEG_QUALITY}), scored by `Scorer.score_files`",
        "at the default settings, as `rali-edge score` scores them (`python -m rali_edge.training.whole_photos`).",
        "Within-photo rank: the SRCC of score against level inside each photograph (clean = level 0), its mean and",
        "its worst photograph; pooled: SRCC against the MS-SSIM labels over every photograph.",
        "",
        "| distortion | within-photo rank (mean) | worst photograph | pooled SRCC |",
        "|---|---|---|---|",
        *[f"| {k} | {v['within_photo_mean']:.3f} | {v['within_photo_min']:.3f} | {v['pooled_srcc']:.3f} |" for k, v in pk.items()],
        "",
        f"Over the whole set: SRCC {summary['srcc']:.3f}, KRCC {summary['krcc']:.3f}, PLCC {summary['plcc']:.3f}."
        + (f" Mean within-photo rank over {', '.join(summary['main_distortions'])}: {summary['main_mean']:.3f} (goal {GOAL_MAIN})."
           if summary["main_distortions"] else ""),
    ]
    misses = [k for k, v in pk.items() if k not in MAIN_DISTORTIONS and v["within_photo_mean"] < GOAL_OTHER]
    if misses:
        lines.append(f"Below {GOAL_OTHER} within photographs: {', '.join(misses)}.")
    return lines


# --- the peers: BRISQUE and PIQE on the same files --------------------------------------------
PEERS = ("brisque", "piqe")  # lower is better on both: their scores are negated before ranking


def peer_scores(rows: list[dict], python: str, workers: int = 2, log=print,
                cache_dir: Path | None = None) -> dict[str, list[float]]:
    """{peer: one score per row, higher is better}: rali_edge/training/peers.py run in `python`,
    an environment with brisque and pypiqe (peers.py says how to make one). With `cache_dir` (the
    set's folder), scores are kept there per file, one file per peers environment, as each file is
    scored: the peers take seconds per large photograph, a run stopped halfway keeps what it did,
    and another model compared on the same set reuses them (they do not depend on the model)."""
    versions = _peer_versions(python)
    cache = cache_dir / f"peers-scores-{hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]}.jsonl" \
        if cache_dir is not None else None
    known = _read_peer_cache(cache)
    keys = {row["file"]: _peer_key(row) for row in rows}
    todo = [row["file"] for row in rows if keys[row["file"]] not in known]
    if todo:
        log(f"scoring {len(todo)} files with BRISQUE and PIQE in {python} ({workers} processes; minutes per 100 files)")
        for result in _run_peers(python, todo, workers):
            entry = {**result, "key": list(keys[result["path"]]), "versions": versions}
            known[keys[result["path"]]] = entry
            if cache is not None and _complete(entry):
                with open(cache, "a") as f:
                    f.write(json.dumps(entry) + "\n")
    elif rows:
        log(f"BRISQUE and PIQE scores of all {len(rows)} files read from {cache}")
    out = {}
    for peer in PEERS:
        values = [known.get(keys[row["file"]], {}).get(peer) for row in rows]
        failed = [row["file"] for row, v in zip(rows, values) if v is None]
        if failed:
            why = known.get(keys[failed[0]], {}).get(peer + "_error", "no answer from peers.py")
            raise RaliEdgeError(f"{peer} failed on {len(failed)} files, e.g. {failed[0]}: {why}")
        out[peer] = [-v for v in values]
    return out


def _peers_failed(python: str, problem: str) -> RaliEdgeError:
    return RaliEdgeError(f"the peers could not run in {python}: {problem} (make it as rali_edge/training/peers.py says)")


def _peer_versions(python: str) -> dict:
    """The peers environment's package versions (peers.py --versions): scores made by another
    environment are not reused."""
    import subprocess

    worker = Path(__file__).with_name("peers.py")
    try:
        done = subprocess.run([python, str(worker), "--versions"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _peers_failed(python, getattr(e, "strerror", None) or str(e)) from None
    try:
        versions = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        versions = None
    if not isinstance(versions, dict):
        raise _peers_failed(python, (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
    return versions


def _run_peers(python: str, files: list[str], workers: int):
    """peers.py's results, {"path", "brisque", "piqe"}, as each file is scored."""
    import subprocess
    import tempfile

    worker = Path(__file__).with_name("peers.py")
    with tempfile.TemporaryFile("w+") as errors:
        try:
            proc = subprocess.Popen([python, str(worker), "--workers", str(workers)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=errors, text=True)
        except OSError as e:
            raise _peers_failed(python, e.strerror or str(e)) from None
        with proc:
            proc.stdin.write("\n".join(files) + "\n")  # peers.py reads every path before it writes
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # something a library printed: that file, if any, has no score and is reported
        if proc.returncode:
            errors.seek(0)
            raise _peers_failed(python, (errors.read().strip().splitlines() or [f"exit status {proc.returncode}"])[-1])


def _peer_key(row: dict) -> tuple:
    """A file as the peers' cache knows it: its path inside the set, size and modification time
    (a rebuilt file is scored again; a set moved elsewhere keeps its scores)."""
    try:
        st = os.stat(row["file"])
    except OSError as e:
        raise RaliEdgeError(f"{row['file']}: {e.strerror}; rebuild the set") from None
    return (row["path"], st.st_size, st.st_mtime_ns)


def _complete(entry: dict) -> bool:
    return all(isinstance(entry.get(peer), (int, float)) for peer in PEERS)


def _read_peer_cache(cache: Path | None) -> dict:
    if cache is None or not cache.is_file():
        return {}
    known = {}
    for line in cache.read_text().splitlines():
        try:
            entry = json.loads(line)
            if _complete(entry):
                known[tuple(entry["key"])] = entry
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a killed run, or of another shape: that file is scored again
    return known


def comparison_lines(summaries: dict[str, dict]) -> list[str]:
    """Markdown: per distortion the within-photo rank and the pooled SRCC of each scorer, then the
    within-photo rank per size band; only the distortions every scorer was measured on."""
    names = list(summaries)
    kinds = [k for k in next(iter(summaries.values()))["per_distortion"]
             if all(k in s["per_distortion"] for s in summaries.values())]
    head = ["| distortion | " + " | ".join(f"{n}: within | {n}: pooled" for n in names) + " |",
            "|---|" + "---:|---:|" * len(names)]
    rows = [f"| {k} | " + " | ".join(f"{s['per_distortion'][k]['within_photo_mean']:.3f} | "
                                     f"{s['per_distortion'][k]['pooled_srcc']:.3f}" for s in summaries.values()) + " |"
            for k in kinds]
    bands = [name for _, _, name in SIZE_BANDS
             if any(name in s["per_distortion"][k]["within_photo_by_size"] for s in summaries.values() for k in kinds)]
    by_size = ["", "Within-photo rank by the photograph's long side:", "",
               "| distortion | size | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for k in kinds:
        for band in bands:
            by_size.append(f"| {k} | {band} | " + " | ".join(
                _cell(s["per_distortion"][k]["within_photo_by_size"].get(band)) for s in summaries.values()) + " |")
    return head + rows + by_size


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # "-": no photograph of that size


def credit_lines() -> list[str]:
    """The photographs' origins and licences, for TRAINING.md."""

    def origin(photo: WholePhoto) -> str:
        if photo.package == "scikit-image":
            return f"scikit-image `data.{photo.name}()`"
        return f"Debian {photo.package} {debian_photos.PACKAGES[photo.package].version}"

    return ["| photograph | from | licence | credit |", "|---|---|---|---|",
            *[f"| {p.name} | {origin(p)} | {p.licence} | {p.credit} |" for p in PHOTOS.values()]]


def evaluate_into(summary: dict, model_dir: Path, set_dir: Path | None = None, workers: int = 2, log=print) -> dict:
    """Build the set if it is missing, score it with the model at `model_dir`, and store the
    results in `summary` (a training.json) under "whole_photos"."""
    labels = (set_dir or default_set_dir()) / "labels.csv"
    if not labels.exists():
        log(f"building the whole-photograph set in {labels.parent} (once; about 15 minutes on two cores)")
        build_set(labels.parent, workers=workers, log=log)
    summary["whole_photos"] = evaluate(model_dir, labels, workers=workers, log=log)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model folder, or 'default' (the built-in model)")
    parser.add_argument("--set", type=Path, default=None, help=f"where the set is built and read (default {default_set_dir()})")
    parser.add_argument("--workers", type=int, default=2, help="processes building the set, threads decoding while scoring")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--update-report", type=Path, metavar="MODEL_DIR", default=None,
                        help="store the results in MODEL_DIR/training.json and rewrite MODEL_DIR/TRAINING.md")
    parser.add_argument("--peers", metavar="PYTHON", default=None,
                        help="also score the same files with BRISQUE and PIQE in PYTHON, an environment with brisque "
                             "and pypiqe (rali_edge/training/peers.py says how to make it), and print the comparison; "
                             "their scores are kept in the set for the next model compared")
    parser.add_argument("--peer-distortions", default=",".join(MAIN_DISTORTIONS), metavar="LIST",
                        help="the distortions the peers score, with the clean photographs (comma-separated, or 'all'; "
                             "default %(default)s: the peers take seconds per large photograph)")
    args = parser.parse_args(argv)
    folder = args.set or default_set_dir()
    peer_kinds = list(DISTORTIONS) if args.peer_distortions == "all" else args.peer_distortions.split(",")
    unknown = [k for k in peer_kinds if k not in DISTORTIONS]
    if unknown:
        parser.error(f"--peer-distortions: unknown {', '.join(unknown)}; choose among {', '.join(DISTORTIONS)}, or all")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    try:
        summary = evaluate_into({}, args.model, folder, args.workers, log)["whole_photos"]
    except RaliEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(summary)))
    if args.peers:
        rows = read_set(folder / "labels.csv")
        rows = [r for r in rows if r["distortion"] in ("clean", *peer_kinds)]
        try:
            scores = peer_scores(rows, args.peers, args.workers, log, cache_dir=folder)
        except RaliEdgeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 4
        summary["peers"] = {peer: summarize(rows, values) for peer, values in scores.items()}
        print("\nAgainst the classical peers on the same files (within: mean rank of score against level inside "
              "each photograph; pooled: SRCC against the labels over all photographs):\n")
        print("\n".join(comparison_lines({"rali-edge": summary, **{p.upper(): s for p, s in summary["peers"].items()}})))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.update_report:
        from rali_edge.training.default_model import write_report

        info = args.update_report / "training.json"
        training = json.loads(info.read_text())
        training["whole_photos"] = summary
        info.write_text(json.dumps(training, indent=1) + "\n")
        write_report(training, args.update_report / "TRAINING.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
