"""CLIP preprocessing with the same pixels as transformers' `CLIPImageProcessor`.

Steps (transformers' PIL backend, `CLIPImageProcessorPil`): convert to RGB (images.py), resize so
the shortest edge is `resize_shortest_edge` (the long edge is `int(size * long / short)`, truncated)
with Pillow's filter `resample` (bicubic), center crop (zero padding where the image is smaller),
rescale (`uint8 * rescale_factor` in float64, then float32) and normalise (`(x - mean) / std` in
float32). The last two steps are one exact 256-entry lookup table per channel.

Two paths:
- `pil_to_tensor` / `__call__`: Pillow resize, bit-identical to transformers for every normal
  shape. Absurd shapes (the resized image would exceed RESIZE_PIXEL_BUDGET, e.g. a 4000x3 strip
  whose resize is 448000x336) resize only the crop window, in two 1-D Pillow passes, so memory
  stays bounded. Not bit-identical (measured on photos forced down this path): strips thinner than
  the crop, the usual absurd case, get at most 2 uint8 levels off in under 0.1% of values (Pillow
  takes the window's box as float32); thicker ones up to 3 levels in up to ~12%, because Pillow 13
  then picks its own pass order (sometimes vertical first) by a rule we do not replicate.
- `arrays_to_tensor`: video frames, batched, on any torch device, with torch's antialiased bicubic
  in two separable passes rounded to uint8 after each, like Pillow. Not bit-identical: at most
  2 uint8 levels in 0.01-0.5% of values (tests/test_preprocess.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rali_edge.errors import ImageError, ModelFormatError
from rali_edge.images import open_image

if TYPE_CHECKING:
    import torch

# torch is imported inside the tensor methods only: `PreprocessConfig` and the numpy methods
# (`views_array`, `pool`) serve the torch-free TensorRT runner (engines/tensorrt.py) as they are.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Largest full resize done the exact way: 4096 x 4096 pixels covers aspect ratios up to 1:149 at 336.
RESIZE_PIXEL_BUDGET = 1 << 24
# Pillow filters that torch's antialiased interpolate reproduces (same kernels, same support).
TORCH_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
# Defaults of transformers' CLIPImageProcessor, used by from_hf for keys a config leaves out.
HF_CLIP_DEFAULTS = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}


@dataclass
class PreprocessConfig:
    resize_shortest_edge: int = 336
    crop_height: int = 336
    crop_width: int = 336
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True  # kept for fidelity; the model needs RGB, so inputs always become RGB
    resample: int = 3  # a PIL.Image.Resampling value; 3 = bicubic
    # How the model looks at an image: its views, whose scores are averaged (Preprocessor.pool).
    # The published models have one view, the resized and centre-cropped image (CLIPImageProcessor).
    # native_grid g adds g x g crops of the crop size at the image's own resolution, spread evenly
    # over it: noise and compression artefacts survive there, where a 5-25x shrink erases them.
    native_grid: int = 0
    resized_view: bool = True
    # The native views' corners are moved up and left to multiples of this (1: where the grid
    # puts them). 16 puts a JPEG's 8 x 8 blocks and 16 x 16 colour blocks, which start at the
    # image's corner, at the same places in every view and in every patch of a 16-pixel ViT.
    native_align: int = 1

    def __post_init__(self):
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        problems = []
        if min(self.resize_shortest_edge, self.crop_height, self.crop_width) <= 0:
            problems.append("sizes must be positive")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need 3 values (R, G, B)")
        if any(s == 0 for s in self.std):
            problems.append("std must not be 0")
        if self.native_grid < 0 or (self.native_grid == 0 and not self.resized_view):
            problems.append("the model needs at least one view (native_grid >= 1 or resized_view)")
        if self.native_align < 1:
            problems.append("native_align must be at least 1")
        if self.resample not in {int(r) for r in Image.Resampling}:
            problems.append(f"unknown resample filter {self.resample}")
        if problems:
            raise ModelFormatError(f"preprocess config: {'; '.join(problems)} ({self})")

    @classmethod
    def from_hf(cls, cfg: dict) -> "PreprocessConfig":
        """From a `preprocessor_config.json` dict, old (`"size": 336`, `"crop_size": 336`) or new
        (`{"shortest_edge": 336}`, `{"height": 336, "width": 336}`) form; missing keys take
        CLIPImageProcessor's defaults, as transformers would."""
        size = _hf_size(cfg.get("size", HF_CLIP_DEFAULTS["size"]))
        crop_h, crop_w = _hf_crop(cfg.get("crop_size", HF_CLIP_DEFAULTS["crop_size"]))
        flags = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")
        return cls(
            resize_shortest_edge=size,
            crop_height=crop_h,
            crop_width=crop_w,
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            resample=int(cfg.get("resample", 3)),
            **{k: bool(cfg.get(k, True)) for k in flags},
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelFormatError(f"preprocess config: unknown keys {unknown}; made by a newer rali-edge?")
        try:
            return cls(**d)
        except TypeError as e:
            raise ModelFormatError(f"preprocess config: {e}") from None

    @property
    def crop(self) -> tuple[int, int]:
        return self.crop_height, self.crop_width

    @property
    def view_count(self) -> int:
        return self.native_grid**2 + int(self.resized_view)


class Preprocessor:
    """Images in, a float32 [B, 3, H, W] batch out, as CLIPImageProcessor would make it."""

    def __init__(self, config: PreprocessConfig | None = None):
        self.config = config or PreprocessConfig()
        self.lut = rescale_normalize_lut(self.config)  # [3, 256] float32 (numpy)

    @property
    def view_count(self) -> int:
        return self.config.view_count

    def __call__(self, images: list) -> torch.Tensor:
        """Anything `open_image` accepts -> [B * view_count, 3, H, W], each image's views together;
        the first bad input raises ImageError. To skip bad files and go on, call open_image per
        input and views_tensor on the good ones."""
        import torch

        if not images:
            raise ValueError("Preprocessor needs at least one image")
        return torch.cat([self.views_tensor(open_image(x)) for x in images])

    def views_tensor(self, img: Image.Image) -> torch.Tensor:
        """One image -> its views, [view_count, 3, H, W] float32."""
        import torch

        return torch.from_numpy(self.views_array(img))

    def views_array(self, img: Image.Image) -> np.ndarray:
        """One image -> its views, [view_count, 3, H, W] float32 numpy (no torch needed): the
        native-resolution grid crops first, then the resized view."""
        return self.normalize(self.views_uint8(img))

    def views_uint8(self, img: Image.Image) -> np.ndarray:
        """One image -> its views' pixels before rescale and normalisation, [view_count, H, W, 3]
        uint8: a quarter of the float views' bytes, for shipping them to another process."""
        if img.mode != "RGB":
            img = open_image(img)
        views = [np.asarray(c, dtype=np.uint8) for c in self.native_crops(img)]
        if self.config.resized_view:
            views.append(np.asarray(self.resize_and_crop(img), dtype=np.uint8))
        return np.stack(views)

    def normalize(self, views_hwc: np.ndarray) -> np.ndarray:
        """uint8 views [N, H, W, 3] -> the model's input [N, 3, H, W] float32 (transformers' values).
        A table lookup per channel, written in place: twice as fast as one fancy index over all three
        (at 16 views a photograph this lookup costs more than decoding a 1 MP JPEG)."""
        out = np.empty((len(views_hwc), 3, *views_hwc.shape[1:3]), dtype=np.float32)
        for c in range(3):  # mode="wrap": no bounds check (a uint8 is always inside the 256 entries)
            np.take(self.lut[c], views_hwc[..., c], out=out[:, c], mode="wrap")
        return out

    def native_crops(self, img):
        """The native_grid x native_grid crops (PIL images, or HxWx3 arrays for an array) at the
        image's own resolution, row by row. Crop centres sit at the middles of a g x g grid of
        cells, moved inwards where a crop would leave the image. An image smaller than a crop is
        first enlarged (the resize's filter) until the crop fits."""
        g, (ch, cw) = self.config.native_grid, self.config.crop
        if g == 0:
            return []
        is_array = isinstance(img, np.ndarray)
        h, w = img.shape[:2] if is_array else (img.height, img.width)
        if h < ch or w < cw:
            k = max(ch / h, cw / w)
            size = (max(cw, math.ceil(w * k)), max(ch, math.ceil(h * k)))
            pil = Image.fromarray(img) if is_array else img
            img = pil.resize(size, resample=self.config.resample)
            img = np.asarray(img) if is_array else img
            h, w = size[1], size[0]
        crops = []
        for top, left in grid_origins((h, w), (ch, cw), g, self.config.native_align):
            crops.append(img[top : top + ch, left : left + cw] if is_array else img.crop((left, top, left + cw, top + ch)))
        return crops

    def pool(self, scores):
        """Per-view scores (torch or numpy, [B * view_count, ...]) -> per-image, the mean of each
        image's views. With one view, the scores as they are."""
        v = self.view_count
        if v == 1:
            return scores
        if len(scores) % v:
            raise ValueError(f"{len(scores)} rows are not whole images of {v} views each")
        return scores.reshape(len(scores) // v, v, *scores.shape[1:]).mean(1)

    def pil_to_tensor(self, img: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> [3, H, W] float32 (any other mode goes through open_image first)."""
        import torch

        return torch.from_numpy(self.pil_to_array(img))

    def pil_to_array(self, img: Image.Image) -> np.ndarray:
        """One RGB PIL image -> [3, H, W] float32 numpy array (no torch needed)."""
        if img.mode != "RGB":
            img = open_image(img)
        return self.normalize(np.asarray(self.resize_and_crop(img), dtype=np.uint8)[None])[0]

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """The uint8 pixels the model sees, before rescale and normalisation."""
        c = self.config
        if c.do_resize:
            size = shortest_edge_size(img.height, img.width, c.resize_shortest_edge)
            if c.do_center_crop and size[0] * size[1] > RESIZE_PIXEL_BUDGET:
                return resize_crop_window(img, size, c.crop, c.resample)
            img = img.resize(size[::-1], resample=c.resample)
        return center_crop_pil(img, c.crop) if c.do_center_crop else img

    def arrays_to_tensor(self, frames: list, device: torch.device | str | None = None) -> torch.Tensor:
        """Video frames (RGB uint8 HxWx3 arrays) -> [B * view_count, 3, H, W] float32 on `device`,
        each frame's views together, as `__call__` orders them. The native crops are slices of
        the frames (no resampling, so the same pixels as the Pillow path)."""
        import torch

        if not frames:
            raise ValueError("arrays_to_tensor needs at least one frame")
        if self.view_count == 1 and self.config.resized_view:
            return self.resized_arrays_to_tensor(frames, device)
        parts = []
        for f in frames:
            if not (isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3):
                f = np.asarray(open_image(f))
            parts.append(torch.from_numpy(self.normalize(np.stack(self.native_crops(f)))))
        out = torch.stack(parts).to(device)  # [B, g*g, 3, H, W]
        if self.config.resized_view:
            out = torch.cat([out, self.resized_arrays_to_tensor(frames, device)[:, None]], dim=1)
        return out.flatten(0, 1)

    def resized_arrays_to_tensor(self, frames: list, device: torch.device | str | None = None) -> torch.Tensor:
        """Video frames (RGB uint8 HxWx3 arrays) -> their resized views, [B, 3, H, W]. Frames of one
        shape resize together with torch, so cameras of different resolutions sharing a batch
        still take that path, one group per shape; the rest (absurd aspect ratios, filters torch
        lacks, arrays that are not RGB uint8) go through the Pillow path one by one."""
        import torch

        if not frames:
            raise ValueError("arrays_to_tensor needs at least one frame")
        groups: dict = {}
        for i, f in enumerate(frames):
            groups.setdefault(f.shape if isinstance(f, np.ndarray) else id(f), []).append(i)
        out = None
        for indices in groups.values():
            group = [frames[i] for i in indices]
            if self._torch_can_batch(group):
                batch = torch.from_numpy(np.stack(group)).to(device).permute(0, 3, 1, 2)
                part = self.normalize_uint8(self.resize_and_crop_tensor(batch))
            else:
                part = torch.stack([self.pil_to_tensor(open_image(f)) for f in group]).to(device)
            if len(groups) == 1:
                return part
            if out is None:
                out = part.new_empty((len(frames), *part.shape[1:]))
            out[indices] = part  # each group back in its frames' places
        return out

    def resize_and_crop_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, h, w] -> uint8 [B, 3, H, W], Pillow-like: separable passes, uint8 rounding
        after each, and the crop taken between the passes (each pass is 1-D, so that is exact)."""
        c = self.config
        x = batch
        if c.do_resize:
            nh, nw = shortest_edge_size(x.shape[-2], x.shape[-1], c.resize_shortest_edge)
            x = _torch_resize_1d(x, nw, dim=-1, mode=TORCH_MODES[c.resample])
            if c.do_center_crop:
                x = center_crop_tensor(x, (x.shape[-2], c.crop_width))
            x = _torch_resize_1d(x, nh, dim=-2, mode=TORCH_MODES[c.resample])
        return center_crop_tensor(x, c.crop) if c.do_center_crop else x

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float32 by table lookup: bit-identical to transformers' rescale
        (float64 multiply, cast to float32) followed by its float32 normalisation."""
        import torch

        lut = torch.from_numpy(self.lut).to(pixels.device)
        channel_offset = (torch.arange(3, device=pixels.device) * 256).view(3, 1, 1)
        return lut.flatten()[pixels.long() + channel_offset]

    def _torch_can_batch(self, frames: list) -> bool:
        first = frames[0]
        if not all(isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 for f in frames):
            return False
        if first.shape[2] != 3 or any(f.shape != first.shape for f in frames):
            return False
        if not self.config.do_resize:
            return True
        nh, nw = shortest_edge_size(first.shape[0], first.shape[1], self.config.resize_shortest_edge)
        return self.config.resample in TORCH_MODES and nh * nw <= RESIZE_PIXEL_BUDGET


def read_views(preprocess: Preprocessor, path: str, normalized: bool = True) -> tuple[np.ndarray | None, str | None]:
    """One file or URI -> its views ([view_count, 3, H, W] float32; normalized=False: the uint8
    pixels, [view_count, H, W, 3]), or None and why it cannot be read (the reason alone: a result
    names its path already). The local pipeline's threads and Ray's decoding tasks both read
    files through this; it needs no torch, so Ray's decoding workers never import it."""
    try:
        img = open_image(path)
        return (preprocess.views_array(img) if normalized else preprocess.views_uint8(img)), None
    except ImageError as e:
        return None, str(e).removeprefix(f"{path}: ")


def rescale_normalize_lut(c: PreprocessConfig) -> np.ndarray:
    """[3, 256] float32: the value transformers computes for each channel and uint8 level."""
    levels = np.arange(256, dtype=np.float64)
    x = (levels * c.rescale_factor).astype(np.float32) if c.do_rescale else levels.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if c.do_normalize:
        mean = np.asarray(c.mean, dtype=np.float32)[:, None]
        std = np.asarray(c.std, dtype=np.float32)[:, None]
        x = (x - mean) / std  # float32 throughout, as transformers' normalize
    return np.ascontiguousarray(x, dtype=np.float32)


def grid_origins(size: tuple[int, int], crop: tuple[int, int], g: int, align: int = 1) -> list[tuple[int, int]]:
    """(top, left) of g x g crops centred on the cells of a g x g grid over `size`, row by row,
    clamped inside the image (which must be at least the crop's size), then moved up and left to
    multiples of `align`."""
    (h, w), (ch, cw) = size, crop
    tops = [min(max(round((i + 0.5) * h / g - ch / 2), 0), h - ch) // align * align for i in range(g)]
    lefts = [min(max(round((j + 0.5) * w / g - cw / 2), 0), w - cw) // align * align for j in range(g)]
    return [(t, l) for t in tops for l in lefts]


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shortest edge, truncating the long one as transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def crop_origin(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre crop; negative where the image is smaller than the crop."""
    return (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2


def center_crop_pil(img: Image.Image, crop: tuple[int, int]) -> Image.Image:
    """transformers' center_crop: Pillow fills the area outside the image with zeros, as it pads."""
    top, left = crop_origin((img.height, img.width), crop)
    if (top, left) == (0, 0) and (img.height, img.width) == crop:
        return img
    return img.crop((left, top, left + crop[1], top + crop[0]))


def center_crop_tensor(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    top, left = crop_origin((x.shape[-2], x.shape[-1]), crop)
    # Zero-pad where the image is smaller than the crop (negative origin), like center_crop_pil.
    pad_top, pad_left = max(0, -top), max(0, -left)
    pad_bottom = max(0, top + crop[0] - x.shape[-2])
    pad_right = max(0, left + crop[1] - x.shape[-1])
    if pad_top or pad_left or pad_bottom or pad_right:
        import torch.nn.functional as F

        x = F.pad(x, (pad_left, pad_right, pad_top, pad_bottom))
        top, left = top + pad_top, left + pad_left
    return x[..., top : top + crop[0], left : left + crop[1]]


def resize_crop_window(img: Image.Image, size: tuple[int, int], crop: tuple[int, int], resample: int):
    """Resize to `size` and center crop, computing only the cropped window: source rows the window
    needs, then a horizontal pass and a vertical pass over the window's box (Pillow's own order)."""
    (nh, nw), (h, w) = size, (img.height, img.width)
    top, left = crop_origin(size, crop)
    # The part of the crop window that lies inside the resized image; the rest is zero padding.
    y0, y1, x0, x1 = max(top, 0), min(top + crop[0], nh), max(left, 0), min(left + crop[1], nw)
    sy, sx = h / nh, w / nw
    # Source rows under the window plus the filter's reach (3 = the widest Pillow filter, Lanczos).
    reach = 3 * max(sy, 1.0) + 2
    r0, r1 = max(0, math.floor(y0 * sy - reach)), min(h, math.ceil(y1 * sy + reach))
    rows = img.crop((0, r0, w, r1))
    wide = rows.resize((x1 - x0, r1 - r0), resample=resample, box=(x0 * sx, 0, x1 * sx, r1 - r0))
    window = wide.resize((x1 - x0, y1 - y0), resample=resample, box=(0, y0 * sy - r0, x1 - x0, y1 * sy - r0))
    if (y1 - y0, x1 - x0) == crop:
        return window
    out = Image.new("RGB", crop[::-1])
    out.paste(window, (x0 - left, y0 - top))
    return out


def _torch_resize_1d(x: torch.Tensor, new: int, dim: int, mode: str) -> torch.Tensor:
    """One antialiased pass along `dim`, rounded and clipped to uint8 like Pillow's passes."""
    import torch
    import torch.nn.functional as F

    if x.shape[dim] == new:
        return x
    size = (x.shape[-2], new) if dim == -1 else (new, x.shape[-1])
    y = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _hf_size(size) -> int:
    if isinstance(size, (int, float)):
        return int(size)
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"])
    raise ModelFormatError(
        f"preprocessor_config.json: size {size!r} is not supported; rali-edge resizes the shortest "
        "edge (`\"size\": 336` or `{\"shortest_edge\": 336}`)"
    )


def _hf_crop(crop) -> tuple[int, int]:
    if isinstance(crop, (int, float)):
        return int(crop), int(crop)
    if isinstance(crop, dict) and {"height", "width"} <= set(crop):
        return int(crop["height"]), int(crop["width"])
    raise ModelFormatError(
        f"preprocessor_config.json: crop_size {crop!r} is not supported; expected 336 or "
        "{\"height\": 336, \"width\": 336}"
    )
