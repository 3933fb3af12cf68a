"""The classical no-reference metrics a user would pick instead of rali-edge's built-in model,
scored on files: BRISQUE (`brisque` 0.2.0, its SVM model in the wheel) and PIQE (`pypiqe`).

Run by `python -m rali_edge.training.whole_photos --peers PYTHON` in PYTHON, an environment of
its own (they are evaluation tools, never rali-edge's dependencies; brisque fails on numpy 2.4):

    python3 -m venv ~/peers
    ~/peers/bin/pip install brisque==0.2.0 libsvm-official pypiqe==1.2 'numpy<2.4' opencv-python-headless pillow

This file imports nothing of rali_edge: it reads file paths on stdin, one per line, and writes one
JSON object per line, {"path", "brisque", "piqe"}, both on their own scales where lower is better
(null where a metric failed on a file). --workers processes share the files. --versions prints
the versions of the packages that make the scores, so that scores kept from another environment
are not reused.
"""

import json
import sys
from concurrent.futures import ProcessPoolExecutor

_brisque = None


def _scores(path: str) -> dict:
    global _brisque
    import numpy as np
    from PIL import Image
    from pypiqe import piqe

    if _brisque is None:
        from brisque import BRISQUE

        _brisque = BRISQUE(url=False)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    out = {"path": path, "brisque": None, "piqe": None}
    try:
        out["brisque"] = float(_brisque.score(rgb))
    except Exception as e:  # noqa: BLE001 - a peer's failure is a missing number, said in the output
        out["brisque_error"] = f"{type(e).__name__}: {e}"
    try:
        out["piqe"] = float(piqe(np.asarray(Image.open(path).convert("L")))[0])
    except Exception as e:  # noqa: BLE001
        out["piqe_error"] = f"{type(e).__name__}: {e}"
    return out


def versions() -> dict:
    from importlib import metadata

    found = {}
    for package in ("brisque", "pypiqe", "libsvm-official", "numpy", "opencv-python-headless", "opencv-python", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def main() -> int:
    if "--versions" in sys.argv:
        print(json.dumps(versions()))
        return 0
    workers = int(sys.argv[sys.argv.index("--workers") + 1]) if "--workers" in sys.argv else 1
    paths = [line.strip() for line in sys.stdin if line.strip()]
    with ProcessPoolExecutor(workers) as pool:
        for result in pool.map(_scores, paths, chunksize=4):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
