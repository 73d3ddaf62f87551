"""Download faults beyond tests/test_data_download.py: a server that keeps dropping or stalls, a
poisoned partial file, wrong bytes and error codes through the whole download stage. Each gives
retries and then one clear `DataError`, and never leaves a file that a later step accepts."""
from __future__ import annotations

import hashlib
import http.server
import threading
import time

import pytest

from data_fakes import make_tree, zip_folder
from mamlbench.data import download
from mamlbench.data.download import download_omniglot, http_download
from mamlbench.data.errors import DataError
from mamlbench.data.omniglot import list_characters


class Server:
    """Loopback (127.0.0.1) server of one payload; `plan` scripts the answer to each request in turn."""

    def __init__(self, payload: bytes):
        self.payload, self.plan, self.requests = payload, [], 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests += 1
                mode = outer.plan.pop(0) if outer.plan else "ok"
                if mode in ("404", "500"):
                    return self.send_error(int(mode))
                body = outer.payload if mode != "wrong" else bytes(b ^ 0xFF for b in outer.payload)
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                if mode != "no-length":
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "stall":                  # headers, a little data, then silence
                    self.wfile.write(body[start:start + 10])
                    self.wfile.flush()
                    time.sleep(1.0)
                    return
                if mode in ("drop", "no-length"):    # a part of the body, then the connection goes away
                    self.wfile.write(body[start:start + 1000])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/images_background.zip"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


@pytest.fixture
def archive(tmp_path):
    src = make_tree(tmp_path / "src", {"images_background": {"Latin": [1, 2]}})
    return zip_folder(src / "images_background", tmp_path / "images_background.zip").read_bytes()


@pytest.fixture
def server(monkeypatch, archive):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = Server(archive)
    monkeypatch.setattr(download, "OMNIGLOT_URL", srv.url.replace("images_background", "{name}"))
    monkeypatch.setitem(download.OMNIGLOT_MD5, "images_background", hashlib.md5(archive).hexdigest())
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def stage(tmp_path, retries: int = 2):
    return download_omniglot(tmp_path / "raw", ["images_background"], None, retries=retries, backoff=0.01)


def accepted(tmp_path) -> list[str]:
    """What a later step could take for a finished download: the zip or the extracted folder."""
    raw = tmp_path / "raw"
    return [p.name for p in (raw / "images_background.zip", raw / "images_background") if p.exists()]


def test_a_server_that_keeps_dropping_gives_up_clearly_then_a_rerun_resumes(server, tmp_path):
    server.plan = ["drop"] * 3
    with pytest.raises(DataError, match=r"images_background\.zip: download failed after 3 attempts "
                                        r"\(connection dropped at byte \d+"):
        stage(tmp_path)
    assert server.requests == 3 and accepted(tmp_path) == []
    part = tmp_path / "raw" / "images_background.zip.part"
    assert part.stat().st_size == 3000           # kept only under the .part name, to resume from
    folders = stage(tmp_path)                     # the server is back: resume from byte 3000, verify, extract
    assert len(list(folders[0].rglob("*.png"))) == 40 and not part.exists()


def test_a_stalled_server_times_out_and_is_retried(server, tmp_path):
    server.plan = ["stall", "stall"]
    with pytest.raises(DataError, match="after 2 attempts"):
        http_download(server.url, tmp_path / "f.zip", hashlib.md5(server.payload).hexdigest(),
                      retries=1, backoff=0.01, timeout=0.3)
    assert not (tmp_path / "f.zip").exists()


def test_a_poisoned_partial_file_is_caught_deleted_and_refetched(server, tmp_path):
    server.plan = ["drop"]                   # the resume appends the right bytes after the wrong ones
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "images_background.zip.part").write_bytes(b"\x00" * 500)   # left by some earlier, bad source
    with pytest.raises(DataError, match="md5 mismatch .*the file was deleted"):
        stage(tmp_path)
    assert accepted(tmp_path) == [] and not list(raw.iterdir())
    assert len(list(stage(tmp_path)[0].rglob("*.png"))) == 40       # a rerun starts clean


@pytest.mark.parametrize("plan, error", [
    (["404"], r"HTTP 404"),
    (["500"] * 3, r"after 3 attempts \(HTTP 500\)"),
    (["wrong"], r"md5 mismatch"),
    (["no-length"], r"md5 mismatch"),     # a 200 without Content-Length, closed early: the size is unknown
])
def test_download_stage_faults_leave_nothing_a_later_step_accepts(server, tmp_path, plan, error):
    server.plan = list(plan)
    with pytest.raises(DataError, match=error) as err:
        stage(tmp_path)
    assert "\n" not in str(err.value)
    assert accepted(tmp_path) == []
    assert not [p for p in (tmp_path / "raw").iterdir() if not p.name.endswith(".part")]
    with pytest.raises(DataError, match="archive folder missing"):   # the next step (prepare) refuses to start
        list_characters(tmp_path / "raw", ["images_background"], expected={})
