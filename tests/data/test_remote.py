"""Remote reads against a loopback HTTP server that misbehaves: short bodies, trickled bytes."""

import http.server
import threading
import time

import pytest

from pipeline.data import remote, sources
from pipeline.data.reader import read_shard
from pipeline.data.stream import ShardLoader
from tests.data.test_stream import _keys, _png, _write_shards


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], mode: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.mode = files, mode

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with their full Content-Length; mode "short" closes the connection
    after half of the body, mode "trickle" sends one byte every 50 ms."""

    server: _Server

    def do_GET(self):
        body = self.server.files[self.path.lstrip("/")]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if self.server.mode == "short":
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif self.server.mode == "trickle":
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(files, mode):
        server = _Server(files, mode)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_shard_body_shorter_than_its_content_length_is_an_error(tmp_path, serve):
    urls = _write_shards(tmp_path, [10])
    server = serve({"a.tar": open(urls[0], "rb").read()}, "short")
    with pytest.raises(remote.TransferError, match=r"ends after \d+ of its \d+ bytes \(Content-Length\)"):
        list(read_shard(server.url("a.tar"), timeout=5))


def test_the_loader_skips_and_counts_a_short_remote_shard(tmp_path, serve):
    urls = _write_shards(tmp_path, [10, 10])
    short = serve({"b.tar": open(urls[1], "rb").read()}, "short")
    loader = ShardLoader([urls[0], short.url("b.tar")], batch_size=2, samples_per_epoch=20, shuffle_buffer=2)
    keys = {k for batch in _keys(loader) for k in batch}
    assert keys and list(loader.damaged_shards) == [short.url("b.tar")]
    assert "Content-Length" in loader.damaged_shards[short.url("b.tar")]["error"]


def test_a_trickling_server_meets_the_transfer_deadline(tmp_path, serve):
    """Every single read succeeds well within the socket timeout; the whole transfer must not."""
    urls = _write_shards(tmp_path, [4])
    server = serve({"slow.tar": open(urls[0], "rb").read(), "slow.png": _png(3, size=16)}, "trickle")
    for fetch in (
        lambda: list(read_shard(server.url("slow.tar"), timeout=5, deadline=1)),
        lambda: sources.load_image(sources.SourceItem(0, "k", None, server.url("slow.png")), timeout=1),
    ):
        start = time.monotonic()
        with pytest.raises(remote.TransferError, match="deadline"):
            fetch()
        assert time.monotonic() - start < 3


def test_a_complete_remote_image_is_read(serve):
    png = _png(7, size=16)
    server = serve({"ok.png": png}, "whole")
    assert remote.fetch(server.url("ok.png"), timeout=5, deadline=5) == png
    image = sources.load_image(sources.SourceItem(0, "k", None, server.url("ok.png")), timeout=5)
    assert image.size == (16, 16)
