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

import dataclasses

from mamlbench.algorithms.anil import ANILParams
from mamlbench.algorithms.mamlpp import MAMLPPParams
from mamlbench.algorithms.metasgd import MetaSGDParams
from mamlbench.algorithms.reptile import ReptileParams
from mamlbench.data.params import DataParams
from mamlbench.rl.params import RLParams
from mamlbench.schema import ConfigError, build, knob, section, to_dict

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
class FewShotTrainParams:
    """Meta-training on few-shot classification episodes (Omniglot, mini-ImageNet)."""
    inner_lr: float = knob(0.4, "Inner SGD step size alpha during meta-training.", gt=0)
    inner_steps: int = knob(1, "Inner steps during meta-training.", ge=1)
    meta_batch_size: int = knob(32, "Tasks per meta-update.", ge=1)
    meta_lr: float = knob(1e-3, "Adam step size of the meta-update (Reptile with sgd: epsilon).", gt=0)
    iterations: int = knob(60000, "Meta-updates.", ge=1)
    n_query: int = knob(15, "Query images per class in training episodes.", ge=1)
    grad_clip: float | None = knob(None, "Clip the meta-gradient's global norm; null: no clipping.", gt=0)
    strategy: Strategy = knob("auto", "vmap, loop, or auto (per device and model).")
    checkpointing: bool = knob(False, "Recompute each inner step in the backward: memory flat in inner_steps.")
    validate_every: int = knob(500, "Validate on the fixed validation episodes every this many meta-updates.", ge=1)
    n_val_episodes: int = knob(100, "How many of the fixed validation episodes to use.", ge=1)
    checkpoint_every: int = knob(100, "Resumable checkpoint period.", ge=1)
    log_every: int = knob(20, "Logging period.", ge=1)
    device: str = knob("auto", "auto (cuda when present), cpu, cuda or cuda:N.")


@dataclass(frozen=True)
class FewShotEvalParams:
    inner_steps: int = knob(10, "Report accuracy after 0..inner_steps inner steps on each test episode.", ge=0)
    inner_lr: float | None = knob(None, "Inner step size at test time; null: the training inner_lr "
                                        "(Meta-SGD and MAML++ use their learned rates).", gt=0)
    split: Literal["val", "test"] = knob("test", "Which fixed episodes to report.")
    n_episodes: int = knob(600, "Fixed episodes evaluated (at most as many as were episodized).", ge=1)
    chunk: int = knob(100, "Episodes per batch in evaluation.", ge=1)


@dataclass(frozen=True)
class SettingParams:
    """One N-way K-shot cell; `n_query` must match an episodized setting of the dataset."""
    n_way: int = knob(5, "Classes per task (N).", ge=2)
    k_shot: int = knob(1, "Support images per class (K).", ge=1)
    n_query: int = knob(15, "Query images per class in the fixed evaluation episodes.", ge=1)
    train: dict[str, Any] = knob({}, "Overrides of the benchmark's train section for this cell.")


@dataclass(frozen=True)
class RunParams:
    algorithms: list[str] = knob(["maml"], "Variants the pipeline trains.",
                                 choices=["maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp"])
    settings: list[str] = knob(["5w1s"], "Settings (keys of `settings`) the pipeline trains.")


@dataclass(frozen=True)
class FewShotParams:
    model: str = knob("conv4_omniglot", "Network: conv4_omniglot, conv4_miniimagenet or mlp_omniglot.",
                      choices=["conv4_omniglot", "conv4_miniimagenet", "mlp_omniglot"])
    hidden: int | None = knob(None, "Conv filters (conv4) of the network; null: the paper's (64 Omniglot, 32 "
                                    "mini-ImageNet). Smaller is faster and weaker.", ge=1)
    run: RunParams = section(RunParams)
    settings: dict[str, SettingParams] = knob({}, "Named N-way K-shot cells.")
    train: FewShotTrainParams = section(FewShotTrainParams)
    evaluate: FewShotEvalParams = section(FewShotEvalParams)

    def validate(self, where: str) -> None:
        for name in self.run.settings:
            if name not in self.settings:
                raise ConfigError(f"{where}.run.settings: {name!r} is not a key of {where}.settings "
                                  f"(have: {', '.join(self.settings) or 'none'})")
        for name, cell in self.settings.items():
            build(FewShotTrainParams, {**to_dict(self.train), **cell.train}, f"{where}.settings.{name}.train")


def _variant(name: str, options: type) -> type:
    """A variant's params: its own options plus overrides of the benchmark's train section."""
    return dataclasses.make_dataclass(f"{name}Variant", [
        ("train", dict[str, Any], knob({}, "Overrides of the benchmark's train section for this variant.")),
        ("options", options, section(options)),
    ], frozen=True)


@dataclass(frozen=True)
class NoOptions:
    """This variant has no options of its own."""


MAMLVariant = _variant("MAML", NoOptions)
FOMAMLVariant = _variant("FOMAML", NoOptions)
ReptileVariant = _variant("Reptile", ReptileParams)
ANILVariant = _variant("ANIL", ANILParams)
MetaSGDVariant = _variant("MetaSGD", MetaSGDParams)
MAMLPPVariant = _variant("MAMLPP", MAMLPPParams)


@dataclass(frozen=True)
class VariantsParams:
    """Per-variant options and train overrides, shared by every few-shot benchmark."""
    maml: MAMLVariant = section(MAMLVariant)
    fomaml: FOMAMLVariant = section(FOMAMLVariant)
    reptile: ReptileVariant = section(ReptileVariant)
    anil: ANILVariant = section(ANILVariant)
    metasgd: MetaSGDVariant = section(MetaSGDVariant)
    mamlpp: MAMLPPVariant = section(MAMLPPVariant)


@dataclass(frozen=True)
class Params:
    seed: int = knob(0, "Fixes tasks, episodes and initial weights.", ge=0)
    profile: str = knob("quick", "Which entry of `profiles` to apply.")
    profiles: dict[str, Any] = knob({}, "Named budget overrides, as dotted keys.")
    tracking: TrackingParams = section(TrackingParams)
    sinusoid: SinusoidParams = section(SinusoidParams)
    omniglot: FewShotParams = section(FewShotParams)
    mini_imagenet: FewShotParams = section(FewShotParams)
    variants: VariantsParams = section(VariantsParams)
    data: DataParams = section(DataParams)
    rl: RLParams = section(RLParams)

    def validate(self, where: str = "") -> None:
        defaults = to_dict(FewShotTrainParams())
        for name in ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp"):
            build(FewShotTrainParams, {**defaults, **getattr(self.variants, name).train}, f"variants.{name}.train")


FEWSHOT = ("omniglot", "mini_imagenet")


def fewshot_train(params: Params, benchmark: str, algorithm: str, setting: str) -> FewShotTrainParams:
    """A cell's effective train section: benchmark defaults < setting overrides < variant overrides."""
    bench: FewShotParams = getattr(params, benchmark)
    merged = {**to_dict(bench.train), **bench.settings[setting].train, **getattr(params.variants, algorithm).train}
    return build(FewShotTrainParams, merged, f"{benchmark}.{setting}+variants.{algorithm}.train")


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
    chain, current = [], name
    while current is not None:  # `extends: other` applies the other profile first
        if current not in profiles or current in chain:
            raise ConfigError(f"profiles.{chain[-1]}.extends = {current!r}: no such profile, or a cycle")
        overrides = profiles[current] or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"profiles.{current} = {overrides!r}: expected a mapping of dotted keys")
        chain.append(current)
        current = overrides.get("extends")
    merged: dict = {}
    for profile in reversed(chain):
        merged.update({k: v for k, v in (profiles[profile] or {}).items() if k != "extends"})
    for dotted, value in merged.items():
        node = raw
        parts = str(dotted).split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"profiles.{name}.{dotted}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read, apply the profile (`profile` overrides the file's), validate; `ConfigError` on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if profile is not None:
        raw["profile"] = profile
    return build(Params, apply_profile(raw))
