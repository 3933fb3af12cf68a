"""`rali-edge convert`/`fetch`: the published folder -> our model file, safely.

Parity: the converted model (loaded back from disk) against the published formula computed with
transformers' CLIPModel (tests/published.py). Both run the same float32 network; they differ in
attention kernels, op order and the folded head, so scores (1..5) agree to ~1e-6. The issue's
bound is 1e-4, which is what we assert.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from published import (
    E,
    K,
    P,
    make_published_folder,
    published_clip,
    published_reference_scores,
)

from rali_edge.errors import (
    MissingDependencyError,
    ModelFormatError,
    RaliEdgeError,
    UnsafePickleError,
    UsageError,
)
from rali_edge.loading import (
    convert_published,
    default_name,
    encoder_config_from_hf,
    fetch_published,
    read_published,
)
from rali_edge.model import EncoderConfig
from rali_edge.model_file import build_model, load_model
from rali_edge.safe_pickle import load_pickle_safely, read_pca_pickle

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
joblib = pytest.importorskip("joblib")

PARITY_TOL = 1e-4  # max abs score difference against the published formula


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """One published-layout folder for the tests that only read it or copy it."""
    return make_published_folder(tmp_path_factory.mktemp("published") / "RALI")


@pytest.fixture
def folder(published, tmp_path) -> Path:
    """A private copy of `published` that a test may break."""
    return Path(shutil.copytree(published, tmp_path / "RALI"))


def pixels(n=4, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def converted_scores(src, out) -> torch.Tensor:
    convert_published(src, out)
    model, _ = load_model(out)
    with torch.no_grad():
        return model(pixels())


# ---------------------------------------------------------------------------------------------
# parity with the published formula


def test_parity_and_ckpt_wins(published, tmp_path):
    ref = published_reference_scores(published, pixels())
    got = converted_scores(published, tmp_path / "model")
    assert (got - ref).abs().max().item() <= PARITY_TOL
    assert ref.std() > 0.05  # the scores vary, so a wrong weight would show

    # Sensitivity: had best/'s CLIP weights been used instead of ckpt.pt's, the scores would
    # differ by far more than the tolerance, so the assertion above tests "ckpt.pt wins".
    from transformers import CLIPModel

    best_only = CLIPModel.from_pretrained(published / "best").eval()
    clip, _ = published_clip(published)
    with torch.no_grad():
        a = best_only.get_image_features(pixel_values=pixels()).pooler_output
        b = clip.get_image_features(pixel_values=pixels()).pooler_output
    assert (a - b).abs().max() > 1e-2

    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    src = manifest["source"]
    assert src["head"] == {
        "pca_mean": "pca.pkl:mean_",
        "pca_scale": "ckpt.pt:scorer.pca_scale",
        "pca_components": "ckpt.pt:scorer.pca_components",
        "prototypes": "ckpt.pt:scorer.prototypes",
        "proto_scores": "ckpt.pt:scorer.proto_scores",
        "logit_scale": "ckpt.pt:scorer.logit_scale",
    }
    assert src["encoder_weights"] == {"ckpt.pt": 40, "best/model.safetensors": 0}
    assert set(src["files"]) == {
        "ckpt.pt", "pca.pkl", "basis.npz", "best/config.json", "best/preprocessor_config.json", "best/model.safetensors",
    }
    from rali_edge.model_file import sha256_file

    assert src["files"]["pca.pkl"] == sha256_file(published / "pca.pkl")
    assert manifest["head"]["pca_dim"] == P and manifest["head"]["num_prototypes"] == K
    assert manifest["encoder"]["projection_dim"] == E and manifest["name"] == "rali-custom-h64-p14-56"


@pytest.mark.parametrize(
    "variant",
    [
        dict(hidden_act="gelu", with_var=False, preprocessor_form="old", position_ids=False, weights="bin"),
        dict(hidden_act="quick_gelu", with_var=False, preprocessor_form="new", position_ids=True, weights="bin"),
        dict(hidden_act="gelu", with_var=True, preprocessor_form="old", position_ids=True, weights="safetensors"),
        dict(hidden_act="quick_gelu", with_var=True, preprocessor_form="new", position_ids=False, weights="safetensors", seed=3),
        # best/ without weights: ckpt.pt holds every vision tensor
        dict(weights=None),
        # joblib-compressed pca.pkl
        dict(pca_compress=("zlib", 3), with_var=False),
    ],
    ids=["gelu-novar-old-bin", "quick-novar-new-posids-bin", "gelu-var-old-posids-st", "quick-var-new-st-seed3",
         "no-best-weights", "zlib-pca"],
)
def test_parity_variants(tmp_path, variant):
    src = make_published_folder(tmp_path / "RALI", **variant)
    ref = published_reference_scores(src, pixels())
    got = converted_scores(src, tmp_path / "model")
    assert (got - ref).abs().max().item() <= PARITY_TOL



@pytest.mark.parametrize("form", ["old", "new"])
def test_images_end_to_end(tmp_path, form):
    """Photos through rali_edge.load(converted) against the published pipeline: its image
    processor (CLIPImageProcessor from best/), CLIPModel and the published head."""
    from PIL import Image
    from skimage import data
    from transformers import CLIPImageProcessor

    import rali_edge

    src = make_published_folder(tmp_path / "RALI", preprocessor_form=form)
    convert_published(src, tmp_path / "model")
    images = [Image.fromarray(data.astronaut()).resize((90, 70)), Image.fromarray(data.coffee()).resize((64, 100)),
              Image.fromarray(data.chelsea())]
    pixel_values = CLIPImageProcessor.from_pretrained(src / "best")(images=images, return_tensors="pt")["pixel_values"]
    ref = published_reference_scores(src, pixel_values)
    got = torch.tensor(rali_edge.load(tmp_path / "model", head="torch").score(images))
    assert (got - ref).abs().max().item() <= PARITY_TOL

def test_fallbacks_when_ckpt_lacks_tensors(tmp_path):
    # ckpt.pt without the head tensors and without one encoder layer: prototypes and scores from
    # basis.npz, components from pca.pkl, scale from var_, logit_scale 1/0.07, layer 1 from best/.
    src = make_published_folder(tmp_path / "RALI", ckpt_drop=("scorer.", "clip.vision_model.encoder.layers.1."))
    ref = published_reference_scores(src, pixels())
    got = converted_scores(src, tmp_path / "model")
    assert (got - ref).abs().max().item() <= PARITY_TOL
    source = json.loads((tmp_path / "model" / "manifest.json").read_text())["source"]
    assert source["head"] == {
        "pca_mean": "pca.pkl:mean_",
        "pca_scale": "pca.pkl:sqrt(var_)",
        "pca_components": "pca.pkl:components_",
        "prototypes": "basis.npz:vectors",
        "proto_scores": "basis.npz:scores",
        "logit_scale": "default 1/0.07 (published init)",
    }
    assert source["encoder_weights"] == {"ckpt.pt": 24, "best/model.safetensors": 16}
    assert source["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)



def test_sharded_best_weights(tmp_path):
    # best/ saved in shards with an index, and ckpt.pt without the vision tower: all from best/.
    from safetensors.torch import load_file, save_file

    src = make_published_folder(tmp_path / "RALI", ckpt_drop=("clip.vision_model.", "clip.visual_projection."))
    best = src / "best"
    state = load_file(str(best / "model.safetensors"))
    (best / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(best / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (best / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = read_published(src)
    assert ckpt.provenance["encoder_weights"] == {"ckpt.pt": 0, "best/model.safetensors.index.json": 40}
    assert set(shards) <= {Path(f).name for f in ckpt.files}
    # same weights as a single-file best/ would give
    for k, v in ckpt.vision_state.items():
        assert torch.equal(v, state[k])

def test_scale_is_ones_without_var(tmp_path):
    src = make_published_folder(tmp_path / "RALI", with_var=False, ckpt_drop=("scorer.pca_scale",))
    ckpt = read_published(src)
    assert torch.equal(ckpt.head.pca_scale, torch.ones(E))
    assert ckpt.provenance["pca_scale"] == "ones (pca.pkl has no var_)"
    assert (converted_scores(src, tmp_path / "m") - published_reference_scores(src, pixels())).abs().max() <= PARITY_TOL


def test_scale_floor_on_tiny_variances(tmp_path):
    # var_ below 1e-20 gives sqrt < 1e-10: the published init sets those scales to 1.
    src = make_published_folder(tmp_path / "RALI", ckpt_drop=("scorer.pca_scale",))
    pca = joblib.load(src / "pca.pkl")
    pca.var_[:3] = [0.0, 1e-22, 1e-19]
    joblib.dump(pca, src / "pca.pkl")
    scale = read_published(src).head.pca_scale
    assert scale[:2].tolist() == [1.0, 1.0] and scale[2].item() == pytest.approx(np.sqrt(1e-19), rel=1e-6)
    assert (converted_scores(src, tmp_path / "m") - published_reference_scores(src, pixels())).abs().max() <= PARITY_TOL


def test_folded_head_matches_the_published_formula(published):
    """PrototypeHead.fold (float64 folding, float32 storage) against the term-by-term published head in
    float64 on random class tokens: the only error is the float32 rounding of the folded
    matrices and the float32 head arithmetic, ~1e-6 on scores of size ~5. Tolerance 2e-5."""
    ckpt = read_published(published)
    folded = build_model(ckpt.encoder, ckpt.vision_state, ckpt.head).head
    cls = 3 * torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    s = ckpt.vision_state
    emb = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(
            cls, (64,), s["vision_model.post_layernorm.weight"].double(), s["vision_model.post_layernorm.bias"].double(), 1e-5
        ),
        s["visual_projection.weight"].double(),
    )
    h64 = ckpt.head.to(torch.float64)
    ref, ref_w = h64(emb, return_weights=True)
    with torch.no_grad():
        got, got_w = folded(cls.float(), return_weights=True)
    assert (got.double() - ref).abs().max() <= 2e-5
    assert (got_w.double() - ref_w).abs().max() <= 2e-6
    assert ref.std() > 0.05


# ---------------------------------------------------------------------------------------------
# malformed folders: ModelFormatError naming the file and the problem


def _ckpt_edit(fn):
    def edit(src):
        state = torch.load(src / "ckpt.pt", weights_only=True)
        fn(state["state_dict"])
        torch.save(state, src / "ckpt.pt")

    return edit


def _set(key, value):
    return _ckpt_edit(lambda sd: sd.__setitem__(key, value))


def _pca_edit(fn):
    def edit(src):
        pca = joblib.load(src / "pca.pkl")
        fn(pca)
        joblib.dump(pca, src / "pca.pkl")

    return edit


def _json_edit(name, fn):
    def edit(src):
        path = src / "best" / name
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return edit


def _drop_and(key, then):
    def edit(src):
        _ckpt_edit(lambda sd: sd.pop(key))(src)
        then(src)

    return edit


MALFORMED = {
    "no-ckpt": (lambda s: (s / "ckpt.pt").unlink(), ["ckpt.pt", "missing"]),
    "no-pca": (lambda s: (s / "pca.pkl").unlink(), ["pca.pkl", "missing"]),
    "no-best": (lambda s: shutil.rmtree(s / "best"), ["best/", "missing"]),
    "no-config": (lambda s: (s / "best" / "config.json").unlink(), ["best/config.json", "missing"]),
    "no-preprocessor": (lambda s: (s / "best" / "preprocessor_config.json").unlink(), ["preprocessor_config.json", "missing"]),
    "config-not-json": (lambda s: (s / "best" / "config.json").write_text("{nope"), ["best/config.json", "not valid JSON"]),
    "config-not-clip": (_json_edit("config.json", lambda d: d.update(model_type="bert", vision_config=None)), ["best/config.json", "not a CLIP config"]),
    "config-wrong-hidden": (_json_edit("config.json", lambda d: d["vision_config"].update(hidden_size=48)),
                            ["ckpt.pt", "best/config.json gives", "class_embedding"]),
    "config-bad-act": (_json_edit("config.json", lambda d: d["vision_config"].update(hidden_act="relu6")), ["best/config.json", "hidden_act"]),
    "crop-mismatch": (_json_edit("preprocessor_config.json", lambda d: d.update(crop_size={"height": 64, "width": 64})),
                      ["preprocessor_config.json", "64x64", "56x56"]),
    "size-not-shortest-edge": (_json_edit("preprocessor_config.json", lambda d: d.update(size={"height": 56, "width": 56})),
                               ["best/preprocessor_config.json: size", "not supported"]),
    "ckpt-garbage": (lambda s: (s / "ckpt.pt").write_bytes(b"not a checkpoint at all"), ["ckpt.pt", "not a readable PyTorch checkpoint"]),
    "ckpt-no-state-dict": (lambda s: torch.save({"model": {}}, s / "ckpt.pt"), ["ckpt.pt", "no 'state_dict'"]),
    "ckpt-not-dict": (lambda s: torch.save([torch.zeros(1)], s / "ckpt.pt"), ["ckpt.pt", "no 'state_dict'"]),
    "ckpt-unexpected-key": (_set("scorer.bias", torch.zeros(1)), ["ckpt.pt", "unexpected keys", "scorer.bias"]),
    "ckpt-stray-clip-key": (_set("clip.something_else", torch.zeros(1)), ["ckpt.pt", "clip.something_else"]),
    "ckpt-extra-vision-key": (_set("clip.vision_model.encoder.layers.7.mlp.fc1.bias", torch.zeros(128)),
                              ["ckpt.pt", "clip.vision_model.encoder.layers.7"]),
    "ckpt-vision-shape": (_set("clip.visual_projection.weight", torch.zeros(E, 65)), ["ckpt.pt", "clip.visual_projection.weight", "(32, 65)"]),
    "prototypes-wrong-P": (_set("scorer.prototypes", torch.randn(K, P - 1)), ["ckpt.pt", "scorer.prototypes has shape (12, 15) but pca components give P = 16"]),
    "scores-wrong-K": (_set("scorer.proto_scores", torch.randn(K + 1)), ["ckpt.pt", "scorer.proto_scores has shape (13,)", "K = 12"]),
    "components-wrong-E": (_set("scorer.pca_components", torch.randn(P, E + 1)), ["ckpt.pt", "scorer.pca_components", "E = 32"]),
    "scale-wrong-E": (_set("scorer.pca_scale", torch.ones(E - 2)), ["ckpt.pt", "scorer.pca_scale has shape (30,)"]),
    "scale-zero": (_set("scorer.pca_scale", torch.zeros(E)), ["ckpt.pt", "scorer.pca_scale", "divide"]),
    "logit-scale-vector": (_set("scorer.logit_scale", torch.ones(2)), ["ckpt.pt", "scorer.logit_scale", "single value"]),
    "prototypes-nan": (_set("scorer.prototypes", torch.full((K, P), float("nan"))), ["ckpt.pt", "scorer.prototypes", "NaN"]),
    "basis-differs-from-ckpt": (lambda s: np.savez(s / "basis.npz", vectors=np.ones((K + 2, P)), scores=np.ones(K + 2)),
                                ["basis.npz", "vectors has shape (14, 16)", "ckpt.pt"]),
    "basis-no-vectors": (_drop_and("scorer.prototypes", lambda s: np.savez(s / "basis.npz", scores=np.ones(K))),
                         ["basis.npz", "no 'vectors'"]),
    "basis-missing-needed": (_drop_and("scorer.proto_scores", lambda s: (s / "basis.npz").unlink()),
                             ["ckpt.pt", "no scorer.proto_scores", "basis.npz", "missing"]),
    "pca-mean-wrong-E": (_pca_edit(lambda p: setattr(p, "mean_", np.zeros(E - 1))), ["pca.pkl", "mean_ has shape (31,)", "E = 32"]),
    "pca-no-mean": (_pca_edit(lambda p: delattr(p, "mean_")), ["pca.pkl", "no mean_"]),
    "pca-components-differ": (_pca_edit(lambda p: setattr(p, "components_", np.zeros((P + 1, E)))), ["pca.pkl", "components_ has shape (17, 32)"]),
    "pca-not-a-pca": (lambda s: joblib.dump([1, 2, 3], s / "pca.pkl"), ["pca.pkl", "holds a list"]),
    "pca-truncated": (lambda s: (s / "pca.pkl").write_bytes((s / "pca.pkl").read_bytes()[:300]), ["pca.pkl"]),
    "best-weights-corrupt": (lambda s: (s / "best" / "model.safetensors").write_bytes(b"\x00" * 20), ["best/model.safetensors", "safetensors"]),
    "vision-weights-nowhere": (
        lambda s: (_ckpt_edit(lambda sd: sd.pop("clip.vision_model.post_layernorm.bias"))(s), (s / "best" / "model.safetensors").unlink()),
        ["vision tensors found in neither ckpt.pt", "vision_model.post_layernorm.bias"],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folder_names_the_file(folder, tmp_path, case):
    edit, expected = MALFORMED[case]
    edit(folder)
    with pytest.raises(ModelFormatError) as err:
        convert_published(folder, tmp_path / "out")
    for part in expected:
        assert part in str(err.value), f"{part!r} not in {str(err.value)!r}"
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFormatError, match="not a folder"):
        read_published(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# hostile pickles: refused, and their code never runs


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _marker_cases(marker: Path):
    import os

    return {
        "os.system": (_Evil(os.system, f"touch {marker}"), ["system"]),
        "builtins.eval": (_Evil(eval, f"open({str(marker)!r}, 'w').close()"), ["builtins.eval"]),
        "subprocess.Popen": (_Evil(subprocess.Popen, ["touch", str(marker)]), ["subprocess.Popen"]),
    }


@pytest.mark.parametrize("how", ["pickle", "joblib", "joblib-zlib", "inside-pca", "in-object-array", "protocol0"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pca_pickle_is_refused(folder, tmp_path, attack, how):
    marker = tmp_path / "MARKER"
    evil, names = _marker_cases(marker)[attack]
    path = folder / "pca.pkl"
    if how == "pickle":
        path.write_bytes(pickle.dumps(evil))
    elif how == "protocol0":
        path.write_bytes(pickle.dumps(evil, protocol=0))
    elif how == "joblib":
        joblib.dump(evil, path)
    elif how == "joblib-zlib":
        joblib.dump({"mean_": np.zeros(E), "x": evil}, path, compress=3)
    elif how == "inside-pca":
        pca = joblib.load(path)
        pca.evil = evil
        joblib.dump(pca, path)
    elif how == "in-object-array":
        # joblib writes object arrays as a nested plain pickle; we refuse before reading it.
        joblib.dump({"mean_": np.array([evil, 1], dtype=object)}, path)
        names = ["object dtype"]
    with pytest.raises(UnsafePickleError) as err:
        convert_published(folder, tmp_path / "out")
    message = str(err.value)
    assert message.startswith("pca.pkl: ") and any(n in message for n in names), message
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_malicious_pickle_would_have_run(tmp_path):
    # The check above can fail: the same kind of bytes, given to pickle.loads, do run.
    marker = tmp_path / "MARKER"
    data = pickle.dumps(_marker_cases(marker)["os.system"][0])
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=r"refused to load (posix|nt)\.system.*only numpy arrays"):
        (tmp_path / "p.pkl").write_bytes(data)
        load_pickle_safely(tmp_path / "p.pkl", "pca.pkl")
    assert not marker.exists()


def test_unsafe_reduce_on_allowed_class_and_build_on_class_are_refused(tmp_path):
    # Hand-written opcodes: BUILD on the stand-in class itself (setting attributes on a class),
    # and a joblib wrapper whose "subclass" is not ndarray.
    build_on_class = b"\x80\x04csklearn.decomposition._pca\nPCA\n}(X\x0c\x00\x00\x00__setstate__K\x01ub."
    (tmp_path / "a.pkl").write_bytes(build_on_class)
    with pytest.raises(UnsafePickleError, match="refused to set the state of a type"):
        load_pickle_safely(tmp_path / "a.pkl", "pca.pkl")
    ext = b"\x80\x02\x82\x01."  # EXT1 code 1: copyreg's extension registry bypasses find_class
    (tmp_path / "b.pkl").write_bytes(ext)
    with pytest.raises(UnsafePickleError, match="extension"):
        load_pickle_safely(tmp_path / "b.pkl", "pca.pkl")


def test_malicious_ckpt_is_refused(folder, tmp_path):
    import os

    marker = tmp_path / "MARKER"
    state = torch.load(folder / "ckpt.pt", weights_only=True)
    state["hook"] = _Evil(os.system, f"touch {marker}")
    torch.save(state, folder / "ckpt.pt")
    with pytest.raises(UnsafePickleError, match=r"ckpt.pt: refused to load (posix|nt)\.system"):
        convert_published(folder, tmp_path / "out")
    assert not marker.exists()


def test_ckpt_with_harmless_extras_loads(folder, tmp_path):
    # Training checkpoints often carry numpy scalars and argparse options beside the state_dict.
    import argparse

    state = torch.load(folder / "ckpt.pt", weights_only=True)
    state.update(epoch=np.int64(7), loss=np.float32(0.1), args=argparse.Namespace(lr=1e-4, tau=0.07))
    torch.save(state, folder / "ckpt.pt")
    convert_published(folder, tmp_path / "out")



def test_legacy_ckpt_format(folder, tmp_path):
    # torch.save(_use_new_zipfile_serialization=False): no mmap, same weights-only reader.
    state = torch.load(folder / "ckpt.pt", weights_only=True)
    torch.save(state, folder / "ckpt.pt", _use_new_zipfile_serialization=False)
    assert (converted_scores(folder, tmp_path / "m") - published_reference_scores(folder, pixels())).abs().max() <= PARITY_TOL

def test_pickled_basis_is_refused(folder, tmp_path):
    np.savez(folder / "basis.npz", vectors=np.array([object()], dtype=object), scores=np.ones(K))
    with pytest.raises(UnsafePickleError, match="basis.npz: holds pickled objects"):
        convert_published(folder, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# the safe pickle reader reads what joblib and pickle write


def _fitted_pca(with_var=True):
    from sklearn.decomposition import PCA

    X = np.random.default_rng(0).normal(size=(50, 8))
    pca = PCA(n_components=3).fit(X)
    if with_var:
        pca.var_ = X.var(0)
    return pca


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("lzma", 3), ("xz", 3)])
def test_safe_reader_matches_joblib(tmp_path, compress):
    path = tmp_path / "pca.pkl"
    joblib.dump(_fitted_pca(), path, compress=compress)
    trusted = joblib.load(path)
    ours = read_pca_pickle(path)
    assert set(ours) == {"mean_", "components_", "var_"}
    for k, v in ours.items():
        assert v.dtype == getattr(trusted, k).dtype and np.array_equal(v, getattr(trusted, k))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("what", ["pca", "dict", "scaler"])
def test_safe_reader_plain_pickles(tmp_path, protocol, what):
    from sklearn.preprocessing import StandardScaler

    X = np.random.default_rng(0).normal(size=(50, 8))
    pca = _fitted_pca()
    obj = {
        "pca": pca,
        "dict": {"mean_": pca.mean_, "components_": np.asfortranarray(pca.components_), "var_": pca.var_.astype(">f8")},
        "scaler": StandardScaler().fit(X),
    }[what]
    path = tmp_path / "pca.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    ours = read_pca_pickle(path)
    trusted = pickle.loads(path.read_bytes())
    get = (lambda k: trusted[k]) if isinstance(trusted, dict) else (lambda k: getattr(trusted, k))
    assert set(ours) == ({"mean_", "var_"} if what == "scaler" else {"mean_", "components_", "var_"})
    for k, v in ours.items():
        assert np.array_equal(v, get(k))


def test_safe_reader_joblib_fortran_and_big_endian(tmp_path):
    pca = _fitted_pca()
    data = {"mean_": pca.mean_.astype(">f4"), "components_": np.asfortranarray(pca.components_), "var_": pca.var_}
    joblib.dump(data, tmp_path / "p.pkl")
    ours = read_pca_pickle(tmp_path / "p.pkl")
    assert ours["mean_"].dtype.isnative and np.array_equal(ours["mean_"], data["mean_"])
    assert np.array_equal(ours["components_"], data["components_"])


def test_safe_reader_refuses_lz4_and_old_joblib(tmp_path):
    (tmp_path / "a.pkl").write_bytes(b"\x04\x22\x4d\x18" + b"\x00" * 32)
    with pytest.raises(ModelFormatError, match="lz4"):
        read_pca_pickle(tmp_path / "a.pkl", "pca.pkl")
    (tmp_path / "b.pkl").write_bytes(b"ZF0x00000010" + b"\x00" * 32)
    with pytest.raises(ModelFormatError, match="joblib < 0.10"):
        read_pca_pickle(tmp_path / "b.pkl", "pca.pkl")


# ---------------------------------------------------------------------------------------------
# configs


def test_encoder_config_from_hf_uses_hf_defaults_and_top_level_projection():
    # transformers 5 writes vision_config.projection_dim = 512 (its default) beside the top-level
    # projection_dim that CLIPModel actually uses.
    cfg = encoder_config_from_hf({"model_type": "clip", "projection_dim": 32, "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "projection_dim": 512}})
    assert cfg.projection_dim == 32 and cfg.hidden_size == 64
    assert (cfg.patch_size, cfg.image_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32, 224, 12, 3072)  # HF defaults
    vitl = encoder_config_from_hf({
        "model_type": "clip", "projection_dim": 768,
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "image_size": 336, "patch_size": 14},
    })
    assert vitl == EncoderConfig() and default_name(vitl) == "rali-vitl14-336"


def test_preprocessor_forms_agree(tmp_path):
    # The stored preprocessing does not depend on the form of preprocessor_config.json.
    stored = [read_published(make_published_folder(tmp_path / form, preprocessor_form=form)).preprocess for form in ("old", "new")]
    assert stored[0] == stored[1]
    from rali_edge.preprocess import PreprocessConfig

    cfg = PreprocessConfig.from_dict(stored[0])  # what rali_edge.load reads back
    assert (cfg.resize_shortest_edge, cfg.crop) == (56, (56, 56))


def test_transformers5_processor_config(folder, tmp_path):
    pre = json.loads((folder / "best" / "preprocessor_config.json").read_text())
    (folder / "best" / "preprocessor_config.json").unlink()
    (folder / "best" / "processor_config.json").write_text(json.dumps({"image_processor": pre, "processor_class": "CLIPProcessor"}))
    ckpt = read_published(folder)
    assert ckpt.provenance["preprocess"] == "best/processor_config.json"


# ---------------------------------------------------------------------------------------------
# output folder, CLI, fetch


def test_output_folder_rules(published, tmp_path):
    out = tmp_path / "model"
    convert_published(published, out, name="mine")
    assert json.loads((out / "manifest.json").read_text())["name"] == "mine"
    convert_published(published, out)  # replacing a model folder is fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        convert_published(published, out)
    with pytest.raises(UsageError, match="is a file"):
        convert_published(published, out / "notes.txt")
    if Path("/proc/self").is_dir():  # a folder no file can be made in, whatever the permission bits say
        with pytest.raises(UsageError, match="cannot write the model into /proc/rali-edge-test"):
            convert_published(published, "/proc/rali-edge-test")


def test_cli_convert(published, tmp_path):
    from rali_edge.cli import main

    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["convert", str(published), "-o", str(out), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "P=16, K=12" in result.output and "logit scale 9.5" in result.output
    model, manifest = load_model(out)
    assert manifest.name == "tiny"


def test_cli_convert_errors_without_traceback(folder, tmp_path):
    from rali_edge.cli import main

    (folder / "ckpt.pt").unlink()
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert "error: ckpt.pt: missing" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught exception


def test_fetch_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RaliEdgeError) as err:
        fetch_published(tmp_path / "out", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "could not reach the Hugging Face hub" in message and "rali-edge convert" in message
    assert not (tmp_path / "out").exists()

    from rali_edge.cli import main

    result = CliRunner().invoke(main, ["fetch", "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 4 and "error: could not reach the Hugging Face hub" in result.output  # environment
    assert "Traceback" not in result.output


def test_fetch_network_error_and_success_paths(published, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(**kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(RaliEdgeError, match="could not reach the Hugging Face hub.*ConnectionError"):
        fetch_published(tmp_path / "out")

    snapshot = tmp_path / "snapshots" / "abc123"
    shutil.copytree(published, snapshot / "RALI")

    def cached(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    out = fetch_published(tmp_path / "out", revision="v1")
    assert calls[0]["repo_id"] == "ByteDance/Q-Insight" and calls[0]["allow_patterns"] == ["RALI/*"] and calls[0]["revision"] == "v1"
    hub = json.loads((out / "manifest.json").read_text())["source"]["hub"]
    assert hub == {"repo": "ByteDance/Q-Insight", "subfolder": "RALI", "revision": "v1", "snapshot": "abc123"}


def test_fetch_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'rali-edge\[hub\]'"):
        fetch_published(tmp_path / "out")

