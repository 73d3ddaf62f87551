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

BENCHMARKS = ("sinusoid",)
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file (validated before any work).")


def _check_benchmark(name: str) -> None:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (have: {', '.join(BENCHMARKS)})")


@app.command()
def train(benchmark: str = typer.Argument(..., help="Benchmark to meta-train: sinusoid."),
          params: Path = ParamsOpt,
          model: str = typer.Option("maml", help="maml (the algorithm in params) or pretrain (the paper's baseline)."),
          run_dir: Optional[Path] = typer.Option(None, help="Checkpoints and model.pt go here [runs/<benchmark>/<model>]."),
          progress: bool = typer.Option(True, help="Show a progress bar."),
          ) -> None:
    """Meta-train, resuming from the newest checkpoint of the same configuration."""
    from mamlbench import runs
    _check_benchmark(benchmark)
    out = runs.train_sinusoid(params, model, run_dir or Path("runs") / benchmark / model, progress=progress)
    typer.echo(f"trained {benchmark} {model}: {out['iterations']} iterations"
               + (f" (resumed at {out['resumed_from']})" if out["resumed_from"] else ""))


@app.command()
def evaluate(benchmark: str = typer.Argument(..., help="Benchmark to evaluate: sinusoid."),
             params: Path = ParamsOpt,
             runs_dir: Path = typer.Option(Path("runs/sinusoid"), "--runs", help="Folder holding <model>/model.pt."),
             out: Path = typer.Option(Path("runs/sinusoid/eval"), help="Where metrics.json, per_task.csv, fits.png go."),
             ) -> None:
    """Evaluate trained models on the fixed test tasks; print the table."""
    from mamlbench import runs
    _check_benchmark(benchmark)
    metrics = runs.evaluate_sinusoid(params, {"maml": runs_dir / "maml", "pretrain": runs_dir / "pretrain"}, out)
    for name, by_k in metrics.items():
        for k, by_step in by_k.items():
            cells = "  ".join(f"{s}: {v['mse']:.3f}±{v['ci95']:.3f}" for s, v in by_step.items())
            typer.echo(f"{name:9s} {k:4s} {cells}")


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
