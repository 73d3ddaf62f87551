"""The reference table: the paper's Table 1 cells trained under `--profile reference`, at one CPU's budget.

`reports/reference/README.md` is written from the run folders alone: each cell's test accuracy (mean
and 95% CI over the 600 fixed episodes, or over seeds), the paper's number and the difference, the
budget it had (iterations reached, wall time, machine), a paired comparison against MAML on the same
episodes, validation accuracy against wall time (how far from converged each cell stopped), the
sinusoid at the paper's 70,000 iterations beside the quick profile's, and the provenance lines. The
small files it reads are copied under `<out>/runs/`, so the report can be rebuilt from the repo.
"""
from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from mamlbench.config import fewshot_train, load_params
from mamlbench.guards import read_json
from mamlbench.io import write_text
from mamlbench.report import PAPER, _plt, paired_files, pct, provenance_line, save_figure, seeds_ci95, table
from mamlbench.stats import mean_ci95

SETTINGS = {"5w1s": "5-way 1-shot", "5w5s": "5-way 5-shot", "20w1s": "20-way 1-shot", "20w5s": "20-way 5-shot"}
VARIANTS = {"maml": "MAML", "fomaml": "first-order MAML", "anil": "ANIL", "metasgd": "Meta-SGD",
            "mamlpp": "MAML++", "reptile": "Reptile", "boil": "BOIL", "protonet": "Prototypical Networks",
            "protomaml": "fo-Proto-MAML", "cavia": "CAVIA", "imaml": "iMAML", "baseline": "Baseline (fine-tuning)"}


@functools.lru_cache(maxsize=None)
def protocol_iterations(algorithm: str, setting: str, params_path: str = "params.yaml") -> int:
    """The meta-updates of a cell's own protocol: `profile: paper`'s, read from the params file."""
    return fewshot_train(load_params(params_path, profile="paper"), "omniglot", algorithm, setting).iterations


CELL = re.compile(r"^(?P<algorithm>[a-z]+)-(?P<setting>\d+w\d+s)-seed(?P<seed>\d+)$")
FEWSHOT_FILES = ("train.json", "curve.csv", "clock.csv", "eval/metrics.json", "eval/steps.csv", "eval/per_episode.csv")
SINUSOID_FILES = ("maml/train.json", "maml/clock.csv", "pretrain/train.json", "pretrain/clock.csv",
                  "eval/metrics.json", "eval/per_task.csv")
COMMANDS = """\
Each cell was run by `scripts/reference_runs.sh <root> <worker>` (two workers side by side, one torch
thread each), which for an Omniglot cell runs

    mamlbench train omniglot -a <variant> -s <setting> --seed <k> --profile reference --run-dir <root>/omniglot/<variant>-<setting>-seed<k>
    mamlbench evaluate omniglot -a <variant> -s <setting> --seed <k> --profile reference --runs <that folder> --out <that folder>/eval

and for the sinusoid `mamlbench train sinusoid --model maml|pretrain --profile reference` and
`mamlbench evaluate sinusoid --profile reference`; the quick column is the same under `--profile quick`.
Through DVC, the same cells are experiments on the pipeline's matrix stages:

    dvc exp run -S profile=reference -S 'omniglot.run.algorithms=[maml,fomaml]' -S 'omniglot.run.settings=[5w1s,5w5s,20w1s,20w5s]' omniglot-train omniglot-evaluate
    dvc exp run -S profile=reference -S 'omniglot.run.algorithms=[maml]' -S 'omniglot.run.settings=[5w1s]' -S 'seeds=[0,1,2]' omniglot-train omniglot-evaluate
    dvc exp run -S profile=reference -S 'omniglot.run.algorithms=[anil,metasgd,mamlpp,reptile]' -S 'omniglot.run.settings=[5w1s]' omniglot-train omniglot-evaluate
    dvc exp run -S profile=reference sinusoid-train sinusoid-evaluate

The report: `mamlbench report-reference --runs <root> --quick <quick root> --out reports/reference`.
"""


# ----------------------------------------------------------------------------- inputs
def collect(runs: Path, out: Path) -> Path:
    """Copy the small files the report reads from `runs` to `out/runs` (no models); returns `out/runs`."""
    runs, kept = Path(runs), Path(out) / "runs"
    if runs.resolve() == kept.resolve():
        return kept
    for folder in sorted((runs / "omniglot").glob("*-seed*")):
        _copy(folder, kept / "omniglot" / folder.name, FEWSHOT_FILES)
    for folder in sorted((runs / "sinusoid").glob("seed*")):
        _copy(folder, kept / "sinusoid" / folder.name, SINUSOID_FILES)
    if (runs / "logs").is_dir():
        _copy(runs / "logs", kept / "logs", sorted(p.name for p in (runs / "logs").glob("*.log")))
    return kept


LOAD = re.compile(r"^# \S+ .*load: (?P<one>[\d.]+) ")


def machine_load(runs: Path, algorithm: str, setting: str, seed: int) -> str:
    """The 1-minute load average when the cell started and ended (its log's first and last `# ... load:`
    lines, written by scripts/reference_runs.sh); "—" without a log. 2 cores: above 2, cells shared them."""
    log = Path(runs) / "logs" / f"omniglot-{algorithm}-{setting}-seed{seed}.log"
    if not log.is_file():
        return "—"
    loads = [m["one"] for m in map(LOAD.match, log.read_text().splitlines()) if m]
    return " → ".join(loads[:1] + loads[-1:]) if loads else "—"


def _copy(source: Path, target: Path, names) -> None:
    for name in names:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)


def _json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def fewshot_cells(runs: Path) -> pd.DataFrame:
    """One row per Omniglot run folder: its test result (if evaluated), budget and provenance."""
    rows = []
    for folder in sorted((Path(runs) / "omniglot").glob("*-seed*")):
        match = CELL.match(folder.name)
        if match is None or match["setting"] not in SETTINGS:
            continue
        train, metrics = _json(folder / "train.json"), _json(folder / "eval" / "metrics.json")
        trained = train.get("provenance") or {}
        rows.append({"algorithm": match["algorithm"], "setting": match["setting"], "seed": int(match["seed"]),
                     "folder": folder, "acc": metrics.get("acc"), "ci95": metrics.get("ci95"),
                     "n_episodes": metrics.get("n_episodes"), "iterations": train.get("iterations"),
                     "seconds": trained.get("wall_seconds", train.get("seconds")), "stopped": trained.get("stopped"),
                     "checkpoint": metrics.get("checkpoint"), "ensemble": metrics.get("ensemble_iterations"),
                     "trained": trained, "evaluated": metrics.get("provenance") or {}})
    return pd.DataFrame(rows, columns=["algorithm", "setting", "seed", "folder", "acc", "ci95", "n_episodes",
                                       "iterations", "seconds", "stopped", "checkpoint", "ensemble", "trained",
                                       "evaluated"])


def validation_curve(folder: Path) -> pd.DataFrame:
    """(minutes, val_acc) of a run: curve.csv's validations at clock.csv's wall time."""
    curve, clock = folder / "curve.csv", folder / "clock.csv"
    if not (curve.is_file() and clock.is_file()):
        return pd.DataFrame(columns=["minutes", "val_acc"])
    c = pd.read_csv(curve)
    if "meta_val/query_acc" not in c:
        return pd.DataFrame(columns=["minutes", "val_acc"])
    joined = c.dropna(subset=["meta_val/query_acc"]).merge(pd.read_csv(clock), on="iteration")
    return pd.DataFrame({"minutes": joined["seconds"] / 60.0, "val_acc": joined["meta_val/query_acc"]})


# ----------------------------------------------------------------------------- few-shot
def _result(group: pd.DataFrame) -> tuple[float, float, str]:
    """Mean and CI of a cell: over episodes for one seed, over seeds (t-based) for several."""
    done = group.dropna(subset=["acc"])
    if len(done) == 1:
        return float(done["acc"].iloc[0]), float(done["ci95"].iloc[0]), "600 episodes" if done[
            "n_episodes"].iloc[0] == 600 else f"{int(done['n_episodes'].iloc[0])} episodes"
    mean, ci = seeds_ci95(done["acc"])
    return mean, ci, f"{len(done)} seeds"


def _paper(algorithm: str, setting: str) -> tuple[float, float | None] | None:
    return PAPER["omniglot"].get((algorithm, setting))


def in_reference_set(algorithm: str, setting: str) -> bool:
    """MAML and first-order MAML in every setting; the other variants at 5-way 1-shot."""
    return algorithm in ("maml", "fomaml") or setting == "5w1s"


def _not_run(group: pd.DataFrame, algorithm: str, setting: str) -> str:
    if group.empty:
        return "not run: no session time left for it" if in_reference_set(algorithm, setting) else "—"
    return "not run: trained, not evaluated" if group["iterations"].notna().any() else "not run: still training"


def table_one(cells: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 layout: a row per variant, a column per setting, ours (paper)."""
    rows = []
    for algorithm, name in VARIANTS.items():
        row = {"method": name}
        for setting, title in SETTINGS.items():
            group = cells[(cells["algorithm"] == algorithm) & (cells["setting"] == setting)]
            paper = _paper(algorithm, setting)
            if group["acc"].notna().any():
                mean, ci, _ = _result(group)
                text = f"**{pct(mean, ci)}**"
                if paper is not None:
                    text += f" (paper {paper[0]:.2f}; {100 * mean - paper[0]:+.2f})"
            else:
                text = _not_run(group, algorithm, setting)
            row[title] = text
        rows.append(row)
    return pd.DataFrame(rows)


def budget_table(cells: pd.DataFrame, runs: Path) -> pd.DataFrame:
    """Per cell: what it was given and what it reached, and the paired difference against MAML."""
    rows = []
    rank = {a: i for i, a in enumerate(VARIANTS)}   # the page's order: setting, then the variant's row
    groups = sorted(cells.groupby(["algorithm", "setting"], sort=False),
                    key=lambda g: (list(SETTINGS).index(g[0][1]), rank.get(g[0][0], len(rank))))
    for (algorithm, setting), group in groups:
        group = group.sort_values("seed")
        paper = _paper(algorithm, setting)
        done = group.dropna(subset=["acc"])
        mean, ci, over = _result(group) if not done.empty else (None, None, "—")
        iterations = [int(i) for i in group["iterations"].dropna()]
        seconds = [float(s) for s in group["seconds"].dropna()]
        rate = np.mean([i / s for i, s in zip(iterations, seconds) if s]) if seconds else None
        rows.append({
            "variant": VARIANTS.get(algorithm, algorithm), "setting": setting,
            "seeds": ", ".join(str(s) for s in group["seed"]),
            "accuracy % (95% CI)": "—" if mean is None else f"{pct(mean, ci)} ({over})",
            "paper %": "—" if paper is None else f"{paper[0]:.2f}" + (f" ± {paper[1]:.2f}" if paper[1] else ""),
            "ours − paper": "—" if mean is None or paper is None else f"{100 * mean - paper[0]:+.2f}",
            "− MAML, paired (seed 0)": _against_maml(cells, algorithm, setting),
            "meta-updates reached": " / ".join(f"{i:,}" for i in iterations) or "—",
            "of the protocol's": f"{protocol_iterations(algorithm, setting):,}",
            "training min": " / ".join(f"{s / 60:.1f}" for s in seconds) or "—",
            "updates/s": "—" if rate is None else f"{rate:.2f}",
            "stopped by": ", ".join(dict.fromkeys(str(s).replace("_", " ") for s in group["stopped"].dropna())) or "—",
            "tested": _tested(done),
            "load, start → end": " / ".join(machine_load(runs, algorithm, setting, s) for s in group["seed"]),
        })
    return pd.DataFrame(rows)


def _tested(done: pd.DataFrame) -> str:
    if done.empty:
        return "—"
    first = done.iloc[0]
    if isinstance(first["ensemble"], list) and first["ensemble"]:
        return f"top-{len(first['ensemble'])} ensemble"
    return {"model.pt": "final model", "best.pt": "best on validation"}.get(first["checkpoint"], str(first["checkpoint"]))


def _against_maml(cells: pd.DataFrame, algorithm: str, setting: str) -> str:
    if algorithm == "maml":
        return "—"
    def folder(a: str):
        found = cells[(cells["algorithm"] == a) & (cells["setting"] == setting) & (cells["seed"] == 0)
                      & cells["acc"].notna()]
        return None if found.empty else found["folder"].iloc[0] / "eval"
    a, b = folder(algorithm), folder("maml")
    if a is None or b is None:
        return "—"
    try:
        d = paired_files(a, b)
    except ValueError:  # evaluated on another episode set: no paired difference, said so
        return "not paired: other episodes"
    return f"{100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f}"


def plot_wall_time(cells: pd.DataFrame, path: Path) -> None:
    """Validation accuracy against training wall time, a panel per setting, a line per variant."""
    plt = _plt()
    settings = [s for s in SETTINGS if (cells["setting"] == s).any()]
    fig, axes = plt.subplots(1, max(len(settings), 1), figsize=(3.6 * max(len(settings), 1), 3.4), squeeze=False)
    palette = plt.get_cmap("tab20").colors   # 11 variants: more than the default cycle's 10 colours
    colors = {a: palette[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1] for i, a in enumerate(VARIANTS)}
    for ax, setting in zip(axes[0], settings):
        for algorithm, name in VARIANTS.items():
            group = cells[(cells["algorithm"] == algorithm) & (cells["setting"] == setting)].sort_values("seed")
            for i, folder in enumerate(group["folder"]):
                curve = validation_curve(folder)
                if curve.empty:
                    continue
                ax.plot(curve["minutes"], 100 * curve["val_acc"], "o-" if i == 0 else "-", ms=2.5,
                        lw=1.4 if i == 0 else 0.8, alpha=1.0 if i == 0 else 0.5, color=colors[algorithm],
                        label=name if i == 0 else (f"{name}, other seeds" if i == 1 else None))
        paper = _paper("maml", setting)
        if paper is not None:
            ax.axhline(paper[0], color="grey", ls="--", lw=0.8, label="MAML, paper (test)")
        ax.set(title=SETTINGS[setting], xlabel="training wall time (min)",
               ylabel="validation accuracy (%)" if setting == settings[0] else None)
    labels = {}   # one legend under the panels: a variant keeps its colour in every panel
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(labels), 6), fontsize=7, frameon=False)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- sinusoid
def sinusoid_table(runs: Path, quick: Path | None) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """MSE after 0/1/5/10 steps for K = 5, 10, 20: MAML and the pretrained baseline, reference and quick."""
    sources = {"70,000 its": Path(runs) / "sinusoid" / "seed0"}
    if quick is not None:
        sources["quick"] = Path(quick) / "sinusoid" / "seed0"
    frames, trained, evaluated = {}, [], []
    for label, folder in sources.items():
        if (folder / "eval" / "per_task.csv").is_file():
            frames[label] = pd.read_csv(folder / "eval" / "per_task.csv")
            if label != "quick":
                trained += [_json(folder / m / "train.json").get("provenance") or {} for m in ("maml", "pretrain")]
                evaluated.append(_json(folder / "eval" / "metrics.json").get("provenance") or {})
    rows = []
    if "70,000 its" not in frames:
        return pd.DataFrame(), trained, evaluated
    for (k, steps), _ in frames["70,000 its"].groupby(["k_shot", "inner_steps"]):
        row = {"K": int(k), "inner steps": int(steps)}
        for label, frame in frames.items():
            for model, name in (("maml", "MAML"), ("pretrain", "pretrained")):
                mse = frame[(frame["k_shot"] == k) & (frame["inner_steps"] == steps) & (frame["model"] == model)]["mse"]
                mean, ci = mean_ci95(mse.to_numpy())
                row[f"{name}, {label}"] = f"{mean:.3f} ± {ci:.3f}"
        rows.append(row)
    return pd.DataFrame(rows), trained, evaluated


def sinusoid_budget(runs: Path, quick: Path | None) -> str:
    parts = []
    for label, root in (("reference", runs), ("quick", quick)):
        if root is None:
            continue
        for model in ("maml", "pretrain"):
            p = (_json(Path(root) / "sinusoid" / "seed0" / model / "train.json").get("provenance") or {})
            if p:
                parts.append(f"{model} ({label}) {p.get('iterations', 0):,} iterations in {p.get('wall_seconds', 0) / 60:.1f} min")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the page
def build_reference(runs: str | Path, out: str | Path, quick: str | Path | None = None,
                    note: str | Path | None = None) -> Path:
    """Write `out/README.md` and `out/wall_time.png` from the reference runs (and the quick sinusoid)."""
    out = Path(out)
    runs = collect(Path(runs), out)
    if quick is not None:
        quick_kept = out / "runs" / "quick"
        if Path(quick).resolve() != quick_kept.resolve():
            for folder in sorted((Path(quick) / "sinusoid").glob("seed*")):
                _copy(folder, quick_kept / "sinusoid" / folder.name, SINUSOID_FILES)
        quick = quick_kept
    cells = fewshot_cells(runs)
    if cells.empty and not (runs / "sinusoid").is_dir():
        raise ValueError(f"{runs}: no reference runs (omniglot/<variant>-<setting>-seed<k> or sinusoid/seed<k>); "
                         "run scripts/reference_runs.sh first")
    lines = ["# The reference table: the paper's protocol at one CPU's budget", "",
             "Generated by `mamlbench report-reference` from the run folders under `runs/` (do not edit by hand).",
             "Every cell runs `profile: paper`'s protocol (docs/protocols.md) except for its budget: each Omniglot",
             "cell trains for 10 minutes of wall time (`profile: reference`), far short of the paper's updates,",
             "then is tested on the 600 fixed test episodes exactly as the paper's protocol tests.", ""]
    if note is not None and Path(note).is_file():
        lines += [Path(note).read_text().strip(), ""]
    lines += ["## Omniglot (Finn et al. 2017, Table 1)", "",
              "Test accuracy %, mean ± 95% CI (over the 600 episodes for one seed, t-based over seeds for",
              "several), with the paper's number and our difference. The set: MAML and first-order MAML in",
              "every setting, the other variants at 5-way 1-shot under their own papers' protocols and the",
              "same wall time as MAML (— : not in the set).", "", table(table_one(cells)), ""]
    if not cells.empty:
        lines += ["### Budget of each cell", "",
                  "Meta-updates reached by the time budget (per seed), against the updates of the variant's own",
                  "protocol; the paired difference against MAML is on the same 600 episodes (seed 0). Load: the",
                  "machine's 1-minute load average when the cell started and ended; two cells shared the 2 cores",
                  "(one thread each), so about 2 is the norm and more means other work slowed the cell.", "",
                  table(budget_table(cells, runs)), ""]
        plot_wall_time(cells, out / "wall_time.png")
        lines += ["Validation accuracy (the `n_val_episodes` validation episodes of each cell, after the test's",
                  "inner steps) against training wall time: every curve still rising is a cell that more time",
                  "would move.", "", "![validation accuracy against wall time](wall_time.png)", "",
                  provenance_line(list(cells["trained"]), list(cells["evaluated"])), ""]
    frame, trained, evaluated = sinusoid_table(runs, quick)
    lines += ["## Sinusoid regression (Finn et al. 2017, section 5.1)", ""]
    if frame.empty:
        lines += ["Not run.", ""]
    else:
        lines += ["Query MSE on the 600 fixed test tasks (mean ± 95% CI), MAML and the pretrained baseline at the",
                  "paper's 70,000 iterations beside the quick profile's 8,000 (seed 0; quick also departs to "
                  "`sinusoid.init: torch`, docs/protocols.md). Budget: "
                  + sinusoid_budget(runs, quick) + ".", "", table(frame), "", provenance_line(trained, evaluated), ""]
    lines += ["## What a GPU would add", "",
              _gpu_line(cells), "", "## Commands", "", COMMANDS]
    text = "\n".join(lines)
    write_text(out / "README.md", text)
    return out / "README.md"


def _gpu_line(cells: pd.DataFrame) -> str:
    done = cells.dropna(subset=["iterations"])
    if done.empty:
        return "No cell has run yet."
    shares = {(r["algorithm"], r["setting"]): float(r["iterations"]) / protocol_iterations(r["algorithm"], r["setting"])
              for _, r in done.iterrows()}
    complete = sorted({VARIANTS.get(a, a) for (a, _), v in shares.items() if v >= 1})
    short = [v for v in shares.values() if v < 1]
    gpu = ("The full protocol is `profile: paper` (`dvc exp run -S profile=paper`, `train.device: auto` takes the "
           "GPU); its time on a GPU has not been measured on this project's machines, so no estimate is given here.")
    lead = f"{', '.join(complete)} ran {'its' if len(complete) == 1 else 'their'} whole protocol. " if complete else ""
    if not short:
        return lead + gpu
    return (lead + f"No {'other ' if complete else ''}cell here reached more than {100 * max(short):.1f}% of its "
            f"protocol's meta-updates: {'those numbers are short-budget numbers' if complete else 'every number above is a short-budget number'}, "
            "not the paper's. " + gpu)
