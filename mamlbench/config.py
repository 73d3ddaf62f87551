"""`params.yaml`, typed: one frozen dataclass per section, validated before any work starts.

A profile (`profile: quick` or `paper`) names a set of budget overrides under `profiles:`, given as
dotted keys, applied on top of the sections before validation. Switch with
`dvc exp run -S profile=paper`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mamlbench.data.params import DataParams
from mamlbench.rl.params import RLParams
from mamlbench.schema import ConfigError, build, knob, section

Strategy = Literal["auto", "vmap", "loop"]


@dataclass(frozen=True)
class TrackingParams:
    uri: str | None = knob(None, "MLflow tracking URI; null means sqlite:///mlflow.db in the project root. "
                                 "The MLFLOW_TRACKING_URI environment variable wins over both.")
    experiment_prefix: str = knob("mamlbench", "MLflow experiments are named <prefix>-<benchmark>.")
    enabled: bool = knob(True, "Log runs to MLflow at all.")


@dataclass(frozen=True)
class MetaTrainParams:
    """Meta-training of a MAML-family learner."""
    algorithm: Literal["maml", "fomaml"] = knob("maml", "maml: second order; fomaml: first-order approximation.")
    strategy: Strategy = knob("auto", "How tasks are batched: vmap, a per-task loop, or auto (per device and model).")
    inner_lr: float = knob(0.01, "Step size alpha of the inner SGD steps.", gt=0)
    inner_steps: int = knob(1, "Inner SGD steps on each task's support set during meta-training.", ge=1)
    meta_batch_size: int = knob(25, "Tasks per meta-update.", ge=1)
    meta_lr: float = knob(1e-3, "Adam step size beta of the meta-update.", gt=0)
    iterations: int = knob(70000, "Meta-updates.", ge=1)
    k_shot: int = knob(10, "Support examples per task (K).", ge=1)
    k_query: int = knob(10, "Query examples per task.", ge=1)
    grad_clip: float | None = knob(None, "Clip the meta-gradient's global norm to this; null: no clipping.", gt=0)
    checkpoint_every: int = knob(500, "Write a resumable checkpoint every this many meta-updates.", ge=1)
    log_every: int = knob(50, "Log training metrics every this many meta-updates.", ge=1)
    device: str = knob("auto", "auto (cuda when present), cpu, cuda or cuda:N.")


@dataclass(frozen=True)
class PretrainParams:
    """The paper's baseline: one regressor trained on the mixture of all tasks, no inner loop."""
    lr: float = knob(1e-3, "Adam step size.", gt=0)
    iterations: int = knob(70000, "Adam steps.", ge=1)
    batch_tasks: int = knob(25, "Tasks per batch.", ge=1)
    k: int = knob(20, "Points per task in a batch.", ge=1)
    checkpoint_every: int = knob(500, "Checkpoint period.", ge=1)
    log_every: int = knob(50, "Logging period.", ge=1)
    device: str = knob("auto", "auto, cpu, cuda or cuda:N.")


@dataclass(frozen=True)
class SinusoidEvalParams:
    n_tasks: int = knob(600, "Fixed test tasks, identical for every model (seeded by `seed`).", ge=1)
    seed: int = knob(20170301, "Seed of the test tasks: never the training seed.", ge=0)
    k_shots: list[int] = knob([5, 10, 20], "Support sizes K evaluated.", ge=1)
    inner_steps: list[int] = knob([0, 1, 5, 10], "Report the query MSE after these many inner steps.", ge=0)
    inner_lr: float = knob(0.01, "Inner step size at test time, for MAML and the baseline alike.", gt=0)
    n_query: int = knob(100, "Query points per test task, x ~ U[-5, 5].", ge=1)


@dataclass(frozen=True)
class SinusoidParams:
    hidden: list[int] = knob([40, 40], "Hidden layer widths of the ReLU MLP (the paper: 40, 40).", ge=1)
    train: MetaTrainParams = section(MetaTrainParams)
    pretrain: PretrainParams = section(PretrainParams)
    evaluate: SinusoidEvalParams = section(SinusoidEvalParams)


@dataclass(frozen=True)
class Params:
    seed: int = knob(0, "Fixes tasks, episodes and initial weights.", ge=0)
    profile: str = knob("quick", "Which entry of `profiles` to apply.")
    profiles: dict[str, Any] = knob({}, "Named budget overrides, as dotted keys.")
    tracking: TrackingParams = section(TrackingParams)
    sinusoid: SinusoidParams = section(SinusoidParams)
    data: DataParams = section(DataParams)
    rl: RLParams = section(RLParams)


def apply_profile(raw: dict) -> dict:
    """Return a copy of `raw` with `profiles[profile]` dotted overrides applied."""
    raw = copy.deepcopy(raw)
    name = raw.get("profile", "quick")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"profiles = {profiles!r}: expected a mapping of profile names")
    if name not in profiles:
        if profiles or name != "quick":
            raise ConfigError(f"profile = {name!r}: no such entry under 'profiles' (have: {', '.join(profiles) or 'none'})")
        return raw
    overrides = profiles[name] or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"profiles.{name} = {overrides!r}: expected a mapping of dotted keys")
    for dotted, value in overrides.items():
        node = raw
        parts = str(dotted).split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"profiles.{name}.{dotted}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, apply the profile, validate. Raises `ConfigError` with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return build(Params, apply_profile(raw))
