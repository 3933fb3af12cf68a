"""The model's views (PreprocessConfig.native_grid / resized_view): every path makes the same
views and pools their scores by the mean. References: the views cut by hand from the image with
Pillow, and the per-view scores of `score_views` averaged in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import rali_edge
from rali_edge.errors import ModelFormatError
from rali_edge.preprocess import PreprocessConfig, Preprocessor, grid_origins
from small_model import make_small_model


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_grid_origins_spread_and_clamped():
    # 3x3 crops of 56 over 300 x 200: centres at 1/6, 3/6, 5/6 of each side, inside the image.
    assert grid_origins((300, 200), (56, 56), 3) == [(t, l) for t in (22, 122, 222) for l in (5, 72, 139)]
    # An image barely bigger than the crop: every crop clamped inside it.
    assert all(0 <= t <= 4 and 0 <= l <= 4 for t, l in grid_origins((60, 60), (56, 56), 3))


def test_aligned_views_move_up_and_left_to_the_block_grid():
    plain, aligned = grid_origins((1000, 1500), (128, 128), 4), grid_origins((1000, 1500), (128, 128), 4, align=16)
    for (t, l), (ta, la) in zip(plain, aligned):
        assert ta % 16 == 0 and la % 16 == 0 and 0 <= t - ta < 16 and 0 <= l - la < 16
    cfg = PreprocessConfig(resize_shortest_edge=56, crop_height=56, crop_width=56, native_grid=3, resized_view=False,
                           native_align=16)
    img = _photo(200, 300)
    for view, (t, l) in zip(Preprocessor(cfg).native_crops(img), grid_origins((200, 300), (56, 56), 3, 16)):
        np.testing.assert_array_equal(view, img[t : t + 56, l : l + 56])
    with pytest.raises(ModelFormatError, match="native_align"):
        PreprocessConfig(native_grid=2, native_align=0)


def test_views_are_native_crops_then_resized_view():
    cfg = PreprocessConfig(resize_shortest_edge=56, crop_height=56, crop_width=56, native_grid=2)
    pre, plain = Preprocessor(cfg), Preprocessor(PreprocessConfig(resize_shortest_edge=56, crop_height=56, crop_width=56))
    img = Image.fromarray(_photo(150, 210))
    views = pre.views_array(img)
    assert views.shape == (5, 3, 56, 56) and pre.view_count == 5
    for k, (t, l) in enumerate(grid_origins((150, 210), (56, 56), 2)):
        crop = np.asarray(img)[t : t + 56, l : l + 56]
        np.testing.assert_array_equal(views[k], pre.lut[np.arange(3)[:, None, None], crop.transpose(2, 0, 1)])
    np.testing.assert_array_equal(views[4], plain.pil_to_array(img))  # the published view, unchanged


def test_small_image_is_enlarged_until_the_crops_fit():
    pre = Preprocessor(PreprocessConfig(resize_shortest_edge=56, crop_height=56, crop_width=56, native_grid=2,
                                        resized_view=False))
    assert pre.views_array(Image.fromarray(_photo(30, 40))).shape == (4, 3, 56, 56)


def test_arrays_path_makes_the_same_native_views():
    pre = Preprocessor(PreprocessConfig(resize_shortest_edge=56, crop_height=56, crop_width=56, native_grid=3,
                                        resized_view=False))
    frames = [_photo(120, 160, 1), _photo(90, 200, 2)]
    expected = torch.cat([pre.views_tensor(Image.fromarray(f)) for f in frames])
    assert torch.equal(pre.arrays_to_tensor(frames), expected)


def test_a_model_needs_a_view():
    with pytest.raises(ModelFormatError, match="at least one view"):
        PreprocessConfig(native_grid=0, resized_view=False)


def test_published_preprocessing_has_one_view():
    assert PreprocessConfig().view_count == 1
    assert PreprocessConfig.from_hf({"size": 336, "crop_size": 336}).view_count == 1


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("grid") / "m", native_grid=2)


def test_every_scoring_path_pools_the_same_views(grid_model, tmp_path):
    scorer = rali_edge.load(grid_model)
    photos = [_photo(100, 140, 3), _photo(230, 120, 4), _photo(64, 64, 5)]
    paths = []
    for i, p in enumerate(photos):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(p).save(paths[-1])
    per_view = scorer.score_views(scorer.preprocess([Image.fromarray(p) for p in photos])).numpy()
    assert per_view.shape == (15,)
    expected = per_view.reshape(3, 5).mean(1)
    assert not np.allclose(per_view.reshape(3, 5), expected[:, None], atol=1e-4)  # the views differ
    np.testing.assert_allclose(scorer.score(photos, batch_size=2), expected, atol=1e-5)
    np.testing.assert_allclose([r.score for r in scorer.score_files(paths, batch_size=2)], expected, atol=1e-5)
    # Frames resize their resized view with torch, at most 2 uint8 levels from Pillow's
    # (preprocess.py): on these noise images that moves the pooled score by ~4e-5.
    np.testing.assert_allclose(scorer.score_arrays(photos), expected, atol=2e-4)
    np.testing.assert_allclose(scorer.score_pixels(scorer.preprocess(paths)).tolist(), expected, atol=1e-5)


def test_pooled_weights_give_the_pooled_score(grid_model):
    scorer = rali_edge.load(grid_model)
    pixels = scorer.preprocess([_photo(100, 140, 6), _photo(80, 90, 7)])
    scores, weights = scorer.score_pixels(pixels, return_weights=True)
    assert weights.shape[0] == 2
    torch.testing.assert_close(weights @ scorer.head.proto_scores.float(), scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, scorer.preprocess.pool(scorer.score_views(pixels)))


# --- `default`: the built-in model's name wherever a model is accepted ------------------------
from click.testing import CliRunner  # noqa: E402

from rali_edge.cli import main  # noqa: E402
from rali_edge.cli.common import DEMO_NOTE  # noqa: E402
from rali_edge.scoring import default_model_path  # noqa: E402


def test_load_default_is_the_built_in_model():
    assert rali_edge.load("default").manifest.weights_sha256 == rali_edge.load().manifest.weights_sha256
    assert rali_edge.load("default").preprocess.view_count == 16  # 4 x 4 native-resolution views


def test_score_with_the_built_in_model_says_it_is_a_demo(tmp_path):
    photo = tmp_path / "a.png"
    Image.fromarray(_photo(150, 200)).save(photo)
    for args in ([], ["--model", "default"], ["--model", str(default_model_path())]):
        result = CliRunner().invoke(main, ["score", str(photo), *args])
        assert result.exit_code == 0, result.output
        assert DEMO_NOTE in result.stderr
    quiet = CliRunner().invoke(main, ["score", str(photo), "--quiet"])
    assert quiet.exit_code == 0 and DEMO_NOTE not in quiet.stderr


def test_score_with_another_model_has_no_demo_note(grid_model, tmp_path):
    photo = tmp_path / "a.png"
    Image.fromarray(_photo(150, 200)).save(photo)
    result = CliRunner().invoke(main, ["score", str(photo), "--model", str(grid_model)])
    assert result.exit_code == 0 and DEMO_NOTE not in result.stderr


@pytest.mark.slow
def test_build_without_model_builds_the_built_in_one(tmp_path):
    pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(main, ["build", "--target", "onnx", "--batch", "1:9:18", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stderr and rali_edge.load().manifest.name in result.stdout
