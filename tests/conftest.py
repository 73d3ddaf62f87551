from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data"


def write_params(path: Path, overrides: dict | None = None, base: Path = ROOT / "params.yaml") -> Path:
    """The repo's params.yaml with nested `overrides` merged in, written to `path`."""
    raw = yaml.safe_load(base.read_text())

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "profiles":
                merge(into[key], value)
            else:
                into[key] = value

    merge(raw, overrides or {})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def one_thread():
    """Small policies: one torch thread is fastest, and several fight over the shared cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_sinusoid(tmp_path: Path) -> Path:
    """Params for a seconds-long sinusoid run, tracked in a fresh SQLite store under tmp_path."""
    return write_params(tmp_path / "params.yaml", {
        "profile": "tiny",
        "profiles": {"tiny": {}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "sinusoid": {
            "train": {"iterations": 120, "checkpoint_every": 20, "log_every": 10, "meta_batch_size": 10},
            "pretrain": {"iterations": 120, "checkpoint_every": 40, "log_every": 10},
            "evaluate": {"n_tasks": 50, "k_shots": [5, 10], "inner_steps": [0, 1, 2]},
        },
    })


def cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None):
    import subprocess
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    out = subprocess.run([sys.executable, "-m", "mamlbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env=full_env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"mamlbench {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out
