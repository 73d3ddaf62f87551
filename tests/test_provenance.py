"""Run identity, provenance, time budgets and progress (issue 14).

A checkpoint resumes only a run of the same code, settings and data: an edit to the training code
(in a copy of the package the CLI runs from) starts the run afresh and says which part changed.
Every result carries its provenance, onto the MLflow run and into the report; a time budget stops
few-shot and sinusoid training after the iteration that passes it, and a rerun trains no further.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_params
from mamlbench.config import load_params
from mamlbench.io import load_torch
from mamlbench.progress import Progress
from mamlbench.provenance import RunIdentity
from mamlbench.report import build_report
from mamlbench.train import Checkpointer

TINY = {"iterations": 40, "checkpoint_every": 20, "log_every": 10, "meta_batch_size": 5}


def _params(tmp_path: Path, train: dict | None = None, tracking: dict | None = None) -> Path:
    return write_params(tmp_path / "params.yaml", {
        "profile": "tiny", "profiles": {"tiny": {}},
        "tracking": tracking or {"enabled": False},
        "sinusoid": {"train": {**TINY, **(train or {})},
                     "pretrain": {"iterations": 40, "checkpoint_every": 20, "log_every": 10},
                     "evaluate": {"n_tasks": 20, "k_shots": [5], "inner_steps": [0, 1]}}})


def _package_copy(tmp_path: Path) -> Path:
    """The package as the CLI imports it, in a folder the test may edit."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "mamlbench", root / "mamlbench", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _train(src: Path, params: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(src), PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "mamlbench.cli", "train", "sinusoid", "--model", "maml",
                          "--run-dir", str(run), "-p", str(params), *extra], capture_output=True, text=True, env=env,
                         timeout=600, cwd=params.parent)
    assert out.returncode == 0, out.stderr
    return out


def edit_training_code(root: Path) -> None:
    """A "fix" to the sinusoid's meta-training step under `root`: it changes the trajectory."""
    source = root / "mamlbench" / "sinusoid.py"
    text = source.read_text()
    edited = text.replace("out = meta_update(learner, optimizer, batch, cfg.grad_clip,",
                          "batch = [t * 1.01 for t in batch]\n            out = meta_update(learner, optimizer, batch, "
                          "cfg.grad_clip,", 1)
    assert edited != text, "the step to edit is where the test expects it"
    source.write_text(edited)


def _weights(run: Path) -> dict:
    return load_torch(run / "model.pt")["state_dict"]


def test_code_edit_retrains_instead_of_resuming_the_old_model(tmp_path):
    src, params, run = _package_copy(tmp_path), _params(tmp_path), tmp_path / "run"
    first = _train(src, params, run)
    old = json.loads((run / "train.json").read_text())["provenance"]
    assert old["iterations"] == 40 and old["resumed_from"] == 0 and old["stopped"] == "iterations"

    same = _train(src, params, run)   # same code, settings, data: resumes the finished run, trains nothing
    assert "resumed at 40" in same.stdout and "starting afresh" not in same.stderr
    assert json.loads((run / "train.json").read_text())["provenance"]["resumed_from"] == 40

    edit_training_code(src)
    before = _weights(run)
    fresh = _train(src, params, run)
    notes = [line for line in fresh.stderr.splitlines() if "starting afresh" in line]
    assert len(notes) == 1 and "its code differs" in notes[0] and "ckpt-00000040.pt" in notes[0], fresh.stderr
    new = json.loads((run / "train.json").read_text())["provenance"]
    assert new["resumed_from"] == 0 and new["iterations"] == 40
    assert new["code_hash"] != old["code_hash"]
    assert (new["settings_hash"], new["data_hash"]) == (old["settings_hash"], old["data_hash"])
    after = _weights(run)
    assert not all(torch.equal(before[k], after[k]) for k in before), "the edited code retrained the model"
    assert "trained sinusoid maml: 40 iterations" in first.stdout


def test_a_changed_settings_or_data_part_is_named(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    old = RunIdentity(code="c1", settings="s1", data="d1")
    Checkpointer(folder, old).save({"iteration": 5, "history": []})
    for new, said in ((RunIdentity("c1", "s2", "d1"), "its settings differs"),
                      (RunIdentity("c1", "s1", "d2"), "its data differs"),
                      (RunIdentity("c2", "s2", "d1"), "its code and settings differ")):
        Checkpointer(folder, old).save({"iteration": 5, "history": []})
        ckpts = Checkpointer(folder, new)
        assert ckpts.latest() is None
        ckpts.discard_foreign()
        err = capsys.readouterr().err
        assert err.count("starting afresh") == 1 and said in err, err
        assert ckpts.paths() == []
    # a checkpoint of the same identity is kept and resumed, silently
    Checkpointer(folder, old).save({"iteration": 5, "history": []})
    again = Checkpointer(folder, RunIdentity("c1", "s1", "d1"))
    again.discard_foreign()
    assert again.latest()["iteration"] == 5 and again.latest()["identity"] == {"code": "c1", "settings": "s1",
                                                                              "data": "d1"}
    assert "starting afresh" not in capsys.readouterr().err


def test_time_budget_stops_after_the_passing_iteration_and_a_rerun_trains_no_further(tmp_path):
    src, run = _package_copy(tmp_path), tmp_path / "run"
    budget = 0.02  # minutes: 1.2 s, a fraction of the 5000 iterations
    params = _params(tmp_path, {"iterations": 5000, "checkpoint_every": 1000, "time_budget_minutes": budget})
    _train(src, params, run)
    done = json.loads((run / "train.json").read_text())
    prov = done["provenance"]
    reached = done["iterations"]
    assert 0 < reached < 5000 and prov["iterations"] == reached and prov["stopped"] == "time_budget"
    assert prov["wall_seconds"] >= 60 * budget - 0.05
    assert [p.name for p in sorted((run / "checkpoints").iterdir())][-1] == f"ckpt-{reached:08d}.pt"
    curve = (run / "curve.csv").read_text().splitlines()
    assert curve[-1].startswith(f"{reached},"), "the last iteration is in the curve"
    weights = _weights(run)

    again = _train(src, params, run)
    assert f"resumed at {reached}" in again.stdout and "starting afresh" not in again.stderr
    assert json.loads((run / "train.json").read_text())["iterations"] == reached
    assert all(torch.equal(weights[k], v) for k, v in _weights(run).items())

    # the budget is no part of the identity: a larger one continues the same run
    longer = _params(tmp_path, {"iterations": 5000, "checkpoint_every": 1000, "time_budget_minutes": 2 * budget})
    _train(src, longer, run)
    extended = json.loads((run / "train.json").read_text())
    assert extended["provenance"]["resumed_from"] == reached and extended["iterations"] > reached


@pytest.mark.slow   # 20-40 s: `pytest -m "not slow"` stays under 5 minutes
def test_provenance_on_the_mlflow_run_and_in_the_report(tmp_path):
    import mlflow
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    src = _package_copy(tmp_path)
    params = _params(tmp_path, tracking={"uri": store})
    runs = tmp_path / "runs" / "sinusoid" / "seed0"
    _train(src, params, runs / "maml")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(src)
    for args in (["train", "sinusoid", "--model", "pretrain", "--run-dir", str(runs / "pretrain")],
                 ["evaluate", "sinusoid", "--runs", str(runs), "--out", str(runs / "eval")]):
        out = subprocess.run([sys.executable, "-m", "mamlbench.cli", *args, "-p", str(params)], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=600)
        assert out.returncode == 0, out.stderr

    trained = json.loads((runs / "maml" / "train.json").read_text())["provenance"]
    # the copy is outside git: its commit is unknown; the versions are this interpreter's
    assert trained["git_commit"] == "unknown" and trained["torch"] == torch.__version__
    assert trained["threads"] == torch.get_num_threads() and trained["device"] == "cpu"
    assert trained["data_hash"] == "none" and trained["wall_seconds"] > 0 and trained["profile"] == "tiny"

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    found = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("mamlbench-sinusoid")
                                                             .experiment_id])}
    tags = found["sinusoid-maml-k10-seed0-tiny"].data.tags
    for key in ("code_hash", "settings_hash", "data_hash", "torch", "device_name", "threads", "wall_seconds",
                "iterations", "stopped", "git_commit", "profile"):
        assert tags[f"provenance.{key}"] == str(trained[key]), key
    assert trained["git_dirty"] is None and "provenance.git_dirty" not in tags  # unknown outside git
    assert tags["provenance.iterations"] == "40" and tags["provenance.stopped"] == "iterations"
    evaluated = json.loads((runs / "eval" / "metrics.json").read_text())["provenance"]
    assert found["sinusoid-maml-k10-seed0-tiny-evaluate"].data.tags["provenance.settings_hash"] == evaluated["settings_hash"]

    # the report: one provenance line under the table, with the shared code hash and iterations
    text = build_report(load_params(params), tmp_path / "runs", tmp_path / "reports")[0].read_text()
    line = next(x for x in text.splitlines() if x.startswith("Provenance:"))
    assert f"code {trained['code_hash']} (training), {evaluated['code_hash']} (evaluation)" in line
    assert "iterations reached 40" in line and "commit unknown" in line and "2 runs" in line


def _cell(folder: Path, acc: float, code: str, protocol: str = "p") -> None:
    """A few-shot cell's result files as the pipeline writes them, with the given code and protocol hashes."""
    (folder / "eval").mkdir(parents=True)
    base = {"git_commit": "abc", "profile": "quick", "torch": "2", "cuda": None, "mujoco": None,
            "device_name": "cpu: x", "threads": 2}
    (folder / "train.json").write_text(json.dumps({"provenance": {**base, "code_hash": code, "data_hash": "d",
                                                                  "settings_hash": "s", "iterations": 30,
                                                                  "wall_seconds": 60.0, "stopped": "iterations"}}))
    (folder / "eval" / "metrics.json").write_text(json.dumps({
        "acc": acc, "ci95": 0.01, "n_episodes": 4, "episodes": "test-4",
        "provenance": {**base, "code_hash": "e", "data_hash": "td", "settings_hash": protocol}}))
    (folder / "eval" / "per_episode.csv").write_text("episode,inner_steps,acc\n" + "".join(
        f"{e},0,{acc}\n" for e in range(4)))
    (folder / "eval" / "steps.csv").write_text(f"inner_steps,acc,ci95\n0,{acc},0.01\n")
    (folder / "curve.csv").write_text("iteration,meta_train/query_loss,meta_train/query_acc,meta_val/query_acc\n"
                                      "30,0.5,0.8,0.7\n")


def test_report_marks_cells_of_other_code_or_protocol(tmp_path):
    params = load_params(write_params(tmp_path / "params.yaml", {
        "seeds": [0, 1], "omniglot": {"run": {"algorithms": ["maml", "fomaml", "anil"], "settings": ["5w1s"]}},
        "rl": {"envs": ["navigation"]}}))
    runs = tmp_path / "runs" / "omniglot"
    for seed in (0, 1):
        _cell(runs / f"maml-5w1s-seed{seed}", 0.9, code="A")
        _cell(runs / f"fomaml-5w1s-seed{seed}", 0.8, code="B" if seed == 1 else "A")  # one seed of other code
        _cell(runs / f"anil-5w1s-seed{seed}", 0.7, code="A", protocol="q" if seed == 0 else "p")
    text = build_report(params, tmp_path / "runs", tmp_path / "reports")[0].read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "| 5w1s | 30 |" in line}
    assert set(rows) == {"maml", "fomaml †", "anil ‡"}, rows
    line = next(x for x in text.splitlines() if x.startswith("Provenance:"))
    assert "code 2 different (training), e (evaluation)" in line and "† : " not in line
    assert "†: trained or evaluated by other code" in line and "‡: evaluated under another protocol" in line
    assert "6.0 min wall over 6 runs" in line and "iterations reached 30" in line

    for seed in (0, 1):  # all alike: no marks, no legend
        shutil.rmtree(runs / f"fomaml-5w1s-seed{seed}")
        shutil.rmtree(runs / f"anil-5w1s-seed{seed}")
    text = build_report(params, tmp_path / "runs", tmp_path / "reports")[0].read_text()
    assert "†" not in text and "‡" not in text and "| maml | 5w1s | 30 |" in text


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_off_a_terminal_prints_a_line_every_few_percent(monkeypatch):
    import mamlbench.progress as progress
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = _Log()
    with Progress("omniglot maml 5w1s", 200, start=20, stream=log, every_pct=10, every_s=30) as bar:
        for done in range(21, 201):
            now[0] += 0.5                       # 2 it/s
            bar.update(done, status="meta_val/query_acc=0.8")
    lines = log.getvalue().splitlines()
    assert lines[0] == "omniglot maml 5w1s: 20/200 (10%), resuming at 20"
    # 10% .. 100% in steps of 10 points: 9 lines after the first, each with rate, ETA and status
    assert len(lines) == 10, lines
    assert lines[1] == "omniglot maml 5w1s: 40/200 (20%) 2 it/s, elapsed 0:00:10, ETA 0:01:20, meta_val/query_acc=0.8"
    assert lines[-1].startswith("omniglot maml 5w1s: 200/200 (100%) 2 it/s")

    slow = _Log()
    with Progress("rl", 1000, stream=slow, every_pct=5, every_s=30) as bar:
        for done in range(1, 41):               # 40 steps of 10 s: 4% in all, a line every 30 s
            now[0] += 10.0
            bar.update(done)
    times = [line for line in slow.getvalue().splitlines() if "it/s" in line]
    assert len(times) == 14, times             # at 30, 60, ... 390 s, and the close at 400 s
    assert all("ETA" in line for line in times)


def test_training_logs_progress_lines_when_not_on_a_terminal(tmp_path):
    out = _train(_package_copy(tmp_path), _params(tmp_path, {"iterations": 100, "checkpoint_every": 50}),
                 tmp_path / "run")
    lines = [line for line in out.stderr.splitlines() if line.startswith("sinusoid maml: ")]
    assert lines[0] == "sinusoid maml: 0/100 (0%), starting"
    every_5 = [line.split()[2] for line in lines[1:] if line.split()[2] in {f"{k}/100" for k in range(5, 101, 5)}]
    assert every_5 == [f"{k}/100" for k in range(5, 101, 5)], lines  # and more on a slow machine: every 30 s
    assert lines[-1].startswith("sinusoid maml: 100/100 (100%)")
    assert all("it/s" in line and "ETA" in line for line in lines[1:])
    logged = [line for line in lines if int(line.split()[2].split("/")[0]) >= 10]  # log_every 10: a loss from then
    assert logged and all("meta_train/query_loss=" in line for line in logged)


@pytest.mark.slow   # 20-40 s: `pytest -m "not slow"` stays under 5 minutes
def test_fewshot_budget_validates_the_last_model_and_new_data_starts_afresh(tmp_path, capsys):
    from test_fewshot import make_glyphs, tiny
    from mamlbench import runs
    glyphs = make_glyphs(tmp_path / "a")
    params = tiny(tmp_path, iterations=5000, validate_every=1000, checkpoint_every=1000, time_budget_minutes=0.01)
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes")
    run = tmp_path / "run"
    out = runs.train_fewshot(params, "omniglot", "maml", "5w1s", run, progress=False, **data)
    summary = json.loads((run / "train.json").read_text())
    reached = summary["iterations"]
    assert 0 < reached < 1000 and out["iterations"] == reached and summary["provenance"]["stopped"] == "time_budget"
    assert summary["best_iteration"] == reached, "the budget's last model was validated"
    assert load_torch(run / "best.pt")["iteration"] == reached
    assert json.loads((run / "train.json").read_text())["provenance"]["data_hash"] != "none"

    again = runs.train_fewshot(params, "omniglot", "maml", "5w1s", run, progress=False, **data)
    assert again["resumed_from"] == reached and again["iterations"] == reached
    assert "starting afresh" not in capsys.readouterr().err

    other = make_glyphs(tmp_path / "b", seed=1)  # other images under the same settings and code
    fresh = runs.train_fewshot(params, "omniglot", "maml", "5w1s", run, progress=False,
                               prepared=other / "prepared", episodes_dir=other / "episodes")
    err = capsys.readouterr().err
    assert fresh["resumed_from"] == 0 and "its data differs" in err, err


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dvc_rewriting_its_lock_and_outputs_mid_run_leaves_the_tree_clean(tmp_path):
    """`dvc repro` rewrites dvc.lock and the git-kept outputs between stages: only a source edit is dirt."""
    from mamlbench.provenance import git_state
    repo = tmp_path / "repo"
    (repo / "mamlbench").mkdir(parents=True)
    (repo / ".dvc").mkdir()
    (repo / "reports" / "figures").mkdir(parents=True)
    (repo / "mamlbench" / "train.py").write_text("STEPS = 1\n")
    (repo / ".dvc" / "config").write_text("[core]\n")
    (repo / "reports" / "README.md").write_text("old report\n")
    (repo / "reports" / "figures" / "curves.png").write_bytes(b"old")
    (repo / "reports" / "NOTE.md").write_text("written by hand\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages:\n  report:\n    cmd: python stages/report.py\n    outs:\n"
                                   "    - path: reports/README.md\n      md5: a\n    - path: reports/figures\n"
                                   "      md5: b.dir\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "tracked")

    def dirty() -> bool | None:
        git_state.cache_clear()   # one answer per process: the test edits the tree between calls
        return git_state(str(repo))[1]

    assert dirty() is False
    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text().replace("md5: a", "md5: c"))
    (repo / ".dvc" / "config").write_text("[core]\n    autostage = true\n")
    (repo / "reports" / "README.md").write_text("new report\n")
    (repo / "reports" / "figures" / "curves.png").write_bytes(b"new")
    assert dirty() is False
    (repo / "reports" / "NOTE.md").write_text("edited\n")   # tracked, no stage writes it
    assert dirty() is True
    _git(repo, "checkout", "--", "reports/NOTE.md")
    (repo / "mamlbench" / "train.py").write_text("STEPS = 2\n")
    assert dirty() is True
    assert git_state(str(repo))[0] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                                     text=True).stdout.strip()
    git_state.cache_clear()
