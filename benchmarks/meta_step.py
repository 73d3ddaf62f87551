"""Seconds per meta-iteration and peak memory of the core against a plain per-task loop.

    python benchmarks/meta_step.py                 # both workloads, CPU (or CUDA when present)
    python benchmarks/meta_step.py --workload omniglot --iters 5 --device cuda

Variants: the plain loop (baseline), the core's `loop`, `auto`, `vmap` and `compiled` (the
task-batched meta-step under torch.compile, mamlbench/algorithms/fast.py); the speed-up column is
each one's ratio against the plain loop.

Workloads: Omniglot-shaped (5-way 1-shot, 28x28x1, 15 queries per class, conv4 = 4 x [3x3 conv 64,
BatchNorm, ReLU, 2x2 max-pool] + linear head, meta-batch 32, 1 inner step, second order) and the
sinusoid (MLP 1-40-40-1, K=10, meta-batch 25). Every variant gets the same inputs in the same
process. The baseline is the loop people write by hand: per task, take the parameters,
`autograd.grad(create_graph=True)`, a functional forward with the adapted weights, then the query
loss's backward. Peak memory on the CPU is the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs before each variant); on CUDA, torch's peak allocated bytes.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mamlbench.algorithms.maml import MAML


def conv4(ways: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                   nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def workload(name: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if name == "omniglot":
        tasks, ways, shots, queries = 32, 5, 1, 15
        model = conv4(ways)
        support_x = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
        query_x = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
        support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
        query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
        return model.to(device), F.cross_entropy, 0.4, [t.to(device) for t in (support_x, support_y, query_x, query_y)]
    tasks, k = 25, 10
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    x = torch.rand(tasks, 2 * k, 1, generator=g) * 10 - 5
    y = torch.rand(tasks, 1, 1, generator=g) * 5 * torch.sin(x - torch.rand(tasks, 1, 1, generator=g) * 3.14)
    return model.to(device), F.mse_loss, 0.01, [t.to(device) for t in (x[:, :k], y[:, :k], x[:, k:], y[:, k:])]


def plain_loop_step(model: nn.Module, loss_fn, inner_lr: float, batch) -> float:
    """The usual hand-written MAML step (learn2learn/higher style), one task at a time."""
    support_x, support_y, query_x, query_y = batch
    tasks, total = support_x.shape[0], 0.0
    for t in range(tasks):
        fast = dict(model.named_parameters())
        loss = loss_fn(functional_call(model, fast, (support_x[t],)), support_y[t])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {name: p - inner_lr * g for (name, p), g in zip(fast.items(), grads)}
        query_loss = loss_fn(functional_call(model, fast, (query_x[t],)), query_y[t]) / tasks
        query_loss.backward()
        total += query_loss.item()
    return total


def core_step(strategy: str):
    learners: dict[int, MAML] = {}  # one learner per model: the compiled path compiles once per learner

    def step(model, loss_fn, inner_lr, batch) -> float:
        if id(model) not in learners:
            learners[id(model)] = MAML(model, inner_lr=inner_lr, inner_steps=1, strategy=strategy, loss_fn=loss_fn)
        out = learners[id(model)](*batch)
        out.loss.backward()
        return out.loss.item()
    return step


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _libc():
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def exact_cpu_memory() -> None:
    """Serve every block >= 128 KiB by mmap and unmap it on free, so resident memory follows live
    tensors instead of what glibc's heap kept from an earlier variant. Costs syscalls: call it after
    the timings."""
    if LIBC is not None:
        LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the starting level in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def read_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024


def run_variants(variants: dict[str, Callable], model: nn.Module, loss_fn, inner_lr, batch, iters: int, warmup: int,
                 device: torch.device) -> dict[str, tuple[float, float]]:
    """{label: (median s/iter, peak MiB)}. Timed round-robin, so drift hits every variant alike;
    memory measured afterwards, one variant per window."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(step) -> float:
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        step(model, loss_fn, inner_lr, batch)
        sync()
        return time.perf_counter() - t0

    for step in variants.values():
        for _ in range(warmup):
            once(step)
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(iters):
        for label, step in variants.items():
            times[label].append(once(step))
    exact_cpu_memory()
    peaks = {}
    for label, step in variants.items():
        model.zero_grad(set_to_none=True)
        start = reset_peak(device)
        once(step)
        peaks[label] = (read_peak(device) - start) / 2**20
    return {label: (statistics.median(times[label]), peaks[label]) for label in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["omniglot", "sinusoid", "both"], default="both")
    parser.add_argument("--iters", type=int, default=5, help="timed meta-iterations per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="", help="comma-separated words picking variants (loop, auto, "
                        "vmap, compiled); default: all")
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled path (its compilation "
                        "takes a minute or more on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = ["omniglot", "sinusoid"] if args.workload == "both" else [args.workload]
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    for name in names:
        model, loss_fn, inner_lr, batch = workload(name, device)
        auto = MAML(model, strategy="auto").resolve_strategy(device)
        variants = {"plain loop (baseline)": plain_loop_step, "core loop": core_step("loop"),
                    f"core auto (= {auto})": core_step("auto"), "core vmap": core_step("vmap")}
        if not args.no_compiled:
            variants["core compiled"] = core_step("compiled")
        if args.variants:  # e.g. --variants plain,compiled: the baseline is always kept
            keep = args.variants.split(",")
            variants = {k: v for k, v in variants.items() if k.startswith("plain") or any(w in k for w in keep)}
        if "core compiled" in variants:
            # The first call compiles (Inductor): time it apart, so the warm-up rounds are steady state.
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            variants["core compiled"](model, loss_fn, inner_lr, batch)
            print(f"\n{name}: compiled path's first call (compilation) {time.perf_counter() - t0:.1f} s")
        iters = args.iters * (20 if name == "sinusoid" else 1)
        print(f"\n{name}: median of {iters} meta-iterations (round-robin) after {args.warmup} warm-up")
        print(f"{'variant':24s} {'s/iter':>10s} {'speed-up':>9s} {'peak MiB':>9s} {'mem ratio':>9s}")
        results = run_variants(variants, model, loss_fn, inner_lr, batch, iters, args.warmup, device)
        base = results["plain loop (baseline)"]
        for label, (seconds, peak) in results.items():
            ratio = f"{peak / base[1]:8.2f}x" if base[1] >= 1 else "     n/a"  # below 1 MiB: noise
            print(f"{label:24s} {seconds:10.4f} {base[0] / seconds:8.2f}x {peak:9.1f} {ratio}")


if __name__ == "__main__":
    main()
