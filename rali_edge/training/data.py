"""Synthetic quality data: random crops of freely licensed photographs, distorted, and labelled
with MS-SSIM against the clean crop (rali_edge.distortions).

The photographs are files inside installed packages (scikit-image, scikit-learn, matplotlib), one
kept in this repository (photos/), and 19 from four Debian wallpaper packages, downloaded once
into a cache (debian_photos.py; 10 of them only for stage 2's groups, GROUP_ONLY_SOURCES). Each
sample gets its own random generator seeded from (seed, index), so a dataset is the same
whatever the number of worker processes that make it.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from rali_edge.distortions import DISTORTIONS, LEVELS, MS_SSIM_MIN_SIZE, distort, ms_ssim, ms_ssim_to_score
from rali_edge.training import debian_photos


@dataclass(frozen=True)
class SourceImage:
    name: str  # scikit-image: the loader skimage.data.<name>(); otherwise the file <name>.jpg (PHOTO_FILES)
    licence: str
    credit: str
    origin: str
    package: str = "scikit-image"


# Licences as the packages document them: each loader's docstring in skimage.data,
# sklearn/datasets/images/README.txt, scipy.misc.face's docstring; Grace Hopper's portrait is an
# official U.S. Navy photograph (a work of the U.S. government).
SOURCES = {
    s.name: s
    for s in (
        SourceImage("astronaut", "public domain", "NASA (Eileen Collins)", "NASA Great Images, https://flic.kr/p/r9qvLn"),
        SourceImage("camera", "CC0", "Lav Varshney", "scikit-image"),
        SourceImage("chelsea", "CC0", "Stefan van der Walt", "scikit-image"),
        SourceImage("coffee", "CC0", "Rachel Michetti (courtesy of Pikolo Espresso Bar)", "scikit-image"),
        SourceImage("rocket", "public domain", "SpaceX", "https://www.flickr.com/photos/spacexphotos/16511594820/"),
        SourceImage("hubble_deep_field", "public domain", "NASA", "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/"),
        SourceImage("retina", "CC0", "Mikael Häggström", "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg"),
        SourceImage("brick", "CC0", "CC0Textures (Bricks25)", "https://cc0textures.com/view.php?tex=Bricks25"),
        SourceImage("grass", "CC0", "linolafett (DeviantArt, Grass-01)", "https://www.deviantart.com/linolafett/art/Grass-01-434853879"),
        SourceImage("gravel", "CC0", "CC0Textures (Gravel04)", "https://cc0textures.com/view.php?tex=Gravel04"),
        SourceImage("coins", "no known copyright restrictions", "Brooklyn Museum", "https://www.brooklynmuseum.org/opencollection/archives/image/51611"),
        SourceImage("immunohistochemistry", "no known copyright restrictions",
                    "Center for Microscopy And Molecular Imaging (CMMI)", "scikit-image"),
        SourceImage("china", "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/)", "danielbuechele (Flickr)",
                    "https://www.flickr.com/photos/danielbuechele/6061409035/", package="scikit-learn"),
        SourceImage("flower", "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/)", "vultilion (Flickr)",
                    "https://www.flickr.com/photos/vultilion/6056698931/", package="scikit-learn"),
        # scipy.misc.face of scipy < 1.10 (its docstring: raccoon-procyon-lotor.jpg at
        # http://www.public-domain-image.com), kept in photos/ as a JPEG at quality 95: scipy 1.10
        # moved it to a download.
        SourceImage("raccoon", "public domain", "public-domain-image.com", "scipy.misc.face (scipy < 1.10)", package="rali-edge"),
        # Debian's wallpaper packages (debian_photos.py): natural colour photographs, fetched once.
        *[SourceImage(name, "LGPL-3.0 (its metadata.json; GPL-2.0-or-later in the package's debian/copyright)", credit,
                      "Debian plasma-workspace-wallpapers 4:5.27.5-2", package="debian") for name, credit in (
            ("BytheWater", "Maciej Wiklo"), ("ColorfulCups", "Dmitri Popov"), ("EveningGlow", "Ian Hex"),
            ("OneStandsOut", "Risto Saukonpää"), ("Path", "Risto Saukonpää"))],
        *[SourceImage(name, "GPL-2.0-or-later (the package's debian/copyright)", credit, "Debian mate-backgrounds 1.26.0-1",
                      package="debian") for name, credit in (
            ("Dune", "Marco Cogoni, Hylke Bons"), ("GreenMeadow", "Timothy Schellhase, Lapo Calamandrei"),
            ("RainDrops", "blackcombwhistler07"), ("Wood", "Jean-François Fortin Tam"))],
        *[SourceImage(name, "CC0-1.0 (the package's debian/copyright)", "Budgie Desktop developers",
                      "Debian budgie-backgrounds 3.0-1", package="debian") for name in (
            "casa-mila", "lake-sherburne", "oakland-zoo-otters", "perched-osprey", "roman-colosseum",
            "singaporean-cityscape", "tea-gardens")],
        *[SourceImage(name, "CC0 (the package's AUTHORS file)", credit, "Debian gnome-backgrounds 3.38.0-1", package="debian")
          for name, credit in (("Acrylic", "Steve Johnson (Pexels)"), ("ColdWarm", "invisiblepower (Pexels)"),
                               ("Road", "Joshua Welch (Pexels)"))],
        SourceImage("grace_hopper", "public domain (U.S. Navy photograph)", "U.S. Navy, James S. Davis (1984)",
                    "https://commons.wikimedia.org/wiki/File:Commodore_Grace_M._Hopper,_USN_(covered).jpg", package="matplotlib"),
    )
}
# Held out of training: the test set and the bundled sample images come from these only.
# Colour photographs only: on a greyscale one (camera) the colour distortions change nothing, so
# "desaturated" is labelled perfect there while the same grey pixels from a colour photograph are
# labelled poor, a difference that no model can see without the reference.
HELDOUT_SOURCES = ("chelsea", "coffee", "astronaut")
# Not used for training: a deep-space field (nearly black) and a retinal fundus (one flat orange)
# have no normal exposure or tonal range, so their clean crops taught "dark" and "flat" as perfect.
NOT_PHOTOGRAPHS = ("hubble_deep_field", "retina")
# Photographs that only stage 2's groups are cut from: added after the shipped stage 1 was
# trained, so stage 1's stream (TRAIN_SOURCES) stays the one that trained it.
GROUP_ONLY_SOURCES = ("casa-mila", "lake-sherburne", "oakland-zoo-otters", "perched-osprey", "roman-colosseum",
                      "singaporean-cityscape", "tea-gardens", "Acrylic", "ColdWarm", "Road")
TRAIN_SOURCES = tuple(name for name in SOURCES if name not in HELDOUT_SOURCES + NOT_PHOTOGRAPHS + GROUP_ONLY_SOURCES)
GROUP_SOURCES = TRAIN_SOURCES + GROUP_ONLY_SOURCES
# normalise_tones stretches a flat reference by at most this much: more would amplify its noise
# and compression artefacts into what the model must call clean.
MAX_STRETCH = 2.5
# The random targets of normalise_tones: the luminance ranges and means of well-exposed
# photographs (chelsea 0.58 and 0.43, coffee 0.93 and 0.36, camera 0.90 and 0.47).
TARGET_RANGE = (0.5, 0.95)
TARGET_MEAN = (0.3, 0.6)

# Crops are resized to a working size in this range before being distorted: the distortion
# levels are tuned for it, and MS-SSIM needs at least 161 pixels a side.
WORK_SIZE = (176, 208)
# What the model is given: the centre VIEW x VIEW pixels of the distorted crop, at full
# resolution (the default model's input size, so its preprocessing leaves them as they are).
# The label is the MS-SSIM of the whole crop; the distortions are the same everywhere in it.
# Why not the whole crop shrunk to 128: shrinking by 1.4-1.75x hid most of what MS-SSIM
# measures (noise level went from SRCC 0.55 to 0.96 in the same training steps).
VIEW = 128
DATA_VERSION = 18  # bump when samples change, so that cached training data is not reused
GROUPS_VERSION = 4  # bump when stage 2's groups change (training_group), for the same reason
WHOLE_VERSION = 1  # bump when stage 2's whole-photograph groups change (whole_photo_group), for the same reason
CLEAN_FRACTION = 1 / 12  # about as often as one distortion type
DEAD_LEAVES_FRACTION = 0.3  # training crops that are procedural dead-leaves images, not photographs


def _package_folder(module: str) -> Path:
    # The package's folder, found without importing it (scikit-learn and matplotlib are slow to
    # import, and only their files are wanted).
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"the training photographs need {module}: pip install 'rali-edge[train]'")
    return Path(spec.submodule_search_locations[0])


# Photographs that are plain files, by the package that holds them.
PHOTO_FILES = {
    "scikit-learn": lambda name: _package_folder("sklearn") / "datasets" / "images" / f"{name}.jpg",
    "matplotlib": lambda name: _package_folder("matplotlib") / "mpl-data" / "sample_data" / f"{name}.jpg",
    "rali-edge": lambda name: Path(__file__).parent / "photos" / f"{name}.jpg",
    "debian": lambda name: debian_photos.photo_path(name),  # downloaded once into a cache
}
# Photographs larger than this on their short side (the Debian wallpapers, 1024-1920 pixels) are
# shrunk to it first, so that their crops span the same scales as those of the other
# photographs (300-768 pixels) and of the held-out ones.
MAX_SHORT_SIDE = 512


@lru_cache(maxsize=None)
def load_source(name: str, full_size: bool = False) -> np.ndarray:
    """The photograph as an RGB uint8 array (grey ones repeated over three channels), the Debian
    ones shrunk to MAX_SHORT_SIDE unless `full_size`."""
    if name not in SOURCES:
        raise ValueError(f"unknown source image {name!r}; choose one of {', '.join(SOURCES)}")
    package = SOURCES[name].package
    if package in PHOTO_FILES:
        with Image.open(PHOTO_FILES[package](name)) as f:
            photo = f.convert("RGB")
        if package == "debian" and min(photo.size) > MAX_SHORT_SIDE and not full_size:
            k = MAX_SHORT_SIDE / min(photo.size)
            photo = photo.resize((round(photo.size[0] * k), round(photo.size[1] * k)), Image.Resampling.LANCZOS)
        img = np.asarray(photo)
    else:
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3])
    img.setflags(write=False)
    return img


@dataclass
class Sample:
    image: np.ndarray  # centre VIEW x VIEW of the distorted crop, RGB uint8
    label: float  # 1..5, from MS-SSIM against the clean crop
    msssim: float
    source: str
    kind: str  # "clean" or a key of DISTORTIONS
    level: int  # 1..5; 0 for clean
    index: int = -1


def random_crop(img: np.ndarray, rng: np.random.Generator, work: int) -> np.ndarray:
    """A random square crop, resized down to `work` x `work` (never up: upscaling would blur the
    "clean" reference). Crop sides are log-uniform between `work` and the image's short side."""
    h, w = img.shape[:2]
    short = min(h, w)
    low = min(work, short)
    side = int(round(math.exp(rng.uniform(math.log(low), math.log(short)))))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(img[y : y + side, x : x + side])
    if side != work:
        crop = crop.resize((work, work), Image.Resampling.LANCZOS)
    return np.asarray(crop)


def dead_leaves(size: int, rng: np.random.Generator, palette: np.ndarray, disks: int = 1500, supersample: int = 2) -> np.ndarray:
    """A dead-leaves image (Matheron; Lee, Mumford & Huang 2001): opaque discs of random colour,
    radii with density ~ r^-3 (scale invariant, like photographs), the nearer hiding the farther.
    Procedural, so it adds content without licences and keeps the model from learning the few
    photographs by heart. Drawn front to back at `supersample` times the size (smooth edges),
    each disc painting only what nearer ones left; what no disc reaches keeps a background colour.
    `palette`: [N, 3] uint8 colours to draw from (pixels of a photograph: natural colours)."""
    n = size * supersample
    rmin, rmax = 1.0 * supersample, size / 3 * supersample
    a, b = rmin**-2, rmax**-2  # inverse CDF of p(r) ~ r^-3 on [rmin, rmax]
    img = np.empty((n, n, 3), np.uint8)
    img[:] = palette[rng.integers(len(palette))]
    covered = np.zeros((n, n), bool)
    for _ in range(disks):
        r = (a - rng.random() * (a - b)) ** -0.5
        cx, cy = rng.uniform(-r, n + r, size=2)
        x0, x1, y0, y1 = max(0, int(cx - r)), min(n, int(cx + r) + 1), max(0, int(cy - r)), min(n, int(cy + r) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & ~covered[y0:y1, x0:x1]
        img[y0:y1, x0:x1][inside] = palette[rng.integers(len(palette))]
        covered[y0:y1, x0:x1] |= inside
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX))


def colour_augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """More colour variety from few photographs: a random channel order and white balance."""
    out = img[:, :, rng.permutation(3)].astype(np.float64)
    out *= rng.uniform(0.8, 1.0, size=3)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normalise_tones(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A clean reference given a well-exposed photograph's tonal range and brightness: a
    luminance range (0.5 to 99.5 percentile) below a random target in TARGET_RANGE is stretched
    up to it (gain at most MAX_STRETCH; a wider range is left as it is), then a gamma brings the
    mean to a random value in TARGET_MEAN.

    Why: underexposure, overexposure and contrast are departures from normal tones, and the
    reference is labelled 5. Crops of rocket (mean 0.26), brick (range 0.38) or a random white
    balance's darkening looked like level 2-3 of those distortions while labelled perfect, and
    the model ranked contrast at SRCC 0.29 and underexposure at 0.53 on held-out photographs.
    Why a random target and not black to white: references stretched to the full range taught
    that every clean photograph spans it: the model scored clean crops of chelsea (range 0.58,
    like many well-exposed photographs) 2.9 on average, against their label of 5."""
    x = img.astype(np.float64) / 255.0
    lum = x.mean(-1)
    lo, hi = np.percentile(lum, (0.5, 99.5))
    if hi - lo < 1e-3:
        return img
    target = rng.uniform(*TARGET_RANGE)
    gain = min(max(target / (hi - lo), 1.0), MAX_STRETCH)
    if gain > 1.0:
        mid = float(np.clip((lo + hi) / 2, target / 2, 1 - target / 2))
        x = np.clip(mid + (x - (lo + hi) / 2) * gain, 0.0, 1.0)
    mean = float(x.mean())
    if 0.01 < mean < 0.99:
        gamma = float(np.clip(math.log(rng.uniform(*TARGET_MEAN)) / math.log(mean), 0.6, 1.6))
        x = x**gamma
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def centre(img: np.ndarray, size: int = VIEW) -> np.ndarray:
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def labelled(clean: np.ndarray, kind: str, level: int, rng: np.random.Generator, source: str, index: int) -> Sample:
    image = clean if kind == "clean" else distort(clean, kind, level, rng)
    value = 1.0 if kind == "clean" else ms_ssim(clean, image)
    return Sample(centre(image), ms_ssim_to_score(value), value, source, kind, level if kind != "clean" else 0, index)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _draw_source(rng: np.random.Generator, sources: tuple[str, ...]) -> str:
    return sources[rng.integers(len(sources))]  # the stream's first draw: training_source relies on it


def training_source(seed: int, index: int, sources: tuple[str, ...] = TRAIN_SOURCES) -> str:
    """The photograph that sample `index` is cut from (or takes its dead-leaves colours from),
    without making the sample: groups crops by photograph for validation."""
    return _draw_source(_rng(seed, index), sources)


def native_crop(img: np.ndarray, rng: np.random.Generator, work: int) -> np.ndarray:
    """A random `work` x `work` crop at the photograph's own resolution: the pixels a view of a
    whole photograph sees, softer than those of a shrunk one."""
    h, w = img.shape[:2]
    y, x = rng.integers(0, h - work + 1), rng.integers(0, w - work + 1)
    return np.ascontiguousarray(img[y : y + work, x : x + work])


def training_sample(seed: int, index: int, sources: tuple[str, ...] = TRAIN_SOURCES, native_fraction: float = 0.0) -> Sample:
    """Sample `index` of the training stream: a random source, crop, colour, flip, distortion and
    level. A `native_fraction` of the photograph crops are cut at the photograph's full size (the
    rest from it shrunk to MAX_SHORT_SIDE, as the shipped model was trained); 0 leaves the stream
    as it was."""
    rng = _rng(seed, index)
    source = _draw_source(rng, sources)
    work = int(rng.integers(WORK_SIZE[0], WORK_SIZE[1] + 1))
    if rng.random() < DEAD_LEAVES_FRACTION:
        palette = load_source(source).reshape(-1, 3)  # the colours of a random training photograph
        clean, source = dead_leaves(work, rng, palette), f"dead_leaves({source} colours)"
    elif native_fraction > 0 and rng.random() < native_fraction:
        clean = native_crop(load_source(source, full_size=True), rng, work)
    else:
        clean = random_crop(load_source(source), rng, work)
    clean = normalise_tones(colour_augment(clean, rng), rng)
    if rng.random() < 0.5:
        clean = np.ascontiguousarray(clean[:, ::-1])
    if rng.random() < CLEAN_FRACTION:
        kind, level = "clean", 0
    else:
        kind, level = list(DISTORTIONS)[rng.integers(len(DISTORTIONS))], int(rng.choice(LEVELS))
    return labelled(clean, kind, level, rng, source, index)


def heldout_crop(seed: int, source_index: int, crop_index: int, source: str) -> list[Sample]:
    """One crop of a held-out photograph (natural colours, no flip): clean, then every
    distortion at every level."""
    rng = _rng(seed, 1000 * source_index + crop_index)
    work = int(rng.integers(WORK_SIZE[0], WORK_SIZE[1] + 1))
    clean = random_crop(load_source(source), rng, work)
    samples = [labelled(clean, "clean", 0, rng, source, -1)]
    samples += [labelled(clean, kind, level, rng, source, -1) for kind in DISTORTIONS for level in LEVELS]
    return samples


def heldout_grid(seed: int, crops_per_source: int, sources: tuple[str, ...] = HELDOUT_SOURCES, workers: int = 1) -> list[Sample]:
    """`crops_per_source` random crops of each held-out photograph, each with every distortion at
    every level and its clean version; the same list for any number of `workers`."""
    jobs = [(seed, s, c, source) for s, source in enumerate(sources) for c in range(crops_per_source)]
    samples = [x for part in _map(_heldout_job, jobs, workers) for x in part]
    for i, x in enumerate(samples):
        x.index = i
    return samples


def _heldout_job(args) -> list[Sample]:
    return heldout_crop(*args)


def _training_chunk(args) -> list[Sample]:
    seed, start, stop, native_fraction = args
    return [training_sample(seed, i, native_fraction=native_fraction) for i in range(start, stop)]


def fetch_photos(names: tuple[str, ...] = TRAIN_SOURCES) -> None:
    """Download the Debian photographs among `names` that are not in the cache yet (once, before
    worker processes start: each of them would download a missing package again)."""
    for name in names:
        if SOURCES[name].package == "debian":
            debian_photos.photo_path(name)


def training_samples(seed: int, count: int, workers: int = 1, chunk: int = 256, native_fraction: float = 0.0) -> list[Sample]:
    """`count` training samples; the same list for any number of `workers` (processes)."""
    fetch_photos()
    jobs = [(seed, start, min(start + chunk, count), native_fraction) for start in range(0, count, chunk)]
    return [s for part in _map(_training_chunk, jobs, workers) for s in part]


def _map(fn, jobs, workers: int):
    if workers <= 1:
        return [fn(job) for job in jobs]
    # spawn, not fork: forking a process whose torch thread pool is running can hang. One torch
    # thread per worker: the small convolutions gain nothing from more, and lose a lot when the
    # cores are busy.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        return list(pool.map(fn, jobs))


def _one_thread():
    import torch

    torch.set_num_threads(1)


assert WORK_SIZE[0] >= MS_SSIM_MIN_SIZE and WORK_SIZE[0] >= VIEW


# --- groups: one crop and its five levels of one distortion (stage 2, ranking.py) -------------
# blur, noise and JPEG are the commonest defects of real photographs: half of the groups.
GROUP_MAIN_KINDS = ("blur", "noise", "jpeg")
GROUP_MAIN_FRACTION = 0.6
# A group's clean crop: cut at the photograph's full size (the pixels a view of a whole
# photograph sees), or that and then enlarged 1-2x (the softer pixels of a 4000-6000 pixel
# photograph, which no training photograph has), or as stage 1 cuts it (shrunk, or dead leaves).
GROUP_NATIVE_FRACTION = 0.3
GROUP_SOFT_FRACTION = 0.25
GROUP_SOFT_ZOOM = (1.0, 2.5)
# Half of the groups are then saved as JPEG, as cameras and editors deliver photographs, at one
# quality in this range for all six: the clean crop too carries its delivery's artefacts.
DELIVERY_FRACTION = 0.5
DELIVERY_QUALITY = (88, 98)
# The view's corner inside the distorted crop: a multiple of 16, so that the JPEG blocks fall as
# they do in a whole photograph's views (PreprocessConfig.native_align).
VIEW_ALIGN = 16


def aligned_centre(img: np.ndarray, size: int = VIEW, align: int = VIEW_ALIGN) -> np.ndarray:
    top, left = ((img.shape[0] - size) // 2) // align * align, ((img.shape[1] - size) // 2) // align * align
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def soft_crop(img: np.ndarray, rng: np.random.Generator, work: int) -> np.ndarray:
    """A full-size crop enlarged by a random factor in GROUP_SOFT_ZOOM to `work` x `work`."""
    side = max(8, round(work / rng.uniform(*GROUP_SOFT_ZOOM)))
    crop = native_crop(img, rng, min(side, *img.shape[:2]))
    return np.asarray(Image.fromarray(crop).resize((work, work), Image.Resampling.LANCZOS))


def _deliver(img: np.ndarray, quality: int | None) -> np.ndarray:
    if quality is None:
        return img
    from rali_edge.distortions import _encode_decode

    return _encode_decode(img, format="JPEG", quality=quality)


def _group_kind(rng: np.random.Generator) -> str:
    """A group's distortion: blur, noise or JPEG GROUP_MAIN_FRACTION of the time, else another."""
    others = [k for k in DISTORTIONS if k not in GROUP_MAIN_KINDS]
    pool = GROUP_MAIN_KINDS if rng.random() < GROUP_MAIN_FRACTION else others
    return pool[rng.integers(len(pool))]


def training_group(seed: int, index: int, sources: tuple[str, ...] = GROUP_SOURCES) -> list[Sample]:
    """Group `index`: a clean crop and its five levels of one distortion (clean first), labelled
    as stage 1 labels (MS-SSIM against the clean crop before delivery), each view cut at an
    aligned centre. A stream of its own (seeded apart from training_sample's)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, index]))
    source = _draw_source(rng, sources)
    work = int(rng.integers(WORK_SIZE[0], WORK_SIZE[1] + 1))
    u = rng.random()
    if u < GROUP_NATIVE_FRACTION:
        clean = native_crop(load_source(source, full_size=True), rng, work)
    elif u < GROUP_NATIVE_FRACTION + GROUP_SOFT_FRACTION:
        clean = soft_crop(load_source(source, full_size=True), rng, work)
    elif u < GROUP_NATIVE_FRACTION + GROUP_SOFT_FRACTION + DEAD_LEAVES_FRACTION / 2:
        clean, source = dead_leaves(work, rng, load_source(source).reshape(-1, 3)), f"dead_leaves({source} colours)"
    else:
        clean = random_crop(load_source(source), rng, work)
    clean = normalise_tones(colour_augment(clean, rng), rng)
    if rng.random() < 0.5:
        clean = np.ascontiguousarray(clean[:, ::-1])
    kind = _group_kind(rng)
    quality = int(rng.integers(DELIVERY_QUALITY[0], DELIVERY_QUALITY[1] + 1)) if rng.random() < DELIVERY_FRACTION else None
    group = []
    for level in (0, *LEVELS):
        image = _deliver(clean if level == 0 else distort(clean, kind, level, rng), quality)
        value = ms_ssim(clean, image) if image is not clean else 1.0
        group.append(Sample(aligned_centre(image), ms_ssim_to_score(value), value, source,
                            "clean" if level == 0 else kind, level, index))
    return group


def _group_chunk(args) -> list[list[Sample]]:
    seed, start, stop = args
    return [training_group(seed, i) for i in range(start, stop)]


def training_groups(seed: int, count: int, workers: int = 1, chunk: int = 64) -> list[list[Sample]]:
    """`count` groups (training_group); the same list for any number of `workers`."""
    fetch_photos(GROUP_SOURCES)
    jobs = [(seed, start, min(start + chunk, count)) for start in range(0, count, chunk)]
    return [g for part in _map(_group_chunk, jobs, workers) for g in part]

# Whole-photograph groups (stage 2's `whole_groups`): a training photograph at its own size or
# shrunk (long side log-uniform from WHOLE_MIN_SIDE), seen through the scorer's own 4 x 4 aligned
# views, clean and at the five levels of one distortion. Only each view's surroundings are
# distorted (WHOLE_MARGIN pixels on every side, a multiple of the block grid: more than the widest
# blur reaches), which is what the view would hold had the whole photograph been distorted, for
# the cost of 16 small crops whatever the photograph's size. Stage 2 ranks the mean of the 16
# views' scores, the score a user gets, by level, and can fit it to a label: the mean of the
# labels (as stage 1 labels: MS-SSIM of the distorted surroundings against the clean ones) of the
# grid's diagonal views, one in each row and column (MS-SSIM of all 16 would cost four times the
# rest of a group).
WHOLE_MIN_SIDE = 450
WHOLE_SHRUNK_FRACTION = 0.5
WHOLE_MARGIN = 48
WHOLE_GRID = 4


def whole_photo_group(seed: int, index: int, sources: tuple[str, ...] = GROUP_SOURCES) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 [6, WHOLE_GRID**2, VIEW, VIEW, 3]: clean and levels 1-5, each as its views; their
    labels [6]; the distortion's name). A stream of its own."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3, index]))
    img = load_source(_draw_source(rng, sources), full_size=True)
    long = max(img.shape[:2])
    if long > WHOLE_MIN_SIDE and rng.random() < WHOLE_SHRUNK_FRACTION:
        k = math.exp(rng.uniform(math.log(WHOLE_MIN_SIDE), math.log(long))) / long
        size = (max(VIEW, round(img.shape[1] * k)), max(VIEW, round(img.shape[0] * k)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    kind = _group_kind(rng)
    quality = int(rng.integers(DELIVERY_QUALITY[0], DELIVERY_QUALITY[1] + 1))
    return (*whole_photo_views(img, kind, rng, quality), kind)


def whole_photo_views(img: np.ndarray, kind: str, rng: np.random.Generator, quality: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The scorer's aligned views (uint8 [6, WHOLE_GRID**2, VIEW, VIEW, 3]) of `img` clean and at
    the five levels of `kind`, each saved as JPEG at `quality` (None: not saved), distorting only
    each view's surroundings; and their labels ([6]: the diagonal views' mean label, MS-SSIM of
    the surroundings against the clean ones before delivery on the 1..5 scale)."""
    from rali_edge.preprocess import grid_origins

    h, w = img.shape[:2]
    out = np.empty((1 + len(LEVELS), WHOLE_GRID**2, VIEW, VIEW, 3), np.uint8)
    labels = np.zeros(1 + len(LEVELS), np.float32)
    for v, (top, left) in enumerate(grid_origins((h, w), (VIEW, VIEW), WHOLE_GRID, VIEW_ALIGN)):
        t0, l0 = max(0, top - WHOLE_MARGIN), max(0, left - WHOLE_MARGIN)
        region = np.ascontiguousarray(img[t0:top + VIEW + WHOLE_MARGIN, l0:left + VIEW + WHOLE_MARGIN])
        for level in (0, *LEVELS):
            image = _deliver(region if level == 0 else distort(region, kind, level, rng), quality)
            out[level, v] = image[top - t0:top - t0 + VIEW, left - l0:left - l0 + VIEW]
            if v % (WHOLE_GRID + 1) == 0:  # on the diagonal
                labels[level] += (ms_ssim_to_score(ms_ssim(region, image)) if image is not region else 5.0) / WHOLE_GRID
    return out, labels


def _whole_chunk(args) -> list[tuple[np.ndarray, np.ndarray]]:
    seed, start, stop = args
    return [whole_photo_group(seed, i)[:2] for i in range(start, stop)]


def whole_photo_groups(seed: int, count: int, workers: int = 1, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`count` whole-photograph groups stacked (uint8 [count, 6, 16, VIEW, VIEW, 3]) and their
    labels ([count, 6]); the same for any number of `workers`."""
    fetch_photos(GROUP_SOURCES)
    jobs = [(seed, start, min(start + chunk, count)) for start in range(0, count, chunk)]
    groups = [g for part in _map(_whole_chunk, jobs, workers) for g in part]
    return np.stack([views for views, _ in groups]), np.stack([labels for _, labels in groups])
