"""The meta-training loop shared by every benchmark: steps, logging, checkpoints, resume.

A benchmark supplies `step(iteration) -> metrics`, which draws its own batch from
(seed, iteration) and updates the learner; this loop owns everything around it. Checkpoints hold
the learner, the optimiser, the iteration and the metrics history, written atomically; `resume`
continues from the newest checkpoint that loads, so a run killed anywhere and restarted ends with
exactly the parameters of an uninterrupted run on the CPU. A checkpoint resumes only a run of the
same identity (`mamlbench.provenance.RunIdentity`: code, settings, data); any other starts afresh and
says which part changed. With a time budget the loop stops after the iteration that passes it and
records so in the checkpoint: a rerun trains no further.
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mamlbench import distributed
from mamlbench.guards import Interrupted
from mamlbench.io import fault_point, load_torch, remove_stale_temps, save_torch, write_text
from mamlbench.progress import Progress
from mamlbench.provenance import RunIdentity, record

CKPT = re.compile(r"^ckpt-(\d{8})\.pt$")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the setting."""


def trajectory_settings(section: dict, ignore: tuple[str, ...]) -> dict:
    """A train section without the keys in `ignore` (budgets, logging: they leave the trajectory as it
    is) and without `precision` at its default fp32, so checkpoints from before that knob still resume."""
    return {k: v for k, v in section.items() if k not in ignore and not (k == "precision" and v == "fp32")}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {name!r}: CUDA is not available on this machine")
    return device


class Checkpointer:
    """Numbered checkpoints in `folder`; keeps the newest `keep`, falls back past unreadable ones.

    Each file carries a sha256 trailer (`mamlbench.io.save_torch`): a checkpoint that is cut short
    or has a flipped byte anywhere fails the check, is reported on stderr and skipped, so training
    resumes from the previous good one. Temporary files (a writer killed mid-write) never match
    `ckpt-XXXXXXXX.pt`, so they are never read, and `discard_foreign` removes them.
    """

    def __init__(self, folder: str | Path, identity: RunIdentity | str, keep: int = 2):
        self.folder, self.keep = Path(folder), keep
        self.identity = identity if isinstance(identity, RunIdentity) else None  # a bare str: a fingerprint as is
        self.run_fingerprint = identity.fingerprint if self.identity else identity

    def paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if CKPT.match(p.name))

    def _load(self, path: Path) -> dict | None:
        """The checkpoint at `path` when it passes the sha256 check and loads; None (and a warning) if not."""
        try:
            state = load_torch(path, require_digest=True)
        except Exception as err:  # cut, corrupted, or a pickle weights_only refuses
            reason = (str(err).strip().splitlines() or [""])[0][:300]
            print(f"warning: skipping unreadable checkpoint {path}: {type(err).__name__}: {reason}", file=sys.stderr)
            return None
        return state if isinstance(state, dict) else None

    def latest(self) -> dict | None:
        """The newest checkpoint of this run that passes its check and loads; None if there is none."""
        for path in reversed(self.paths()):
            state = self._load(path)
            if state is not None and state.get("fingerprint") == self.run_fingerprint:
                return state
        return None

    def discard_foreign(self) -> None:
        """Before a run writes here: remove checkpoints of another configuration, so they can never be
        resumed by mistake, and temporary files left by a killed writer. Unreadable checkpoints are
        kept (and skipped by `latest`) for inspection until the run overwrites or prunes them."""
        if self.folder.is_dir():
            remove_stale_temps(self.folder)
        said = False
        for path in reversed(self.paths()):
            try:
                state = load_torch(path, require_digest=True)
            except Exception:
                continue
            if state.get("fingerprint") != self.run_fingerprint:
                if not said and self.identity is not None:  # one line, about the newest
                    stored = state.get("identity")
                    what = " and ".join(self.identity.changed(stored)) if stored else "identity (it predates them)"
                    print(f"note: {self.folder}: starting afresh, not resuming {path.name}: its {what} "
                          f"{'differ' if ' and ' in what else 'differs'} from this run's", file=sys.stderr)
                    said = True
                path.unlink()

    def save(self, state: dict) -> Path:
        path = self.folder / f"ckpt-{state['iteration']:08d}.pt"
        identity = asdict(self.identity) if self.identity else None
        save_torch(path, {**state, "fingerprint": self.run_fingerprint, "identity": identity})
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        fault_point("after-prune", path)
        return path


def exploded(metrics: dict[str, float], limit: float) -> list[str]:
    """Losses past `limit`: finite, but the run has diverged as surely as with an inf (a loss of 3.5e9 at
    chance accuracy); stopping keeps the checkpoints from before it."""
    return [k for k, v in metrics.items() if "loss" in k and abs(v) > limit]


def kept_checkpoint(checkpointer: Checkpointer) -> str:
    """What a stopped run leaves to resume from, for its message."""
    paths = checkpointer.paths()
    if not paths:
        return "; no checkpoint was written yet (a rerun starts from iteration 0)"
    return f"; the last good checkpoint is kept ({paths[-1]})"


def _finite_state(module: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf; None when all are finite."""
    for name, value in module.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def meta_update(learner: nn.Module, optimizer: torch.optim.Optimizer, batch, grad_clip: float | None,
                after_backward: Callable[[nn.Module], None] | None = None, grad_clip_value: float | None = None):
    """One meta-update on a batch of tasks: adapt, back-propagate the mean query loss, step.

    `after_backward(learner)` runs between the backward and the clip and step: with several
    processes, `distributed.all_reduce_grads` turns each rank's slice gradient into the full batch's.
    `grad_clip_value` clips each entry (the original MAML code on mini-ImageNet), `grad_clip` the global norm.
    """
    out = learner(*batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if after_backward is not None:
        after_backward(learner)
    if grad_clip_value is not None:
        torch.nn.utils.clip_grad_value_(learner.parameters(), grad_clip_value)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(learner.parameters(), grad_clip)
    optimizer.step()
    return out


@dataclass
class LoopConfig:
    iterations: int
    checkpoint_every: int
    log_every: int
    describe: str = "meta-train"          # progress label
    setting: str = ""                     # named in a divergence message, e.g. "inner_lr=0.01, meta_lr=0.001"
    force_log: tuple[str, ...] = ()       # metrics (e.g. validation) that are logged whenever present
    time_budget_minutes: float | None = None  # stop after the iteration that passes this much wall time
    loss_limit: float = 1e6               # a loss past this has exploded (chance-level query losses, summed over a
                                          # query set as the original code does, stay in the hundreds)


@dataclass
class LoopResult:
    iterations: int                       # reached: fewer than configured when the time budget stopped the run
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged iteration
    resumed_from: int = 0
    seconds: float = 0.0                  # wall time of training, summed over resumes
    stopped: str = "iterations"           # why training stopped: "iterations" or "time_budget"
    clock: list[tuple[int, float]] = field(default_factory=list)  # (iteration, wall seconds) of each history row

    def last(self) -> dict[str, float]:
        """The newest value of every metric."""
        out: dict[str, float] = {}
        for row in self.history:
            out.update({k: v for k, v in row.items() if k != "iteration"})
        return out


def train_provenance(result: LoopResult, checkpointer: Checkpointer, params, device) -> dict:
    """The provenance of a finished `run_loop` (`mamlbench.provenance.record`) for train.json and MLflow."""
    return record(checkpointer.identity, params.profile, device, seconds=result.seconds, iterations=result.iterations,
                  stopped=result.stopped, resumed_from=result.resumed_from)


def write_curve(path: str | Path, history: list[dict[str, float]]) -> None:
    """The learning curve as CSV (DVC plots): one row per logged iteration, blanks where not measured."""
    keys = list(dict.fromkeys(k for row in history for k in row if k != "iteration"))
    lines = ["iteration," + ",".join(keys)]
    lines += [f"{int(row['iteration'])}," + ",".join(f"{row[k]:.6g}" if k in row else "" for k in keys)
              for row in history]
    write_text(path, "\n".join(lines) + "\n")


def write_clock(path: str | Path, clock: list[tuple[int, float]]) -> None:
    """Wall seconds of training at each logged iteration (join with curve.csv on `iteration`)."""
    write_text(path, "iteration,seconds\n" + "".join(f"{i},{s:.3f}\n" for i, s in clock))


def run_loop(learner: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[int], dict[str, float]],
             config: LoopConfig, checkpointer: Checkpointer, *, resume_state: dict | None = None,
             log: Callable[[dict[str, float], int], None] | None = None, extra: dict | None = None,
             progress: bool = True, on_budget_stop: Callable[[int], dict[str, float]] | None = None) -> LoopResult:
    """Run iterations [start, config.iterations) of `step`, checkpointing and logging as configured.

    `history` records the metrics of every `log_every`-th iteration, the last, and any iteration whose
    metrics hold a `force_log` key (e.g. a validation); it travels in the checkpoint so a resumed
    run's learning curve is whole. `extra` is saved in every checkpoint as is: `step` may update it.
    When the time budget stops the run, `on_budget_stop(done)` adds metrics to that last iteration
    (few-shot: a validation, so best.pt has seen the end).

    Under torchrun every rank runs this loop (its `step` does the collectives); only rank 0 saves
    checkpoints, calls `log` and shows progress, and all ranks resume from the same checkpoint.
    """
    main = distributed.is_main()
    history: list[dict[str, float]] = []
    clock: list[tuple[int, float]] = []  # kept apart from history: wall time differs between runs, the curve must not
    start, before, total = 0, 0.0, config.iterations
    budget_s = None if config.time_budget_minutes is None else 60.0 * config.time_budget_minutes
    if resume_state is not None:
        learner.load_state_dict(resume_state["learner"])
        optimizer.load_state_dict(resume_state["optimizer"])
        history = [dict(row) for row in resume_state["history"]]
        clock = [tuple(row) for row in resume_state.get("clock", [])]
        start, before = resume_state["iteration"], resume_state.get("seconds", 0.0)
        if resume_state.get("out_of_time") and budget_s is not None and before >= budget_s:
            total = start  # the budget already stopped this run: train no further
    distributed.broadcast_state(learner)  # identical starting weights on every rank, as DDP does
    extra = extra if extra is not None else {}
    began = time.perf_counter()
    seconds = before

    def snapshot(iteration: int, out_of_time: bool) -> None:
        bad = _finite_state(learner)
        if bad is not None:  # finite metrics, but the update that followed them was not: keep the last good file
            raise TrainingDiverged(
                f"{config.describe}: parameter {bad} is not finite after iteration {iteration - 1}"
                + (f" ({config.setting})" if config.setting else "") + kept_checkpoint(checkpointer))
        if main:
            checkpointer.save({"iteration": iteration, "learner": learner.state_dict(),
                               "optimizer": optimizer.state_dict(), "history": history, "extra": extra,
                               "seconds": seconds, "out_of_time": out_of_time, "clock": clock})
        distributed.barrier()  # no rank runs ahead of a checkpoint that is still being written

    shown: dict[str, float] = {}   # the progress status: the newest training figure and validation figures
    stopped = "time_budget" if total < config.iterations else "iterations"
    at = start   # the iteration under way, for the message of a signal that arrives anywhere in the loop
    with Progress(config.describe, config.iterations, start=start, enabled=progress and main) as bar:
        try:
            for iteration in range(start, total):
                at = iteration
                metrics = step(iteration)
                done = iteration + 1
                seconds = before + time.perf_counter() - began
                # under torchrun every rank stops after the same iteration: the first clock past the budget decides
                out_of_time = (budget_s is not None and done < total
                               and distributed.mean_metrics({"over": float(seconds >= budget_s)})["over"] > 0)
                if out_of_time and on_budget_stop is not None:
                    metrics = {**metrics, **on_budget_stop(done)}
                bad = [k for k, v in metrics.items() if not math.isfinite(v)] or exploded(metrics, config.loss_limit)
                if bad:
                    raise TrainingDiverged(
                        f"{config.describe}: {bad[0]} = {metrics[bad[0]]:.4g} at iteration {iteration}"
                        + (f" ({config.setting})" if config.setting else "")
                        + (f", past the sane bound {config.loss_limit:g}" if math.isfinite(metrics[bad[0]]) else "")
                        + kept_checkpoint(checkpointer))
                forced = any(k in metrics for k in config.force_log)
                if done % config.log_every == 0 or done == total or forced or out_of_time:
                    history.append({"iteration": done, **{k: float(v) for k, v in metrics.items()}})
                    clock.append((done, round(seconds, 3)))
                    if log is not None and main:
                        log(metrics, done)
                    first = next(iter(metrics), None)
                    shown.update({k: v for k, v in metrics.items() if k == first or k in config.force_log})
                if done % config.checkpoint_every == 0 or done == total or out_of_time:
                    snapshot(done, out_of_time)
                bar.update(done, status=" ".join(f"{k}={v:.4g}" for k, v in shown.items()))
                if out_of_time:
                    stopped, total = "time_budget", done
                    break
        except Interrupted as err:  # in a step, a log call or a checkpoint write: the message names the iteration
            err.detail = err.detail or f"{config.describe} stopped at iteration {at}{kept_checkpoint(checkpointer)}"
            raise
    return LoopResult(total, history, start, seconds, stopped, clock)
