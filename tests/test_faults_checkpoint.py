"""Corrupted, cut and stray checkpoint files: each is detected by its sha256 trailer, reported on
stderr with its name, and training falls back to the previous good checkpoint, ending exactly
where an undisturbed run ends."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import write_params
from mamlbench import runs, sinusoid
from mamlbench.config import load_params
from mamlbench.io import TRAILER_LEN, CorruptFile, load_torch, save_torch


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """An undisturbed 40-iteration run (checkpoints 30 and 40 kept) and its params."""
    folder = tmp_path_factory.mktemp("trained")
    params = write_params(folder / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"enabled": False},
        "sinusoid": {"train": {"iterations": 40, "checkpoint_every": 10, "log_every": 5, "meta_batch_size": 5}}})
    runs.train_sinusoid(params, "maml", folder / "run", progress=False)
    return params, folder / "run"


def copy_run(trained, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    return run


def same_model(a: Path, b: Path) -> bool:
    sa, sb = load_torch(a / "model.pt")["state_dict"], load_torch(b / "model.pt")["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_flip_inside_tensor_data_passes_torch_load_but_not_the_digest(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "ckpt-00000040.pt"
    raw = bytearray(path.read_bytes())
    weight = max(load_torch(path)["learner"].values(), key=torch.Tensor.numel)  # the 40x40 hidden layer
    at = raw.find(weight.numpy().tobytes())
    assert at > 0, "the tensor's bytes are stored verbatim in the archive"
    raw[at + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    silently_wrong = torch.load(path, weights_only=True)  # torch alone reads a different tensor without complaint
    assert not all(torch.equal(a, b) for a, b in zip(silently_wrong["learner"].values(),
                                                     load_torch(trained[1] / "checkpoints" / path.name)["learner"].values()))
    with pytest.raises(CorruptFile, match="sha256 mismatch"):
        load_torch(path)


@pytest.mark.slow   # 20-40 s: `pytest -m "not slow"` stays under 5 minutes
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_or_cut_is_detected_and_skipped(trained, tmp_path_factory, data):
    run = copy_run(trained, tmp_path_factory.mktemp("flip"))
    path = run / "checkpoints" / "ckpt-00000040.pt"
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="cut"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep bytes")]
    else:
        at = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile, match=str(path).replace(".", r"\.")):
        load_torch(path, require_digest=True)
    state = sinusoid.checkpointer(load_params(trained[0]), "maml", run).latest()
    assert state["iteration"] == 30


def test_corrupted_newest_checkpoint_is_reported_and_training_falls_back(trained, tmp_path, capfd):
    params, straight = trained
    run = copy_run(trained, tmp_path)
    for name in ("model.pt", "curve.csv", "train.json"):
        (run / name).unlink()                       # as if killed after the last checkpoint
    newest = run / "checkpoints" / "ckpt-00000040.pt"
    newest.write_bytes(newest.read_bytes()[:-TRAILER_LEN - 100])  # cut: the end of the zip and the trailer
    out = runs.train_sinusoid(params, "maml", run, progress=False)
    assert out["resumed_from"] == 30
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "CorruptFile" in warnings[0]
    assert same_model(straight, run)
    assert (straight / "curve.csv").read_text() == (run / "curve.csv").read_text()


def test_every_checkpoint_corrupt_restarts_from_zero_and_still_ends_the_same(trained, tmp_path):
    params, straight = trained
    run = copy_run(trained, tmp_path)
    for path in (run / "checkpoints").glob("ckpt-*.pt"):
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 1
        path.write_bytes(bytes(raw))
    assert runs.train_sinusoid(params, "maml", run, progress=False)["resumed_from"] == 0
    assert same_model(straight, run)


def test_stray_and_stale_files_are_never_read_and_stale_temps_are_cleaned(trained, tmp_path):
    params, _ = trained
    run = copy_run(trained, tmp_path)
    folder = run / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = folder / f".ckpt-00000050.pt.{dead_pid}.abc123.tmp"      # a writer killed mid-write
    save_torch(stale, {"iteration": 50})
    (folder / "ckpt-00000060.pt.tmp").write_bytes(b"half")         # not the checkpoint pattern
    (folder / "ckpt-00000070.pt").write_bytes(b"")                  # empty: no digest
    ckpts = sinusoid.checkpointer(load_params(params), "maml", run)
    assert ckpts.latest()["iteration"] == 40
    ckpts.discard_foreign()
    assert not stale.exists() and (folder / "ckpt-00000060.pt.tmp").exists()
    assert ckpts.latest()["iteration"] == 40
