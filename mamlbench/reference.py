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
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from mamlbench.config import fewshot_cell, load_params
from mamlbench.guards import read_json
from mamlbench.io import write_text
from mamlbench.report import (PAPER, _plt, final_step, paired_files, pct, provenance_line, save_figure, seeds_ci95, table,
                              unequal, variant_style)
from mamlbench.stats import mean_ci95

SETTINGS = {"5w1s": "5-way 1-shot", "5w5s": "5-way 5-shot", "20w1s": "20-way 1-shot", "20w5s": "20-way 5-shot"}
VARIANTS = {"maml": "MAML", "fomaml": "first-order MAML", "anil": "ANIL", "metasgd": "Meta-SGD",
            "mamlpp": "MAML++", "reptile": "Reptile", "boil": "BOIL", "protonet": "Prototypical Networks",
            "protomaml": "fo-Proto-MAML", "cavia": "CAVIA", "imaml": "iMAML", "baseline": "Baseline (fine-tuning)"}
# Whose protocol each row runs (docs/protocols.md has the section, its files and lines): "its own code"
# only where a reference implementation was read; the rest run MAML's with what the variant changes.
PROTOCOLS = {"maml": "cbfinn/maml", "fomaml": "cbfinn/maml (--stop_grad)",
             "anil": "MAML's (Raghu et al. 2020 publish no Omniglot code)",
             "metasgd": "MAML's, one step, α learned (Li et al. 2017, no code)",
             "mamlpp": "its own code (HowToTrainYourMAMLPytorch configs)",
             "reptile": "its own code (supervised-reptile README commands)",
             "boil": "MAML's, head frozen in the inner loop (its code not yet read)",
             "protonet": "its own code (prototypical-networks)",
             "protomaml": "MAML's, fo-Proto-MAML head (Triantafillou et al. 2020 ran Meta-Dataset)",
             "cavia": "its own code (lmzintgraf/cavia arguments), in part",
             "imaml": "its own code (imaml_dev examples)",
             "baseline": "its own code (CloserLookFewShot)"}


def protocol_iterations(algorithm: str, setting: str) -> int:
    """The meta-updates of a cell's own protocol: `profile: paper`'s, read from the params file."""
    return cell_train(algorithm, setting, "paper").iterations


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

The report: `mamlbench report-reference --runs <root> --quick <quick root> --note reports/reference/NOTE.md --out reports/reference`
(rebuilt from the copies alone: `--runs reports/reference/runs --quick reports/reference/runs/quick`).
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
            "protocol": PROTOCOLS.get(algorithm, "—"), "head init": _head_init(algorithm, setting),
            "− MAML at matched wall time, paired (seed 0)": _against_maml(cells, algorithm, setting),
            "− MAML at matched updates, validation (seed 0)": _matched_text(matched_updates(cells, algorithm, setting)),
            "meta-updates reached": (" / ".join(f"{i:,}" for i in iterations) or "—") + _unequal_updates(cells, group, setting),
            "of the protocol's": f"{protocol_iterations(algorithm, setting):,}",
            "training min": " / ".join(f"{s / 60:.1f}" for s in seconds) or "—",
            "updates/s": "—" if rate is None else f"{rate:.2f}",
            "stopped by": ", ".join(dict.fromkeys(str(s).replace("_", " ") for s in group["stopped"].dropna())) or "—",
            "tested": _tested(done),
            "load, start → end": " / ".join(machine_load(runs, algorithm, setting, s) for s in group["seed"]),
        })
    return pd.DataFrame(rows)


def _unequal_updates(cells: pd.DataFrame, group: pd.DataFrame, setting: str) -> str:
    """⚠ where a cell's updates differ from MAML's (seed by seed) by more than 5%: its comparison
    at matched wall time is then also a comparison of budgets."""
    maml = cells[(cells["algorithm"] == "maml") & (cells["setting"] == setting)].set_index("seed")["iterations"]
    for row in group.itertuples():
        theirs = maml.get(row.seed)
        if row.algorithm != "maml" and row.iterations and theirs and unequal(row.iterations, theirs):
            return unequal(row.iterations, theirs)
    return ""


def _tested(done: pd.DataFrame) -> str:
    if done.empty:
        return "—"
    first = done.iloc[0]
    if isinstance(first["ensemble"], list) and first["ensemble"]:
        return f"top-{len(first['ensemble'])} ensemble"
    return {"model.pt": "final model", "best.pt": "best on validation"}.get(first["checkpoint"], str(first["checkpoint"]))


def _seed0(cells: pd.DataFrame, algorithm: str, setting: str) -> pd.Series | None:
    found = cells[(cells["algorithm"] == algorithm) & (cells["setting"] == setting) & (cells["seed"] == 0)
                  & cells["acc"].notna()]
    return None if found.empty else found.iloc[0]


def matched_time(cells: pd.DataFrame, algorithm: str, setting: str) -> dict | None:
    """The paired test difference against MAML (seed 0): both cells had the same wall-time budget, so
    this is the comparison at matched time (the budget columns say where a cell stopped sooner)."""
    a, b = _seed0(cells, algorithm, setting), _seed0(cells, "maml", setting)
    if algorithm == "maml" or a is None or b is None:
        return None
    try:
        return paired_files(a["folder"] / "eval", b["folder"] / "eval")
    except ValueError:  # evaluated on another episode set: no paired difference
        return {"unpaired": True}


def _against_maml(cells: pd.DataFrame, algorithm: str, setting: str) -> str:
    d = matched_time(cells, algorithm, setting)
    if d is None:
        return "—"
    if d.get("unpaired"):
        return "not paired: other episodes"
    text = f"{100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f}"
    mine, theirs = (_tested(pd.DataFrame([_seed0(cells, x, setting)])) for x in (algorithm, "maml"))
    if mine != theirs:   # a top-k ensemble or a best-on-validation model against MAML's final one
        text += f" ({mine} vs MAML's {theirs})"
    a, b = _seed0(cells, algorithm, setting), _seed0(cells, "maml", setting)
    if a["seconds"] and b["seconds"] and unequal(a["seconds"], b["seconds"]):
        text += f" ⚠ unequal time: {a['seconds'] / 60:.1f} vs {b['seconds'] / 60:.1f} min"
    return text


def validations(folder: Path) -> pd.Series:
    """Validation accuracy by meta-update (curve.csv's validation rows)."""
    path = Path(folder) / "curve.csv"
    if not path.is_file():
        return pd.Series(dtype=float)
    curve = pd.read_csv(path)
    if "meta_val/query_acc" not in curve:
        return pd.Series(dtype=float)
    val = curve.dropna(subset=["meta_val/query_acc"])
    return pd.Series(val["meta_val/query_acc"].to_numpy(), index=val["iteration"].astype(int).to_numpy())


def _episode_sd(folder: Path) -> float | None:
    path = Path(folder) / "eval" / "per_episode.csv"
    return float(final_step(pd.read_csv(path)).std(ddof=0)) if path.is_file() else None


@functools.lru_cache(maxsize=None)
def cell_sections(algorithm: str, setting: str, profile: str, params_path: str = "params.yaml"):
    """The sections a cell ran under its profile (network, init; validation episodes, meta-batch)."""
    return fewshot_cell(load_params(params_path, profile=profile), "omniglot", algorithm, setting)


def cell_train(algorithm: str, setting: str, profile: str):
    return cell_sections(algorithm, setting, profile).train


def _head_init(algorithm: str, setting: str) -> str:
    """The Omniglot head's initial weights under the paper protocol: the original's N(0, 1) head is
    what MAML starts from, and short budgets partly rank how fast a head recovers from it."""
    # heads set from the support set per task: the meta-learned head's init never reaches a test episode
    per_task = {"protonet": "none (prototypes)", "protomaml": "prototypes", "baseline": "fitted per episode"}
    if algorithm in per_task:
        return per_task[algorithm]
    cell = cell_sections(algorithm, setting, "paper")
    if cell.model == "conv4_omniglot":
        return "N(0, 1)" if cell.init == "reference" else "PyTorch's"
    return {"vgg_mamlpp": "Xavier", "conv4_reptile_omniglot": "Glorot"}.get(cell.model, "PyTorch's" if cell.init == "torch" else cell.init)


def matched_updates(cells: pd.DataFrame, algorithm: str, setting: str) -> dict | None:
    """Validation accuracy against MAML's at the last meta-update both validated at (seed 0).

    Validation scores only the mean over its episodes, so the CI is unpaired, with each cell's
    per-episode standard deviation taken from its 600 test episodes: wider than a paired one would be."""
    a, b = _seed0(cells, algorithm, setting), _seed0(cells, "maml", setting)
    if algorithm == "maml" or a is None or b is None:
        return None
    va, vb = validations(a["folder"]), validations(b["folder"])
    common = sorted(set(va.index) & set(vb.index))
    if not common:
        return {"updates": None}
    u = common[-1]
    spread, batches = [], []
    for row in (a, b):
        sd = _episode_sd(row["folder"])
        cfg = cell_train(row["algorithm"], setting, (row["trained"] or {}).get("profile") or "reference")
        spread.append(None if sd is None else sd * sd / cfg.n_val_episodes)
        batches.append(cfg.meta_batch_size)
    ci = None if None in spread else 1.96 * math.sqrt(sum(spread))
    return {"updates": u, "diff": float(va[u] - vb[u]), "ci95": ci, "meta_batch": tuple(batches)}


def _matched_text(d: dict | None) -> str:
    if d is None:
        return "—"
    if d["updates"] is None:
        return "no common validation point"
    ci = "" if d["ci95"] is None else f" ± {100 * d['ci95']:.2f}"
    mine, maml = d["meta_batch"]
    batch = "" if mine == maml else f" ⚠ {mine} vs {maml} tasks per update"
    return f"{100 * d['diff']:+.2f}{ci} at {d['updates']:,}{batch}"


def _clear(diff: float, ci: float | None) -> int:
    """+1 or -1 when the CI is clear of zero on that side, else 0."""
    return 0 if ci is None or abs(diff) <= ci else (1 if diff > 0 else -1)


def orderings(cells: pd.DataFrame, setting: str) -> str:
    """Which orderings against MAML hold under both matchings (CI clear of zero in both) and which do not."""
    held, one, neither = [], [], []
    for algorithm, name in VARIANTS.items():
        t, u = matched_time(cells, algorithm, setting), matched_updates(cells, algorithm, setting)
        if t is None or t.get("unpaired") or u is None or u["updates"] is None:
            continue
        at_time, at_updates = _clear(t["diff"], t["ci95"]), _clear(u["diff"], u["ci95"])
        sign = {1: ">", -1: "<"}
        if at_time and at_time == at_updates:
            held.append(f"{name} {sign[at_time]} MAML")
        elif at_time or at_updates:
            parts = [f"{sign[at_time]} at matched time" if at_time else "tied at matched time",
                     f"{sign[at_updates]} at matched updates" if at_updates else "tied at matched updates"]
            one.append(f"{name} ({', '.join(parts)})")
        else:
            neither.append(name)
    if not (held or one or neither):
        return ""
    return (f"**Orderings against MAML at {setting}** (95% CI clear of zero). Under both matchings: "
            + (", ".join(held) or "none") + ". Not under both (no ordering the data supports): "
            + (", ".join(one) or "none") + ". Tied under both: " + (", ".join(neither) or "none") + ".")


def plot_wall_time(cells: pd.DataFrame, path: Path) -> None:
    """Validation accuracy against training wall time, a panel per setting, a line per variant."""
    plt = _plt()
    settings = [s for s in SETTINGS if (cells["setting"] == s).any()]
    fig, axes = plt.subplots(1, max(len(settings), 1), figsize=(3.6 * max(len(settings), 1), 3.4), squeeze=False,
                             sharey=True)   # one accuracy scale: panels compare at a glance
    colors = {a: variant_style(a)["color"] for a in VARIANTS}   # as in every other figure
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
def sinusoid_table(runs: Path, quick: Path | None) -> tuple[pd.DataFrame, dict[str, list[dict]], dict[str, list[dict]]]:
    """MSE after 0/1/5/10 steps for K = 5, 10, 20: MAML and the pretrained baseline, reference and quick;
    the provenance records of each column's runs (training, evaluation), by column."""
    sources = {"70,000 its": Path(runs) / "sinusoid" / "seed0"}
    if quick is not None:
        sources["quick"] = Path(quick) / "sinusoid" / "seed0"
    frames, trained, evaluated = {}, {}, {}
    for label, folder in sources.items():
        if (folder / "eval" / "per_task.csv").is_file():
            frames[label] = pd.read_csv(folder / "eval" / "per_task.csv")
            trained[label] = [_json(folder / m / "train.json").get("provenance") or {} for m in ("maml", "pretrain")]
            evaluated[label] = [_json(folder / "eval" / "metrics.json").get("provenance") or {}]
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
              "every setting, the other variants at 5-way 1-shot under the protocol that the budget table's",
              "protocol column names, and the same wall time as MAML (— : not in the set). Every cell here",
              "stopped far short of its protocol's updates: \"ours − paper\" measures the budget, and an",
              "ordering between variants holds only where the comparisons below say so.", "",
              table(table_one(cells)), ""]
    if not cells.empty:
        lines += ["### Budget of each cell, and each variant against MAML at matched time and at matched updates", "",
                  "Meta-updates reached by the time budget (per seed), against the updates of the variant's own",
                  "protocol (⚠ unequal: more than 5% from MAML's updates in the same wall time). Against MAML,",
                  "seed 0, two ways: at matched wall time, the paired difference of test accuracy on the same",
                  "600 episodes (the model each protocol tests, named where it is not the final one); at matched",
                  "updates, the difference of validation accuracy at the last meta-update both cells validated",
                  "at, with an unpaired 95% CI (1.96 · √(sd²/n + sd²/n), each cell's per-episode sd from its test",
                  "episodes, n its validation episodes). A variant's update is its own protocol's (a meta-batch",
                  "of tasks for most; one episode for Prototypical Networks, one 15-image batch for the",
                  "Baseline), so matched updates are matched data only between meta-batched variants. Head",
                  "init: the classifier head's initial weights; the original MAML code's N(0, 1) head takes",
                  "updates to recover from, so at these budgets a ranking partly measures head initialisation",
                  "(heads set from each task's support set start elsewhere). Load:",
                  "the machine's 1-minute load average when the cell started and ended; two cells shared the 2",
                  "cores (one thread each), so about 2 is the norm and more means other work slowed the cell.", "",
                  table(budget_table(cells, runs)), ""]
        for setting in SETTINGS:
            line = orderings(cells, setting)
            lines += [line, ""] if line else []
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
                  "paper's 70,000 iterations beside the quick profile's smoke run (seed 0; quick also departs to "
                  "`sinusoid.init: torch`, docs/protocols.md). Budget: "
                  + sinusoid_budget(runs, quick) + ".", "", table(frame), ""]
        for label in trained:
            lines += [f"{label} column: " + provenance_line(trained[label], evaluated[label]), ""]
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
    lead = (f"{', '.join(complete)} reached {'its' if len(complete) == 1 else 'their'} protocol's update count "
            "(the note above says what that leaves out). ") if complete else ""
    if not short:
        return lead + gpu
    return (lead + f"No {'other ' if complete else ''}cell here reached more than {100 * max(short):.1f}% of its "
            f"protocol's meta-updates: {'those numbers are short-budget numbers' if complete else 'every number above is a short-budget number'}, "
            "not the paper's. " + gpu)


# ----------------------------------------------------------------------------- full-budget cells
# Finn et al. 2017, Table 1: the fully connected network's row ("MAML, no conv"); the conv rows are PAPER's.
NO_CONV = {("maml", "5w1s"): (89.7, 1.1), ("maml", "5w5s"): (97.5, 0.6)}
FULL_CELL = re.compile(r"^(?P<profile>[a-z_]+)-(?P<algorithm>[a-z]+)-(?P<setting>\d+w\d+s)-seed(?P<seed>\d+)$")
SITTING = re.compile(r"^# (?P<when>\S+) start (?P<commit>\S+) (?P<host>\S+)(?: \((?P<cpu>[^)]*)\))? load: (?P<one>[\d.]+) ")
FULL_COMMANDS = """\
Each cell runs in sittings of `scripts/full_budget_runs.sh <root> <minutes> <profile>:<variant>:<setting>:<seed> ...`
from a git worktree at the commit the table names (one torch thread; a sitting stops the cell with
SIGTERM, its newest checkpoint stays, and the next sitting resumes it bit-exactly). For one cell that is

    mamlbench train omniglot -a <variant> -s <setting> --seed <k> --profile <profile> --run-dir <root>/omniglot/<cell>
    mamlbench evaluate omniglot -a <variant> -s <setting> --seed <k> --profile <profile> --runs <root>/omniglot/<cell> --out <root>/omniglot/<cell>/eval

A cell still training has its newest checkpoint under `runs/omniglot/<cell>/checkpoints/`: to continue it on any
machine, check out its commit in a worktree, prepare the data (`dvc repro episodize-omniglot`, or the
`mamlbench data` commands), copy the folder to `<root>/omniglot/<cell>` and run the script again.
A finished cell's trained model is `runs/omniglot/<cell>/model.pt` (weights only, with a sha256 trailer that
`mamlbench.io.load_torch` checks); its row is reproduced on the 600 fixed test episodes by

    mamlbench evaluate omniglot -a <variant> -s <setting> --seed <k> --profile <profile> --runs reports/full/runs/omniglot/<cell> --out /tmp/<cell>-eval

The page: `mamlbench report-full --runs <root> --out reports/full` (rebuilt from the copies alone with
`--runs reports/full/runs`).
"""


def _full_paper(profile: str, algorithm: str, setting: str) -> tuple[float, float | None] | None:
    return NO_CONV.get((algorithm, setting)) if profile == "paper_noconv" else _paper(algorithm, setting)


def collect_full(runs: Path, out: Path) -> Path:
    """Copy each cell's small files to `out/runs`: a finished cell's model (the release) and evaluation,
    a cell still training its newest checkpoint (what the next sitting resumes) with its curve."""
    from mamlbench.io import load_torch, save_torch
    from mamlbench.train import Checkpointer, write_clock, write_curve
    runs, kept = Path(runs), Path(out) / "runs"
    if runs.resolve() == kept.resolve():
        return kept
    for folder in sorted((runs / "omniglot").glob("*-seed*")):
        if FULL_CELL.match(folder.name) is None:
            continue
        target = kept / "omniglot" / folder.name
        if (folder / "train.json").is_file():
            _copy(folder, target, FEWSHOT_FILES + ("model.pt",))
            shutil.rmtree(target / "checkpoints", ignore_errors=True)   # finished: no carry
            continue
        found = Checkpointer(folder / "checkpoints", "").paths()   # the training loop's own naming
        if not found:
            continue
        newest = found[-1]
        state = load_torch(newest, require_digest=True)
        write_curve(target / "curve.csv", state["history"])
        write_clock(target / "clock.csv", state["clock"])
        for old in (target / "checkpoints").glob("ckpt-*.pt") if (target / "checkpoints").is_dir() else ():
            old.unlink()
        save_torch(target / "checkpoints" / newest.name, state)
    if (runs / "logs").is_dir():
        _copy(runs / "logs", kept / "logs", sorted(p.name for p in (runs / "logs").glob("*.log")))
    return kept


def _sittings(runs: Path, cell: str) -> list[dict]:
    log = Path(runs) / "logs" / f"{cell}.log"
    return [m.groupdict() for m in map(SITTING.match, log.read_text().splitlines()) if m] if log.is_file() else []


def _crossing(val: pd.Series, level: float) -> str:
    above = val[val >= level]
    return f"{int(above.index[0]):,}" if not above.empty else "—"


def full_cells(runs: Path) -> pd.DataFrame:
    """One row per full-budget cell: where it stands (finished or still training), its result and budget."""
    rows = []
    for folder in sorted((Path(runs) / "omniglot").glob("*-seed*")):
        m = FULL_CELL.match(folder.name)
        if m is None or not (folder / "curve.csv").is_file():
            continue
        train, metrics = _json(folder / "train.json"), _json(folder / "eval" / "metrics.json")
        trained = train.get("provenance") or {}
        clock = pd.read_csv(folder / "clock.csv") if (folder / "clock.csv").is_file() else pd.DataFrame()
        rows.append({**m.groupdict(), "seed": int(m["seed"]), "folder": folder, "val": validations(folder),
                     "iterations": train.get("iterations") or (int(clock["iteration"].iloc[-1]) if len(clock) else 0),
                     "seconds": trained.get("wall_seconds") or (float(clock["seconds"].iloc[-1]) if len(clock) else 0.0),
                     "finished": bool(train), "acc": metrics.get("acc"), "ci95": metrics.get("ci95"),
                     "trained": trained, "evaluated": metrics.get("provenance") or {},
                     "sittings": _sittings(runs, folder.name)})
    return pd.DataFrame(rows)


def full_table(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in cells.itertuples():
        paper = _full_paper(r.profile, r.algorithm, r.setting)
        protocol = cell_train(r.algorithm, r.setting, r.profile).iterations
        result, inside = ("trained, not evaluated" if r.finished else "training"), "—"
        if pd.notna(r.acc):
            result = pct(r.acc, r.ci95)
            if paper is not None:   # the two intervals overlap: the paper's number is not excluded
                inside = "yes" if abs(100 * r.acc - paper[0]) <= 100 * r.ci95 + (paper[1] or 0) else "**no**"
        commits = sorted({s["commit"] for s in r.sittings}) or [str(r.trained.get("git_commit", "—"))[:7]]
        cpu = r.trained.get("device_name") or next((s["cpu"] for s in r.sittings if s["cpu"]), None) or "—"
        loads = " / ".join(s["one"] for s in r.sittings) or "—"
        rows.append({"network": "fully connected (no conv)" if r.profile == "paper_noconv" else "conv4",
                     "variant": VARIANTS.get(r.algorithm, r.algorithm), "setting": r.setting, "seed": r.seed,
                     "test accuracy % (600 episodes)": result,
                     "paper %": "—" if paper is None else f"{paper[0]:.1f}" + (f" ± {paper[1]:.1f}" if paper[1] else ""),
                     "inside the paper's interval": inside,
                     "meta-updates": f"{r.iterations:,} of {protocol:,}" + ("" if r.iterations >= protocol else " ⚠ unfinished"),
                     "training h": f"{r.seconds / 3600:.2f}", "sittings": len(r.sittings) or "—",
                     "validation ≥ 95% from": _crossing(r.val, 0.95), "≥ 98% from": _crossing(r.val, 0.98),
                     "commit": ", ".join(commits), "machine": cpu, "load at each sitting's start": loads})
    return pd.DataFrame(rows)


def plot_full(cells: pd.DataFrame, path: Path) -> None:
    """Validation accuracy against meta-updates per cell, the paper's test number as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    palette = plt.get_cmap("tab10").colors
    for i, r in enumerate(cells.itertuples()):
        color = palette[i % len(palette)]
        name = f"{VARIANTS.get(r.algorithm, r.algorithm)} {r.setting}" + (", no conv" if r.profile == "paper_noconv" else "")
        ax.plot(r.val.index, 100 * r.val.to_numpy(), "-", lw=1.2, color=color, label=f"{name} (validation)")
        paper = _full_paper(r.profile, r.algorithm, r.setting)
        if paper is not None:
            ax.axhline(paper[0], color=color, ls="--", lw=0.9, label=f"{name}: paper's test {paper[0]:.1f}")
        for level, marker in ((0.95, "o"), (0.98, "s")):
            above = r.val[r.val >= level]
            if not above.empty:
                ax.plot(above.index[0], 100 * above.iloc[0], marker, color=color, ms=5, mfc="none")
    ax.set(xlabel="meta-updates", ylabel="validation accuracy (%)",
           title="Full-budget cells: validation accuracy (first ≥ 95%: circle, ≥ 98%: square)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, path)


def build_full(runs: str | Path, out: str | Path, note: str | Path | None = None) -> Path:
    """Write `out/README.md` and `out/curves.png`: the cells trained to their protocol's whole budget."""
    out = Path(out)
    runs = collect_full(Path(runs), out)
    cells = full_cells(runs)
    if cells.empty:
        raise ValueError(f"{runs}: no full-budget cells (omniglot/<profile>-<variant>-<setting>-seed<k>); "
                         "run scripts/full_budget_runs.sh first")
    lines = ["# Few-shot cells at their protocol's whole budget", "",
             "Generated by `mamlbench report-full` from the run folders under `runs/` (do not edit by hand).",
             "Each cell runs `profile: paper`'s protocol (docs/protocols.md) to its last meta-update, then is",
             "tested on the 600 fixed test episodes as the paper's protocol tests; `paper_noconv` is the same",
             "protocol with the paper's fully connected network (Table 1, \"MAML, no conv\"). A cell still",
             "training shows its validation curve so far and no test number (⚠ unfinished).", ""]
    if note is not None and Path(note).is_file():
        lines += [Path(note).read_text().strip(), ""]
    lines += [table(full_table(cells)), "",
              "Inside the paper's interval: our 95% CI and the paper's overlap. Validation: the cell's",
              "`n_val_episodes` fixed validation episodes after the test's inner steps, every `validate_every`",
              "updates; the crossing columns give the first validation at or above 95% and 98%.", ""]
    plot_full(cells, out / "curves.png")
    lines += ["![validation accuracy against meta-updates](curves.png)", ""]
    done = cells[cells["finished"]]
    if not done.empty:
        lines += [provenance_line(list(done["trained"]), list(done["evaluated"])), ""]
    lines += ["## Commands", "", FULL_COMMANDS]
    write_text(out / "README.md", "\n".join(lines))
    return out / "README.md"
