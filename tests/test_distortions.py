"""distortions: each distortion at each level, SSIM against scikit-image, MS-SSIM against an
independent float64 implementation, and the MS-SSIM -> score map."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.signal import convolve2d
from skimage import data
from skimage.metrics import structural_similarity

from rali_edge import distortions as D


@pytest.fixture(scope="module")
def crop():
    """A 200x200 natural colour crop (astronaut, public domain), the size the levels are made for."""
    return np.asarray(Image.fromarray(data.astronaut()).resize((200, 200), Image.Resampling.LANCZOS))


@pytest.mark.parametrize("kind", list(D.DISTORTIONS))
def test_each_distortion_keeps_shape_and_is_seeded(crop, kind):
    outs = []
    for level in D.LEVELS:
        a = D.distort(crop, kind, level, np.random.default_rng(7))
        b = D.distort(crop, kind, level, np.random.default_rng(7))
        assert a.shape == crop.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)  # same seed, same pixels
        assert not np.array_equal(a, crop), f"{kind} level {level} changed nothing"
        outs.append(D.ms_ssim(crop, a))
    # Worse at level 5 than at level 1, by a clear margin for every kind on a colour photo.
    assert outs[-1] < outs[0] - 0.02, (kind, outs)


@pytest.mark.parametrize("kind", ["blur", "jpeg2000", "underexpose", "overexpose", "contrast", "desaturate", "pixelate"])
def test_deterministic_distortions_get_worse_level_by_level(crop, kind):
    values = [D.ms_ssim(crop, D.distort(crop, kind, level)) for level in D.LEVELS]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_bad_arguments():
    img = np.zeros((200, 200, 3), np.uint8)
    with pytest.raises(ValueError, match="level"):
        D.distort(img, "blur", 6)
    with pytest.raises(ValueError, match="unknown distortion"):
        D.distort(img, "sepia", 1)
    with pytest.raises(ValueError, match="RGB uint8"):
        D.distort(img[:, :, 0], "blur", 1)
    with pytest.raises(ValueError, match="at least 161"):
        D.ms_ssim(img[:160], img[:160])


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg", "overexpose", "contrast"])
def test_ssim_matches_scikit_image(crop, kind):
    distorted = D.distort(crop, kind, 3, np.random.default_rng(0))
    for c in range(3):
        want = structural_similarity(crop[..., c], distorted[..., c], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255)
        # Same definition (11x11 Gaussian, valid windows); ours computes moments in float32: ~2e-6.
        assert D.ssim(crop[..., c], distorted[..., c]) == pytest.approx(want, abs=2e-5)


def ms_ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s MS-SSIM written out plainly, float64, scipy convolution, per channel."""
    g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    per_channel = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        value = 1.0
        for j, w in enumerate(weights):
            f = lambda t: convolve2d(t, w2, mode="valid")  # noqa: E731
            ma, mb = f(a), f(b)
            va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
            cs = (2 * cov + c2) / (va + vb + c2)
            lum = (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
            value *= max((lum * cs).mean() if j == 4 else cs.mean(), 0.0) ** w
            h, wd = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
            a = a[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
            b = b[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
        per_channel.append(value)
    return float(np.mean(per_channel))


@pytest.mark.parametrize("kind, level", [("blur", 2), ("noise", 4), ("jpeg2000", 3), ("underexpose", 5), ("motion", 3)])
def test_ms_ssim_matches_a_plain_float64_implementation(crop, kind, level):
    odd = crop[:197, :189]  # odd sizes: the 2x2 average pooling drops the last row/column
    distorted = D.distort(odd, kind, level, np.random.default_rng(1))
    assert D.ms_ssim(odd, distorted) == pytest.approx(ms_ssim_reference(odd, distorted), abs=2e-5)


def test_ms_ssim_identity_and_symmetry(crop):
    assert D.ms_ssim(crop, crop) == pytest.approx(1.0, abs=1e-9)
    noisy = D.distort(crop, "noise", 3, np.random.default_rng(0))
    assert D.ms_ssim(crop, noisy) == pytest.approx(D.ms_ssim(noisy, crop), abs=1e-9)


def test_score_map_is_monotone_and_documented():
    assert D.ms_ssim_to_score(1.0) == 5.0
    assert D.ms_ssim_to_score(0.5) == 1.0 and D.ms_ssim_to_score(0.6) == pytest.approx(1.0, abs=1e-9)
    assert D.ms_ssim_to_score(0.99) == pytest.approx(1 + 4 * (2 - 0.4) / 2.1)
    values = np.linspace(0.0, 1.0, 501)
    scores = [D.ms_ssim_to_score(v) for v in values]
    assert all(a <= b for a, b in zip(scores, scores[1:])) and min(scores) == 1.0 and max(scores) == 5.0


def test_jpeg2000_codec_is_what_the_module_says(crop):
    out = D.distort(crop, "jpeg2000", 5)
    # Whichever codec this Pillow has, the heaviest level removes most fine detail.
    assert D.ms_ssim(crop, out) < 0.9
    assert D.HAS_JPEG2000 == bool(__import__("PIL.features", fromlist=["check"]).check("jpg_2000"))
    assert math.isfinite(D.ms_ssim_to_score(D.ms_ssim(crop, out)))
