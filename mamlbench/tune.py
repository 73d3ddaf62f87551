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

References: Akiba et al., "Optuna", KDD 2019; Li et al., "Hyperband", JMLR 2018.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

from mamlbench import fewshot, rng
from mamlbench.config import Params, TuneParams, load_params, read_raw
from mamlbench.io import write_json, write_text
from mamlbench.tracking import experiment, start_run
from mamlbench.train import TrainingDiverged

PARENT_ATTR = "mlflow_parent_run_id"


def storage_for(url: str | None, root: str | Path = "."):
    """An Optuna storage: null -> sqlite:///optuna.db; `journal:<file>` -> a journal file; else the URL."""
    if url is None:
        url = f"sqlite:///{(Path(root) / 'optuna.db').as_posix()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if url.startswith("sqlite:"):  # several processes on one file: wait for the lock instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return url


def suggest(trial: optuna.Trial, tune: TuneParams, benchmark: str, algorithm: str) -> dict[str, Any]:
    """The trial's settings as dotted params keys (variant-level train keys win over the benchmark's)."""
    space = tune.space
    out: dict[str, Any] = {
        f"variants.{algorithm}.train.inner_lr": trial.suggest_float("inner_lr", *space.inner_lr, log=True),
        f"variants.{algorithm}.train.inner_steps": trial.suggest_int("inner_steps", *space.inner_steps),
        f"{benchmark}.evaluate.inner_steps": trial.suggest_int("eval_steps", *space.eval_steps),
    }
    if algorithm == "metasgd":
        out["variants.metasgd.options.init_inner_lr"] = trial.suggest_float(
            "init_inner_lr", *space.metasgd_init_inner_lr, log=True)
    if algorithm == "mamlpp":
        for flag in space.mamlpp_flags:
            out[f"variants.mamlpp.options.{flag}"] = trial.suggest_categorical(flag, [True, False])
    return out


def _budget(tune: TuneParams, algorithm: str) -> dict[str, Any]:
    """Per-trial budget, at the variant level so no profile or setting override outranks it."""
    key = f"variants.{algorithm}.train"
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
    storage = storage_for(tune.storage, root)
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


def objective(params_path: str | Path, params: Params, benchmark: str, algorithm: str, setting: str, *,
              prepared: Path, episodes_dir: Path, parent_run_id: str | None, profile: str | None = None,
              root: str | Path = "."):
    tune = params.tune

    def run(trial: optuna.Trial) -> float:
        overrides = suggest(trial, tune, benchmark, algorithm)
        cell = load_params(params_path, profile, seed=params.seed, overrides={**overrides, **_budget(tune, algorithm)})
        best = -math.inf
        pruned = None
        logged = {"trial": trial.number, "seed": cell.seed, **trial.params,
                  "iterations": tune.iterations, "algorithm": algorithm, "setting": setting}
        with tempfile.TemporaryDirectory(prefix="mamlbench-trial-") as run_dir, \
                start_run(cell, benchmark, f"{algorithm}-{setting}-trial{trial.number}", log_params=logged,
                          parent_run_id=parent_run_id, root=root,
                          tags={"stage": "tune", "variant": algorithm, "setting": setting,
                                "optuna_study": trial.study.study_name, "optuna_trial": trial.number}) as tracker:

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
    """Run `tune.n_trials` trials (on `tune.n_jobs` threads) of the cell's study; write the best to `out`."""
    overrides = {f"tune.{k}": v for k, v in (overrides or {}).items() if v is not None}
    params = load_params(params_path, profile, seed=seed, overrides=overrides)
    fewshot.check_cell(params, benchmark, algorithm, setting)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, parent = open_study(params, benchmark, algorithm, setting, worker, root)
    if parent:
        client, _ = experiment(params, benchmark, root)
        client.update_run(parent, status="RUNNING")
    run = objective(params_path, params, benchmark, algorithm, setting, prepared=Path(prepared),
                    episodes_dir=Path(episodes_dir), parent_run_id=parent, profile=profile, root=root)
    # Diverging trials end FAIL and the study goes on; anything else is a bug and stops it.
    study.optimize(run, n_trials=params.tune.n_trials, n_jobs=params.tune.n_jobs, catch=(TrainingDiverged,))
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


def summarize(study: optuna.Study, benchmark: str, algorithm: str) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return {"study": study.study_name, "best_trial": None, "val_acc": None, "params": {}, "overrides": {},
                "trials": states}
    best = max(complete, key=lambda t: (t.value, -t.number))
    dotted = {f"variants.{algorithm}.train.inner_lr": best.params["inner_lr"],
              f"variants.{algorithm}.train.inner_steps": best.params["inner_steps"],
              f"{benchmark}.evaluate.inner_steps": best.params["eval_steps"]}
    if "init_inner_lr" in best.params:
        dotted["variants.metasgd.options.init_inner_lr"] = best.params["init_inner_lr"]
    dotted.update({f"variants.mamlpp.options.{k}": v for k, v in best.params.items()
                   if k not in ("inner_lr", "inner_steps", "eval_steps", "init_inner_lr")})
    return {"study": study.study_name, "best_trial": best.number, "val_acc": best.value, "params": best.params,
            "overrides": dotted, "trials": states}


def write_outputs(out: Path, params_path: str | Path, params: Params, summary: dict, study: optuna.Study,
                  profile: str | None) -> None:
    """best.json, trials.csv and params.yaml: the input params with a profile holding the best settings."""
    cmd = "dvc exp run " + " ".join(f"-S '{k}={v}'" for k, v in summary["overrides"].items())
    write_json(out / "best.json", {**summary, "dvc_exp_run": cmd})
    names = sorted({k for t in study.trials for k in t.params})
    rows = ["number,state,value,last_step," + ",".join(names)]
    for t in sorted(study.trials, key=lambda t: t.number):
        last = max(t.intermediate_values) if t.intermediate_values else ""
        value = "" if t.value is None else f"{t.value:.6g}"
        rows.append(f"{t.number},{t.state.name},{value},{last}," + ",".join(str(t.params.get(k, "")) for k in names))
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

