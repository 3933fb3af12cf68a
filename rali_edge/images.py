"""Decode one input into an RGB uint8 PIL image, or say clearly why not.

`open_image` accepts a path, bytes, a binary file object, a PIL image or a uint8 numpy array and
returns a fully loaded RGB image. Every failure is an `ImageError` whose message names the input
and the cause, so a batch can report the bad file and go on with the others.

Colour rules follow transformers' `convert_to_rgb` (what `CLIPImageProcessor` runs), so our scores
equal the published pipeline's:
- transparency (an alpha band, or a palette/`tRNS` transparency entry) is composited onto white;
- every other mode (L, 1, P, CMYK, YCbCr...) goes through Pillow's plain `convert("RGB")`;
- EXIF orientation is NOT applied: CLIPImageProcessor does not apply it either, and the model was
  trained and evaluated on the stored pixel order.
Deliberate deviations from transformers, where it would return garbage:
- 16-bit and 32-bit grey images ("I;16*", "I", "F") are scaled to 8 bits by their bit depth;
  Pillow's convert (and so transformers) clips them at 255, which turns most photos white.
  (16-bit RGB(A) PNGs need nothing: Pillow already keeps their high byte.)
- encoded inputs (files, bytes) above a pixel-count cap are refused before decoding
  (decompression bombs). The cap is RALI_MAX_PIXELS, default 100 million pixels (10k x 10k).
Animated files (GIF, APNG, WebP) give their first frame. Truncated files are errors: Pillow's
`ImageFile.LOAD_TRUNCATED_IMAGES` is left False, so a cut-off JPEG never scores as a grey picture.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rali_edge.errors import ImageError, MissingDependencyError, UsageError
from rali_edge.storage import expand, is_uri, read_bytes

MAX_PIXELS_ENV = "RALI_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
WHITE = (255, 255, 255, 255)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def max_pixels() -> int:
    """The pixel-count cap for encoded inputs: RALI_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))  # accepts "2e8" as well as "200000000"
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{MAX_PIXELS_ENV} must be a positive number of pixels, got {raw!r}")
    return value


def open_image(source, name: str | None = None) -> Image.Image:
    """A new, fully loaded RGB uint8 image from a path, a URI (s3://, gs://, http(s)://...), bytes, a binary file object, a PIL image,
    or a uint8 array (HxW, HxWx1, HxWx3, or HxWx4 whose alpha is composited onto white).
    `name` is what error messages call the input (default: the path, or a description)."""
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>")
    if isinstance(source, Image.Image):
        return _loaded_rgb(source, name or "<PIL image>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(_nonempty(bytes(source), name or "<bytes>"), name or "<bytes>")
    if is_uri(source):  # s3://, gs://, http(s)://...: read whole, with retries (rali_edge.storage)
        return _decode(_nonempty(read_bytes(source), name or source), name or source)
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        _check_file(Path(source), name)
        return _decode(Path(source), name)
    if hasattr(source, "read"):
        name = name or str(getattr(source, "name", "<file object>"))
        try:
            data = source.read()
        except OSError as e:
            raise ImageError(f"{name}: cannot read ({e})") from None
        return _decode(_nonempty(data, name), name)
    raise ImageError(f"{name or '<input>'}: cannot read an image from a {type(source).__name__}")


def to_rgb(im: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """A new RGB image, with transformers' colour rules plus high-bit-depth scaling (module doc)."""
    if im.mode in HIGH_BIT_MODES:
        im = _high_bit_to_l(im)
    try:
        # Same test as transformers' convert_to_rgb: an alpha band or a transparency entry.
        if "A" in im.getbands() or im.info.get("transparency") is not None:
            background = Image.new("RGBA", im.size, WHITE)
            return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:  # modes Pillow cannot convert (e.g. LAB)
        raise ImageError(f"{name}: unsupported colour mode {im.mode} ({e})") from None


def _check_file(path: Path, name: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageError(f"{name}: is a folder, not an image file")
    if size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{name}: cannot read (permission denied)")


def _nonempty(data: bytes, name: str) -> io.BytesIO:
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return io.BytesIO(data)


def _decode(fp, name: str) -> Image.Image:
    """Open (header only), check the pixel count, then decode the first frame."""
    limit = max_pixels()
    _let_pillow_reach(limit)
    try:
        # Our cap is the authority; Pillow's own DecompressionBombWarning would only be noise.
        # (catch_warnings is process-wide: concurrent decodes can at worst leave this one filter on.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                _check_pixels(im.size, limit, name)
                im.load()
                return to_rgb(im, name)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (cannot identify format)") from None
    except Image.DecompressionBombError as e:
        # Pillow refused at open: over 2 x its MAX_IMAGE_PIXELS, which _let_pillow_reach keeps >= our cap.
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        if pixels and int(pixels.group(1)) > limit:
            raise ImageError(_too_large(name, int(pixels.group(1)), limit)) from None
        raise ImageError(f"{name}: image too large for Pillow's MAX_IMAGE_PIXELS ({e})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001  Pillow's plugins raise many types on malformed data
        raise ImageError(f"{name}: truncated or corrupt image data ({_short(e)})") from None


def _let_pillow_reach(limit: int) -> None:
    # Pillow refuses images above 2 x MAX_IMAGE_PIXELS inside Image.open, before our check runs.
    # Only when the user asked for more than that via RALI_MAX_PIXELS do we raise Pillow's limit.
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


def _check_not_empty(size: tuple[int, int], name: str) -> None:
    if size[0] <= 0 or size[1] <= 0:
        raise ImageError(f"{name}: empty image ({size[0]}x{size[1]} pixels)")


def _check_pixels(size: tuple[int, int], limit: int, name: str) -> None:
    _check_not_empty(size, name)
    if size[0] * size[1] > limit:
        raise ImageError(_too_large(name, size[0] * size[1], limit))


def _too_large(name: str, pixels: int, limit: int) -> str:
    return f"{name}: image too large: {pixels} pixels > limit {limit} (set {MAX_PIXELS_ENV} to raise it)"


def _loaded_rgb(im: Image.Image, name: str) -> Image.Image:
    _check_not_empty(im.size, name)  # already-decoded inputs are not capped: no bomb to defuse
    try:
        im.load()
    except Exception as e:  # noqa: BLE001  a lazily opened image decodes here
        raise ImageError(f"{name}: truncated or corrupt image data ({_short(e)})") from None
    return to_rgb(im, name)


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(
            f"{name}: arrays must be uint8 HxW, HxWx3 or HxWx4, got {a.dtype} with shape {a.shape}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: empty image ({a.shape[1]}x{a.shape[0]} pixels)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    # fromarray infers L, RGB or RGBA; to_rgb then treats an RGBA array exactly like an RGBA file.
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)), name)


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit grey image to 8 bits by its bit depth (rounded), never clipping at 255."""
    a = np.asarray(im)
    if im.mode == "F":
        # Float images: [0, 1] is the usual convention; anything else is read as 0..255.
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
        full = 1.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 255.0
        out = np.clip(np.rint(a * (255.0 / full)), 0, 255)
    else:
        a = np.clip(a.astype(np.int64), 0, None)
        # "I" holds 16-bit PNG/PGM data in some Pillow versions; wider data uses the full int32 range.
        full = 65535 if im.mode != "I" or a.size == 0 or a.max() <= 65535 else 2**31 - 1
        out = (a * 255 + full // 2) // full
    return Image.fromarray(out.astype(np.uint8))  # 2-D uint8: mode L


def _short(e: Exception, limit: int = 120) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- finding images --------------------------------------------------------------------------
# Every command (score, eval's folders, build --calib-dir, profile --images, stream FOLDER, the
# fidelity check) finds images through this table and these functions, so that one folder means
# the same files everywhere. The suffixes of the formats Pillow decodes (JPEG 2000 needs OpenJPEG).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".jp2", ".j2k"})


def natural_key(name: str):
    """frame2.png before frame10.png: digits compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(name))]


# The bundled samples: whole photographs, clean and distorted (make demo, the fidelity check, profile).
SAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "samples"


def sample_images() -> list[Path]:
    """The images bundled with rali-edge (rali_edge/assets/samples/); none in an install without them."""
    return images_in(SAMPLES_DIR) if SAMPLES_DIR.is_dir() else []


def images_in(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively), in natural order of their path."""
    folder = Path(folder)
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def describe_suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


@dataclass
class FoundImages:
    paths: list[str]
    unmatched: list[str]  # one message per argument that gave no file: an empty folder, a glob matching nothing


def find_images(args) -> FoundImages:
    """Files as given (whatever their suffix; a missing one is kept, so that it is reported with
    the other results), folders recursively (IMAGE_SUFFIXES), globs (`**` recursive) expanded;
    URIs likewise (a folder is one ending in "/"), through rali_edge.storage.
    A file reached twice (say, through a folder and a glob) comes once, where it came first."""
    import glob

    found, seen, unmatched = [], set(), []

    def add(path: str):
        key = path if is_uri(path) else os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            found.append(path)

    for arg in map(str, args):
        p = Path(arg)
        if is_uri(arg):  # a URI folder ("s3://bucket/photos/") or glob is listed; one object is kept as it is
            matches = expand(arg, IMAGE_SUFFIXES)
            if not matches:
                unmatched.append(f"{arg}: no images there (looked for {describe_suffixes()})")
            for m in matches:
                add(m)
        elif p.is_dir():
            images = images_in(p)
            if not images:
                unmatched.append(f"{arg}: no images in this folder (looked for {describe_suffixes()})")
            for f in images:
                add(str(f))
        elif p.exists() or not glob.has_magic(arg):
            add(arg)
        else:
            matches = sorted((m for m in glob.glob(arg, recursive=True) if Path(m).is_file()), key=natural_key)
            if not matches:
                unmatched.append(f"{arg}: no file matches this pattern")
            for m in matches:
                add(m)
    return FoundImages(found, unmatched)


def paths_from_list(list_file: str | Path) -> list[str]:
    """The image paths a list names, in its order: a text file with one path per line (blank lines
    and lines starting with # skipped), a CSV file (.csv) with a `path` column, as `score -o
    x.csv` writes, or a Parquet file or folder (.parquet, pyarrow) with a `path` column. Paths are taken as written (relative ones from the current folder), not
    expanded: a corpus list of millions of files is read without a stat of each, and a missing
    file becomes its own error row. Raises UsageError for an unreadable list or a CSV without
    a path column."""
    import csv

    from rali_edge.errors import UsageError

    path = Path(list_file)
    if path.suffix.lower() == ".parquet":
        return _paths_from_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a list saved by a spreadsheet starts with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--from-list {path}: cannot read it ({_short(e)})") from None
    if path.suffix.lower() != ".csv":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    rows = csv.DictReader(text.splitlines())
    if "path" not in (rows.fieldnames or []):
        raise UsageError(f"--from-list {path}: a CSV list needs a 'path' column (its columns: "
                         f"{', '.join(rows.fieldnames or []) or 'none'})")
    return [row["path"] for row in rows if row["path"]]


def _paths_from_parquet(path: Path) -> list[str]:
    from rali_edge.errors import UsageError

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("a Parquet list needs pyarrow: pip install 'rali-edge[corpus]'") from None
    try:
        schema = pq.read_schema(path) if path.is_file() else pq.ParquetDataset(path).schema
        if "path" not in schema.names:
            raise UsageError(f"--from-list {path}: a Parquet list needs a 'path' column (its columns: "
                             f"{', '.join(schema.names) or 'none'})")
        column = pq.read_table(path, columns=["path"]).column("path")
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"--from-list {path}: cannot read it ({_short(e)})") from None
    return [p for p in column.to_pylist() if p]

