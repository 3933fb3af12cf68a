"""The encoder against transformers' CLIP vision tower."""

import pytest
import torch

from rali_edge.model import Encoder, EncoderConfig

transformers = pytest.importorskip("transformers")


def hf_vision(hidden_act: str, seed: int):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=42, patch_size=14, projection_dim=24, hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():  # HF initialises layernorms to identity and biases to 0: make every term count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_encoder_matches_clip_vision_model_with_projection(hidden_act, seed):
    """Same fp32 operations in the same order (SDPA on both sides): 1e-5 leaves room only for
    a different kernel choice, not for a wrong term."""
    cfg, hf = hf_vision(hidden_act, seed)
    ours = Encoder(EncoderConfig.from_hf(cfg.to_dict())).eval()
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True)
    pixels = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        expected = hf(pixel_values=pixels)
        assert (ours.embed(pixels) - expected.image_embeds).abs().max() <= 1e-5
        # The class token before the post-layernorm is what the fused head reads.
        assert (ours.class_token(pixels) - expected.last_hidden_state[:, 0]).abs().max() <= 1e-5


def test_fp32_softmax_attention_equals_sdpa_in_fp32():
    """The explicit attention that engines export computes what SDPA computes."""
    cfg, hf = hf_vision("quick_gelu", 0)
    ours = Encoder(EncoderConfig.from_hf(cfg.to_dict())).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")})
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        sdpa = ours.class_token(pixels)
        for block in ours.vision_model.encoder.layers:
            block.self_attn.softmax_fp32 = True
        explicit = ours.class_token(pixels)
    assert (sdpa - explicit).abs().max() <= 1e-5


def test_a_model_file_of_half_floats_loads_as_fp32(small_model, tmp_path):
    """Weights are read in place (assign=True), which would keep the file's dtype: a file saved in
    fp16 still gives an fp32 model, the reference every reduced precision is measured against."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rali_edge.model_file import WEIGHTS, load_model

    half = tmp_path / "half"
    shutil.copytree(small_model, half)
    state = load_file(str(half / WEIGHTS))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(half / WEIGHTS),
              metadata={"format": "rali-edge"})
    model, _ = load_model(half, verify=False)
    assert {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()} \
        == {torch.float32}


def test_cpu_encoder_runs_big_batches_in_calls_of_a_few_thousand_tokens(small_model, monkeypatch):
    """On a CPU, TorchEncoder splits a batch into calls of at most CPU_TOKENS_PER_CALL tokens
    (faster: scoring.py) and gives the class tokens of one whole call. 1e-5: the same fp32 operations
    per row; only the GEMMs' blocking may differ with the row count."""
    from rali_edge import scoring
    from rali_edge.model_file import load_model

    model, manifest = load_model(small_model)
    scorer = scoring.Scorer(model, manifest, dtype="fp32", head="torch")
    tokens = manifest.encoder.num_patches + 1
    pixels = torch.randn(23, 3, manifest.encoder.image_size, manifest.encoder.image_size)
    whole = scorer.encoder.encoder.class_token(pixels)

    monkeypatch.setattr(scoring, "CPU_TOKENS_PER_CALL", 5 * tokens + 1)  # 5 views a call: 5 + 5 + 5 + 5 + 3
    encoder = scoring.TorchEncoder(model, torch.device("cpu"), torch.float32)
    calls = []
    real = encoder.encoder.class_token
    monkeypatch.setattr(encoder.encoder, "class_token", lambda x: calls.append(len(x)) or real(x))
    torch.testing.assert_close(encoder(pixels), whole, rtol=0, atol=1e-5)
    assert calls == [5, 5, 5, 5, 3]
