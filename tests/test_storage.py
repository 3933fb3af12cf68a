"""Images behind URIs (rali_edge.storage): read through fsspec from a real HTTP server the test
runs on 127.0.0.1, retried when the server fails for a while, an error at once when the object is
missing; URI folders and globs listed like local ones."""

import functools
import json
import socket
import http.server
import threading

import pytest
from click.testing import CliRunner

from rali_edge.cli import main
from rali_edge.errors import ImageError
from rali_edge.images import find_images, open_image
from rali_edge.storage import is_uri, read_bytes

pytest.importorskip("aiohttp")  # fsspec's http:// filesystem


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    failures_left = 0  # the next requests answered 503, as an overloaded store would

    def do_GET(self):
        if FlakyHandler.failures_left > 0:
            FlakyHandler.failures_left -= 1
            self.send_error(503, "busy")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(photos):
    folder = photos[0].parent
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FlakyHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    FlakyHandler.failures_left = 0


def test_uris_are_told_from_local_paths():
    assert is_uri("s3://bucket/a.jpg") and is_uri("https://x/a.jpg") and is_uri("file:///tmp/a.jpg")
    assert not is_uri("/tmp/a.jpg") and not is_uri("C:\\photos\\a.jpg")


def test_http_images_decode_like_local_files_and_outages_are_retried(server, photos):
    name = photos[0].name
    local = open_image(photos[0])
    assert open_image(f"{server}/{name}").tobytes() == local.tobytes()
    FlakyHandler.failures_left = 2  # two 503s, then the file: read on the third attempt
    assert read_bytes(f"{server}/{name}", backoff_s=0.01) == photos[0].read_bytes()
    FlakyHandler.failures_left = 10  # longer than the retries last: a clear error naming the URI
    with pytest.raises(ImageError, match="after 4 attempts"):
        read_bytes(f"{server}/{name}", backoff_s=0.01)
    FlakyHandler.failures_left = 0
    with pytest.raises(ImageError, match="not found"):
        open_image(f"{server}/no-such.jpg")


def test_cli_scores_uris_with_local_paths_and_lists_uri_globs(small_model, photos, tmp_path, server):
    uris = [f"{server}/{p.name}" for p in photos[:2]]
    result = CliRunner().invoke(main, ["score", "--model", str(small_model), "--format", "csv", *uris,
                                       str(photos[2]), f"{server}/missing.jpg"])
    assert result.exit_code == 1, result.output  # the missing object failed, the rest were scored
    rows = result.stdout.strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [*uris, str(photos[2]), f"{server}/missing.jpg"]
    assert rows[-1].endswith("not found") and all(r.split(",")[1] for r in rows[:3])

    folder = photos[0].parent
    found = find_images([f"file://{folder}/", f"file://{folder}/*.png", f"file://{tmp_path}/nothing-*.jpg"])
    assert f"file://{photos[0]}" in found.paths
    assert len(found.paths) == len(set(found.paths))  # a file a folder and a glob both reach comes once
    assert found.unmatched == [f"file://{tmp_path}/nothing-*.jpg: no images there (looked for "
                               f"{found.unmatched[0].split('(looked for ')[1]}"]


@pytest.fixture
def s3_bucket(photos, monkeypatch):
    """A bucket on a real S3-protocol server (moto's) on 127.0.0.1, reached through s3fs the way a
    user reaches MinIO, R2 or AWS itself: the endpoint and credentials in the usual variables."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in (("AWS_ENDPOINT_URL", f"http://{host}:{port}"), ("AWS_ACCESS_KEY_ID", "test"),
                        ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    for p in photos[:3]:
        client.upload_file(str(p), "corpus", f"shoot/{p.name}")
    client.put_object(Bucket="corpus", Key="shoot/notes.txt", Body=b"not an image")
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem fsspec kept from another endpoint
    yield "s3://corpus/shoot"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gs_bucket(photos, monkeypatch):
    """A bucket on a real GCS-protocol server (gcp-storage-emulator) on 127.0.0.1, reached
    through gcsfs as a user reaches the emulator: STORAGE_EMULATOR_HOST, anonymous access."""
    gcsfs = pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")

    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="corpus")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no probe for a GCE metadata server
    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem()
    for p in photos[:3]:
        fs.put_file(str(p), f"corpus/shoot/{p.name}")
    fs.pipe_file("corpus/shoot/notes.txt", b"not an image")
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield "gs://corpus/shoot"
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.parametrize("bucket", ["s3_bucket", "gs_bucket"])
def test_objects_in_s3_and_gcs_score_like_local_files_and_a_missing_one_is_its_own_error_row(request, bucket, photos,
                                                                                               small_model):
    bucket = request.getfixturevalue(bucket)
    assert open_image(f"{bucket}/{photos[0].name}").tobytes() == open_image(photos[0]).tobytes()
    found = find_images([f"{bucket}/", f"{bucket}/*{photos[1].suffix}"])
    assert sorted(set(found.paths)) == found.paths == sorted(f"{bucket}/{p.name}" for p in photos[:3])

    result = CliRunner().invoke(main, ["score", "--model", str(small_model), "--format", "jsonl", f"{bucket}/",
                                       f"{bucket}/missing.jpg", str(photos[0])])
    assert result.exit_code == 1, result.output  # the missing object failed, the rest were scored
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [*found.paths, f"{bucket}/missing.jpg", str(photos[0])]
    assert rows[-2]["error"] == "not found"
    assert rows[0]["score"] == pytest.approx(rows[-1]["score"], abs=1e-6)  # the same photograph, local and in the bucket
