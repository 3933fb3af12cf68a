"""open_image: every awkward input gives a valid RGB image or an ImageError naming file and cause."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from bad_images import (
    ANIMATED_COLOURS,
    gray16_gradient,
    palette_alpha_image,
    photo,
    png_header_only,
    write_bad_images,
)
from rali_edge.errors import ImageError, RaliEdgeError
from rali_edge.images import DEFAULT_MAX_PIXELS, open_image


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return write_bad_images(tmp_path_factory.mktemp("bad_images"))


REFUSED = {
    "zero_byte": "empty file (0 bytes)",
    "truncated_jpeg": "truncated or corrupt image data",
    "truncated_png": "truncated or corrupt image data",
    "not_an_image": "not an image file (cannot identify format)",
    "bomb": f"image too large: 400000000 pixels > limit {DEFAULT_MAX_PIXELS} (set RALI_MAX_PIXELS to raise it)",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_file_gives_image_error_naming_file_and_cause(bad, name):
    path, expect_ok = bad[name]
    assert not expect_ok
    with pytest.raises(ImageError) as err:
        open_image(path)
    assert str(err.value).startswith(f"{path}: {REFUSED[name]}")


def test_every_generated_file_matches_its_expectation(bad):
    # One bad file never stops the others: a loop over the whole set keeps going.
    results = {}
    for name, (path, expect_ok) in bad.items():
        try:
            im = open_image(path)
            results[name] = im.mode == "RGB" and np.asarray(im).dtype == np.uint8
        except ImageError:
            results[name] = False
    assert results == {name: ok for name, (_, ok) in bad.items()}


def test_truncated_images_stay_errors():
    # rali_edge must never switch Pillow to "fill truncated images with grey".
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_cmyk_jpeg_keeps_colours(bad):
    got = np.asarray(open_image(bad["cmyk"][0])).astype(float)
    # Reference: the original RGB photo. JPEG loss is a few levels; inverted or swapped
    # channels (the usual CMYK bug) would be off by ~100.
    assert got.shape == (512, 512, 3)
    assert np.abs(got - photo()).mean() < 6


def test_gray16_is_scaled_to_8_bits_not_clipped(bad):
    got = np.asarray(open_image(bad["gray16"][0]))
    row = got[0, :, 0].astype(int)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    # Reference: round(v * 255 / 65535) of the ramp. Clipping (Pillow's convert) would give 255
    # for every value above 255, i.e. all but the first few pixels.
    expected = np.round(gray16_gradient()[0].astype(float) * 255 / 65535).astype(int)
    assert np.array_equal(row, expected)
    assert row.min() == 0 and row.max() == 255 and len(np.unique(row)) == 256


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_modes_from_memory(mode):
    ramp = gray16_gradient(width=512, height=2)
    im = {
        "I;16": lambda: Image.fromarray(ramp),
        "I;16B": lambda: Image.frombytes("I;16B", (512, 2), ramp.astype(">u2").tobytes()),
        "I": lambda: Image.fromarray(ramp.astype(np.int32)),  # what older Pillows give for 16-bit PNGs
    }[mode]()
    assert im.mode == mode
    got = np.asarray(open_image(im))[0, :, 0].astype(int)
    assert np.array_equal(got, np.round(ramp[0].astype(float) * 255 / 65535).astype(int))


def test_16_bit_rgb_png_keeps_high_byte(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgb16 = np.zeros((2, 256, 3), np.uint16)
    rgb16[..., 1] = np.arange(256) * 257  # 0..65535
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), rgb16[..., ::-1])  # OpenCV writes BGR; Pillow cannot write 16-bit RGB
    got = np.asarray(open_image(path))
    assert np.array_equal(got[0, :, 1], np.arange(256))  # full range: 65535 -> 255, not clipped


def test_palette_alpha_is_composited_on_white_like_transformers(bad):
    from transformers.image_transforms import convert_to_rgb

    got = np.asarray(open_image(bad["palette_alpha"][0]))
    assert (got[:, :32] == 255).all()  # transparent half -> white
    assert (got[:, 32:] == (200, 30, 40)).all()  # opaque half keeps its palette colour
    # Reference: transformers' own RGB conversion of the same image (what CLIPImageProcessor runs).
    reference = convert_to_rgb(Image.open(bad["palette_alpha"][0]), return_numpy=True)
    assert np.array_equal(got, reference)


def test_rgba_array_and_file_agree_with_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgba = np.dstack([photo(), np.tile(np.arange(512, dtype=np.uint16) // 2, (512, 1)).astype(np.uint8)])
    reference = convert_to_rgb(Image.fromarray(rgba), return_numpy=True)
    assert np.array_equal(np.asarray(open_image(Image.fromarray(rgba))), reference)
    assert np.array_equal(np.asarray(open_image(rgba)), reference)  # HxWx4 array: same rule


def test_grayscale_becomes_three_equal_channels(bad):
    got = np.asarray(open_image(bad["gray"][0]))
    assert got.shape == (512, 512, 3)
    assert np.array_equal(got[..., 0], np.asarray(Image.fromarray(photo()).convert("L")))
    assert (got[..., 0] == got[..., 2]).all()


@pytest.mark.parametrize("name", ["animated", "animated_apng"])
def test_animated_gives_first_frame(bad, name):
    got = np.asarray(open_image(bad[name][0]))
    assert got.shape == (30, 40, 3)
    assert (got == ANIMATED_COLOURS[0]).all()


def test_animated_webp_gives_first_frame(tmp_path):
    from PIL import features

    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (40, 30), c) for c in ANIMATED_COLOURS]
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], lossless=True)
    assert (np.asarray(open_image(tmp_path / "a.webp")) == ANIMATED_COLOURS[0]).all()


def test_tiny_and_elongated(bad):
    assert open_image(bad["one_by_one"][0]).size == (1, 1)
    assert open_image(bad["elongated"][0]).size == (4000, 3)


def test_exif_orientation_is_not_applied(tmp_path):
    # CLIPImageProcessor does not apply EXIF orientation, so neither do we: same pixels, same scores.
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(photo()[:, :300]).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "rotated.jpg").size == (300, 512)


def test_all_source_kinds_give_the_same_pixels(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(photo()).save(path)
    reference = photo()
    sources = [path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), Image.open(path), reference]
    for source in sources:
        im = open_image(source)
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), reference), type(source)
    with open(path, "rb") as f:
        assert np.array_equal(np.asarray(open_image(f)), reference)
    gray = reference[..., 0]
    assert np.array_equal(np.asarray(open_image(gray))[..., 1], gray)
    assert np.array_equal(np.asarray(open_image(gray[..., None]))[..., 2], gray)


def test_result_is_independent_of_a_closed_source(tmp_path):
    Image.fromarray(photo()).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as src:
        im = open_image(src)
    assert np.asarray(im).shape == (512, 512, 3)  # usable after the source closed


@pytest.mark.parametrize(
    "source, message",
    [
        ("does/not/exist.jpg", "does/not/exist.jpg: file not found"),
        (b"", "<bytes>: empty file (0 bytes)"),
        (b"GIF89a garbage", "<bytes>: "),
        (np.zeros((4, 4, 3), np.float32), "<array>: arrays must be uint8"),
        (np.zeros((4, 4, 2), np.uint8), "<array>: arrays must be uint8"),
        (np.zeros((0, 4, 3), np.uint8), "<array>: empty image (4x0 pixels)"),
        (12, "<input>: cannot read an image from a int"),
    ],
)
def test_other_bad_sources(source, message):
    with pytest.raises(ImageError) as err:
        open_image(source)
    assert str(err.value).startswith(message)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        open_image(tmp_path)


def test_name_overrides_description():
    with pytest.raises(ImageError, match=r"^upload 7: empty file"):
        open_image(b"", name="upload 7")


def test_pixel_cap_follows_environment(monkeypatch, tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    monkeypatch.setenv("RALI_MAX_PIXELS", "399")
    with pytest.raises(ImageError, match="400 pixels > limit 399"):
        open_image(tmp_path / "small.png")
    monkeypatch.setenv("RALI_MAX_PIXELS", "400")
    assert open_image(tmp_path / "small.png").size == (20, 20)
    monkeypatch.setenv("RALI_MAX_PIXELS", "lots")
    with pytest.raises(RaliEdgeError, match="RALI_MAX_PIXELS must be a positive number"):
        open_image(tmp_path / "small.png")


def test_pillow_bomb_warning_is_silenced_below_our_cap(tmp_path):
    # 9500 x 9500 = 90.25M pixels: over Pillow's warning threshold (89.5M), under our 100M cap.
    # The header-only file then fails to decode, as it should, and no warning leaks out.
    png_header_only(tmp_path / "big.png", 9500, 9500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="truncated or corrupt"):
            open_image(tmp_path / "big.png")


def test_raised_cap_lets_pillow_open_bigger_images(monkeypatch, tmp_path):
    # With RALI_MAX_PIXELS above 2 x Pillow's MAX_IMAGE_PIXELS, Pillow's own refusal must not win:
    # the 400M-pixel header opens and the missing data is what fails.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    monkeypatch.setenv("RALI_MAX_PIXELS", "500000000")
    png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(tmp_path / "huge.png")


def test_palette_helper_really_has_transparency():
    # Guards the fixture itself: without the transparency entry the white check above is vacuous.
    assert palette_alpha_image().info.get("transparency") == 0


# --- finding images ------------------------------------------------------------------------------
def test_find_images_one_table_natural_order_no_duplicates(tmp_path):
    from rali_edge.images import IMAGE_SUFFIXES, find_images, images_in

    (tmp_path / "sub").mkdir()
    for name in ["f10.jpg", "f2.JPG", "f1.png", "sub/a.webp", "x.gif", "y.jp2", "z.pbm", "notes.txt", "raw.cr2"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in images_in(tmp_path)] == [
        "f1.png", "f2.JPG", "f10.jpg", "sub/a.webp", "x.gif", "y.jp2", "z.pbm"]
    assert {".gif", ".jp2", ".pbm", ".webp", ".tiff"} <= IMAGE_SUFFIXES
    found = find_images([tmp_path / "f10.jpg", tmp_path, str(tmp_path / "f*.jpg"), tmp_path / "notes.txt",
                         tmp_path / "missing.jpg", str(tmp_path / "none*.png")])
    assert [p.removeprefix(str(tmp_path) + "/") for p in found.paths] == [
        "f10.jpg", "f1.png", "f2.JPG", "sub/a.webp", "x.gif", "y.jp2", "z.pbm", "notes.txt", "missing.jpg"]
    assert found.unmatched == [f"{tmp_path / 'none*.png'}: no file matches this pattern"]


def test_every_command_finds_the_same_images_in_a_folder(tmp_path):
    from rali_edge.engines.fidelity import fidelity_images as calibration_images
    from rali_edge.images import find_images, images_in
    from rali_edge.profiling.runner import load_image_set
    from rali_edge.runtime.sources import open_source, parse_source

    from PIL import Image

    for name in ["b.gif", "a.png", "c.tiff", "d.bmp"]:
        Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    expected = [str(p) for p in images_in(tmp_path)]
    assert len(expected) == 4
    assert find_images([tmp_path]).paths == expected  # score, eval folders
    assert [str(p) for p in calibration_images(tmp_path)] == expected  # build --calib-dir, check-engine
    assert load_image_set([str(tmp_path)]).sources == expected  # profile --images
    source = open_source(parse_source(str(tmp_path)))  # stream FOLDER
    assert [str(p) for p in source.paths] == expected
