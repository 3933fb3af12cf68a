"""Test helpers: a small folder in the published RALI layout, and the published formula computed
the way the published code does it (transformers' CLIPModel, joblib, the PrototypeScorer init).

    make_published_folder(dir, ...) -> dir     random weights, published layout
    published_reference_scores(dir, pixels)    scores [B] the published demo would give

The folder is small (vision hidden 64, 2 layers, 4 heads, image 56, patch 14, E = 32, P = 16,
K = 12) so that building one takes well under a second. Every value that the conversion rules
choose between differs between files: ckpt.pt's clip.* weights differ from best/'s, its
prototypes/scores/scale/components differ from basis.npz/pca.pkl, its logit_scale from 1/0.07.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
E, P, K = 32, 16, 12
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SCORER_KEYS = ("pca_scale", "pca_components", "prototypes", "proto_scores", "logit_scale")


def _clip_model(hidden_act: str, seed: int):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=TEXT, vision_config=dict(VISION, hidden_act=hidden_act), projection_dim=E)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        # HF's init leaves layernorms at 1/0 and tiny projections; move everything so that the
        # post-layernorm affine, the biases and the projection all matter to the scores.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    return model


def _preprocessor(form: str, image_size: int) -> dict:
    common = {
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "resample": 3,
    }
    if form == "old":  # transformers < 4.26 (CLIPFeatureExtractor): plain ints
        return {**common, "crop_size": image_size, "size": image_size, "feature_extractor_type": "CLIPFeatureExtractor"}
    if form == "new":
        return {
            **common, "crop_size": {"height": image_size, "width": image_size}, "size": {"shortest_edge": image_size},
            "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255, "image_processor_type": "CLIPImageProcessor",
        }
    raise ValueError(f"preprocessor_form {form!r}")


def make_published_folder(
    dir,
    *,
    with_var: bool = True,
    hidden_act: str = "quick_gelu",
    position_ids: bool = True,
    preprocessor_form: str = "new",
    weights: str | None = "safetensors",
    seed: int = 0,
    ckpt_drop: tuple[str, ...] = (),
    pca_compress=0,
) -> Path:
    """Write ckpt.pt, pca.pkl, basis.npz and best/ into `dir` and return it.

    weights: "safetensors", "bin" or None (best/ without a weights file).
    ckpt_drop: prefixes of ckpt.pt state_dict keys to leave out (e.g. "scorer.prototypes",
    "clip.vision_model.encoder.layers.1."), so that the fallbacks get used.
    pca_compress: joblib.dump's compress argument for pca.pkl.
    """
    import joblib
    from safetensors.torch import load_file, save_file
    from sklearn.decomposition import PCA

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model = _clip_model(hidden_act, seed)

    # best/: the HF folder (config.json from save_pretrained, weights as asked).
    best = out / "best"
    model.save_pretrained(best)
    st = best / "model.safetensors"
    state = load_file(str(st))
    if position_ids:  # transformers < 4.31 saved these buffers
        state["vision_model.embeddings.position_ids"] = torch.arange((56 // 14) ** 2 + 1)[None]
        state["text_model.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
        save_file(state, str(st), metadata={"format": "pt"})
    if weights == "bin":
        torch.save(state, best / "pytorch_model.bin")
        st.unlink()
    elif weights is None:
        st.unlink()
    elif weights != "safetensors":
        raise ValueError(f"weights {weights!r}")
    (best / "preprocessor_config.json").write_text(json.dumps(_preprocessor(preprocessor_form, VISION["image_size"]), indent=2))

    # pca.pkl: a fitted PCA on embedding-like vectors (non-zero mean, uneven variances).
    X = rng.normal(size=(300, E)) * rng.uniform(0.2, 2.0, size=E) + rng.normal(size=E)
    pca = PCA(n_components=P).fit(X)
    if with_var:
        pca.var_ = X.var(0)  # the published training code sets this when it standardised
    joblib.dump(pca, out / "pca.pkl", compress=pca_compress)
    scale0 = np.sqrt(pca.var_) if with_var else np.ones(E)

    # basis.npz: the initial prototypes.
    vectors, scores = rng.normal(size=(K, P)), rng.uniform(1, 5, size=K)
    np.savez(out / "basis.npz", vectors=vectors, scores=scores)

    # ckpt.pt: fine-tuned everything, so that each value differs from its initial source.
    g = torch.Generator().manual_seed(seed + 1)

    def moved(t, amount):
        return t + amount * torch.randn(t.shape, generator=g, dtype=t.dtype)

    sd = {f"clip.{k}": (moved(v, 0.02) if v.is_floating_point() and k != "logit_scale" else v) for k, v in model.state_dict().items()}
    if position_ids:
        sd["clip.vision_model.embeddings.position_ids"] = state["vision_model.embeddings.position_ids"]
        sd["clip.text_model.embeddings.position_ids"] = state["text_model.embeddings.position_ids"]
    f32 = torch.float32
    sd["scorer.pca_scale"] = moved(torch.tensor(scale0, dtype=f32), 0.1).abs() + 0.05
    sd["scorer.pca_components"] = moved(torch.tensor(pca.components_, dtype=f32), 0.05)
    sd["scorer.prototypes"] = moved(torch.tensor(vectors, dtype=f32), 0.5)
    sd["scorer.proto_scores"] = moved(torch.tensor(scores, dtype=f32), 0.3)
    sd["scorer.logit_scale"] = torch.tensor(9.5)
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ckpt_drop))} if ckpt_drop else sd
    torch.save({"state_dict": sd}, out / "ckpt.pt")
    return out


def published_clip(src_dir):
    """CLIPModel as the published code has it: from_pretrained(best/), then ckpt.pt's clip.* over it."""
    from transformers import CLIPConfig, CLIPModel

    src = Path(src_dir)
    best = src / "best"
    if (best / "model.safetensors").exists() or (best / "pytorch_model.bin").exists():
        clip = CLIPModel.from_pretrained(best)
    else:  # no weights in best/: ckpt.pt must hold them all (checked by the test that uses this)
        clip = CLIPModel(CLIPConfig.from_pretrained(best))
    state = torch.load(src / "ckpt.pt", map_location="cpu", weights_only=True)["state_dict"]
    clip_state = {k[5:]: v for k, v in state.items() if k.startswith("clip.") and not k.endswith("position_ids")}
    clip.load_state_dict(clip_state, strict=False)
    return clip.float().eval(), state


def published_head_tensors(src_dir, state) -> dict:
    """The PrototypeScorer's tensors: its __init__ (pca.pkl via joblib, basis.npz), then the
    ckpt.pt state_dict over the parameters. A transcription of the published code."""
    import joblib

    src = Path(src_dir)
    pca = joblib.load(src / "pca.pkl")  # trusted here: the test wrote it
    e = pca.mean_.shape[0]
    pca_mean = pca.mean_ if hasattr(pca, "mean_") else np.zeros(e)
    pca_scale = np.sqrt(pca.var_) if hasattr(pca, "var_") else np.ones(e)
    pca_components = pca.components_ if hasattr(pca, "components_") else np.eye(e)
    pca_scale[pca_scale < 1e-10] = 1.0
    data = np.load(src / "basis.npz")
    head = {
        "pca_mean": torch.tensor(pca_mean, dtype=torch.float32),
        "pca_scale": torch.tensor(pca_scale, dtype=torch.float32),
        "pca_components": torch.tensor(pca_components, dtype=torch.float32),
        "prototypes": torch.tensor(data["vectors"], dtype=torch.float32),
        "proto_scores": torch.tensor(data["scores"], dtype=torch.float32),
        "logit_scale": torch.tensor(1.0 / max(0.07, 1e-6), dtype=torch.float32),
    }
    for name in SCORER_KEYS:
        if f"scorer.{name}" in state:
            head[name] = state[f"scorer.{name}"].float()
    return head


def published_reference_scores(src_dir, pixel_values: torch.Tensor) -> torch.Tensor:
    """Scores [B] of the published model on preprocessed pixels [B, 3, H, W], in float32."""
    from rali_edge.head import PrototypeHead

    clip, state = published_clip(src_dir)
    head = published_head_tensors(src_dir, state)
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=pixel_values)
        if not isinstance(feats, torch.Tensor):  # transformers 5: an output object
            feats = feats.pooler_output
        published = PrototypeHead(head["pca_mean"], head["pca_scale"], head["pca_components"], head["prototypes"],
                                  head["proto_scores"], head["logit_scale"])
        return published(feats)
