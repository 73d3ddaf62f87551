"""The report: `reports/README.md` and `reports/figures/*.png` from the pipeline's metrics files.

One table per benchmark (variant x setting: mean and 95% CI, the paper's number beside it, and the
difference only under `profile: paper`: at a short profile's budgets it would rank the variants by how
far each got, which such a report must not seem to do), paired comparisons of every variant against MAML
on the same test episodes, the mean over seeds and its spread, and figures (learning curves against
training tasks seen, accuracy vs inner steps, sinusoid fits and MSE vs steps, RL return vs inner steps),
each variant in one colour throughout. Only the cells `params.yaml` names are read; the output depends
on nothing else (no timestamps, fixed order, PNGs without metadata), so re-running it on unchanged inputs
rewrites the same bytes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from mamlbench.config import FEWSHOT, Params, fewshot_train
from mamlbench.guards import read_json
from mamlbench.io import atomic_path, write_json, write_text
from mamlbench.stats import mean_ci95

# Published accuracies (%, ± 95% CI where given) on the benchmarks' own protocols.
# Omniglot and mini-ImageNet: Finn et al. 2017 table 1 (MAML, "first order approx."); Nichol et al.
# 2018 table 1/2 (Reptile, transductive as our BatchNorm is); Li et al. 2017 table 1 (Meta-SGD);
# Antoniou et al. 2019 tables 1/2 (MAML++); Raghu et al. 2020 table 2 (ANIL, mini-ImageNet); Snell et
# al. 2017 tables 1/2 (Prototypical Networks); Rajeswaran et al. 2019 table 2 ("iMAML, GD": gradient
# descent in the inner loop, as ours).
PAPER: dict[str, dict[tuple[str, str], tuple[float, float | None]]] = {
    "omniglot": {
        ("maml", "5w1s"): (98.7, 0.4), ("maml", "5w5s"): (99.9, 0.1),
        ("maml", "20w1s"): (95.8, 0.3), ("maml", "20w5s"): (98.9, 0.2),
        ("fomaml", "5w1s"): (98.3, 0.5), ("fomaml", "5w5s"): (99.2, 0.2),
        ("fomaml", "20w1s"): (89.4, 0.5), ("fomaml", "20w5s"): (97.9, 0.1),
        ("reptile", "5w1s"): (97.68, 0.04), ("reptile", "5w5s"): (99.48, 0.06),
        ("reptile", "20w1s"): (89.43, 0.14), ("reptile", "20w5s"): (97.12, 0.32),
        ("metasgd", "5w1s"): (99.53, 0.26), ("metasgd", "5w5s"): (99.93, 0.09),
        ("metasgd", "20w1s"): (95.93, 0.38), ("metasgd", "20w5s"): (98.97, 0.19),
        ("mamlpp", "5w1s"): (99.47, None), ("mamlpp", "5w5s"): (99.93, None),
        ("mamlpp", "20w1s"): (97.65, 0.05), ("mamlpp", "20w5s"): (99.33, 0.03),
        ("protonet", "5w1s"): (98.8, None), ("protonet", "5w5s"): (99.7, None),
        ("protonet", "20w1s"): (96.0, None), ("protonet", "20w5s"): (98.9, None),
        ("imaml", "5w1s"): (99.16, 0.35), ("imaml", "5w5s"): (99.67, 0.12),
        ("imaml", "20w1s"): (94.46, 0.42), ("imaml", "20w5s"): (98.69, 0.1),
    },
    "mini_imagenet": {
        ("maml", "5w1s"): (48.70, 1.84), ("maml", "5w5s"): (63.11, 0.92),
        ("fomaml", "5w1s"): (48.07, 1.75), ("fomaml", "5w5s"): (63.15, 0.91),
        ("reptile", "5w1s"): (49.97, 0.32), ("reptile", "5w5s"): (65.99, 0.58),
        ("metasgd", "5w1s"): (50.47, 1.87), ("metasgd", "5w5s"): (64.03, 0.94),
        ("mamlpp", "5w1s"): (52.15, 0.26), ("mamlpp", "5w5s"): (68.32, 0.44),
        ("anil", "5w1s"): (46.7, 0.4), ("anil", "5w5s"): (61.5, 0.5),
        ("protonet", "5w1s"): (49.42, 0.78), ("protonet", "5w5s"): (68.20, 0.66),
    },
}
BASELINE = "maml"   # paired comparisons are against this variant
TITLES = {"omniglot": "Omniglot", "mini_imagenet": "mini-ImageNet", "imagefolder": "Your ImageFolder dataset"}


# ----------------------------------------------------------------------------- statistics
def seeds_ci95(means) -> tuple[float, float]:
    """Mean over seeds and the t-based 95% CI of that mean (few seeds: the normal one is too narrow)."""
    means = np.asarray(means, dtype=float)
    if means.size < 2:
        return float(means.mean()), float("nan")
    from scipy import stats
    return float(means.mean()), float(stats.t.ppf(0.975, means.size - 1) * means.std(ddof=1) / math.sqrt(means.size))


def paired(a, b) -> dict:
    """Paired difference a - b over the same episodes: mean, 95% CI, and who wins how often."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same episodes: {a.size} vs {b.size} values")
    diff, ci = mean_ci95(a - b)
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": diff, "ci95": ci, "n": int(a.size),
            "a_wins": int((a > b).sum()), "b_wins": int((a < b).sum()), "ties": int((a == b).sum())}


def final_step(per_episode: pd.DataFrame) -> pd.Series:
    """Accuracy per episode after the last inner step, indexed by episode."""
    last = per_episode["inner_steps"].max()
    return per_episode[per_episode["inner_steps"] == last].set_index("episode")["acc"].sort_index()


def paired_files(a: str | Path, b: str | Path) -> dict:
    """`paired` on two evaluation folders' per_episode.csv (final inner step)."""
    ids = {}
    for folder in (a, b):
        metrics = Path(folder) / "metrics.json"
        if not metrics.is_file():
            raise ValueError(f"{folder}: no metrics.json (pass an evaluation folder, e.g. runs/omniglot/<cell>/eval)")
        ids[folder] = read_json(metrics).get("episodes")
        if ids[folder] is None:
            raise ValueError(f"{metrics}: does not record its episode set (re-run `mamlbench evaluate` to pair it)")
    if ids[a] != ids[b]:
        raise ValueError(f"{a} and {b} were evaluated on different episode sets ({ids[a]} vs {ids[b]}): a paired "
                         f"CI needs the same episodes (evaluate both on one setting and episode file)")
    fa, fb = (final_step(pd.read_csv(Path(x) / "per_episode.csv")) for x in (a, b))
    if not fa.index.equals(fb.index):
        raise ValueError(f"{a} and {b} were not evaluated on the same episodes")
    return paired(fa.to_numpy(), fb.to_numpy())


# ----------------------------------------------------------------------------- formatting
def pct(value: float, ci: float | None = None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{100 * value:.{digits}f}"
    return text if ci is None or math.isnan(ci) else f"{text} ± {100 * ci:.{digits}f}"


def table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table (strings as they are)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """PNG without metadata (no version string, no date): same data, same bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.figsize": (6.4, 4.0), "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


# ----------------------------------------------------------------------------- provenance
CODE_MARK, PROTOCOL_MARK = "†", "‡"


def read_provenance(path: Path, key: str | None = None) -> dict:
    """The provenance a result file carries (`key`: the RL train.json's per-model records); {} if none."""
    if not path.is_file():
        return {}
    found = json.loads(path.read_text()).get("provenance") or {}
    return (found.get(key) or {}) if key else found


def _common(values: list) -> object:
    return max(dict.fromkeys(values), key=values.count)  # the most frequent; the first on a tie


def differs(cells: dict, mark: str) -> dict:
    """`mark` for each label (table cell) one of whose values differs from the table's most common value."""
    values = [v for vs in cells.values() for v in vs]
    common = _common(values) if values else None
    return {label: mark if any(v != common for v in vs) else "" for label, vs in cells.items()}


def _one(records: list[dict], key: str, show=str) -> str:
    """The value every record has for `key`, or how many different ones there are."""
    values = list(dict.fromkeys(r.get(key) for r in records))
    if len(values) > 1:
        return f"{len(values)} different"
    return "none" if values[0] is None else show(values[0])


def provenance_line(trained: list[dict], evaluated: list[dict], used: str = "") -> str:
    """One line under a table: what produced its cells, the values they share or how many there are;
    `used`: the marks the table shows, explained at the end."""
    trained, evaluated = [r for r in trained if r], [r for r in evaluated if r]
    records = trained + evaluated
    if not records:
        return "Provenance: not recorded (results written before provenance was)."

    def both(key: str) -> str:
        return ", ".join(f"{_one(group, key)} ({name})" for name, group in (("training", trained),
                                                                            ("evaluation", evaluated)) if group)

    parts = [f"commit {_one(records, 'git_commit', lambda c: str(c)[:10])}"
             + (" with uncommitted changes" if any(r.get("git_dirty") for r in records) else ""),
             f"code {both('code_hash')}", f"data {both('data_hash')}", f"settings {both('settings_hash')}",
             f"profile {_one(records, 'profile')}",
             f"torch {_one(records, 'torch')}, CUDA {_one(records, 'cuda')}, MuJoCo {_one(records, 'mujoco')}",
             f"{_one(trained or records, 'device_name')}, torch threads {_one(trained or records, 'threads')}"]
    if trained:
        reached = sorted({r.get("iterations") for r in trained if r.get("iterations") is not None})
        budget = sum(r.get("stopped") == "time_budget" for r in trained)
        parts += [f"training {sum(r.get('wall_seconds') or 0 for r in trained) / 60:.1f} min wall over "
                  f"{len(trained)} runs", "iterations reached " + "–".join(str(i) for i in reached[::max(len(reached) - 1, 1)])
                  + (f" ({budget} runs stopped by their time budget)" if budget else "")]
    legend = {CODE_MARK: "trained or evaluated by other code than the rest of the table",
              PROTOCOL_MARK: "evaluated under another protocol (settings or data) than the rest of its setting"}
    return "Provenance: " + "; ".join(parts) + "." + "".join(f" {m}: {legend[m]}." for m in legend if m in used)


# ----------------------------------------------------------------------------- few-shot
def fewshot_cells(params: Params, benchmark: str, runs: Path) -> pd.DataFrame:
    """One row per (variant, setting, seed) that the params name and that has been evaluated."""
    bench = getattr(params, benchmark)
    rows = []
    for setting in bench.run.settings:
        for algorithm in bench.run.algorithms:
            for seed in params.seeds:
                folder = runs / benchmark / f"{algorithm}-{setting}-seed{seed}"
                metrics = folder / "eval" / "metrics.json"
                if not metrics.is_file():
                    continue
                m = read_json(metrics)
                trained = read_provenance(folder / "train.json")
                train = fewshot_train(params, benchmark, algorithm, setting)
                cell = bench.settings[setting]
                rows.append({"algorithm": algorithm, "setting": setting, "seed": seed, "acc": m["acc"],
                             "ci95": m["ci95"], "n_episodes": m["n_episodes"], "folder": folder,
                             "iterations": trained.get("iterations", train.iterations),  # reached, under a time budget
                             "tasks_per_update": train.meta_batch_size,
                             "task_images": cell.n_way * ((train.k_shot or cell.k_shot) + train.n_query),
                             "trained": trained, "evaluated": m.get("provenance") or {}})
    return pd.DataFrame(rows)


def fewshot_marks(cells: pd.DataFrame) -> dict[tuple[str, str], str]:
    """† / ‡ per (variant, setting): code against the whole table, the protocol within a setting (each
    setting has its own episodes)."""
    def codes(g):
        return [(t.get("code_hash"), e.get("code_hash")) for t, e in zip(g["trained"], g["evaluated"])]

    def protocols(g):
        return [(e.get("settings_hash"), e.get("data_hash")) for e in g["evaluated"]]

    code = differs({k: codes(g) for k, g in cells.groupby(["algorithm", "setting"], sort=False)}, CODE_MARK)
    protocol = {}
    for _, in_setting in cells.groupby("setting", sort=False):
        protocol.update(differs({k: protocols(g) for k, g in in_setting.groupby(["algorithm", "setting"], sort=False)},
                                PROTOCOL_MARK))
    return {k: code[k] + protocol[k] for k in code}


def fewshot_table(cells: pd.DataFrame, benchmark: str, paper_budget: bool = False) -> pd.DataFrame:
    """`paper_budget`: the cells ran the protocols' budgets (`profile: paper`), so a difference to the paper
    is a result; at a smoke budget it would measure each variant's share of its budget, a ranking in disguise."""
    rows = []
    flags = fewshot_marks(cells)
    for (algorithm, setting), group in cells.groupby(["algorithm", "setting"], sort=False):
        if len(group) == 1:
            acc, ci = group["acc"].iloc[0], group["ci95"].iloc[0]
            spread = "—"
        else:
            acc, ci = seeds_ci95(group["acc"])
            spread = f"{100 * group['acc'].std(ddof=1):.2f} ({pct(group['acc'].min())}–{pct(group['acc'].max())})"
        paper = PAPER.get(benchmark, {}).get((algorithm, setting))
        rows.append({"variant": f"{algorithm} {flags[(algorithm, setting)]}".strip(), "setting": setting,
                     "iterations": "–".join(dict.fromkeys(str(int(i)) for i in sorted(group["iterations"]))),
                     "seeds": len(group), "episodes": int(group["n_episodes"].iloc[0]),
                     "accuracy % (95% CI)": pct(acc, ci), "sd over seeds": spread,
                     "paper %": "—" if paper is None else (f"{paper[0]:.2f}"
                                                            + (f" ± {paper[1]:.2f}" if paper[1] else ""))})
        if paper_budget:
            rows[-1]["ours − paper"] = "—" if paper is None else f"{100 * acc - paper[0]:+.2f}"
    return pd.DataFrame(rows)


def unequal(mine: float, theirs: float) -> str:
    """⚠ where two budgets differ by more than 5%: the difference then also measures the budget."""
    return " ⚠ unequal" if abs(mine - theirs) > 0.05 * max(theirs, 1e-9) else ""


def paired_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Each variant against MAML on the same episodes, per seed and (several seeds) their mean."""
    rows = []
    for setting, in_setting in cells.groupby("setting", sort=False):
        base = in_setting[in_setting["algorithm"] == BASELINE].set_index("seed")
        for algorithm, group in in_setting.groupby("algorithm", sort=False):
            if algorithm == BASELINE:
                continue
            diffs = []
            for row in group.itertuples():
                if row.seed not in base.index:
                    continue
                d = paired_files(row.folder / "eval", base.loc[row.seed, "folder"] / "eval")
                diffs.append(d["diff"])
                other = base.loc[row.seed]
                mine, theirs = int(row.iterations), int(other["iterations"])
                tasks = (mine * row.tasks_per_update, theirs * int(other["tasks_per_update"]))
                time = [(r.get("wall_seconds") or 0.0) for r in (row.trained, other["trained"])]
                rows.append({"variant − maml": algorithm, "setting": setting, "seed": str(row.seed),
                             "difference, points (95% CI)": pct(d["diff"], d["ci95"]),
                             "variant / maml / tie (episodes)": f"{d['a_wins']} / {d['b_wins']} / {d['ties']}",
                             "meta-updates, variant / maml": f"{mine} / {theirs}" + (" ⚠ unequal" if mine != theirs else ""),
                             "tasks seen, variant / maml": f"{tasks[0]:,} / {tasks[1]:,}" + unequal(*tasks),
                             "training s, variant / maml": f"{time[0]:.0f} / {time[1]:.0f}" + unequal(*time)})
            if len(diffs) > 1:
                mean, ci = seeds_ci95(diffs)
                rows.append({"variant − maml": algorithm, "setting": setting, "seed": f"mean of {len(diffs)}",
                             "difference, points (95% CI)": pct(mean, ci), "variant / maml / tie (episodes)": "—",
                             "meta-updates, variant / maml": "—", "tasks seen, variant / maml": "—",
                             "training s, variant / maml": "—"})
    return pd.DataFrame(rows)


# Twelve hues a reader can tell apart: tab10, then black and a dark gold (a light shade of a tab10 hue,
# tab20's, reads as the same variant beside its dark twin).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#b8860b")


def variant_style(name: str) -> dict:
    """The variant's colour and marker, the same in every figure: twelve variants on matplotlib's 10-colour
    cycle would share colours (MAML and iMAML both blue), so each takes a fixed hue of `PALETTE` and a
    marker, in the order params.yaml's `variants` lists them."""
    from dataclasses import fields

    from mamlbench.config import VariantsParams
    order = [f.name for f in fields(VariantsParams)]
    slot = order.index(name)
    return {"color": PALETTE[slot % len(PALETTE)], "marker": "osD^vPX*hp<>"[slot % 12]}


def _episode_accuracy(algorithm: str) -> bool:
    """Whether the variant's meta-training accuracy is an N-way episode's: the baseline's is a supervised
    classification over every training class (1,100-way on Omniglot), on another scale than the rest."""
    from mamlbench.algorithms import ALGORITHMS
    return not getattr(ALGORITHMS[algorithm], "global_labels", False)


def tasks_axis(cells: pd.DataFrame) -> str:
    """The curves' x label: what one "task" is for the variants drawn."""
    label = "training tasks seen (meta-updates × tasks per meta-batch)"
    batch = cells[~cells["algorithm"].map(_episode_accuracy)]
    if not batch.empty:
        label += (f"; {', '.join(dict.fromkeys(batch['algorithm']))}: one batch of "
                  f"{'/'.join(str(n) for n in dict.fromkeys(batch['task_images']))} images = 1 task")
    return label


def plot_curves(cells: pd.DataFrame, benchmark: str, setting: str, path: Path) -> None:
    """Validation and meta-training accuracy against training tasks seen: variants that take one episode
    (ProtoNet) or sixteen tasks (MAML) per update are compared at equal data, not at equal updates."""
    from matplotlib.lines import Line2D
    plt = _plt()
    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True, sharey=True)
    in_setting = cells[cells["setting"] == setting]
    handles = {}
    for (algorithm, seed), group in in_setting.groupby(["algorithm", "seed"], sort=False):
        curve = pd.read_csv(group["folder"].iloc[0] / "curve.csv")
        style = variant_style(algorithm)
        curve["tasks"] = curve["iteration"] * int(group["tasks_per_update"].iloc[0])
        if "meta_val/query_acc" in curve:
            val = curve.dropna(subset=["meta_val/query_acc"])
            val_ax.plot(val["tasks"], 100 * val["meta_val/query_acc"], "-", ms=4, lw=1.3,
                        markevery=max(len(val) // 12, 1), **style)
        handles[algorithm] = Line2D([], [], ms=4, lw=1.3, **style)
        if _episode_accuracy(algorithm):
            train = curve.dropna(subset=["meta_train/query_acc"])
            train_ax.plot(train["tasks"], 100 * train["meta_train/query_acc"].rolling(5, min_periods=1).mean(), "-",
                          lw=1.1, alpha=0.8, color=style["color"])
    skipped = ", ".join(dict.fromkeys(a for a in in_setting["algorithm"] if not _episode_accuracy(a)))
    val_ax.set(title="validation (fixed episodes)", ylabel="query accuracy %")
    train_ax.set(title="meta-training batches (mean of 5 logged points)"
                 + (f"\n{skipped} not drawn: not an N-way accuracy" if skipped else ""))
    train_ax.tick_params(labelleft=True)
    fig.suptitle(f"{benchmark} {setting}", fontsize=10)
    fig.supxlabel(tasks_axis(in_setting), fontsize=9)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(handles), 6), fontsize=8, frameon=False)   # below the panels: no curve hidden
    save_figure(fig, path)


def plot_steps(cells: pd.DataFrame, benchmark: str, setting: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for i, (algorithm, group) in enumerate(cells[cells["setting"] == setting].groupby("algorithm", sort=False)):
        steps = pd.concat([pd.read_csv(f / "eval" / "steps.csv") for f in group["folder"]])
        mean = steps.groupby("inner_steps")["acc"].mean()
        ci = steps.groupby("inner_steps")["ci95"].mean()
        style = variant_style(algorithm)   # dashes vary too: equal values must not hide a line under another
        ax.plot(mean.index, 100 * mean, ("-", "--", "-.", ":")[i % 4], label=algorithm, ms=6, mfc="none", lw=1.3,
                **style)
        ax.fill_between(mean.index, 100 * (mean - ci), 100 * (mean + ci), alpha=0.15, color=style["color"], lw=0)
    ax.set(xlabel="inner steps at test time", ylabel="test accuracy %", title=f"{benchmark} {setting}: accuracy vs inner steps")
    _integer_ticks(ax)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves stay visible
    save_figure(fig, path)


def fewshot_section(params: Params, benchmark: str, runs: Path, figures: Path) -> list[str]:
    title = TITLES.get(benchmark, benchmark)
    cells = fewshot_cells(params, benchmark, runs)
    lines = [f"## {title}", ""]
    if cells.empty:
        papers = PAPER.get(benchmark, {})
        lines += ["Not run with these params" + (" (opt in: `data.opt_in`)." if benchmark != "omniglot" else "."),
                  "Published: " + "; ".join(f"{a} {s} {v[0]}" for (a, s), v in papers.items()) + ".", ""]
        return lines
    lines += ["Test accuracy on the fixed test episodes after each variant's test-time inner steps, from the "
              "checkpoint its protocol tests (both per cell in [docs/protocols.md](../docs/protocols.md) and in "
              "its `metrics.json`). One seed: 95% CI over episodes (1.96 std / sqrt(n), the reference's formula); "
              "several: the mean over seeds with a t 95% CI over seeds, and their sd (min–max)."
              + ("" if paper_budget(params) else " The paper's number is the protocol's, at its full budget: "
                 "context, not a target these budgets can reach."), "",
              table(fewshot_table(cells, benchmark, paper_budget(params))), "",
              provenance_line(list(cells["trained"]), list(cells["evaluated"]), "".join(fewshot_marks(cells).values())), ""]
    comparison = paired_table(cells)
    if not comparison.empty:
        lines += ["Paired against MAML on the same test episodes (difference of per-episode accuracy, final step; "
                  "budgets side by side in meta-updates, tasks seen and training wall time; ⚠ where a budget differs "
                  "by more than 5%, so the difference is not matched in it" + ("" if paper_budget(params) else "; at this profile's budgets a difference "
                                      "says how far each got, not which variant is better") + "):",
                  "", table(comparison), ""]
    lines += ["Figures: validation accuracy on the fixed validation episodes and the meta-training batches' "
              "accuracy against training tasks seen, the cell's meta-updates × its tasks per meta-update "
              "(`train.meta_batch_size`: ProtoNet's one episode and the baseline's one batch of an episode's images "
              "count as one task), so variants are compared at equal data; the baseline's meta-training accuracy "
              "(supervised, over every training class) is not drawn. Then test accuracy against test-time inner "
              "steps. Each variant keeps its colour and marker in every figure.", ""]
    for setting in dict.fromkeys(cells["setting"]):
        for kind, plot in (("curves", plot_curves), ("steps", plot_steps)):
            name = f"{benchmark}_{setting}_{kind}.png"
            plot(cells, benchmark, setting, figures / name)
            lines.append(f"![{benchmark} {setting} {kind}](figures/{name})")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- sinusoid
def sinusoid_section(params: Params, runs: Path, figures: Path) -> list[str]:
    folders = [(seed, runs / "sinusoid" / f"seed{seed}" / "eval") for seed in params.seeds]
    folders = [(s, f) for s, f in folders if (f / "metrics.json").is_file()]
    lines = ["## Sinusoid regression", ""]
    if not folders:
        return lines + ["Not run with these params.", ""]
    tasks = pd.concat([pd.read_csv(f / "per_task.csv").assign(seed=s) for s, f in folders])
    rows = []
    for (k, steps), group in tasks.groupby(["k_shot", "inner_steps"]):
        row = {"K": int(k), "inner steps": int(steps)}
        for model in ("maml", "pretrain"):
            by_seed = [mean_ci95(g["mse"]) for _, g in group[group["model"] == model].groupby("seed")]
            mean, ci = by_seed[0] if len(by_seed) == 1 else seeds_ci95([m for m, _ in by_seed])
            row[f"{model} MSE (95% CI)"] = f"{mean:.3f} ± {ci:.3f}"
        diffs = []
        for _, g in group.groupby("seed"):
            wide = g.pivot(index="task", columns="model", values="mse")
            diffs.append(paired(wide["maml"], wide["pretrain"]))
        d = diffs[0] if len(diffs) == 1 else dict(zip(("diff", "ci95"), seeds_ci95([x["diff"] for x in diffs])))
        row["maml − pretrain, paired"] = f"{d['diff']:+.3f} ± {d['ci95']:.3f}"
        rows.append(row)
    trained = {m: [read_provenance(f.parent / m / "train.json") for _, f in folders] for m in ("maml", "pretrain")}
    evaluated = [read_provenance(f / "metrics.json") for _, f in folders]
    flags = differs({m: [r.get("code_hash") for r in records] for m, records in trained.items()}, CODE_MARK)
    frame = pd.DataFrame(rows).rename(columns={f"{m} MSE (95% CI)": f"{m}{flags[m]} MSE (95% CI)" for m in flags})
    lines += [f"Query MSE on {params.sinusoid.evaluate.n_tasks} fixed test tasks after K-shot adaptation with "
              f"step size {params.sinusoid.evaluate.inner_lr} (seeds: {', '.join(str(s) for s, _ in folders)}). "
              "The paper shows this as figures 2–3 only (no table): MAML keeps improving past one step, the "
              "pretrained baseline barely moves.", "", table(frame), "",
              provenance_line(trained["maml"] + trained["pretrain"], evaluated, "".join(flags.values())), ""]
    plt = _plt()
    fig, axes = plt.subplots(1, tasks["k_shot"].nunique(), figsize=(9, 3.2), sharey=True)
    for ax, (k, group) in zip(np.atleast_1d(axes), tasks.groupby("k_shot")):
        for model, style in (("maml", "o-"), ("pretrain", "s--")):
            by_step = [(s, *mean_ci95(g.to_numpy())) for s, g in group[group["model"] == model].groupby("inner_steps")["mse"]]
            steps_, means, cis = (np.array(v) for v in zip(*by_step))   # the table's mean and CI (stats.mean_ci95)
            ax.errorbar(steps_, means, yerr=cis, fmt=style, label=model, ms=3, capsize=2)
        ax.set(title=f"K = {k}", xlabel="inner steps", yscale="log")
        _integer_ticks(ax)
    np.atleast_1d(axes)[0].set_ylabel("query MSE")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))   # off the data
    save_figure(fig, figures / "sinusoid_mse_steps.png")
    lines.append("![sinusoid MSE vs steps](figures/sinusoid_mse_steps.png)")
    if (folders[0][1] / "fits.png").is_file():
        shutil.copyfile(folders[0][1] / "fits.png", figures / "sinusoid_fits.png")
        lines.append(f"![sinusoid fits, seed {folders[0][0]}](figures/sinusoid_fits.png)")
    return lines + [""]


# ----------------------------------------------------------------------------- RL
POLICIES = ("maml", "pretrained", "random")


def policy_style(policy: str) -> dict:
    """A meta-RL policy's colour and marker, the same in every figure: tab10's first three, the colours
    `mamlbench rl evaluate` gives them in adaptation.png (MAML's blue is also MAML's in the few-shot ones)."""
    from matplotlib import colormaps
    slot = POLICIES.index(policy) if policy in POLICIES else len(POLICIES)
    return {"color": colormaps["tab10"](min(slot, 3)), "marker": "os^D"[min(slot, 3)]}


def task_returns(evaluation: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{policy: {"step_k": (mean, 95% CI)}} over the test tasks of an RL evaluate.json, by `mean_ci95`: the
    formula of every few-shot table. metrics.json's own `ci95` is a Student-t interval (ddof 1), 4.5% wider
    at 40 tasks; printing both would give one report two CI formulas."""
    return {policy: {step: mean_ci95(v["per_task"]) for step, v in by_step.items()}
            for policy, by_step in evaluation["policies"].items()}


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def rl_section(params: Params, runs_dir: Path, figures: Path) -> list[str]:
    lines = ["## Meta-RL (MAML-TRPO)", ""]
    found = False
    for env in params.rl.envs:
        files = [(s, runs_dir / "rl" / env / f"seed{s}" / "metrics.json") for s in params.seeds]
        runs = [(s, read_json(p)) for s, p in files if p.is_file()]
        if not runs:
            continue
        evaluated = [r.pop("provenance", None) or {} for _, r in runs]
        for seed, r in runs:
            per_task = runs_dir / "rl" / env / f"seed{seed}" / "evaluate.json"   # rl-evaluate writes it too
            found_ci = task_returns(read_json(per_task)) if per_task.is_file() else {}
            for policy, by_step in r.items():
                for step, v in by_step.items():   # no per-task returns: the mean alone, no other CI formula
                    v["mean"], v["ci95"] = found_ci.get(policy, {}).get(step, (v["mean"], float("nan")))
        trained = {m: [read_provenance(p.parent / "train.json", m) for s, p in files if p.is_file()]
                   for m in runs[0][1] if m != "random"}
        found = True
        policies = list(runs[0][1])
        steps = sorted({int(k.split("_")[1]) for m in runs[0][1].values() for k in m})
        rows = []
        flags = differs({m: [r.get("code_hash") for r in records] for m, records in trained.items()}, CODE_MARK)
        for policy in policies:
            row = {"policy": policy + flags.get(policy, "")}
            for step in steps:
                values = [r[policy][f"step_{step}"] for _, r in runs]
                if len(values) == 1:
                    row[_steps(step)] = f"{values[0]['mean']:.2f}" + ("" if math.isnan(values[0]["ci95"])
                                                                      else f" ± {values[0]['ci95']:.2f}")
                else:
                    mean, ci = seeds_ci95([v["mean"] for v in values])
                    row[_steps(step)] = f"{mean:.2f} ± {ci:.2f}"
            rows.append(row)
        lines += [f"### {env}", "", f"Average return after 0..{steps[-1]} policy-gradient steps on the fixed test "
                  f"tasks (seeds {', '.join(str(s) for s, _ in runs)}; one seed: 95% CI over the test tasks, "
                  "1.96 std / sqrt(n) as in the few-shot tables; several: the mean over seeds with a t 95% CI over "
                  "seeds). The paper reports these as "
                  "figures 4–5 (no table): paper value —.", "", table(pd.DataFrame(rows)), "",
                  provenance_line([r for records in trained.values() for r in records], evaluated,
                                  "".join(flags.values())), ""]
        plt = _plt()
        fig, ax = plt.subplots()
        for policy in policies:
            mean = np.array([np.mean([r[policy][f"step_{s}"]["mean"] for _, r in runs]) for s in steps])
            ci = np.array([np.mean([r[policy][f"step_{s}"]["ci95"] for _, r in runs]) for s in steps])
            style = policy_style(policy)
            ax.plot(steps, mean, "-", label=policy, ms=4, **style)
            ax.fill_between(steps, mean - ci, mean + ci, alpha=0.15, color=style["color"], lw=0)
        ax.set(xlabel="policy-gradient steps at test time", ylabel="average return", title=f"{env}: return vs steps")
        ax.set_xticks(steps)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # off the data
        save_figure(fig, figures / f"rl_{env}_return_steps.png")
        lines += [f"![{env} return vs steps](figures/rl_{env}_return_steps.png)", ""]
    return lines if found else lines + ["Not run with these params.", ""]


# ----------------------------------------------------------------------------- headline metrics
def headline_metrics(params: Params, runs: Path) -> dict[str, dict[str, float]]:
    """{"<benchmark>/<cell>": {metric: value}}: one small file per cell for `dvc metrics` and `dvc exp show`,
    named as the MLflow runs and their test metrics are (`meta_test/...`)."""
    found: dict[str, dict[str, float]] = {}
    for benchmark in FEWSHOT:
        for row in fewshot_cells(params, benchmark, runs).itertuples():
            found[f"{benchmark}/{row.algorithm}-{row.setting}-seed{row.seed}"] = {
                "meta_test/acc": round(float(row.acc), 6), "meta_test/ci95": round(float(row.ci95), 6)}
    k = params.sinusoid.train.k_shot  # the training K; every K and step stays in the eval's metrics.json
    for seed in params.seeds:
        path = runs / "sinusoid" / f"seed{seed}" / "eval" / "metrics.json"
        if path.is_file():
            for model, ks in read_json(path).items():
                if model != "provenance" and f"k{k}" in ks:
                    found[f"sinusoid/{model}-k{k}-seed{seed}"] = {
                        f"meta_test/mse_{step}": round(float(v["mse"]), 6)
                        for step, v in ks[f"k{k}"].items() if step in ("step1", "step10")}
    for env in params.rl.envs:
        for seed in params.seeds:
            path = runs / "rl" / env / f"seed{seed}" / "metrics.json"
            if path.is_file():
                for policy, steps in read_json(path).items():
                    if policy != "provenance":  # before adapting and after one policy-gradient step
                        found[f"rl/{env}-{policy}-seed{seed}"] = {
                            f"meta_test/return_{step.replace('_', '')}": round(float(v["mean"]), 6)
                            for step, v in steps.items() if step in ("step_0", "step_1")}
    return found


def write_headline_metrics(params: Params, runs: Path, folder: Path) -> list[Path]:
    """`folder/<benchmark>/<cell>.json`, only this report's cells (a dropped cell leaves no stale file)."""
    metrics = headline_metrics(params, runs)
    if folder.exists():
        shutil.rmtree(folder)
    for name, values in metrics.items():
        write_json(folder / f"{name}.json", values)
    return [folder / f"{name}.json" for name in sorted(metrics)]


# ----------------------------------------------------------------------------- the report
NOT_RUN = "Not run with these params"


def check_runs_folder(runs: Path) -> None:
    """A mistyped --runs must not become a report of nothing."""
    if not runs.is_dir():
        raise ValueError(f"--runs {runs}: no such folder (train and evaluate first, or pass the runs folder)")
    if not any(runs.iterdir()):
        raise ValueError(f"--runs {runs}: empty folder, no metrics to report (train and evaluate first)")


def results_in(text: str, figures: int) -> tuple[int, int]:
    """(sections with results, figures) of a report: how rich it is."""
    sections = sum(1 for line in text.splitlines() if line.startswith("## "))
    return sections - text.count(NOT_RUN), figures


def _keep_richer(out: Path, text: str, new_figures: int) -> None:
    """Refuse to replace a report that has more results than the new one, unless `force`."""
    readme, figures = out / "README.md", out / "figures"
    if not readme.is_file():
        return
    old = results_in(readme.read_text(), len(list(figures.glob("*.png"))) if figures.is_dir() else 0)
    new = results_in(text, new_figures)
    if new[0] < old[0] or new[1] < old[1]:
        raise ValueError(f"{readme}: the new report has results for {new[0]} sections and {new[1]} figures, the "
                         f"existing one {old[0]} and {old[1]} (check --runs and --params; --force replaces it)")


def build_report(params: Params, runs: str | Path, out: str | Path, force: bool = False) -> list[Path]:
    """Write out/README.md and out/figures/*.png from the metrics files under `runs`; return what was written.

    The figures are drawn in a temporary folder and swapped in only when the report is written: a report
    with fewer results than the one in place (a mistyped --runs) is refused unless `force`."""
    runs, out = Path(runs), Path(out)
    check_runs_folder(runs)
    final_figures = out / "figures"
    figures = out / f".figures.{os.getpid()}.tmp"
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    try:
        text = _report_text(params, runs, figures)
        if not force:
            _keep_richer(out, text, len(list(figures.glob("*.png"))))
        if final_figures.exists():   # only this run's figures: a dropped cell leaves no stale image behind
            shutil.rmtree(final_figures)
        figures.rename(final_figures)
    finally:
        if figures.exists():
            shutil.rmtree(figures)
    write_text(out / "README.md", text)
    headline = write_headline_metrics(params, runs, out / "metrics")
    return [out / "README.md", *sorted(final_figures.iterdir()), *headline]


PAPER_PROFILE = "paper"   # the one profile that runs the protocols' budgets
# The protocols' meta-updates (Finn et al. 2017; the reference code's metatrain_iterations): the scale a
# short profile's budget is a fraction of.
PROTOCOL_ITERATIONS = {"sinusoid": 70000, "omniglot": 60000}


def paper_budget(params: Params) -> bool:
    """Whether the cells ran the protocols' budgets, so that setting them against the paper means something."""
    return params.profile == PAPER_PROFILE


def smoke_note(params: Params) -> list[str]:
    """The first thing a reader of a short profile's report must know: its orderings are not results."""
    if paper_budget(params):
        return []
    shares = [f"the sinusoid {params.sinusoid.train.iterations:,} of {PROTOCOL_ITERATIONS['sinusoid']:,}"]
    if "maml" in params.omniglot.run.algorithms and params.omniglot.run.settings:
        train = fewshot_train(params, "omniglot", "maml", params.omniglot.run.settings[0])
        shares.append(f"Omniglot MAML {train.iterations:,} of {PROTOCOL_ITERATIONS['omniglot']:,}"
                      + (f" or {train.time_budget_minutes:g} minutes, whichever comes first"
                         if train.time_budget_minutes else ""))
    lead = ("A smoke run: profile `quick`'s budgets rank nothing." if params.profile == "quick" else
            f"Profile `{params.profile}` runs below the protocols' budgets: it ranks nothing.")
    return [f"**{lead}** The budgets are a small fraction of the protocols' ({'; '.join(shares)} meta-updates), "
            "so no ordering below is evidence that one variant beats another: it shows that every benchmark "
            "and variant runs end to end. The numbers under the papers' protocols, set against the papers', are "
            "on the reference page: [reference/README.md](reference/README.md).", ""]


def _report_text(params: Params, runs: Path, figures: Path) -> str:
    lines = ["# mamlbench report", "",
             f"Generated by `mamlbench report` (the DVC `report` stage) from the metrics files; profile "
             f"`{params.profile}`, seeds {params.seeds}.", "", *smoke_note(params),
             "Accuracies in %; `±` is a 95% confidence interval. "
             "Paper numbers: Finn et al. 2017 (MAML, first-order MAML), Nichol et al. 2018 (Reptile, "
             "transductive), Li et al. 2017 (Meta-SGD), Antoniou et al. 2019 (MAML++), Raghu et al. 2020 "
             "(ANIL), Snell et al. 2017 (Prototypical Networks), Rajeswaran et al. 2019 (iMAML, GD); — where the "
             "paper gives none for that cell.", ""]
    lines += sinusoid_section(params, runs, figures)
    for benchmark in FEWSHOT:   # the papers' benchmarks always (published numbers); a dataset of yours once run
        if benchmark in PAPER or getattr(params, benchmark).run.algorithms or (runs / benchmark).is_dir():
            lines += fewshot_section(params, benchmark, runs, figures)
    lines += rl_section(params, runs, figures)
    return "\n".join(lines).rstrip() + "\n"
