"""Accuracy on labelled images: dataset readers, the usual IQA correlations, and `evaluate`.

Datasets come in two formats:
- the DeQA-Score "metas" JSON that RALI's evaluation reads: a list of objects with `image` (a path
  relative to the root) and `gt_score`, optionally `gt_score_norm` (the MOS mapped to 1..5);
- a CSV with a header and the columns `path` and `mos`.

Metrics (numpy only, so `rali-edge eval` needs no scipy): SRCC (Spearman, average ranks for
ties), KRCC (Kendall's tau-b), PLCC (Pearson) on the raw scores, and PLCC after the 4-parameter
logistic fit of IQA papers, (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2, mapping predictions
to the MOS scale (VQEG; DeQA-Score and RALI report PLCC this way).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rali_edge.errors import DatasetError
from rali_edge.outputs import Field

# The rows of `rali-edge eval --predictions` (rali_edge.outputs).
PREDICTIONS = (Field("path"), Field("mos", float), Field("score", float, 6))


@dataclass(frozen=True)
class LabelledImage:
    path: str  # as resolved against the root: what gets opened
    mos: float


# --- datasets ------------------------------------------------------------------------------
LABELS = ("auto", "gt_score", "gt_score_norm")  # which MOS of a DeQA-Score metas file (read_dataset)


def read_dataset(path: str | Path, root: str | Path | None = None, label: str = "auto") -> list[LabelledImage]:
    """Read a metas .json or a path,mos .csv. Relative image paths are resolved against `root`
    (default: the dataset file's folder). For metas, `label` picks `gt_score`, `gt_score_norm`,
    or "auto": gt_score_norm when every entry has it (the 1..5 scale of our scores), else gt_score."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    base = Path(root) if root is not None else path.parent
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _read_metas(path, label)
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        raise DatasetError(f"{path}: unknown dataset format; expected a metas .json or a .csv with path,mos columns")
    if not rows:
        raise DatasetError(f"{path}: no labelled images in the file")
    return [LabelledImage(str(p if Path(p).is_absolute() else base / p), mos) for p, mos in rows]


def _number(value, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DatasetError(f"{where}: score {value!r} is not finite")
    return x


def _read_metas(path: Path, label: str) -> list[tuple[str, float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise DatasetError(f"{path}: expected a JSON list of objects with `image` and `gt_score`")
    if label not in LABELS:
        raise DatasetError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")
    if label == "auto":
        label = "gt_score_norm" if data and all("gt_score_norm" in d for d in data) else "gt_score"
    rows = []
    for i, d in enumerate(data):
        where = f"{path}: entry {i}"
        if "image" not in d or label not in d:
            raise DatasetError(f"{where}: needs `image` and `{label}` (has {', '.join(sorted(d)) or 'nothing'})")
        rows.append((str(d["image"]), _number(d[label], where)))
    return rows


def _read_csv(path: Path) -> list[tuple[str, float]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in columns or "mos" not in columns:
                raise DatasetError(f"{path}: needs a header with `path` and `mos` columns (found: {', '.join(columns) or 'none'})")
            rows = []
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): v for k, v in row.items()}
                if not (row.get("path") or "").strip():
                    raise DatasetError(f"{path}: line {line}: empty path")
                rows.append((row["path"].strip(), _number(row["mos"], f"{path}: line {line}")))
            return rows
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None


# --- metrics -------------------------------------------------------------------------------
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the average of their ranks (scipy's method="average")."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values, and the average rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def plcc(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else float("nan")


def srcc(x, y) -> float:
    return plcc(rankdata(x), rankdata(y))


def _tie_pairs(v: np.ndarray) -> int:
    _, counts = np.unique(v, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def krcc(x, y, chunk: int = 2048) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)).
    O(n^2) in chunks of rows: a few seconds for 20,000 images, little memory."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    n0 = n * (n - 1) // 2
    s = 0  # concordant - discordant: pairs tied in x or y give sign 0
    for start in range(0, n, chunk):
        xi, yi = x[start : start + chunk, None], y[start : start + chunk, None]
        prod = np.sign(xi - x[None, :]) * np.sign(yi - y[None, :])
        s += int(prod.sum())  # every unordered pair counted twice over all chunks
    denom = math.sqrt((n0 - _tie_pairs(x)) * (n0 - _tie_pairs(y)))
    return (s / 2) / denom if denom > 0 else float("nan")


def logistic4(x, b1, b2, b3, b4):
    """The 4-parameter logistic of IQA papers; |b4| keeps the slope's sign in b1 - b2."""
    u = (np.asarray(x, dtype=np.float64) - b3) / abs(b4)
    return (b1 - b2) * _sigmoid(u) + b2


def _sigmoid(u):
    return 0.5 * (1.0 + np.tanh(0.5 * u))  # = 1 / (1 + exp(-u)), without overflow


@dataclass
class LogisticFit:
    params: tuple[float, float, float, float]
    plcc: float
    converged: bool


def fit_logistic(x, y, max_iter: int = 500, tol: float = 1e-12) -> LogisticFit:
    """Least-squares fit of logistic4 by Levenberg-Marquardt (what scipy's curve_fit runs),
    starting where IQA code starts: b1 = max(y), b2 = min(y), b3 = mean(x), b4 = std(x); the
    two asymptotes swap when x and y are anti-correlated (a falling curve), else the fit would
    start on the wrong side and stall there."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    high, low = (y.max(), y.min()) if not plcc(x, y) < 0 else (y.min(), y.max())
    p = np.array([high, low, x.mean(), x.std() or 1.0])

    def residual(q):
        return logistic4(x, *q) - y

    def jacobian(q):
        b1, b2, b3, b4 = q
        s = abs(b4)
        u = (x - b3) / s
        sig = _sigmoid(u)
        dsig = (b1 - b2) * sig * (1 - sig)
        return np.stack([sig, 1 - sig, -dsig / s, -dsig * u / s * np.sign(b4)], axis=1)

    r = residual(p)
    cost = float(r @ r)
    lam, converged = 1e-3, False
    for _ in range(max_iter):
        J = jacobian(p)
        A, g = J.T @ J, J.T @ r
        # Marquardt's scaling: damping proportional to the diagonal (floored so a flat
        # direction cannot make the system singular).
        damp = lam * np.maximum(np.diag(A), 1e-12)
        try:
            step = np.linalg.solve(A + np.diag(damp), -g)
        except np.linalg.LinAlgError:
            break
        trial = p + step
        r_trial = residual(trial)
        cost_trial = float(r_trial @ r_trial)
        if np.isfinite(cost_trial) and cost_trial <= cost:
            settled = cost - cost_trial <= tol * max(cost, 1e-300)
            p, r, cost = trial, r_trial, cost_trial
            lam = max(lam / 3, 1e-12)
            if settled:
                converged = True
                break
        else:
            lam *= 4
            if lam > 1e12:
                converged = True  # no step lowers the cost any more: a minimum (to precision)
                break
    fitted = logistic4(x, *p)
    return LogisticFit(tuple(float(v) for v in p), plcc(fitted, y), converged)


@dataclass
class Metrics:
    srcc: float
    krcc: float
    plcc: float
    plcc_fitted: float
    logistic: tuple | None = None


def correlations(pred, mos) -> Metrics:
    """SRCC, KRCC, PLCC and fitted PLCC of predictions against MOS (NaN where undefined:
    fewer than 2 images, or constant predictions/labels; the fit needs at least 4 images)."""
    pred, mos = np.asarray(pred, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    nan = float("nan")
    if len(pred) < 2:
        return Metrics(nan, nan, nan, nan)
    fit = fit_logistic(pred, mos) if len(pred) >= 4 and np.ptp(pred) > 0 and np.ptp(mos) > 0 else None
    return Metrics(
        srcc(pred, mos), krcc(pred, mos), plcc(pred, mos),
        fit.plcc if fit else nan, fit.params if fit else None,
    )


# --- evaluate ------------------------------------------------------------------------------
@dataclass
class EvalReport:
    dataset: str
    model: str
    backend: str
    count: int  # labelled images in the dataset
    scored: int
    failures: list[dict] = field(default_factory=list)  # {"path", "error"}
    metrics: Metrics | None = None
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)  # {"path", "mos", "score"}
    interrupted: bool = False  # stopped by Ctrl-C: the metrics are over the images scored before

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        d["images_per_second"] = self.scored / self.seconds if self.seconds > 0 else None
        if self.metrics is not None:  # NaN is not JSON: undefined metrics become null
            d["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d["metrics"].items()}
        return d

    def table(self) -> str:
        m = self.metrics

        def fmt(v):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

        lines = [
            f"dataset      {self.dataset}",
            f"model        {self.model} ({self.backend})",
            f"images       {self.count} labelled, {self.scored} scored, {len(self.failures)} failed"
            + (f", {self.count - self.scored - len(self.failures)} not reached (interrupted)" if self.interrupted else ""),
            f"SRCC         {fmt(m.srcc if m else None)}",
            f"KRCC         {fmt(m.krcc if m else None)}",
            f"PLCC         {fmt(m.plcc if m else None)}   (no fit)",
            f"PLCC fitted  {fmt(m.plcc_fitted if m else None)}   (4-parameter logistic)",
            f"time         {self.seconds:.2f} s ({self.scored / max(self.seconds, 1e-9):.1f} images/s)",
        ]
        if self.failures:
            lines.append("failed:")
            lines += [f"  {f['path']}: {f['error']}" for f in self.failures]
        return "\n".join(lines) + "\n"


def evaluate(
    scorer,
    dataset: list[LabelledImage],
    batch_size: int = 16,
    name: str = "",
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Score every image of `dataset` with `scorer` (a rali_edge Scorer) and correlate with the
    labels. Images that cannot be read are listed in `failures`; the rest are still measured.
    Ctrl-C (KeyboardInterrupt) ends the scoring: the report is then over the images scored before
    it, marked `interrupted`."""
    mos_by_index = [item.mos for item in dataset]
    start = time.perf_counter()
    predictions, failures = [], []

    def report(interrupted: bool = False) -> EvalReport:
        metrics = correlations([p["score"] for p in predictions], [p["mos"] for p in predictions])
        return EvalReport(
            dataset=name, model=scorer.manifest.name, backend=f"{scorer.backend}, {scorer.dtype_name}",
            count=len(dataset), scored=len(predictions), failures=failures, metrics=metrics,
            seconds=time.perf_counter() - start, predictions=predictions, interrupted=interrupted,
        )

    try:
        for i, result in enumerate(scorer.score_files([item.path for item in dataset], batch_size=batch_size)):
            if result.error is not None:
                failures.append({"path": result.path, "error": result.error})
            else:
                predictions.append({"path": result.path, "mos": mos_by_index[i], "score": float(result.score)})
            if progress:
                progress(1)
    except KeyboardInterrupt:
        return report(interrupted=True)
    return report()


__all__ = [
    "DatasetError", "LabelledImage", "read_dataset", "rankdata", "srcc", "krcc", "plcc",
    "logistic4", "fit_logistic", "correlations", "Metrics", "EvalReport", "evaluate",
]
