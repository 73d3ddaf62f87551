"""`mamlbench rl ...`: meta-RL with MAML-TRPO (issue 5).

    mamlbench rl train navigation        # MAML-TRPO + pretrained baseline, resumes from checkpoints
    mamlbench rl evaluate navigation     # return after 0..3 inner steps, plots
    mamlbench rl envs                    # the task distributions
"""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Meta-reinforcement learning: MAML-TRPO on 2D navigation, HalfCheetah and Ant.",
                  no_args_is_help=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameters file (validated before any work).")
ProfileOpt = typer.Option(None, "--profile", help="Use this entry of `profiles` instead of the file's `profile`.")
SeedOpt = typer.Option(None, "--seed", help="Training seed in place of params' `seed` (DVC passes each of `seeds`).")


def _check_env(env: str) -> None:
    from mamlbench.rl.envs import ENVS, UnknownEnvError
    if env not in ENVS:
        raise UnknownEnvError(f"unknown environment {env!r} (known: {', '.join(ENVS)})")


@app.command()
def envs() -> None:
    """List the task distributions."""
    from mamlbench.rl.envs import ENVS
    for name in ENVS:
        typer.echo(name)


@app.command()
def train(env: str = typer.Argument(..., help="navigation, halfcheetah_dir, halfcheetah_vel, ant_dir or ant_vel."),
          params: Path = ParamsOpt,
          out: Path = typer.Option(None, help="Run folder; maml/ and pretrained/ go inside \\[runs/rl/<env>]."),
          metrics: Path = typer.Option(None, help="Final training metrics JSON \\[<out>/train.json]."),
          progress: bool = typer.Option(True, help="Show a progress bar."), seed: int = SeedOpt,
          profile: str = ProfileOpt,
          only: str = typer.Option(None, help="maml or pretrained: train one of the two (two processes side by "
                                              "side; under a time budget, maml first)."),
          ) -> None:
    """Meta-train MAML-TRPO and the pretrained baseline, resuming from checkpoints."""
    from mamlbench.rl.pipeline import MODELS, train_env
    _check_env(env)
    models = MODELS if only is None else (only,)
    out = out or Path("runs/rl") / env
    metrics = metrics or out / "train.json"
    if not progress:
        summary = train_env(params, env, out, metrics, seed=seed, profile=profile, models=models)
    else:
        from mamlbench.progress import Progress
        bars: dict[str, Progress] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in bars:  # the next model: the previous bar is done
                for bar in bars.values():
                    bar.close()
                bars[label] = Progress(label, total, start=done - 1)
            bars[label].update(done)
        try:
            summary = train_env(params, env, out, metrics, progress=update, seed=seed, profile=profile, models=models)
        finally:
            for bar in bars.values():
                bar.close()
    for model, m in summary.items():
        typer.echo(f"{env} {model}: post-update return {m.get('returns/post_update', float('nan')):.2f}")


@app.command()
def evaluate(env: str = typer.Argument(..., help="An environment trained with `mamlbench rl train`."),
             params: Path = ParamsOpt,
             runs: Path = typer.Option(None, help="Run folder holding maml/ and pretrained/ \\[runs/rl/<env>]."),
             metrics: Path = typer.Option(None, help="Metrics JSON \\[<runs>/metrics.json]."),
             plots: Path = typer.Option(None, help="Plot folder \\[reports/rl/<env>]."), seed: int = SeedOpt,
             profile: str = ProfileOpt) -> None:
    """Return after 0..K inner steps for meta-trained, pretrained and random policies (95% CIs)."""
    from mamlbench.rl.pipeline import evaluate_env
    _check_env(env)
    runs = runs or Path("runs/rl") / env
    summary = evaluate_env(params, env, runs, metrics or runs / "metrics.json",
                           plots or Path("reports/rl") / env, seed=seed, profile=profile)
    steps = list(next(iter(summary.values())))
    typer.echo(f"{'policy':<12}" + "".join(f"{s:>18}" for s in steps))
    for model, by_step in summary.items():
        typer.echo(f"{model:<12}" + "".join(f"{v['mean']:>10.2f} ± {v['ci95']:<5.2f}" for v in by_step.values()))


@app.command()
def report(runs: Path = typer.Option(None, help="Root of the reference runs (<runs>/rl/<env>/, <runs>/logs/); "
                                                "omitted: rebuild from the copies under --out."),
           out: Path = typer.Option(Path("reports/rl"), help="Page and figures: <out>/README.md, <out>/<env>/."),
           params: Path = ParamsOpt,
           note: Path = typer.Option(None, help="A markdown note placed under the page's introduction.")) -> None:
    """The meta-RL reference page: fig. 5 per task family with its budget, paired against the baselines."""
    from mamlbench.rl_report import build_rl_report
    typer.echo(build_rl_report(out, runs, params, note))
