"""Preprocessing parity with transformers' CLIPImageProcessor on real photographs.

Reference: transformers 5.23's `CLIPImageProcessorPil`, the PIL/NumPy backend. In transformers 5,
`CLIPImageProcessor` itself is the torchvision backend; without torchvision (no CPU wheel here)
`from transformers import CLIPImageProcessor` falls back to this same PIL class with a warning, so
we import it by name. It matches transformers 4's "slow" CLIPImageProcessor: PIL bicubic resize,
numpy crop, float64 rescale cast to float32, float32 normalise.
Photos: scikit-image's bundled CC0 / public-domain images (astronaut, chelsea, coffee, camera,
rocket, hubble_deep_field), resized and cropped to many sizes and aspect ratios.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import rali_edge.preprocess as preprocess
from rali_edge.errors import ImageError, ModelFormatError
from rali_edge.preprocess import PreprocessConfig, Preprocessor, shortest_edge_size

pytest.importorskip("skimage")
from skimage import data  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# openai/clip-vit-large-patch14-336's preprocessor_config.json (old form) and the same in new form.
OLD_FORM = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD,
    "resample": 3, "size": 336,
}  # fmt: skip
NEW_FORM = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": MEAN,
    "image_processor_type": "CLIPImageProcessor", "image_std": STD, "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}  # fmt: skip
# One uint8 level after normalisation, in the channel with the smallest std (the largest step).
LEVEL = 1 / 255 / min(STD)
PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "rocket", "hubble_deep_field"]
# (width, height): portrait, landscape, square, tiny (upscaled), 1x1, near the crop size, panoramas.
SHAPES = [(300, 451), (451, 300), (640, 480), (512, 512), (21, 13), (1, 1), (337, 335), (336, 500), (1200, 120), (40, 900)]


def photo(name: str) -> Image.Image:
    im = Image.fromarray(getattr(data, name)())
    return im  # camera stays "L": both sides must convert it


def reference(images, config: dict = NEW_FORM) -> np.ndarray:
    return CLIPImageProcessorPil(**config)(images, return_tensors="np")["pixel_values"]


def shaped(name: str, size: tuple[int, int]) -> Image.Image:
    # Lanczos down/up-sizing only makes test inputs; the pipeline under test uses bicubic.
    return photo(name).resize(size, Image.Resampling.LANCZOS)


@pytest.mark.parametrize("name", PHOTOS)
def test_parity_with_clip_image_processor(name):
    images = [photo(name)] + [shaped(name, s) for s in SHAPES]
    ours = Preprocessor(PreprocessConfig.from_hf(NEW_FORM))(images).numpy()
    assert ours.dtype == np.float32 and ours.shape == (len(images), 3, 336, 336)
    # Exact: same Pillow resize, same crop, same float64->float32 rescale and float32 normalise.
    np.testing.assert_array_equal(ours, reference(images))


def test_both_config_forms_give_the_same_config_and_pixels():
    old, new = PreprocessConfig.from_hf(OLD_FORM), PreprocessConfig.from_hf(NEW_FORM)
    assert old == new == PreprocessConfig()
    images = [shaped("coffee", (600, 400)), photo("camera")]
    ours = Preprocessor(old)(images).numpy()
    np.testing.assert_array_equal(ours, reference(images, OLD_FORM))
    np.testing.assert_array_equal(ours, reference(images, NEW_FORM))


@pytest.mark.parametrize(
    "config",
    [
        {"size": 224, "crop_size": 224},  # CLIP ViT-L/14 at 224
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 288}},  # non-square crop
        {"size": 200, "crop_size": {"height": 256, "width": 240}},  # crop larger than resize: zero pad
        {"size": 336, "crop_size": 336, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        {"size": 336, "crop_size": 336, "do_center_crop": False},
        {"size": 336, "crop_size": 336, "do_normalize": False, "rescale_factor": 1 / 127.5},
    ],
)
def test_parity_for_other_configs(config):
    images = [shaped("chelsea", (451, 300))]
    ours = Preprocessor(PreprocessConfig.from_hf(config))(images).numpy()
    np.testing.assert_array_equal(ours, reference(images, config))


def test_missing_keys_take_clip_image_processor_defaults():
    # transformers' CLIPImageProcessor defaults to 224, not 336: from_hf must agree with it.
    config = {"image_mean": MEAN, "image_std": STD}
    cfg = PreprocessConfig.from_hf(config)
    assert (cfg.resize_shortest_edge, cfg.crop_height, cfg.crop_width) == (224, 224, 224)
    images = [photo("rocket")]
    np.testing.assert_array_equal(Preprocessor(cfg)(images).numpy(), reference(images, config))


def test_lookup_table_equals_transformers_rescale_and_normalize():
    from transformers.image_transforms import normalize, rescale

    levels = np.tile(np.arange(256, dtype=np.uint8), (3, 1))[:, None, :]  # [3, 1, 256] channels-first
    expected = normalize(rescale(levels, 1 / 255, input_data_format="channels_first"), MEAN, STD,
                         input_data_format="channels_first")  # fmt: skip
    got = Preprocessor().normalize_uint8(torch.from_numpy(levels)).numpy()
    np.testing.assert_array_equal(got, expected)
    # numpy's lookup (decoding threads and Ray's CPU actors) takes views [N, H, W, 3]: the same values
    hwc = levels.transpose(1, 2, 0)[None]  # [1, 1, 256, 3]
    np.testing.assert_array_equal(Preprocessor().normalize(hwc)[0], expected)


@pytest.mark.parametrize("size", [(600, 3), (3, 600)])
def test_absurd_shape_takes_bounded_path_and_stays_close(size):
    # The full resize would be 67200 x 336 pixels, over RESIZE_PIXEL_BUDGET: only the crop window
    # is resized. transformers still copes with this size, so compare. Tolerance: the window path's
    # bound for strips thinner than the crop (see test below), 2 uint8 levels in < 0.1% of values.
    im = shaped("astronaut", size)
    assert np.prod(shortest_edge_size(size[1], size[0], 336)) > preprocess.RESIZE_PIXEL_BUDGET
    diff = np.abs(Preprocessor()([im]).numpy() - reference([im]))
    assert diff.max() <= 2 * LEVEL + 1e-6 and (diff > 0).mean() < 0.001


@pytest.mark.parametrize("name", ["coffee", "camera", "rocket"])
def test_window_path_on_photos_stays_close(monkeypatch, name):
    # Force the bounded path on ordinary shapes to measure it against transformers.
    monkeypatch.setattr(preprocess, "RESIZE_PIXEL_BUDGET", 1)
    pp = Preprocessor()
    # Thinner than the crop (Pillow upscales, horizontal pass first, as we do): only the float32
    # box differs. Measured max 2 levels in <= 0.02% of values; allow 2 levels in 0.1%.
    thin = [shaped(name, s) for s in [(40, 900), (21, 13), (300, 200), (2000, 120), (335, 1000)]]
    diff = np.abs(pp(thin).numpy() - reference(thin))
    assert diff.max() <= 2 * LEVEL + 1e-6 and (diff > 0).mean() < 0.001
    # Thicker (Pillow downscales and may go vertical first): measured max 3 levels, mean 0.03-0.04
    # levels (up to ~12% of one image's values one level off). Allow 3 levels, mean 0.1 level.
    thick = [shaped(name, s) for s in [(417, 1224), (1224, 417), (592, 1286)]]
    diff = np.abs(pp(thick).numpy() - reference(thick))
    assert diff.max() <= 3 * LEVEL + 1e-6 and diff.mean() < 0.1 * LEVEL


def test_huge_elongated_image_does_not_blow_up():
    # 4000x3: transformers would resize to 448000 x 336 (450 MB); we resize only the 336 x 336 window.
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 4000, 3), dtype=np.uint8))
    out = Preprocessor()([im])
    assert out.shape == (1, 3, 336, 336) and torch.isfinite(out).all()


def video_frames(name: str, size: tuple[int, int], count: int = 3) -> list[np.ndarray]:
    base = np.asarray(shaped(name, size).convert("RGB"))
    return [np.ascontiguousarray(np.roll(base, 7 * i, axis=1)) for i in range(count)]


@pytest.mark.parametrize("name, size", [("coffee", (640, 480)), ("astronaut", (1280, 720)), ("chelsea", (300, 451)), ("rocket", (200, 150))])
def test_fast_frame_path_close_to_pil_path(name, size):
    # torch's antialiased bicubic in two separable passes, rounded to uint8 after each like Pillow.
    # Not bit-identical (float arithmetic vs Pillow's 22-bit fixed point, and Pillow 13 sometimes
    # resizes vertically first): measured on 5 photos x 7 video sizes (176x144 .. 3840x2160), at
    # most 2 uint8 levels, in 0.01-0.5% of values. Allow 2 levels in 1% of values.
    frames = video_frames(name, size)
    pp = Preprocessor()
    fast = pp.arrays_to_tensor(frames).numpy()
    slow = pp([Image.fromarray(f) for f in frames]).numpy()
    np.testing.assert_array_equal(slow, reference([Image.fromarray(f) for f in frames]))
    diff = np.abs(fast - slow)
    assert fast.shape == slow.shape and fast.dtype == np.float32
    assert diff.max() <= 2 * LEVEL + 1e-6
    assert (diff > 0).mean() < 0.01


def test_fast_path_exact_when_no_resize_is_needed():
    frames = video_frames("astronaut", (336, 336), count=2)
    pp = Preprocessor()
    np.testing.assert_array_equal(pp.arrays_to_tensor(frames).numpy(), reference([Image.fromarray(f) for f in frames]))


def test_mixed_frames_group_by_shape_and_odd_ones_fall_back_to_pil():
    # Two cameras of different resolutions (interleaved, as a stream batches them) and a
    # greyscale array: each camera's frames take the torch path in one group, exactly as they
    # would alone; the greyscale one goes through Pillow, exactly as the reference; order kept.
    big = video_frames("coffee", (640, 480), 2)
    small = video_frames("rocket", (300, 200), 2)
    grey = np.asarray(photo("camera"))
    pp = Preprocessor()
    got = pp.arrays_to_tensor([big[0], small[0], grey, big[1], small[1]]).numpy()
    np.testing.assert_array_equal(got[[0, 3]], pp.arrays_to_tensor(big).numpy())
    np.testing.assert_array_equal(got[[1, 4]], pp.arrays_to_tensor(small).numpy())
    np.testing.assert_array_equal(got[2], reference([Image.fromarray(grey)])[0])
    assert not np.array_equal(got[[0, 3]], reference([Image.fromarray(f) for f in big]))  # really the torch path
    with pytest.raises(ImageError):
        pp.arrays_to_tensor([np.zeros((4, 4, 3), np.float32), big[0]])


@pytest.mark.gpu
def test_fast_path_on_cuda_matches_cpu():
    # Same algorithm on another device: CUDA float arithmetic may round differently; allow 1 level.
    frames = video_frames("coffee", (1280, 720))
    pp = Preprocessor()
    gpu = pp.arrays_to_tensor(frames, device="cuda")
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - pp.arrays_to_tensor(frames)).abs().max().item() <= LEVEL + 1e-6


def test_inputs_of_every_kind_give_the_same_batch(tmp_path):
    im = shaped("coffee", (500, 333))
    im.save(tmp_path / "a.png")
    pp = Preprocessor()
    batch = pp([tmp_path / "a.png", str(tmp_path / "a.png"), im, np.asarray(im)])
    assert batch.shape == (4, 3, 336, 336)
    for i in range(1, 4):
        assert torch.equal(batch[0], batch[i])
    assert torch.equal(pp.pil_to_tensor(im), batch[0])
    assert torch.equal(pp.pil_to_tensor(im.convert("RGBA")), batch[0])  # opaque alpha changes nothing


def test_config_round_trips_through_json():
    cfg = PreprocessConfig.from_hf({"size": 224, "crop_size": {"height": 224, "width": 256}, "resample": 2})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert PreprocessConfig.from_dict(d) == cfg
    assert d["mean"] == MEAN and d["resize_shortest_edge"] == 224 and d["crop_width"] == 256


@pytest.mark.parametrize(
    "bad",
    [
        {"size": {"height": 336, "width": 336}},  # fixed-size resize: not CLIP's shortest-edge
        {"size": {"shortest_edge": 336, "longest_edge": 500}},
        {"crop_size": {"height": 336}},
        {"image_mean": [0.5, 0.5]},
        {"image_std": [0.5, 0.0, 0.5]},
        {"size": 0},
        {"resample": 42},
    ],
)
def test_unsupported_hf_configs_are_refused(bad):
    with pytest.raises(ModelFormatError):
        PreprocessConfig.from_hf({**NEW_FORM, **bad})


def test_from_dict_refuses_unknown_or_malformed_keys():
    with pytest.raises(ModelFormatError, match="unknown keys"):
        PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), "do_pad": True})
    with pytest.raises(ModelFormatError):
        PreprocessConfig.from_dict({"resize_shortest_edge": "336"})
