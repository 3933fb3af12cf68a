"""`rali-edge serve`, started as users start it (a process on 127.0.0.1), talked to over real HTTP:
scores equal `rali-edge score`'s on the same files, through POST /score and through the KServe
v2 protocol with the real `tritonclient`; batching across requests; every bad input gets its
status and the server stays up; limits, the API key, URLs, SIGTERM; and the API fuzzed from its
own OpenAPI description with schemathesis, time-bounded."""

import asyncio
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rali_edge.serving import Batcher, HTTPProblem, Metrics, ServeOptions  # noqa: E402
from processes import pids_with  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *options):
        self.port = free_port()
        env = {**os.environ, "RALI_EDGE_BACKEND": "torch"}
        self.process = subprocess.Popen([sys.executable, "-m", "rali_edge.cli", "serve", "--model", str(model),
                                         "--port", str(self.port), *map(str, options)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
            assert self.process.poll() is None, self.process.communicate()
        raise AssertionError("the server never got ready")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        return answer.status, data, dict(answer.getheaders())

    def get(self, path: str, headers: dict | None = None):
        return self.request("GET", path, headers=headers)

    def score(self, files: list[tuple[str, bytes]], headers: dict | None = None):
        boundary = "rali-edge-test-boundary"
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, data, head = self.request("POST", "/score", body,
                                          {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})
        return status, json.loads(data), head

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(small_model):
    running = Server(small_model, "--max-bytes", 4_000_000, "--read-timeout", 1, "--max-queue", 6, "--max-delay-ms", 40)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def files(photos):
    return [(p.name, p.read_bytes()) for p in photos]


@pytest.fixture(scope="module")
def expected(small_model, photos):
    out = subprocess.run([sys.executable, "-m", "rali_edge.cli", "score", "-q", "--model", str(small_model),
                          "--backend", "torch", "--format", "json", *map(str, photos)], capture_output=True, text=True)
    return [r["score"] for r in json.loads(out.stdout)]


def test_scores_are_rali_edge_scores(server, files, expected):
    status, results, _ = server.score(files)
    assert status == 200 and [r["name"] for r in results] == [name for name, _ in files]
    assert [r["score"] for r in results] == pytest.approx(expected, abs=1e-5)
    status, body, _ = server.request("POST", "/score", files[1][1], {"Content-Type": "image/jpeg"})
    assert status == 200 and json.loads(body)[0]["score"] == pytest.approx(expected[1], abs=1e-5)


def test_kserve_v2_with_the_real_triton_client(server, files, expected):
    client_http = pytest.importorskip("tritonclient.http")
    client = client_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("rali")
    meta = client.get_model_metadata("rali")
    assert meta["inputs"][0] == {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}
    image = client_http.InferInput("IMAGE", [len(files)], "BYTES")
    image.set_data_from_numpy(np.array([data for _, data in files], dtype=object), binary_data=True)
    for binary in (True, False):
        answer = client.infer("rali", [image], outputs=[client_http.InferRequestedOutput("SCORE", binary_data=binary)])
        assert answer.as_numpy("SCORE").tolist() == pytest.approx(expected, abs=1e-5)
    bad = client_http.InferInput("IMAGE", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=object), binary_data=True)
    with pytest.raises(Exception, match="not an image"):
        client.infer("rali", [bad])


def test_concurrent_requests_share_encoder_calls(server, files):
    def one(i):
        return server.score([files[i % len(files)]])[0]

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(one, range(6))) == {200}
    metrics = server.get("/metrics")[1].decode()
    count = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("rali_serve_batch_images_count")))
    total = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("rali_serve_batch_images_sum")))
    assert total / count > 1.0  # more images than encoder calls: requests were batched together


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG whose header says 60000 x 60000 and whose data is a few hundred bytes of zlib."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 200_000, 9))
            + chunk(b"IEND", b""))


def read_until_closed(sock: socket.socket) -> str:
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def rss(server) -> float:
    text = server.get("/metrics")[1].decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("process_resident_memory_bytes")))


def test_untrusted_input_gets_its_status_and_the_server_stays_up(server, files):
    jpeg = files[0][1]
    cases = [
        ("not an image", b"hello, I am text", 415, "not an image file"),
        ("empty", b"", 422, "empty file"),
        ("truncated", jpeg[: len(jpeg) // 3], 422, "truncated or corrupt"),
        ("bomb", bomb_png(), 422, "image too large"),
    ]
    before = rss(server)
    for name, data, status, words in cases:
        got, body, _ = server.request("POST", "/score", data, {"Content-Type": "application/octet-stream"})
        assert got == status and words in json.loads(body)[0]["error"], (name, got, body)
    assert rss(server) < before + 50 * 2**20  # the bomb's 10.8 GB of pixels were never decoded
    # One good and one bad file: 200, each answered on its own.
    status, results, _ = server.score([files[0], ("junk.jpg", b"junk")])
    assert status == 200 and "score" in results[0] and "not an image" in results[1]["error"]
    # Over --max-bytes: 413 before any of the body is read.
    with socket.create_connection(("127.0.0.1", server.port)) as big:
        big.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 4100000\r\n\r\n")
        answer = read_until_closed(big)
    assert answer.startswith("HTTP/1.1 413") and "at most 4000000" in answer
    # More images than the server ever takes at once (--max-queue 6): 413; a full queue: 503.
    status, body, _ = server.score([files[0]] * 7)
    assert status == 413 and "at most 6" in body["error"]
    with ThreadPoolExecutor(4) as pool:
        busy = list(pool.map(lambda _: server.score([files[0]] * 5), range(4)))
    assert {s for s, _, _ in busy} <= {200, 503} and any(s == 503 for s, _, _ in busy)
    assert all(h.get("retry-after") == "1" and "busy" in b["error"] for s, b, h in busy if s == 503)
    # Malformed requests: 400, one line.
    for path, body in (("/score", b'{"urls": 3}'), ("/v2/models/rali/infer", b'{"inputs": [{"name": "X"}]}')):
        status, answer, _ = server.request("POST", path, body, {"Content-Type": "application/json"})
        assert status == 400 and "\n" not in json.loads(answer)["error"]
    assert server.get("/readyz")[0] == 200 and server.score([files[0]])[0] == 200  # still up


def test_a_slow_client_is_cut_off_and_a_client_that_leaves_costs_nothing(server, files):
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n0123456789")
        started = time.monotonic()
        answer = read_until_closed(slow)
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - started < 10
    for _ in range(3):  # a client that sends a request and leaves at once
        with socket.create_connection(("127.0.0.1", server.port)) as gone:
            body = files[0][1]
            gone.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert server.score([files[0]])[0] == 200


def test_no_path_or_url_reads_the_servers_files(server):
    for url in ("/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:1/x.jpg"):
        status, body, _ = server.request("POST", "/score", json.dumps({"urls": [url]}).encode(),
                                         {"Content-Type": "application/json"})
        assert status == 400 and "not fetched" in json.loads(body)["error"]


def test_scoring_errors_answer_500_to_their_request_only():
    """The batcher scores each image of a failed batch alone: the one that fails gets 500, the
    others their scores (an injected scorer that fails on one image)."""
    def score_views(pixels):
        if np.isnan(pixels).any():
            raise RuntimeError("CUDA error: an illegal memory access")
        return [float(v.mean()) for v in pixels]

    async def scenario():
        batcher = Batcher(score_views, ServeOptions(max_batch=8, max_delay_ms=50), Metrics())
        batcher.start()
        good = [batcher.submit(np.full((1, 3, 2, 2), i, np.float32)) for i in range(3)]
        bad = batcher.submit(np.full((1, 3, 2, 2), np.nan, np.float32))
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        await batcher.stop()
        return results

    *good, bad = asyncio.run(scenario())
    assert good == [0.0, 1.0, 2.0]
    assert isinstance(bad, HTTPProblem) and bad.status == 500


def test_images_already_waiting_join_a_batch_however_late_it_is():
    """Past its first image's deadline (an encoder slower than --max-delay-ms), a batch still takes
    every image already queued: under load, batching must not fall to one image per call."""
    calls = []

    def score_views(pixels):
        calls.append(len(pixels))
        return [0.0] * len(pixels)

    async def scenario():
        batcher = Batcher(score_views, ServeOptions(max_batch=8, max_delay_ms=0), Metrics())
        futures = [batcher.submit(np.zeros((1, 3, 2, 2), np.float32)) for _ in range(5)]
        batcher.start()
        await asyncio.gather(*futures)
        await batcher.stop()

    asyncio.run(scenario())
    assert calls == [5]


def test_openapi_describes_what_the_server_does_fuzzed_with_schemathesis(server):
    schemathesis = Path(sys.executable).parent / "schemathesis"
    if not schemathesis.exists():
        pytest.skip("needs schemathesis (the test extra)")
    done = subprocess.run([str(schemathesis), "run", f"{server.base}/openapi.json", "--max-examples", "40",
                           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                           "response_schema_conformance", "--request-timeout", "20", "--seed", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    assert server.score([("x.jpg", b"x")])[0] in (415, 200)  # still up


def test_api_key_urls_and_sigterm(small_model, files, tmp_path):
    (tmp_path / "a.jpg").write_bytes(files[0][1])
    static = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(free_port_for := free_port())],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(small_model, "--api-key", "sesame", "--allow-urls", "http", "--max-delay-ms", 200)
    try:
        assert server.get("/healthz")[0] == 200 and server.get("/readyz")[0] == 200  # probes need no key
        status, body, head = server.score([files[0]])
        assert status == 401 and head.get("www-authenticate") == "Bearer"
        for path in ("/a1", "/a2", "/metrics"):
            assert server.get(path)[0] == 401
        counted = server.get("/metrics", {"Authorization": "Bearer sesame"})[1].decode()
        assert 'route="/a1"' not in counted and 'route="unauthorized"' in counted  # clients choose no label
        assert server.score([files[0]], {"Authorization": "Bearer wrong"})[0] == 401
        key = {"Authorization": "Bearer sesame"}
        assert server.score([files[0]], key)[0] == 200
        url = json.dumps({"urls": [f"http://127.0.0.1:{free_port_for}/a.jpg"]}).encode()
        status, body, _ = server.request("POST", "/score", url, {"Content-Type": "application/json", **key})
        assert status == 200 and "score" in json.loads(body)[0], body
        # SIGTERM while a request is in flight: it is answered, then the server exits 0.
        answers = []
        thread = threading.Thread(target=lambda: answers.append(server.score([files[0]] * 4, key)))
        thread.start()
        time.sleep(0.1)
        assert server.stop() == 0
        thread.join(timeout=60)
        assert answers and answers[0][0] == 200 and len(answers[0][1]) == 4
    finally:
        server.stop()
        static.terminate()


def _replica_pids() -> list[int]:
    return pids_with("ServeReplica", "rali")


@pytest.mark.slow
def test_ray_serve_gives_the_same_scores_and_a_killed_replica_loses_no_acknowledged_request(small_model, files, expected,
                                                                                           tmp_path):
    pytest.importorskip("ray.serve")
    port = free_port()
    env = {**os.environ, "RALI_EDGE_BACKEND": "torch"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"  # a file, not a pipe: Ray forwards its workers' output, which would fill a pipe
    process = subprocess.Popen([sys.executable, "-m", "rali_edge.cli", "serve", "--model", str(small_model), "--ray",
                                "local", "--replicas", "2", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=log.open("w"))
    server = Server.__new__(Server)
    server.port, server.process = port, process
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if server.get("/readyz")[0] == 200 and len(_replica_pids()) == 2:
                    break
            except OSError:
                pass
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"Ray Serve never got ready:\n{log.read_text()[-3000:]}")
        status, results, _ = server.score(files)
        assert status == 200 and [r["score"] for r in results] == pytest.approx(expected, abs=1e-5)

        answers, killed = [], []

        def client(i):
            for j in range(12):
                k = (i + j) % len(files)
                try:
                    status, data, _ = server.request("POST", "/score", files[k][1])
                    answers.append((k, status, json.loads(data) if status == 200 else data[:200]))
                except (OSError, http.client.HTTPException) as e:  # cut off as the replica died: not acknowledged
                    answers.append((k, None, str(e)))
                if i == 0 and j == 3 and not killed:
                    killed.append(_replica_pids()[0])
                    os.kill(killed[0], signal.SIGKILL)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert killed and len(answers) == 36  # every client ran to its end
        acknowledged = [(k, body) for k, status, body in answers if status == 200]
        for k, body in acknowledged:  # every request answered 200 carries its own image's score
            assert body[0]["score"] == pytest.approx(expected[k], abs=1e-5)
        assert len(acknowledged) >= len(answers) // 2 and answers[-1][1] == 200  # and it kept serving
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
