"""Interruptions of a real `mamlbench train` (issue 20, round two): a second training on the same run
folder, kill -9 before the first checkpoint, SIGTERM and SIGINT, a tracking server that dies mid-run.
No MLflow run is left RUNNING, every stop is one line, and a dead server never stalls training."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import write_params
from mamlbench.io import FAULT_ENV


def tiny(tmp_path: Path, iterations: int = 60, tracked: bool = True, **train) -> Path:
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"} if tracked else {"enabled": False}
    return write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": tracking,
        "sinusoid": {"train": {"iterations": iterations, "checkpoint_every": 20, "log_every": 10,
                               "meta_batch_size": 5, **train}}})


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", FAULT_ENV)}
    out.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return out


def train(params: Path, run_dir: Path, cwd: Path, **kw):
    return [sys.executable, "-m", "mamlbench.cli", "train", "sinusoid", "-p", str(params), "--run-dir", str(run_dir),
            "--no-progress"]


def statuses(tmp_path: Path) -> dict[str, str]:
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mamlbench-sinusoid")
    return {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.mark.slow   # ~13 s: `pytest -m "not slow"` stays under 5 minutes
def test_a_second_training_on_the_folder_is_refused_and_a_killed_runs_mlflow_run_is_closed(tmp_path):
    params, run = tiny(tmp_path), tmp_path / "run"
    first = subprocess.Popen(train(params, run, tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env(**{FAULT_ENV: "before-write:ckpt-*"}))
    try:
        line = first.stderr.readline()
        while "fault: paused" not in line:
            assert line, "the first training ended before its first checkpoint"
            line = first.stderr.readline()
        second = subprocess.run(train(params, run, tmp_path), cwd=tmp_path, capture_output=True, text=True,
                                env=env(), timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        (message,) = errors(second.stderr)
        assert f"another training (pid {first.pid})" in message and str(run) in message
        assert list(statuses(tmp_path).values()) == ["RUNNING"]    # the first one's, and no second run opened
    finally:
        first.kill()                                                 # kill -9 before any checkpoint exists
        first.wait()
    assert not list((run / "checkpoints").glob("ckpt-*.pt"))
    (killed,) = statuses(tmp_path)
    again = subprocess.run(train(params, run, tmp_path), cwd=tmp_path, capture_output=True, text=True, env=env(),
                           timeout=300)
    assert again.returncode == 0, again.stderr                      # the lock died with its process
    after = statuses(tmp_path)
    assert after.pop(killed) == "KILLED" and list(after.values()) == ["FINISHED"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_in_one_line_keep_the_checkpoint_and_end_the_run_killed(tmp_path, signum, code):
    params, run = tiny(tmp_path, iterations=1_000_000), tmp_path / "run"
    proc = subprocess.Popen(train(params, run, tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for(lambda: list((run / "checkpoints").glob("ckpt-*.pt")) or proc.poll() is not None, what="a checkpoint")
        time.sleep(0.5)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code and "Traceback" not in err, err
    (message,) = errors(err)
    name = signal.Signals(signum).name
    assert message.startswith(f"error: interrupted by {name}: sinusoid maml stopped at iteration "), message
    assert "the last good checkpoint is kept" in message and "rerun the same command to resume" in message
    assert list(statuses(tmp_path).values()) == ["KILLED"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_never_stalls_training(tmp_path):
    """A real `mlflow server` on 127.0.0.1, killed once training has logged to it: training goes on to the
    end within bounded retries, warns once, and keeps the metrics in a local fallback file."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_for(up, timeout=120, what="mlflow server")
        params, run = tiny(tmp_path, iterations=3000, tracked=False), tmp_path / "run"
        params.write_text(params.read_text().replace("enabled: false", "enabled: true"))
        started = time.monotonic()
        proc = subprocess.Popen(train(params, run, tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env(MLFLOW_TRACKING_URI=uri))
        wait_for(lambda: list((run / "checkpoints").glob("ckpt-*.pt")) or proc.poll() is not None, what="a checkpoint")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        out, err = proc.communicate(timeout=300)
    finally:
        with_suppress_kill(server)
    assert proc.returncode == 0 and "Traceback" not in err, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: tracking store stopped answering")]
    assert len(warnings) == 1 and "mlruns-offline" in warnings[0]
    assert (run / "model.pt").is_file() and "trained sinusoid maml: 3000 iterations" in out
    fallback = list((tmp_path / "mlruns-offline").glob("*.jsonl"))
    assert len(fallback) == 1 and '"status": "FINISHED"' in fallback[0].read_text()
    assert time.monotonic() - started < 240


def with_suppress_kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


STARTER = """
import sys, time
from mamlbench.config import load_params
from mamlbench.tracking import experiment
params = load_params(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
client, experiment_id = experiment(params, "sinusoid", root=sys.argv[3])
print(experiment_id)
"""


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_sqlite_store_share_one_experiment(tmp_path):
    # without a lock MLflow's table creation races: "table alembic_version already exists"
    params = write_params(tmp_path / "params.yaml", {"tracking": {"enabled": True}})
    start = time.time() + 8  # every process imported and waiting, then all touch the new store at once
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(params), str(start), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-600:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, not one per process
