"""The package as users install it (a wheel, not an editable install) works from any folder,
the clone's root included: there the folder `rali_edge/` comes first on sys.path and must
import as the installed package does (`rali_edge.engines` and `rali_edge.kernels` included),
also in Ray's workers, which start in the driver's folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_tests_run_on_a_wheel_install():
    """`make test` installs the package as users get it (an editable install would hide a file
    left out of the wheel)."""
    from importlib.metadata import distribution

    direct = json.loads(distribution("rali-edge").read_text("direct_url.json") or "{}")
    assert not direct.get("dir_info", {}).get("editable"), "rali-edge is installed editable: use `make setup`"


@pytest.mark.parametrize("folder", ["root", "elsewhere"])
def test_load_and_engines_import_from_the_clone_root_and_elsewhere(folder, tmp_path, photos):
    cwd = ROOT if folder == "root" else tmp_path
    out = run_python(
        "import json, rali_edge, rali_edge.engines.backends, rali_edge.kernels\n"
        f"scorer = rali_edge.load(backend='torch')\n"
        f"print(json.dumps({{'file': rali_edge.__file__, 'scores': scorer.score([{str(photos[0])!r}])}}))", cwd)
    got = json.loads(out.splitlines()[-1])
    here = Path(got["file"]).resolve()
    if folder == "root":  # the clone's own folder shadows the installed package, and works
        assert here == ROOT / "rali_edge" / "__init__.py"
    assert 1.0 <= got["scores"][0] <= 5.0


def test_the_clones_top_level_folders_shadow_no_package_of_their_name():
    """PyPI has packages called `kernels` (Hugging Face's, which transformers imports when it is
    installed) and `engines`: from the clone's root, `import kernels` must still find them. The
    top-level folders have no __init__.py, so they are namespace portions, which a regular
    package anywhere on sys.path wins over."""
    out = run_python("import importlib.util, json\n"
                     "specs = {n: importlib.util.find_spec(n) for n in ('kernels', 'engines')}\n"
                     "print(json.dumps({n: s and s.origin for n, s in specs.items()}))", ROOT)
    for name, origin in json.loads(out).items():
        assert origin is None or "site-packages" in origin, f"{name} from the clone's root: {origin}"


@pytest.mark.slow
def test_a_ray_actor_scores_from_the_clone_root(photos):
    pytest.importorskip("ray.data")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp:  # Ray's socket paths: under 108 bytes
        out = run_python(
            "import json, ray, rali_edge.distributed as rd\n"
            f"ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir={temp!r})\n"
            f"ds = ray.data.from_items([{{'path': p}} for p in {[str(p) for p in photos]!r}])\n"
            "rows = rd.score_dataset(ds, backend='torch').take_all()\n"
            "print(json.dumps([[r['path'], r['score'], r['error']] for r in rows]))", ROOT)
    rows = json.loads(out.splitlines()[-1])
    assert sorted(r[0] for r in rows) == sorted(map(str, photos))
    assert all(error is None and 1.0 <= score <= 5.0 for _, score, error in rows)


# auto's verdict is measured, so on one machine it keeps torch and on another it builds an ONNX
# engine: both ways are checked, the engine's with a file built beforehand.
@pytest.mark.parametrize("backend", ["auto", "onnx"])
def test_scoring_imports_no_tooling(tmp_path, photos, backend):
    """`import rali_edge` and `rali-edge score` (with backend auto, its verdict kept, or an ONNX
    engine) import what scoring needs: not the training recipe, the MLLM baseline, profiling,
    reports, fit-head, eval, the engine builder, nor their libraries."""
    env = {**os.environ, "RALI_EDGE_CACHE": str(tmp_path / "cache")}
    env.pop("RALI_EDGE_BACKEND", None)
    extra = []
    if backend == "onnx":
        built = subprocess.run([sys.executable, "-m", "rali_edge.cli", "build", "--target", "onnx", "-o", str(tmp_path / "engine")],
                               env=env, capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr[-2000:]
        extra = ["--backend", "onnx", "--engine", str(next((tmp_path / "engine").glob("*.onnx")))]
    code = ("import sys\n"
            "from rali_edge.cli import main\n"
            f"sys.argv = ['rali-edge', 'score', '-q', *{extra!r}, {str(photos[0])!r}]\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as done:\n"
            "    if done.code:\n"
            "        raise\n"
            "print(' '.join(sorted(sys.modules)))")
    for _ in range(2):  # the first run measures auto's verdict and keeps it; the second is every later run
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    tooling = {"rali_edge.training", "rali_edge.profiling", "rali_edge.fit_head", "rali_edge.evaluation",
               "rali_edge.distortions", "rali_edge.distributed", "rali_edge.engines.builder", "rali_edge.engines.export",
               "transformers", "matplotlib", "sklearn", "skimage", "scipy", "ray", "onnx"}
    assert "rali_edge.scoring" in loaded and not {m for m in loaded if m.split(".")[0] in tooling or m in tooling}
