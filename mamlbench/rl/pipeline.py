"""What `mamlbench rl train/evaluate` (and so the DVC stages) do: params in, tracked runs and files out.

Paths come from the caller (the DVC stage's command line), never from here.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Callable

import torch

from mamlbench import guards
from mamlbench.config import Params, load_params
from mamlbench.io import write_json, write_text
from mamlbench.provenance import identity, record
from mamlbench.rl.params import RLEnvParams
from mamlbench.tracking import find_training_run, log_to_run, run_name, start_run

MODELS = ("maml", "pretrained")
Progress = Callable[[str, int, int], None]   # (label, done, total)


def _setup(params_path: str | Path, env: str, seed: int | None = None,
           profile: str | None = None) -> tuple[Params, RLEnvParams]:
    params = load_params(params_path, profile, seed=seed)
    p = params.rl.env(env)
    if params.rl.threads is not None:
        torch.set_num_threads(params.rl.threads)
    return params, p


def _logged(params: Params, env: str, p: RLEnvParams) -> dict:
    """Flat keys as the other benchmarks log them: `train.*` is the environment's section."""
    return {"seed": params.seed, "profile": params.profile, "env": env, "train": dataclasses.asdict(p)}


def train_env(params_path: str | Path, env: str, out_dir: str | Path, metrics_path: str | Path,
              progress: Progress | None = None, seed: int | None = None, profile: str | None = None,
              models: tuple[str, ...] = MODELS) -> dict:
    """Meta-train MAML-TRPO and the pretrained baseline on `env` into out_dir/{maml,pretrained}/.

    Each is its own MLflow run (`rl-<model>-<env>-seed<k>`, the scheme of every benchmark), reopened
    when resuming. Writes the last iteration's metrics of those trained to `metrics_path`. `models`
    picks one of the two, so they can train side by side in two processes; under a time budget the
    pretrained baseline's iterations are those MAML reached, so MAML must have trained first.
    """
    from mamlbench.rl.train import checkpoint_extra, provenance, train
    params, p = _setup(params_path, env, seed, profile)
    unknown = set(models) - set(MODELS)
    if unknown or not models:
        raise ValueError(f"models = {list(models)}: expected maml and/or pretrained")
    summary, reached, records = {}, None, {}
    maml_history = Path(out_dir) / "maml" / "history.json"
    if "maml" not in models and p.time_budget_minutes:
        if not maml_history.is_file():
            raise ValueError(f"{maml_history}: missing; under rl.{env}.time_budget_minutes the pretrained baseline "
                             f"trains for MAML's iterations, so train maml first")
        reached = len(json.loads(maml_history.read_text()))
    for model in models:
        run_dir = Path(out_dir) / model
        run_id = checkpoint_extra(env, p, params.seed, run_dir, model == "pretrained").get("mlflow_run_id")
        with start_run(params, "rl", run_name(params, "rl", model, env), run_id=run_id,
                       tags={"env": env, "variant": model, "setting": env, "stage": "rl-train", "device": "cpu",
                             "run_dir": run_dir.resolve()},
                       log_params=_logged(params, env, p)) as tracker:
            budget = p.time_budget_minutes
            train(env, p, params.seed, run_dir, pretrain=model == "pretrained",
                  iterations=reached if model == "pretrained" and budget else None,
                  time_budget_s=60 * budget if model == "maml" and budget else None,
                  log=lambda it, m: tracker.log_metrics(mlflow_names(m), step=it),
                  progress=None if progress is None else (lambda d, t, model=model: progress(f"{env} {model}", d, t)),
                  extra={"mlflow_run_id": tracker.run_id})
            tracker.log_artifact(run_dir / "history.json")
            tracker.log_artifact(run_dir / "policy.pt")
            records[model] = provenance(env, p, params.seed, run_dir, model == "pretrained", params.profile)
            tracker.log_provenance(records[model])
        history = json.loads((run_dir / "history.json").read_text())
        summary[model] = {**(dict(history[-1]) if history else {}), "iterations": len(history)}
        reached = reached or len(history)
    write_json(metrics_path, {**summary, "provenance": records})
    return summary


def evaluate_env(params_path: str | Path, env: str, runs_dir: str | Path, metrics_path: str | Path,
                 plots_dir: str | Path, seed: int | None = None, profile: str | None = None) -> dict:
    """Adaptation returns of meta-trained, pretrained and random policies on the fixed test tasks.

    Writes the per-step means and 95% CIs to `metrics_path`, every per-task return to
    runs_dir/evaluate.json, and to `plots_dir`: adaptation.csv (for `dvc plots`), adaptation.png
    (the paper's fig. 5) and, for 2D navigation, trace.png.
    """
    from mamlbench.rl.evaluate import evaluate, plot_adaptation, plot_navigation_trace, plot_training
    from mamlbench.rl.maml_trpo import make_policy
    from mamlbench.rl.train import load_policy
    params, p = _setup(params_path, env, seed, profile)
    policies = {m: load_policy(Path(runs_dir) / m / "policy.pt") for m in MODELS}
    probe = policies["maml"]
    guards.check_policy_width(probe, p.hidden, Path(runs_dir) / "maml" / "policy.pt")
    policies["random"] = make_policy(probe.mu[0].in_features, probe.log_std.numel(), p.hidden, params.seed)
    plots_dir = Path(plots_dir)
    parents = {m: find_training_run(params, "rl", Path(runs_dir) / m) for m in MODELS}
    with start_run(params, "rl", run_name(params, "rl", "all", env) + "-evaluate",
                   tags={"env": env, "stage": "rl-evaluate", "device": "cpu"},
                   log_params=_logged(params, env, p)) as tracker:
        results, episodes = evaluate(env, policies, p)
        summary = {m: {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in steps.items()}
                   for m, steps in results["policies"].items()}
        write_json(Path(runs_dir) / "evaluate.json", results)
        protocol = record(identity("mamlbench.rl.evaluate", {"env": env, "evaluate": dataclasses.asdict(p.evaluate)}),
                          params.profile, "cpu")
        write_json(metrics_path, {**summary, "provenance": protocol})
        tracker.log_provenance(protocol)
        rows = io.StringIO()
        w = csv.writer(rows)
        w.writerow(["policy", "step", "return", "ci95"])
        for m, steps in summary.items():
            for k, v in steps.items():
                w.writerow([m, int(k.split("_")[1]), v["mean"], v["ci95"]])
        write_text(plots_dir / "adaptation.csv", rows.getvalue())
        plot_adaptation(results, plots_dir / "adaptation.png")
        histories = {m: json.loads((Path(runs_dir) / m / "history.json").read_text()) for m in MODELS}
        plot_training(histories, plots_dir / "training.png", f"{env}: meta-training")
        if env == "navigation":
            plot_navigation_trace(results, episodes, plots_dir / "trace.png", n=p.evaluate.trace_episodes)
        tracker.log_metrics({f"{m}/meta_test/return_step{k.split('_')[1]}": v["mean"]
                             for m, steps in summary.items() for k, v in steps.items()})
        for name in ("adaptation.png", "training.png", "trace.png"):
            tracker.log_artifact(plots_dir / name)
        for m, steps in summary.items():  # each trained policy's row gets its test returns, under one name
            log_to_run(tracker, parents.get(m),
                       {f"meta_test/return_step{k.split('_')[1]}": v["mean"] for k, v in steps.items()})
    return summary


def mlflow_names(metrics: dict[str, float]) -> dict[str, float]:
    """history.json's names as MLflow's `meta_train/...`: `meta_train/return` is each policy's training
    return (MAML's after its inner update; the pretrained baseline has none, so no post-update name)."""
    out = {}
    for key, value in metrics.items():
        if key == "returns/post_update":
            out["meta_train/return"] = value
        elif key == "returns/pre_update":
            out["meta_train/return_pre_update"] = value
        else:
            out["meta_train/" + key.replace("/", "_")] = value
    return out

