"""Images behind URIs (rali_edge.storage): read through fsspec from a real HTTP server the test
runs on 127.0.0.1, retried when the server fails for a while, an error at once when the object is
missing; URI folders and globs listed like local ones."""

import functools
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
