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


def test_paper_profile_holds_the_papers_hyperparameters(tmp_path):
    from mamlbench.config import fewshot_train
    paper = load_params(ROOT / "params.yaml", profile="paper")
    five = fewshot_train(paper, "omniglot", "maml", "5w1s")
    assert (five.inner_lr, five.inner_steps, five.meta_batch_size, five.meta_lr, five.iterations) == (0.4, 1, 32, 1e-3, 60000)
    twenty = fewshot_train(paper, "omniglot", "maml", "20w1s")
    assert (twenty.inner_lr, twenty.inner_steps, twenty.meta_batch_size) == (0.1, 5, 16)
    mini1, mini5 = (fewshot_train(paper, "mini_imagenet", "maml", s) for s in ("5w1s", "5w5s"))
    assert (mini1.inner_lr, mini1.inner_steps, mini1.meta_batch_size, mini1.n_query) == (0.01, 5, 4, 15)
    assert mini5.meta_batch_size == 4 and paper.mini_imagenet.evaluate.inner_steps == 10  # README: --meta_batch_size=4
    assert paper.omniglot.evaluate.inner_steps == 10 and paper.omniglot.evaluate.n_episodes == 600
    assert paper.sinusoid.train.iterations == 70000


@pytest.mark.parametrize("override, key", [
    ({"variants": {"reptile": {"train": {"meta_lr": -1}}}}, "variants.reptile.train.meta_lr"),  # quick sets inner_lr
    ({"variants": {"mamlpp": {"options": {"lslrr": True}}}}, "variants.mamlpp.options.lslrr"),
    ({"omniglot": {"run": {"settings": ["9w9s"]}}}, "omniglot.run.settings"),
    ({"omniglot": {"settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 15, "train": {"inner_steps": 0}}}}},
     "omniglot.settings.5w1s.train.inner_steps"),
    ({"omniglot": {"run": {"algorithms": ["maml", "matchingnet"]}}}, "omniglot.run.algorithms"),
])
def test_fewshot_keys_are_validated(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(write_params(tmp_path / "params.yaml", override))


def test_profile_may_not_change_the_pipeline_shape(tmp_path):
    """DVC expands the matrix from params.yaml as written: a profile's `seeds` would go unseen."""
    path = write_params(tmp_path / "params.yaml", {"profiles": {"quick": {"seeds": [0, 1]}}})
    with pytest.raises(ConfigError, match="profiles.quick.seeds: DVC expands the pipeline"):
        load_params(path)


def test_seed_and_overrides_win_over_the_file(tmp_path):
    path = write_params(tmp_path / "params.yaml", {"seed": 0, "seeds": [0, 3]})
    params = load_params(path, seed=3, overrides={"variants.maml.train.inner_lr": 0.2})
    assert params.seed == 3 and params.seeds == [0, 3] and params.variants.maml.train["inner_lr"] == 0.2
    with pytest.raises(ConfigError, match="seeds"):
        load_params(write_params(tmp_path / "bad.yaml", {"seeds": [-1]}))


def test_help_shows_the_defaults_it_names_in_brackets():
    """rich reads `[tune.n_trials]` as markup and drops it unless escaped: --help must still say it."""
    from typer.testing import CliRunner
    from mamlbench.cli import app
    out = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200"}).output
    assert "[tune.n_trials]" in out and "[tune.total_trials]" in out and "[sqlite:///optuna.db]" in out
    out = CliRunner().invoke(app, ["rl", "evaluate", "--help"], env={"COLUMNS": "200"}).output
    assert "[<runs>/metrics.json]" in out
