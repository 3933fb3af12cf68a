"""Reading untrusted pickles without running code from them.

- `load_pickle_safely` / `read_pca_pickle`: `SafeUnpickler`, a restricted unpickler that
  understands joblib's format (numpy arrays stored beside the pickle stream) and builds only
  numpy arrays and the attributes of scikit-learn PCA/StandardScaler objects. Anything else is
  refused before it can run; scikit-learn and joblib are never imported.
- `torch_load_safely`: torch.load(weights_only=True), with a message naming what was refused.
"""

from __future__ import annotations

import _compat_pickle
import bz2
import io
import lzma
import math
import pickle
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from rali_edge.errors import ModelFormatError, UnsafePickleError

MAX_PICKLE_BYTES = 512 << 20  # a 768x768 float64 PCA is 5 MB; refuse decompression bombs


# ---------------------------------------------------------------------------------------------
# pca.pkl: a restricted unpickler that understands joblib's format


class _Refused(Exception):
    """Raised inside the unpickler; turned into UnsafePickleError naming the file."""


class _Attributes:
    """Stand-in for a scikit-learn estimator: only keeps the pickled attribute dict."""

    kind = "object"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _Refused(f"the state of a {self.kind} is not a dict of named attributes")
        self.__dict__.update(state)


class _PCA(_Attributes):
    kind = "PCA"


class _StandardScaler(_Attributes):
    kind = "StandardScaler"


class _JoblibArray:
    """Stand-in for joblib's NumpyArrayWrapper: its pickled state says the shape, order and
    dtype of the array whose raw bytes follow it in the file."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused("a joblib array header is not a dict")
        self.subclass = state.get("subclass")
        self.shape = state.get("shape")
        self.order = state.get("order", "C")
        self.dtype = state.get("dtype")
        self.alignment = state.get("numpy_array_alignment_bytes")  # absent before joblib 1.2: no padding


_MEMMAP = object()  # numpy.memmap named as a joblib array's subclass: read as a plain array

_SKLEARN = {
    ("sklearn.decomposition._pca", "PCA"): _PCA,
    ("sklearn.decomposition.pca", "PCA"): _PCA,  # scikit-learn < 0.22
    ("sklearn.decomposition._incremental_pca", "IncrementalPCA"): _PCA,
    ("sklearn.decomposition.incremental_pca", "IncrementalPCA"): _PCA,
    ("sklearn.preprocessing._data", "StandardScaler"): _StandardScaler,
    ("sklearn.preprocessing.data", "StandardScaler"): _StandardScaler,
}
_JOBLIB_WRAPPER = {("joblib.numpy_pickle", "NumpyArrayWrapper"), ("sklearn.externals.joblib.numpy_pickle", "NumpyArrayWrapper")}


def _numpy_attr(modules, name):
    for module in modules:
        try:
            obj = __import__(module, fromlist=[name])
            return getattr(obj, name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(name)


def _check_dtype(dtype):
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"an array's dtype is a {type(dtype).__name__}, not a numpy dtype")
    if dtype.hasobject:
        raise _Refused("an array holds Python objects (object dtype); only numeric arrays are allowed")
    return dtype


def _safe_reconstruct(subtype, shape, dtype):
    # numpy's ndarray.__reduce__: _reconstruct(ndarray, (0,), b"b"), then BUILD sets the data.
    if subtype is not np.ndarray:
        raise _Refused(f"an array of class {subtype!r}; only numpy.ndarray is allowed")
    return _numpy_attr(["numpy._core.multiarray", "numpy.core.multiarray"], "_reconstruct")(np.ndarray, shape, dtype)


def _safe_frombuffer(buf, dtype, shape, order):
    # numpy's reduce for pickle protocol 5.
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _Refused("an array's data is not a byte buffer")
    _check_dtype(dtype)
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _safe_scalar(dtype, data=None):
    _check_dtype(dtype)
    if not isinstance(data, bytes):
        raise _Refused("a numpy scalar's data is not bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _safe_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise _Refused(f"a numpy dtype is described by a {type(spec).__name__}, not a type code")
    return _check_dtype(np.dtype(spec, align, copy))


def _safe_reconstructor(cls, base, state):
    # copyreg._reconstructor (pickle protocols 0 and 1) for the stand-in classes only.
    if not (isinstance(cls, type) and issubclass(cls, (_Attributes, _JoblibArray))) or base is not object or state is not None:
        raise _Refused("copyreg._reconstructor with a class outside the allow-list")
    return object.__new__(cls)


def _safe_codecs_encode(text, encoding="utf-8"):
    # How pickle protocol 2 writes bytes: _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


class SafeUnpickler(pickle._Unpickler):
    """Unpickles numpy arrays, scikit-learn PCA/StandardScaler attributes, plain containers and
    joblib's array wrappers; any other global raises before it is looked up, let alone called.

    The pure-Python unpickler is used because joblib's format is not a pure pickle: after each
    NumpyArrayWrapper's BUILD come the raw bytes of the array, which we read ourselves.
    """

    dispatch = pickle._Unpickler.dispatch.copy()

    def __init__(self, data: bytes):
        self._raw = io.BytesIO(data)
        super().__init__(self._raw)

    def find_class(self, module, name):
        if self.proto < 3:  # Python 2 names (__builtin__, copy_reg...), as pickle itself maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _SKLEARN:
            return _SKLEARN[key]
        if key in _JOBLIB_WRAPPER:
            return _JoblibArray
        if module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            if name == "_reconstruct":
                return _safe_reconstruct
            if name == "scalar":
                return _safe_scalar
        if module in ("numpy._core.numeric", "numpy.core.numeric") and name == "_frombuffer":
            return _safe_frombuffer
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return _safe_dtype
        if key in {("numpy", "memmap"), ("numpy._core.memmap", "memmap"), ("numpy.core.memmap", "memmap")}:
            return _MEMMAP
        if module == "copyreg" and name == "_reconstructor":
            return _safe_reconstructor
        if module == "builtins" and name in ("object", "set", "frozenset", "bytearray"):
            return {"object": object, "set": set, "frozenset": frozenset, "bytearray": bytearray}[name]
        if module == "_codecs" and name == "encode":
            return _safe_codecs_encode
        raise _Refused(f"refused to load {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id (pickle asks for an external object)")

    def _refuse_extension(self):
        # EXT1/2/4 look names up in copyreg's global registry, which could bypass find_class.
        raise _Refused("refused a copyreg extension code")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_extension
    del _op

    def load_build(self):
        # BUILD only on instances we made (never on a class or a function, which would let a
        # pickle set attributes on them), then swap joblib's wrapper for the array after it.
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(inst, (np.ndarray, np.dtype, _Attributes, _JoblibArray)):
            raise _Refused(f"refused to set the state of a {type(inst).__name__}")
        pickle._Unpickler.load_build(self)
        if isinstance(self.stack[-1], _JoblibArray):
            self.stack.append(self._read_joblib_array(self.stack.pop()))

    dispatch[pickle.BUILD[0]] = load_build

    def _read_joblib_array(self, wrapper: _JoblibArray) -> np.ndarray:
        if wrapper.subclass is not np.ndarray and wrapper.subclass is not _MEMMAP:
            raise _Refused(f"a joblib array of class {wrapper.subclass!r}; only numpy.ndarray is allowed")
        dtype = wrapper.dtype
        if isinstance(dtype, np.dtype) and dtype.hasobject:
            # joblib would read a nested pickle here; we never do.
            raise _Refused("a joblib array holds Python objects (object dtype); only numeric arrays are allowed")
        _check_dtype(dtype)
        shape = wrapper.shape
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise _Refused(f"a joblib array has a malformed shape {shape!r}")
        if wrapper.order not in ("C", "F"):
            raise _Refused(f"a joblib array has a malformed order {wrapper.order!r}")
        if wrapper.alignment is not None:
            padding = self._raw.read(1)
            if len(padding) != 1:
                raise _Refused("the file ends inside a joblib array")
            self._raw.read(padding[0])
        nbytes = math.prod(shape) * dtype.itemsize
        data = self._raw.read(nbytes)
        if len(data) != nbytes:
            raise _Refused(f"the file ends inside a joblib array of shape {shape}")
        array = np.frombuffer(data, dtype=dtype).copy()
        array = array.reshape(shape[::-1]).T if wrapper.order == "F" else array.reshape(shape)
        return array.astype(dtype.newbyteorder("=")) if not dtype.isnative else array


def _decompress(data: bytes, where: str) -> bytes:
    """joblib's compressors, by magic bytes (see joblib/compressor.py), with the stdlib."""

    def bounded(decompress, tail=lambda: b""):
        out = decompress(data, MAX_PICKLE_BYTES + 1)
        if len(out) > MAX_PICKLE_BYTES or tail():
            raise ModelFormatError(f"{where}: decompresses to more than {MAX_PICKLE_BYTES >> 20} MiB; not a PCA")
        return out

    try:
        if data[:2] == b"ZF":
            raise ModelFormatError(f"{where}: written by joblib < 0.10, which rali-edge does not read; re-save it with a recent joblib")
        if data[:4] == b"\x04\x22\x4d\x18":
            raise ModelFormatError(f"{where}: lz4-compressed; re-save it with joblib.dump(..., compress='zlib') or no compression")
        if data[:1] == b"\x78":
            d = zlib.decompressobj()
            return bounded(d.decompress, lambda: d.unconsumed_tail)
        if data[:2] == b"\x1f\x8b":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return bounded(d.decompress, lambda: d.unconsumed_tail)
        if data[:2] == b"BZ":
            d = bz2.BZ2Decompressor()
            return bounded(d.decompress, lambda: not d.needs_input and not d.eof)
        if data[:5] == b"\xfd7zXZ" or data[:2] == b"\x5d\x00":
            d = lzma.LZMADecompressor()
            return bounded(d.decompress, lambda: not d.needs_input and not d.eof)
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
        raise ModelFormatError(f"{where}: corrupt compressed data ({e})") from None
    return data


def load_pickle_safely(path: str | Path, where: str | None = None):
    """Unpickle `path` (plain pickle or joblib, compressed or not) with `SafeUnpickler`.
    Raises UnsafePickleError naming the file and what was refused; nothing from it runs."""
    where = where or str(path)
    data = Path(path).read_bytes()
    if len(data) > MAX_PICKLE_BYTES:
        raise ModelFormatError(f"{where}: {len(data) >> 20} MiB, too large for a PCA")
    data = _decompress(data, where)
    try:
        return SafeUnpickler(data).load()
    except _Refused as e:
        raise UnsafePickleError(
            f"{where}: {e}: the pickle tries to call code; only numpy arrays and scikit-learn "
            "PCA/StandardScaler attributes are allowed"
        ) from None
    except RecursionError:
        raise ModelFormatError(f"{where}: nested too deeply to be a PCA") from None
    except Exception as e:  # noqa: BLE001 - any other failure of a hostile or broken byte stream
        raise ModelFormatError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


def read_pca_pickle(path: str | Path, where: str | None = None) -> dict[str, np.ndarray]:
    """The mean_, components_ and var_ (those present) of a pickled PCA, as numeric arrays."""
    where = where or str(path)
    obj = load_pickle_safely(path, where)
    if isinstance(obj, _Attributes):
        attrs = obj.__dict__
    elif isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        attrs = obj
    else:
        raise ModelFormatError(f"{where}: holds a {type(obj).__name__}, expected a scikit-learn PCA or a dict with mean_ and components_")
    out = {}
    for name in ("mean_", "components_", "var_"):
        if name in attrs and attrs[name] is not None:
            value = attrs[name]
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
                raise ModelFormatError(f"{where}: {name} is a {type(value).__name__}, expected a numeric numpy array")
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# ckpt.pt and HF weights


def _extra_safe_globals():
    # Harmless globals that training checkpoints carry beside the state_dict (epoch numbers as
    # numpy scalars, argparse options). They only hold data; torch still refuses everything else.
    import argparse

    scalar = _numpy_attr(["numpy._core.multiarray", "numpy.core.multiarray"], "scalar")
    extra = [argparse.Namespace, np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            extra.append(getattr(np.dtypes, name))
    return extra


def _global_name(obj) -> str:
    return obj[1] if isinstance(obj, tuple) else f"{obj.__module__}.{obj.__qualname__}"


def _refused_globals(path: Path, message: str) -> list[str]:
    """The globals that made torch's weights-only unpickler refuse `path` (read, never run)."""
    allowed = {_global_name(g) for g in _extra_safe_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy format or a broken file: fall back to the message
        found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return [g for g in found if g not in allowed]


def torch_load_safely(path: Path, where: str):
    """torch.load(weights_only=True): tensors and plain containers only; never runs code."""
    if not path.is_file():
        raise ModelFormatError(f"{where}: missing")
    try:
        with torch.serialization.safe_globals(_extra_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        refused = _refused_globals(path, str(e))
        if not refused:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            detail = detail.group(1).strip() if detail else str(e).strip().splitlines()[0]
            raise ModelFormatError(f"{where}: not a readable PyTorch checkpoint ({detail})") from None
        raise UnsafePickleError(
            f"{where}: refused to load {', '.join(refused)}: the checkpoint's pickle asks for code, and rali-edge "
            "only reads tensors and plain containers from it (torch.load with weights_only=True). "
            "If you trust the file, load it yourself and re-save just {'state_dict': ...} with torch.save"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ModelFormatError(f"{where}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
