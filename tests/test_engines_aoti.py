"""AOTInductor engines: `rali-edge build --target aoti` on this CPU, loading the package with
rali_edge.load(..., backend="aoti"), score parity with the torch backend, and refusals.

One compile per session (about a minute on 2 CPU cores; the package is shared by the tests)."""

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import rali_edge
from rali_edge.cli import main
from rali_edge.engines.aoti import AOTIEncoder
from rali_edge.engines.naming import BatchRange, major_minor, sidecar_path
from rali_edge.errors import EngineMismatchError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def package(small_model, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti")
    result = run("build", small_model, "--target", "aoti", "--device", "cpu", "--batch", "1:2:4",
                 "--calib-dir", photos[0].parent, "-o", out)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip()), result.output


@pytest.mark.slow
def test_build_names_the_package_and_records_torch_and_device(package):
    path, output = package
    assert path.name == f"rali-test-0.aoti.torch{major_minor(torch.__version__)}.cpu-{platform.machine()}.fp32.b1-4.pt2"
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["target"] == "aoti" and sidecar["torch_version"] == torch.__version__
    assert sidecar["device"]["type"] == "cpu" and sidecar["device"]["cpu_arch"] == platform.machine()
    assert sidecar["batch"] == {"min": 1, "opt": 2, "max": 4} and sidecar["outputs"] == "score"
    # Compiled fp32 against eager fp32: inductor fuses and reorders reductions, nothing more.
    assert sidecar["fidelity"]["passed"] and sidecar["fidelity"]["max_abs_diff"] <= 1e-4
    assert "compiling with AOTInductor" in output and "fidelity: PASS" in output


@pytest.mark.slow
def test_scores_match_the_torch_backend(package, small_model, photos):
    engine = rali_edge.load(small_model, backend="aoti", engine=package[0])
    torch_backend = rali_edge.load(small_model)
    assert engine.encoder.outputs == "score"
    # Same fp32 maths, compiled (see above): 1e-4 on the 1..5 scale.
    assert engine.score(photos) == pytest.approx(torch_backend.score(photos), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_any_batch_size_runs(package, small_model, batch):
    """1 and 3 are inside the compiled range 1..4; 7 is split into 4 + 3."""
    engine = rali_edge.load(small_model, backend="aoti", engine=package[0])
    pixels = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
    want = rali_edge.load(small_model).score_pixels(pixels)
    got = engine.score_pixels(pixels)
    assert got.shape == (batch,)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_check_engine_command(package, small_model, photos):
    result = run("check-engine", package[0], "--model", small_model, "--calib-dir", photos[0].parent, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["images"] == len(photos) and report["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_package_of_another_torch_or_model_is_refused(package, small_model, photos, tmp_path):
    from small_model import make_small_model

    copy = tmp_path / package[0].name
    shutil.copy(package[0], copy)
    sidecar = json.loads(sidecar_path(package[0]).read_text())
    sidecar_path(copy).write_text(json.dumps(sidecar | {"torch_version": "2.5.1+cu124"}))
    with pytest.raises(EngineMismatchError, match=r"compiled by torch 2\.5\.1\+cu124.*rali-edge build"):
        rali_edge.load(small_model, backend="aoti", engine=copy)

    other = make_small_model(tmp_path / "other", seed=1)
    with pytest.raises(EngineMismatchError, match="built for another model: rali-test-0"):
        rali_edge.load(other, backend="aoti", engine=package[0])
    result = run("score", "--model", other, "--backend", "aoti", "--engine", package[0], photos[0])
    assert result.exit_code == 3 and "another model" in result.output and "Traceback" not in result.output


def test_batches_are_split_and_padded_to_the_compiled_range():
    """AOTIEncoder's chunking without a compile: the 'package' records the batch sizes it gets."""
    encoder = AOTIEncoder.__new__(AOTIEncoder)
    encoder.outputs, encoder.batch, encoder.device = "score", BatchRange(2, 3, 3), torch.device("cpu")
    seen = []

    def fake_package(x):
        seen.append(x.shape[0])
        return x.flatten(1).sum(1)

    encoder.runner = fake_package
    pixels = torch.arange(7 * 3 * 2 * 2, dtype=torch.float32).view(7, 3, 2, 2)
    out = encoder(pixels)
    assert seen == [3, 3, 2]  # 7 = 3 + 3 + 1, and the last single image is padded up to 2
    torch.testing.assert_close(out, pixels.flatten(1).sum(1))


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_fp16_package(small_model, photos, tmp_path):
    result = run("build", small_model, "--target", "aoti", "--device", "cuda", "--precision", "fp16",
                 "--batch", "1:2:4", "--calib-dir", photos[0].parent, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    engine = rali_edge.load(small_model, device="cuda", backend="aoti", engine=result.stdout.strip())
    # fp16 encoder, fp32 head: the build's own fidelity limit.
    assert engine.score(photos) == pytest.approx(rali_edge.load(small_model).score(photos), abs=0.02)


def test_corrupt_package_is_an_engine_error_exit_3(tmp_path):
    from rali_edge.engines.aoti import AOTIEncoder
    from rali_edge.engines.naming import BatchRange
    from rali_edge.errors import EngineMismatchError

    garbage = tmp_path / "m.pt2"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(EngineMismatchError, match="cannot load the AOTInductor package") as e:
        AOTIEncoder(garbage, "score", BatchRange(1, 1, 1))
    assert e.value.exit_code == 3
