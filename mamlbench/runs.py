"""Tracked runs: what `mamlbench train/evaluate` and the DVC stages execute.

Each function reads `params.yaml`, opens the MLflow run (reopening it when a checkpoint resumes),
and calls the benchmark's own train or evaluate function. Under torchrun the training functions
join the process group; only rank 0 clears foreign checkpoints, opens the MLflow run and logs.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mamlbench import distributed, fewshot, guards, sinusoid
from mamlbench.config import Params, fewshot_cell, fewshot_train, load_params, with_seed
from mamlbench.schema import to_dict
from mamlbench.tracking import Tracker, find_training_run, log_to_run, run_name, start_run
from mamlbench.train import resolve_device


def _load(params: str | Path | Params, seed: int | None = None) -> Params:
    """Params from a file or as given, with `seed` (the CLI's `--seed`, a DVC seed cell) in place of params.seed."""
    return with_seed(params if isinstance(params, Params) else load_params(params), seed)


def _resume_state(checkpoints) -> dict | None:
    """The newest good checkpoint of this configuration. Rank 0 first removes foreign ones; every
    rank then reads the same file (rank 0 wrote it atomically in an earlier run)."""
    if distributed.is_main():
        checkpoints.discard_foreign()
    distributed.barrier()
    return checkpoints.latest()


def _log_provenance(tracker: Tracker, result: Path) -> dict:
    """The provenance the result file carries, onto the MLflow run; returns the file's contents ({} where
    there is none: under torchrun rank 0 alone writes it)."""
    if not result.is_file():
        return {}
    contents = json.loads(result.read_text())
    tracker.log_provenance(contents.get("provenance", {}))
    return contents


def _locked(run_dir: str | Path):
    """Rank 0 holds the run folder's lock for the whole training (see `guards.run_lock`)."""
    return guards.run_lock(run_dir) if distributed.is_main() else contextlib.nullcontext()


def _tracked(params: Params, benchmark: str, run_name: str, **kwargs):
    """`start_run` on rank 0; the other ranks get a tracker that logs nothing."""
    if not distributed.is_main():
        return contextlib.nullcontext(Tracker())
    if distributed.world_size() > 1:
        kwargs["tags"] = {**kwargs.get("tags", {}), "world_size": distributed.world_size()}
    return start_run(params, benchmark, run_name, **kwargs)


def train_sinusoid(params_path: str | Path | Params, kind: str, run_dir: str | Path, progress: bool = True,
                   seed: int | None = None) -> dict:
    params = _load(params_path, seed)
    if kind not in sinusoid.MODELS:
        raise ValueError(f"--model {kind!r}: must be one of {', '.join(sinusoid.MODELS)}")
    section = params.sinusoid.train if kind == "maml" else params.sinusoid.pretrain
    if distributed.is_main():  # rank 0 alone writes outputs (under torchrun too), so it alone checks
        guards.check_writable_dir(run_dir, "--run-dir")  # before any work, not after training
    with distributed.session(resolve_device(section.device)):
        if kind == "maml":  # refuse a meta-batch that does not split over the processes before any work
            distributed.check_divisible(section.meta_batch_size, "sinusoid.train.meta_batch_size")
        else:
            distributed.check_divisible(section.batch_tasks, "sinusoid.pretrain.batch_tasks")
        with _locked(run_dir):
            return _train_sinusoid(params, kind, section, run_dir, progress)


def _train_sinusoid(params: Params, kind: str, section, run_dir: str | Path, progress: bool) -> dict:
    checkpoints = sinusoid.checkpointer(params, kind, run_dir)
    state = _resume_state(checkpoints)
    run_id = state["extra"].get("mlflow_run_id") if state else None
    logged = {"seed": params.seed, "profile": params.profile, "hidden": params.sinusoid.hidden, "variant": kind,
              "train": to_dict(section)}
    tags = {"stage": "sinusoid-train", "variant": kind, "device": str(resolve_device(section.device)),
            "run_dir": Path(run_dir).resolve()}
    if state:
        tags["resumed_from"] = state["iteration"]
    with _tracked(params, "sinusoid", run_name(params, "sinusoid", kind, sinusoid_setting(params)), run_id=run_id,
                  tags={**tags, "setting": sinusoid_setting(params)}, log_params=logged) as tracker:
        result = sinusoid.train(params, kind, run_dir, resume_state=state, log=tracker.log_metrics,
                                extra={"mlflow_run_id": tracker.run_id}, progress=progress)
        for name in ("model.pt", "curve.csv", "clock.csv", "train.json"):
            tracker.log_artifact(Path(run_dir) / name)
        _log_provenance(tracker, Path(run_dir) / "train.json")
    return {"iterations": result.iterations, "resumed_from": result.resumed_from}


def evaluate_sinusoid(params_path: str | Path | Params, runs: dict[str, str | Path], out_dir: str | Path,
                      seed: int | None = None) -> dict:
    params = _load(params_path, seed)
    paths = {name: Path(folder) / "model.pt" for name, folder in runs.items()}
    for name, path in paths.items():
        if not path.is_file():
            raise ValueError(f"{path}: no trained {name} model; run `mamlbench train sinusoid --model {name}` first")
    guards.check_writable_dir(out_dir, "--out")
    metrics = sinusoid.evaluate(params, paths, out_dir)
    setting = sinusoid_setting(params)
    for model, ks in metrics.items():  # one evaluation run per policy, nested under its training run
        logged = {"seed": params.seed, "profile": params.profile, "variant": model,
                  "evaluate": to_dict(params.sinusoid.evaluate)}
        parent, run = _evaluation_run(params, "sinusoid", model, setting, runs[model], logged, "cpu")
        with run as tracker:
            test = {f"meta_test/mse_{k}_{step}": v["mse"] for k, steps in ks.items() for step, v in steps.items()}
            tracker.log_metrics(test)
            log_to_run(tracker, parent, test)  # one row per cell holds train and test
            for name in ("metrics.json", "per_task.csv", "fits.png"):
                tracker.log_artifact(Path(out_dir) / name)
            _log_provenance(tracker, Path(out_dir) / "metrics.json")
    return metrics


def sinusoid_setting(params: Params) -> str:
    """The sinusoid's cell name in runs: its training K (`k10`)."""
    return f"k{params.sinusoid.train.k_shot}"


def _check_data(params: Params, benchmark: str, setting: str, prepared: str | Path, episodes_dir: str | Path,
                split: str) -> None:
    """The prepared data and the episodes record the seeds that made them: refuse others than params'."""
    from mamlbench.data.episodes import episode_path
    from mamlbench.data.prepared import read_meta
    from mamlbench.io import load_torch
    meta = read_meta(prepared)
    if benchmark == "omniglot":
        guards.check_prepared_provenance(meta, params.data.omniglot.split_seed, prepared)
    cell = getattr(params, benchmark).settings[setting]
    path = episode_path(episodes_dir, meta.get("scheme", "maml"), split, cell.n_way, cell.k_shot, cell.n_query)
    if path.is_file():
        guards.check_episodes_seed(load_torch(path), params.data.episodes.seed, path)


def _evaluation_run(params: Params, benchmark: str, variant: str, setting: str, run_dir: str | Path,
                    logged: dict, device) -> tuple:
    """(the training run's id or None, the context of the evaluation run nested under it)."""
    parent = find_training_run(params, benchmark, run_dir)
    tags = {"stage": f"{benchmark}-evaluate", "variant": variant, "setting": setting, "device": str(device)}
    return parent, start_run(params, benchmark, run_name(params, benchmark, variant, setting) + "-evaluate",
                             tags=tags, log_params=logged, parent_run_id=parent)




def train_fewshot(params_path: str | Path | Params, benchmark: str, algorithm: str, setting: str, run_dir: str | Path, *,
                  prepared: str | Path, episodes_dir: str | Path, progress: bool = True, seed: int | None = None) -> dict:
    params = _load(params_path, seed)
    fewshot.check_cell(params, benchmark, algorithm, setting)
    cfg = fewshot_train(params, benchmark, algorithm, setting)
    _check_data(params, benchmark, setting, prepared, episodes_dir, "val")
    if distributed.is_main():  # rank 0 alone writes outputs
        guards.check_writable_dir(run_dir, "--run-dir")
    with distributed.session(resolve_device(cfg.device)):
        distributed.check_divisible(cfg.meta_batch_size, f"{benchmark}.train.meta_batch_size")  # before any work
        with _locked(run_dir):
            return _train_fewshot(params, benchmark, algorithm, setting, cfg, run_dir, prepared, episodes_dir, progress)


def _train_fewshot(params: Params, benchmark: str, algorithm: str, setting: str, cfg, run_dir: str | Path,
                   prepared: str | Path, episodes_dir: str | Path, progress: bool) -> dict:
    checkpoints = fewshot.checkpointer(params, benchmark, algorithm, setting, run_dir, prepared, episodes_dir)
    state = _resume_state(checkpoints)
    run_id = state["extra"].get("mlflow_run_id") if state else None
    cell = getattr(params, benchmark).settings[setting]
    resolved = fewshot_cell(params, benchmark, algorithm, setting)
    logged = {"seed": params.seed, "profile": params.profile, "benchmark": benchmark, "algorithm": algorithm,
              "setting": setting, "model": resolved.model, "n_way": cell.n_way, "k_shot": cell.k_shot,
              "network": {"norm": resolved.norm, "norm_eps": resolved.norm_eps, "init": resolved.init},
              "train": to_dict(cfg), "options": json.dumps(to_dict(resolved.options), sort_keys=True)}
    # options as one JSON value: every variant of a benchmark logs the same param keys
    tags = {"stage": f"{benchmark}-train", "variant": algorithm, "setting": setting,
            "device": str(resolve_device(cfg.device)), "run_dir": Path(run_dir).resolve()}
    if state:
        tags["resumed_from"] = state["iteration"]
    with _tracked(params, benchmark, run_name(params, benchmark, algorithm, setting), run_id=run_id, tags=tags,
                  log_params=logged) as tracker:
        result = fewshot.train(params, benchmark, algorithm, setting, run_dir, prepared=prepared,
                               episodes_dir=episodes_dir, resume_state=state, log=tracker.log_metrics,
                               extra={"mlflow_run_id": tracker.run_id}, progress=progress)
        if tracker.client is not None:  # a figure for the run's row (the report draws its own)
            fewshot.plot_run(run_dir, Path(run_dir) / "curve.png")
        for name in ("model.pt", "best.pt", "curve.csv", "clock.csv", "train.json", "curve.png"):
            tracker.log_artifact(Path(run_dir) / name)
        chosen = _log_provenance(tracker, Path(run_dir) / "train.json").get("strategy", {})
        tracker.set_tags({"strategy": chosen.get("choice"), "strategy_how": chosen.get("how")})
        tracker.log_metrics({f"probe/{s}_step_s": r["step_s"] for s, r in chosen.get("timings", {}).items()
                             if "error" not in r})
    return {"iterations": result.iterations, "resumed_from": result.resumed_from, **result.last()}


def evaluate_fewshot(params_path: str | Path | Params, benchmark: str, algorithm: str, setting: str, run_dir: str | Path,
                     out_dir: str | Path, *, prepared: str | Path, episodes_dir: str | Path,
                     seed: int | None = None) -> dict:
    params = _load(params_path, seed)
    fewshot.check_cell(params, benchmark, algorithm, setting)
    _check_data(params, benchmark, setting, prepared, episodes_dir, getattr(params, benchmark).evaluate.split)
    guards.check_writable_dir(out_dir, "--out")
    resolved = fewshot_cell(params, benchmark, algorithm, setting)
    ev = to_dict(resolved.evaluate)
    ev["inner_lr"] = resolved.evaluate.inner_lr if resolved.evaluate.inner_lr is not None else resolved.train.inner_lr
    logged = {"seed": params.seed, "profile": params.profile, "algorithm": algorithm, "setting": setting,
              "evaluate": ev}   # the step size used, not the null that means "the training one"
    parent, run = _evaluation_run(params, benchmark, algorithm, setting, run_dir, logged,
                                  resolve_device(resolved.train.device))
    with run as tracker:
        metrics = fewshot.evaluate(params, benchmark, algorithm, setting, run_dir, out_dir, prepared=prepared,
                                   episodes_dir=episodes_dir)
        test = {"meta_test/acc": metrics["acc"], "meta_test/ci95": metrics["ci95"],
                "meta_test/checkpoint_iteration": metrics["checkpoint_iteration"]}
        tracker.log_metrics(test)
        log_to_run(tracker, parent, test)  # one row per cell holds train and test
        for step, value in enumerate(metrics["per_step"].values()):
            tracker.log_metrics({"meta_test/acc_by_step": value["acc"]}, step=step)
        if tracker.client is not None and (Path(run_dir) / "curve.csv").is_file():
            fewshot.plot_run(run_dir, Path(out_dir) / "run.png", Path(out_dir) / "steps.csv")  # curves, accuracy vs steps
        for name in ("metrics.json", "per_episode.csv", "steps.csv", "run.png"):
            tracker.log_artifact(Path(out_dir) / name)
        tracker.log_provenance(metrics["provenance"])
    return metrics
