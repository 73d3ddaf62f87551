"""Sinusoid regression end to end: learning, evaluation, resume after a kill, MLflow records."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_params
from mamlbench import runs, sinusoid
from mamlbench.config import load_params
from mamlbench.data.sinusoid import fixed_test_tasks, task_batch
from mamlbench.io import load_torch
from mamlbench.train import TrainingDiverged


def test_task_distribution_matches_the_paper():
    g = torch.Generator().manual_seed(0)
    support_x, support_y, query_x, query_y = task_batch(2000, 10, 10, g)
    assert support_x.shape == (2000, 10, 1) and query_y.shape == (2000, 10, 1)
    assert -5 <= support_x.min() and support_x.max() <= 5
    tasks, *_ = fixed_test_tasks(2000, 5, 5, seed=1)
    assert 0.1 <= tasks.amplitude.min() and tasks.amplitude.max() <= 5.0
    assert 0.0 <= tasks.phase.min() and tasks.phase.max() <= torch.pi
    torch.testing.assert_close(tasks.amplitude.mean(), torch.tensor(2.55), atol=0.1, rtol=0)
    # the test set is a function of its seed alone
    again, *_ = fixed_test_tasks(2000, 5, 5, seed=1)
    assert torch.equal(tasks.amplitude, again.amplitude)


def test_short_run_adapts_and_beats_the_pretrained_baseline(tmp_path):
    params_path = write_params(tmp_path / "params.yaml", {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"enabled": False},
        # torch's init: the reference's N(0, 0.01) needs far more than 1500 iterations to leave zero
        "sinusoid": {"init": "torch", "train": {"iterations": 1500, "checkpoint_every": 1500, "log_every": 100},
                     "pretrain": {"iterations": 1500, "checkpoint_every": 1500, "log_every": 100},
                     "evaluate": {"n_tasks": 200, "k_shots": [10], "inner_steps": [0, 1, 10]}}})
    params = load_params(params_path)
    for kind in sinusoid.MODELS:
        sinusoid.train(params, kind, tmp_path / kind, progress=False)
    metrics = sinusoid.evaluate(params, {k: tmp_path / k / "model.pt" for k in sinusoid.MODELS}, tmp_path / "eval")
    maml, base = metrics["maml"]["k10"], metrics["pretrain"]["k10"]
    assert maml["step1"]["mse"] < 0.5 * maml["step0"]["mse"], metrics
    assert maml["step1"]["mse"] < 0.5 * base["step1"]["mse"], metrics
    assert maml["step10"]["mse"] < 0.5 * base["step10"]["mse"], metrics
    assert (tmp_path / "eval" / "fits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "eval" / "per_task.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 1 * 3 * 200


def _train_cmd(params: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mamlbench.cli", "train", "sinusoid", "-p", str(params), "--run-dir", str(run_dir),
            "--no-progress"]


def _wait_for_checkpoint(folder: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = sorted(p.name for p in folder.glob("ckpt-*.pt")) if folder.is_dir() else []
        if names and int(names[-1][5:13]) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before checkpoint {at_least}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow   # 20-40 s: `pytest -m "not slow"` stays under 5 minutes
def test_killed_run_resumes_bit_exact(tmp_path, tiny_sinusoid):
    """SIGKILL a real training process twice; the resumed run ends with the uninterrupted run's parameters."""
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(tiny_sinusoid, straight), check=True, capture_output=True, cwd=tmp_path)

    resumed = tmp_path / "resumed"
    for at_least in (20, 60):
        proc = subprocess.Popen(_train_cmd(tiny_sinusoid, resumed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)
        _wait_for_checkpoint(resumed / "checkpoints", at_least, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (resumed / "model.pt").exists()
    out = subprocess.run(_train_cmd(tiny_sinusoid, resumed), check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "resumed at" in out.stdout

    a, b = load_torch(straight / "model.pt"), load_torch(resumed / "model.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert (straight / "curve.csv").read_text() == (resumed / "curve.csv").read_text()
    def results(run: Path) -> dict:  # the provenance differs: wall time, where it resumed
        return {k: v for k, v in json.loads((run / "train.json").read_text()).items() if k != "provenance"}
    assert results(straight) == results(resumed)


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path, tiny_sinusoid):
    params = load_params(tiny_sinusoid)
    sinusoid.train(params, "maml", tmp_path / "run", progress=False)
    changed = write_params(tmp_path / "changed.yaml", {"sinusoid": {"train": {"inner_lr": 0.02}}}, base=tiny_sinusoid)
    out = runs.train_sinusoid(changed, "maml", tmp_path / "run", progress=False)
    assert out["resumed_from"] == 0


def test_mlflow_records_params_metrics_tags_and_artifacts(tmp_path, tiny_sinusoid):
    import mlflow

    runs.train_sinusoid(tiny_sinusoid, "maml", tmp_path / "maml", progress=False)
    runs.train_sinusoid(tiny_sinusoid, "pretrain", tmp_path / "pretrain", progress=False)
    runs.evaluate_sinusoid(tiny_sinusoid, {"maml": tmp_path / "maml", "pretrain": tmp_path / "pretrain"}, tmp_path / "eval")

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mamlbench-sinusoid")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # one scheme: <benchmark>-<variant>-<setting>-seed<k>-<profile> (tiny is not the default profile)
    assert set(found) == {f"sinusoid-{m}-k10-seed0-tiny{e}" for m in ("maml", "pretrain") for e in ("", "-evaluate")}
    train = found["sinusoid-maml-k10-seed0-tiny"]
    assert train.info.status == "FINISHED"
    assert train.data.params["train.inner_lr"] == "0.01" and train.data.params["seed"] == "0"
    assert {"git_commit", "device", "seed", "benchmark", "variant", "setting", "profile", "stage"} <= set(train.data.tags)
    history = client.get_metric_history(train.info.run_id, "meta_train/query_loss")
    assert [m.step for m in history] == list(range(10, 121, 10))
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"model.pt", "curve.csv", "train.json"} <= artifacts
    # each policy's evaluation nests under its training run and puts the test metrics on its row
    expected = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for model in ("maml", "pretrain"):
        trained, evaluated = found[f"sinusoid-{model}-k10-seed0-tiny"], found[f"sinusoid-{model}-k10-seed0-tiny-evaluate"]
        assert evaluated.data.tags["mlflow.parentRunId"] == trained.info.run_id
        for k in ("k5", "k10"):
            for step in ("step0", "step1", "step2"):
                value = expected[model][k][step]["mse"]
                assert trained.data.metrics[f"meta_test/mse_{k}_{step}"] == pytest.approx(value, rel=1e-12)
                assert evaluated.data.metrics[f"meta_test/mse_{k}_{step}"] == pytest.approx(value, rel=1e-12)
    keys = [set(k for k in found[f"sinusoid-{m}-k10-seed0-tiny"].data.metrics if k.startswith("meta_test/"))
            for m in ("maml", "pretrain")]
    assert keys[0] == keys[1] and len(keys[0]) == 6


def test_divergence_stops_with_the_setting_and_fails_the_run(tmp_path, tiny_sinusoid):
    import mlflow

    bad = write_params(tmp_path / "bad.yaml", {"sinusoid": {"train": {"inner_lr": 1e30}}}, base=tiny_sinusoid)
    with pytest.raises(TrainingDiverged, match=r"iteration \d+ .*inner_lr=1e\+30"):
        runs.train_sinusoid(bad, "maml", tmp_path / "run", progress=False)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mamlbench-sinusoid").experiment_id])
    assert run.info.status == "FAILED"
    assert "TrainingDiverged" in run.data.tags["failure_reason"]
    assert not (tmp_path / "run" / "model.pt").exists()
