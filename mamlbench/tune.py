"""Optuna tuning of a few-shot cell's inner loop: inner lr (log), inner steps, evaluation steps and the
variant's own knobs, maximising accuracy on the fixed validation episodes.

    mamlbench tune omniglot --algorithm maml --setting 5w1s --out tuned/omniglot-maml-5w1s
    mamlbench tune omniglot --storage journal:optuna.log --worker 1 &   # more workers, one study
    optuna-dashboard sqlite:///optuna.db --host 127.0.0.1              # pip install -e ".[dashboard]"

Each trial meta-trains for `tune.iterations` meta-updates (in a temporary folder) and reports the
validation accuracy every `tune.validate_every`; the pruner (median or Hyperband) stops poor trials
there. A trial whose loss turns NaN (`TrainingDiverged`) ends FAIL and the study goes on. Every trial
is an MLflow run nested under the study's parent run. The best trial's settings are written as a
params file (a `tuned_<algorithm>_<setting>` profile extending the current one) that `mamlbench
train --params` and `dvc exp run` use as they are.

Workers on several processes or machines share the study through its storage. A running trial
heartbeats every `tune.heartbeat_interval` s; when its worker dies (killed -9, machine lost) another
worker, at its next trial, finds it silent for `tune.grace_period` s, fails it, ends its MLflow run
FAILED and re-queues its settings (`tune.max_retry`). With `tune.total_trials` the workers run until
that many trials are COMPLETE or PRUNED, so the dead worker's share is taken over.

References: Akiba et al., "Optuna", KDD 2019; Li et al., "Hyperband", JMLR 2018.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from mamlbench import fewshot, rng
from mamlbench.config import Params, TuneParams, load_params, read_raw
from mamlbench.io import write_json, write_text
from mamlbench.tracking import experiment, start_run
from mamlbench.train import TrainingDiverged

PARENT_ATTR = "mlflow_parent_run_id"
HEARTBEAT_ATTR = "mamlbench:heartbeat"
RUN_ATTRS = ("mlflow_run_id", "worker", "worker_pid", "worker_host")  # a retry gets its own
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (*DONE, TrialState.RUNNING, TrialState.WAITING)


class StudyFull(Exception):
    """The study-wide budget was met while this trial was being created: it ends FAIL without running."""


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file with heartbeats, which Optuna 5.0 has only for RDB storages: each beat is a trial
    system attribute holding the writer's wall clock, so the machines' clocks must agree (NTP) to well
    within `grace_period`."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int | None = None, on_stale=None):
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period, self.on_stale = heartbeat_interval, grace_period, on_stale

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period or 2 * self.heartbeat_interval
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else now  # a retry inherits old beats
            if now - max(started, t.system_attrs.get(HEARTBEAT_ATTR, 0.0)) > grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.on_stale


class FailStaleTrial:
    """Run by the worker that finds a trial stale (its worker stopped heartbeating): ends the trial's
    MLflow run FAILED, so the UI does not show it running forever, and re-queues its settings."""

    def __init__(self, params: Params, benchmark: str, max_retry: int, root: str | Path = "."):
        self.params, self.benchmark, self.max_retry, self.root = params, benchmark, max_retry, root

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.max_retry > 0:
            queued = copy.deepcopy(trial)
            queued.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS}
            queued.system_attrs.pop(HEARTBEAT_ATTR, None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)(study, queued)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.params.tracking.enabled:
            with contextlib.suppress(Exception):  # a lost run must not stop this worker's study
                client, _ = experiment(self.params, self.benchmark, self.root)
                client.set_tag(run_id, "optuna_state", "FAIL")
                client.set_tag(run_id, "failure_reason", f"worker {trial.user_attrs.get('worker_pid')} on "
                               f"{trial.user_attrs.get('worker_host')} stopped heartbeating")
                client.set_terminated(run_id, status="FAILED")


def storage_for(url: str | None, root: str | Path = ".", *, heartbeat_interval: int | None = None,
                grace_period: int | None = None, on_stale=None):
    """An Optuna storage: null -> sqlite:///optuna.db; `journal:<file>` -> a journal file; else an RDB URL.

    With `heartbeat_interval`, running trials heartbeat and `on_stale` runs for each one found silent."""
    if url is None:
        url = f"sqlite:///{(Path(root) / 'optuna.db').as_posix()}"
    beat = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period) if heartbeat_interval else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0
        warnings.simplefilter("ignore", ExperimentalWarning)
        if url.startswith("journal:"):
            backend = JournalFileBackend(url[len("journal:"):])
            return HeartbeatJournalStorage(backend, **beat, on_stale=on_stale) if beat else JournalStorage(backend)
        if beat:
            beat["heartbeat_stale_trial_callback"] = on_stale
        if url.startswith("sqlite:"):  # several processes on one file: wait for the lock instead of failing
            return _serializable(_rdb(url, engine_kwargs={"connect_args": {"timeout": 120}}, **beat))
        return _rdb(url, **beat)


def _rdb(url: str, attempts: int = 5, **kwargs) -> optuna.storages.RDBStorage:
    """`RDBStorage`, retried: workers that start together on a new database race to create its schema
    (seen: "UNIQUE constraint failed: alembic_version.version_num"); the loser finds it made."""
    import sqlalchemy.exc
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _serializable(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Make every SQLite transaction take the write lock when it begins (`BEGIN IMMEDIATE`).

    Optuna claims a queued trial (a retry) by reading it WAITING and writing it RUNNING, relying on
    `SELECT ... FOR UPDATE`, which SQLite ignores: two workers could both read WAITING and run the
    same trial (seen once in 4-worker runs: "Cannot tell a PRUNED trial"). SQLAlchemy's recipe for
    pysqlite: leave transactions to SQLAlchemy and begin them IMMEDIATE, so read-then-write is atomic.
    """
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _no_implicit_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()   # pooled connections made before the hooks: reconnect with them
    return storage


def suggest(trial: optuna.Trial, tune: TuneParams, benchmark: str, algorithm: str) -> dict[str, Any]:
    """The trial's settings as dotted params keys, at the variant's per-benchmark level, which only a
    per-cell override outranks (`config.fewshot_cell`)."""
    space = tune.space
    key = f"variants.{algorithm}.{benchmark}"
    out: dict[str, Any] = {
        f"{key}.train.inner_lr": trial.suggest_float("inner_lr", *space.inner_lr, log=True),
        f"{key}.train.inner_steps": trial.suggest_int("inner_steps", *space.inner_steps),
        f"{key}.evaluate.inner_steps": trial.suggest_int("eval_steps", *space.eval_steps),
    }
    if algorithm == "metasgd":
        out["variants.metasgd.options.init_inner_lr"] = trial.suggest_float(
            "init_inner_lr", *space.metasgd_init_inner_lr, log=True)
    if algorithm == "mamlpp":
        for flag in space.mamlpp_flags:
            out[f"variants.mamlpp.options.{flag}"] = trial.suggest_categorical(flag, [True, False])
    return out


def _budget(tune: TuneParams, benchmark: str, algorithm: str) -> dict[str, Any]:
    """Per-trial budget, at the variant's per-benchmark level so no profile or setting override outranks it."""
    key = f"variants.{algorithm}.{benchmark}.train"
    return {f"{key}.iterations": tune.iterations, f"{key}.validate_every": tune.validate_every,
            f"{key}.n_val_episodes": tune.n_val_episodes, f"{key}.checkpoint_every": tune.iterations,
            f"{key}.log_every": tune.validate_every}


def _pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.n_startup_trials, n_warmup_steps=0)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=tune.validate_every, max_resource=tune.iterations,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(params: Params, benchmark: str, algorithm: str, setting: str, worker: int = 0,
               root: str | Path = ".") -> tuple[optuna.Study, str | None]:
    """Create or join the study; the process that creates it also opens its MLflow parent run."""
    tune = params.tune
    name = tune.study or f"{benchmark}-{algorithm}-{setting}"
    storage = storage_for(tune.storage, root, heartbeat_interval=tune.heartbeat_interval,
                          grace_period=tune.grace_period,
                          on_stale=FailStaleTrial(params, benchmark, tune.max_retry, root))
    # Workers sharing a study get different seeds, else their random start-up trials would coincide.
    sampler = optuna.samplers.TPESampler(seed=rng.derive_seed(tune.sampler_seed, "tune", worker) % 2**32,
                                         n_startup_trials=tune.n_startup_trials)
    kwargs = dict(study_name=name, storage=storage, sampler=sampler, pruner=_pruner(tune))
    try:
        study = optuna.create_study(direction="maximize", **kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        created = False
    if not params.tracking.enabled:
        return study, None
    if created:
        client, experiment_id = experiment(params, benchmark, root)
        parent = client.create_run(experiment_id, run_name=f"tune-{name}", tags={
            "optuna_study": name, "variant": algorithm, "setting": setting, "stage": "tune"}).info.run_id
        study.set_user_attr(PARENT_ATTR, parent)
        return study, parent
    for _ in range(600):  # the creating worker sets it right after creating the study
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent:
            return study, parent
        time.sleep(0.1)
        study = optuna.load_study(**kwargs)
    return study, None


def _in_budget(trials: list[optuna.trial.FrozenTrial], tune: TuneParams) -> list[optuna.trial.FrozenTrial]:
    """The trials that hold a place in `tune.total_trials`: finished, running, queued, and a dead worker's
    trial from its FAIL until its retry is queued (else another worker could take its place meanwhile).
    That last kind is a FAIL its own worker did not report (no `error` attribute) with retries left, at
    most `grace_period` s old (in case whoever failed it died before queueing the retry)."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    now = time.time()

    def awaits_retry(t: optuna.trial.FrozenTrial) -> bool:
        return (bool(tune.heartbeat_interval) and t.state == TrialState.FAIL and "error" not in t.user_attrs
                and t.number not in retried and len(t.system_attrs.get("retry_history", [])) < tune.max_retry
                and t.datetime_complete is not None
                and now - t.datetime_complete.timestamp() < (tune.grace_period or 2 * tune.heartbeat_interval))

    return [t for t in trials if t.state in LIVE or awaits_retry(t)]


def _this_trial(trial: optuna.Trial, tune: TuneParams) -> optuna.trial.FrozenTrial:
    """The trial's frozen record, checked against the study-wide budget.

    Workers asking at the same moment can overshoot `tune.total_trials`: the trial that has that many
    trials in the budget numbered below it gives way (ends FAIL without running)."""
    trials = trial.study.get_trials(deepcopy=False)
    total = tune.total_trials
    if total is not None and sum(t.number < trial.number for t in _in_budget(trials, tune)) >= total:
        trial.set_user_attr("surplus", True)
        trial.set_user_attr("error", "StudyFull")
        trial.study.stop()
        raise StudyFull(f"the study already has {total} trials")
    return next(t for t in trials if t.number == trial.number)


def objective(params_path: str | Path, params: Params, benchmark: str, algorithm: str, setting: str, *,
              prepared: Path, episodes_dir: Path, parent_run_id: str | None, profile: str | None = None,
              root: str | Path = ".", worker: int = 0):
    tune = params.tune

    def run(trial: optuna.Trial) -> float:
        try:
            return attempt(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:  # marks a failure its worker reported, unlike a dead worker's
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
            raise

    def attempt(trial: optuna.Trial) -> float:
        retry_of = _this_trial(trial, tune).system_attrs.get("failed_trial")  # set on a retry
        for key, value in (("worker", worker), ("worker_pid", os.getpid()), ("worker_host", socket.gethostname())):
            trial.set_user_attr(key, value)
        overrides = suggest(trial, tune, benchmark, algorithm)
        cell = load_params(params_path, profile, seed=params.seed, overrides={**overrides, **_budget(tune, benchmark, algorithm)})
        best = -math.inf
        pruned = None
        logged = {"trial": trial.number, "seed": cell.seed, **trial.params,
                  "iterations": tune.iterations, "algorithm": algorithm, "setting": setting}
        with tempfile.TemporaryDirectory(prefix="mamlbench-trial-") as run_dir, \
                start_run(cell, benchmark, f"{algorithm}-{setting}-trial{trial.number}", log_params=logged,
                          parent_run_id=parent_run_id, root=root,
                          tags={"stage": "tune", "variant": algorithm, "setting": setting,
                                "optuna_study": trial.study.study_name, "optuna_trial": trial.number,
                                **({"optuna_retry_of": retry_of} if retry_of is not None else {})}) as tracker:
            if tracker.run_id:  # so whoever finds this trial stale can end its run
                trial.set_user_attr("mlflow_run_id", tracker.run_id)

            def log(metrics: dict[str, float], step: int) -> None:
                nonlocal best
                tracker.log_metrics(metrics, step)
                if "meta_val/query_acc" in metrics:
                    best = max(best, metrics["meta_val/query_acc"])
                    trial.report(metrics["meta_val/query_acc"], step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"validation accuracy {metrics['meta_val/query_acc']:.4f} "
                                                 f"at iteration {step}")
            try:
                fewshot.train(cell, benchmark, algorithm, setting, run_dir, prepared=prepared,
                              episodes_dir=episodes_dir, log=log, progress=False)
            except optuna.TrialPruned as err:  # a pruned trial is a finished MLflow run, tagged as such
                pruned = err
            tracker.set_tags({"optuna_state": "PRUNED" if pruned else "COMPLETE"})
            tracker.log_metrics({"tune/best_val_acc": best})
        if pruned is not None:
            raise pruned
        return best

    return run


def tune(params_path: str | Path, benchmark: str, algorithm: str, setting: str, *, prepared: Path,
         episodes_dir: Path, out: Path | None = None, profile: str | None = None, seed: int | None = None,
         overrides: dict[str, Any] | None = None, worker: int = 0, root: str | Path = ".") -> dict:
    """Run this worker's trials of the cell's study (see `optimize`, on `tune.n_jobs` threads); write the best
    to `out`."""
    overrides = {f"tune.{k}": v for k, v in (overrides or {}).items() if v is not None}
    params = load_params(params_path, profile, seed=seed, overrides=overrides)
    fewshot.check_cell(params, benchmark, algorithm, setting)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, parent = open_study(params, benchmark, algorithm, setting, worker, root)
    if parent:
        client, _ = experiment(params, benchmark, root)
        client.update_run(parent, status="RUNNING")
    run = objective(params_path, params, benchmark, algorithm, setting, prepared=Path(prepared),
                    episodes_dir=Path(episodes_dir), parent_run_id=parent, profile=profile, root=root,
                    worker=worker)
    optimize(study, run, params.tune)
    summary = summarize(study, benchmark, algorithm)
    if parent:  # tags, not params: every worker updates them as the study's best moves
        tags = {"best_trial": summary["best_trial"], "best_val_acc": summary["val_acc"],
                **{f"best.{k}": v for k, v in summary["params"].items()}}
        from mlflow.entities import RunTag
        client.log_batch(parent, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(parent, status="FINISHED")
    if out is not None:
        write_outputs(Path(out), params_path, params, summary, study, profile)
    return summary


def optimize(study: optuna.Study, run, tune: TuneParams) -> None:
    """Run this process's trials: `tune.n_trials` of them, or, with `tune.total_trials`, until the study
    has that many COMPLETE or PRUNED (at most `n_trials` here), waiting out other workers' running trials,
    since one of them may turn out dead and be re-queued."""
    catch = (TrainingDiverged, StudyFull)  # diverging trials end FAIL and the study goes on; anything else stops it
    if tune.total_trials is None:
        study.optimize(run, n_trials=tune.n_trials, n_jobs=tune.n_jobs, catch=catch)
        return
    ran = []

    def full(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran.append(trial.number)
        if len(_in_budget(study.get_trials(deepcopy=False), tune)) >= tune.total_trials:
            study.stop()

    while len(ran) < tune.n_trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state in DONE for t in trials) >= tune.total_trials:
            return
        if len(_in_budget(trials, tune)) < tune.total_trials or any(t.state == TrialState.WAITING for t in trials):
            study.optimize(run, n_trials=tune.n_trials - len(ran), n_jobs=tune.n_jobs, catch=catch, callbacks=[full])
        elif tune.heartbeat_interval:
            time.sleep(tune.heartbeat_interval)
        else:  # without heartbeats a dead worker's trial would be waited for forever
            return


def summarize(study: optuna.Study, benchmark: str, algorithm: str) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    retries = {t.number: t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return {"study": study.study_name, "best_trial": None, "val_acc": None, "params": {}, "overrides": {},
                "trials": states, "retries": retries}
    best = max(complete, key=lambda t: (t.value, -t.number))
    key = f"variants.{algorithm}.{benchmark}"
    dotted = {f"{key}.train.inner_lr": best.params["inner_lr"], f"{key}.train.inner_steps": best.params["inner_steps"],
              f"{key}.evaluate.inner_steps": best.params["eval_steps"]}
    if "init_inner_lr" in best.params:
        dotted["variants.metasgd.options.init_inner_lr"] = best.params["init_inner_lr"]
    dotted.update({f"variants.mamlpp.options.{k}": v for k, v in best.params.items()
                   if k not in ("inner_lr", "inner_steps", "eval_steps", "init_inner_lr")})
    return {"study": study.study_name, "best_trial": best.number, "val_acc": best.value, "params": best.params,
            "overrides": dotted, "trials": states, "retries": retries}


def write_outputs(out: Path, params_path: str | Path, params: Params, summary: dict, study: optuna.Study,
                  profile: str | None) -> None:
    """best.json, trials.csv and params.yaml: the input params with a profile holding the best settings."""
    cmd = "dvc exp run " + " ".join(f"-S '{k}={v}'" for k, v in summary["overrides"].items())
    write_json(out / "best.json", {**summary, "dvc_exp_run": cmd})
    names = sorted({k for t in study.trials for k in t.params})
    rows = ["number,state,value,last_step,retry_of," + ",".join(names)]
    for t in sorted(study.trials, key=lambda t: t.number):
        last = max(t.intermediate_values) if t.intermediate_values else ""
        value = "" if t.value is None else f"{t.value:.6g}"
        retry_of = t.system_attrs.get("failed_trial", "")
        rows.append(f"{t.number},{t.state.name},{value},{last},{retry_of}," +
                    ",".join(str(t.params.get(k, "")) for k in names))
    write_text(out / "trials.csv", "\n".join(rows) + "\n")
    raw = read_raw(params_path)
    current = profile or raw.get("profile", "quick")
    tag = summary["study"].replace("-", "_")
    name = f"tuned_{tag}"
    profiles = raw.setdefault("profiles", {})
    entry = dict(profiles.get(name) or {}) if current == name else {"extends": current}
    entry.update(summary["overrides"])
    profiles[name] = entry
    raw["profile"] = name
    header = (f"# {params_path} with the best trial ({summary['best_trial']}, validation accuracy "
              f"{summary['val_acc']}) of Optuna study {summary['study']!r} as profile {name!r}.\n"
              f"# mamlbench train <benchmark> --params {out / 'params.yaml'}   or   {cmd}\n")
    write_text(out / "params.yaml", header + yaml.safe_dump(raw, sort_keys=False))
    load_params(out / "params.yaml")  # the file we hand out must load
    keep_study(study, out / "study.db")


def keep_study(study: optuna.Study, path: Path) -> None:
    """A copy of the whole study (every trial, its intermediate values and attributes) beside the outputs:
    `optuna-dashboard sqlite:///<out>/study.db` opens what produced them, whatever storage the workers shared."""
    from mamlbench.io import atomic_path
    with atomic_path(path) as tmp:
        optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                          to_storage=f"sqlite:///{Path(tmp).resolve()}")

