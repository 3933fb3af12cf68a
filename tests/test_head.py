"""rali_edge.head: one folding, one arithmetic, the implementation chosen when a head is built.

The published formula (PrototypeHead.__call__) is the reference; the folded head's numbers are also
checked against it in test_convert (published checkpoints) and test_fit_head (fitted heads)."""

import ast
from pathlib import Path

import torch

import rali_edge.kernels
from rali_edge import head as head_module
from rali_edge.head import PrototypeHead, RaliHead, rali_head_torch
from rali_edge.model import Encoder, EncoderConfig
from rali_edge.model_file import load_model
from rali_edge.scoring import Scorer

SMALL = EncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14, projection_dim=16)


def _published(seed=0, e=16, p=8, k=5) -> PrototypeHead:
    g = torch.Generator().manual_seed(seed)
    return PrototypeHead(torch.randn(e, generator=g, dtype=torch.float64) * 0.1,
                         torch.rand(e, generator=g, dtype=torch.float64) + 0.5,
                         torch.randn(p, e, generator=g, dtype=torch.float64),
                         torch.randn(k, p, generator=g, dtype=torch.float64),
                         torch.rand(k, generator=g, dtype=torch.float64) * 4 + 1, 14.29)


def test_fold_gives_the_published_formula():
    """float64 folding, float32 storage and arithmetic: ~1e-6 on scores of 1..5 (tolerance 2e-5)."""
    torch.manual_seed(0)
    encoder = Encoder(SMALL).eval()
    with torch.no_grad():
        encoder.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
        encoder.vision_model.post_layernorm.bias.normal_(0, 0.3)
    published = _published()
    folded = published.fold(encoder)
    cls = torch.randn(12, SMALL.hidden_size) * 3 + 1
    with torch.no_grad():
        want = published(encoder.project(cls).double())
        got = folded(cls)
    assert folded.impl is rali_head_torch and folded.impl_name == "torch"
    assert (got.double() - want).abs().max() <= 2e-5
    assert want.std() > 0.05  # the scores differ, so agreement means something


def test_with_impl_builds_a_new_head_and_leaves_this_one():
    head = _published().fold(Encoder(SMALL))
    calls = []

    def rali_head_spy(*args, return_weights=False):
        calls.append(args[-1])  # ln_eps: the arguments come in rali_head_torch's order
        return rali_head_torch(*args, return_weights=return_weights)

    spied = head.with_impl(rali_head_spy)
    cls = torch.randn(3, SMALL.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(spied(cls), head(cls), rtol=0, atol=0)
    assert calls == [head.ln_eps] and spied.impl_name == "spy"
    assert head.impl is rali_head_torch
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), spied.state_dict().values()))


def test_a_scorer_does_not_change_its_models_head(small_model):
    model, manifest = load_model(small_model)
    scorer = Scorer(model, manifest, head="torch")
    assert scorer.head is not model.head and model.head.impl is rali_head_torch
    assert isinstance(scorer.head, RaliHead)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_no_import_cycle_between_head_model_and_kernel():
    head_imports = _imports(Path(head_module.__file__))
    kernel_imports = _imports(Path(list(rali_edge.kernels.__path__)[0]) / "rali_head.py")
    assert not any(m.startswith(("rali_edge.kernels", "rali_edge.model")) for m in head_imports)
    assert "rali_edge.model" not in kernel_imports and "rali_edge.head" in kernel_imports


def test_head_auto_falls_back_to_the_eager_head_when_the_kernel_fails(capsys):
    """On a Jetson whose driver refuses Triton's cubins the kernel fails at its first call: --head
    auto then scores with the eager head (same numbers), says so once, and reports "torch"."""
    from rali_edge.scoring import TritonOrTorch

    calls = []

    def rali_head_triton(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX was compiled with an unsupported toolchain.\nmore")

    head = RaliHead(8, 4, 3, impl=TritonOrTorch(rali_head_triton))
    torch.nn.init.normal_(head.weight)
    cls = torch.randn(2, 8)
    assert head.impl_name == "triton"
    first, second = head(cls), head(cls)
    expected = RaliHead(8, 4, 3)
    expected.load_state_dict(head.state_dict())
    assert torch.equal(first, expected(cls)) and torch.equal(second, first)
    assert calls == [1] and head.impl_name == "torch"
    err = capsys.readouterr().err
    assert err.count("note: the Triton head failed") == 1 and "unsupported toolchain" in err and "more" not in err


def test_jetson_uses_jetpacks_ptxas_unless_told(tmp_path):
    from rali_edge.scoring import use_jetpack_ptxas

    (tmp_path / "usr/local/cuda/bin").mkdir(parents=True)
    (tmp_path / "usr/local/cuda/bin/ptxas").write_text("")
    assert use_jetpack_ptxas(str(tmp_path), environ={}) is None  # not a Jetson
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0")
    env = {}
    assert use_jetpack_ptxas(str(tmp_path), environ=env) == str(tmp_path / "usr/local/cuda/bin/ptxas")
    assert use_jetpack_ptxas(str(tmp_path), environ={"TRITON_PTXAS_PATH": "/opt/x"}) == "/opt/x"
