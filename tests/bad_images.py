"""Awkward and broken image files, shared by the image tests and the CLI tests.

`write_bad_images(folder)` writes them and returns {name: (path, expect_ok)}: expect_ok says whether
`open_image` must decode the file (True) or refuse it with an ImageError (False).
Pixels come from scikit-image's bundled photos (astronaut: NASA, public domain; camera: CC0).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 20_000  # 400 million pixels: over the default 100-million cap
ANIMATED_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # first frame is red


def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # 512x512 RGB


def gray16_gradient(width: int = 1024, height: int = 8) -> np.ndarray:
    """A horizontal 0..65535 ramp: scaled properly it covers all 256 levels; clipped it is white."""
    ramp = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(ramp, (height, 1))


def png_bomb(path: Path, side: int = BOMB_SIDE) -> None:
    """A valid 1-bit side x side PNG of zeros: a few tens of KB on disk, `side**2` pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    squeeze = zlib.compressobj(9)
    idat = b"".join(squeeze.compress(row * 1000) for _ in range(side // 1000))
    idat += squeeze.compress(row * (side % 1000)) + squeeze.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height but holds no pixel data (opens, then fails to decode)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def palette_alpha_image() -> Image.Image:
    """Palette image whose left half uses a fully transparent palette entry (index 0)."""
    index = np.ones((32, 64), np.uint8)
    index[:, :32] = 0
    im = Image.frombytes("P", (64, 32), index.tobytes())
    im.putpalette([0, 0, 0, 200, 30, 40] + [0] * (256 * 3 - 6))
    im.info["transparency"] = 0
    return im


def write_bad_images(folder: str | Path) -> dict[str, tuple[Path, bool]]:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(photo())
    files: dict[str, tuple[Path, bool]] = {}

    def add(name: str, ok: bool, write) -> None:
        path = out / name
        write(path)
        files[path.stem] = (path, ok)

    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG", quality=90)
    pngbuf = io.BytesIO()
    rgb.save(pngbuf, "PNG")

    add("zero_byte.jpg", False, lambda p: p.write_bytes(b""))
    add("truncated_jpeg.jpg", False, lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]))
    add("truncated_png.png", False, lambda p: p.write_bytes(pngbuf.getvalue()[: len(pngbuf.getvalue()) // 2]))
    add("not_an_image.jpg", False, lambda p: p.write_text("this is a text file renamed to .jpg\n"))
    add("bomb.png", False, png_bomb)
    add("cmyk.jpg", True, lambda p: rgb.convert("CMYK").save(p, "JPEG", quality=95))
    add("gray16.png", True, lambda p: Image.fromarray(gray16_gradient()).save(p))
    add("palette_alpha.png", True, lambda p: palette_alpha_image().save(p, transparency=0))
    add("rgba.png", True, lambda p: rgb.convert("RGBA").save(p))
    add("gray.png", True, lambda p: rgb.convert("L").save(p))
    add("animated.gif", True, lambda p: _animated(p, "GIF"))
    add("animated_apng.png", True, lambda p: _animated(p, "PNG"))
    add("one_by_one.png", True, lambda p: Image.new("RGB", (1, 1), (10, 200, 30)).save(p))
    add("elongated.png", True, lambda p: rgb.resize((4000, 3)).save(p))
    return files


def _animated(path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ANIMATED_COLOURS]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
