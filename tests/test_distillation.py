"""The training recipe's distillation option (default_model.teacher_embeddings, --teacher) and its
--encoder shape option."""

from __future__ import annotations

import pytest
import torch

from rali_edge.errors import RaliEdgeError
from rali_edge.model_file import load_model
from rali_edge.preprocess import PreprocessConfig, Preprocessor
from rali_edge.training.default_model import main, teacher_embeddings
from small_model import SMALL, make_small_model


def test_teacher_embeddings_are_the_teacher_s_standardised(tmp_path):
    teacher = make_small_model(tmp_path / "teacher")
    crops = torch.randint(0, 256, (40, 3, SMALL.image_size, SMALL.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    z, mean, std = teacher_embeddings(teacher, crops, SMALL.projection_dim, log=lambda _: None)
    assert z.shape == (40, SMALL.projection_dim)
    # Standardised over the crops (float32 sums of 40 values: 1e-5).
    assert torch.allclose(z.mean(0), torch.zeros(SMALL.projection_dim), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(SMALL.projection_dim), atol=1e-5)
    # And undoing it gives the teacher's own embeddings, through the teacher's own preprocessing.
    model, manifest = load_model(teacher)
    pre = Preprocessor(PreprocessConfig.from_dict(manifest.preprocess))
    with torch.no_grad():
        want = model.encoder.embed(pre.normalize_uint8(crops))
    assert torch.allclose(z * std + mean, want, atol=1e-5)


def test_a_teacher_of_another_embedding_size_is_refused(tmp_path):
    teacher = make_small_model(tmp_path / "teacher")
    crops = torch.zeros((2, 3, SMALL.image_size, SMALL.image_size), dtype=torch.uint8)
    with pytest.raises(RaliEdgeError, match="32 dimensions and the recipe's encoder 64"):
        teacher_embeddings(teacher, crops, 64)


def test_encoder_option_refuses_unknown_keys(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--encoder", '{"patchsize": 32}', "--out", "unused"])
    assert exit.value.code == 2
    assert "unknown keys ['patchsize']" in capsys.readouterr().err
