"""params.yaml validation: one line naming the key and the value, before any work starts."""
from __future__ import annotations

import pytest

from conftest import ROOT, cli, write_params
from mamlbench.config import load_params
from mamlbench.schema import ConfigError


def test_repo_params_load_and_profiles_apply(tmp_path):
    params = load_params(ROOT / "params.yaml")
    assert params.profile == "quick"
    paper = load_params(write_params(tmp_path / "p.yaml", {"profile": "paper"}))
    assert paper.sinusoid.train.iterations == 70000
    assert params.sinusoid.train.iterations < paper.sinusoid.train.iterations


@pytest.mark.parametrize("override, key, fragment", [
    ({"sinusoid": {"train": {"inner_lr": -0.1}}}, "sinusoid.train.inner_lr", "must be > 0"),
    ({"sinusoid": {"train": {"inner_lr": "fast"}}}, "sinusoid.train.inner_lr", "expected a number"),
    ({"sinusoid": {"train": {"inner_steps": 0}}}, "sinusoid.train.inner_steps", "must be >= 1"),
    ({"sinusoid": {"train": {"inner_steps": 1.5}}}, "sinusoid.train.inner_steps", "expected an integer"),
    ({"sinusoid": {"train": {"inner_lrr": 0.1}}}, "sinusoid.train.inner_lrr", "unknown key"),
    ({"sinusoid": {"train": {"strategy": "gpu"}}}, "sinusoid.train.strategy", "must be one of"),
    ({"sinusoid": {"evaluate": {"k_shots": [5, -1]}}}, "sinusoid.evaluate.k_shots", "must be >= 1"),
    ({"seed": True}, "seed", "expected an integer"),
    ({"profile": "huge"}, "profile", "no such entry"),
])
def test_bad_values_name_the_key(tmp_path, override, key, fragment):
    path = write_params(tmp_path / "params.yaml", override)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert key in message and fragment in message and "\n" not in message


def test_cli_rejects_bad_params_in_one_line_before_work(tmp_path):
    path = write_params(tmp_path / "params.yaml", {"sinusoid": {"train": {"meta_lr": -1}}})
    out = cli("train", "sinusoid", "-p", str(path), "--run-dir", str(tmp_path / "run"), cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: sinusoid.train.meta_lr = -1: must be > 0"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_help_answers():
    out = cli("train", "--help")
    assert "resuming" in out.stdout and "--params" in out.stdout
