"""`params.yaml`, typed: one frozen dataclass per section, validated before any work starts.

A profile (`profile: quick` or `paper`) names a set of budget overrides under `profiles:`, given as
dotted keys, applied on top of the sections before validation. Switch with
`dvc exp run -S profile=paper`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

import dataclasses

from mamlbench.algorithms.anil import ANILParams
from mamlbench.algorithms.baseline import BaselineParams
from mamlbench.algorithms.boil import BOILParams
from mamlbench.algorithms.cavia import CAVIAParams
from mamlbench.algorithms.imaml import IMAMLParams
from mamlbench.algorithms.mamlpp import MAMLPPParams
from mamlbench.algorithms.metasgd import MetaSGDParams
from mamlbench.algorithms.protomaml import ProtoMAMLParams
from mamlbench.algorithms.protonet import ProtoNetParams
from mamlbench.algorithms.reptile import ReptileParams
from mamlbench.data.params import DataParams
from mamlbench.models.conv import MODELS
from mamlbench.rl.params import RLParams

# The few-shot benchmarks: each is a `Params` field (FewShotParams), a `data.<name>` section of its dataset
# (`mamlbench.data.pipeline.DATASETS`, whose folders spell it with a dash: data/prepared/mini-imagenet) and
# a `variants.<variant>.<name>` override section; everything else loops over this tuple.
FEWSHOT = ("omniglot", "mini_imagenet", "imagefolder")


def dataset_name(benchmark: str) -> str:
    return benchmark.replace("_", "-")
from mamlbench.schema import ConfigError, build, knob, section, to_dict

Strategy = Literal["auto", "vmap", "loop", "compiled"]
Precision = Literal["fp32", "bf16"]
PRECISION_HELP = ("fp32, or bf16: autocast of the inner loop and query pass. Off by default: the conv net's bf16 "
                  "meta-gradient is 25-60% off fp32 (under the meta-batch's sampling noise; tests/test_precision.py).")


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str, where: str) -> None:
    """Reject a device name torch would only refuse once training has started."""
    if not DEVICE.match(device):
        raise ConfigError(f"{where}.device = {device!r}: must be auto, cpu, cuda or cuda:N")


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
    strategy: Strategy = knob("auto", "How tasks are batched: vmap, a per-task loop, compiled (vmap under "
                                      "torch.compile), or auto (per device and model: compiled on CUDA).")
    inner_lr: float = knob(0.01, "Step size alpha of the inner SGD steps.", gt=0)
    inner_steps: int = knob(1, "Inner SGD steps on each task's support set during meta-training.", ge=1)
    meta_batch_size: int = knob(25, "Tasks per meta-update.", ge=1)
    meta_lr: float = knob(1e-3, "Adam step size beta of the meta-update.", gt=0)
    iterations: int = knob(70000, "Meta-updates.", ge=1)
    time_budget_minutes: float | None = knob(None, "Stop after the meta-update that passes this much wall time "
                                                   "(summed over resumes; a rerun trains no further); null: run "
                                                   "`iterations`. train.json records the iterations reached.", gt=0)
    k_shot: int = knob(10, "Support examples per task (K).", ge=1)
    k_query: int = knob(10, "Query examples per task.", ge=1)
    grad_clip: float | None = knob(None, "Clip the meta-gradient's global norm to this; null: no clipping.", gt=0)
    precision: Precision = knob("fp32", PRECISION_HELP)
    checkpoint_every: int = knob(500, "Write a resumable checkpoint every this many meta-updates.", ge=1)
    log_every: int = knob(50, "Log training metrics every this many meta-updates.", ge=1)
    device: str = knob("auto", "auto (cuda when present), cpu, cuda or cuda:N.")

    def validate(self, where: str) -> None:
        check_device(self.device, where)


@dataclass(frozen=True)
class PretrainParams:
    """The paper's baseline: one regressor trained on the mixture of all tasks, no inner loop."""
    lr: float = knob(1e-3, "Adam step size.", gt=0)
    iterations: int = knob(70000, "Adam steps.", ge=1)
    batch_tasks: int = knob(25, "Tasks per batch.", ge=1)
    k: int = knob(10, "Points per task in a batch (the original pretrains on each task's K support points).", ge=1)
    checkpoint_every: int = knob(500, "Checkpoint period.", ge=1)
    log_every: int = knob(50, "Logging period.", ge=1)
    device: str = knob("auto", "auto, cpu, cuda or cuda:N.")

    def validate(self, where: str) -> None:
        check_device(self.device, where)


@dataclass(frozen=True)
class SinusoidEvalParams:
    n_tasks: int = knob(600, "Fixed test tasks, identical for every model (seeded by `seed`).", ge=1)
    seed: int = knob(20170301, "Seed of the test tasks: never the training seed.", ge=0)
    k_shots: list[int] = knob([5, 10, 20], "Support sizes K evaluated.", ge=1)
    inner_steps: list[int] = knob([0, 1, 5, 10], "Report the query MSE after these many inner steps.", ge=0)
    inner_lr: float = knob(0.01, "Inner step size at test time, for MAML and the baseline alike.", gt=0)
    n_query: int | None = knob(None, "Query points per test task, x ~ U[-5, 5]; null: K for a K-shot evaluation "
                                     "(the original tests tasks of 2K points, K support and K query).", ge=1)


@dataclass(frozen=True)
class SinusoidParams:
    hidden: list[int] = knob([40, 40], "Hidden layer widths of the ReLU MLP (the paper: 40, 40).", ge=1)
    init: Literal["reference", "torch"] = knob("reference", "Initial weights: reference (the original code's "
                                                            "construct_fc_weights: N(0, 0.01) truncated at 2 std, "
                                                            "zero biases) or torch (PyTorch's defaults).")
    train: MetaTrainParams = section(MetaTrainParams)
    pretrain: PretrainParams = section(PretrainParams)
    evaluate: SinusoidEvalParams = section(SinusoidEvalParams)


@dataclass(frozen=True)
class FewShotTrainParams:
    """Meta-training on few-shot classification episodes (Omniglot, mini-ImageNet)."""
    inner_lr: float = knob(0.4, "Inner SGD step size alpha during meta-training.", gt=0)
    inner_steps: int = knob(1, "Inner steps during meta-training.", ge=1)
    loss_reduction: Literal["mean", "shot_sum"] = knob(
        "shot_sum", "Cross-entropy of the support and query sets: shot_sum sums it over the examples and divides "
                    "by K, as the original MAML code's xent (so the inner objective is N x the mean and the paper's "
                    "alpha means what it meant there); mean averages it (PyTorch's default; alpha then needs N x "
                    "the paper's value for the same step).")
    adapt_norm: bool = knob(False, "Adapt the normalisation layers' parameters in the inner loop; the original "
                                   "code meta-learns them in the outer loop only (false).")
    meta_batch_size: int = knob(32, "Tasks per meta-update.", ge=1)
    meta_lr: float = knob(1e-3, "Adam step size of the meta-update (Reptile with sgd: epsilon).", gt=0)
    iterations: int = knob(60000, "Meta-updates.", ge=1)
    time_budget_minutes: float | None = knob(None, "Stop after the meta-update that passes this much wall time "
                                                   "(summed over resumes; a rerun trains no further); null: run "
                                                   "`iterations`. train.json records the iterations reached.", gt=0)
    n_query: int = knob(15, "Query images per class in training episodes.", ge=1)
    k_shot: int | None = knob(None, "Support images per class in training episodes; null: the setting's K "
                                    "(Reptile's reference trains on more: --train-shots).", ge=1)
    grad_clip: float | None = knob(None, "Clip the meta-gradient's global norm; null: no clipping.", gt=0)
    grad_clip_value: float | None = knob(None, "Clip every meta-gradient entry to [-value, value] (the original "
                                               "code on mini-ImageNet: 10, in the loss_reduction convention); "
                                               "null: no clipping.", gt=0)
    strategy: Strategy = knob("auto", "vmap, loop, compiled (vmap under torch.compile; maml, fomaml, anil, metasgd), "
                                          "or auto: a run of probe_min_iterations or more times loop and vmap (and "
                                          "compiled from compile_min_iterations) on its own batch and keeps the "
                                          "fastest (cached, kept in the checkpoint); a shorter one uses the rule "
                                          "(compiled on CUDA, loop for conv nets on the CPU).")
    probe_min_iterations: int = knob(100, "strategy auto: the shortest run that probes (a few meta-steps per "
                                          "strategy).", ge=0)
    probe_max_memory_ratio: float | None = knob(None, "strategy auto: leave out a strategy whose peak memory in the "
                                                      "probe passes this multiple of the lowest (the loop's): e.g. "
                                                      "1.5; null: only the device's memory bounds it.", gt=0)
    compile_min_iterations: int = knob(2000, "strategy auto: the shortest run whose probe includes compiled "
                                             "(compiling takes one to three minutes on a CPU).", ge=0)
    probe_steps: int = knob(3, "strategy auto: timed meta-steps per strategy (after one warm-up).", ge=1)
    checkpointing: bool = knob(False, "Recompute each inner step in the backward: memory flat in inner_steps.")
    precision: Precision = knob("fp32", PRECISION_HELP)
    validate_every: int = knob(500, "Validate on the fixed validation episodes every this many meta-updates.", ge=1)
    n_val_episodes: int = knob(100, "How many of the fixed validation episodes to use.", ge=1)
    checkpoint_every: int = knob(100, "Resumable checkpoint period.", ge=1)
    log_every: int = knob(20, "Logging period.", ge=1)
    device: str = knob("auto", "auto (cuda when present), cpu, cuda or cuda:N.")

    def validate(self, where: str) -> None:
        check_device(self.device, where)


@dataclass(frozen=True)
class FewShotEvalParams:
    inner_steps: int = knob(10, "Report accuracy after 0..inner_steps inner steps on each test episode.", ge=0)
    inner_lr: float | None = knob(None, "Inner step size at test time; null: the training inner_lr "
                                        "(Meta-SGD and MAML++ use their learned rates).", gt=0)
    split: Literal["val", "test"] = knob("test", "Which fixed episodes to report.")
    checkpoint: Literal["best", "final"] = knob("final", "The model tested: final (the original code tests its "
                                                         "last model) or best (highest validation accuracy).")
    ensemble: int = knob(1, "Average the logits of the top-k validation checkpoints (MAML++'s protocol: 5); "
                            "1: one model, as `checkpoint` says.", ge=1)
    n_episodes: int = knob(600, "Fixed episodes evaluated (at most as many as were episodized).", ge=1)
    chunk: int = knob(100, "Episodes per batch in evaluation.", ge=1)


@dataclass(frozen=True)
class SettingParams:
    """One N-way K-shot cell; `n_query` must match an episodized setting of the dataset."""
    n_way: int = knob(5, "Classes per task (N).", ge=2)
    k_shot: int = knob(1, "Support images per class (K).", ge=1)
    n_query: int = knob(15, "Query images per class in the fixed evaluation episodes.", ge=1)
    train: dict[str, Any] = knob({}, "Overrides of the benchmark's train section for this cell.")
    evaluate: dict[str, Any] = knob({}, "Overrides of the benchmark's evaluate section for this cell.")


# Every few-shot variant, in the order of `mamlbench.algorithms.ALGORITHMS`.
VARIANTS = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "boil", "protonet", "protomaml", "cavia",
            "imaml", "baseline")


@dataclass(frozen=True)
class RunParams:
    algorithms: list[str] = knob(["maml"], "Variants the pipeline trains.",
                                 choices=list(VARIANTS))
    settings: list[str] = knob(["5w1s"], "Settings (keys of `settings`) the pipeline trains.")


@dataclass(frozen=True)
class FewShotParams:
    model: str = knob("conv4_omniglot", "Network: a name of mamlbench.models.conv.MODELS (conv4_omniglot, "
                                        "conv4_miniimagenet, mlp_omniglot, ...).", choices=list(MODELS))
    hidden: int | None = knob(None, "Conv filters (conv4) of the network; null: the paper's (64 Omniglot, 32 "
                                    "mini-ImageNet). Smaller is faster and weaker.", ge=1)
    norm: Literal["shift", "affine"] = knob("shift", "BatchNorm's learned parameters: shift only (the original's "
                                                     "tf.contrib.layers.batch_norm, scale=False) or scale and shift.")
    norm_eps: float = knob(1e-3, "BatchNorm epsilon (the original's 1e-3; PyTorch's default is 1e-5).", gt=0)
    init: Literal["reference", "torch"] = knob("reference", "Initial weights: reference (the original code: "
                                                            "Xavier convs, Omniglot head N(0, 1), mini-ImageNet head "
                                                            "Xavier, MLP N(0, 0.01) truncated, zero biases) or "
                                                            "torch (PyTorch's layer defaults).")
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


@dataclass(frozen=True)
class VariantSetting:
    """A variant's overrides for one cell (a key of the benchmark's `settings`)."""
    train: dict[str, Any] = knob({}, "Overrides of the train section.")
    evaluate: dict[str, Any] = knob({}, "Overrides of the evaluate section.")
    options: dict[str, Any] = knob({}, "Overrides of the variant's options.")


@dataclass(frozen=True)
class VariantBenchmark:
    """A variant's overrides on one benchmark: its reference protocol can differ per dataset."""
    model: str | None = knob(None, "Network replacing the benchmark's `model`; null: the benchmark's.",
                             choices=list(MODELS))
    hidden: int | None = knob(None, "Filters replacing the benchmark's `hidden`; null: the benchmark's.", ge=1)
    norm: Literal["shift", "affine"] | None = knob(None, "BatchNorm's learned parameters for this variant's "
                                                         "network; null: the benchmark's `norm`.")
    norm_eps: float | None = knob(None, "BatchNorm epsilon for this variant's network; null: the benchmark's.", gt=0)
    init: Literal["reference", "torch"] | None = knob(None, "Initial weights of this variant's network; null: the "
                                                            "benchmark's `init`.")
    train: dict[str, Any] = knob({}, "Overrides of the train section.")
    evaluate: dict[str, Any] = knob({}, "Overrides of the evaluate section.")
    options: dict[str, Any] = knob({}, "Overrides of the variant's options.")
    settings: dict[str, VariantSetting] = knob({}, "Per-cell overrides, by setting name.")


def _variant(name: str, options: type) -> type:
    """A variant's params: its own options, overrides of a benchmark's train and evaluate sections, and
    per-benchmark (and per-cell) overrides of all three."""
    return dataclasses.make_dataclass(f"{name}Variant", [
        ("train", dict[str, Any], knob({}, "Overrides of the benchmark's train section for this variant.")),
        ("evaluate", dict[str, Any], knob({}, "Overrides of the benchmark's evaluate section for this variant.")),
        ("options", options, section(options)),
        *[(benchmark, VariantBenchmark, section(VariantBenchmark)) for benchmark in FEWSHOT],
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
BOILVariant = _variant("BOIL", BOILParams)
ProtoNetVariant = _variant("ProtoNet", ProtoNetParams)
ProtoMAMLVariant = _variant("ProtoMAML", ProtoMAMLParams)
CAVIAVariant = _variant("CAVIA", CAVIAParams)
IMAMLVariant = _variant("IMAML", IMAMLParams)
BaselineVariant = _variant("Baseline", BaselineParams)


@dataclass(frozen=True)
class VariantsParams:
    """Per-variant options and train overrides, shared by every few-shot benchmark."""
    maml: MAMLVariant = section(MAMLVariant)
    fomaml: FOMAMLVariant = section(FOMAMLVariant)
    reptile: ReptileVariant = section(ReptileVariant)
    anil: ANILVariant = section(ANILVariant)
    metasgd: MetaSGDVariant = section(MetaSGDVariant)
    mamlpp: MAMLPPVariant = section(MAMLPPVariant)
    boil: BOILVariant = section(BOILVariant)
    protonet: ProtoNetVariant = section(ProtoNetVariant)
    protomaml: ProtoMAMLVariant = section(ProtoMAMLVariant)
    cavia: CAVIAVariant = section(CAVIAVariant)
    imaml: IMAMLVariant = section(IMAMLVariant)
    baseline: BaselineVariant = section(BaselineVariant)


@dataclass(frozen=True)
class TuneSpace:
    """The search space of `mamlbench tune`; a cell's variant decides which knobs apply."""
    inner_lr: list[float] = knob([0.03, 1.0], "Inner step size: [low, high], sampled log-uniform.", gt=0)
    inner_steps: list[int] = knob([1, 3], "Inner steps in meta-training: [low, high].", ge=1)
    eval_steps: list[int] = knob([1, 10], "Inner steps at validation and test time: [low, high].", ge=0)
    metasgd_init_inner_lr: list[float] = knob([0.03, 1.0], "Meta-SGD: initial learned rates, log-uniform.", gt=0)
    mamlpp_flags: list[str] = knob(["multi_step_loss", "lslr", "derivative_order_annealing"],
                                   "MAML++: options each trial turns on or off.",
                                   choices=["multi_step_loss", "derivative_order_annealing", "per_step_bn_stats",
                                            "per_step_bn_weights", "lslr", "cosine_annealing"])

    def validate(self, where: str) -> None:
        for name in ("inner_lr", "inner_steps", "eval_steps", "metasgd_init_inner_lr"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ConfigError(f"{where}.{name} = {bounds!r}: expected [low, high] with low <= high")


@dataclass(frozen=True)
class TuneCell:
    benchmark: str = knob("omniglot", "Few-shot benchmark.", choices=list(FEWSHOT))
    algorithm: str = knob("maml", "Variant.", choices=["maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp"])
    setting: str = knob("5w1s", "A key of <benchmark>.settings.")


@dataclass(frozen=True)
class TuneParams:
    """Optuna study over a cell's inner loop, maximising accuracy on the fixed validation episodes."""
    cells: list[TuneCell] = knob([], "Cells the `tune` stage tunes (empty: the stage is off).")
    n_trials: int = knob(20, "Trials per process; more processes on one storage share the study.", ge=1)
    n_jobs: int = knob(1, "Threads per process running trials.", ge=1)
    iterations: int = knob(60, "Meta-updates per trial.", ge=1)
    validate_every: int = knob(15, "Report validation accuracy to the pruner every this many meta-updates.", ge=1)
    n_val_episodes: int = knob(100, "Fixed validation episodes scored.", ge=1)
    pruner: Literal["median", "hyperband", "none"] = knob("median", "Stops poor trials on intermediate validation.")
    n_startup_trials: int = knob(5, "Trials sampled at random (and never pruned) before TPE and pruning act.", ge=0)
    sampler_seed: int = knob(0, "Seed of the TPE sampler (worker k uses a seed derived from it and k).", ge=0)
    storage: str | None = knob(None, "null: sqlite:///optuna.db; an Optuna RDB URL; or journal:<file>.")
    study: str | None = knob(None, "Study name; null: <benchmark>-<algorithm>-<setting>.")
    total_trials: int | None = knob(None, "Study-wide budget: workers run trials until this many are COMPLETE "
                                          "or PRUNED, taking over a dead worker's share; null: n_trials per "
                                          "process.", ge=1)
    heartbeat_interval: int | None = knob(10, "Seconds between a running trial's heartbeats; null: off (a killed "
                                              "worker's trial then stays RUNNING forever).", ge=1)
    grace_period: int | None = knob(60, "Seconds without a heartbeat before another worker fails the trial; "
                                        "null: 2 x heartbeat_interval.", ge=1)
    max_retry: int = knob(1, "Times a trial whose worker died is re-queued with the same settings; 0: never.", ge=0)
    space: TuneSpace = section(TuneSpace)

    def validate(self, where: str) -> None:
        if self.heartbeat_interval and self.grace_period and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"{where}.grace_period = {self.grace_period}: must exceed heartbeat_interval "
                              f"({self.heartbeat_interval}), else live trials look dead between heartbeats")


@dataclass(frozen=True)
class Params:
    seed: int = knob(0, "Fixes tasks, episodes and initial weights (`--seed` on the command line wins).", ge=0)
    seeds: list[int] = knob([0], "Training seeds the pipeline runs: one cell per benchmark x variant x setting x seed.",
                            ge=0)
    profile: str = knob("quick", "Which entry of `profiles` to apply.")
    profiles: dict[str, Any] = knob({}, "Named budget overrides, as dotted keys.")
    tracking: TrackingParams = section(TrackingParams)
    sinusoid: SinusoidParams = section(SinusoidParams)
    omniglot: FewShotParams = section(FewShotParams)
    mini_imagenet: FewShotParams = section(FewShotParams)
    imagefolder: FewShotParams = dataclasses.field(default_factory=lambda: _imagefolder_default())
    variants: VariantsParams = section(VariantsParams)
    data: DataParams = section(DataParams)
    rl: RLParams = section(RLParams)
    tune: TuneParams = section(TuneParams)

    def validate(self, where: str = "") -> None:
        for benchmark in FEWSHOT:
            bench = getattr(self, benchmark)
            for name in VARIANTS:
                unknown = set(getattr(getattr(self.variants, name), benchmark).settings) - set(bench.settings)
                if unknown:
                    raise ConfigError(f"variants.{name}.{benchmark}.settings: {', '.join(sorted(unknown))} not a key "
                                      f"of {benchmark}.settings (have: {', '.join(bench.settings) or 'none'})")
                for setting in bench.settings:  # every cell resolves and validates
                    fewshot_cell(self, benchmark, name, setting)
            self._check_cells(benchmark)
        for i, cell in enumerate(self.tune.cells):
            if cell.setting not in getattr(self, cell.benchmark).settings:
                raise ConfigError(f"tune.cells[{i}].setting = {cell.setting!r}: not a key of {cell.benchmark}.settings "
                                  f"(have: {', '.join(getattr(self, cell.benchmark).settings) or 'none'})")
        if self.imagefolder.run.algorithms and self.imagefolder.run.settings and "imagefolder" not in self.data.opt_in:
            raise ConfigError("imagefolder.run lists cells but data.opt_in lacks imagefolder: add it, so that "
                              "`dvc repro` downloads, prepares and episodizes data.imagefolder.source")

    def _check_cells(self, benchmark: str) -> None:
        """Cells must be drawable from the dataset: K plus the queries of training (any variant's) and
        evaluation <= the images of a class, and, for the cells the pipeline or `tune` trains, N <= the
        classes of the meta-train split (the evaluation splits are checked with `data.*.episodes`)."""
        bench = getattr(self, benchmark)
        n_train, per_class = self.data.dataset(dataset_name(benchmark)).limits()
        trained = set(bench.run.settings) | {c.setting for c in self.tune.cells if c.benchmark == benchmark}
        for name, cell in bench.settings.items():
            where = f"{benchmark}.settings.{name}"
            if name in trained and n_train is not None and cell.n_way > n_train:
                raise ConfigError(f"{where}.n_way = {cell.n_way}: more than the {n_train} classes of split 'train'")
            cells = [fewshot_cell(self, benchmark, a, name).train for a in VARIANTS]
            drawn = max([cell.k_shot + cell.n_query] + [(t.k_shot or cell.k_shot) + t.n_query for t in cells])
            if per_class is not None and drawn > per_class:
                raise ConfigError(f"{where}: support + query images per class = {drawn} > {per_class} images per class "
                                  f"(k_shot + n_query, or a variant's train.k_shot + train.n_query)")


def _imagefolder_default() -> FewShotParams:
    """Your own folder of class folders (data.imagefolder): off until `run` lists cells; mini-ImageNet's
    network and MAML protocol, as the repository's params.yaml states them."""
    return FewShotParams(
        model="conv4_miniimagenet", run=RunParams(algorithms=[], settings=["5w1s"]),
        settings={"5w1s": SettingParams(5, 1, 1), "5w5s": SettingParams(5, 5, 5)},
        train=build(FewShotTrainParams, {"inner_lr": 0.01, "inner_steps": 5, "meta_batch_size": 4, "n_query": 15,
                                         "grad_clip_value": 10, "validate_every": 500}, "imagefolder.train"),
        evaluate=build(FewShotEvalParams, {"inner_steps": 10, "checkpoint": "final"}, "imagefolder.evaluate"))


@dataclass(frozen=True)
class FewShotCell:
    """What one benchmark x variant x setting cell runs, every override applied."""
    train: FewShotTrainParams
    evaluate: FewShotEvalParams
    options: Any          # the variant's options dataclass
    model: str
    hidden: int | None
    norm: str
    norm_eps: float
    init: str


def _check_keys(cls: type, overrides: dict, where: str) -> None:
    """Name the exact override path of an unknown key (the merged section would only name the cell)."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key not in known:
            raise ConfigError(f"unknown key '{where}.{key}' (known here: {', '.join(known)})")


def fewshot_cell(params: Params, benchmark: str, algorithm: str, setting: str) -> FewShotCell:
    """A cell's effective sections. Later wins: the benchmark's section < its `settings[setting]` <
    `variants.<algorithm>` < `variants.<algorithm>.<benchmark>` < that one's `settings[setting]`."""
    bench: FewShotParams = getattr(params, benchmark)
    variant = getattr(params.variants, algorithm)
    per: VariantBenchmark = getattr(variant, benchmark)
    cell, per_cell = bench.settings[setting], per.settings.get(setting, VariantSetting())
    where = f"{benchmark}.{setting}+variants.{algorithm}"
    layers = ((f"{benchmark}.settings.{setting}", cell), (f"variants.{algorithm}", variant),
              (f"variants.{algorithm}.{benchmark}", per), (f"variants.{algorithm}.{benchmark}.settings.{setting}",
                                                           per_cell))
    train, evaluate = to_dict(bench.train), to_dict(bench.evaluate)
    for prefix, layer in layers:
        _check_keys(FewShotTrainParams, layer.train, f"{prefix}.train")
        _check_keys(FewShotEvalParams, layer.evaluate, f"{prefix}.evaluate")
        train, evaluate = {**train, **layer.train}, {**evaluate, **layer.evaluate}
    train, evaluate = build(FewShotTrainParams, train, f"{where}.train"), build(FewShotEvalParams, evaluate,
                                                                                f"{where}.evaluate")
    options = variant.options
    _check_keys(type(options), per.options, f"variants.{algorithm}.{benchmark}.options")
    _check_keys(type(options), per_cell.options, f"variants.{algorithm}.{benchmark}.settings.{setting}.options")
    if per.options or per_cell.options:
        options = build(type(options), {**to_dict(options), **per.options, **per_cell.options}, f"{where}.options")
    def own(name: str):
        return getattr(bench, name) if getattr(per, name) is None else getattr(per, name)
    return FewShotCell(train, evaluate, options, per.model or bench.model, own("hidden"), own("norm"),
                       own("norm_eps"), own("init"))


def fewshot_train(params: Params, benchmark: str, algorithm: str, setting: str) -> FewShotTrainParams:
    """A cell's effective train section (see `fewshot_cell`)."""
    return fewshot_cell(params, benchmark, algorithm, setting).train


# Keys dvc.yaml's matrix/foreach read from params.yaml itself: a profile's value would go unseen by DVC.
PIPELINE_SHAPE = ("seeds", "omniglot.run", "mini_imagenet.run", "imagefolder.run", "rl.envs", "tune.cells", "data.opt_in")


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
    for key in merged:
        if str(key).startswith(PIPELINE_SHAPE):
            raise ConfigError(f"profiles.{name}.{key}: DVC expands the pipeline from params.yaml as written, so this "
                              f"key cannot come from a profile; set it in its section (dvc exp run -S {key}=...)")
    return apply_overrides(raw, merged, f"profiles.{name}")


def apply_overrides(raw: dict, dotted: dict[str, Any], where: str = "overrides") -> dict:
    """Set dotted keys (`omniglot.train.inner_lr: 0.1`) in the raw mapping `raw`, in place; return it."""
    for key, value in dotted.items():
        node = raw
        parts = str(key).split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}.{key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_raw(path: str | Path) -> dict:
    """The params file as a plain mapping (no profile applied); `ConfigError` when it is not one."""
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
    return raw


def load_params(path: str | Path = "params.yaml", profile: str | None = None, seed: int | None = None,
                overrides: dict[str, Any] | None = None) -> Params:
    """Read, apply the profile (`profile` overrides the file's), then `seed` and dotted `overrides`
    (e.g. a tuning trial's), validate; `ConfigError` on bad input."""
    from mamlbench import guards
    raw = read_raw(path)
    if profile is not None:
        raw["profile"] = profile
    guards.check_params_file(raw, path)
    written, raw = raw, apply_profile(raw)
    if seed is not None:
        raw["seed"] = seed
    params = build(Params, apply_overrides(raw, overrides or {}))
    guards.as_written(lambda sections: build(Params, sections), written, path, written["profile"])
    return params


def with_seed(params: Params, seed: int | None) -> Params:
    """`params` with `seed` in place of params.seed (None: unchanged)."""
    if seed is None or seed == params.seed:
        return params
    return build(Params, {**to_dict(params), "seed": seed})
