"""mamlbench against the peers on the paper's own Omniglot workloads: seconds per meta-iteration and
peak memory, all in one process, timed round-robin (drift hits every variant alike), medians.

    pip install -e ".[bench]"                        # higher 0.2.1, TorchOpt 0.7.3
    python benchmarks/peers.py                       # 5w1s 5w5s 20w1s 20w5s, CPU (or CUDA when present)
    python benchmarks/peers.py --cells 5w1s --iters 3 --no-compiled
    python benchmarks/peers.py --evaluation --iters 3   # evaluation's inner loop: loop against vmap

Workloads: `profile: paper`'s Omniglot cells (docs/protocols.md): the MAML conv4 (4 x [3x3 conv 64
stride 2, BatchNorm, ReLU] + linear head, Xavier init), second order, K queries per class, the
original's summed loss; 5-way: meta-batch 32, 1 inner step of 0.4; 20-way: meta-batch 16, 5 steps of
0.1. Every variant gets the same inputs and the same network, and adapts every parameter: BatchNorm
has its scale and shift (`norm: affine`), as the peers' examples build it, where the protocol's
shift-only norm freezes the scale (a parameter TorchOpt's MetaSGD cannot take).

Peers, each written as its own examples write MAML:
- higher 0.2.1 (`examples/maml-omniglot.py`): `innerloop_ctx(model, SGD, copy_initial_weights=False)`
  per task, `diffopt.step(loss)`, the query loss's backward inside the context;
- TorchOpt 0.7.3 (`examples/few-shot/maml_omniglot.py`): `torchopt.MetaSGD` stepping the module in
  place, `extract_state_dict` / `recover_state_dict` around each task;
- the clone-and-adapt loop of learn2learn's examples, written out (learn2learn 0.2.0's sdist needs its
  Cython sources regenerated on Python 3.11, see benchmarks/README.md): per task the parameters as
  graph-connected copies, `autograd.grad(create_graph=True)` per inner step, a functional forward.
mamlbench: its `loop`, `vmap` and `compiled` strategies and `auto` as a run would choose (the probe of
`mamlbench.autostrategy`, timings included in the output), also under `train.probe_max_memory_ratio: 1.5`.
Ratios are against each peer.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
from meta_step import run_variants  # noqa: E402  (the round-robin timer and the peak-memory window)

from mamlbench import autostrategy  # noqa: E402
from mamlbench.algorithms.maml import MAML  # noqa: E402
from mamlbench.fewshot import classification_loss  # noqa: E402
from mamlbench.models.conv import build_model  # noqa: E402
from mamlbench.train import meta_update  # noqa: E402

CELLS = {  # (N, K, meta-batch, inner steps, inner lr): params.yaml omniglot.settings under profile paper
    "5w1s": (5, 1, 32, 1, 0.4), "5w5s": (5, 5, 32, 1, 0.4), "20w1s": (20, 1, 16, 5, 0.1), "20w5s": (20, 5, 16, 5, 0.1)}


def workload(cell: str, device: torch.device):
    n, k, tasks, steps, lr = CELLS[cell]
    torch.manual_seed(0)
    model = build_model("conv4_omniglot", n, in_channels=1, image_size=28, norm="affine", norm_eps=1e-3,
                        init="reference").to(device)
    g = torch.Generator().manual_seed(1)
    images = lambda: (torch.rand(tasks, n * k, 1, 28, 28, generator=g) > 0.8).float()  # noqa: E731 binary strokes
    labels = torch.arange(n).repeat_interleave(k).repeat(tasks, 1)
    batch = [t.to(device) for t in (images(), labels, images(), labels.clone())]
    return model, classification_loss("shot_sum", k), lr, steps, batch


def clone_adapt_step(steps: int):
    """learn2learn's examples: clone, adapt `steps` times, query loss backward, per task."""
    def step(model, loss_fn, inner_lr, batch) -> float:
        support_x, support_y, query_x, query_y = batch
        tasks, total = support_x.shape[0], 0.0
        for t in range(tasks):
            fast = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}   # clone_module
            for _ in range(steps):
                loss = loss_fn(functional_call(model, fast, (support_x[t],), strict=False), support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {name: p - inner_lr * g for (name, p), g in zip(fast.items(), grads)}
            query_loss = loss_fn(functional_call(model, fast, (query_x[t],), strict=False), query_y[t]) / tasks
            query_loss.backward()
            total += query_loss.item()
        return total
    return step


def higher_step(steps: int):
    import higher

    def step(model, loss_fn, inner_lr, batch) -> float:
        support_x, support_y, query_x, query_y = batch
        tasks, total = support_x.shape[0], 0.0
        inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(support_x[t]), support_y[t]))
                query_loss = loss_fn(fmodel(query_x[t]), query_y[t]) / tasks
                query_loss.backward()
                total += query_loss.item()
        return total
    return step


def torchopt_step(steps: int):
    import torchopt
    optimisers = {}

    def step(model, loss_fn, inner_lr, batch) -> float:
        support_x, support_y, query_x, query_y = batch
        if id(model) not in optimisers:
            optimisers[id(model)] = torchopt.MetaSGD(model, lr=inner_lr)
        inner_opt = optimisers[id(model)]
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt)
        tasks, total = support_x.shape[0], 0.0
        for t in range(tasks):
            for _ in range(steps):
                inner_opt.step(loss_fn(model(support_x[t]), support_y[t]))
            query_loss = loss_fn(model(query_x[t]), query_y[t]) / tasks
            query_loss.backward()
            total += query_loss.item()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return total
    return step


def core_step(strategy: str, steps: int):
    learners: dict[int, MAML] = {}

    def step(model, loss_fn, inner_lr, batch) -> float:
        if id(model) not in learners:
            learners[id(model)] = MAML(model, inner_lr=inner_lr, inner_steps=steps, strategy=strategy, loss_fn=loss_fn)
        out = learners[id(model)](*batch)
        out.loss.backward()
        return out.loss.item()
    return step


def evaluation(cell: str, model, loss_fn, inner_lr: float, steps: int, device, iters: int) -> None:
    """Evaluation's trajectory (`MAML.trajectory`: first order, no graph) on 100 episodes x 10 steps."""
    from mamlbench.fewshot import accuracy
    n, k = CELLS[cell][:2]
    g = torch.Generator().manual_seed(2)
    images = (torch.rand(100, n * k, 1, 28, 28, generator=g) > 0.8).float().to(device)
    labels = torch.arange(n).repeat_interleave(k).repeat(100, 1).to(device)
    times = {s: [] for s in ("loop", "vmap")}
    learners = {s: MAML(model, inner_lr=inner_lr, inner_steps=steps, strategy=s, loss_fn=loss_fn) for s in times}
    for _ in range(iters):   # round-robin
        for s, learner in learners.items():
            start = time.perf_counter()
            learner.trajectory(images, labels, images, labels, inner_steps=10, metric=accuracy)
            times[s].append(time.perf_counter() - start)
    loop, vmap = (statistics.median(times[s]) for s in ("loop", "vmap"))
    print(f"{cell} evaluation, 100 episodes x 10 steps: loop {loop:.2f} s, vmap {vmap:.2f} s ({loop / vmap:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="5w1s,5w5s,20w1s,20w5s")
    parser.add_argument("--iters", type=int, default=5, help="timed meta-iterations per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluation", action="store_true", help="time evaluation instead (first order, 100 "
                                                                   "episodes x 10 inner steps): loop against vmap")
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled path (compiling takes "
                                                                   "a minute or more on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={autostrategy.device_name(device)} torch={torch.__version__}")
    for cell in args.cells.split(","):
        model, loss_fn, inner_lr, steps, batch = workload(cell, device)
        if args.evaluation:
            evaluation(cell, model, loss_fn, inner_lr, steps, device, args.iters)
            continue
        variants = {"clone/adapt (l2l-style)": clone_adapt_step(steps)}
        for name, make in (("higher", higher_step), ("TorchOpt", torchopt_step)):
            try:
                variants[name] = make(steps)
            except ImportError:
                print(f"{cell}: {name} not installed (pip install -e '.[bench]'), left out")
        strategies = ["loop", "vmap"] + ([] if args.no_compiled else ["compiled"])
        for strategy in strategies:
            variants[f"mamlbench {strategy}"] = core_step(strategy, steps)
        if "mamlbench compiled" in variants:   # compilation apart, so the warm-up rounds are steady state
            t0 = time.perf_counter()
            variants["mamlbench compiled"](model, loss_fn, inner_lr, batch)
            model.zero_grad(set_to_none=True)
            print(f"\n{cell}: compiled path's first call (compilation) {time.perf_counter() - t0:.1f} s")
        probe_learner = MAML(model, inner_lr=inner_lr, inner_steps=steps, loss_fn=loss_fn)
        timings = autostrategy.probe(probe_learner, batch, lambda learner, opt, b: meta_update(learner, opt, b, None),
                                     device, candidates=strategies)
        chosen = autostrategy.fastest(timings)
        probed = ", ".join(f"{s} {r['step_s']:.3f}" if "step_s" in r else f"{s} failed" for s, r in timings.items())
        print(f"\n{cell}: auto's probe (s/step) {probed} -> {chosen}")
        results = run_variants(variants, model, loss_fn, inner_lr, batch, args.iters, args.warmup, device)
        results[f"mamlbench auto (= {chosen})"] = results[f"mamlbench {chosen}"]
        capped = autostrategy.fastest(timings, max_memory_ratio=1.5)
        results[f"auto, memory <=1.5x (= {capped})"] = results[f"mamlbench {capped}"]
        peers = [p for p in ("clone/adapt (l2l-style)", "higher", "TorchOpt") if p in results]
        print(f"{cell}: N={CELLS[cell][0]} K={CELLS[cell][1]} meta-batch {CELLS[cell][2]}, {steps} inner step(s); "
              f"median of {args.iters} round-robin meta-iterations after {args.warmup} warm-up")
        header = f"{'variant':28s} {'s/iter':>8s} {'peak MiB':>9s}" + "".join(f" {'x ' + p[:10]:>13s}" for p in peers)
        print(header)
        for label, (seconds, peak) in results.items():
            ratios = "".join(f" {results[p][0] / seconds:12.2f}x" for p in peers)
            print(f"{label:28s} {seconds:8.4f} {peak:9.1f}{ratios}")


if __name__ == "__main__":
    main()
