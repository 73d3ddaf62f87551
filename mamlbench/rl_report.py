"""reports/rl/: the meta-RL reference runs, as the paper's fig. 5 with the budget each had.

Per task family: the return on the fixed test tasks before and after 1..3 policy-gradient steps for
MAML, the pretrained baseline and a random initialisation (means with 95% CIs over tasks, 1.96 std / sqrt(n)
from the stored per-task returns, as every table of the repo), MAML's paired per-task difference against
each baseline, the meta-iterations reached against the
protocol's, the wall time, what stopped training, and the machine's load; then the figures
(`adaptation.png` is fig. 5, `training.png` the meta-training curves, `trace.png` navigation's
paths). The small files it reads are copied to `<out>/<env>/runs/`, so the page rebuilds from the
repo byte for byte. `<out>/<env>/seed<k>/` folders are the DVC pipeline's (its rl-evaluate stage plots
there): the page says so, since they sit beside these runs' files.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from mamlbench.config import load_params
from mamlbench.io import write_text
from mamlbench.report import table, task_returns
from mamlbench.rl.params import ENV_NAMES
from mamlbench.stats import mean_ci95

TITLES = {"navigation": "2D navigation", "halfcheetah_dir": "HalfCheetah, forward/backward",
          "halfcheetah_vel": "HalfCheetah, target velocity", "ant_dir": "Ant, forward/backward",
          "ant_vel": "Ant, target velocity"}
POLICIES = ("maml", "pretrained", "random")
FIGURES = ("adaptation.png", "training.png", "trace.png", "adaptation.csv")
RUN_FILES = ("metrics.json", "evaluate.json", "train.json", "train-maml.json", "train-pretrained.json",
             "maml/history.json", "pretrained/history.json")
STAMP = re.compile(r"^# (\S+) (?:([0-9a-f]{7,40}) )?(.*?)\s*load: (\S+)")


def collect(runs: Path, out: Path, logs: Path | None = None) -> None:
    """Copy each finished env's small files (no policies) and figures from `runs/rl/<env>` to `out/<env>`."""
    for env in ENV_NAMES:
        source = Path(runs) / "rl" / env
        if not (source / "metrics.json").is_file():
            continue
        target = Path(out) / env
        for name in RUN_FILES:
            if (source / name).is_file():
                (target / "runs" / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, target / "runs" / name)
        for name in FIGURES:
            if (source / "plots" / name).is_file():
                shutil.copyfile(source / "plots" / name, target / name)
        for log in sorted((logs or Path(runs) / "logs").glob(f"rl-{env}*.log")):
            lines = [line for line in log.read_text().splitlines() if STAMP.match(line)]
            write_text(target / "runs" / log.name, "\n".join(lines) + "\n")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def provenance(folder: Path) -> dict[str, dict]:
    """{model: its training provenance}: train.json, or the two files of a split run."""
    found: dict[str, dict] = {}
    for name in ("train.json", "train-maml.json", "train-pretrained.json"):
        found.update(_read(folder / name).get("provenance", {}))
    return found


def returns_table(evaluation: dict) -> list[dict]:
    returns = task_returns(evaluation)
    steps = sorted(returns["maml"], key=lambda k: int(k.split("_")[1]))
    return [{"policy": p, **{f"step {k.split('_')[1]}": "{:.2f} ± {:.2f}".format(*returns[p][k]) for k in steps}}
            for p in POLICIES if p in returns]


def paired(evaluation: dict, other: str, step: str) -> tuple[float, float, int, int]:
    """MAML minus `other` per test task at `step`: mean, 95% CI half-width, tasks MAML wins, tasks."""
    a = np.asarray(evaluation["policies"]["maml"][step]["per_task"], dtype=float)
    b = np.asarray(evaluation["policies"][other][step]["per_task"], dtype=float)
    mean, ci = mean_ci95(a - b)
    return mean, ci, int((a > b).sum()), a.size


def _stamps(folder: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for log in sorted(folder.glob("rl-*.log")):
        rows += [STAMP.match(line).groups() for line in log.read_text().splitlines() if STAMP.match(line)]
    return sorted(rows)   # by time: a split run's two logs interleave


def summary_row(env: str, folder: Path, protocol_iterations: int) -> dict:
    runs = folder / "runs"
    evaluation = _read(runs / "evaluate.json")
    prov = provenance(runs).get("maml", {})
    history = _read(runs / "maml" / "history.json") or []
    row = {"task family": TITLES[env],
           "MAML after 1 step": "{:.2f} ± {:.2f}".format(*task_returns(evaluation)["maml"]["step_1"])}
    for other in ("pretrained", "random"):
        mean, ci, wins, n = paired(evaluation, other, "step_1")
        row[f"minus {other}"] = f"{mean:+.2f} ± {ci:.2f}" + (" ✓" if mean - ci > 0 else "")
    row["meta-iterations"] = f"{len(history)} of {protocol_iterations} ({prov.get('wall_seconds', float('nan')) / 60:.0f} min)"
    return row


def env_section(env: str, folder: Path, protocol_iterations: int) -> list[str]:
    runs = folder / "runs"
    evaluation, prov = _read(runs / "evaluate.json"), provenance(runs)
    lines = [f"## {TITLES[env]} (`{env}`)", ""]
    lines += ["Return on the fixed test tasks (means ± 95% CI over tasks) after 0–3 policy-gradient steps "
              "(the paper's fig. 5):", "", table_rows(returns_table(evaluation)), ""]
    steps = [k for k in evaluation["policies"]["maml"] if k != "step_0"]
    diffs = []
    for other in ("pretrained", "random"):
        for step in steps:
            mean, ci, wins, n = paired(evaluation, other, step)
            diffs.append({"MAML minus": other, "after": step.replace("_", " "), "difference": f"{mean:+.2f} ± {ci:.2f}",
                          "tasks MAML wins": f"{wins}/{n}"})
    lines += ["Paired per test task (same tasks, each policy's own episodes):", "", table_rows(diffs), ""]
    budget = []
    for model in ("maml", "pretrained"):
        p = prov.get(model, {})
        history = _read(runs / model / "history.json") if (runs / model / "history.json").is_file() else []
        budget.append({"model": model, "meta-iterations": f"{len(history)} of {protocol_iterations}",
                       "minutes": f"{p.get('wall_seconds', float('nan')) / 60:.1f}",
                       "stopped by": p.get("stopped", "?"), "commit": p.get("git_commit", "?")[:7],
                       "torch threads": p.get("threads", "?")})
    lines += ["Budget:", "", table_rows(budget), ""]
    stamps = _stamps(runs)
    if stamps:
        lines += ["Runner log (UTC time, commit, step, load average): "
                  + "; ".join(f"{t[:16]} {what or 'start'} {load}" for t, _, what, load in stamps) + ".", ""]
    lines += [f"![{env}: return vs steps]({env}/adaptation.png)", f"![{env}: meta-training]({env}/training.png)"]
    if (folder / "trace.png").is_file():
        lines.append(f"![{env}: paths]({env}/trace.png)")
    return lines + [""]


def pipeline_outputs(out: Path, profile: str) -> list[str]:
    """A line per `<env>/seed<k>/` folder: dvc.yaml's rl-evaluate stage writes its figures there (`--plots
    reports/rl/<env>/seed<k>`) under params.yaml's profile, so they are not these runs' and must say so."""
    lines = []
    for env in ENV_NAMES:
        for folder in sorted(f for f in (out / env).glob("seed*") if f.is_dir()):
            files = ", ".join(f"`{f.name}`" for f in sorted(folder.iterdir()) if f.is_file())
            lines.append(f"- `{env}/{folder.name}/` ({files}): written by `dvc repro`'s "
                         f"`rl-evaluate@{env}-{folder.name[4:]}` stage under params.yaml's profile, `{profile}`"
                         + (": a smoke test's budget, not a result" if profile == "quick" else "")
                         + "; its numbers are in the pipeline's report, [../README.md](../README.md).")
    if not lines:
        return []
    return [f"## Not these runs: the `{profile}` pipeline's outputs", "",
            "These folders sit beside the reference runs but hold none of their results; no table or figure "
            "above reads them:", "", *lines, ""]


def table_rows(rows: list[dict]) -> str:
    import pandas as pd
    return table(pd.DataFrame(rows))


COMMANDS = """\
The runs: `scripts/rl_reference_runs.sh <root> 1` and `... <root> 2` side by side (one torch thread each).
Worker 1 trains 2D navigation's MAML (`mamlbench rl train navigation --only maml --profile rl_reference`)
and evaluates navigation once worker 2 has trained its pretrained baseline (`--only pretrained`, after the
MuJoCo families); worker 2 runs, per MuJoCo family, `mamlbench rl train <env> --profile rl_reference` then
`mamlbench rl evaluate <env> --profile rl_reference`. This page: `mamlbench rl report --runs <root> --out reports/rl
--note reports/rl/NOTE.md`; without `--runs` it rebuilds from the copies under reports/rl/ alone.
Through DVC, one process per family: `dvc exp run -S profile=rl_reference -S 'rl.envs=[navigation,halfcheetah_dir]'`.
"""


def build_rl_report(out: str | Path, runs: str | Path | None = None, params_path: str | Path = "params.yaml",
                    note: str | Path | None = None) -> Path:
    """Collect from `runs` (when given) into `out`, then write `out/README.md` from `out` alone."""
    out = Path(out)
    if runs is not None:
        collect(Path(runs), out)
    paper = load_params(params_path, profile="paper").rl
    reference = load_params(params_path, profile="rl_reference").rl
    envs = [e for e in ENV_NAMES if (out / e / "runs" / "metrics.json").is_file()]
    test = reference.navigation.evaluate
    budgets = ", ".join(f"{e} {reference.env(e).time_budget_minutes:g} min" if reference.env(e).time_budget_minutes
                        else f"{e} {reference.env(e).iterations} iterations" for e in ENV_NAMES)
    lines = ["# Meta-RL reference runs", "",
             "MAML-TRPO against the pretrained baseline and a random initialisation under `--profile rl_reference`: "
             f"the paper's protocol (`profile: paper`; docs/protocols.md, meta-RL) with these budgets: {budgets} "
             "(the pretrained baseline trains as many TRPO steps as MAML reached). Test: "
             f"{test.n_tasks} fixed test tasks (direction families: half forward, half backward), {test.n_episodes} "
             f"episodes per task and step, step sizes {', '.join(f'{a:g}' for a in test.inner_lrs)}. MuJoCo "
             "dynamics as rllab's (time step, reset noise, observations; docs/protocols.md, meta-RL), so returns "
             "are on the paper's scale. Machine: the 2-core CPU (no GPU), one torch thread per run, two runs side "
             "by side. ±: a 95% CI over the test tasks, 1.96 · std / √n with the population std (ddof 0), the "
             "original MAML code's formula and that of every few-shot table (`mamlbench.stats.mean_ci95`), "
             "computed here from the per-task returns in `evaluate.json`; the figures `adaptation.png`, drawn "
             "by `mamlbench rl evaluate` when these runs were evaluated, shade a Student-t interval (ddof 1), "
             "4.5% wider at 40 tasks (`rl evaluate` now draws the tables' formula). "
             "✓: MAML above the baseline, the paired CI clear of zero.", ""]
    if note and Path(note).is_file():
        lines += [Path(note).read_text().strip(), ""]
    if envs:
        lines += ["## Summary", "", "After one policy-gradient step, MAML minus each baseline on the same test tasks "
                  "(95% CI over tasks), and how far meta-training got:", "",
                  table_rows([summary_row(e, out / e, paper.env(e).iterations) for e in envs]), ""]
    for env in envs:
        lines += env_section(env, out / env, paper.env(env).iterations)
    missing = [e for e in ENV_NAMES if e not in envs]
    if missing:
        lines += ["Not run yet: " + ", ".join(f"`{e}`" for e in missing) + ".", ""]
    lines += pipeline_outputs(out, load_params(params_path).profile)
    lines += ["## Commands", "", COMMANDS]
    path = out / "README.md"
    write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
