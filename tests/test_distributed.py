"""Scoring on Ray Data (rali_edge.distributed) on a real Ray cluster that these tests start on
127.0.0.1 and stop: the same scores as the local path, bad files as error rows, exactly one row
per input when a scoring actor is killed mid-run (its process, by pid), and --resume after an
interrupted run scoring only the rest. No mocks: Ray schedules, restarts and retries for real."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import rali_edge  # noqa: E402
from rali_edge.cli import main  # noqa: E402
from rali_edge.distributed import score_dataset, score_paths  # noqa: E402
from processes import pids_with  # noqa: E402

ACTOR_TITLE = "_ScoreActor"  # in the scoring actors' process titles (ray::MapWorker(MapBatches(_ScoreActor)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs, this process connected to it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos):
    """The test photographs, a corrupt JPEG and a missing file."""
    folder = tmp_path_factory.mktemp("corpus")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(photos[1].read_bytes()[:300])
    return [*map(str, photos), str(corrupt), str(folder / "missing.jpg")]


def local_results(model, paths):
    return {r.path: r for r in rali_edge.load(model).score_files(paths)}


@pytest.mark.slow
def test_same_scores_as_the_local_path_and_bad_files_as_error_rows(cluster, small_model, corpus):
    ds = ray.data.from_items([{"file": p} for p in corpus])
    rows = score_dataset(ds, small_model, path_column="file", batch_size=2, backend="torch").take_all()
    assert sorted(r["path"] for r in rows) == sorted(corpus)  # one row per input
    local = local_results(small_model, corpus)
    for row in rows:
        want = local[row["path"]]
        if want.error is None:
            assert row["error"] is None and row["score"] == pytest.approx(want.score, abs=1e-5)
        else:  # the local path's own reason, and no score
            assert row["score"] is None and row["error"] == want.error
    assert sum(r["error"] is not None for r in rows) == 2


def _actor_pids() -> list[int]:
    return pids_with(ACTOR_TITLE, "MapWorker")


@pytest.mark.slow
def test_a_scoring_actor_killed_mid_run_leaves_exactly_one_row_per_input(cluster, small_model, tmp_path, photos):
    """SIGKILL the scoring actor's process once rows have started coming back: Ray restarts it and
    retries its tasks; every input still has exactly one row, in order, with the local path's score."""
    src = Image.open(photos[0]).convert("RGB").resize((96, 96))
    paths = []
    for i in range(240):  # enough batches that the kill lands while most are still to score
        path = tmp_path / f"{i}.png"
        src.rotate(i % 360).save(path)
        paths.append(str(path))
    rows, killed, restarted = [], None, None
    for result in score_paths(paths, small_model, backend="torch", batch_size=2):
        rows.append(result)
        if killed is None and len(rows) == 4:
            pids = _actor_pids()
            assert len(pids) == 1, f"expected one scoring actor, found {pids}"
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        elif killed is not None and restarted is None:
            restarted = next((p for p in _actor_pids() if p != killed), None)
    # A new actor scored the rest: the kill landed mid-run, not after the work was done.
    assert killed is not None and restarted is not None
    assert [r.path for r in rows] == paths  # score_paths also checks this row by row
    local = local_results(small_model, paths[::40])
    for r in rows[::40]:
        assert r.error is None and r.score == pytest.approx(local[r.path].score, abs=1e-5)


@pytest.mark.slow
def test_cli_resume_on_ray_scores_only_the_rest(cluster, small_model, corpus, tmp_path):
    """An interrupted --ray run (two rows, then a line cut off mid-write): --resume --ray scores only
    the rest, and the output has one row per input with the scores of an uninterrupted local run."""
    out = tmp_path / "scores.jsonl"
    first = CliRunner().invoke(main, ["score", "--model", str(small_model), "--ray", "auto", "--backend", "torch",
                                      "-o", str(out), *corpus[:2]])
    assert first.exit_code == 0, first.output
    out.write_text(out.read_text() + '{"path": "' + corpus[2][:5])  # killed while writing the third row
    result = CliRunner().invoke(main, ["score", "--model", str(small_model), "--ray", "auto", "--backend", "torch",
                                       "-o", str(out), "--resume", *corpus])
    assert result.exit_code == 1, result.output  # the two bad files failed, as they would locally
    assert f"{len(corpus) - 2} to score" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == corpus
    local = local_results(small_model, corpus)
    for r in rows:
        if local[r["path"]].error is None:
            assert r["score"] == pytest.approx(local[r["path"]].score, abs=1e-5)
        else:
            assert r["error"] == local[r["path"]].error


@pytest.mark.slow
def test_ray_local_starts_and_stops_its_own_cluster_and_auto_without_one_says_what_to_do(small_model, photos, tmp_path):
    """The user's path in a fresh process: --ray local scores and leaves no cluster behind; --ray auto
    with no cluster running is a one-line usage error."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    cli = [sys.executable, "-m", "rali_edge.cli", "score", "--model", str(small_model), "--backend", "torch", "-q"]
    started = time.monotonic()
    ok = subprocess.run([*cli, "--ray", "local", "--format", "csv", *map(str, photos[:2])], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert [line.split(",")[0] for line in ok.stdout.splitlines()[1:]] == [str(p) for p in photos[:2]]
    assert time.monotonic() - started < 300
    none = subprocess.run([*cli, "--ray", "127.0.0.1:1", str(photos[0])], env=env, capture_output=True,
                          text=True, timeout=120)
    assert none.returncode == 2, none.stderr
    assert "cannot connect to a Ray cluster" in none.stderr and "Traceback" not in none.stderr


def test_a_model_the_actors_cannot_load_is_a_one_line_error_and_keeps_finished_rows(cluster, small_model, corpus, tmp_path):
    """Weights that do not match their manifest's hash: the actors fail to start (Ray retries them,
    then gives up); the CLI says why in one line, exit 3, and the output keeps what it had."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_model, broken)
    weights = broken / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    out = tmp_path / "scores.csv"
    out.write_text("path,score,error\nkept.jpg,3.000000,\n")
    result = CliRunner().invoke(main, ["score", "--model", str(broken), "--ray", "auto", "--backend", "torch",
                                       "-o", str(out), "--resume", *corpus[:2]])
    assert result.exit_code == 3, result.output  # as a model that does not load locally
    assert "on a Ray worker" in result.output and "sha256 differs" in result.output
    # Our error, handled (no exception escaped the CLI). Ray's own retry notices, which quote the
    # worker's traceback, may still reach stderr from the earlier tests' retries.
    assert isinstance(result.exception, SystemExit)
    assert any(line.startswith("error: on a Ray worker:") for line in result.output.splitlines())
    assert out.read_text() == "path,score,error\nkept.jpg,3.000000,\n"


@pytest.mark.slow
def test_starting_ray_keeps_the_callers_sigterm_handler(tmp_path):
    """ray.init replaces SIGTERM's handler with sys.exit; the CLI's (stop as Ctrl-C does, keeping the
    rows) must survive it. In a fresh process: the module's cluster is already running here."""
    code = ("import signal, rali_edge.distributed as d\n"
            "mine = lambda *args: None\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "with d.ray_session('local'):\n"
            "    print('kept' if signal.getsignal(signal.SIGTERM) is mine else 'replaced')\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "kept"


# ------------------------------------------------------------------ what the actors ask of a cluster
@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
@pytest.mark.parametrize("actors", [1, 2, 3, 4, 8])
def test_actors_always_leave_room_for_a_decoding_task(cpus, actors):
    from rali_edge.distributed import _requests

    actor, decode = _requests({"CPU": float(cpus)}, actors, 0.0)
    assert 0 < decode and 0 < actor <= 1.0
    assert actors * actor + decode <= cpus + 1e-6  # every actor and a decoding task fit at once
    assert actor != decode  # different requests: Ray does not fuse decoding into the actors


def test_more_gpus_than_the_cluster_has_are_refused_at_once():
    from rali_edge.distributed import _requests
    from rali_edge.errors import UsageError

    with pytest.raises(UsageError, match=r"ask for 4 GPUs; the Ray cluster has 2 \(and 16 CPUs\)"):
        _requests({"CPU": 16.0, "GPU": 2.0}, 4, 1.0)
    assert _requests({"CPU": 16.0, "GPU": 2.0}, 4, 0.5)[0] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("actors", [1, 2, 4])
def test_ray_local_runs_to_the_end_with_any_number_of_actors_on_two_cores(actors, small_model, photos, tmp_path):
    """As a user runs it on a 2-core machine: `--ray local --ray-actors N` once asked for N cores for
    its actors and left none for decoding, and waited forever in silence. One row per image, and
    none of Ray's own log lines on stderr."""
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(40):  # more batches than actors
        (folder / f"{i}.jpg").write_bytes(photos[i % len(photos)].read_bytes() if photos[i % len(photos)].suffix == ".jpg"
                                          else _as_jpeg(photos[i % len(photos)]))
    out = tmp_path / "scores.csv"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "rali_edge.cli", "score", str(folder), "--model", str(small_model),
                           "--backend", "torch", "--ray", "local", "--ray-actors", str(actors), "--batch-size", "4",
                           "-q", "-o", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 40 and len({r.split(",")[0] for r in rows}) == 40
    assert "core_worker" not in done.stderr and ".cc:" not in done.stderr and "40 scored" in done.stderr


def _as_jpeg(path) -> bytes:
    import io

    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_run_that_gets_no_row_says_why_instead_of_waiting_forever(cluster, small_model, photos):
    """Another job holds every CPU of the cluster: nothing can be decoded or scored. The run stops
    after its stall time, saying what it asked for and what is free."""
    from rali_edge.errors import ScoringError

    @ray.remote(num_cpus=2)
    class Hog:
        def ready(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    try:
        with pytest.raises(ScoringError, match=r"no row came back from Ray for 5 s: .* of which 0 CPUs"):
            list(score_paths([str(p) for p in photos], small_model, backend="torch", stall_s=5))
    finally:
        ray.kill(hog)
