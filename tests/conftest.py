import os

# The Triton interpreter must be chosen before any module defines a @triton.jit kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub

import pytest  # noqa: E402
import torch  # noqa: E402


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
