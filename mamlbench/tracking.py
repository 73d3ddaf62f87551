"""MLflow tracking for every training and evaluation run.

The store is an embedded SQLite file (`mlflow.db` in the project root) unless `tracking.uri` in
params or the `MLFLOW_TRACKING_URI` environment variable (which wins) names another, e.g. a
tracking server. One experiment per benchmark (`<prefix>-<benchmark>`); params logged flat;
tags name the git commit, device, seed and DVC stage. A run that raises ends FAILED with the
reason in the `failure_reason` tag; a resumed training run reopens its own MLflow run.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from mamlbench import guards
from mamlbench.config import Params
from mamlbench.provenance import git_state
from mamlbench.schema import flatten


def tracking_uri(params: Params, root: str | Path = ".") -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db').as_posix()}"


class Tracker:
    """A thin handle on one active MLflow run (or nothing, when tracking is disabled).

    Uses an explicit `MlflowClient`, never the fluent API's process-global state, so two runs in one
    process can write to two stores.
    """

    def __init__(self, client=None, run_id: str | None = None):
        self.client, self.run_id = client, run_id

    fallback: Path | None = None   # where metrics go once the store stops answering

    def _lost(self, err: Exception, what: dict) -> None:
        """The store failed (after MLflow's bounded retries): warn once, keep training, log locally."""
        if self.fallback is None:
            self.fallback = Path("mlruns-offline") / f"{self.run_id}.jsonl"
            guards.warn(f"tracking store stopped answering ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0][:160]}); training goes on, metrics of MLflow run "
                        f"{self.run_id} go to {self.fallback}")
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        with open(self.fallback, "a") as f:
            f.write(json.dumps({"time": time.time(), **what}, default=str) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.client is None:
            return
        if self.fallback is not None:
            return self._lost(RuntimeError("earlier failure"), {"metrics": metrics, "step": step})
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        try:
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        except Exception as err:
            self._lost(err, {"metrics": metrics, "step": step})

    def log_params(self, params: dict[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.client is not None and self.fallback is None and Path(path).exists():
            try:
                self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
            except Exception as err:
                self._lost(err, {"artifact": str(path)})

    def log_provenance(self, provenance: dict[str, Any]) -> None:
        """What produced the run's result (`mamlbench.provenance.record`) as `provenance.<key>` tags."""
        self.set_tags({f"provenance.{k}": v for k, v in provenance.items() if v is not None})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tags, with the same fallback as metrics: a store that stopped answering never stops the run."""
        if self.client is None:
            return
        if self.fallback is not None:
            return self._lost(RuntimeError("earlier failure"), {"tags": tags})
        from mlflow.entities import RunTag
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as err:
            self._lost(err, {"tags": tags})


def _experiment_id(client, name: str, uri: str, root: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the embedded store, not in the cwd
        location = (root.resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def experiment(params: Params, benchmark: str, root: str | Path = "."):
    """(MlflowClient, experiment id) of `benchmark`'s experiment in the configured store, created if new."""
    import logging

    from mlflow.tracking import MlflowClient
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    root = Path(root)
    uri = tracking_uri(params, root)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        return client, _experiment_id(client, f"{params.tracking.experiment_prefix}-{benchmark}", uri, root)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the first touch of an embedded store: MLflow creates a new SQLite file's tables (and an
    experiment) without a lock, so two runs started together on a fresh store fail ("table
    alembic_version already exists"). A server store needs none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


DEFAULT_PROFILE = "quick"  # params.yaml's own profile: run names say the profile only when it is another


def run_name(params: Params, benchmark: str, variant: str, setting: str) -> str:
    """One MLflow naming scheme for every benchmark: <benchmark>-<variant>-<setting>-seed<k>[-<profile>]."""
    name = f"{benchmark}-{variant}-{setting}-seed{params.seed}"
    return name if params.profile == DEFAULT_PROFILE else f"{name}-{params.profile}"


def log_to_run(tracker: "Tracker", run_id: str | None, metrics: dict[str, float]) -> None:
    """Metrics onto another run of the same store (an evaluation's test metrics on its training run's row)."""
    if run_id is not None and tracker.client is not None:
        Tracker(tracker.client, run_id).log_metrics(metrics)


def find_training_run(params: Params, benchmark: str, run_dir: str | Path, root: str | Path = ".") -> str | None:
    """The id of the newest MLflow run that trained `run_dir` (its `run_dir` tag), so that an evaluation
    nests under it and puts its test metrics on its row; None when tracking is off or it is not found."""
    if not params.tracking.enabled:
        return None
    try:
        client, experiment_id = experiment(params, benchmark, root)
        found = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                   filter_string=f"tags.run_dir = '{Path(run_dir).resolve()}' "
                                                 f"and tags.stage = '{benchmark}-train'")
    except Exception:  # an unreachable store: the evaluation itself still runs (and falls back)
        return None
    return found[0].info.run_id if found else None


@contextlib.contextmanager
def start_run(params: Params, benchmark: str, run_name: str, *, run_id: str | None = None,
              tags: dict[str, Any] | None = None, log_params: dict[str, Any] | None = None,
              root: str | Path = ".", parent_run_id: str | None = None) -> Iterator[Tracker]:
    """Open (or reopen, given `run_id`) an MLflow run; end it FINISHED, FAILED or KILLED.

    `parent_run_id` nests the run under another (the MLflow UI shows tuning trials under their study).
    """
    if not params.tracking.enabled:
        yield Tracker()
        return
    root = Path(root)
    guards.check_tracking_uri(tracking_uri(params, root))
    guards.bound_tracking_retries()
    client, experiment_id = experiment(params, benchmark, root)
    if run_id is not None:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        except Exception:  # the checkpoint names a run of another store: start a new one
            run_id = None
    fresh = run_id is None
    if fresh:
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    tracker = Tracker(client, run_id)
    if tags and tags.get("run_dir"):
        close_stale_runs(client, experiment_id, str(tags["run_dir"]), run_id)
    try:
        if fresh:
            tracker.log_params(flatten(log_params if log_params is not None else params))
        commit, dirty = git_state(str(Path(root).resolve()))
        base = {"git_commit": commit, "seed": params.seed, "profile": params.profile, "benchmark": benchmark}
        if commit != "unknown":  # MLflow's own field: the UI links the run to its source version
            base["mlflow.source.git.commit"] = commit
        if dirty is not None:
            base["git_dirty"] = dirty
        for var, tag in (("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_experiment")):
            if os.environ.get(var):
                base[tag] = os.environ[var]
        if parent_run_id:
            base["mlflow.parentRunId"] = parent_run_id
        tracker.set_tags({**base, **(tags or {})})
        yield tracker
    except (KeyboardInterrupt, guards.Interrupted):
        _terminate(tracker, "KILLED")
        raise
    except BaseException as err:
        with contextlib.suppress(Exception):
            tracker.set_tags({"failure_reason": f"{type(err).__name__}: {err}"[:5000]})
        _terminate(tracker, "FAILED")
        raise
    else:
        _terminate(tracker, "FINISHED")


def _terminate(tracker: Tracker, status: str) -> None:
    """End the run; a store that has gone away gets a warning and the status in the local fallback."""
    if tracker.fallback is None:
        try:
            tracker.client.set_terminated(tracker.run_id, status=status)
            return
        except Exception as err:
            tracker._lost(err, {"status": status})
            return
    tracker._lost(RuntimeError("earlier failure"), {"status": status})


def close_stale_runs(client, experiment_id: str, run_dir: str, keep: str) -> None:
    """A run of this run folder still RUNNING was killed (kill -9, power loss): the caller holds the
    folder's lock, so nothing else can be writing it. Mark it KILLED."""
    escaped = run_dir.replace("'", "\\'")
    for run in client.search_runs([experiment_id], f"tags.run_dir = '{escaped}' and attributes.status = 'RUNNING'"):
        if run.info.run_id != keep:
            client.set_tag(run.info.run_id, "killed_reason", "found RUNNING by a later run of the same folder")
            client.set_terminated(run.info.run_id, status="KILLED")
