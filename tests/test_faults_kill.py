"""Kill -9 during `mamlbench train`, at named points of a file write and at random times: every
rerun resumes, the end result equals an uninterrupted run bit for bit, and no partial checkpoint,
metrics file or model is ever read as valid (temporary files never match what readers look for,
and a killed writer's are cleaned by the next run)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_params
from mamlbench.config import load_params
from mamlbench.io import FAULT_ENV, load_torch
from mamlbench.sinusoid import checkpointer


def tiny(tmp_path: Path, tracked: bool = False, **train) -> Path:
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"} if tracked else {"enabled": False}
    return write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": tracking,
        "sinusoid": {"train": {"iterations": 100, "checkpoint_every": 20, "log_every": 10, "meta_batch_size": 5,
                               **train}}})


def cmd(params: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mamlbench.cli", "train", "sinusoid", "-p", str(params), "--run-dir", str(run_dir),
            "--no-progress"]


def env(fault: str | None = None) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", FAULT_ENV)}
    out.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    if fault:
        out[FAULT_ENV] = fault
    return out


def run_to_end(params: Path, run_dir: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd(params, run_dir), capture_output=True, text=True, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def kill_at(params: Path, run_dir: Path, fault: str, while_paused=None) -> str:
    """Start training with MAMLBENCH_FAULT=`fault`, wait until it pauses there, call `while_paused`, kill -9."""
    proc = subprocess.Popen(cmd(params, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(fault))
    seen = []
    try:
        while True:
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"never paused at {fault} (exit {proc.wait()}): {''.join(seen)}")
            seen.append(line)
            if line.startswith("fault: paused at"):
                break
        if while_paused is not None:
            while_paused()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return "".join(seen)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def assert_same_result(a: Path, b: Path) -> None:
    sa, sb = load_torch(a / "model.pt")["state_dict"], load_torch(b / "model.pt")["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert (a / "curve.csv").read_bytes() == (b / "curve.csv").read_bytes()
    def results(run: Path) -> dict:  # the provenance differs: wall time, where it resumed
        return {k: v for k, v in json.loads((run / "train.json").read_text()).items() if k != "provenance"}
    assert results(a) == results(b)


@pytest.mark.slow   # ~19 s: `pytest -m "not slow"` stays under 5 minutes
def test_kill_at_each_point_of_a_write_resumes_bit_exact(tmp_path):
    params = tiny(tmp_path)
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_to_end(params, straight)
    ckpts = checkpointer(load_params(params), "maml", run)

    def mid_write_of_40():
        partial = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".ckpt-00000040.pt.")]
        assert len(partial) == 1 and partial[0].name.endswith(".tmp")
        assert partial[0].stat().st_size > 0            # half a checkpoint is on disk ...
        assert [p.name for p in ckpts.paths()] == ["ckpt-00000020.pt"]
        assert ckpts.latest()["iteration"] == 20        # ... and a concurrent reader never sees it

    kill_at(params, run, "mid-write:ckpt-00000040.pt", mid_write_of_40)
    assert temps(run) and not (run / "model.pt").exists()

    # killed with checkpoint 60 complete under its temporary name, not yet renamed
    kill_at(params, run, "before-rename:ckpt-00000060.pt",
            lambda: assert_latest(ckpts, 40, ["ckpt-00000020.pt", "ckpt-00000040.pt"]))
    # killed right after checkpoint 80 was renamed, before the old ones were pruned
    kill_at(params, run, "after-rename:ckpt-00000080.pt",
            lambda: assert_latest(ckpts, 80, ["ckpt-00000040.pt", "ckpt-00000060.pt", "ckpt-00000080.pt"]))
    # killed while writing the learning curve, after the last checkpoint and model.pt
    kill_at(params, run, "mid-write:curve.csv", lambda: (
        assert_latest(ckpts, 100, ["ckpt-00000080.pt", "ckpt-00000100.pt"]),
        assert_not_written(run / "curve.csv"), assert_not_written(run / "train.json")))
    assert any(name.startswith(".curve.csv.") for name in temps(run))

    out = run_to_end(params, run)
    assert "resumed at 100" in out.stdout
    assert_same_result(straight, run)
    assert temps(run) == [], "a killed writer's temporary files are cleaned by the next run"


def assert_latest(ckpts, iteration: int, names: list[str]) -> None:
    assert [p.name for p in ckpts.paths()] == names
    assert ckpts.latest()["iteration"] == iteration


def assert_not_written(path: Path) -> None:
    assert not path.exists(), f"{path} exists while its writer is paused mid-write"


@pytest.mark.slow
def test_random_kills_with_mlflow_resume_bit_exact_and_log_each_step_once_per_value(tmp_path):
    """Kill -9 at random moments of a run that checkpoints every iteration, six times over."""
    import mlflow

    params = tiny(tmp_path, tracked=True, iterations=60, checkpoint_every=1, log_every=2)
    straight, run = tmp_path / "straight", tmp_path / "run"
    start = time.perf_counter()
    run_to_end(params, straight)
    duration = time.perf_counter() - start
    rng = random.Random(8)
    resumed_from = []
    for _ in range(6):
        proc = subprocess.Popen(cmd(params, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate()
        resumed_from += [int(m) for m in re.findall(r"resumed at (\d+)", stdout)]
        if proc.returncode == 0:
            break
    out = run_to_end(params, run)
    # a killed process never reaches its closing line; the run that finishes says where it resumed
    resumed_from += [int(m) for m in re.findall(r"resumed at (\d+)", out.stdout)]
    assert_same_result(straight, run)
    assert temps(run) == []

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("mamlbench-sinusoid").experiment_id])
    # the resumed process reopens its own MLflow run (its id travels in the checkpoint); a process
    # killed before its first checkpoint leaves a RUNNING run no checkpoint names, never a second FINISHED one
    finished = [r for r in found if r.info.status == "FINISHED"]
    assert len(finished) == 2, [r.info.status for r in found]
    a, b = ({(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "meta_train/query_loss")}
            for r in finished)
    # a resumed run logs again the steps after its checkpoint: the same values, and none missing
    assert a == b and {step for step, _ in a} == set(range(2, 61, 2))
    assert len(resumed_from) >= 1, out.stdout
