"""Peak memory of one second-order meta-iteration against the number of inner steps, with and
without checkpointing of the inner steps (`MAML(..., checkpointing=True)`).

    python benchmarks/inner_steps_memory.py --steps 1 5 10 20 40 --plot reports/memory_inner_steps.png

Default: mini-ImageNet shape (conv4_miniimagenet, 5-way 5-shot, 84x84x3, 15 queries per class), loop
strategy, meta-batch 2; `--model conv4_omniglot --shot 1` for Omniglot.
CPU: the rise of peak RSS (VmHWM, reset through /proc/self/clear_refs); CUDA: torch's peak bytes.
"""
from __future__ import annotations

import argparse
import time

import torch

from mamlbench.algorithms.maml import MAML
from mamlbench.models.conv import build_model

from meta_step import exact_cpu_memory, read_peak, reset_peak


def peak_mib(step, device: torch.device) -> tuple[float, float]:
    start = reset_peak(device)
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return (read_peak(device) - start) / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--model", default="conv4_miniimagenet", choices=["conv4_miniimagenet", "conv4_omniglot"])
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--plot", default=None, help="write a PNG of the curves here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    exact_cpu_memory()
    g = torch.Generator().manual_seed(0)
    shape = (3, 84, 84) if args.model == "conv4_miniimagenet" else (1, 28, 28)
    n, k, q = args.way, args.shot, 15
    batch = [torch.rand(args.tasks, n * k, *shape, generator=g), torch.arange(n).repeat_interleave(k).repeat(args.tasks, 1),
             torch.rand(args.tasks, n * q, *shape, generator=g), torch.arange(n).repeat_interleave(q).repeat(args.tasks, 1)]
    batch = [t.to(device) for t in batch]
    torch.manual_seed(0)
    model = build_model(args.model, n).to(device)
    inner_lr = 0.01 if args.model == "conv4_miniimagenet" else 0.4
    rows = []
    print(f"device={device} {args.model} {n}-way {k}-shot, {args.tasks} tasks, second order, loop strategy")
    print(f"{'inner steps':>11s} {'plain MiB':>10s} {'ckpt MiB':>10s} {'plain s':>8s} {'ckpt s':>8s}")
    for steps in args.steps:
        cells = []
        for checkpointing in (False, True):
            maml = MAML(model, inner_lr=inner_lr, inner_steps=steps, strategy="loop", checkpointing=checkpointing)

            def step():
                model.zero_grad(set_to_none=True)
                maml(*batch).loss.backward()
            step()  # warm-up: allocator pools
            cells.append(peak_mib(step, device))
        rows.append((steps, *cells))
        (pm, ps), (cm, cs) = cells
        print(f"{steps:11d} {pm:10.1f} {cm:10.1f} {ps:8.2f} {cs:8.2f}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from mamlbench.io import atomic_path
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot([r[0] for r in rows], [r[1][0] for r in rows], "o-", label="second order, plain")
        ax.plot([r[0] for r in rows], [r[2][0] for r in rows], "s-", label="second order, checkpointed steps")
        ax.set_xlabel("inner steps")
        ax.set_ylabel(f"peak memory rise (MiB, {device.type})")
        ax.set_title(f"{args.model} {n}w{k}s, {args.tasks} tasks, one meta-iteration", fontsize=10)
        ax.legend()
        fig.tight_layout()
        with atomic_path(args.plot) as tmp:
            fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    main()
