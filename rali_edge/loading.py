"""Read a published RALI folder without running any code from it, and convert it into a
rali-edge model folder (see model_file.py).

Published layout (hub repository ByteDance/Q-Insight, subfolder RALI):

    ckpt.pt      {"state_dict": {...}}: `clip.*` (a whole HF CLIPModel, text tower included) and
                 scorer.pca_scale [E], scorer.pca_components [P, E], scorer.prototypes [K, P],
                 scorer.proto_scores [K], scorer.logit_scale []
    pca.pkl      joblib.dump of a fitted scikit-learn PCA (mean_, components_, sometimes var_)
    basis.npz    vectors [K, P], scores [K]: only the initial prototypes
    best/        HF CLIP folder: config.json, preprocessor_config.json, model.safetensors or
                 pytorch_model.bin (tokenizer files too, unused here)

Which file each tensor comes from follows the published code (src/eval/demo_rali_score.py),
which builds CLIPModel.from_pretrained(best/) and a PrototypeScorer initialised from pca.pkl
and basis.npz, then loads ckpt.pt's state_dict over both:
- ckpt.pt wins for every tensor it holds; best/ gives the CLIP weights that ckpt.pt lacks;
- the PCA mean comes only from pca.pkl (it is a plain attribute, never in the state_dict);
- the initial scale is sqrt(var_) when the pickle has var_, else ones, values < 1e-10 set to 1;
- prototypes/scores default to basis.npz, components to pca.pkl, logit_scale to 1/0.07.
`PublishedCheckpoint.source` records which file each head tensor came from.

Safety: ckpt.pt and .bin files are read with torch.load(weights_only=True); basis.npz with
allow_pickle=False; pca.pkl with `SafeUnpickler`, a restricted unpickler that builds numpy
arrays and the attributes of scikit-learn PCA/StandardScaler objects and refuses everything
else before it can run (scikit-learn and joblib are never imported for it).
"""

from __future__ import annotations

import _compat_pickle
import bz2
import io
import json
import lzma
import math
import pickle
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rali_edge.errors import MissingDependencyError, ModelFormatError, RaliEdgeError, UnsafePickleError
from rali_edge.model import Encoder, EncoderConfig, FoldedHead, _activation, fold_head, head_torch, reference_head

PUBLISHED_REPO = "ByteDance/Q-Insight"
PUBLISHED_SUBFOLDER = "RALI"

CKPT, PCA_PICKLE, BASIS, BEST = "ckpt.pt", "pca.pkl", "basis.npz", "best"
DEFAULT_LOGIT_SCALE = 1.0 / 0.07  # published CLIP_IQA_Proto default tau
SCALE_FLOOR = 1e-10  # published: pca_scale[pca_scale < 1e-10] = 1.0
SCORER_KEYS = ("pca_scale", "pca_components", "prototypes", "proto_scores", "logit_scale")
HEAD_TENSORS = ("pca_mean",) + SCORER_KEYS
MAX_PICKLE_BYTES = 512 << 20  # a 768x768 float64 PCA is 5 MB; refuse decompression bombs

# HF CLIPVisionConfig / CLIPConfig defaults: config.json may leave out fields at their default
# value, and those are ViT-B/32's, not the ViT-L/14 defaults of EncoderConfig.
HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
HF_PROJECTION_DIM_DEFAULT = 512


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


def _is_vision_key(key: str) -> bool:
    return key.startswith("vision_model.") or key.startswith("visual_projection.")


def _read_hf_weights(best: Path) -> tuple[dict, str | None, list[Path]]:
    """Vision tensors of best/'s weights (safetensors preferred, as HF does; sharded or not).
    Returns (state, label of the weights for messages, files read)."""
    from safetensors import SafetensorError, safe_open

    for stem, is_st in (("model.safetensors", True), ("pytorch_model.bin", False)):
        single, index = best / stem, best / f"{stem}.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise ModelFormatError(f"{BEST}/{index.name}: malformed weight index ({type(e).__name__}: {e})") from None
            if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in names):
                raise ModelFormatError(f"{BEST}/{index.name}: shard names must be plain file names in {BEST}/")
            files = [best / name for name in names]
        else:
            continue
        state = {}
        for f in files:
            where = f"{BEST}/{f.name}"
            if not f.is_file():
                raise ModelFormatError(f"{where}: missing (listed in {BEST}/{index.name})")
            if is_st:
                try:
                    with safe_open(str(f), framework="pt") as st:
                        state.update({k: st.get_tensor(k) for k in st.keys() if _is_vision_key(k)})
                except (SafetensorError, OSError, ValueError) as e:
                    raise ModelFormatError(f"{where}: cannot read safetensors ({e})") from None
            else:
                loaded = torch_load_safely(f, where)
                if not isinstance(loaded, dict):
                    raise ModelFormatError(f"{where}: holds a {type(loaded).__name__}, expected a state_dict")
                if not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                    raise ModelFormatError(f"{where}: holds values that are not tensors; expected a state_dict")
                state.update({k: v for k, v in loaded.items() if isinstance(k, str) and _is_vision_key(k)})
        label = f"{BEST}/{files[0].name}" if len(files) == 1 else f"{BEST}/{index.name}"
        return state, label, files
    return {}, None, []


# ---------------------------------------------------------------------------------------------
# configs


def _read_json(path: Path, where: str) -> dict:
    if not path.is_file():
        raise ModelFormatError(f"{where}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{where}: expected a JSON object")
    return data


def encoder_config_from_hf(config: dict, where: str = f"{BEST}/config.json") -> EncoderConfig:
    """EncoderConfig from an HF CLIPConfig (or CLIPVisionConfig) dict, HF's defaults filling the
    fields left out. For a CLIPConfig the top-level projection_dim is the one CLIPModel uses."""
    if isinstance(config.get("vision_config"), dict) or config.get("model_type") == "clip":
        vision = {**HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
        vision["projection_dim"] = config.get("projection_dim", HF_PROJECTION_DIM_DEFAULT)
    elif config.get("model_type") == "clip_vision_model":
        vision = {**HF_VISION_DEFAULTS, "projection_dim": HF_PROJECTION_DIM_DEFAULT, **config}
    else:
        raise ModelFormatError(f"{where}: not a CLIP config (model_type is {config.get('model_type')!r}, expected 'clip')")
    try:
        cfg = EncoderConfig.from_hf(vision)
        _activation(cfg.hidden_act)  # ValueError names the supported ones
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: {e}") from None
    if cfg.hidden_size % cfg.num_attention_heads or cfg.image_size % cfg.patch_size:
        raise ModelFormatError(
            f"{where}: hidden_size {cfg.hidden_size} / {cfg.num_attention_heads} heads or image_size "
            f"{cfg.image_size} / patch_size {cfg.patch_size} does not divide"
        )
    return cfg


def _read_preprocess(best: Path, image_size: int) -> tuple[dict, str]:
    """PreprocessConfig.to_dict() of best/'s image processor settings, and the file they came from."""
    from rali_edge.preprocess import PreprocessConfig

    path, where = best / "preprocessor_config.json", f"{BEST}/preprocessor_config.json"
    if path.is_file():
        hf = _read_json(path, where)
    elif (best / "processor_config.json").is_file():
        # transformers 5 saves a CLIPProcessor's image settings inside processor_config.json
        where = f"{BEST}/processor_config.json"
        hf = _read_json(best / "processor_config.json", where).get("image_processor")
        if not isinstance(hf, dict):
            raise ModelFormatError(f"{where}: has no image_processor settings")
    else:
        raise ModelFormatError(f"{where}: missing (the image preprocessing of the model)")
    try:
        config = PreprocessConfig.from_hf(hf)
    except RaliEdgeError as e:
        message = str(e).removeprefix(f"{Path(where).name}:").strip()  # say the file once, with its folder
        raise ModelFormatError(f"{where}: {message}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: {type(e).__name__}: {e}") from None
    if config.do_center_crop and config.crop != (image_size, image_size):
        raise ModelFormatError(
            f"{where}: images come out {config.crop_height}x{config.crop_width} but the encoder "
            f"(config.json) takes {image_size}x{image_size}"
        )
    return config.to_dict(), where


# ---------------------------------------------------------------------------------------------
# the published checkpoint


@dataclass
class PublishedCheckpoint:
    """Everything the published model computes with, read from a published folder.
    Head tensors are float32, as the published PrototypeScorer holds them."""

    encoder: EncoderConfig
    vision_state: dict  # HF names: vision_model.*, visual_projection.weight (float32)
    pca_mean: torch.Tensor  # [E]
    pca_scale: torch.Tensor  # [E]
    pca_components: torch.Tensor  # [P, E]
    prototypes: torch.Tensor  # [K, P]
    proto_scores: torch.Tensor  # [K]
    logit_scale: float
    preprocess: dict
    files: dict = field(default_factory=dict)  # path relative to the folder -> sha256
    # where each value came from: HEAD_TENSORS -> "file:key" (or the default used),
    # "encoder_weights" -> {file: number of tensors}, "preprocess" -> file, "ignored" -> [...]
    provenance: dict = field(default_factory=dict)

    @property
    def pca_dim(self) -> int:
        return self.pca_components.shape[0]

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def fold(self) -> FoldedHead:
        s = self.vision_state
        return fold_head(
            s["vision_model.post_layernorm.weight"],
            s["vision_model.post_layernorm.bias"],
            self.encoder.layer_norm_eps,
            s["visual_projection.weight"],
            self.pca_mean,
            self.pca_scale,
            self.pca_components,
            self.prototypes,
            self.proto_scores,
            self.logit_scale,
        )

    def reference_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """The published head, term by term, on projected embeddings [B, E]."""
        return reference_head(
            embedding, self.pca_mean, self.pca_scale, self.pca_components, self.prototypes, self.proto_scores, self.logit_scale
        )

    def summary(self) -> str:
        c = self.encoder
        return (
            f"CLIP ViT hidden {c.hidden_size}, {c.num_hidden_layers} layers, patch {c.patch_size}, image {c.image_size}, "
            f"embedding E={c.projection_dim}; head P={self.pca_dim}, K={self.num_prototypes}, "
            f"logit scale {self.logit_scale:.4g} (tau {1 / max(self.logit_scale, 1e-6):.4g})"
        )


def _as_tensor(value, where: str, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ModelFormatError(f"{where}: {name} has dtype {t.dtype}, expected floating point")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ModelFormatError(f"{where}: {name} holds NaN or infinite values")
    return t


def _expect_shape(t: torch.Tensor, shape: tuple, where: str, name: str, why: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ModelFormatError(f"{where}: {name} has shape {tuple(t.shape)} but {why}")


def _read_ckpt(src: Path) -> dict:
    obj = torch_load_safely(src / CKPT, CKPT)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        has = f"keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ModelFormatError(f"{CKPT}: no 'state_dict' (it holds {has}); expected {{'state_dict': {{...}}}}")
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelFormatError(f"{CKPT}: state_dict is not a mapping of names to tensors")
    known_scorer = {f"scorer.{k}" for k in SCORER_KEYS} | {"scorer.pca_mean"}
    unexpected = sorted(k for k in state if not k.startswith("clip.") and k not in known_scorer)
    if unexpected:
        raise ModelFormatError(
            f"{CKPT}: unexpected keys in state_dict ({', '.join(unexpected[:4])}); expected clip.* and "
            f"scorer.{{{', '.join(SCORER_KEYS)}}}"
        )
    return state


def _merge_vision_weights(cfg: EncoderConfig, ckpt_state: dict, best_state: dict, best_label: str | None) -> tuple[dict, dict]:
    """best/'s vision weights with ckpt.pt's clip.* over them, checked against config.json."""
    from_ckpt = {k[len("clip."):]: v for k, v in ckpt_state.items() if k.startswith("clip.") and _is_vision_key(k[len("clip."):])}
    # Leftover clip.* keys that are neither vision nor text tower nor CLIP's own logit_scale are
    # not part of a CLIPModel: report them rather than drop them silently.
    stray = sorted(
        k for k in ckpt_state
        if k.startswith("clip.") and not _is_vision_key(k[5:])
        and not k[5:].startswith(("text_model.", "text_projection.")) and k[5:] != "logit_scale"
    )
    if stray:
        raise ModelFormatError(f"{CKPT}: unexpected keys in state_dict ({', '.join(stray[:4])}); not part of a CLIPModel")

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Encoder(cfg).state_dict().items()}

    def real(state):
        return {k: v for k, v in state.items() if not k.endswith("position_ids")}

    from_ckpt, from_best = real(from_ckpt), real(best_state)
    for state, label, prefix in ((from_ckpt, CKPT, "clip."), (from_best, best_label, "")):
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ModelFormatError(
                f"{label}: {len(extra)} vision tensors that a CLIP encoder with {BEST}/config.json's "
                f"settings does not have (e.g. {', '.join(prefix + k for k in extra[:3])})"
            )
        for k, v in state.items():
            if tuple(v.shape) != expected[k]:
                raise ModelFormatError(
                    f"{label}: {prefix}{k} has shape {tuple(v.shape)} but {BEST}/config.json gives {expected[k]}"
                )
    missing = sorted(set(expected) - set(from_ckpt) - set(from_best))
    if missing:
        where = f"{CKPT} or {best_label}" if best_label else f"{CKPT} (and {BEST}/ has no model.safetensors or pytorch_model.bin)"
        raise ModelFormatError(f"{len(missing)} vision tensors found in neither {where} (e.g. {', '.join(missing[:3])})")
    merged = {k: (from_ckpt[k] if k in from_ckpt else from_best[k]).detach().to(torch.float32).contiguous() for k in expected}
    for k, v in merged.items():
        if not torch.isfinite(v).all():
            raise ModelFormatError(f"{CKPT if k in from_ckpt else best_label}: {k} holds NaN or infinite values")
    counts = {CKPT: sum(k in from_ckpt for k in expected)}
    if best_label:
        counts[best_label] = sum(k not in from_ckpt for k in expected)
    return merged, counts


def read_published(src_dir: str | Path) -> PublishedCheckpoint:
    """Read a published RALI folder (see the module docstring). Nothing in it is executed.
    Raises ModelFormatError (UnsafePickleError for a pickle that asks for code) naming the file."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ModelFormatError(f"{src}: not a folder (expected a published RALI folder with {CKPT}, {PCA_PICKLE}, {BASIS} and {BEST}/)")
    for name in (CKPT, PCA_PICKLE):
        if not (src / name).is_file():
            raise ModelFormatError(f"{name}: missing from {src} (a published RALI folder has {CKPT}, {PCA_PICKLE}, {BASIS} and {BEST}/)")
    best = src / BEST
    if not best.is_dir():
        raise ModelFormatError(f"{BEST}/: missing from {src} (the CLIP folder with config.json and preprocessor_config.json)")

    cfg = encoder_config_from_hf(_read_json(best / "config.json", f"{BEST}/config.json"))
    preprocess, preprocess_where = _read_preprocess(best, cfg.image_size)
    ckpt = _read_ckpt(src)
    pca = read_pca_pickle(src / PCA_PICKLE, PCA_PICKLE)
    best_state, best_label, best_files = _read_hf_weights(best)
    vision, weight_counts = _merge_vision_weights(cfg, ckpt, best_state, best_label)
    E = cfg.projection_dim
    provenance: dict = {"encoder_weights": weight_counts}
    ignored = []

    def scorer(name):
        return ckpt.get(f"scorer.{name}")

    # PCA mean: only from pca.pkl.
    if "mean_" not in pca:
        raise ModelFormatError(f"{PCA_PICKLE}: has no mean_; the PCA mean comes only from this file")
    pca_mean = _as_tensor(pca["mean_"], PCA_PICKLE, "mean_")
    _expect_shape(pca_mean, (E,), PCA_PICKLE, "mean_", f"the CLIP projection ({BEST}/config.json) gives E = {E}")
    provenance["pca_mean"] = f"{PCA_PICKLE}:mean_"
    if scorer("pca_mean") is not None:
        ignored.append(f"{CKPT}:scorer.pca_mean (the published model takes the mean from {PCA_PICKLE})")

    # PCA components.
    if scorer("pca_components") is not None:
        components = _as_tensor(scorer("pca_components"), CKPT, "scorer.pca_components")
        provenance["pca_components"] = f"{CKPT}:scorer.pca_components"
        where_c = CKPT
    elif "components_" in pca:
        components = _as_tensor(pca["components_"], PCA_PICKLE, "components_")
        provenance["pca_components"] = f"{PCA_PICKLE}:components_"
        where_c = PCA_PICKLE
    else:
        raise ModelFormatError(f"{CKPT}: no scorer.pca_components, and {PCA_PICKLE} has no components_")
    name_c = "scorer.pca_components" if where_c == CKPT else "components_"
    if components.ndim != 2 or components.shape[1] != E or components.shape[0] < 1:
        raise ModelFormatError(f"{where_c}: {name_c} has shape {tuple(components.shape)} but should be [P, E] with E = {E}")
    P = components.shape[0]
    if "components_" in pca and where_c == CKPT and np.shape(pca["components_"]) != (P, E):
        raise ModelFormatError(
            f"{PCA_PICKLE}: components_ has shape {np.shape(pca['components_'])} but {CKPT} scorer.pca_components "
            f"has {(P, E)}; the two files are not from the same model"
        )

    # PCA scale: ckpt, else sqrt(var_) (floored), else ones.
    if scorer("pca_scale") is not None:
        scale = _as_tensor(scorer("pca_scale"), CKPT, "scorer.pca_scale")
        _expect_shape(scale, (E,), CKPT, "scorer.pca_scale", f"the CLIP projection gives E = {E}")
        provenance["pca_scale"] = f"{CKPT}:scorer.pca_scale"
        tiny = int((scale.abs() < SCALE_FLOOR).sum())
        if tiny:
            raise ModelFormatError(f"{CKPT}: scorer.pca_scale has {tiny} values with |s| < {SCALE_FLOOR}; the model would divide by ~0")
    elif "var_" in pca:
        var = np.asarray(pca["var_"], dtype=np.float64)
        if var.shape != (E,) or (var < 0).any():
            raise ModelFormatError(f"{PCA_PICKLE}: var_ has shape {var.shape} (expected ({E},), all >= 0)")
        s = np.sqrt(var)
        s[s < SCALE_FLOOR] = 1.0
        scale = _as_tensor(s, PCA_PICKLE, "sqrt(var_)")
        provenance["pca_scale"] = f"{PCA_PICKLE}:sqrt(var_)"
    else:
        scale = torch.ones(E)
        provenance["pca_scale"] = f"ones ({PCA_PICKLE} has no var_)"

    # Prototypes and their scores: ckpt, else basis.npz.
    basis = _read_basis(src) if (src / BASIS).is_file() else None
    protos = _head_tensor(ckpt, basis, "prototypes", "vectors", provenance)
    scores = _head_tensor(ckpt, basis, "proto_scores", "scores", provenance)
    where_p = CKPT if provenance["prototypes"].startswith(CKPT) else BASIS
    name_p = "scorer.prototypes" if where_p == CKPT else "vectors"
    if protos.ndim != 2 or protos.shape[1] != P or protos.shape[0] < 1:
        raise ModelFormatError(f"{where_p}: {name_p} has shape {tuple(protos.shape)} but pca components give P = {P}")
    K = protos.shape[0]
    where_s = CKPT if provenance["proto_scores"].startswith(CKPT) else BASIS
    _expect_shape(scores, (K,), where_s, "scorer.proto_scores" if where_s == CKPT else "scores", f"there are K = {K} prototypes")
    if basis is not None:
        # The published model is built with basis.npz's shapes, then loads ckpt.pt strictly.
        for key, t in (("vectors", protos), ("scores", scores)):
            if tuple(basis[key].shape) != tuple(t.shape):
                raise ModelFormatError(
                    f"{BASIS}: {key} has shape {tuple(basis[key].shape)} but {CKPT} gives {tuple(t.shape)}; "
                    "the two files are not from the same model"
                )

    if scorer("logit_scale") is not None:
        ls = _as_tensor(scorer("logit_scale"), CKPT, "scorer.logit_scale")
        if ls.numel() != 1:
            raise ModelFormatError(f"{CKPT}: scorer.logit_scale has shape {tuple(ls.shape)}, expected a single value")
        logit_scale = float(ls.reshape(()))
        provenance["logit_scale"] = f"{CKPT}:scorer.logit_scale"
    else:
        logit_scale = float(torch.tensor(DEFAULT_LOGIT_SCALE, dtype=torch.float32))  # as the published float32 parameter
        provenance["logit_scale"] = "default 1/0.07 (published init)"
    provenance["preprocess"] = preprocess_where
    if ignored:
        provenance["ignored"] = ignored

    files = [src / CKPT, src / PCA_PICKLE] + ([src / BASIS] if basis is not None else [])
    files += [best / "config.json", src / preprocess_where] + best_files
    from rali_edge.model_file import sha256_file

    return PublishedCheckpoint(
        encoder=cfg,
        vision_state=vision,
        pca_mean=pca_mean,
        pca_scale=scale,
        pca_components=components,
        prototypes=protos,
        proto_scores=scores,
        logit_scale=logit_scale,
        preprocess=preprocess,
        files={f.relative_to(src).as_posix(): sha256_file(f) for f in files},
        provenance=provenance,
    )


def _read_basis(src: Path) -> dict:
    try:
        with np.load(src / BASIS, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise UnsafePickleError(f"{BASIS}: holds pickled objects; only plain numeric arrays are allowed") from None
        raise ModelFormatError(f"{BASIS}: not a readable .npz ({e})") from None
    except (OSError, EOFError, KeyError) as e:
        raise ModelFormatError(f"{BASIS}: not a readable .npz ({type(e).__name__}: {e})") from None
    for key in ("vectors", "scores"):
        if key not in arrays:
            raise ModelFormatError(f"{BASIS}: no '{key}' array (it has {sorted(arrays)})")
    return arrays


def _head_tensor(ckpt: dict, basis: dict | None, name: str, basis_key: str, provenance: dict) -> torch.Tensor:
    if f"scorer.{name}" in ckpt:
        provenance[name] = f"{CKPT}:scorer.{name}"
        return _as_tensor(ckpt[f"scorer.{name}"], CKPT, f"scorer.{name}")
    if basis is None:
        raise ModelFormatError(f"{CKPT}: no scorer.{name}, and {BASIS} (its fallback) is missing")
    provenance[name] = f"{BASIS}:{basis_key}"
    return _as_tensor(basis[basis_key], BASIS, basis_key)


# ---------------------------------------------------------------------------------------------
# conversion and download


def default_name(cfg: EncoderConfig) -> str:
    known = {(768, 12): "b", (1024, 24): "l", (1280, 32): "h"}
    size = known.get((cfg.hidden_size, cfg.num_hidden_layers))
    if size:
        return f"rali-vit{size}{cfg.patch_size}-{cfg.image_size}"
    return f"rali-custom-h{cfg.hidden_size}-p{cfg.patch_size}-{cfg.image_size}"


def _check_fold(ckpt: PublishedCheckpoint, model) -> None:
    """The folded head must give the published head's scores (float32 rounding only)."""
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(16, ckpt.encoder.hidden_size, generator=gen, dtype=torch.float64)
    enc = model.encoder
    with torch.no_grad():
        emb = torch.nn.functional.linear(
            torch.nn.functional.layer_norm(
                cls, (cls.shape[-1],), enc.vision_model.post_layernorm.weight.double(),
                enc.vision_model.post_layernorm.bias.double(), ckpt.encoder.layer_norm_eps,
            ),
            enc.visual_projection.weight.double(),
        )
        ref = reference_head(
            emb, ckpt.pca_mean.double(), ckpt.pca_scale.double(), ckpt.pca_components.double(),
            ckpt.prototypes.double(), ckpt.proto_scores.double(), ckpt.logit_scale,
        )
        h = model.head
        got = head_torch(cls.float(), h.weight, h.bias, h.prototypes, h.proto_scores, float(h.logit_scale), h.ln_eps)
    err = float((got.double() - ref).abs().max())
    span = float(ckpt.proto_scores.abs().max()) + 1.0
    if not math.isfinite(err) or err > 1e-4 * span:
        raise ModelFormatError(f"the folded head differs from the published formula by {err:.3g}; the checkpoint is degenerate")


def convert_published(src_dir: str | Path, out_dir: str | Path, name: str | None = None, source_extra: dict | None = None) -> Path:
    """Read `src_dir` (a published RALI folder), fold the head and write a rali-edge model folder
    (manifest.json + weights.safetensors) to `out_dir`. Returns `out_dir`."""
    from rali_edge.model_file import MANIFEST, WEIGHTS, Manifest, build_model, save_model

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RaliEdgeError(f"{out}: exists and is not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, WEIGHTS))
        if others:
            raise RaliEdgeError(
                f"{out}: not empty ({', '.join(others[:3])}); give a new or empty folder, "
                "or a rali-edge model folder to replace"
            )
    ckpt = read_published(src_dir)
    model = build_model(ckpt.encoder, ckpt.vision_state, ckpt.fold())
    _check_fold(ckpt, model)
    source = {
        "kind": "published-rali",
        "folder": Path(src_dir).resolve().name,
        "files": ckpt.files,
        "head": {k: ckpt.provenance[k] for k in HEAD_TENSORS},
        "encoder_weights": ckpt.provenance["encoder_weights"],
        "preprocess": ckpt.provenance["preprocess"],
        "logit_scale": ckpt.logit_scale,
        **({"ignored": ckpt.provenance["ignored"]} if "ignored" in ckpt.provenance else {}),
        **(source_extra or {}),
    }
    manifest = Manifest(
        name=name or default_name(ckpt.encoder),
        encoder=ckpt.encoder,
        preprocess=ckpt.preprocess,
        pca_dim=ckpt.pca_dim,
        num_prototypes=ckpt.num_prototypes,
        source=source,
    )
    return save_model(out, model, manifest)


def fetch_published(out_dir: str | Path, cache_dir: str | Path | None = None, revision: str | None = None, name: str | None = None) -> Path:
    """Download the RALI folder of the hub repository ByteDance/Q-Insight with huggingface_hub
    (or take it from the local hub cache when offline) and convert it to `out_dir`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingDependencyError(
            "downloading needs huggingface_hub: pip install 'rali-edge[hub]' (or download the RALI folder "
            f"of {PUBLISHED_REPO} by hand and run `rali-edge convert`)"
        ) from None
    try:
        snapshot = snapshot_download(
            repo_id=PUBLISHED_REPO,
            allow_patterns=[f"{PUBLISHED_SUBFOLDER}/*"],
            cache_dir=str(cache_dir) if cache_dir else None,
            revision=revision,
        )
    except Exception as e:  # noqa: BLE001 - network, offline mode, auth, missing revision: all end the same way
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RaliEdgeError(
            f"could not reach the Hugging Face hub or the files of {PUBLISHED_REPO}/{PUBLISHED_SUBFOLDER}"
            f"{f' at revision {revision}' if revision else ''} are not in the local cache "
            f"({type(e).__name__}{': ' + detail if detail else ''}); download the {PUBLISHED_SUBFOLDER} folder by "
            "hand and run `rali-edge convert`"
        ) from None
    src = Path(snapshot) / PUBLISHED_SUBFOLDER
    if not src.is_dir():
        raise ModelFormatError(f"{PUBLISHED_REPO}: the download has no {PUBLISHED_SUBFOLDER}/ folder (revision {revision or 'main'})")
    hub = {"repo": PUBLISHED_REPO, "subfolder": PUBLISHED_SUBFOLDER, "revision": revision or "main", "snapshot": Path(snapshot).name}
    extra = {"hub": hub}
    return convert_published(src, out_dir, name=name, source_extra=extra)


__all__ = [
    "PublishedCheckpoint",
    "SafeUnpickler",
    "read_published",
    "read_pca_pickle",
    "load_pickle_safely",
    "torch_load_safely",
    "encoder_config_from_hf",
    "convert_published",
    "fetch_published",
    "default_name",
    "PUBLISHED_REPO",
    "PUBLISHED_SUBFOLDER",
    "DEFAULT_LOGIT_SCALE",
]
