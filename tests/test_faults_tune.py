"""Tuning workers that die mid-trial. A running trial heartbeats; once its worker is killed -9 another
worker fails it, ends its MLflow run FAILED and runs its settings again, and with `tune.total_trials`
the study still ends with exactly that many COMPLETE or PRUNED trials, none twice, on a journal file
and on SQLite (the two storages that need no server; a PostgreSQL/MySQL URL takes the RDB path SQLite
takes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest

from mamlbench.config import ConfigError, load_params
from mamlbench.io import FAULT_ENV
from mamlbench.tracking import experiment
from mamlbench.tune import FailStaleTrial, _this_trial, optimize, storage_for
from test_fewshot import make_glyphs
from test_tune import tiny

STORAGES = {"journal": "journal:{}/optuna.log", "sqlite": "sqlite:///{}/optuna.db"}


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> Path:
    return make_glyphs(tmp_path_factory.mktemp("glyphs"), n_classes=24, per_class=8)


@pytest.fixture(autouse=True)
def quiet_optuna():
    with warnings.catch_warnings():  # study.ask() outside optimize warns when heartbeats are on
        warnings.simplefilter("ignore", UserWarning)
        yield


def study_on(url: str, params, max_retry: int = 1, interval: int = 1, grace: int = 2) -> optuna.Study:
    storage = storage_for(url, heartbeat_interval=interval, grace_period=grace,
                          on_stale=FailStaleTrial(params, "omniglot", max_retry))
    return optuna.create_study(study_name="s", storage=storage, direction="maximize", load_if_exists=True)


@pytest.mark.parametrize("kind", STORAGES)
def test_silent_trial_is_failed_once_and_requeued(tmp_path, kind):
    """What the worker that notices a dead one does: FAIL, MLflow run FAILED, one retry, same settings."""
    params = load_params(tiny(tmp_path))
    client, experiment_id = experiment(params, "omniglot", tmp_path)
    run_id = client.create_run(experiment_id, run_name="trial0").info.run_id
    study = study_on(STORAGES[kind].format(tmp_path), params)
    dead, alive = study.ask(), study.ask()
    for trial in (dead, alive):
        trial.suggest_float("inner_lr", 0.01, 1.0, log=True)
    dead.set_user_attr("mlflow_run_id", run_id)
    dead.set_user_attr("worker_pid", 12345)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)                                   # > grace_period: `dead` went silent ...
    study._storage.record_heartbeat(alive._trial_id)  # ... while `alive` still beats
    optuna.storages.fail_stale_trials(study)
    optuna.storages.fail_stale_trials(study_on(STORAGES[kind].format(tmp_path), params))  # a second worker: no-op

    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    retry = trials[2]
    assert retry.params == trials[0].params and retry.system_attrs["failed_trial"] == 0
    assert "mlflow_run_id" not in retry.user_attrs and "worker_pid" not in retry.user_attrs
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"
    assert "12345" in run.data.tags["failure_reason"]


def test_study_wide_budget_takes_over_a_dead_workers_trial(tmp_path):
    """With total_trials 4 and one trial left RUNNING by a dead worker, this worker runs 3, waits for that
    one to go stale, runs its retry and stops at exactly 4 finished trials."""
    params = load_params(tiny(tmp_path, total_trials=4, n_trials=50, heartbeat_interval=1, grace_period=2),
                         overrides={"tracking.enabled": False})
    study = study_on(f"journal:{tmp_path}/optuna.log", params)
    dead = study.ask()
    dead.suggest_float("x", 0.0, 1.0)

    def run(trial: optuna.Trial) -> float:
        _this_trial(trial, params.tune)
        return trial.suggest_float("x", 0.0, 1.0)

    optimize(study, run, params.tune)
    trials = study.get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert trials[0].state.name == "FAIL" and len(done) == 4
    assert [t.system_attrs.get("failed_trial") for t in done].count(0) == 1
    assert {t.params["x"] for t in done} >= {trials[0].params["x"]}


def test_grace_period_must_exceed_heartbeat_interval(tmp_path):
    with pytest.raises(ConfigError, match=r"^tune\.grace_period = 5: must exceed heartbeat_interval"):
        load_params(tiny(tmp_path, heartbeat_interval=10, grace_period=5))


def _start(params: Path, glyphs: Path, worker: int, log: Path, fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", FAULT_ENV)}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(params.parent)})
    if fault:
        env[FAULT_ENV] = fault
    args = [sys.executable, "-m", "mamlbench.cli", "tune", "omniglot", "--params", str(params), "--worker", str(worker),
            "--prepared", str(glyphs / "prepared"), "--episodes", str(glyphs / "episodes")]
    return subprocess.Popen(args, cwd=params.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(what, timeout: float, procs=(), logs=()):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    raise AssertionError("timed out or a worker exited:\n" + "\n".join(Path(f).read_text()[-3000:] for f in logs))


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORAGES)
def test_four_workers_one_killed_mid_trial(tmp_path, glyphs, kind):
    total = 8
    url = STORAGES[kind].format(tmp_path)
    params_path = tiny(tmp_path, storage=url, total_trials=total, n_trials=total, heartbeat_interval=1,
                       grace_period=5, max_retry=1, space={"inner_lr": [0.05, 1.0], "inner_steps": [1, 2],
                                                           "eval_steps": [1, 2]})
    params = load_params(params_path)
    client, experiment_id = experiment(params, "omniglot", tmp_path)  # create the MLflow store once
    logs = [tmp_path / f"worker{k}.log" for k in range(4)]
    # The victim starts first and pauses for good right after its first trial's first validation, inside
    # the trial (its heartbeat thread still beating); then three more workers join the study.
    victim = _start(params_path, glyphs, 3, logs[3], fault="before-write:best.pt")
    others: list[subprocess.Popen] = []
    store = storage_for(url)

    def study() -> optuna.Study:
        return optuna.load_study(study_name="omniglot-maml-5w1s", storage=store)

    try:
        _wait(lambda: "fault: paused at before-write" in logs[3].read_text(), 300, [victim], [logs[3]])
        running = [t for t in study().get_trials() if t.state.name == "RUNNING"]
        assert [t.user_attrs["worker_pid"] for t in running] == [victim.pid] and running[0].user_attrs["mlflow_run_id"]
        killed = running[0]
        others = [_start(params_path, glyphs, k, logs[k]) for k in range(3)]
        # The victim, alive but silent in its trial for longer than grace_period by now, is not failed
        # while the others finish two trials ...
        _wait(lambda: sum(t.state.name in ("COMPLETE", "PRUNED") for t in study().get_trials()) >= 2, 300,
              others, logs)
        assert study().get_trials()[killed.number].state.name == "RUNNING"
        victim.send_signal(signal.SIGKILL)  # ... and is, once killed
        victim.wait()
        for proc in others:
            proc.wait(timeout=300)
    finally:
        for proc in [victim, *others]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(p.returncode == 0 for p in others), "\n".join(f.read_text()[-3000:] for f in logs)

    trials = study().get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost
    assert trials[killed.number].state.name == "FAIL"
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == total
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state.name in ("COMPLETE", "PRUNED")
    assert len({tuple(sorted(t.params.items())) for t in done}) == total   # no settings finished twice
    others_failed = [t for t in trials if t.state.name == "FAIL" and t.number != killed.number]
    assert all(t.user_attrs.get("surplus") for t in others_failed)   # only budget overshoot, never run
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]

    children = [r for r in client.search_runs([experiment_id]) if "optuna_trial" in r.data.tags]
    finished = [r for r in children if r.data.tags.get("optuna_state") in ("COMPLETE", "PRUNED")]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in finished) == sorted(t.number for t in done)
    assert all(r.info.status == "FINISHED" for r in finished)
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and dead.data.tags["optuna_state"] == "FAIL"
    assert [r.data.tags.get("optuna_retry_of") for r in children].count(str(killed.number)) == 1
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert len(children) == total + 1   # the killed trial's run and one per finished trial
