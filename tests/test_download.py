"""scvae_torch.download against a local http.server on 127.0.0.1 serving a 10x v2 file the test writes."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from test_data import random_counts, write_10x_v2

from scvae_torch import cli, data, download
from scvae_torch.download import DownloadError, fetch

FAST = dict(retries=2, timeout=60, retry_delay=0)  # timeout: a hang guard; no test waits for it


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the server's payload; /short cuts the body, /flaky fails first, /missing is 404."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.hits[self.path] = server.hits.get(self.path, 0) + 1
        body = server.payload
        if self.path == "/missing.h5":
            self.send_error(404, "Not Found")
            return
        if self.path == "/flaky.h5" and server.hits[self.path] <= server.failures:
            self.send_error(500, "Internal Server Error")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/short.h5":
            body = body[: len(body) // 2]  # promised more than is sent, then the connection closes
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("src") / "v2.h5"
    X = random_counts(30, 20, seed=11)
    write_10x_v2(path, X, [f"g{i}" for i in range(20)], [f"c{i}" for i in range(30)])
    return path.read_bytes()


@pytest.fixture
def server(payload):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.payload, httpd.hits, httpd.failures = payload, {}, 1
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_success_with_checksum_gives_a_readable_file(server, payload, tmp_path):
    dest = tmp_path / "data" / "v2.h5"
    sha = hashlib.sha256(payload).hexdigest()
    md5 = hashlib.md5(payload).hexdigest()
    assert fetch(f"{server.url}/v2.h5", dest, sha256=sha, md5=md5, **FAST) == sha
    assert dest.read_bytes() == payload
    assert sorted(os.listdir(dest.parent)) == ["v2.h5"]  # no .part; no record needed when the sha256 is known
    counts = data.read_10x_h5(dest)
    assert counts.X.shape == (30, 20)
    assert np.array_equal(counts.X.toarray(), random_counts(30, 20, seed=11).toarray())


def test_wrong_checksum_deletes_the_partial_file_and_shows_both(server, payload, tmp_path):
    dest = tmp_path / "v2.h5"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        fetch(f"{server.url}/v2.h5", dest, sha256=wrong, **FAST)
    message = str(err.value)
    assert f"expected {wrong}" in message and f"got {hashlib.sha256(payload).hexdigest()}" in message
    assert "\n" not in message and os.listdir(tmp_path) == []
    expected = f"md5 mismatch: expected {'1' * 32}, got {hashlib.md5(payload).hexdigest()}"
    with pytest.raises(DownloadError, match=expected):
        fetch(f"{server.url}/v2.h5", dest, md5="1" * 32, **FAST)
    assert os.listdir(tmp_path) == []


def test_body_cut_short_is_retried_then_fails_clearly(server, payload, tmp_path):
    dest = tmp_path / "v2.h5"
    with pytest.raises(DownloadError) as err:
        fetch(f"{server.url}/short.h5", dest, **FAST)
    message = str(err.value)
    assert "after 3 attempts" in message and f"{len(payload) // 2} of {len(payload)} bytes" in message
    assert server.hits["/short.h5"] == 3
    assert os.listdir(tmp_path) == []  # neither a final file, a .part, nor a recorded checksum


def test_server_error_then_success_on_retry(server, payload, tmp_path):
    dest = tmp_path / "v2.h5"
    sha = fetch(f"{server.url}/flaky.h5", dest, **FAST)
    assert server.hits["/flaky.h5"] == 2 and dest.read_bytes() == payload
    assert sha == hashlib.sha256(payload).hexdigest()


def test_client_error_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/missing.h5", tmp_path / "x.h5", **FAST)
    assert server.hits["/missing.h5"] == 1 and os.listdir(tmp_path) == []


def test_first_download_records_sha256_and_later_runs_verify_it(server, payload, tmp_path):
    dest = tmp_path / "v2.h5"
    sha = hashlib.sha256(payload).hexdigest()
    fetch(f"{server.url}/v2.h5", dest, **FAST)
    record = Path(download.recorded_checksum_path(dest))
    assert record.read_text() == f"{sha}  v2.h5\n"
    assert fetch(f"{server.url}/v2.h5", dest, **FAST) == sha  # present and verified: no second request
    assert server.hits["/v2.h5"] == 1
    dest.write_bytes(payload[:-1] + b"X")  # the file changed on disk since it was recorded
    with pytest.raises(DownloadError, match=f"existing file does not verify \\(sha256 mismatch: expected {sha}"):
        fetch(f"{server.url}/v2.h5", dest, **FAST)
    dest.unlink()
    server.payload = payload + b"changed upstream"  # the server now sends other bytes
    with pytest.raises(DownloadError, match=f"sha256 mismatch: expected {sha}"):
        fetch(f"{server.url}/v2.h5", dest, **FAST)
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.h5", "/tmp/x.h5", "http://"])
def test_only_http_urls_are_accepted(url, tmp_path):
    with pytest.raises(DownloadError, match="only http:// and https://"):
        fetch(url, tmp_path / "x.h5", **FAST)
    assert os.listdir(tmp_path) == []


def test_registry_names_the_mb20k_file():
    entry = download.REGISTRY["10x-MB-20k"]
    assert entry.url == "http://cf.10xgenomics.com/samples/cell-exp/1.3.0/1M_neurons/1M_neurons_neuron20k.h5"
    assert entry.format == "10x-h5"
    for item in download.REGISTRY.values():
        download.check_url(item.url)
        assert item.format in data.FORMATS


def test_download_command(server, payload, tmp_path, capsys):
    dest = tmp_path / "v2.h5"
    assert cli.main(["download", f"{server.url}/v2.h5", "--out", str(dest), "--retries", "0"]) == 0
    assert dest.read_bytes() == payload
    assert cli.main(["download", "file:///etc/passwd", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "scvae-torch download: error: file:///etc/passwd: only http:// and https:// URLs are accepted"
    assert cli.main(["download", "--list"]) == 0 and "10x-MB-20k" in capsys.readouterr().out
