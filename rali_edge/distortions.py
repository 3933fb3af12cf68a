"""Synthetic distortions at five levels, and MS-SSIM to label them against the clean image.

Used to train and test the built-in default model (rali_edge/training/) and to make the bundled
sample images. Only numpy, Pillow and torch: nothing here needs OpenCV or scipy.

Every distortion takes an RGB uint8 array [H, W, 3], a level 1 (slight) .. 5 (severe) and a
numpy Generator (for the ones with randomness), and returns an RGB uint8 array of the same size.
The level values are meant for images of about 200-300 pixels a side (the training crops).
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, features

LEVELS = (1, 2, 3, 4, 5)

# Parameters per level 1..5 (index 0 = level 1). Calibrated on training crops of 176..224 pixels
# so that each level gets about the same mean label whatever the distortion (about 4.3, 3.5, 2.8,
# 2.1 and 1.5 on the 1..5 scale; JPEG cannot reach 4.3 and the saturation changes stay milder).
BLUR_SIGMA = (0.7, 1.05, 1.6, 2.6, 5.0)  # pixels
NOISE_STD = (3.5, 6.5, 10.5, 18.0, 35.0)  # on the 0..255 scale, independent per pixel and channel
JPEG_QUALITY = (50, 30, 15, 7, 3)
JPEG2000_RATIO = (8, 18, 36, 72, 240)  # compression ratio (24 bits per pixel / ratio)
WEBP_QUALITY = (40, 20, 8, 3, 0)  # stands in for JPEG2000 when Pillow has no OpenJPEG
UNDEREXPOSE_GAIN = (0.76, 0.62, 0.47, 0.3, 0.15)  # multiplies linear light
OVEREXPOSE_GAIN = (1.33, 1.6, 2.05, 3.0, 6.0)
CONTRAST = (0.86, 0.78, 0.68, 0.55, 0.38)  # keeps this fraction of the deviation from the mean
DESATURATE = (0.7, 0.5, 0.3, 0.15, 0.0)  # PIL ImageEnhance.Color factor (0 = grey)
OVERSATURATE = (1.6, 2.2, 3.0, 4.5, 8.0)
PIXELATE = (2.0, 2.6, 3.5, 5.0, 9.0)  # block size in pixels (the image is shrunk by this factor)
MOTION_LENGTH = (3.0, 4.5, 6.5, 10.0, 20.0)  # length of the straight blur path in pixels

SRGB_GAMMA = 2.2  # exposure is changed in (approximately) linear light, as a camera would


def _check(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {img.dtype} {img.shape}")
    return img


def _param(table, level: int):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return table[level - 1]


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _convolve(img: np.ndarray, kernel: torch.Tensor) -> np.ndarray:
    """2-D convolution of each channel with `kernel` [kh, kw] (odd sizes), reflected borders.
    The three channels go through as a batch of one-channel images (faster than groups=3)."""
    x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[:, None]
    kh, kw = kernel.shape
    mode = "reflect" if min(img.shape[:2]) > max(kh, kw) else "replicate"
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    y = F.conv2d(x, kernel.float()[None, None])
    return _to_uint8(y[:, 0].permute(1, 2, 0).numpy())


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = int(math.ceil(3.5 * sigma)) if radius is None else radius
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img, level, rng=None):
    k = gaussian_kernel1d(_param(BLUR_SIGMA, level))
    x = _convolve(_check(img), k[:, None])  # separable: columns, then rows
    return _convolve(x, k[None, :])


def gaussian_noise(img, level, rng):
    noise = rng.normal(0.0, _param(NOISE_STD, level), size=_check(img).shape)
    return _to_uint8(img.astype(np.float64) + noise)


def _encode_decode(img: np.ndarray, **save) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, **save)
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))


def jpeg(img, level, rng=None):
    return _encode_decode(_check(img), format="JPEG", quality=_param(JPEG_QUALITY, level))


HAS_JPEG2000 = bool(features.check("jpg_2000"))


def jpeg2000(img, level, rng=None):
    """JPEG2000 through Pillow's OpenJPEG; WebP at low quality (a similar wavelet-free but
    ringing/blurring codec) when this Pillow was built without OpenJPEG."""
    _check(img)
    if HAS_JPEG2000:
        return _encode_decode(img, format="JPEG2000", quality_mode="rates", quality_layers=[_param(JPEG2000_RATIO, level)])
    return _encode_decode(img, format="WEBP", quality=_param(WEBP_QUALITY, level))


def _exposure(img: np.ndarray, gain: float) -> np.ndarray:
    linear = (img.astype(np.float64) / 255.0) ** SRGB_GAMMA
    return _to_uint8(255.0 * np.clip(linear * gain, 0.0, 1.0) ** (1.0 / SRGB_GAMMA))


def underexpose(img, level, rng=None):
    return _exposure(_check(img), _param(UNDEREXPOSE_GAIN, level))


def overexpose(img, level, rng=None):
    return _exposure(_check(img), _param(OVEREXPOSE_GAIN, level))


def contrast(img, level, rng=None):
    x = _check(img).astype(np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8(mean + (x - mean) * _param(CONTRAST, level))


def desaturate(img, level, rng=None):
    return np.asarray(ImageEnhance.Color(Image.fromarray(_check(img))).enhance(_param(DESATURATE, level)))


def oversaturate(img, level, rng=None):
    return np.asarray(ImageEnhance.Color(Image.fromarray(_check(img))).enhance(_param(OVERSATURATE, level)))


def pixelate(img, level, rng=None):
    block = _param(PIXELATE, level)
    h, w = _check(img).shape[:2]
    small = Image.fromarray(img).resize((max(1, round(w / block)), max(1, round(h / block))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def motion_kernel(length: float, angle_deg: float) -> torch.Tensor:
    """A straight blur path of `length` pixels at `angle_deg`, drawn with sub-pixel samples."""
    radius = int(math.ceil(length / 2))
    size = 2 * radius + 1
    kernel = torch.zeros(size, size, dtype=torch.float64)
    theta = math.radians(angle_deg)
    for t in np.linspace(-length / 2, length / 2, 8 * size):
        x, y = radius + t * math.cos(theta), radius - t * math.sin(theta)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size:
                kernel[y0 + dy, x0 + dx] += wgt
    return kernel / kernel.sum()


def motion_blur(img, level, rng):
    angle = float(rng.uniform(0.0, 180.0))
    return _convolve(_check(img), motion_kernel(_param(MOTION_LENGTH, level), angle))


Distortion = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

DISTORTIONS: dict[str, Distortion] = {
    "blur": gaussian_blur,
    "noise": gaussian_noise,
    "jpeg": jpeg,
    "jpeg2000": jpeg2000,
    "underexpose": underexpose,
    "overexpose": overexpose,
    "contrast": contrast,
    "desaturate": desaturate,
    "oversaturate": oversaturate,
    "pixelate": pixelate,
    "motion": motion_blur,
}


def distort(img: np.ndarray, kind: str, level: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply the distortion `kind` (a key of DISTORTIONS) at `level` 1..5."""
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; choose one of {', '.join(DISTORTIONS)}")
    return DISTORTIONS[kind](img, level, rng if rng is not None else np.random.default_rng(0))


# --- MS-SSIM -------------------------------------------------------------------------------
# Wang, Simoncelli, Bovik, "Multi-scale structural similarity for image quality assessment"
# (2003): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, five scales with these weights.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
K1, K2 = 0.01, 0.03
MS_SSIM_MIN_SIZE = (SSIM_WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # 161: the window fits at scale 5


def _as_nchw(img) -> torch.Tensor:
    x = img.double() if isinstance(img, torch.Tensor) else torch.tensor(np.asarray(img), dtype=torch.float64)
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:  # H, W, C
        return x.permute(2, 0, 1)[:, None]  # each channel its own image
    raise ValueError(f"expected [H, W] or [H, W, C], got shape {tuple(x.shape)}")


def _valid_filter(t: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable filter over the last two dims without padding, as sums of shifted slices
    (on a CPU this is ~40x faster than conv2d with one input channel)."""
    k = len(taps)
    h, w = t.shape[-2] - k + 1, t.shape[-1] - k + 1
    t = sum(taps[i] * t[..., i : i + h, :] for i in range(k))
    return sum(taps[i] * t[..., :, i : i + w] for i in range(k))


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, data_range: float):
    """Mean SSIM (luminance x contrast-structure) and mean contrast-structure over the valid
    window positions, per image: two tensors [N]. (Filtering without padding, as Wang et al.)"""
    g = gaussian_kernel1d(SSIM_SIGMA, SSIM_WINDOW // 2)
    # The five local moments go through the separable window in one pass, as channels of a batch.
    # float32 is 5-10x faster here than float64; moments of the values shifted to mid-range keep
    # its rounding far below the constants c1, c2 (variances of ~1e4 lose ~1e-3).
    shift = data_range / 2
    xs, ys = (x - shift).float(), (y - shift).float()
    moments = _valid_filter(torch.cat([xs, ys, xs * xs, ys * ys, xs * ys], dim=1), g.float())
    mu_xs, mu_ys, xx, yy, xy = moments.double().unbind(1)
    var_x = xx - mu_xs**2
    var_y = yy - mu_ys**2
    cov = xy - mu_xs * mu_ys
    mu_x, mu_y = mu_xs + shift, mu_ys + shift
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    return (lum * cs).mean(dim=(1, 2)), cs.mean(dim=(1, 2))


def ssim(ref, img, data_range: float = 255.0) -> float:
    """Single-scale SSIM (mean over valid windows, averaged over channels)."""
    x, y = _as_nchw(ref), _as_nchw(img)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return float(_ssim_terms(x, y, data_range)[0].mean())


def ms_ssim(ref, img, data_range: float = 255.0) -> float:
    """MS-SSIM of `img` against `ref` ([H, W] or [H, W, C] arrays), computed on each channel and
    averaged over channels (so colour changes count, not only luminance). Both sides must be at
    least 161 pixels so that the 11x11 window fits at the fifth scale."""
    x, y = _as_nchw(ref), _as_nchw(img)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIZE:
        raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE} pixels a side, got {tuple(x.shape[-2:])}")
    result = torch.ones(x.shape[0], dtype=torch.float64)
    for scale, weight in enumerate(MS_SSIM_WEIGHTS):
        full, cs = _ssim_terms(x, y, data_range)
        # Contrast-structure at the finer scales, the full SSIM (with luminance) at the coarsest.
        # Clamped at 0: anti-correlated content can go negative, and the powers are fractional.
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        result = result * (full if last else cs).clamp(min=0) ** weight
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return float(result.mean())


# --- MS-SSIM -> quality label --------------------------------------------------------------
# MS-SSIM crowds near 1 for slight distortions, so the map works on -log10(1 - MS-SSIM), which
# spreads 0.9, 0.99, 0.999 evenly; it is monotone, so rank metrics (SRCC) do not depend on it.
LABEL_LOG_LOW = 0.4  # -log10(1 - 0.60): MS-SSIM 0.60 and below -> 1
LABEL_LOG_HIGH = 2.5  # -log10(1 - 0.99684): MS-SSIM 0.99684 and above -> 5


def ms_ssim_to_score(value: float) -> float:
    """Monotone map of MS-SSIM to the 1..5 score scale: 1 + 4 * clip((q - 0.4) / (2.5 - 0.4), 0, 1)
    with q = -log10(1 - MS-SSIM)."""
    q = -math.log10(max(1.0 - float(value), 1e-12))
    return 1.0 + 4.0 * min(max((q - LABEL_LOG_LOW) / (LABEL_LOG_HIGH - LABEL_LOG_LOW), 0.0), 1.0)


__all__ = ["DISTORTIONS", "LEVELS", "distort", "ms_ssim", "ssim", "ms_ssim_to_score", "HAS_JPEG2000"]
