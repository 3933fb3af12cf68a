"""fit_head: the paper's recipe on embeddings with a known answer, and the whole job on a model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import rali_edge
from rali_edge.cli import main
from rali_edge.evaluation import LabelledImage
from rali_edge.fit_head import (
    HeadRecipe,
    allocate,
    embed_dataset,
    fit_head_model,
    fit_pca,
    fit_prototype_head,
    kmeans,
    validation_folds,
)
from rali_edge.errors import RaliEdgeError
from rali_edge.model_file import load_model

CLUSTER_SCORES = (1.3, 2.1, 2.8, 3.6, 4.2, 4.9)


def clustered(seed=0, per_cluster=40, dim=32, noise=0.05):
    """Embeddings in well separated clusters (random directions, random offset and scale per
    dimension so that standardisation has work to do), each cluster with one known score."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLUSTER_SCORES), dim))
    x = np.concatenate([c + noise * rng.normal(size=(per_cluster, dim)) for c in centres])
    y = np.repeat(CLUSTER_SCORES, per_cluster)
    x = x * rng.uniform(0.5, 3.0, size=dim) + rng.normal(size=dim) * 5
    return x, y


def test_recovers_known_cluster_scores():
    x, y = clustered()
    recipe = HeadRecipe(pca_dim=16, prototypes=12, buckets=6, epochs=50, seed=0)
    head, report = fit_prototype_head(x, y, recipe)
    pred = head(torch.tensor(x)).numpy()
    # Each cluster sits alone in its bucket, so its prototypes' k-means scores are exactly its
    # score; a 0.05 tolerance leaves room for the softmax's leak between clusters at tau 0.07.
    assert np.abs(pred - y).max() < 0.05, np.abs(pred - y).max()
    assert report.prototypes == 12 and report.buckets_used == 6
    assert sorted(set(np.round(head.proto_scores.numpy(), 1))) == pytest.approx(CLUSTER_SCORES, abs=0.06)
    assert report.mse_after < 1e-4  # Adam may wander a little from a perfect start, no more


def test_fine_tuning_improves_on_kmeans():
    # Scores that change smoothly along an arc: k-means prototypes with their clusters' mean
    # scores give a rough staircase; fine-tuning prototypes, scores and temperature must fit better.
    rng = np.random.default_rng(0)
    theta = rng.uniform(0, np.pi / 2, size=400)
    x = np.stack([np.cos(theta), np.sin(theta)], axis=1) @ rng.normal(size=(2, 12)) + 0.01 * rng.normal(size=(400, 12))
    y = 1 + 4 * theta / (np.pi / 2)
    recipe = HeadRecipe(pca_dim=4, prototypes=5, buckets=1, epochs=300, lr=0.02, learn_temperature=True, seed=0)
    head, report = fit_prototype_head(x, y, recipe)
    assert report.mse_after < 0.5 * report.mse_before, (report.mse_before, report.mse_after)
    # the report's MSE is the head's own error
    pred = head(torch.tensor(x)).numpy()
    assert np.mean((pred - y) ** 2) == pytest.approx(report.mse_after, rel=1e-3)
    assert report.logit_scale != pytest.approx(1 / 0.07)  # the temperature was learned


def test_same_seed_same_head_and_other_seed_differs():
    x, y = clustered(per_cluster=30)
    x += np.random.default_rng(5).normal(size=x.shape)  # noisier: k-means has choices to make
    recipe = HeadRecipe(pca_dim=8, prototypes=10, buckets=3, epochs=5, seed=3)
    a, _ = fit_prototype_head(x, y, recipe)
    b, _ = fit_prototype_head(x, y, recipe)
    c, _ = fit_prototype_head(x, y, HeadRecipe(pca_dim=8, prototypes=10, buckets=3, epochs=5, seed=4))
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.proto_scores, b.proto_scores)
    assert not torch.equal(a.prototypes, c.prototypes)


def test_validation_folds_keep_groups_together():
    groups = np.repeat(np.arange(7), 5)[np.random.default_rng(1).permutation(35)]
    fold = validation_folds(len(groups), 3, seed=0, groups=groups)
    assert sorted(set(fold)) == [0, 1, 2]
    for g in range(7):
        assert len(set(fold[groups == g])) == 1  # a group never straddles two folds
    assert np.array_equal(fold, validation_folds(len(groups), 3, seed=0, groups=groups))
    ungrouped = validation_folds(30, 3, seed=0)
    assert np.bincount(ungrouped).tolist() == [10, 10, 10]
    with pytest.raises(RaliEdgeError, match="at least 8 groups"):
        validation_folds(len(groups), 8, seed=0, groups=groups)


def test_validation_picks_the_epoch_count_with_the_lowest_left_out_mse():
    # Few, noisy samples: fine-tuning fits the noise, so the left-out MSE has a minimum to find.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, 12))
    y = np.clip(3 + x[:, 0] + 0.8 * rng.normal(size=90), 1, 5)
    groups = np.arange(90) // 3
    recipe = HeadRecipe(pca_dim=8, prototypes=6, buckets=3, epochs=12, lr=0.05, batch_size=16, seed=0,
                        validation_folds=3)
    head, report = fit_prototype_head(x, y, recipe, groups=groups)
    curve = report.validation["mse_per_epoch"]
    assert len(curve) == recipe.epochs + 1 and report.validation["grouped"]
    assert report.epochs == report.validation["epochs_chosen"] == int(np.argmin(curve))
    assert 0 < report.epochs < recipe.epochs  # this data overfits: the minimum is inside

    # The curve, measured again with the plain recipe: each fold's head after e epochs, on that fold.
    fold = validation_folds(len(x), 3, recipe.seed, groups)
    for epochs in (0, 5, recipe.epochs):
        errors = []
        for k in range(3):
            plain = HeadRecipe(**{**recipe.__dict__, "epochs": epochs, "validation_folds": 0})
            fold_fit, _ = fit_prototype_head(x[fold != k], y[fold != k], plain)
            errors.append(np.mean((fold_fit(torch.tensor(x[fold == k])).numpy() - y[fold == k]) ** 2))
        assert curve[epochs] == pytest.approx(np.mean(errors), rel=1e-4), epochs  # float32 fine-tune vs float64 head

    # The head returned is the plain recipe's with the chosen epoch count, on all samples.
    same, _ = fit_prototype_head(x, y, HeadRecipe(**{**recipe.__dict__, "epochs": report.epochs, "validation_folds": 0}))
    assert torch.equal(head.prototypes, same.prototypes) and torch.equal(head.proto_scores, same.proto_scores)


def test_pca_matches_scikit_learn():
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x, _ = clustered(per_cluster=20)
    mean, scale, comps = fit_pca(x, 10)
    z = StandardScaler().fit_transform(x)
    ref = PCA(10, svd_solver="full").fit(z)
    # Same subspace and signs (both flip so the largest loading is positive); float64 SVDs agree
    # to ~1e-10, 1e-8 leaves margin.
    np.testing.assert_allclose(comps, ref.components_, atol=1e-8)
    np.testing.assert_allclose(((x - mean) / scale) @ comps.T, ref.transform(z), atol=1e-8)


def test_allocate_shares_prototypes_by_bucket_size():
    assert allocate(np.array([10, 0, 30, 60]), 10).tolist() == [1, 0, 3, 6]
    assert allocate(np.array([1, 100]), 10).tolist() == [1, 9]  # at least one per non-empty bucket
    assert allocate(np.array([2, 3]), 50).tolist() == [2, 3]  # never more than a bucket's samples
    assert allocate(np.array([5, 5, 5]), 2).tolist() == [1, 1, 1]  # raised to one per bucket


def test_kmeans_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres])
    cents, labels = kmeans(x, 3, np.random.default_rng(1))
    # Every group gets one label of its own, and centroids are the group means.
    groups = labels.reshape(3, 50)
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3
    for g in range(3):
        np.testing.assert_allclose(cents[groups[g][0]], x[g * 50 : (g + 1) * 50].mean(axis=0), atol=1e-12)


def image_dataset(folder, n=24, seed=0):
    """Images whose label is their brightness: the tiny random encoder sees that."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        level = i / (n - 1)
        pixels = np.clip(level * 255 + rng.normal(0, 20, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        items.append(LabelledImage(str(path), 1 + 4 * level))
    return items


def test_the_folded_fitted_head_matches_the_published_formula(small_model):
    model, _ = load_model(small_model)
    x, y = clustered(dim=model.encoder.config.projection_dim, per_cluster=10)
    head, _ = fit_prototype_head(x, y, HeadRecipe(pca_dim=8, prototypes=6, buckets=6, epochs=3))
    folded = head.fold(model.encoder)
    pixels = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        cls = model.encoder.class_token(pixels)
        want = head(model.encoder.embed(pixels).double()).float()
        got = folded(cls)
    # float32 folded path vs float64 reference: ~1e-6 on scores of 1..5
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_fit_head_model_writes_a_model_that_loads_and_scores(small_model, tmp_path):
    items = image_dataset(tmp_path)
    items.append(LabelledImage(str(tmp_path / "missing.png"), 3.0))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items.append(LabelledImage(str(tmp_path / "broken.jpg"), 3.0))
    recipe = HeadRecipe(pca_dim=16, prototypes=8, buckets=4, epochs=20, seed=0)
    cache = tmp_path / "emb.npz"
    out, report, embedded = fit_head_model(small_model, items, tmp_path / "fitted", recipe, cache=cache)
    assert not embedded.from_cache and cache.is_file()
    assert sorted(f["path"].rsplit("/", 1)[1] for f in embedded.failures) == ["broken.jpg", "missing.png"]
    assert report.samples == 24

    scorer = rali_edge.load(out)
    good = [item.path for item in items[:24]]
    scores = np.array(scorer.score(good))
    # The folded head inside the file gives the unfolded head's scores on the same embeddings.
    head, _ = fit_prototype_head(embedded.embeddings, embedded.scores, recipe)
    np.testing.assert_allclose(scores, head(torch.tensor(embedded.embeddings, dtype=torch.float64)).numpy(), atol=1e-4)
    assert np.corrcoef(scores, [item.mos for item in items[:24]])[0, 1] > 0.5  # it learned something
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "fit-head" and manifest["source"]["recipe"]["prototypes"] == 8
    assert manifest["encoder"] == json.loads((small_model / "manifest.json").read_text())["encoder"]

    # Second run: embeddings from the cache, same head bit for bit (seeded).
    out2, _, again = fit_head_model(small_model, items, tmp_path / "fitted2", recipe, cache=cache)
    assert again.from_cache
    assert json.loads((out2 / "manifest.json").read_text())["weights"]["sha256"] == manifest["weights"]["sha256"]


def test_fit_head_model_embeds_in_fp32_pytorch_whatever_the_default_backend(small_model, tmp_path, monkeypatch):
    # A user whose default backend is an engine (auto picks ONNX Runtime on many CPUs) still gets
    # embeddings (engines give scores only) and the source model's encoder weights unchanged.
    from safetensors.torch import load_file

    from rali_edge.model_file import WEIGHTS

    monkeypatch.setenv("RALI_EDGE_BACKEND", "onnx")
    items = image_dataset(tmp_path, n=6)
    recipe = HeadRecipe(pca_dim=4, prototypes=3, buckets=3, epochs=2, seed=0)
    out, report, _ = fit_head_model(small_model, items, tmp_path / "fitted", recipe)
    assert report.samples == 6
    before, after = load_file(small_model / WEIGHTS), load_file(out / WEIGHTS)
    for name, weight in before.items():
        if name.startswith("encoder."):
            assert torch.equal(after[name], weight), name


def test_cache_is_not_reused_when_an_image_changes(small_model, tmp_path):
    items = image_dataset(tmp_path, n=6)
    scorer = rali_edge.load(small_model)
    cache = tmp_path / "emb.npz"
    first = embed_dataset(scorer, items, cache=cache)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(items[0].path)
    second = embed_dataset(scorer, items, cache=cache)
    assert not second.from_cache
    assert not np.allclose(first.embeddings[0], second.embeddings[0])
    np.testing.assert_allclose(first.embeddings[1:], second.embeddings[1:], atol=1e-6)


def test_cli_fit_head_counts_images_and_views_apart(tmp_path):
    """A model that scores 2 x 2 crops and a resized view: 12 photographs are 60 samples for the
    recipe, and fit-head says both, each under its own name."""
    from small_model import make_small_model

    model = make_small_model(tmp_path / "views", native_grid=2, resized_view=True)
    items = image_dataset(tmp_path, n=12)
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path,mos\n" + "".join(f"{i.path.rsplit('/', 1)[1]},{i.mos}\n" for i in items))
    result = CliRunner().invoke(main, ["fit-head", str(model), str(csv_path), "-o", str(tmp_path / "head"),
                                       "--pca-dim", "8", "--prototypes", "4", "--buckets", "2", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "12 images (0 failed; 60 views, each fitted as a sample)" in result.output


def test_cli_fit_head(small_model, tmp_path):
    items = image_dataset(tmp_path, n=12)
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path,mos\n" + "".join(f"{i.path.rsplit('/', 1)[1]},{i.mos}\n" for i in items))
    out = tmp_path / "head"
    result = CliRunner().invoke(main, ["fit-head", str(small_model), str(csv_path), "-o", str(out),
                                       "--pca-dim", "8", "--prototypes", "4", "--buckets", "2", "--epochs", "5"])
    assert result.exit_code == 0, result.output
    assert "12 images (0 failed)" in result.output and "views" not in result.output  # one view each
    assert (out / "manifest.json").is_file() and (tmp_path / "head.embeddings.npz").is_file()
    assert len(rali_edge.load(out).score([items[0].path])) == 1

    validated = CliRunner().invoke(main, ["fit-head", str(small_model), str(csv_path), "-o", str(tmp_path / "cv"),
                                          "--pca-dim", "8", "--prototypes", "4", "--buckets", "2", "--epochs", "5",
                                          "--validation-folds", "3"])
    assert validated.exit_code == 0, validated.output
    assert "3-fold validation" in validated.output
    source = json.loads((tmp_path / "cv" / "manifest.json").read_text())["source"]
    assert source["recipe"]["validation_folds"] == 3
    assert source["finetune_epochs"] == source["validation"]["epochs_chosen"] <= 5

    bad = CliRunner().invoke(main, ["fit-head", str(small_model), str(tmp_path / "nope.csv"), "-o", str(tmp_path / "new")])
    assert bad.exit_code == 2 and "error:" in bad.output and "not found" in bad.output

    # The weights are as readable as the manifest (safetensors alone would make them 0600).
    assert (out / "weights.safetensors").stat().st_mode & 0o777 == (out / "manifest.json").stat().st_mode & 0o777
    args = ["fit-head", str(small_model), str(csv_path), "--pca-dim", "8", "--prototypes", "4", "--buckets", "2", "--epochs", "1"]
    kept = (out / "weights.safetensors").read_bytes()
    again = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert again.exit_code == 2 and "already holds a model; add --force" in again.output
    assert (out / "weights.safetensors").read_bytes() == kept
    assert CliRunner().invoke(main, [*args, "-o", str(out), "--force"]).exit_code == 0
    assert (out / "weights.safetensors").read_bytes() != kept  # one epoch instead of five
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    (photos_dir / "holiday.jpg").write_bytes(b"a user's photograph")
    refused = CliRunner().invoke(main, [*args, "-o", str(photos_dir), "--force"])
    assert refused.exit_code == 2 and "other files in it, not a model folder" in refused.output
    assert sorted(p.name for p in photos_dir.iterdir()) == ["holiday.jpg"]
