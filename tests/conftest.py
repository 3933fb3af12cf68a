import os

import torch

# The Triton interpreter must be chosen before any module defines a @triton.jit kernel: on a machine
# without a GPU the kernels run interpreted on the CPU; with one they compile and run on it (set
# TRITON_INTERPRET=1 to interpret them there too).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub
# Most tests check numbers against PyTorch references and make many small models: they run eager
# PyTorch, as RALI_EDGE_BACKEND=torch makes every command and rali_edge.load do. The default
# (auto, with its engine cache) is tested on its own in test_engine_cache.py, with a cache in a
# temporary folder; no test writes to the user's ~/.cache.
os.environ["RALI_EDGE_BACKEND"] = "torch"
os.environ["RALI_EDGE_CACHE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="rali-edge-test-cache-"), "engines")

import pytest  # noqa: E402


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return _has_cuda()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    skip_trt = pytest.mark.skip(reason="needs TensorRT and a CUDA GPU; not installed here")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not _has_tensorrt():
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """Folder of a small random rali-edge model (CLIP-architecture encoder + folded head)."""
    from small_model import make_small_model

    return make_small_model(tmp_path_factory.mktemp("model") / "small")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Freely licensed photographs from scikit-image (CC0 / public domain), written as JPEG and
    PNG files of several sizes and aspect ratios."""
    from PIL import Image
    from skimage import data

    out = tmp_path_factory.mktemp("photos")
    paths = []
    for name, size in [("astronaut", (512, 512)), ("chelsea", (451, 300)), ("coffee", (400, 600)), ("rocket", (427, 640))]:
        img = Image.fromarray(getattr(data, name)()).resize(size, Image.BICUBIC)
        path = out / f"{name}.{'jpg' if len(paths) % 2 else 'png'}"
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths
