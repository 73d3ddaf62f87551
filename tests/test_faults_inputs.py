"""Ordinary mistakes of a new user (issue 20, round two), each through the real CLI: a mistyped path, a
params file that is empty or hides a bad value under a profile, a model or an evaluation that is not the
one named, data made with other seeds, a cut file, an output path that cannot be written, a dead tracking
store. Each must be one line `error: <what>: <why> (<how to fix>)` before any work, exit 2 (3 for a
divergence), and leave no committed file overwritten and no MLflow run RUNNING.

The cases run in one subprocess (`tests/faults_cli.py` calls `mamlbench.cli.main` per case, as the
console script does), so the imports are paid once; the trained runs they need are made in-process."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_params
from mamlbench import runs
from mamlbench.data.episodes import episodize
from mamlbench.data.params import EpisodeSetting, EpisodesParams
from mamlbench.io import save_torch, write_json
from test_fewshot import make_glyphs, tiny

DATA = ["--prepared", "glyphs/prepared", "--episodes", "glyphs/episodes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edited(src: Path, dst: Path, edit) -> Path:
    raw = yaml.safe_load(src.read_text())
    edit(raw)
    dst.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst


def cases(w: Path) -> list[dict]:
    p = str(w / "params.yaml")
    dead = f"http://127.0.0.1:{free_port()}"
    run1, run5 = "runs/omniglot/maml-5w1s-seed0", "runs/omniglot/maml-5w5s-seed0"
    return [
        # 1: a mistyped or empty runs folder, and a report poorer than the one in place
        dict(name="report_typo", argv=["report", "-p", p, "--runs", "runz", "--out", "reports"]),
        dict(name="report_empty", argv=["report", "-p", p, "--runs", "empty_runs", "--out", "reports"]),
        dict(name="report_poorer", argv=["report", "-p", p, "--runs", "runs", "--out", "reports"]),
        dict(name="report_forced", argv=["report", "-p", p, "--runs", "runs", "--out", "reports_forced", "--force"]),
        # 2, 3: params
        dict(name="params_empty", argv=["check-params", "empty.yaml"]),
        dict(name="params_no_section", argv=["check-params", "no_sinusoid.yaml"]),
        dict(name="params_no_profile", argv=["check-params", "no_profile.yaml"]),
        dict(name="params_true_under_profile", argv=["check-params", "iterations_true.yaml"]),
        dict(name="params_negative_under_profile", argv=["check-params", "iterations_negative.yaml"]),
        dict(name="params_good", argv=["check-params", p]),
        # 4, 14: the model file is not the model asked for
        dict(name="eval_other_algorithm", argv=["evaluate", "omniglot", "-p", p, "-a", "anil", "--runs", run1,
                                                "--out", "e/anil", *DATA]),
        dict(name="eval_other_setting", argv=["evaluate", "omniglot", "-p", p, "-s", "5w1s", "--runs", run5,
                                              "--out", "e/5w1s_on_5w5s", *DATA]),
        dict(name="eval_other_way", argv=["evaluate", "omniglot", "-p", p, "-s", "10w1s", "--runs", run1,
                                          "--out", "e/10w", *DATA]),
        dict(name="eval_sinusoid_run", argv=["evaluate", "omniglot", "-p", p, "--runs", "runs/sinusoid/maml",
                                             "--out", "e/sin", *DATA]),
        dict(name="eval_other_seed", argv=["evaluate", "omniglot", "-p", p, "--seed", "1", "--runs", run1,
                                           "--out", "e/seed1", *DATA]),
        # 11: a cut model file
        dict(name="eval_truncated_model", argv=["evaluate", "omniglot", "-p", p, "--runs", "cut_run",
                                                "--out", "e/cut", *DATA]),
        # 5: a paired CI over different episodes
        dict(name="compare_other_episodes", argv=["compare", f"{run1}/eval", f"{run5}/eval"]),
        dict(name="compare_same_episodes", argv=["compare", f"{run1}/eval", f"{run1}/eval"]),
        # 6: data made with other seeds
        dict(name="train_other_split_seed", argv=["train", "omniglot", "-p", p, "--run-dir", "r/split",
                                                  "--prepared", "other_prepared", "--episodes", "glyphs/episodes",
                                                  "--no-progress"]),
        dict(name="eval_other_episode_seed", argv=["evaluate", "omniglot", "-p", "episode_seed.yaml", "--runs", run1,
                                                   "--out", "e/epseed", *DATA]),
        # 7: the random baseline at another width than the trained policy
        dict(name="rl_other_hidden", argv=["rl", "evaluate", "navigation", "--params", "rl.yaml", "--runs", "rl_runs",
                                           "--plots", "rl_plots"]),
        # 8, 16: divergence past a sane bound; the message when no checkpoint exists yet
        dict(name="diverge_inner_lr", argv=["train", "omniglot", "-p", "inner_lr_1e6.yaml", "--run-dir", "r/ilr",
                                            "--no-progress", *DATA]),
        dict(name="diverge_meta_lr", argv=["train", "omniglot", "-p", "meta_lr_1e6.yaml", "--run-dir", "r/mlr",
                                           "--no-progress", *DATA]),
        dict(name="diverge_no_checkpoint", argv=["train", "sinusoid", "-p", "sinusoid_diverges.yaml", "--run-dir",
                                                 "r/sdiv", "--no-progress"]),
        # 10, 12: tracking stores that do not answer or cannot be written
        dict(name="tracking_dead_server", argv=["train", "sinusoid", "-p", p, "--run-dir", "r/dead", "--no-progress"],
             env={"MLFLOW_TRACKING_URI": dead}),
        dict(name="tracking_sqlite_unwritable", argv=["train", "sinusoid", "-p", "sqlite_under_file.yaml",
                                                      "--run-dir", "r/sql", "--no-progress"]),
        # 13: outputs that cannot be written, found before training
        dict(name="run_dir_is_file", argv=["train", "sinusoid", "-p", p, "--run-dir", "a_file", "--no-progress"]),
        dict(name="run_dir_unwritable", argv=["train", "sinusoid", "-p", p, "--run-dir", "a_file/run",
                                              "--no-progress"]),
        # 14: the rest
        dict(name="tune_bogus_storage", argv=["tune", "omniglot", "-p", p, "--storage", "bogus://nowhere",
                                              "--n-trials", "1", "--iterations", "2", *DATA]),
        dict(name="report_truncated_metrics", argv=["report", "-p", p, "--runs", "cut_runs", "--out", "cut_report"]),
        dict(name="data_show_onto_folder", argv=["data", "show", "glyphs/prepared", "a_folder"]),
        dict(name="data_prepare_onto_file", argv=["data", "prepare", "omniglot", "raw_missing", "a_file",
                                                  "--params", p]),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    w = build_world(tmp_path_factory.mktemp("faults"))
    sums = {f: (w / "reports" / f).read_bytes() for f in ["README.md", *(f"figures/{x.name}"
                                                                         for x in (w / "reports/figures").iterdir())]}
    subprocess.run([sys.executable, str(ROOT / "tests" / "faults_cli.py"), "cases.json", "results.json"], cwd=w,
                   check=True, timeout=900, env={**_env(), "PYTHONPATH": str(ROOT)})
    return w, {"results": json.loads((w / "results.json").read_text()), "reports": sums}


def build_world(w: Path) -> Path:
    """The trained runs, copies and mangled files the cases need, and cases.json."""
    glyphs = make_glyphs(w / "glyphs")
    episodize(glyphs / "prepared", glyphs / "episodes", [EpisodeSetting(5, 5, 5), EpisodeSetting(10, 1, 5)],
              splits=["val", "test"], n_val=20, n_test=40, seed=EpisodesParams().seed)
    params = tiny(w)

    def cells(raw):
        raw["seeds"] = [0]
        raw["omniglot"]["settings"].update({"5w5s": {"n_way": 5, "k_shot": 5, "n_query": 5},
                                            "10w1s": {"n_way": 10, "k_shot": 1, "n_query": 5}})
        raw["omniglot"]["run"] = {"algorithms": ["maml"], "settings": ["5w1s"]}
        raw["sinusoid"]["train"].update(iterations=20, checkpoint_every=10, log_every=10, meta_batch_size=5)
    edited(params, params, cells)
    data = dict(prepared=glyphs / "prepared", episodes_dir=glyphs / "episodes", progress=False)
    for setting in ("5w1s", "5w5s"):
        run = w / "runs" / "omniglot" / f"maml-{setting}-seed0"
        runs.train_fewshot(params, "omniglot", "maml", setting, run, **data)
        runs.evaluate_fewshot(params, "omniglot", "maml", setting, run, run / "eval", prepared=data["prepared"],
                              episodes_dir=data["episodes_dir"])
    runs.train_sinusoid(params, "maml", w / "runs" / "sinusoid" / "maml", progress=False)

    shutil.copytree(ROOT / "reports", w / "reports")
    shutil.copytree(ROOT / "reports", w / "reports_forced")
    (w / "empty_runs").mkdir()
    (w / "empty.yaml").write_text("")
    edited(params, w / "no_sinusoid.yaml", lambda r: r.pop("sinusoid"))
    edited(params, w / "no_profile.yaml", lambda r: r.update(profile="quick", profiles={}))
    profiled = {"sinusoid.train.iterations": 5}
    edited(params, w / "iterations_true.yaml",
           lambda r: (r["profiles"]["t"].update(profiled), r["sinusoid"]["train"].update(iterations=True)))
    edited(params, w / "iterations_negative.yaml",
           lambda r: (r["profiles"]["t"].update(profiled), r["sinusoid"]["train"].update(iterations=-5)))
    shutil.copytree(w / "runs/omniglot/maml-5w1s-seed0", w / "cut_run")
    tested = w / "cut_run" / "model.pt"  # the final model: the one MAML's protocol tests
    tested.write_bytes(tested.read_bytes()[:3000])
    shutil.copytree(w / "runs/omniglot", w / "cut_runs/omniglot")
    metrics = w / "cut_runs/omniglot/maml-5w1s-seed0/eval/metrics.json"
    metrics.write_text(metrics.read_text()[:20])
    shutil.copytree(glyphs / "prepared", w / "other_prepared")
    meta = json.loads((w / "other_prepared/meta.json").read_text())
    write_json(w / "other_prepared/meta.json", {**meta, "split_seed": 2})  # params: data.omniglot.split_seed 1
    edited(params, w / "episode_seed.yaml", lambda r: r["data"]["episodes"].update(seed=5))
    edited(params, w / "inner_lr_1e6.yaml", lambda r: r["omniglot"]["train"].update(inner_lr=1e6))
    edited(params, w / "meta_lr_1e6.yaml", lambda r: r["omniglot"]["train"].update(meta_lr=1e6))
    edited(params, w / "sinusoid_diverges.yaml", lambda r: r["sinusoid"]["train"].update(
        inner_lr=3.0, meta_lr=3.0, iterations=2000, checkpoint_every=1000))
    (w / "a_file").write_text("not a folder\n")
    (w / "a_folder").mkdir()
    edited(params, w / "sqlite_under_file.yaml", lambda r: r["tracking"].update(uri=f"sqlite:///{w}/a_file/mlflow.db"))

    from mamlbench.rl.maml_trpo import make_policy
    for model in ("maml", "pretrained"):   # a navigation policy 2 -> [8] -> 2; params say hidden [16]
        save_torch(w / "rl_runs" / model / "policy.pt", {"policy": make_policy(2, 2, [8], 0).state_dict(),
                                                          "hidden": [8], "obs_dim": 2, "act_dim": 2})
        write_json(w / "rl_runs" / model / "history.json", [])
    edited(params, w / "rl.yaml", lambda r: r["rl"]["navigation"].update(
        hidden=[16], horizon=5, evaluate={"n_tasks": 2, "inner_lrs": [0.1], "n_episodes": 1, "trace_episodes": 1}))

    (w / "cases.json").write_text(json.dumps(cases(w)))
    return w


def _env() -> dict:
    import os
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def one_line(result: dict, rc: int, *fragments: str) -> str:
    """The case ended with exit `rc` and exactly one `error:` line holding every fragment, no traceback."""
    lines = [ln for ln in result["stderr"].splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert result["rc"] == rc and "Traceback" not in result["stderr"] and len(errors) == 1, result
    assert all(f in errors[0] for f in fragments), (fragments, errors[0])
    return errors[0]


def test_report_refuses_a_missing_empty_or_poorer_runs_folder_and_keeps_the_committed_report(world):
    w, out = world
    r = out["results"]
    one_line(r["report_typo"], 2, "--runs runz", "no such folder")
    one_line(r["report_empty"], 2, "empty_runs", "empty folder")
    one_line(r["report_poorer"], 2, "README.md", "--force")
    now = {f: (w / "reports" / f).read_bytes() for f in out["reports"]}
    assert now == out["reports"] and sorted(p.name for p in (w / "reports/figures").iterdir()) == sorted(
        f.split("/")[1] for f in out["reports"] if f.startswith("figures/"))
    assert r["report_forced"]["rc"] == 0, r["report_forced"]   # asked for: replaced, only this run's figures left
    assert "Not run with these params" in (w / "reports_forced/README.md").read_text()
    assert {p.name for p in (w / "reports_forced/figures").iterdir()} == {"omniglot_5w1s_curves.png",
                                                                          "omniglot_5w1s_steps.png"}


def test_params_empty_missing_a_section_or_naming_an_undefined_profile_are_refused(world):
    r = world[1]["results"]
    one_line(r["params_empty"], 2, "empty.yaml", "missing sections", "sinusoid")
    one_line(r["params_no_section"], 2, "no_sinusoid.yaml", "missing section sinusoid")
    one_line(r["params_no_profile"], 2, "profile = 'quick'", "no such entry")
    assert r["params_good"]["rc"] == 0 and "ok (profile t)" in r["params_good"]["stdout"]


def test_a_value_the_profile_overrides_is_still_validated_as_written(world):
    r = world[1]["results"]
    one_line(r["params_true_under_profile"], 2, "sinusoid.train.iterations = True", "as written")
    one_line(r["params_negative_under_profile"], 2, "sinusoid.train.iterations = -5", "as written")


def test_evaluate_refuses_a_model_of_another_algorithm_setting_seed_or_benchmark(world):
    w, out = world
    r = out["results"]
    one_line(r["eval_other_algorithm"], 2, "model.pt", "algorithm 'maml', not 'anil'")
    one_line(r["eval_other_setting"], 2, "setting '5w5s', not '5w1s'")
    one_line(r["eval_other_way"], 2, "setting '5w1s', not '10w1s'")      # was: a size-mismatch traceback
    one_line(r["eval_other_seed"], 2, "seed 0, not 1")
    one_line(r["eval_sinusoid_run"], 2, "runs/sinusoid/maml/model.pt", "not a few-shot model")  # was: KeyError
    assert not any((w / "e" / name).exists() for name in ("anil", "5w1s_on_5w5s", "10w", "sin", "seed1"))


def test_a_cut_model_file_is_one_line_naming_it(world):
    one_line(world[1]["results"]["eval_truncated_model"], 2, "cut_run/model.pt", "unreadable model file")


def test_compare_refuses_to_pair_evaluations_of_different_episodes(world):
    r = world[1]["results"]
    one_line(r["compare_other_episodes"], 2, "different episode sets")
    assert r["compare_same_episodes"]["rc"] == 0 and "paired 95% CI" in r["compare_same_episodes"]["stdout"]


def test_data_made_with_another_split_seed_or_episode_seed_is_refused(world):
    w, out = world
    r = out["results"]
    one_line(r["train_other_split_seed"], 2, "other_prepared", "split_seed = 2, params say 1")
    one_line(r["eval_other_episode_seed"], 2, "data.episodes.seed = 20170309, params say 5")
    assert not (w / "r/split").exists() and not (w / "e/epseed").exists()


def test_rl_evaluate_refuses_a_random_baseline_of_another_width(world):
    w, out = world
    one_line(out["results"]["rl_other_hidden"], 2, "policy.pt", "hidden [8], params say [16]")
    assert not (w / "rl_runs/metrics.json").exists()


def test_a_loss_past_any_sane_bound_stops_the_run_as_diverged(world):
    r = world[1]["results"]
    for name, knob in (("diverge_inner_lr", "inner_lr=1000000.0"), ("diverge_meta_lr", "meta_lr=1000000.0")):
        one_line(r[name], 3, "training diverged", knob, "past the sane bound")


def test_divergence_before_any_checkpoint_says_there_is_none(world):
    w, out = world
    line = one_line(out["results"]["diverge_no_checkpoint"], 3, "no checkpoint was written yet")
    assert "checkpoint is kept" not in line and not list((w / "r/sdiv").glob("checkpoints/ckpt-*.pt"))


def test_a_tracking_store_that_cannot_answer_is_one_line_within_seconds(world):
    w, out = world
    r = out["results"]
    line = one_line(r["tracking_dead_server"], 2, "tracking store http://127.0.0.1:", "not reachable")
    assert r["tracking_dead_server"]["seconds"] < 15, line   # was: 249 s of retries, then 149 lines
    one_line(r["tracking_sqlite_unwritable"], 2, "tracking store sqlite:///", "a_file")
    assert r["tracking_sqlite_unwritable"]["seconds"] < 15
    assert not (w / "r/dead/checkpoints").exists() and not (w / "r/sql/checkpoints").exists()


def test_an_output_folder_that_cannot_be_written_is_found_before_training(world):
    w, out = world
    r = out["results"]
    one_line(r["run_dir_is_file"], 2, "--run-dir a_file", "is a file")
    one_line(r["run_dir_unwritable"], 2, "--run-dir a_file/run", "not writable")
    assert r["run_dir_is_file"]["seconds"] < 15 and (w / "a_file").read_text() == "not a folder\n"


def test_the_rest_of_the_unclear_errors_are_one_line(world):
    w, out = world
    r = out["results"]
    one_line(r["tune_bogus_storage"], 2, "--storage bogus://nowhere")
    one_line(r["report_truncated_metrics"], 2, "maml-5w1s-seed0/eval/metrics.json", "not valid JSON")
    one_line(r["data_show_onto_folder"], 2, "a_folder", "is a folder")
    one_line(r["data_prepare_onto_file"], 2, "a_file", "is a file")
    assert (w / "a_folder").is_dir() and not any((w / "a_folder").iterdir())


def test_no_case_left_a_traceback_or_an_mlflow_run_running(world):
    w, out = world
    import mlflow
    assert not [n for n, x in out["results"].items() if "Traceback" in x["stderr"]]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{w / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found and not [x.info.run_name for x in found if x.info.status == "RUNNING"]
