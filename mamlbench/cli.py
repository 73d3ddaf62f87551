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

from mamlbench.data.cli import app as data_app
from mamlbench.rl.cli import app as rl_app
from mamlbench.schema import ConfigError

app = typer.Typer(help="Reproduce, compare and tune MAML-family meta-learning.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(data_app, name="data")
app.add_typer(rl_app, name="rl")

BENCHMARKS = ("sinusoid", "omniglot", "mini_imagenet")
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file (validated before any work).")
ProfileOpt = typer.Option(None, "--profile", help="Use this entry of `profiles` instead of the file's `profile`.")
AlgorithmOpt = typer.Option("maml", "--algorithm", "-a", help="Few-shot: maml, fomaml, reptile, anil, metasgd, mamlpp.")
SettingOpt = typer.Option("5w1s", "--setting", "-s", help="Few-shot: a key of <benchmark>.settings in params.")
PreparedOpt = typer.Option(None, help="Few-shot: prepared data folder (default: data/prepared/<dataset>).")
EpisodesOpt = typer.Option(None, "--episodes", help="Few-shot: fixed episodes folder (default: data/episodes/<dataset>).")


def _check_benchmark(name: str) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (have: {', '.join(BENCHMARKS)})")


def _data_dirs(benchmark: str, prepared: Optional[Path], episodes: Optional[Path]) -> tuple[Path, Path]:
    dataset = "mini-imagenet" if benchmark == "mini_imagenet" else benchmark
    return prepared or Path("data/prepared") / dataset, episodes or Path("data/episodes") / dataset


@app.command()
def train(benchmark: str = typer.Argument(..., help="sinusoid, omniglot or mini_imagenet."),
          params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
          model: str = typer.Option("maml", help="Sinusoid: maml (the algorithm in params) or pretrain (the baseline)."),
          algorithm: str = AlgorithmOpt, setting: str = SettingOpt,
          run_dir: Optional[Path] = typer.Option(None, help="Checkpoints and the model go here "
                                                            "(default: runs/<benchmark>/<model> or <algorithm>-<setting>)."),
          prepared: Optional[Path] = PreparedOpt, episodes: Optional[Path] = EpisodesOpt,
          progress: bool = typer.Option(True, help="Show a progress bar."),
          ) -> None:
    """Meta-train, resuming from the newest checkpoint of the same configuration."""
    from mamlbench import runs
    from mamlbench.config import load_params
    _check_benchmark(benchmark)
    params = load_params(params, profile)
    if benchmark == "sinusoid":
        out = runs.train_sinusoid(params, model, run_dir or Path("runs") / benchmark / model, progress=progress)
        label = model
    else:
        prepared, episodes = _data_dirs(benchmark, prepared, episodes)
        label = f"{algorithm} {setting}"
        out = runs.train_fewshot(params, benchmark, algorithm, setting,
                                 run_dir or Path("runs") / benchmark / f"{algorithm}-{setting}",
                                 prepared=prepared, episodes_dir=episodes, progress=progress)
    typer.echo(f"trained {benchmark} {label}: {out['iterations']} iterations"
               + (f" (resumed at {out['resumed_from']})" if out["resumed_from"] else ""))


@app.command()
def evaluate(benchmark: str = typer.Argument(..., help="sinusoid, omniglot or mini_imagenet."),
             params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             algorithm: str = AlgorithmOpt, setting: str = SettingOpt,
             runs_dir: Optional[Path] = typer.Option(None, "--runs", help="Sinusoid: folder holding <model>/model.pt "
                                                     "(default: runs/sinusoid); few-shot: the training run folder."),
             out: Optional[Path] = typer.Option(None, help="Where metrics.json and tables go (default: <runs>/eval)."),
             prepared: Optional[Path] = PreparedOpt, episodes: Optional[Path] = EpisodesOpt,
             ) -> None:
    """Evaluate trained models on the fixed test tasks or episodes; print the table."""
    from mamlbench import runs
    from mamlbench.config import load_params
    _check_benchmark(benchmark)
    params = load_params(params, profile)
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


@app.command("check-params")
def check_params(params: Path = typer.Argument(Path("params.yaml"))) -> None:
    """Validate a params file and say which profile it resolves to."""
    from mamlbench.config import load_params
    resolved = load_params(params)
    typer.echo(f"{params}: ok (profile {resolved.profile})")


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    from mamlbench.train import TrainingDiverged
    try:
        app()
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
