"""`rali-edge score` through click: input expansion, formats, bad files, exit codes."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner

import rali_edge
from rali_edge.cli import main
from rali_edge.images import images_in


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_json_scores_match_python_api_in_input_order(small_model, photos):
    result = run("score", "--model", small_model, "--format", "json", "--batch-size", 3, *photos)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in photos]
    expected = rali_edge.load(small_model).score(photos)
    # Same code path in a different batching: fp32 rounding only.
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)


def test_folder_glob_and_csv(small_model, photos, tmp_path):
    folder = photos[0].parent
    out = tmp_path / "scores.csv"
    result = run("score", "--model", small_model, "--format", "csv", "-o", out, folder, str(folder / "*.jpg"))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    # The glob names files the folder already gave: each is scored once, where it came first.
    assert [r["path"] for r in rows] == [str(p) for p in images_in(folder)]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in photos)
    assert all(1.0 <= float(r["score"]) <= 5.0 and r["error"] == "" for r in rows)


def test_empty_folder_and_unmatched_glob_say_so(small_model, photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    result = run("score", "--model", small_model, "--format", "json", empty, str(tmp_path / "*.png"), photos[0])
    assert result.exit_code == 1  # one photo scored, two inputs gave nothing
    assert f"error: {empty}: no images in this folder (looked for .bmp" in result.stderr
    assert f"error: {tmp_path / '*.png'}: no file matches this pattern" in result.stderr
    assert [r["path"] for r in json.loads(result.stdout)] == [str(photos[0])]


def test_nothing_to_score_is_a_usage_error_before_the_model_loads(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr("rali_edge.cli.common.load_scorer", lambda **kw: loaded.append(kw))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("score", empty, str(tmp_path / "*.png"))
    assert result.exit_code == 2 and loaded == [] and "Traceback" not in result.output
    assert "nothing to score" in result.output and "no images in this folder" in result.output
    assert "no file matches this pattern" in result.output and "score  path" not in result.output


def test_bad_inputs_are_reported_and_others_scored(small_model, tmp_path):
    from bad_images import write_bad_images

    cases = write_bad_images(tmp_path)
    paths = [str(path) for path, _ in cases.values()] + [str(tmp_path / "does-not-exist.jpg")]
    result = run("score", "--model", small_model, "--format", "json", *paths)
    assert result.exit_code == 1, result.output  # some failed, the rest were scored
    rows = {r["path"]: r for r in json.loads(result.stdout)}
    assert list(rows) == paths
    for name, (path, expect_ok) in cases.items():
        row = rows[str(path)]
        if expect_ok:
            assert "score" in row and 1.0 <= row["score"] <= 5.0, (name, row)
        else:
            assert row.get("error"), (name, row)
    missing = rows[str(tmp_path / "does-not-exist.jpg")]
    assert missing["error"] == "file not found"  # the row names the path; its error does not repeat it
    assert all(not row.get("error", "").startswith(path) for path, row in rows.items())
    assert "Traceback" not in result.output


def test_all_good_inputs_exit_zero_table(small_model, photos):
    result = run("score", "--model", small_model, photos[0])
    assert result.exit_code == 0
    assert str(photos[0]) in result.stdout and "score" in result.stdout


def test_usage_error_exit_code(small_model):
    assert run("score", "--model", small_model, "--format", "xml", "a.jpg").exit_code == 2
    assert run("score").exit_code == 2


def test_malformed_model_folder_exit_3_names_the_file(tmp_path, photos):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    result = run("score", "--model", bad, photos[0])
    assert result.exit_code == 3
    assert "manifest.json" in result.stderr and "Traceback" not in result.output


def test_manifest_of_the_wrong_shape_exit_3_names_the_problem(small_model, tmp_path, photos):
    import json
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(small_model, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    for content, phrase in [([1, 2, 3], "a JSON object expected, not list"),
                            ({**manifest, "encoder": {**manifest["encoder"], "hidden_size": "big"}},
                             "encoder hidden_size must be a positive integer, not 'big'"),
                            ({**manifest, "encoder": {**manifest["encoder"], "num_hidden_layers": 0}},
                             "num_hidden_layers must be a positive integer, not 0")]:
        (bad / "manifest.json").write_text(json.dumps(content))
        result = run("score", "--model", bad, photos[0])
        assert result.exit_code == 3 and phrase in result.stderr and "Traceback" not in result.output, result.output


def test_head_triton_equals_torch_on_real_images(small_model, photos):
    """The fused kernel (under TRITON_INTERPRET=1 on a CPU, compiled on a GPU) against the eager head,
    on the same encoder outputs: both accumulate in fp32, so 1e-4 on the 1..5 scale is generous."""
    import os

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    triton_rows = json.loads(run("score", "--model", small_model, "--head", "triton", "--device", device,
                                 "--format", "json", *photos).stdout)
    torch_rows = json.loads(run("score", "--model", small_model, "--head", "torch", "--device", device,
                                "--format", "json", *photos).stdout)
    diffs = [abs(a["score"] - b["score"]) for a, b in zip(triton_rows, torch_rows)]
    assert len(diffs) == len(photos) and max(diffs) <= 1e-4


def test_help_explains_exit_codes_and_examples():
    result = run("score", "--help")
    assert result.exit_code == 0
    assert "Exit code" in result.stdout and "Examples" in result.stdout
    assert "130" in run("--help").stdout


def test_python_api_accepts_every_input_kind(small_model, photos):
    from PIL import Image
    import numpy as np

    scorer = rali_edge.load(small_model)
    by_path = scorer.score(photos)
    pil = [Image.open(p).convert("RGB") for p in photos]
    assert scorer.score(pil) == pytest.approx(by_path, abs=1e-6)
    assert scorer.score([np.asarray(im) for im in pil]) == pytest.approx(by_path, abs=1e-6)
    assert scorer.score(str(photos[0])) == pytest.approx(by_path[:1], abs=1e-6)
    pixels = scorer.preprocess(pil)
    assert scorer.score_pixels(pixels).tolist() == pytest.approx(by_path, abs=1e-6)
    assert torch.is_tensor(pixels) and pixels.shape[0] == len(photos)
    # Image tensors, as pyiqa takes them: [3, H, W] or [B, 3, H, W], float in [0, 1] or uint8.
    as_uint8 = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in pil]
    assert scorer.score(as_uint8) == pytest.approx(by_path, abs=1e-6)
    assert scorer.score([t.float() / 255 for t in as_uint8]) == pytest.approx(by_path, abs=1e-6)
    same_size = [t[:, :200, :200] for t in as_uint8]
    assert scorer.score(torch.stack(same_size).float() / 255) == pytest.approx(scorer.score(same_size), abs=1e-6)
    assert isinstance(scorer.score(as_uint8[0])[0], float)


@pytest.mark.parametrize("bad, words", [
    ("views", "float image tensors hold values in [0, 1]"),  # normalised pixels are not an image
    ("gray", "image tensors are [3, H, W] or [B, 3, H, W] RGB, not [1, 32, 32]"),
    ("ints", "float in [0, 1] or uint8, not torch.int64"),
    ("object", "cannot read an image from a dict"),
])
def test_python_api_refuses_what_is_not_an_image_and_says_what_is(small_model, photos, bad, words):
    from rali_edge.errors import ImageError

    scorer = rali_edge.load(small_model)
    given = {"views": lambda: scorer.preprocess([str(photos[0])]), "gray": lambda: torch.rand(1, 32, 32),
             "ints": lambda: torch.ones(3, 32, 32, dtype=torch.int64), "object": lambda: {"image": 1}}[bad]()
    with pytest.raises(ImageError) as refused:
        scorer.score(given)
    assert words in str(refused.value)


def test_ray_scoring_gets_every_model_option(small_model, photos, monkeypatch):
    # The CLI's wiring only (a real cluster runs in test_distributed.py): --head, --backend and
    # --dtype reach the scoring actors as they reach rali_edge.load locally.
    import contextlib

    from rali_edge import distributed

    pytest.importorskip("ray")
    seen = {}

    def score_paths(paths, model, **options):
        seen.update(options)
        return iter(())

    monkeypatch.setattr(distributed, "ray_session", lambda address: contextlib.nullcontext())
    monkeypatch.setattr(distributed, "score_paths", score_paths)
    CliRunner().invoke(main, ["score", "--model", str(small_model), "--ray", "auto", "--head", "torch",
                              "--backend", "torch", "--dtype", "bf16", str(photos[0])])
    assert (seen["head"], seen["backend"], seen["dtype"]) == ("torch", "torch", "bf16")


def test_ray_actor_loads_the_head_it_is_given(small_model):
    pytest.importorskip("ray")
    from rali_edge.distributed import _ScoreActor

    # triton, not what auto picks on a CPU (conftest.py runs the kernel in Triton's interpreter there)
    actor = _ScoreActor(small_model, backend="torch", dtype="fp32", head="triton", device="cpu", cache=False, threads=1)
    assert actor.scorer.head.impl_name == "triton"


def test_sigterm_stops_score_as_ctrl_c_does_keeping_the_results(small_model, photos, tmp_path, monkeypatch):
    # docker stop, systemd and batch schedulers send SIGTERM: the JSON list (written at the end)
    # must still hold what was scored.
    import os
    import signal

    from rali_edge.scoring import Scorer

    real = Scorer.score_files

    def terminated_after_two(self, paths, **kwargs):
        for i, result in enumerate(real(self, paths, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield result

    monkeypatch.setattr(Scorer, "score_files", terminated_after_two)
    ignored = []  # the handler before the command (so that a failing test does not kill pytest)
    previous = signal.signal(signal.SIGTERM, lambda *args: ignored.append(args))
    try:
        out = tmp_path / "scores.json"
        result = run("score", "-q", "--model", small_model, *photos, "-o", out)
        assert result.exit_code == 130, result.output
        assert "interrupted: writing the 2 results so far" in result.stderr and not ignored
        assert [r["path"] for r in json.loads(out.read_text())] == [str(p) for p in photos[:2]]
        os.kill(os.getpid(), signal.SIGTERM)  # the command put the handler before it back
        assert len(ignored) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_output_suffix_that_names_no_format_gets_the_table_and_a_note(small_model, photos, tmp_path):
    result = run("score", "-q", "--model", small_model, photos[0], "-o", tmp_path / "r.txt")
    assert result.exit_code == 0 and "its suffix names no format" in result.stderr
    assert (tmp_path / "r.txt").read_text().startswith("  score  path")
    explicit = run("score", "-q", "--model", small_model, photos[0], "-o", tmp_path / "t.txt", "--format", "table")
    assert explicit.exit_code == 0 and "suffix" not in explicit.stderr


def test_a_reader_that_closes_stdout_stops_score_quietly(small_model, photos, tmp_path, monkeypatch):
    # `rali-edge score ... | head -1`: the pipe closes under the writer; score stops, exit 0, no error.
    from rali_edge import outputs

    real = outputs.Output._write
    calls = []

    def pipe_closes_at_the_second_row(self, row):
        calls.append(row["path"])
        if len(calls) == 2:
            raise BrokenPipeError(32, "Broken pipe")
        return real(self, row)

    monkeypatch.setattr(outputs.Output, "_write", pipe_closes_at_the_second_row)
    result = run("score", "-q", "--model", small_model, "--format", "jsonl", *photos)
    assert result.exit_code == 0 and "error" not in result.stderr, result.output
    assert len(calls) == 2 and "1 scored" in result.stderr  # it stopped at the closed pipe
    # Into a named file (a FIFO whose reader left), a broken pipe stays an error.
    calls.clear()
    named = run("score", "-q", "--model", small_model, *photos, "-o", tmp_path / "out.jsonl")
    assert named.exit_code == 4 and "writing" in named.stderr and "Broken pipe" in named.stderr
