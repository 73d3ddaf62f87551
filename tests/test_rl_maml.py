"""MAML-TRPO: baseline variance, the inner update's gradient, seeded rollouts, resume, CLI, learning."""
import json

import pytest
import torch
import yaml

from mamlbench.algorithms.core import split_state
from mamlbench.rl.baseline import advantages
from mamlbench.rl.envs import sample_tasks
from mamlbench.rl.maml_trpo import MetaConfig, collect, make_policy, reinforce_loss, surrogate
from mamlbench.rl.params import RLEnvParams, RLEvalParams
from mamlbench.rl.policy import stack_params
from mamlbench.rl.sampler import Episodes, Sampler
from mamlbench.rl.train import train
from mamlbench.rl.trpo import flat


pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_baseline_reduces_policy_gradient_variance():
    # 16 independent batches of 10 episodes on the same navigation task, one fixed policy.
    sampler = Sampler("navigation", horizon=50)
    policy = make_policy(2, 2, [32, 32], 0)
    params, buffers = split_state(policy)
    eps = sampler.sample(policy, params, buffers, sample_tasks("navigation", 1, 3) * 16, 10, seed=7)

    def gradients(baseline: bool) -> torch.Tensor:   # (16, n_params): one REINFORCE gradient per batch
        adv = advantages(eps.obs, eps.rewards, eps.mask, 0.99, 1.0, baseline=baseline, normalize=False)
        return torch.stack([flat(torch.autograd.grad(
            reinforce_loss(policy, params, buffers, eps.obs[i], eps.actions[i], adv[i], eps.mask[i]),
            list(params.values()))) for i in range(16)])

    var_without, var_with = gradients(False).var(0).sum(), gradients(True).var(0).sum()
    assert var_with < 0.2 * var_without, (float(var_with), float(var_without))


def _double(eps: Episodes) -> Episodes:
    return Episodes(eps.obs.double(), eps.actions.double(), eps.rewards.double(), eps.mask.double(), eps.tasks)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_through_inner_update_matches_finite_differences(first_order):
    cfg = MetaConfig(n_episodes=3, inner_lr=0.5, first_order=first_order)
    sampler = Sampler("navigation", horizon=15)
    policy = make_policy(2, 2, [16, 16], 1)
    # rllab's zero biases put navigation's first observation, the origin, on every ReLU's kink, where
    # autograd and finite differences rightly disagree: move the biases off it.
    with torch.no_grad():
        for m in policy.mu[::2]:
            m.bias.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(3))
    train_eps, train_adv, valid, valid_adv = collect(policy, sampler, sample_tasks("navigation", 2, 1), cfg, (1,))
    policy = policy.double()
    train_eps, valid = [_double(e) for e in train_eps], _double(valid)
    train_adv, valid_adv = [a.double() for a in train_adv], valid_adv.double()
    params, buffers = split_state(policy)
    _, _, old = surrogate(policy, params, buffers, train_eps, train_adv, valid, valid_adv, cfg, None, True)

    def J(p, first_order=False):   # post-update surrogate as a function of the initial parameters
        return surrogate(policy, p, buffers, train_eps, train_adv, valid, valid_adv, cfg, old, first_order)[0]

    grads = torch.autograd.grad(J(params, first_order), list(params.values()))
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype) for k, p in params.items()}
    eps_fd = 1e-5
    with torch.enable_grad():
        plus = J({k: (p + eps_fd * v[k]).detach().requires_grad_() for k, p in params.items()})
        minus = J({k: (p - eps_fd * v[k]).detach().requires_grad_() for k, p in params.items()})
    fd = float((plus - minus).detach() / (2 * eps_fd))
    analytic = float(sum((g * v[k]).sum() for g, k in zip(grads, params)))
    if first_order:   # dropping the second-order term gives a visibly different directional derivative
        assert abs(analytic - fd) > 1e-4 * abs(fd)
    else:
        assert analytic == pytest.approx(fd, rel=1e-5)


def test_seeded_rollouts_repeat_exactly():
    sampler = Sampler("halfcheetah_vel", horizon=20)
    policy = make_policy(sampler.obs_dim, sampler.act_dim, [16, 16], 0)
    params, buffers = split_state(policy)
    per_task = stack_params([params, {k: p + 0.1 for k, p in params.items()}])   # a different policy per task
    tasks = sample_tasks("halfcheetah_vel", 2, 0)
    a = sampler.sample(policy, per_task, buffers, tasks, 3, seed=(5, 1), per_task=True)
    b = sampler.sample(policy, per_task, buffers, tasks, 3, seed=(5, 1), per_task=True)
    c = sampler.sample(policy, per_task, buffers, tasks, 3, seed=(5, 2), per_task=True)
    sampler.close()
    for x, y in ((a.obs, b.obs), (a.actions, b.actions), (a.rewards, b.rewards)):
        assert torch.equal(x, y)
    assert not torch.equal(a.obs, c.obs) and not torch.equal(a.actions, c.actions)
    assert a.obs.shape == (2, 3, 20, sampler.obs_dim) and a.mask.all()
    asynchronous = Sampler("halfcheetah_vel", horizon=20, vector="async")   # a process per episode slot
    d = asynchronous.sample(policy, per_task, buffers, tasks, 3, seed=(5, 1), per_task=True)
    asynchronous.close()
    assert torch.equal(a.rewards, d.rewards) and torch.equal(a.obs, d.obs)
    sharded = Sampler("halfcheetah_vel", horizon=20, vector="sharded", workers=4)   # 6 slots: shards of 1 and 2
    e = sharded.sample(policy, per_task, buffers, tasks, 3, seed=(5, 1), per_task=True)
    f = sharded.sample(policy, per_task, buffers, tasks, 3, seed=(5, 2), per_task=True)   # the workers live on
    sharded.close()
    for x, y in ((a, e), (c, f)):
        assert torch.equal(x.rewards, y.rewards) and torch.equal(x.obs, y.obs) and torch.equal(x.mask, y.mask)


TINY = RLEnvParams(horizon=10, hidden=[16, 16], n_episodes=2, meta_batch_size=2, iterations=3,
                   pretrain_iterations=2, checkpoint_every=1, evaluate=RLEvalParams(n_tasks=3, n_episodes=2))


def test_resumed_training_repeats_an_uninterrupted_run(tmp_path):
    full = train("navigation", TINY, 0, tmp_path / "full")
    train("navigation", TINY, 0, tmp_path / "cut", iterations=2)         # interrupted after 2
    resumed = train("navigation", TINY, 0, tmp_path / "cut")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert history == json.loads((tmp_path / "full" / "history.json").read_text())


def test_other_settings_never_resume_an_old_checkpoint(tmp_path):
    """A changed setting (as `dvc exp run -S` makes) trains afresh in the same folder, not on from
    the policy of the old settings; the old checkpoints are removed."""
    import dataclasses
    train("navigation", TINY, 0, tmp_path / "run")
    other = dataclasses.replace(TINY, inner_lr=0.05)
    fresh = train("navigation", other, 0, tmp_path / "fresh")
    reused = train("navigation", other, 0, tmp_path / "run")
    for (k, a), b in zip(fresh.state_dict().items(), reused.state_dict().values()):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == \
        json.loads((tmp_path / "fresh" / "history.json").read_text())


def test_cli_train_and_evaluate_smoke(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from mamlbench.rl.cli import app
    raw = yaml.safe_load(open("params.yaml"))
    raw["tracking"]["enabled"] = False
    raw["rl"]["navigation"] = {"horizon": 10, "hidden": [16, 16], "n_episodes": 2, "meta_batch_size": 2,
                               "iterations": 2, "pretrain_iterations": 2,
                               "evaluate": {"n_tasks": 3, "n_episodes": 2, "trace_episodes": 2}}
    raw["profile"] = "quick"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    run = runner.invoke(app, ["train", "navigation", "-p", str(params), "--out", str(tmp_path / "runs"),
                              "--metrics", str(tmp_path / "train.json"), "--no-progress"])
    assert run.exit_code == 0, run.output
    run = runner.invoke(app, ["evaluate", "navigation", "-p", str(params), "--runs", str(tmp_path / "runs"),
                              "--metrics", str(tmp_path / "eval.json"), "--plots", str(tmp_path / "plots")])
    assert run.exit_code == 0, run.output
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert set(metrics) == {"maml", "pretrained", "random", "provenance"}
    assert set(metrics["maml"]) == {f"step_{k}" for k in range(4)} and metrics["provenance"]["torch"]
    assert all((tmp_path / "plots" / f).stat().st_size > 1000 for f in ("adaptation.png", "trace.png", "training.png"))
    assert len((tmp_path / "plots" / "adaptation.csv").read_text().splitlines()) == 1 + 3 * 4
    bad = runner.invoke(app, ["train", "pong", "-p", str(params)])
    assert bad.exit_code != 0 and "unknown environment 'pong'" in str(bad.exception)


def test_time_budget_stops_training_and_sizes_the_baseline(tmp_path):
    """A wall-time budget ends meta-training after the iteration that passes it; the pretrained
    baseline gets as many iterations, and rerunning the finished run trains no further."""
    from mamlbench.rl.pipeline import train_env
    raw = yaml.safe_load(open("params.yaml"))
    raw["tracking"]["enabled"] = False
    raw["rl"]["navigation"] = {"horizon": 10, "hidden": [16, 16], "n_episodes": 2, "meta_batch_size": 2,
                               "iterations": 50, "pretrain_iterations": 50, "time_budget_minutes": 1e-9}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    summary = train_env(params, "navigation", tmp_path / "runs", tmp_path / "train.json")
    assert summary["maml"]["iterations"] == 1 and summary["pretrained"]["iterations"] == 1, summary
    again = train_env(params, "navigation", tmp_path / "runs", tmp_path / "train.json")
    assert again == summary
    assert len(json.loads((tmp_path / "runs" / "maml" / "history.json").read_text())) == 1


def test_maml_and_the_baseline_trained_in_two_processes_equal_one(tmp_path):
    """`rl train --only maml` then `--only pretrained` (two workers side by side) is the run of one
    `rl train`; under a time budget the baseline needs MAML's reached iterations, so it refuses to go first."""
    from mamlbench.rl.pipeline import train_env
    raw = yaml.safe_load(open("params.yaml"))
    raw["tracking"]["enabled"] = False
    raw["rl"]["navigation"] = {"horizon": 10, "hidden": [16, 16], "n_episodes": 2, "meta_batch_size": 2,
                               "iterations": 2, "pretrain_iterations": 2}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    both = train_env(params, "navigation", tmp_path / "one", tmp_path / "one.json")
    split = {**train_env(params, "navigation", tmp_path / "two", tmp_path / "a.json", models=("pretrained",)),
             **train_env(params, "navigation", tmp_path / "two", tmp_path / "b.json", models=("maml",))}
    assert split == both
    for model in ("maml", "pretrained"):
        assert ((tmp_path / "one" / model / "history.json").read_text()
                == (tmp_path / "two" / model / "history.json").read_text())
    raw["rl"]["navigation"]["time_budget_minutes"] = 1.0
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"maml/history.json: missing; .* train maml first"):
        train_env(params, "navigation", tmp_path / "three", tmp_path / "c.json", models=("pretrained",))


@pytest.mark.slow
def test_navigation_meta_training_beats_pre_adaptation_and_pretrained(tmp_path):
    """Quick-profile MAML-TRPO on 2D navigation (scaled down to ~3 minutes on one core)."""
    from mamlbench.rl.evaluate import evaluate
    p = RLEnvParams(iterations=30, pretrain_iterations=30, meta_batch_size=10, n_episodes=10,
                    checkpoint_every=100, evaluate=RLEvalParams(n_tasks=20, n_episodes=20, inner_lrs=[0.1]))
    maml = train("navigation", p, 0, tmp_path / "maml")
    pretrained = train("navigation", p, 0, tmp_path / "pretrained", pretrain=True)
    results, _ = evaluate("navigation", {"maml": maml, "pretrained": pretrained}, p)
    r = {m: [steps[f"step_{k}"]["mean"] for k in range(2)] for m, steps in results["policies"].items()}
    print(json.dumps(r))
    assert r["maml"][1] > r["maml"][0] + 5, r           # one inner step clearly helps
    assert r["maml"][1] > r["pretrained"][1] + 5, r     # and beats the pretrained baseline's step
