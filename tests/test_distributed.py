"""Several processes meta-training one model (`mamlbench.distributed`, torchrun, gloo on the CPU).

Two processes, each on half of every meta-batch with the gradients averaged, must end where one
process with the whole meta-batch ends (up to float32 summation order), with one MLflow run and
every file written by rank 0 alone; a killed two-process run resumes to the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.multiprocessing as mp

from conftest import cli, write_params
from mamlbench import distributed
from mamlbench.io import load_torch
from test_fewshot import make_glyphs

ITERATIONS = 6
# Largest |parameter difference| between 1 and 2 processes after 6 meta-updates of 4 tasks (Adam,
# lr 1e-3, float32; only the gradient summation order differs): measured 2.2e-8 on a 2-core x86 CPU.
# The tolerance leaves room for other CPUs' kernels and stays far below what 3 updates move (3e-3).
ATOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the helpers, in two real gloo processes ------------------------------------------------------

class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def _helpers_worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.session("cpu"):
        assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (2, rank, rank == 0)
        g = torch.Generator().manual_seed(0)
        full = Batch(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g))  # every rank: the same batch
        part = distributed.shard(full, 4)
        assert isinstance(part, Batch) and torch.equal(part.x, full.x[2 * rank:2 * rank + 2])
        with pytest.raises(ValueError, match=r"omniglot.train.meta_batch_size = 3: not divisible by the 2 processes"):
            distributed.shard(full, 3, "omniglot.train.meta_batch_size")

        torch.manual_seed(rank)  # different weights per rank: broadcast_state makes them rank 0's
        net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        learner = torch.nn.ModuleDict({"net": net, "unused": torch.nn.Linear(2, 2)})
        distributed.broadcast_state(learner)
        torch.manual_seed(0)
        reference = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        for a, b in zip(net.parameters(), reference.parameters()):
            assert torch.equal(a, b)

        loss = torch.nn.functional.mse_loss(net(part.x), part.y)  # the mean over this rank's slice
        loss.backward()
        distributed.all_reduce_grads(learner)
        torch.nn.functional.mse_loss(reference(full.x), full.y).backward()  # the whole batch in one process
        for a, b in zip(net.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
        assert learner["unused"].weight.grad is None, "no gradient stays none, so Adam skips it as in one process"
        mean = distributed.mean_metrics({"loss": loss.item(), "rank": float(rank)})
        assert mean["rank"] == 0.5
        assert mean["loss"] == pytest.approx(torch.nn.functional.mse_loss(reference(full.x), full.y).item(), rel=1e-6)
    assert not distributed.active(), "the session destroys the group it created"


def test_helpers_in_two_gloo_processes():
    mp.spawn(_helpers_worker, args=(free_port(),), nprocs=2, join=True)


def test_one_process_is_a_no_op():
    batch = (torch.arange(4), torch.arange(4))
    assert distributed.shard(batch, 4) is batch and distributed.world_size() == 1 and distributed.is_main()
    distributed.check_divisible(3)  # any size splits over one process
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad.clone()
    distributed.all_reduce_grads(model)
    assert torch.equal(model.weight.grad, grad)


# ---- `mamlbench train` under torchrun ---------------------------------------------------------------

# Runs `mamlbench` and records every file this process creates, writes, renames or removes, and
# every SQLite store it opens, under $WATCH (Python audit events), in $AUDIT_OUT/writes-rank<RANK>.json.
AUDITED_CLI = '''
import atexit, json, os, sys
watch, out = os.environ["WATCH"], os.environ["AUDIT_OUT"]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
seen = []

def inside(path):
    return (isinstance(path, (str, bytes, os.PathLike))
            and os.path.abspath(os.fsdecode(path)).startswith(os.path.join(watch, "")))

def hook(event, args):
    if (event == "open" and args[2] & WRITE and inside(args[0])
            or event in ("os.rename", "os.remove", "os.mkdir", "sqlite3.connect") and inside(args[0])):
        seen.append(event + " " + os.fsdecode(args[1] if event == "os.rename" else args[0]))  # a rename: its target

def report():
    with open(os.path.join(out, "writes-rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(seen, f)

sys.addaudithook(hook)
atexit.register(report)
from mamlbench.cli import main
main()
'''


def torchrun(*args: str, cwd: Path, nproc: int = 2, check: bool = True, env: dict | None = None):
    """`torchrun --nproc-per-node <nproc> <args>` on the CPU (gloo), one thread per process."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    out = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def params_file(path: Path, store: Path, **train) -> Path:
    return write_params(path, {
        "profile": "t", "profiles": {"t": {}}, "tracking": {"uri": f"sqlite:///{store}"},
        "omniglot": {"hidden": 16, "settings": {"5w1s": {"n_way": 5, "k_shot": 1, "n_query": 5}},
                     "train": {"iterations": ITERATIONS, "meta_batch_size": 4, "n_query": 5, "validate_every": 3,
                               "n_val_episodes": 20, "checkpoint_every": 3, "log_every": 1, "device": "cpu", **train},
                     "evaluate": {"inner_steps": 2, "n_episodes": 40, "chunk": 16}},
    })


def mlflow_runs(store: Path):
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    return client, client.search_runs([client.get_experiment_by_name("mamlbench-omniglot").experiment_id])


@pytest.mark.slow
def test_two_processes_match_one_write_once_and_resume(tmp_path):
    glyphs = make_glyphs(tmp_path / "glyphs")
    data = ["--prepared", str(glyphs / "prepared"), "--episodes", str(glyphs / "episodes")]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    train = ["train", "omniglot", "--run-dir", "run", "--no-progress", *data]

    cli(*train, "--params", str(params_file(tmp_path / "one.yaml", one / "mlflow.db")), cwd=one,
        env={"OMP_NUM_THREADS": "1"})
    params_two = params_file(tmp_path / "two.yaml", two / "mlflow.db")
    (tmp_path / "audit").mkdir()
    (tmp_path / "audited_cli.py").write_text(AUDITED_CLI)
    out = torchrun(str(tmp_path / "audited_cli.py"), *train, "--params", str(params_two), cwd=two,
                   env={"WATCH": str(two), "AUDIT_OUT": str(tmp_path / "audit")})
    assert out.stdout.count("trained omniglot maml 5w1s: 6 iterations") == 1, "one report line, from rank 0"

    # the same tasks, the same full-batch gradient: the same parameters up to summation order
    a, b = load_torch(one / "run" / "model.pt")["learner"], load_torch(two / "run" / "model.pt")["learner"]
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < ATOL, f"1 vs 2 processes: max |difference| {diff:.3g}"
    moved = max((a[k] - load_torch(one / "run" / "checkpoints" / "ckpt-00000003.pt")["learner"][k]).abs().max().item()
                for k in a)
    assert moved > 100 * ATOL, "the tolerance is far below what 3 meta-updates change"

    # rank 0 logged the full meta-batch's numbers (what one process logs), to one MLflow run
    client_one, (run_one,) = mlflow_runs(one / "mlflow.db")
    client_two, runs_two = mlflow_runs(two / "mlflow.db")
    assert len(runs_two) == 1 and runs_two[0].info.status == "FINISHED"
    assert runs_two[0].data.tags["world_size"] == "2"
    for name in ("meta_train/query_loss", "meta_train/query_acc"):
        history_one = [m.value for m in sorted(client_one.get_metric_history(run_one.info.run_id, name),
                                               key=lambda m: m.step)]
        history_two = [m.value for m in sorted(client_two.get_metric_history(runs_two[0].info.run_id, name),
                                               key=lambda m: m.step)]
        assert len(history_two) == ITERATIONS
        assert history_two == pytest.approx(history_one, rel=1e-5, abs=1e-6), name

    # every file and the MLflow store were written by rank 0 alone
    writes = {rank: json.loads((tmp_path / "audit" / f"writes-rank{rank}.json").read_text()) for rank in (0, 1)}
    assert writes[1] == [], writes[1][:5]
    assert any("sqlite3.connect" in w and w.endswith("mlflow.db") for w in writes[0])
    for name in ("ckpt-00000003.pt", "ckpt-00000006.pt", "model.pt", "best.pt", "curve.csv", "train.json"):
        assert any(w.startswith("os.rename") and w.endswith(name) for w in writes[0]), name

    # killed after the checkpoint at 3: the real command line resumes it to the uninterrupted result
    for name in ("checkpoints/ckpt-00000006.pt", "model.pt", "train.json", "curve.csv"):
        (two / "run" / name).rename(tmp_path / name.replace("/", "-"))
    out = torchrun("-m", "mamlbench.cli", *train, "--params", str(params_two), cwd=two)
    assert "(resumed at 3)" in out.stdout
    resumed = load_torch(two / "run" / "model.pt")["learner"]
    for key in b:
        assert torch.equal(resumed[key], b[key]), key
    assert (two / "run" / "curve.csv").read_text() == (tmp_path / "curve.csv").read_text()
    _, runs_two = mlflow_runs(two / "mlflow.db")
    assert len(runs_two) == 1 and runs_two[0].info.status == "FINISHED", "the resumed run reopens its MLflow run"


@pytest.mark.slow
def test_meta_batch_must_split_evenly(tmp_path):
    glyphs = make_glyphs(tmp_path / "glyphs")
    params = params_file(tmp_path / "p.yaml", tmp_path / "mlflow.db", meta_batch_size=3)
    out = torchrun("-m", "mamlbench.cli", "train", "omniglot", "--params", str(params), "--run-dir", "run",
                   "--no-progress", "--prepared", str(glyphs / "prepared"), "--episodes", str(glyphs / "episodes"),
                   cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "error: omniglot.train.meta_batch_size = 3: not divisible by the 2 processes" in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists(), "refused before any work"
