"""Fit a RALI prototype head to labelled images, with the recipe of the paper (arXiv 2510.11369):

1. embed the images with the CLIP encoder (projected embeddings, as `get_image_features`);
2. standardise each dimension and project on the first P principal components;
3. split the samples into equal-width score buckets and run k-means inside each bucket, on the
   L2-normalised projections (the head compares directions: cosine similarity);
4. the centroids are the prototypes, the mean score of each cluster its prototype score;
5. fine-tune prototypes and scores (and optionally the temperature) with an MSE loss.

The paper fine-tunes for a fixed number of epochs. With `validation_folds` = K >= 2 the epoch
count is chosen instead: the whole recipe runs K times, each time on all but one fold of the
samples (folds of `groups`, such as source photographs, when given), and the epoch count with
the lowest mean MSE on the left-out folds is used for the final fit on all samples. Why: the
fine-tune keeps lowering the training MSE long after it stops generalising (on the built-in
model's training photographs, the MSE on left-out photographs is lowest after about 10 epochs
and 23% higher after 300).

The prototype count is shared among the non-empty buckets in proportion to their sizes, at least
one each (the paper: 240 buckets, 250 prototypes, P = 512 on KonIQ). Everything is seeded and runs
on the CPU in float64/float32, so a seed gives the same head every time.

Embeddings are the slow part, so `embed_dataset` caches them in an .npz keyed by the model's
weights sha256 and the sha256 of every image file.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rali_edge.errors import ImageError, RaliEdgeError
from rali_edge.head import LOGIT_SCALE_MIN, PrototypeHead

PCA_SCALE_FLOOR = 1e-10  # as the published code: smaller standard deviations are set to 1
CACHE_VERSION = 1


@dataclass
class HeadRecipe:
    pca_dim: int = 512
    prototypes: int = 250
    buckets: int = 240
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 1024
    logit_scale: float = 1 / 0.07  # the published default temperature, tau = 0.07
    learn_temperature: bool = False
    kmeans_iters: int = 50
    seed: int = 0
    validation_folds: int = 0  # 0: fine-tune for `epochs`; K >= 2: K-fold validation picks <= `epochs` (module doc)


@dataclass
class FitReport:
    samples: int
    pca_dim: int
    prototypes: int
    buckets_used: int
    mse_before: float  # of the k-means head, before fine-tuning
    mse_after: float
    logit_scale: float
    notes: list[str] = field(default_factory=list)
    epochs: int = 0  # fine-tuning epochs of the final fit
    # With validation_folds: folds, whether they were groups, and the mean left-out MSE per epoch
    # count (index 0: the k-means head before fine-tuning).
    validation: dict | None = None


# --- the recipe on embeddings --------------------------------------------------------------
def fit_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise, then PCA: (mean [E], scale [E], components [P, E]) in float64.
    Signs are fixed as scikit-learn's svd_flip does (largest |loading| positive per component)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < PCA_SCALE_FLOOR] = 1.0
    z = (x - mean) / scale
    _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    components = vt[:dim]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return mean, scale, components * signs[:, None]


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (centroids [k, d], labels [n]). k <= len(x)."""
    n = len(x)
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(n)]
    d2 = ((x - centroids[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = d2.sum()
        i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centroids[j] = x[i]
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1))
    labels = np.full(n, -1)
    for _ in range(iters):
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, without an [n, k, d] intermediate
        dist = (x * x).sum(axis=1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(axis=1)[None]
        new = dist.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centroids[j] = members.mean(axis=0)
            else:  # an empty cluster restarts at the point farthest from its centroid
                far = dist[np.arange(n), labels].argmax()
                centroids[j], labels[far] = x[far], j
    return centroids, labels


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Share `total` prototypes among buckets in proportion to `counts`: at least one per
    non-empty bucket, never more than its samples (largest remainders first, ties to the lower bucket)."""
    counts = np.asarray(counts)
    alloc = (counts > 0).astype(int)
    total = min(max(total, int(alloc.sum())), int(counts.sum()))
    while alloc.sum() < total:
        want = total * counts / counts.sum() - alloc
        want[alloc >= counts] = -np.inf
        alloc[int(np.argmax(want))] += 1
    return alloc


def bucket_prototypes(feats: np.ndarray, scores: np.ndarray, recipe: HeadRecipe, rng: np.random.Generator):
    """k-means inside equal-width score buckets: (prototypes [K, P], proto_scores [K], buckets used)."""
    lo, hi = float(scores.min()), float(scores.max())
    width = (hi - lo) / recipe.buckets or 1.0
    bucket = np.clip(((scores - lo) / width).astype(int), 0, recipe.buckets - 1)
    counts = np.bincount(bucket, minlength=recipe.buckets)
    alloc = allocate(counts, recipe.prototypes)
    protos, proto_scores = [], []
    for b in np.flatnonzero(alloc):
        idx = np.flatnonzero(bucket == b)
        centroids, labels = kmeans(feats[idx], int(alloc[b]), rng, recipe.kmeans_iters)
        for j in range(len(centroids)):
            members = labels == j
            protos.append(centroids[j])
            proto_scores.append(scores[idx][members].mean() if members.any() else scores[idx].mean())
    return np.stack(protos), np.asarray(proto_scores), int((alloc > 0).sum())


def fit_prototype_head(embeddings, scores, recipe: HeadRecipe = HeadRecipe(),
                       log: Callable[[str], None] | None = None, groups=None):
    """The recipe (module docstring) on precomputed embeddings [N, E] and scores [N]:
    returns (PrototypeHead, FitReport). `groups` [N] (optional) keeps samples that belong together
    (crops of one photograph) in the same validation fold."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise RaliEdgeError(f"fit-head: need embeddings [N, E] and N scores, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(y) == 0:
        raise RaliEdgeError("fit-head: need at least 2 images with different scores")
    validation, epochs = None, recipe.epochs
    if recipe.validation_folds >= 2:
        fold = validation_folds(len(x), recipe.validation_folds, recipe.seed, groups)
        curves = []
        for k in range(recipe.validation_folds):
            train, held = fold != k, fold == k
            if np.ptp(y[train]) == 0:
                raise RaliEdgeError(f"fit-head: validation fold {k + 1} leaves only one score value to fit; "
                                    "use fewer --validation-folds or more varied images")
            curves.append(_fit(x[train], y[train], recipe, recipe.epochs, held=(x[held], y[held]))[2])
        curve = np.mean(curves, axis=0)
        epochs = int(np.argmin(curve))
        validation = {"folds": recipe.validation_folds, "grouped": groups is not None, "epochs_chosen": epochs,
                      "mse_per_epoch": [round(float(v), 5) for v in curve]}
        if log:
            log(f"{recipe.validation_folds}-fold validation: left-out MSE {curve[0]:.4f} before fine-tuning, "
                f"{curve[epochs]:.4f} after {epochs} epochs (lowest), {curve[-1]:.4f} after {recipe.epochs}")
    head, report, _ = _fit(x, y, recipe, epochs, log=log)
    report.validation = validation
    return head, report


def validation_folds(n: int, folds: int, seed: int, groups=None) -> np.ndarray:
    """Fold index [n] of each sample: whole groups go to one fold (groups shuffled with `seed`,
    then dealt round-robin), or, without groups, single samples."""
    rng = np.random.default_rng([seed, 1])
    if groups is None:
        fold = np.empty(n, dtype=int)
        fold[rng.permutation(n)] = np.arange(n) % folds
        return fold
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if len(unique) < folds:
        raise RaliEdgeError(f"fit-head: {folds} validation folds need at least {folds} groups, got {len(unique)}")
    group_fold = np.empty(len(unique), dtype=int)
    group_fold[rng.permutation(len(unique))] = np.arange(len(unique)) % folds
    return group_fold[inverse.reshape(-1)]


def _fit(x: np.ndarray, y: np.ndarray, recipe: HeadRecipe, epochs: int, log=None, held=None):
    """PCA, bucketed k-means and `epochs` of fine-tuning on (x, y): (PrototypeHead, FitReport,
    MSE on `held` = (x, y) after each epoch, index 0 before fine-tuning; empty without `held`)."""
    notes = []
    dim = min(recipe.pca_dim, x.shape[1], len(x))
    if dim < recipe.pca_dim:
        notes.append(f"pca_dim lowered from {recipe.pca_dim} to {dim} (embedding size {x.shape[1]}, {len(x)} samples)")
    rng = np.random.default_rng(recipe.seed)
    mean, scale, components = fit_pca(x, dim)

    x_pca = ((x - mean) / scale) @ components.T
    protos, proto_scores, used = bucket_prototypes(_normalize(x_pca), y, recipe, rng)
    if len(protos) != recipe.prototypes:
        notes.append(f"{len(protos)} prototypes instead of {recipe.prototypes} "
                     f"({used} non-empty score buckets, {len(x)} samples)")

    # Fine-tune in float32 on the fixed PCA projections (the encoder and the PCA stay frozen).
    torch_gen = torch.Generator().manual_seed(recipe.seed)
    def project(a):
        return torch.nn.functional.normalize(torch.tensor(((a - mean) / scale) @ components.T, dtype=torch.float32), dim=-1)

    feats = project(x)
    target = torch.tensor(y, dtype=torch.float32)
    p = torch.nn.Parameter(torch.tensor(protos, dtype=torch.float32))
    s = torch.nn.Parameter(torch.tensor(proto_scores, dtype=torch.float32))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(recipe.logit_scale)), requires_grad=recipe.learn_temperature)
    params = [p, s] + ([log_scale] if recipe.learn_temperature else [])
    opt = torch.optim.Adam(params, lr=recipe.lr)

    def predict(f):
        w = torch.softmax(f @ torch.nn.functional.normalize(p, dim=-1).T * log_scale.exp(), dim=-1)
        return w @ s

    def mse(f, t) -> float:
        with torch.no_grad():
            return float(((predict(f) - t) ** 2).mean())

    held_feats, held_target = (project(held[0]), torch.tensor(held[1], dtype=torch.float32)) if held else (None, None)
    held_mse = [mse(held_feats, held_target)] if held else []
    mse_before = mse(feats, target)
    for epoch in range(epochs):
        order = torch.randperm(len(feats), generator=torch_gen)
        for start in range(0, len(feats), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            loss = ((predict(feats[idx]) - target[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if held:
            held_mse.append(mse(held_feats, held_target))
        if log and (epoch + 1) % max(1, epochs // 5) == 0:
            log(f"fine-tune epoch {epoch + 1}/{epochs}: mse {mse(feats, target):.4f}")
    logit_scale = max(float(log_scale.detach().exp()), LOGIT_SCALE_MIN)
    head = PrototypeHead(
        pca_mean=torch.tensor(mean), pca_scale=torch.tensor(scale), pca_components=torch.tensor(components),
        prototypes=p.detach().double(), proto_scores=s.detach().double(), logit_scale=logit_scale,
    )
    report = FitReport(len(x), dim, len(protos), used, mse_before, mse(feats, target), logit_scale, notes, epochs)
    return head, report, held_mse


# --- images -> embeddings, cached -----------------------------------------------------------
def _sha256(path: str) -> str | None:
    from rali_edge.model_file import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None  # missing or unreadable: embed_dataset reports it


def cache_key(model_sha256: str, paths: list[str], file_hashes: list[str | None]) -> str:
    digest = hashlib.sha256(f"rali-edge-embeddings-v{CACHE_VERSION}\n{model_sha256}\n".encode())
    for path, h in zip(paths, file_hashes):
        digest.update(f"{path}\t{h}\n".encode())
    return digest.hexdigest()


@dataclass
class Embedded:
    embeddings: np.ndarray  # [N_ok * V, E] float32: one row per view of each readable image
    scores: np.ndarray  # [N_ok * V]: each view's row has its image's label
    paths: list[str]
    failures: list[dict]  # {"path", "error"}
    from_cache: bool = False


def embed_dataset(scorer, dataset, cache: str | Path | None = None, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> Embedded:
    """Projected embeddings of every readable image of `dataset` (list of LabelledImage). With
    `cache`, reuse the file when its key (model sha256 + each image's sha256) matches."""
    paths = [item.path for item in dataset]
    # The views are part of the key: the same weights with other views give other embeddings.
    key = cache_key(f"{scorer.model_sha256}-views{scorer.preprocess.view_count}", paths,
                    [_sha256(p) for p in paths]) if cache else ""
    if cache and Path(cache).is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    meta = json.loads(str(z["meta"]))
                    return Embedded(z["embeddings"], z["scores"], meta["paths"], meta["failures"], from_cache=True)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or old cache: recompute and overwrite
    embeddings, scores, ok, failures = [], [], [], []
    batch, batch_items = [], []
    views = scorer.preprocess.view_count

    def flush():
        if batch:
            # One row per view; each view is a sample with its image's label (the head is fitted on
            # what it will score, and an image's score is the mean of its views').
            embeddings.append(scorer.embed(torch.cat(batch)).cpu().numpy().astype(np.float32))
            scores.extend(item.mos for item in batch_items for _ in range(views))
            ok.extend(item.path for item in batch_items)
            if progress:
                progress(len(batch))
            batch.clear()
            batch_items.clear()

    from rali_edge.images import open_image

    for item in dataset:
        try:
            pixels = scorer.preprocess.views_tensor(open_image(item.path))
        except ImageError as e:
            failures.append({"path": item.path, "error": str(e)})
            if progress:
                progress(1)
            continue
        batch.append(pixels)
        batch_items.append(item)
        if len(batch) == batch_size:
            flush()
    flush()
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), dtype=np.float32)
    result = Embedded(emb, np.asarray(scores, dtype=np.float64), ok, failures)
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache) + ".tmp.npz")
        np.savez(tmp, key=np.array(key), embeddings=result.embeddings, scores=result.scores,
                 meta=np.array(json.dumps({"paths": ok, "failures": failures})))
        tmp.replace(cache)
    return result


# --- the whole job: encoder model + dataset -> model folder ----------------------------------
def fit_head_model(encoder_model, dataset, out: str | Path, recipe: HeadRecipe = HeadRecipe(),
                   cache: str | Path | None = None, name: str | None = None, device: str = "cpu",
                   batch_size: int = 16, dataset_name: str = "", log: Callable[[str], None] | None = None,
                   progress: Callable[[int], None] | None = None, force: bool = False):
    """Embed `dataset` with the encoder of the model folder `encoder_model` (None: the built-in
    model), fit a head, and write a model folder at `out` with the same encoder and preprocessing.
    `out` must be new or empty, or a model folder to overwrite with `force` (checked first).
    Returns (path, FitReport, Embedded)."""
    import rali_edge
    from rali_edge.model_file import Manifest, build_model, check_output_folder, save_model

    check_output_folder(out, force)
    # Eager fp32 whatever the user's default backend: embeddings need the PyTorch encoder, and the
    # new model's encoder weights are taken from it as they were in the file.
    scorer = rali_edge.load(encoder_model, device=device, backend="torch", dtype="fp32")
    start = time.perf_counter()
    embedded = embed_dataset(scorer, dataset, cache=cache, batch_size=batch_size, progress=progress)
    embed_seconds = time.perf_counter() - start
    if log:
        how = "read from cache" if embedded.from_cache else f"computed in {embed_seconds:.1f} s"
        log(f"embeddings: {len(embedded.paths)} images ({len(embedded.failures)} failed), {how}")
    if len(embedded.paths) < 2:
        raise RaliEdgeError(f"fit-head: only {len(embedded.paths)} readable images; need at least 2")
    views = scorer.preprocess.view_count
    # Validation folds keep an image's views together (groups are ignored without folds).
    groups = [path for path in embedded.paths for _ in range(views)]
    head, report = fit_prototype_head(embedded.embeddings, embedded.scores, recipe, log=log, groups=groups)

    manifest = scorer.manifest
    encoder = scorer.encoder.encoder.float().cpu()  # fp32 on the CPU, as it was loaded from the file
    new = build_model(manifest.encoder, encoder.state_dict(), head)
    source = {
        "kind": "fit-head",
        "recipe": asdict(recipe),
        "encoder_from": {"name": manifest.name, "weights_sha256": manifest.weights_sha256},
        "dataset": dataset_name,
        "samples": report.samples,
        "failures": len(embedded.failures),
        "mse_before_finetune": report.mse_before,
        "mse_after_finetune": report.mse_after,
        "finetune_epochs": report.epochs,
        "validation": report.validation,
        "notes": report.notes,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out_manifest = Manifest(name or f"{manifest.name}+fit-head", manifest.encoder, manifest.preprocess,
                            report.pca_dim, report.prototypes, source=source)
    path = save_model(out, new, out_manifest)
    return path, report, embedded


__all__ = [
    "HeadRecipe", "PrototypeHead", "FitReport", "fit_pca", "kmeans", "allocate", "bucket_prototypes",
    "fit_prototype_head", "validation_folds", "embed_dataset", "fit_head_model",
]
