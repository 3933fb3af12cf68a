"""rali-edge's own model format: a folder with `manifest.json` and `weights.safetensors`.

No pickle anywhere: safetensors holds the tensors (RaliModel's state_dict: the CLIP vision
tower under `encoder.*`, the folded head under `head.*`), the manifest holds everything else
and the sha256 of the weights file, which is also the model's identity for engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rali_edge import __version__
from rali_edge.errors import ModelFormatError, UsageError, read_json_object
from rali_edge.head import PrototypeHead
from rali_edge.model import EncoderConfig, RaliModel

FORMAT = "rali-edge-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    name: str
    encoder: EncoderConfig
    preprocess: dict  # PreprocessConfig.to_dict() (see preprocess.py)
    pca_dim: int
    num_prototypes: int
    weights_sha256: str = ""
    source: dict = field(default_factory=dict)  # where it came from: files and their sha256, recipe...
    created_by: str = f"rali-edge {__version__}"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "encoder": self.encoder.to_dict(),
            "preprocess": self.preprocess,
            "head": {
                "hidden_size": self.encoder.hidden_size,
                "pca_dim": self.pca_dim,
                "num_prototypes": self.num_prototypes,
                "ln_eps": self.encoder.layer_norm_eps,
            },
            "weights": {"file": WEIGHTS, "sha256": self.weights_sha256},
            "source": self.source,
            "created_by": self.created_by,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise ModelFormatError(f"{where}: malformed manifest (a JSON object expected, not {type(d).__name__})")
        if d.get("format") != FORMAT:
            raise ModelFormatError(f"{where}: not a rali-edge model manifest (format is {d.get('format')!r})")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFormatError(
                f"{where}: format version {d['format_version']} is newer than this rali-edge reads "
                f"({FORMAT_VERSION}); upgrade rali-edge"
            )
        try:
            return cls(
                name=d["name"],
                encoder=EncoderConfig(**d["encoder"]),
                preprocess=d["preprocess"],
                pca_dim=int(d["head"]["pca_dim"]),
                num_prototypes=int(d["head"]["num_prototypes"]),
                weights_sha256=d["weights"]["sha256"],
                source=d.get("source", {}),
                created_by=d.get("created_by", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def build_model(encoder: EncoderConfig, encoder_state: dict, head: PrototypeHead) -> RaliModel:
    """A RaliModel from a vision state_dict (HF names, `vision_model.*`, `visual_projection.weight`)
    and a head in its published form, folded here with that encoder. Missing or unexpected keys
    and wrong shapes raise ModelFormatError."""
    model = RaliModel(encoder, head.pca_dim, head.num_prototypes)
    state = {k: v for k, v in encoder_state.items() if not k.endswith("position_ids")}
    _load_strict(model.encoder, state, "encoder weights")
    model.head = head.fold(model.encoder)
    return model.eval()


def check_output_folder(out_dir: str | Path, force: bool = False) -> Path:
    """Before any work (`convert` and `fit-head` take minutes): `out_dir` may be new, an empty
    folder, or (with `force`) a model folder, holding a manifest and weights only, to overwrite.
    Anything else (a file, a folder of other things, say next to photographs) is refused, so that
    writing a model never mixes with or replaces a user's files."""
    from rali_edge.outputs import why_not_writable

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; give a new or empty folder for the model")
    reason = why_not_writable(out, folder=True)
    if reason:
        raise UsageError(f"cannot write the model into {out}: {reason}")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not (out / MANIFEST).is_file():
        raise UsageError(f"-o {out} is a folder with other files in it, not a model folder; give a new or empty folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, WEIGHTS))
    if others:
        raise UsageError(f"-o {out}: not empty ({', '.join(others[:3])}); give a new or empty folder, or a "
                         "rali-edge model folder to replace")
    if not force:
        raise UsageError(f"-o {out} already holds a model; add --force to overwrite it, or give another folder")
    return out


def save_model(out_dir: str | Path, model: RaliModel, manifest: Manifest) -> Path:
    """Write `out_dir/weights.safetensors` and `out_dir/manifest.json` (the weights' sha256 filled in)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    manifest.weights_sha256 = sha256_file(out / WEIGHTS)
    manifest.pca_dim, manifest.num_prototypes = model.head.weight.shape[0], model.head.prototypes.shape[0]
    (out / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    # safetensors creates its file private (0600); a model folder is shared like its manifest.
    os.chmod(out / WEIGHTS, stat.S_IMODE((out / MANIFEST).stat().st_mode))
    return out


def read_manifest(path: str | Path) -> Manifest:
    where = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise ModelFormatError(f"{path}: not a rali-edge model folder (expected a folder with {MANIFEST} and {WEIGHTS})")
    if not where.is_file():
        hint = " It looks like a published RALI folder: run `rali-edge convert` on it first." if (
            Path(path) / "ckpt.pt"
        ).exists() else ""
        raise ModelFormatError(f"{where}: missing.{hint}")
    return Manifest.from_dict(read_json_object(where, str(where)), str(where))


def load_model(path: str | Path, verify: bool = True, encoder: bool = True) -> tuple[RaliModel, Manifest]:
    """Read a model folder. `verify` checks the weights' sha256 against the manifest. encoder=False
    reads the head alone (model.encoder is None): what a scorer whose encoder is an engine needs,
    so that the encoder's weights are not held twice in memory (once by the engine)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{weights}: missing")
    if verify and manifest.weights_sha256 and sha256_file(weights) != manifest.weights_sha256:
        raise ModelFormatError(f"{weights}: sha256 differs from {MANIFEST}; the file is corrupt or was replaced")
    try:
        if encoder:
            state = load_file(str(weights))
        else:
            with safe_open(str(weights), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("head.")}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(f"{weights}: cannot read safetensors ({e})") from None
    # The model computes in fp32 (a reduced precision is chosen when it runs): a file of other floats
    # is widened here, since assign=True below would keep the file's dtype.
    state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}
    with torch.device("meta"):  # no random initialisation, and no second copy: the read tensors become the model's
        model = RaliModel(manifest.encoder, manifest.pca_dim, manifest.num_prototypes, encoder=encoder)
    _load_strict(model, state, str(weights), assign=True)
    model.head.ln_eps = manifest.encoder.layer_norm_eps
    return model.eval(), manifest


def _load_strict(module: torch.nn.Module, state: dict, where: str, assign: bool = False) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:3]))
    if problems:
        raise ModelFormatError(f"{where}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=assign)
