"""The `mamlbench` command line: train, evaluate, check params, and the data / rl command groups.

    mamlbench train sinusoid                     # MAML, params.yaml, resumes from checkpoints
    mamlbench train sinusoid --model pretrain    # the paper's pretrained baseline
    mamlbench evaluate sinusoid                  # both on the fixed test tasks
    mamlbench check-params params.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mamlbench.config import FEWSHOT
from mamlbench.data.cli import app as data_app
from mamlbench.rl.cli import app as rl_app
from mamlbench.schema import ConfigError

app = typer.Typer(help="Reproduce, compare and tune MAML-family meta-learning.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(data_app, name="data")
app.add_typer(rl_app, name="rl")

BENCHMARKS = ("sinusoid", *FEWSHOT)
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file (validated before any work).")
ProfileOpt = typer.Option(None, "--profile", help="Use this entry of `profiles` instead of the file's `profile`.")
AlgorithmOpt = typer.Option("maml", "--algorithm", "-a", help="Few-shot: maml, fomaml, reptile, anil, metasgd, mamlpp, "
                            "boil, protonet, protomaml, cavia, imaml, baseline.")
SettingOpt = typer.Option("5w1s", "--setting", "-s", help="Few-shot: a key of <benchmark>.settings in params.")
PreparedOpt = typer.Option(None, help="Few-shot: prepared data folder (default: data/prepared/<dataset>).")
EpisodesOpt = typer.Option(None, "--episodes", help="Few-shot: fixed episodes folder (default: data/episodes/<dataset>).")
SeedOpt = typer.Option(None, "--seed", help="Training seed in place of params' `seed` (DVC passes each of `seeds`).")


def _check_benchmark(name: str) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (have: {', '.join(BENCHMARKS)})")


def _data_dirs(benchmark: str, prepared: Optional[Path], episodes: Optional[Path]) -> tuple[Path, Path]:
    from mamlbench.config import dataset_name
    dataset = dataset_name(benchmark)
    return prepared or Path("data/prepared") / dataset, episodes or Path("data/episodes") / dataset


@app.command()
def train(benchmark: str = typer.Argument(..., help="sinusoid, omniglot, mini_imagenet or imagefolder (your class folders: data.imagefolder)."),
          params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
          model: str = typer.Option("maml", help="Sinusoid: maml (the algorithm in params) or pretrain (the baseline)."),
          algorithm: str = AlgorithmOpt, setting: str = SettingOpt,
          run_dir: Optional[Path] = typer.Option(None, help="Checkpoints and the model go here "
                                                            "(default: runs/<benchmark>/<model> or <algorithm>-<setting>)."),
          prepared: Optional[Path] = PreparedOpt, episodes: Optional[Path] = EpisodesOpt,
          progress: bool = typer.Option(True, help="Show a progress bar."), seed: Optional[int] = SeedOpt,
          ) -> None:
    """Meta-train, resuming from the newest checkpoint of the same configuration; under torchrun,
    one process per device, each on a slice of every meta-batch."""
    from mamlbench import distributed, runs
    from mamlbench.config import load_params
    _check_benchmark(benchmark)
    params = load_params(params, profile, seed=seed)
    if benchmark == "sinusoid":
        out = runs.train_sinusoid(params, model, run_dir or Path("runs") / benchmark / model, progress=progress)
        label = model
    else:
        prepared, episodes = _data_dirs(benchmark, prepared, episodes)
        label = f"{algorithm} {setting}"
        out = runs.train_fewshot(params, benchmark, algorithm, setting,
                                 run_dir or Path("runs") / benchmark / f"{algorithm}-{setting}",
                                 prepared=prepared, episodes_dir=episodes, progress=progress)
    if distributed.is_main():  # under torchrun, one line for the run, not one per process
        typer.echo(f"trained {benchmark} {label}: {out['iterations']} iterations"
                   + (f" (resumed at {out['resumed_from']})" if out["resumed_from"] else ""))


@app.command()
def evaluate(benchmark: str = typer.Argument(..., help="sinusoid, omniglot, mini_imagenet or imagefolder (your class folders: data.imagefolder)."),
             params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             algorithm: str = AlgorithmOpt, setting: str = SettingOpt,
             runs_dir: Optional[Path] = typer.Option(None, "--runs", help="Sinusoid: folder holding <model>/model.pt "
                                                     "(default: runs/sinusoid); few-shot: the training run folder."),
             out: Optional[Path] = typer.Option(None, help="Where metrics.json and tables go (default: <runs>/eval)."),
             prepared: Optional[Path] = PreparedOpt, episodes: Optional[Path] = EpisodesOpt,
             seed: Optional[int] = SeedOpt,
             ) -> None:
    """Evaluate trained models on the fixed test tasks or episodes; print the table."""
    from mamlbench import runs
    from mamlbench.config import load_params
    _check_benchmark(benchmark)
    params = load_params(params, profile, seed=seed)
    if benchmark == "sinusoid":
        runs_dir = runs_dir or Path("runs/sinusoid")
        metrics = runs.evaluate_sinusoid(params, {"maml": runs_dir / "maml", "pretrain": runs_dir / "pretrain"},
                                         out or runs_dir / "eval")
        for name, by_k in metrics.items():
            for k, by_step in by_k.items():
                cells = "  ".join(f"{s}: {v['mse']:.3f}±{v['ci95']:.3f}" for s, v in by_step.items())
                typer.echo(f"{name:9s} {k:4s} {cells}")
        return
    prepared, episodes = _data_dirs(benchmark, prepared, episodes)
    runs_dir = runs_dir or Path("runs") / benchmark / f"{algorithm}-{setting}"
    metrics = runs.evaluate_fewshot(params, benchmark, algorithm, setting, runs_dir, out or runs_dir / "eval",
                                    prepared=prepared, episodes_dir=episodes)
    steps = "  ".join(f"{s}: {100 * v['acc']:.1f}" for s, v in metrics["per_step"].items())
    typer.echo(f"{benchmark} {algorithm} {setting}: {100 * metrics['acc']:.2f}% ± {100 * metrics['ci95']:.2f} "
               f"({metrics['n_episodes']} episodes)\n  by inner step: {steps}")


@app.command()
def tune(benchmark: str = typer.Argument("omniglot", help="omniglot, mini_imagenet or imagefolder."),
         params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
         algorithm: str = AlgorithmOpt, setting: str = SettingOpt, seed: Optional[int] = SeedOpt,
         n_trials: Optional[int] = typer.Option(None, help="Trials this process runs \\[tune.n_trials]."),
         total_trials: Optional[int] = typer.Option(None, help="Finished trials the whole study needs, whichever "
                                                               "workers run them \\[tune.total_trials]."),
         n_jobs: Optional[int] = typer.Option(None, help="Threads running trials \\[tune.n_jobs]."),
         iterations: Optional[int] = typer.Option(None, help="Meta-updates per trial \\[tune.iterations]."),
         pruner: Optional[str] = typer.Option(None, help="median, hyperband or none \\[tune.pruner]."),
         storage: Optional[str] = typer.Option(None, help="Optuna storage URL or journal:<file> \\[sqlite:///optuna.db]."),
         study: Optional[str] = typer.Option(None, help="Study name \\[<benchmark>-<algorithm>-<setting>]."),
         worker: int = typer.Option(0, help="This worker's index: workers sharing a study need distinct ones."),
         out: Optional[Path] = typer.Option(None, help="Write best.json, trials.csv and a tuned params.yaml here."),
         prepared: Optional[Path] = PreparedOpt, episodes: Optional[Path] = EpisodesOpt,
         ) -> None:
    """Optuna study over the inner loop, maximising accuracy on the fixed validation episodes."""
    from mamlbench.guards import check_storage_url
    from mamlbench.tune import tune as run_tune
    check_storage_url(storage)
    prepared, episodes = _data_dirs(benchmark, prepared, episodes)
    summary = run_tune(params, benchmark, algorithm, setting, prepared=prepared, episodes_dir=episodes, out=out,
                       profile=profile, seed=seed, worker=worker,
                       overrides=dict(n_trials=n_trials, total_trials=total_trials, n_jobs=n_jobs, iterations=iterations, pruner=pruner,
                                      storage=storage, study=study))
    states = ", ".join(f"{n} {k.lower()}" for k, n in summary["trials"].items() if n)
    typer.echo(f"study {summary['study']}: {states}")
    if summary["best_trial"] is not None:
        typer.echo(f"best trial {summary['best_trial']}: validation accuracy {100 * summary['val_acc']:.2f}% with "
                   + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in summary["params"].items()))


@app.command()
def report(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
           runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Run folders (runs/<benchmark>/...)."),
           out: Path = typer.Option(Path("reports"), help="README.md and figures/ go here."),
           force: bool = typer.Option(False, help="Replace a report that has more results than the new one."),
           ) -> None:
    """Tables (mean ± 95% CI, the paper's number, paired comparisons) and figures from the metrics files."""
    from mamlbench.config import load_params
    from mamlbench.report import build_report
    written = build_report(load_params(params, profile), runs_dir, out, force=force)
    typer.echo(f"wrote {len(written)} files to {out}")


@app.command("report-reference")
def report_reference(runs_dir: Path = typer.Option(..., "--runs", help="Root of the reference runs "
                                                   "(omniglot/<variant>-<setting>-seed<k>, sinusoid/seed<k>)."),
                     quick: Optional[Path] = typer.Option(None, help="Root of quick-profile runs whose "
                                                          "sinusoid/seed0 is shown beside the reference's."),
                     note: Optional[Path] = typer.Option(None, help="A markdown file put under the title "
                                                         "(the machine's conditions during the runs)."),
                     out: Path = typer.Option(Path("reports/reference"), help="README.md, wall_time.png and "
                                              "runs/ (the files read) go here."),
                     ) -> None:
    """The paper's Table 1 at the reference budget: accuracy, budget, provenance, validation vs wall time."""
    from mamlbench.reference import build_reference
    typer.echo(f"wrote {build_reference(runs_dir, out, quick=quick, note=note)}")


@app.command("report-full")
def report_full(runs_dir: Path = typer.Option(..., "--runs", help="Root of the full-budget runs "
                                              "(omniglot/<profile>-<variant>-<setting>-seed<k>, logs/)."),
                note: Optional[Path] = typer.Option(None, help="A markdown file put under the title."),
                out: Path = typer.Option(Path("reports/full"), help="README.md, curves.png and runs/ (the files "
                                         "read, released models, carried checkpoints) go here."),
                ) -> None:
    """Few-shot cells at their protocol's whole budget: result, paper, updates, curve, released models."""
    from mamlbench.reference import build_full
    typer.echo(f"wrote {build_full(runs_dir, out, note=note)}")


@app.command()
def compare(a: Path = typer.Argument(..., help="An evaluation folder (holding per_episode.csv)."),
            b: Path = typer.Argument(..., help="Another, evaluated on the same episodes."),
            ) -> None:
    """Paired difference of accuracy (a - b) on the same test episodes, with its 95% CI."""
    from mamlbench.report import paired_files
    d = paired_files(a, b)
    typer.echo(f"{a}: {100 * d['a']:.2f}%   {b}: {100 * d['b']:.2f}%   ({d['n']} episodes, final inner step)\n"
               f"a - b = {100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f} points (paired 95% CI); "
               f"a better on {d['a_wins']}, b on {d['b_wins']}, ties {d['ties']}")


@app.command("check-params")
def check_params(params: Path = typer.Argument(Path("params.yaml"))) -> None:
    """Validate a params file and say which profile it resolves to."""
    from mamlbench.config import load_params
    resolved = load_params(params)
    typer.echo(f"{params}: ok (profile {resolved.profile})")


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    from mamlbench.guards import SIGNAL_EXIT, Interrupted, install_signal_handlers
    from mamlbench.train import TrainingDiverged
    install_signal_handlers()
    try:
        app()
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as err:
        where = err.detail or "stopped before training began"
        print(f"error: interrupted by {err}: {where} (rerun the same command to resume)", file=sys.stderr)
        sys.exit(SIGNAL_EXIT[err.signum])


if __name__ == "__main__":
    main()
