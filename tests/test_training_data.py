"""The default model's training data (rali_edge/training/data.py): reproducible, labelled in
range, and never drawn from the held-out photographs."""

from __future__ import annotations

import numpy as np

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
