"""Training photographs from Debian packages (rali_edge/training/debian_photos.py).

The .deb reader, the hash checks and the mirror fallback run on a small package that the test
builds itself (file:// mirrors, no network); the real photographs are checked against their
recorded hashes, licences and credits (downloaded once into the cache, as training does)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from rali_edge.errors import RaliEdgeError
from rali_edge.training import data, debian_photos, whole_photos
from rali_edge.training.debian_photos import DebianPackage, DebianPhoto

POOL = "pool/main/t/test-wallpapers/test-wallpapers_1.0_all.deb"
MEMBER = "./usr/share/wallpapers/Leaf/contents/images/2560x1600.jpg"


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, content in members.items():
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode())
        out.append(content + (b"\n" if len(content) % 2 else b""))
    return b"".join(out)


def _deb(files: dict[str, bytes]) -> bytes:
    # debian-binary's 4 bytes and an odd-sized control archive make the reader skip padding.
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"./control": b"Package: test-wallpapers\n"}) + b"x",
                "data.tar.xz": _tar_xz(files)})


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A mirror folder holding a test package with one photograph and one other file, and the
    module's tables pointed at it. Returns (mirror URL, photograph bytes, .deb path)."""
    photo = bytes(range(256)) * 41  # any content: only its hash matters
    deb = _deb({MEMBER: photo, "./usr/share/doc/test-wallpapers/copyright": b"GPL-2+\n"})
    path = tmp_path / "mirror" / POOL
    path.parent.mkdir(parents=True)
    path.write_bytes(deb)
    monkeypatch.setattr(debian_photos, "PACKAGES", {"test-wallpapers": DebianPackage(
        "test-wallpapers", "1.0", POOL, hashlib.sha256(deb).hexdigest())})
    monkeypatch.setattr(debian_photos, "PHOTOS", {"Leaf": DebianPhoto("test-wallpapers", MEMBER, hashlib.sha256(photo).hexdigest())})
    return (tmp_path / "mirror").as_uri() + "/", photo, path


def test_fetch_falls_back_to_the_next_mirror_and_unpacks_only_the_photographs(package, tmp_path):
    mirror, photo, _ = package
    cache = tmp_path / "cache"
    debian_photos.fetch("test-wallpapers", cache, mirrors=((tmp_path / "gone").as_uri() + "/", mirror))
    out = cache / "test-wallpapers" / MEMBER.removeprefix("./")
    assert out.read_bytes() == photo
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == [
        "test-wallpapers/" + MEMBER.removeprefix("./")]  # no copyright file, no leftover download


def test_the_reader_agrees_with_dpkg(package, tmp_path):
    # The test's package must be a real .deb, or the other tests prove nothing about real ones.
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    _, _, deb = package
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert MEMBER in listing
    assert debian_photos.unpack(deb, tmp_path / "cache") == [tmp_path / "cache" / "test-wallpapers" / MEMBER.removeprefix("./")]


def test_photo_path_fetches_a_missing_photograph_once(package, tmp_path, monkeypatch):
    mirror, photo, _ = package
    monkeypatch.setattr(debian_photos, "MIRRORS", (mirror,))
    cache = tmp_path / "cache"
    path = debian_photos.photo_path("Leaf", cache)
    assert path.read_bytes() == photo
    (tmp_path / "mirror" / POOL).unlink()  # a second call must not download again
    assert debian_photos.photo_path("Leaf", cache) == path


def test_a_package_with_another_hash_is_refused(package, tmp_path):
    _, _, deb = package
    deb.write_bytes(deb.read_bytes() + b"\n")
    with pytest.raises(RaliEdgeError, match="sha256 recorded for test-wallpapers"):
        debian_photos.unpack(deb, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.jpg"))


def test_a_photograph_with_another_hash_is_refused_and_not_kept(package, tmp_path, monkeypatch):
    _, _, deb = package
    monkeypatch.setattr(debian_photos, "PHOTOS", {"Leaf": DebianPhoto("test-wallpapers", MEMBER, "0" * 64)})
    with pytest.raises(RaliEdgeError, match="does not match its recorded sha256"):
        debian_photos.unpack(deb, tmp_path / "cache")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_package_without_the_photograph_is_refused(package, tmp_path, monkeypatch):
    _, _, deb = package
    monkeypatch.setattr(debian_photos, "PHOTOS", {"Leaf": DebianPhoto("test-wallpapers", MEMBER.replace("Leaf", "Bark"), "0" * 64)})
    with pytest.raises(RaliEdgeError, match="lacks ./usr/share/wallpapers/Bark"):
        debian_photos.unpack(deb, tmp_path / "cache")


def test_a_file_that_is_not_a_deb_is_refused(package, tmp_path, monkeypatch):
    _, _, deb = package
    deb.write_bytes(b"<html>not found</html>")
    monkeypatch.setattr(debian_photos, "PACKAGES", {"test-wallpapers": DebianPackage(
        "test-wallpapers", "1.0", POOL, hashlib.sha256(deb.read_bytes()).hexdigest())})
    with pytest.raises(RaliEdgeError, match="not a Debian package"):
        debian_photos.unpack(deb, tmp_path / "cache")


def test_when_every_mirror_fails_the_error_says_what_to_do(package, tmp_path):
    with pytest.raises(RaliEdgeError) as err:
        debian_photos.fetch("test-wallpapers", tmp_path / "cache", mirrors=((tmp_path / "gone").as_uri() + "/",))
    assert "could not download the Debian package test-wallpapers 1.0" in str(err.value)
    assert "--deb FILE" in str(err.value)


def test_the_command_unpacks_a_hand_downloaded_deb(package, tmp_path, capsys):
    _, photo, deb = package
    debian_photos.main(["--deb", str(deb), "--cache", str(tmp_path / "cache")])
    assert (tmp_path / "cache" / "test-wallpapers" / MEMBER.removeprefix("./")).read_bytes() == photo
    assert "1 photographs in" in capsys.readouterr().out


@pytest.mark.slow
def test_the_real_photographs_match_their_hashes_and_have_licences_and_credits():
    # Downloaded into the cache when missing, as training does (the Debian archive is one of
    # the package registries this project's machines reach).
    paths = {name: debian_photos.photo_path(name) for name in debian_photos.PHOTOS}
    for name, path in paths.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == debian_photos.PHOTOS[name].sha256, name
        if name in whole_photos.PHOTOS:  # held out: the whole-photograph evaluation, at its own size
            held_out = whole_photos.PHOTOS[name]
            assert held_out.package == debian_photos.PHOTOS[name].package and held_out.licence and held_out.credit, name
            assert name not in data.SOURCES, name
            img = whole_photos.load_photo(name).astype(np.int16)
            assert np.abs(img[..., 0] - img[..., 2]).mean() > 5 and max(img.shape[:2]) >= 1365, name
            continue
        source = data.SOURCES[name]
        assert source.package == "debian" and source.licence and source.credit, name
        assert debian_photos.PACKAGES[debian_photos.PHOTOS[name].package].version in source.origin, name
        assert name in data.TRAIN_SOURCES or name in data.GROUP_ONLY_SOURCES, name
        assert name in data.GROUP_SOURCES, name
        img = data.load_source(name).astype(np.int16)
        # Colour photographs (grey ones would teach "grey is perfect", see HELDOUT_SOURCES),
        # shrunk to the other photographs' scale.
        assert np.abs(img[..., 0] - img[..., 2]).mean() > 5, name
        assert min(img.shape[:2]) == data.MAX_SHORT_SIDE, name
