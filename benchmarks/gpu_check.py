"""GPU check (issue 7): the meta-step's speed and memory, then paper-profile Omniglot training.

    bash benchmarks/gpu_check.sh                      # on a CUDA machine: at most 8 minutes in all
    python benchmarks/gpu_check.py bench --deadline 270
    python benchmarks/gpu_check.py train --deadline 170 --prepared data/prepared/omniglot
    python benchmarks/gpu_check.py --smoke            # CPU, tiny shapes, every section in seconds

`bench`: seconds per meta-iteration (meta-gradient and Adam step) and peak GPU memory
(`torch.cuda.max_memory_allocated` above the level before the iteration) for Omniglot 5-way 1-shot
(conv4, meta-batch 32, 1 inner step) and 20-way 1-shot (meta-batch 16, 5 inner steps), second order,
fp32 and bf16 autocast, for
- fast path: `MAML(strategy="compiled")`, the task-batched meta-step under torch.compile (CUDA
  graphs), mamlbench/algorithms/fast.py; its first call (compilation) is reported apart;
- per-task loop: `MAML(strategy="loop")`, one task's graph alive at a time;
- vmap (eager): `MAML(strategy="vmap")`, batched without compilation (what the compiler adds);
- learn2learn-style: the loop written the usual way: per task, clone the module (its parameters
  stay differentiable functions of the originals), `autograd.grad(create_graph=True)` and replace
  the clone's parameters, then the query loss's backward.
Inputs are random tensors already on the device (the sampler builds episodes on the device).

`train`: `fewshot.train` on the `paper` profile, Omniglot 5w1s MAML (auto strategy: the fast path on
CUDA), validation every `--validate-every` meta-updates (the paper profile: 500), printing
validation accuracy against wall time until `--deadline` seconds have passed.

Every section keeps to its deadline: a cell that would run past it is stopped (SIGALRM) and
reported as such; results are printed as they come, so a hard kill keeps what was done.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mamlbench.algorithms import MAML, fast
from mamlbench.models.conv import build_model

SETTINGS = {  # name: (tasks, ways, shots, queries per class, inner steps, inner lr) as the paper
    "5w1s": (32, 5, 1, 15, 1, 0.4),
    "20w1s": (16, 20, 1, 5, 5, 0.1),
}
SMOKE_SETTINGS = {"5w1s": (2, 5, 1, 2, 1, 0.4), "20w1s": (2, 4, 1, 2, 2, 0.1)}


class CellTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so no `except Exception` (compile fallbacks) swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CellTimeout()
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def say(text: str) -> None:
    print(text, flush=True)


# ---- the learn2learn-style loop, written the usual way ---------------------------------------------
def clone_module(module: nn.Module) -> nn.Module:
    """A copy whose parameters are `p.clone()`: differentiable functions of the originals (learn2learn's
    `clone_module`)."""
    clone = copy.copy(module)  # a new object sharing the submodule and tensor dicts, replaced below
    clone._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return clone


def update_module(module: nn.Module, lr: float, grads: dict[str, torch.Tensor], prefix: str = "") -> None:
    """theta' = theta - lr * g, written into the clone's parameters in place of the old tensors."""
    for name, p in module._parameters.items():
        if p is not None:
            module._parameters[name] = p - lr * grads[prefix + name]
    for name, child in module._modules.items():
        if child is not None:
            update_module(child, lr, grads, f"{prefix}{name}.")


def l2l_step(model: nn.Module, inner_lr: float, inner_steps: int, batch, autocast) -> torch.Tensor:
    support_x, support_y, query_x, query_y = batch
    tasks, total = support_x.shape[0], 0.0
    for t in range(tasks):
        with autocast():
            learner = clone_module(model)
            for _ in range(inner_steps):
                loss = F.cross_entropy(learner(support_x[t]), support_y[t])
                names, params = zip(*learner.named_parameters())
                grads = torch.autograd.grad(loss, params, create_graph=True)
                update_module(learner, inner_lr, dict(zip(names, grads)))
            query_loss = F.cross_entropy(learner(query_x[t]), query_y[t]) / tasks
        query_loss.backward()
        total += query_loss.detach()
    return total


# ---- section 1: seconds per meta-iteration and peak memory ------------------------------------------
def episode_batch(tasks: int, ways: int, shots: int, queries: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
    query_x = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return [t.to(device) for t in (support_x, support_y, query_x, query_y)]


def make_step(variant: str, model: nn.Module, inner_lr: float, inner_steps: int, precision: str,
              device: torch.device):
    """A meta-iteration (meta-gradient and Adam step) of `variant` on `model`."""
    if variant == "learn2learn-style":
        autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
                    else contextlib.nullcontext)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(batch):
            opt.zero_grad(set_to_none=True)
            l2l_step(model, inner_lr, inner_steps, batch, autocast)
            opt.step()
        return step, None
    strategy = {"fast path": "compiled", "per-task loop": "loop", "vmap (eager)": "vmap"}[variant]
    learner = MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, strategy=strategy, precision=precision)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(batch):
        out = learner(*batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return step, learner


def measure(variant: str, setting: tuple, precision: str, device: torch.device, iters: int, hidden: int | None,
            seconds: float) -> str:
    """One table row: first call, median s/iter, peak MiB; stops at `seconds`."""
    tasks, ways, shots, queries, inner_steps, inner_lr = setting
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model("conv4_omniglot", ways, in_channels=1, image_size=28, hidden=hidden).to(device)
    batch = episode_batch(tasks, ways, shots, queries, device)
    step, learner = make_step(variant, model, inner_lr, inner_steps, precision, device)
    times: list[float] = []
    first = peak = float("nan")
    stopped = ""
    try:
        with time_limit(seconds):
            t0 = time.perf_counter()
            step(batch)  # compiles the fast path; warms up the others
            sync()
            first = time.perf_counter() - t0
            step(batch)  # a CUDA-graph tree records on its second call
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
            for _ in range(iters):
                t0 = time.perf_counter()
                step(batch)
                sync()
                times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    except CellTimeout:
        stopped = f" (stopped at the {seconds:.0f} s limit)"
    except torch.cuda.OutOfMemoryError:
        stopped = " (out of memory)"
    median = statistics.median(times) if times else float("nan")
    note = stopped
    if learner is not None and variant == "fast path" and not fast.uses_compiler(learner):
        note += " (compilation failed: ran eagerly)"
    del model, batch, step, learner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f"{first:9.2f} {median:10.4f} {len(times):6d} {peak:9.1f}{note}"


def bench(args, device: torch.device, deadline: float) -> None:
    settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    variants = ["per-task loop", "learn2learn-style", "vmap (eager)", "fast path"]
    say(f"\n== meta-step: device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
        f"torch={torch.__version__} fast-path backend={fast.BACKEND}")
    say("second order; s/iter: median over the timed meta-iterations (meta-gradient + Adam step); "
        "first s: the first call (compilation for the fast path); peak MiB: max_memory_allocated above the start")
    for name, setting in settings.items():
        tasks, ways, shots, queries, inner_steps, _ = setting
        say(f"\nOmniglot {name}: meta-batch {tasks}, {ways}-way {shots}-shot, {queries} queries/class, "
            f"{inner_steps} inner step(s)")
        say(f"{'variant':20s} {'precision':9s} {'first s':>9s} {'s/iter':>10s} {'iters':>6s} {'peak MiB':>9s}")
        for precision in ("fp32", "bf16"):
            for variant in variants:
                left = deadline - time.monotonic()
                if left < 5:
                    say(f"{variant:20s} {precision:9s} skipped: the section's time is spent")
                    continue
                row = measure(variant, setting, precision, device, args.iters, 8 if args.smoke else None,
                              min(left, args.cell_seconds))
                say(f"{variant:20s} {precision:9s} {row}")


# ---- section 2: paper-profile training, validation accuracy against wall time -----------------------
class OutOfTime(Exception):
    pass


def smoke_data(folder: Path) -> tuple[Path, Path]:
    """A tiny Omniglot-shaped prepared dataset and its fixed episodes (random stroke patterns)."""
    from mamlbench.data.episodes import episodize
    from mamlbench.data.params import EpisodeSetting
    from mamlbench.data.prepared import write_prepared
    g = np.random.default_rng(0)
    n_classes, per_class = 24, 10
    prototypes = g.random((n_classes, 1, 1, 28, 28)) < 0.15
    images = ((prototypes ^ (g.random((n_classes, per_class, 1, 28, 28)) < 0.05)) * 255).astype(np.uint8)
    meta = dict(dataset="omniglot", scheme="maml", classes=[dict(id=i) for i in range(n_classes)],
                splits={"maml": {"train": list(range(12)), "val": list(range(12, 18)), "test": list(range(18, 24))}},
                rotations=[0, 1, 2, 3], rotations_as_classes={"maml": False})
    prepared = write_prepared(folder / "prepared", images, meta)
    episodize(prepared, folder / "episodes", [EpisodeSetting(n_way=5, k_shot=1, n_query=5)], splits=["val", "test"],
              n_val=10, n_test=10, seed=3)
    return prepared, folder / "episodes"


def train(args, device: torch.device, deadline: float) -> None:
    from mamlbench import fewshot
    from mamlbench.config import fewshot_train, load_params
    out = Path(args.out)
    overrides = {"omniglot.train.device": str(device), "omniglot.train.validate_every": args.validate_every}
    prepared, episodes = Path(args.prepared), Path(args.episodes)
    if args.smoke:
        prepared, episodes = smoke_data(out / "smoke-data")
        overrides.update({"omniglot.hidden": 8, "omniglot.train.iterations": 6,
                          "omniglot.train.meta_batch_size": 2, "omniglot.train.n_query": 5,
                          "omniglot.train.n_val_episodes": 10, "omniglot.train.strategy": "compiled",
                          "omniglot.settings.5w1s.n_query": 5, "omniglot.evaluate.chunk": 10})
    params = load_params(args.params, profile="paper", overrides=overrides)
    cfg = fewshot_train(params, "omniglot", "maml", "5w1s")
    run_dir = out / "train-omniglot-maml-5w1s"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of an earlier check
    say(f"\n== paper-profile Omniglot 5w1s MAML on {device}: meta-batch {cfg.meta_batch_size}, inner_lr "
        f"{cfg.inner_lr}, {cfg.inner_steps} step(s), strategy {cfg.strategy}, validation every "
        f"{cfg.validate_every} on {cfg.n_val_episodes} episodes, for {deadline - time.monotonic():.0f} s")
    say(f"{'wall_s':>7s} {'iteration':>9s} {'it/s':>7s} {'train_acc':>9s} {'val_acc':>8s}")
    started = time.monotonic()
    last_print = [started]

    def log(metrics: dict[str, float], iteration: int) -> None:
        now = time.monotonic()
        val = metrics.get("meta_val/query_acc")
        if val is not None or now - last_print[0] > 15:
            last_print[0] = now
            shown = "" if val is None else f"{val:8.4f}"
            say(f"{now - started:7.1f} {iteration:9d} {iteration / (now - started):7.2f} "
                f"{metrics['meta_train/query_acc']:9.4f} {shown:>8s}")
        if now > deadline:
            raise OutOfTime(iteration)

    try:
        fewshot.train(params, "omniglot", "maml", "5w1s", run_dir, prepared=prepared, episodes_dir=episodes, log=log,
                      progress=False)
        say("training finished")
    except OutOfTime as stop:
        say(f"stopped at iteration {stop.args[0]}: the time is spent (val_acc above: the paper profile's first "
            f"{stop.args[0]} of {cfg.iterations} meta-updates)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="?", choices=["bench", "train", "all"], default="all")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, aot_eager backend: seconds")
    parser.add_argument("--deadline", type=float, default=None, help="seconds this process may run "
                        "(default: 450, smoke 300)")
    parser.add_argument("--bench-share", type=float, default=0.6, help="share of the time for bench in `all`")
    parser.add_argument("--cell-seconds", type=float, default=100, help="at most this per bench cell")
    parser.add_argument("--iters", type=int, default=10, help="timed meta-iterations per bench cell")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", default="data/prepared/omniglot")
    parser.add_argument("--episodes", default="data/episodes/omniglot")
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    start = time.monotonic()
    if args.smoke:
        args.device, args.iters, args.validate_every = "cpu", 2, 3
        fast.BACKEND = "aot_eager"  # Inductor's CPU code generation takes minutes; the capture is the same
    deadline = start + (args.deadline if args.deadline is not None else (300 if args.smoke else 450))
    device = torch.device(args.device)
    if args.section in ("bench", "all"):
        share = args.bench_share if args.section == "all" else 1.0
        bench(args, device, start + share * (deadline - start))
    if args.section in ("train", "all"):
        train(args, device, deadline)
    say(f"\ngpu_check: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
