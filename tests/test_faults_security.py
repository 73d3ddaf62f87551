"""Hostile inputs: a checkpoint whose pickle carries a payload (even with a valid sha256 trailer) is
refused and its payload never runs; archive members that would land outside the target are
refused (beyond tests/test_data_download.py); the docs' dashboards bind to 127.0.0.1 only."""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import stat
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from mamlbench.data.download import safe_extract
from mamlbench.data.errors import DataError
from mamlbench.io import DIGEST_TAG, load_torch, save_torch
from mamlbench.train import Checkpointer

MARKER = Path("/tmp") / f"mamlbench-payload-ran-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"


class Payload:
    """Unpickling this would create MARKER."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


def crafted(path: Path, state: dict, trailer: bool) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    if trailer:  # an attacker can compute the digest too: the digest is integrity, weights_only is safety
        payload += DIGEST_TAG + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize("trailer", [True, False])
def test_payload_checkpoint_is_refused_and_never_runs(tmp_path, trailer, capfd):
    MARKER.unlink(missing_ok=True)
    ckpts = Checkpointer(tmp_path, "fp")
    ckpts.save({"iteration": 10, "learner": {"w": torch.ones(2)}})
    evil = crafted(tmp_path / "ckpt-00000020.pt", {"iteration": 20, "learner": Payload(), "fingerprint": "fp"}, trailer)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global|sha256 trailer"):
        load_torch(evil, require_digest=not trailer)
    state = ckpts.latest()
    assert state["iteration"] == 10 and torch.equal(state["learner"]["w"], torch.ones(2))
    assert f"warning: skipping unreadable checkpoint {evil}" in capfd.readouterr().err
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"learner": Payload()}))              # a bare pickle, not a torch archive
    with pytest.raises(Exception):
        load_torch(raw)
    assert not MARKER.exists(), "the payload ran"


def test_verified_files_still_round_trip(tmp_path):
    save_torch(tmp_path / "m.pt", {"w": torch.arange(3.0), "meta": {"n": [1, 2]}})
    assert load_torch(tmp_path / "m.pt", require_digest=True)["meta"] == {"n": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3.0))


def _zip(path: Path, members: list[tuple[str, bytes, bool]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, symlink in members:
            info = zipfile.ZipInfo(name)
            if symlink:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("members", [
    [("..\\..\\evil.txt", b"x", False)],                                   # Windows separators
    [("C:/evil.txt", b"x", False)],                                        # a drive letter
    [("ok/./../../evil.txt", b"x", False)],
    [("ok/link", b"/tmp", True), ("ok/link/evil.txt", b"x", False)],      # write through an escaping link
    [("ok/inside", b"fine.txt", True)],                                    # even a link that stays inside
    [("ok/fine.txt", b"ok", False), ("/abs/evil.txt", b"x", False)],      # a bad member after good ones
])
def test_extract_refuses_more_escapes_before_writing_anything(tmp_path, members):
    archive = _zip(tmp_path / "bad.zip", members)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="refusing"):
        safe_extract(archive, dest)
    assert not dest.exists() or not any(dest.rglob("*"))
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_readme_dashboards_bind_to_loopback_only():
    text = (ROOT / "README.md").read_text()
    segments = [part.split("#")[0] for line in text.splitlines() for part in re.split(r"&&|;|\|", line)]
    commands = [c for c in segments if re.match(r"\s*(\$ )?(mlflow (ui|server)|optuna-dashboard)\b", c)]
    assert any(c.strip().startswith("mlflow") for c in commands), "README shows how to open the MLflow UI"
    for command in commands:
        assert re.search(r"--host[ =]127\.0\.0\.1\b", command), command
    assert "0.0.0.0" not in text
