"""The default model's training data (rali_edge/training/data.py): reproducible, labelled in
range, and never drawn from the held-out photographs."""

from __future__ import annotations

import numpy as np

from rali_edge.distortions import DISTORTIONS
from rali_edge.training import data


def test_training_samples_are_reproducible_and_skip_heldout_photographs():
    first = data.training_samples(seed=3, count=24)
    again = data.training_samples(seed=3, count=24)
    assert [s.label for s in first] == [s.label for s in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    for s in first:
        assert s.image.shape == (data.VIEW, data.VIEW, 3) and s.image.dtype == np.uint8
        assert 1.0 <= s.label <= 5.0
        if s.kind == "clean":
            assert s.label == 5.0 and s.level == 0
        assert not any(name in s.source for name in data.HELDOUT_SOURCES), s.source
    # training_source names each sample's photograph without making it (validation folds use it)
    assert [data.training_source(3, i) in s.source for i, s in enumerate(first)] == [True] * len(first)


def test_heldout_photographs_are_colour():
    # On a greyscale photograph the colour distortions are no-ops labelled perfect: no
    # no-reference model can tell those from the same grey made from a colour photograph.
    for name in data.HELDOUT_SOURCES:
        img = data.load_source(name).astype(np.int16)
        assert np.abs(img[..., 0] - img[..., 1]).mean() > 5, name


def test_dead_leaves_paints_palette_discs_at_every_scale():
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [240, 240, 240]], np.uint8)
    img = data.dead_leaves(96, np.random.default_rng(0), palette, disks=400)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    # Inside the discs, pixels are exactly palette colours; only the anti-aliased edges blend.
    exact = (img[:, :, None, :] == palette[None, None]).all(-1).any(-1)
    assert exact.mean() > 0.6
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > len(palette)  # edges exist: not a flat image
    again = data.dead_leaves(96, np.random.default_rng(0), palette, disks=400)
    assert np.array_equal(img, again)


def _luminance(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64).mean(-1) / 255.0


def test_normalise_tones_gives_a_dark_flat_reference_normal_tones():
    # Mostly dark with a few bright pixels, spanning 30..145 of 255: a stretch alone would leave
    # the mean near 0.2, so the gamma is needed as well as the stretch.
    rng = np.random.default_rng(0)
    dark = np.clip(30 + rng.exponential(18, size=(176, 176, 1)) * np.array([1.0, 0.9, 0.8]), 0, 145).astype(np.uint8)
    assert _luminance(dark).mean() < 0.2 and np.ptp(np.percentile(_luminance(dark), (0.5, 99.5))) < 0.45
    for seed in range(5):
        out = data.normalise_tones(dark, np.random.default_rng(seed))
        lum = _luminance(out)
        lo, hi = np.percentile(lum, (0.5, 99.5))
        # Stretched to at least the smallest target range; the gamma can narrow it a little.
        assert hi - lo > data.TARGET_RANGE[0] - 0.05, (seed, lo, hi)
        # The gamma brightens it; this one is so skewed that the gamma's limit (0.6) stops it
        # short of TARGET_MEAN for some seeds (0.24-0.35 over seeds 0-7).
        assert 0.23 <= lum.mean() <= data.TARGET_MEAN[1], (seed, lum.mean())
        # One tone curve for all three channels: their order at each pixel is kept (hue kept).
        assert (out[..., 0] >= out[..., 2]).all()


def test_normalise_tones_never_narrows_a_wide_tonal_range():
    # A reference that already spans more than any target range is not compressed: that would
    # be the contrast distortion, labelled 5. Only the gamma moves its tones.
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, size=(176, 176, 1)).repeat(3, axis=2).astype(np.uint8)
    lo, hi = np.percentile(_luminance(wide), (0.5, 99.5))
    assert hi - lo > data.TARGET_RANGE[1]
    for seed in range(5):
        out = _luminance(data.normalise_tones(wide, np.random.default_rng(seed)))
        lo2, hi2 = np.percentile(out, (0.5, 99.5))
        # The gamma moves the percentiles a little (0.992 -> 0.980 at worst over these seeds).
        assert hi2 - lo2 >= hi - lo - 0.02, (seed, lo2, hi2)


def test_normalise_tones_brings_the_mean_into_its_target():
    # A normally skewed but dark reference (mean ~0.2): the gamma lifts it into TARGET_MEAN.
    rng = np.random.default_rng(4)
    dim = (rng.beta(2, 6, size=(176, 176, 1)) * 255).repeat(3, axis=2).astype(np.uint8)
    assert _luminance(dim).mean() < 0.27
    for seed in range(5):
        mean = _luminance(data.normalise_tones(dim, np.random.default_rng(seed))).mean()
        assert data.TARGET_MEAN[0] - 0.02 <= mean <= data.TARGET_MEAN[1] + 0.02, (seed, mean)


def test_normalise_tones_stretches_a_narrow_range_to_a_random_target():
    # Two references of range 0.3: their targets differ from seed to seed, within TARGET_RANGE.
    rng = np.random.default_rng(3)
    narrow = (90 + rng.integers(0, 77, size=(176, 176, 1))).repeat(3, axis=2).astype(np.uint8)
    ranges = []
    for seed in range(8):
        lum = _luminance(data.normalise_tones(narrow, np.random.default_rng(seed)))
        lo, hi = np.percentile(lum, (0.5, 99.5))
        ranges.append(hi - lo)
    assert min(ranges) > data.TARGET_RANGE[0] - 0.05 and max(ranges) < data.TARGET_RANGE[1] + 0.05, ranges
    assert max(ranges) - min(ranges) > 0.1, ranges


def test_normalise_tones_stretches_a_flat_reference_by_at_most_max_stretch():
    # Grey 128 with slight noise: stretching it to black..white would multiply the noise ~12x.
    rng = np.random.default_rng(1)
    flat = np.clip(128 + rng.normal(0, 3, size=(176, 176, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
    before = _luminance(flat).std()
    for seed in range(5):
        after = _luminance(data.normalise_tones(flat, np.random.default_rng(seed))).std()
        # At most MAX_STRETCH, times the gamma's slope near mid-grey (<= 1.1 for gamma 0.6..1.6).
        assert 2.0 * before < after <= data.MAX_STRETCH * 1.1 * before, (seed, before, after)


def test_every_photograph_loads_and_has_a_licence():
    for name, source in data.SOURCES.items():
        img = data.load_source(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 300, name
        assert source.licence and source.credit and source.origin, name
    # The two photographs added for content: colour, and used for training.
    for name in ("raccoon", "grace_hopper"):
        img = data.load_source(name).astype(np.int16)
        assert np.abs(img[..., 0] - img[..., 2]).mean() > 5, name
        assert name in data.TRAIN_SOURCES
    assert not set(data.NOT_PHOTOGRAPHS) & set(data.TRAIN_SOURCES)
    assert not set(data.HELDOUT_SOURCES) & set(data.TRAIN_SOURCES)


def test_native_crops_are_cut_at_the_photographs_own_resolution():
    y, x = np.mgrid[0:300, 0:400]
    img = np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], axis=-1).astype(np.uint8)  # each pixel names its place
    crop = data.native_crop(img, np.random.default_rng(3), 180)
    top, left = int(crop[0, 0, 0]) + 256 * (int(crop[0, 0, 2]) // 16), int(crop[0, 0, 1]) + 256 * (int(crop[0, 0, 2]) % 16)
    assert crop.shape == (180, 180, 3) and np.array_equal(crop, img[top:top + 180, left:left + 180])


# Samples 0, 1, 2, 5 and 7 of seed 0 from "coffee", as the shipped model's stream made them: a
# change here changes every training sample, and needs data.DATA_VERSION bumped and the model
# retrained. sha256 of the pixels (first 16 hex digits); Pillow's JPEG and resampling code are in it.
STREAM = {0: ("dead_leaves(coffee colours)", "contrast", 5, "dc8ea94ea8c5d907"), 1: ("coffee", "blur", 1, "2be7dc7ca984e8d6"),
          2: ("coffee", "noise", 4, "8fe4a2d7a3cb0b05"), 5: ("coffee", "noise", 1, "fbd87c66bb09f77b"),
          7: ("coffee", "clean", 0, "2bf35123044ad04b")}


def test_no_native_fraction_leaves_the_training_stream_as_it_was():
    import hashlib

    for i, expected in STREAM.items():
        s = data.training_sample(0, i, ("coffee",))
        assert (s.source, s.kind, s.level, hashlib.sha256(s.image.tobytes()).hexdigest()[:16]) == expected
    # All native: photograph crops change (no longer resized; one more draw), dead-leaves ones do not.
    for i in range(12):
        before, native = data.training_sample(0, i, ("coffee",)), data.training_sample(0, i, ("coffee",), native_fraction=1.0)
        assert np.array_equal(before.image, native.image) == before.source.startswith("dead_leaves")


def test_a_group_is_one_crop_and_its_five_levels_of_one_distortion():
    groups = data.training_groups(0, 6, workers=1)
    again = data.training_groups(0, 6, workers=2)  # the same groups for any number of processes
    assert all(np.array_equal(a.image, b.image) and a.label == b.label for g, h in zip(groups, again) for a, b in zip(g, h))
    for group in groups:
        assert [s.level for s in group] == [0, 1, 2, 3, 4, 5] and group[0].kind == "clean"
        assert len({s.kind for s in group[1:]}) == 1 and group[1].kind in DISTORTIONS
        assert all(s.image.shape == (data.VIEW, data.VIEW, 3) for s in group)
        # Labelled against the clean crop: the mildest level is labelled at least as well as the worst.
        assert group[1].label >= group[5].label
        assert not np.array_equal(group[0].image, group[5].image)


def test_aligned_centre_puts_the_view_corner_on_the_block_grid():
    img = np.arange(200 * 190 * 3, dtype=np.int64).reshape(200, 190, 3)
    view = data.aligned_centre(img)
    top, left = np.argwhere((img == view[0, 0]).all(-1))[0]
    assert top % 16 == 0 and left % 16 == 0 and view.shape[:2] == (data.VIEW, data.VIEW)
    assert abs(top - (200 - data.VIEW) / 2) < 16 and abs(left - (190 - data.VIEW) / 2) < 16


def test_photographs_added_for_stage_2_leave_stage_1s_stream_as_the_built_in_model_was_trained():
    import json

    from rali_edge.scoring import default_model_path

    manifest = json.loads((default_model_path() / "manifest.json").read_text())
    # Stage 1 draws a source by its index in TRAIN_SOURCES: the same tuple, in the same order,
    # keeps every sample of the shipped model's stream.
    assert list(data.TRAIN_SOURCES) == manifest["source"]["train_sources"]
    assert data.GROUP_SOURCES[:len(data.TRAIN_SOURCES)] == data.TRAIN_SOURCES
    assert set(data.GROUP_SOURCES) - set(data.TRAIN_SOURCES) == set(data.GROUP_ONLY_SOURCES)
    assert not set(data.GROUP_SOURCES) & set(data.HELDOUT_SOURCES)


def test_whole_photo_views_are_the_scorers_views_of_the_whole_photo_distorted():
    from PIL import Image

    from rali_edge.distortions import distort
    from rali_edge.preprocess import PreprocessConfig, Preprocessor

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:451]  # chelsea's size: views overlap and touch every border
    img = np.clip(128 + 60 * np.sin(x / 7.0)[..., None] * np.cos(y / 11.0)[..., None] + rng.normal(0, 20, (300, 451, 3)),
                  0, 255).astype(np.uint8)
    pre = Preprocessor(PreprocessConfig(resize_shortest_edge=data.VIEW, crop_height=data.VIEW, crop_width=data.VIEW,
                                        native_grid=data.WHOLE_GRID, resized_view=False, native_align=data.VIEW_ALIGN))
    for kind, quality in (("blur", 90), ("jpeg", None), ("blur", None)):
        views, labels = data.whole_photo_views(img, kind, np.random.default_rng(1), quality)
        # Labelled as stage 1 labels: 5 for the clean views as they are, lower the more distorted.
        assert labels.shape == views.shape[:1]
        assert (labels[0] == 5.0) == (quality is None)
        assert (np.diff(labels) < 0).all(), labels
        for level in (0, 5):
            whole = img if level == 0 else distort(img, kind, level, np.random.default_rng(1))
            whole = data._deliver(whole, quality)
            expected = np.stack([np.asarray(c) for c in pre.native_crops(Image.fromarray(whole))])
            # Distorting each view's surroundings (48 pixels, past the widest blur's reach, on the
            # JPEG block grid) gives the whole photograph's pixels: the same up to rounding.
            diff = np.abs(views[level].astype(int) - expected.astype(int))
            assert diff.max() <= 1, (kind, quality, level, diff.max())
