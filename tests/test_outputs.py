"""Rows as files (rali_edge.outputs) and the file pipeline feeding them: outputs written as
they are scored, --resume after a kill, stream's --append, decoding bounded ahead of the encoder."""

import csv
import json
import threading

import pytest
from click.testing import CliRunner

import rali_edge
from rali_edge.cli import main
from rali_edge.errors import UsageError
from rali_edge.outputs import Output, format_for
from rali_edge.scoring import SCORES, FileResult


def ResultFile(path, fmt, resume=False):
    """The output `rali-edge score` writes."""
    return Output(path, SCORES, fmt, resume=resume)


def row(path, score=None, error=None):
    return FileResult(path, score, error).to_dict()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_streamed_formats_are_on_disk_after_each_result(tmp_path):
    for fmt in ("csv", "jsonl"):
        path = tmp_path / f"out.{fmt}"
        out = ResultFile(path, fmt)
        out.add(row("a.jpg", score=3.25))
        text = path.read_text()  # before close: a kill now would keep this row
        assert "a.jpg" in text and "3.25" in text
        out.add(row("b.jpg", error="cannot decode"))
        out.close()
    rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert rows == [["path", "score", "error"], ["a.jpg", "3.250000", ""], ["b.jpg", "", "cannot decode"]]
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert lines == [{"path": "a.jpg", "score": 3.25}, {"path": "b.jpg", "error": "cannot decode"}]


def test_resume_drops_a_cut_off_line_and_appends(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("path,score,error\na.jpg,3.000000,\nb.jpg,,bad file\nc.jpg,2.9")  # killed mid-line
    out = ResultFile(path, "csv", resume=True)
    assert out.done == {"a.jpg", "b.jpg"}  # an error row counts: a bad file stays bad
    out.add(row("c.jpg", score=2.5))
    out.close()
    assert path.read_text() == "path,score,error\na.jpg,3.000000,\nb.jpg,,bad file\nc.jpg,2.500000,\n"

    path = tmp_path / "out.jsonl"
    path.write_text('{"path": "a.jpg", "score": 3.0}\n{"path": "b.j')
    out = ResultFile(path, "jsonl", resume=True)
    assert out.done == {"a.jpg"}
    out.close()  # nothing new: the file keeps its complete lines only
    assert path.read_text() == '{"path": "a.jpg", "score": 3.0}\n'


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    with pytest.raises(UsageError):
        ResultFile(None, "jsonl", resume=True)  # stdout
    with pytest.raises(UsageError):
        ResultFile(tmp_path / "x.json", "json", resume=True)  # a list is rewritten whole
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("name,value\nx,1")  # no newline at the end: still not touched
    with pytest.raises(UsageError, match="its header is not path,score,error"):
        ResultFile(foreign, "csv", resume=True)
    assert foreign.read_text() == "name,value\nx,1"  # left as it was


def test_format_follows_the_output_suffix_unless_given():
    assert format_for("x.jsonl", None) == "jsonl" and format_for("x.CSV", None) == "csv"
    assert format_for("x.json", None) == "json" and format_for("x.txt", None) == "table"
    assert format_for(None, None) == "table" and format_for("x.jsonl", "csv") == "csv"
    assert format_for("x.txt", None, default="jsonl") == "jsonl"


def test_cli_resume_after_a_kill_scores_only_the_rest(small_model, photos, tmp_path):
    """A run cut off after two rows, mid-line: --resume scores the remaining images only, and the
    output ends with exactly one row per image, with the scores of an uninterrupted run."""
    full = tmp_path / "full.jsonl"
    assert run("score", "--model", small_model, "-o", full, *photos).exit_code == 0
    expected = {r["path"]: r["score"] for r in map(json.loads, full.read_text().splitlines())}
    assert len(expected) == len(photos)

    cut = tmp_path / "cut.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:2]) + lines[2][:10])
    result = run("score", "--model", small_model, "-o", cut, "--resume", *photos)
    assert result.exit_code == 0, result.output
    assert f"{len(photos) - 2} to score" in result.stderr
    assert f"{len(photos) - 2} scored" in result.stderr
    rows = [json.loads(line) for line in cut.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(expected)  # one row each, none twice
    for r in rows:
        assert r["score"] == pytest.approx(expected[r["path"]], abs=1e-5)


def test_a_failed_model_load_leaves_the_output_as_it_was(tmp_path, photos):
    out = tmp_path / "scores.csv"
    out.write_text("path,score,error\nkept.jpg,3.000000,\n")
    result = run("score", "--model", tmp_path / "no-such-model", "-o", out, photos[0])
    assert result.exit_code != 0
    assert out.read_text() == "path,score,error\nkept.jpg,3.000000,\n"


def test_decoding_runs_at_most_a_batch_and_two_images_per_thread_ahead(small_model, photos, monkeypatch):
    """However slow the encoder, score_files holds a bounded number of decoded images: memory
    stays flat over a long list (which may be a lazy iterable)."""
    import rali_edge.scoring as scoring

    decoded, peak_ahead, lock = [0], [0], threading.Lock()
    real_open = scoring.open_image

    def counting_open(path):
        with lock:
            decoded[0] += 1
        return real_open(path)

    monkeypatch.setattr(scoring, "open_image", counting_open)
    scorer = rali_edge.load(small_model)
    real_score = scorer.score_pixels
    consumed = [0]

    def slow_score(pixels, **kw):
        import time

        time.sleep(0.05)  # a slow encoder: decoding would run far ahead if unbounded
        with lock:
            peak_ahead[0] = max(peak_ahead[0], decoded[0] - consumed[0])
        consumed[0] += pixels.shape[0] // scorer.preprocess.view_count
        return real_score(pixels, **kw)

    scorer.score_pixels = slow_score
    paths = (str(photos[i % len(photos)]) for i in range(60))  # lazy
    results = list(scorer.score_files(paths, batch_size=4, workers=2))
    assert len(results) == 60 and all(r.error is None for r in results)
    assert [r.path for r in results] == [str(photos[i % len(photos)]) for i in range(60)]
    # The batch being scored, plus the window decoding ahead: the next batch and two per thread.
    assert peak_ahead[0] <= 4 + (4 + 2 * 2)


def test_from_list_reads_text_and_csv_lists_as_written(small_model, photos, tmp_path):
    """A list's paths are scored in its order, as written: a missing one is its own error row (one
    row per input), a path also named on the command line once; a CSV needs a path column."""
    text = tmp_path / "todo.txt"
    missing = str(tmp_path / "gone.jpg")
    text.write_text(f"# corpus\n{photos[1]}\n\n{missing}\n{photos[0]}\n")
    result = run("score", "--model", small_model, "--from-list", text, "--format", "jsonl", photos[0])
    assert result.exit_code == 1  # the missing file failed, the rest were scored
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(photos[0]), str(photos[1]), missing]
    assert "error" in rows[2] and all("score" in r for r in rows[:2])

    listed = tmp_path / "previous.csv"  # an earlier run's csv output is a list too
    assert run("score", "--model", small_model, "-o", listed, *photos[:2]).exit_code == 0
    again = run("score", "--model", small_model, "--from-list", listed, "--format", "csv")
    assert [r["path"] for r in csv.DictReader(again.stdout.splitlines())] == [str(p) for p in photos[:2]]

    bad = tmp_path / "bad.csv"
    bad.write_text("file,x\na.jpg,1\n")
    result = run("score", "--model", small_model, "--from-list", bad)
    assert result.exit_code == 2 and "path" in result.output and "Traceback" not in result.output
    assert run("score", "--model", small_model).exit_code == 2  # neither PATHS nor a list


def test_parquet_output_is_a_folder_of_complete_parts_that_resume_continues(small_model, photos, tmp_path, monkeypatch):
    """Parquet is written in parts as it is scored (each complete when it appears: a kill never leaves
    a file without its footer), read back as one table; --resume skips what the parts hold, drops a
    part a killed run was writing, and refuses a folder of other files."""
    pq = pytest.importorskip("pyarrow.parquet")
    import rali_edge.outputs as outputs

    monkeypatch.setattr(outputs, "PART_ROWS", 2)
    out = tmp_path / "scores.parquet"
    writer = ResultFile(out, "parquet")
    for i in range(3):
        writer.add(row(f"{i}.jpg", score=float(i)))
    assert [p.name for p in out.iterdir()] == ["part-000000.parquet"]  # two rows are on disk before close
    writer.add(row("bad.jpg", error="cannot decode"))
    writer.close()
    table = pq.read_table(out).to_pylist()
    assert [r["path"] for r in table] == ["0.jpg", "1.jpg", "2.jpg", "bad.jpg"]
    assert table[3] == {"path": "bad.jpg", "score": None, "error": "cannot decode"}

    (out / ".part-000002.parquet.tmp").write_bytes(b"PAR1 half a part")  # what a kill mid-write leaves
    resumed = ResultFile(out, "parquet", resume=True)
    assert resumed.done == {"0.jpg", "1.jpg", "2.jpg", "bad.jpg"}
    resumed.add(row("4.jpg", score=4.0))
    resumed.close()
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert pq.read_table(out).column("path").to_pylist()[-1] == "4.jpg"

    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not rali-edge parts"):
        ResultFile(out, "parquet", resume=True)
    with pytest.raises(UsageError, match="folder of part files"):
        ResultFile(None, "parquet")

    # Through the CLI, from the -o suffix; a parquet list is an input list too.
    cli_out = tmp_path / "cli.parquet"
    assert run("score", "--model", small_model, "-o", cli_out, *photos).exit_code == 0
    rows = pq.read_table(cli_out).to_pylist()
    assert [r["path"] for r in rows] == [str(p) for p in photos] and all(r["score"] is not None for r in rows)
    assert run("score", "--model", small_model, "-o", cli_out, *photos).exit_code == 0  # again: replaced, as a file is
    assert len(pq.read_table(cli_out)) == len(photos)
    again = run("score", "--model", small_model, "--from-list", cli_out, "--format", "jsonl")
    assert [json.loads(line)["path"] for line in again.stdout.splitlines()] == [str(p) for p in photos]


def test_pipeline_stats_say_which_stage_bound_the_run(small_model, photos, monkeypatch):
    """A slow encoder keeps itself busy and is named the bottleneck; slow decoding (a store that
    takes 30 ms per file, one worker) makes the encoder wait, and that is named instead."""
    import time

    import rali_edge.scoring as scoring
    from rali_edge.scoring import PipelineStats

    paths = [str(photos[i % len(photos)]) for i in range(24)]
    scorer = rali_edge.load(small_model)
    real_score = scorer.score_pixels

    def slow_score(pixels, **kw):
        time.sleep(0.1)
        return real_score(pixels, **kw)

    scorer.score_pixels = slow_score
    stats = PipelineStats()
    assert len(list(scorer.score_files(paths, batch_size=4, workers=2, stats=stats))) == 24
    assert stats.encoder_busy > 0.8 and "the encoder was the bottleneck" in stats.bottleneck()

    scorer.score_pixels = real_score
    real_read = scoring.read_views

    def slow_read(pre, path):
        time.sleep(0.03)
        return real_read(pre, path)

    monkeypatch.setattr(scoring, "read_views", slow_read)
    stats = PipelineStats()
    assert len(list(scorer.score_files(paths, batch_size=4, workers=1, stats=stats))) == 24
    assert stats.waiting_s > 0.5 * stats.wall_s and "decoding was the bottleneck" in stats.bottleneck()


def test_a_model_that_fails_to_load_never_empties_an_existing_output(tmp_path, photos):
    """A model folder that exists but cannot load fails after the output was checked: -o keeps its rows."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    out = tmp_path / "scores.csv"
    out.write_text("path,score,error\nkept.jpg,3.000000,\n")
    result = run("score", "--model", broken, "-o", out, photos[0])
    assert result.exit_code == 3, result.output
    assert out.read_text() == "path,score,error\nkept.jpg,3.000000,\n"
