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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rali_edge.errors import (
    MissingDependencyError,
    ModelFormatError,
    NetworkError,
    RaliEdgeError,
    UnsafePickleError,
    read_json_object,
)
from rali_edge.head import PrototypeHead
from rali_edge.model import Encoder, EncoderConfig
from rali_edge.safe_pickle import (
    read_pca_pickle,
    torch_load_safely,
)

PUBLISHED_REPO = "ByteDance/Q-Insight"
PUBLISHED_SUBFOLDER = "RALI"

CKPT, PCA_PICKLE, BASIS, BEST = "ckpt.pt", "pca.pkl", "basis.npz", "best"
DEFAULT_LOGIT_SCALE = 1.0 / 0.07  # published CLIP_IQA_Proto default tau
SCALE_FLOOR = 1e-10  # published: pca_scale[pca_scale < 1e-10] = 1.0
SCORER_KEYS = ("pca_scale", "pca_components", "prototypes", "proto_scores", "logit_scale")
HEAD_TENSORS = ("pca_mean",) + SCORER_KEYS



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


def encoder_config_from_hf(config: dict, where: str = f"{BEST}/config.json") -> EncoderConfig:
    if not (isinstance(config.get("vision_config"), dict) or config.get("model_type") in ("clip", "clip_vision_model")):
        raise ModelFormatError(f"{where}: not a CLIP config (model_type is {config.get('model_type')!r}, expected 'clip')")
    try:
        return EncoderConfig.from_hf(config)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: {e}") from None


def _read_preprocess(best: Path, image_size: int) -> tuple[dict, str]:
    """PreprocessConfig.to_dict() of best/'s image processor settings, and the file they came from."""
    from rali_edge.preprocess import PreprocessConfig

    path, where = best / "preprocessor_config.json", f"{BEST}/preprocessor_config.json"
    if path.is_file():
        hf = read_json_object(path, where)
    elif (best / "processor_config.json").is_file():
        # transformers 5 saves a CLIPProcessor's image settings inside processor_config.json
        where = f"{BEST}/processor_config.json"
        hf = read_json_object(best / "processor_config.json", where).get("image_processor")
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
    head: PrototypeHead
    preprocess: dict
    files: dict = field(default_factory=dict)  # path relative to the folder -> sha256
    # where each value came from: HEAD_TENSORS -> "file:key" (or the default used),
    # "encoder_weights" -> {file: number of tensors}, "preprocess" -> file, "ignored" -> [...]
    provenance: dict = field(default_factory=dict)

    @property
    def pca_dim(self) -> int:
        return self.head.pca_dim

    @property
    def num_prototypes(self) -> int:
        return self.head.num_prototypes

    def summary(self) -> str:
        c = self.encoder
        return (
            f"CLIP ViT hidden {c.hidden_size}, {c.num_hidden_layers} layers, patch {c.patch_size}, image {c.image_size}, "
            f"embedding E={c.projection_dim}; head P={self.pca_dim}, K={self.num_prototypes}, "
            f"logit scale {self.head.logit_scale:.4g} (tau {1 / max(self.head.logit_scale, 1e-6):.4g})"
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

    cfg = encoder_config_from_hf(read_json_object(best / "config.json", f"{BEST}/config.json"))
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
        head=PrototypeHead(pca_mean, scale, components, protos, scores, logit_scale),
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
        ref = ckpt.head.to(torch.float64)(emb)
        got = model.head(cls.float())
    err = float((got.double() - ref).abs().max())
    span = float(ckpt.head.proto_scores.abs().max()) + 1.0
    if not math.isfinite(err) or err > 1e-4 * span:
        raise ModelFormatError(f"the folded head differs from the published formula by {err:.3g}; the checkpoint is degenerate")


def convert_published(src_dir: str | Path, out_dir: str | Path, name: str | None = None, source_extra: dict | None = None) -> Path:
    """Read `src_dir` (a published RALI folder), fold the head and write a rali-edge model folder
    (manifest.json + weights.safetensors) to `out_dir`. Returns `out_dir`."""
    from rali_edge.model_file import Manifest, build_model, check_output_folder, save_model

    check_output_folder(out_dir, force=True)  # a model folder is replaced; checked before a ViT-L is read
    ckpt = read_published(src_dir)
    model = build_model(ckpt.encoder, ckpt.vision_state, ckpt.head)
    _check_fold(ckpt, model)
    source = {
        "kind": "published-rali",
        "folder": Path(src_dir).resolve().name,
        "files": ckpt.files,
        "head": {k: ckpt.provenance[k] for k in HEAD_TENSORS},
        "encoder_weights": ckpt.provenance["encoder_weights"],
        "preprocess": ckpt.provenance["preprocess"],
        "logit_scale": ckpt.head.logit_scale,
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
    return save_model(out_dir, model, manifest)


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
        raise NetworkError(
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
    "read_published",
    "encoder_config_from_hf",
    "convert_published",
    "fetch_published",
    "default_name",
    "PUBLISHED_REPO",
    "PUBLISHED_SUBFOLDER",
    "DEFAULT_LOGIT_SCALE",
]
