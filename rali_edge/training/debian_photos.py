"""Photographs taken from Debian packages of desktop wallpapers: training photographs, and the
held-out whole photographs of the user's-path evaluation (whole_photos.py).

Why Debian: everything in Debian's main archive is under a free licence (the Debian Free
Software Guidelines), each file's licence and authors are recorded in the package, and every
version ever published stays downloadable from snapshot.debian.org, so the training recipe
reruns from nothing years later. The wallpapers used here are natural colour photographs
(macro shots with out-of-focus backgrounds, landscapes, water, objects): the content that the
photographs inside Python packages lack.

A package is downloaded once (about 50-100 MB), checked against its sha256, and only the
photographs are unpacked into a cache folder; each photograph is checked against its own
sha256 too, so the recipe trains on the same pixels everywhere. A .deb is an `ar` archive
holding `data.tar.xz`; both are read with the standard library, so no apt or dpkg is needed.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rali_edge.errors import NetworkError, RaliEdgeError
from rali_edge.model_file import sha256_file


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    pool_path: str  # under a Debian mirror's root
    sha256: str


PACKAGES = {
    p.name: p
    for p in (
        DebianPackage("mate-backgrounds", "1.26.0-1", "pool/main/m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb",
                      "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
        DebianPackage("plasma-workspace-wallpapers", "4:5.27.5-2",
                      "pool/main/p/plasma-workspace-wallpapers/plasma-workspace-wallpapers_5.27.5-2_all.deb",
                      "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"),
        # Debian 13 (trixie): photographs at 3840 pixels and over, for stage 2's full-size crops.
        DebianPackage("budgie-backgrounds", "3.0-1", "pool/main/b/budgie-backgrounds/budgie-backgrounds_3.0-1_all.deb",
                      "b91c2d5209558bc11d8d3a161f22a608857e3f8c735980cfab0d6650b03014ca"),
        # Debian 11 (bullseye): three CC0 photographs of 3310-5403 pixels, for stage 2 too.
        DebianPackage("gnome-backgrounds", "3.38.0-1", "pool/main/g/gnome-backgrounds/gnome-backgrounds_3.38.0-1_all.deb",
                      "76d8a4c52e5f346d9cb08bc8a1f58ad443d2bae211721af8a7248457c7a520e8"),
        # Held out (never trained on): whole photographs of 1-20 MP for whole_photos.py.
        DebianPackage("lomiri-wallpapers-16.04", "20.04.0-2",
                      "pool/main/l/lomiri-wallpapers/lomiri-wallpapers-16.04_20.04.0-2_all.deb",
                      "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab"),
        DebianPackage("lomiri-wallpapers-20.04", "20.04.0-2",
                      "pool/main/l/lomiri-wallpapers/lomiri-wallpapers-20.04_20.04.0-2_all.deb",
                      "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709"),
    )
}
# The live archive first; the snapshot of Debian 12 (bookworm) of the day these were chosen
# keeps the same files after they leave the live archive.
MIRRORS = ("https://deb.debian.org/debian/", "https://snapshot.debian.org/archive/debian/20250520T000000Z/")


@dataclass(frozen=True)
class DebianPhoto:
    package: str
    member: str  # path inside the package's data.tar.xz
    sha256: str


def _mate(name: str, sha256: str) -> DebianPhoto:
    return DebianPhoto("mate-backgrounds", f"./usr/share/backgrounds/mate/nature/{name}.jpg", sha256)


def _lomiri(release: str, file: str, sha256: str) -> DebianPhoto:
    return DebianPhoto(f"lomiri-wallpapers-{release}", f"./usr/share/backgrounds/{file}.jpg", sha256)


def _budgie(name: str, sha256: str) -> DebianPhoto:
    return DebianPhoto("budgie-backgrounds", f"./usr/share/backgrounds/budgie/{name}.jpg", sha256)


def _gnome(name: str, sha256: str) -> DebianPhoto:
    return DebianPhoto("gnome-backgrounds", f"./usr/share/backgrounds/gnome/{name}.jpg", sha256)


def _plasma(name: str, sha256: str) -> DebianPhoto:
    return DebianPhoto("plasma-workspace-wallpapers", f"./usr/share/wallpapers/{name}/contents/images/2560x1600.jpg", sha256)


# The photographs in focus over most of the frame, 9 of the two packages' 23: blur at level 3
# costs their crops about as much as it costs the photographs inside Python packages (mean
# label <= 3.1 over 12 crops, against 1.7-3.2). Left out: 12 macro shots, skies and mists
# whose crops are mostly out of focus or smooth (there blur changes little and JPEG blocking
# costs a lot, so content rather than distortion sets the label: with them the held-out SRCC
# fell from 0.66 to 0.45 in a trial), and 2 grey ones (a grey reference labelled perfect
# teaches that desaturation costs nothing). Their other wallpapers are drawings and renders.
PHOTOS = {
    "BytheWater": _plasma("BytheWater", "c272434ef39f2abf1ed48a15a8910088020f3165329a5092f3940ec9464bc05f"),
    "ColorfulCups": _plasma("ColorfulCups", "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d"),
    "EveningGlow": _plasma("EveningGlow", "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a"),
    "OneStandsOut": _plasma("OneStandsOut", "cb507baf1dafdcae362264f3aba9483ed4be5f6c9fdd770f0ec0920c6d9e80fd"),
    "Path": _plasma("Path", "7477457d7f17b736259f1b021864778ad4ba802cf3214e6728181ff29126bba8"),
    "Dune": _mate("Dune", "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91"),
    "GreenMeadow": _mate("GreenMeadow", "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832"),
    "RainDrops": _mate("RainDrops", "3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16"),
    "Wood": _mate("Wood", "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07"),
    # budgie-backgrounds (CC0): the 7 of its 18 wallpapers that pass the same test (blur at level
    # 3: mean label <= 3.1 on crops of the photograph shrunk as stage 1 shrinks it). Left out: 6
    # with out-of-focus backgrounds, skies or sand (3.2-4.3), a black-and-white one, a woodblock
    # print, and two drawings. Only stage 2 trains on them (data.GROUP_SOURCES).
    **{name: _budgie(name, sha) for name, sha in (
        ("casa-mila", "5c7b24e463e3ca90cfead8c7fb4a0e0362980e7ff43aa5e877d6a186338977bf"),
        ("lake-sherburne", "85881b53de866a521bd806b481d444b7c3a45eee773eefdffaad46e7fb968470"),
        ("oakland-zoo-otters", "b7540dd5c076b5b30c37bb9b7c991789d2cd30a9fc6a3205c8896bb5f8b75dbc"),
        ("perched-osprey", "d57e8d13c898c8abdf99a6429868e02935c4bb23993dfbb1a190136ee396a179"),
        ("roman-colosseum", "3a085abab563afcdcfc3009fa126bbceb426921dd5bcdbb6f08fb0a601568030"),
        ("singaporean-cityscape", "f636392cae58e2cfd478838a8e4d3a3aa0b7c1ecf7be77932c394d649f783363"),
        ("tea-gardens", "1d7377e9903b29a3e983f1184a3112e50a6b45e65382c491f5c02e20e2861e20"),
    )},
    # gnome-backgrounds 3.38 (CC0, its AUTHORS file): the 3 of its 15 wallpapers that pass the
    # same test (1.97-2.48): two aerial photographs of forests and a close-up of a painting. Left
    # out: 4 photographs of mists, bokeh, a sunset over waves and dark ivy (2.94-3.67, most of
    # their frames out of focus or smooth), and 8 renders. Only stage 2 trains on them.
    **{name: _gnome(name, sha) for name, sha in (
        ("Acrylic", "4e4d3843319508f706c24a827dc9ae2400c347942602fa027db726bd3da5334b"),
        ("ColdWarm", "b31f8bd5f6f2a16d91fbb7644aeaaf1e6f1254213768cc6bc71151f1e142f1b1"),
        ("Road", "cc1207c730162b9cb00a5c7b62aeb9e671e59a911e778bea0eb4d599844ebf35"),
    )},
    # Held out: every photograph in the two lomiri packages (their other wallpapers are patterns
    # and renders), at the sizes they ship in. Licences in whole_photos.PHOTOS.
    **{name.split("_by_")[0]: _lomiri(release, name, sha) for release, name, sha in (
        ("16.04", "Bridge_by_Sander_Klootwijk", "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050"),
        ("16.04", "Dragonfly_by_Bolly", "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3"),
        ("16.04", "Picture_0B_by_freespace", "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad"),
        ("16.04", "Picture_1A_by_freespace", "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b"),
        ("16.04", "Wine_by_Jakkub_Mede", "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74"),
        ("16.04", "aitzgorri_by_Aitzol_Berasategi", "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36"),
        ("16.04", "friends_by_Aitzol_Berasategi", "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d"),
        ("16.04", "life_by_Aitzol_Berasategi", "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05"),
        ("16.04", "picosdeeuropa_by_Aitzol_Berasategi", "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a"),
        ("16.04", "seeding_by_Clements_Engelhardt", "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f"),
        ("16.04", "sunset_by_Aitzol_Berasategi", "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18"),
        ("20.04", "Kleiber_by_Lukas_Baubkus", "6572410c09f4492c74ccadde133565a14c0161617d5917d4c820c66d65a44ba7"),
    )},
}


def cache_dir() -> Path:
    """RALI_EDGE_PHOTO_CACHE, else $XDG_CACHE_HOME/rali-edge/photos, else ~/.cache/rali-edge/photos."""
    if os.environ.get("RALI_EDGE_PHOTO_CACHE"):
        return Path(os.environ["RALI_EDGE_PHOTO_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rali-edge" / "photos"


def photo_path(name: str, cache: Path | None = None) -> Path:
    """The photograph's file in the cache, fetched with its package if it is not there yet."""
    photo, cache = PHOTOS[name], cache or cache_dir()
    path = cache / photo.package / photo.member.removeprefix("./")
    if not path.exists():
        fetch(photo.package, cache)
    return path


def fetch(package: str, cache: Path, mirrors: tuple[str, ...] | None = None) -> None:
    """Download `package` (from the first of `mirrors` that has it; default MIRRORS), check it,
    and unpack its photographs (those in PHOTOS) into `cache`."""
    pkg = PACKAGES[package]
    mirrors = mirrors or MIRRORS
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        deb = Path(tmp) / Path(pkg.pool_path).name
        errors = []
        for mirror in mirrors:
            try:
                _download(mirror + pkg.pool_path, deb)
                break
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
        else:
            raise NetworkError(
                f"could not download the Debian package {package} {pkg.version}, which holds training photographs "
                f"({'; '.join(errors)}). Check the network, or download {mirrors[0]}{pkg.pool_path} by hand and run "
                f"`python -m rali_edge.training.debian_photos --deb FILE`."
            )
        unpack(deb, cache)


def unpack(deb: Path, cache: Path) -> list[Path]:
    """Take the photographs out of a downloaded .deb into `cache`, checking every hash."""
    package = next((p for p in PACKAGES.values() if Path(p.pool_path).name == deb.name), None)
    if package is None:
        raise RaliEdgeError(f"{deb.name} is not one of the packages the training photographs come from: "
                            + ", ".join(Path(p.pool_path).name for p in PACKAGES.values()))
    if sha256_file(deb) != package.sha256:
        raise RaliEdgeError(f"{deb} does not match the sha256 recorded for {package.name} {package.version}: "
                            "the download is damaged or is another version; delete it and fetch it again")
    wanted = {p.member: p for p in PHOTOS.values() if p.package == package.name}
    written = {}
    with open(deb, "rb") as f, tarfile.open(fileobj=_ar_member(f, "data.tar.xz"), mode="r|xz") as tar:
        for info in tar:
            photo = wanted.get(info.name)
            if photo is None or not info.isfile():
                continue
            out = cache / package.name / photo.member.removeprefix("./")
            out.parent.mkdir(parents=True, exist_ok=True)
            part = out.with_suffix(out.suffix + ".part")
            with tar.extractfile(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if sha256_file(part) != photo.sha256:
                part.unlink()
                raise RaliEdgeError(f"{photo.member} in {deb.name} does not match its recorded sha256")
            part.replace(out)
            written[info.name] = out
    if missing := set(wanted) - set(written):
        raise RaliEdgeError(f"{deb.name} lacks {', '.join(sorted(missing))}")
    return list(written.values())


def _ar_member(f, name: str):
    """A file object limited to member `name` of the `ar` archive open as `f` (a .deb's format:
    an 8-byte magic, then per member a 60-byte header and the data padded to an even length)."""
    if f.read(8) != b"!<arch>\n":
        raise RaliEdgeError(f"{getattr(f, 'name', 'file')} is not a Debian package (.deb)")
    while True:
        header = f.read(60)
        if len(header) < 60:
            raise RaliEdgeError(f"{getattr(f, 'name', 'file')} has no {name}")
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        if member == name:
            return _Limited(f, size)
        f.seek(size + size % 2, os.SEEK_CUR)


class _Limited:
    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _download(url: str, out: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(out, "wb") as dst:
        shutil.copyfileobj(response, dst, length=1 << 20)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Put the photographs from Debian packages (training and held-out) into the cache "
                                     "(training does this by itself when they are missing).")
    parser.add_argument("--deb", type=Path, action="append", default=[], help="unpack this already downloaded .deb instead of downloading")
    parser.add_argument("--cache", type=Path, default=None, help=f"default: {cache_dir()} (RALI_EDGE_PHOTO_CACHE)")
    args = parser.parse_args(argv)
    cache = args.cache or cache_dir()
    try:
        for deb in args.deb:
            unpack(deb, cache)
        for name in PHOTOS:
            photo_path(name, cache)
    except RaliEdgeError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{len(PHOTOS)} photographs in {cache}")


if __name__ == "__main__":
    main()
