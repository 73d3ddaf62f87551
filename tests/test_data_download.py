"""Download stage: mirror copies, checksums, safe extraction, and the HTTP path on a loopback server."""
from __future__ import annotations

import hashlib
import http.server
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from data_fakes import TREE, make_mirror, make_tree, md5, zip_folder
from mamlbench.data.download import (MIRROR_ENV, copy_from_mirror, download_omniglot, http_download,
                                     resolve_mirror, safe_extract)
from mamlbench.data import download
from mamlbench.data.errors import DataError

ARCHIVES = list(TREE)


# ---- mirror ----

def test_mirror_download_extracts_and_is_idempotent(tmp_path):
    mirror = make_mirror(tmp_path)
    out = tmp_path / "raw"
    folders = download_omniglot(out, ARCHIVES, mirror)
    assert [f.name for f in folders] == ARCHIVES
    assert len(list((out / "images_background" / "Latin" / "character01").glob("*.png"))) == 20
    before = (out / "images_background.zip").stat().st_mtime_ns
    download_omniglot(out, ARCHIVES, mirror)  # verified file kept, not fetched again
    assert (out / "images_background.zip").stat().st_mtime_ns == before
    assert not list(out.glob("*.part")) and not list(out.glob(".*extracting"))


def test_mirror_file_missing(tmp_path):
    mirror = make_mirror(tmp_path)
    (mirror / "omniglot" / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="mirror file missing: .*images_evaluation.zip"):
        download_omniglot(tmp_path / "raw", ARCHIVES, mirror)


def test_mirror_without_md5sums(tmp_path):
    mirror = make_mirror(tmp_path)
    (mirror / "omniglot" / "MD5SUMS").unlink()
    with pytest.raises(DataError, match="no MD5SUMS"):
        download_omniglot(tmp_path / "raw", ARCHIVES, mirror)


def test_checksum_mismatch_deletes_and_names_sums(tmp_path):
    src = tmp_path / "a.zip"
    src.write_bytes(b"not what was promised")
    dest = tmp_path / "out" / "a.zip"
    with pytest.raises(DataError) as err:
        copy_from_mirror(src, dest, "0" * 32)
    message = str(err.value)
    assert "a.zip" in message and "0" * 32 in message and md5(src) in message and "\n" not in message
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_resolve_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    project = tmp_path / "project"
    project.mkdir()
    assert resolve_mirror("auto", project) is None          # no ../shared/data: official URLs
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_mirror("auto", project) == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv(MIRROR_ENV, str(project))
    assert resolve_mirror("auto", project) == project       # the environment wins
    assert resolve_mirror("off", project) is None
    with pytest.raises(DataError, match="no such folder"):
        resolve_mirror(str(tmp_path / "nope"), project)


# ---- extraction ----

def _zip_with(path: Path, name: str, data: bytes = b"x", symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/fine.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name, symlink", [("../evil.txt", False), ("ok/../../evil.txt", False),
                                           ("/tmp/evil.txt", False), ("ok/link", True)])
def test_extract_refuses_escaping_members(tmp_path, name, symlink):
    archive = _zip_with(tmp_path / "bad.zip", name, b"../../../etc/passwd" if symlink else b"x", symlink)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="refusing"):
        safe_extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # checked before anything is written


def test_extract_corrupt_zip(tmp_path):
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        safe_extract(garbage, tmp_path / "dest")
    # a valid directory but a damaged member: the CRC check catches it
    good = zip_folder(make_tree(tmp_path / "tree", {"images_background": {"Latin": [1]}}) / "images_background",
                      tmp_path / "good.zip")
    raw = bytearray(good.read_bytes())
    raw[200:260] = bytes(60)
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt archive|not a readable zip"):
        safe_extract(damaged, tmp_path / "dest2")


def test_download_omniglot_rejects_corrupt_mirror_archive_without_leftovers(tmp_path):
    mirror = make_mirror(tmp_path)
    archive = mirror / "omniglot" / "images_background.zip"
    archive.write_bytes(b"junk")
    (mirror / "omniglot" / "MD5SUMS").write_text(f"{md5(archive)}  images_background.zip\n")
    out = tmp_path / "raw"
    with pytest.raises(DataError, match="not a readable zip"):
        download_omniglot(out, ["images_background"], mirror)
    assert not (out / "images_background").exists() and not list(out.glob(".*"))


# ---- HTTP, against a loopback server ----

class Server:
    """Serves one payload at any /<name>.zip; `plan` scripts the answer to each request in turn."""

    def __init__(self, payload: bytes):
        self.payload, self.plan, self.ranges = payload, [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.ranges.append(self.headers.get("Range"))
                mode = outer.plan.pop(0) if outer.plan else "ok"
                if not self.path.endswith(".zip") or mode == "404":
                    return self.send_error(404)
                if mode == "500":
                    return self.send_error(500)
                body = outer.payload if mode != "wrong" else b"Z" * len(outer.payload)
                start = 0
                if self.headers.get("Range") and mode != "no-range":
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "drop":  # half the bytes, then the connection goes away
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.zip"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    payload = bytes(range(256)) * 2000  # 512 kB
    srv = Server(payload)
    yield srv
    srv.close()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _fetch(server, tmp_path, **kw):
    return http_download(server.url, tmp_path / "file.zip", md5_bytes(server.payload), backoff=0.01, timeout=5, **kw)


def test_http_ok(server, tmp_path):
    assert _fetch(server, tmp_path).read_bytes() == server.payload


def test_http_retries_server_errors(server, tmp_path):
    server.plan = ["500", "500", "ok"]
    assert _fetch(server, tmp_path).read_bytes() == server.payload
    assert len(server.ranges) == 3


def test_http_resumes_after_a_mid_file_drop(server, tmp_path):
    server.plan = ["drop", "ok"]
    assert _fetch(server, tmp_path).read_bytes() == server.payload
    assert server.ranges[0] is None and server.ranges[1] == f"bytes={len(server.payload) // 2}-"


def test_http_restarts_when_the_server_ignores_range(server, tmp_path):
    server.plan = ["drop", "no-range"]
    assert _fetch(server, tmp_path).read_bytes() == server.payload


def test_http_404_fails_at_once(server, tmp_path):
    server.plan = ["404"]
    with pytest.raises(DataError, match="HTTP 404"):
        _fetch(server, tmp_path)
    assert len(server.ranges) == 1 and not list(tmp_path.iterdir())


def test_http_gives_up_after_retries(server, tmp_path):
    server.plan = ["500"] * 3
    with pytest.raises(DataError, match="after 3 attempts"):
        _fetch(server, tmp_path, retries=2)
    assert not (tmp_path / "file.zip").exists()


def test_http_wrong_bytes(server, tmp_path):
    server.plan = ["wrong"]
    with pytest.raises(DataError, match="md5 mismatch"):
        _fetch(server, tmp_path)
    assert not list(tmp_path.iterdir())  # neither the file nor its .part is left


def test_http_path_end_to_end_into_download_omniglot(server, tmp_path, monkeypatch):
    """The official-URL code path (no mirror), pointed at the loopback server."""
    src = make_tree(tmp_path / "src", {"images_background": {"Latin": [1, 2]}})
    server.payload = zip_folder(src / "images_background", tmp_path / "images_background.zip").read_bytes()
    monkeypatch.setattr(download, "OMNIGLOT_URL", server.url.replace("file.zip", "{name}.zip"))
    monkeypatch.setitem(download.OMNIGLOT_MD5, "images_background", md5_bytes(server.payload))
    server.plan = ["drop", "ok"]
    folders = download_omniglot(tmp_path / "raw", ["images_background"], None, backoff=0.01)
    assert len(list(folders[0].rglob("*.png"))) == 40
