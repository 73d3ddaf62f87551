"""Few-shot classification (Omniglot, mini-ImageNet): meta-train any variant, validate on the fixed
validation episodes, keep the best, evaluate on the fixed test episodes.

Every variant of a benchmark starts from the same initial weights for a given seed and is scored on
the same stored episodes, so differences between variants are paired comparisons.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mamlbench import autostrategy, distributed, ensemble, guards, rng
from mamlbench.algorithms import ALGORITHMS, build_algorithm
from mamlbench.config import FEWSHOT, FewShotCell, Params, fewshot_cell
from mamlbench.data.episodes import episode_path, load_episodes, materialize
from mamlbench.data.prepared import content_hash, load_split, read_meta
from mamlbench.data.sampler import EpisodeSampler
from mamlbench.io import load_torch, save_torch, write_json, write_text
from mamlbench.models.conv import build_model
from mamlbench.progress import Progress
from mamlbench.provenance import digest, file_digest, identity, record
from mamlbench.schema import to_dict
from mamlbench.stats import mean_ci95
from mamlbench.train import (Checkpointer, LoopConfig, LoopResult, meta_update, resolve_device, run_loop,
                             train_provenance, trajectory_settings, write_clock, write_curve)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean(-1)


def check_cell(params: Params, benchmark: str, algorithm: str, setting: str) -> None:
    if benchmark not in FEWSHOT:
        raise ValueError(f"unknown few-shot benchmark {benchmark!r} (have: {', '.join(FEWSHOT)})")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r} (have: {', '.join(ALGORITHMS)})")
    settings = getattr(params, benchmark).settings
    if setting not in settings:
        raise ValueError(f"unknown setting {setting!r} for {benchmark} (have: {', '.join(settings) or 'none'})")


def classification_loss(reduction: str, k_shot: int):
    """The support and query loss. "shot_sum" is the original MAML code's: `xent` is softmax cross-entropy
    / K per example (cbfinn/maml utils.py:56-58), and `tf.gradients` of that vector, like the meta-loss's
    `reduce_sum`, sums it over the examples (maml.py:90, 135-146): sum / K, i.e. N x the mean on a support
    set of N*K. "mean" is PyTorch's default; a mean-loss step at N*alpha equals a shot_sum step at alpha."""
    if reduction == "mean":
        return F.cross_entropy
    if reduction != "shot_sum":
        raise ValueError(f"loss_reduction must be mean or shot_sum, got {reduction!r}")

    def shot_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="sum") / k_shot
    return shot_sum


def build_learner(params: Params, benchmark: str, algorithm: str, setting: str, cfg: FewShotCell,
                  in_channels: int, image_size: int, n_classes: int | None = None):
    """The variant around a freshly initialised model; the init depends on (seed, benchmark, setting) only.

    A variant trained on global labels (`global_labels`: the baseline) gets a head of `n_classes` outputs,
    the training split's classes (`train_classes`); every other one a head of the cell's N.
    """
    cell = getattr(params, benchmark).settings[setting]
    torch.manual_seed(rng.derive_seed(params.seed, f"{benchmark}-{setting}-init"))
    hidden = None if cfg.model.startswith("mlp") else cfg.hidden
    outputs = cell.n_way
    if getattr(ALGORITHMS[algorithm], "global_labels", False):
        if n_classes is None:
            raise ValueError(f"{algorithm} trains on global labels: build_learner needs the training split's n_classes")
        outputs = n_classes
    model = build_model(cfg.model, outputs, in_channels=in_channels, image_size=image_size, hidden=hidden,
                        norm=cfg.norm, norm_eps=cfg.norm_eps, init=cfg.init)
    train = cfg.train
    learner = build_algorithm(algorithm, model, inner_lr=train.inner_lr, inner_steps=train.inner_steps,
                              strategy=train.strategy, params=cfg.options if to_dict(cfg.options) else None,
                              precision=train.precision, adapt_norm=train.adapt_norm,
                              loss_fn=classification_loss(train.loss_reduction, cell.k_shot))
    if train.checkpointing:
        learner.checkpointing = True
    return learner


def train_classes(prepared: str | Path) -> int:
    """Classes of the training split under the prepared scheme (rotations count when they make classes)."""
    meta = read_meta(prepared)
    scheme = meta["scheme"]
    rotations = len(meta["rotations"]) if meta["rotations_as_classes"][scheme] else 1
    return len(meta["splits"][scheme]["train"]) * rotations


def trajectory(params: Params, benchmark: str, algorithm: str, setting: str) -> dict:
    """The settings that fix a cell's training trajectory (logging periods and the time budget excluded)."""
    cell = fewshot_cell(params, benchmark, algorithm, setting)
    train = trajectory_settings(to_dict(cell.train),
                                ("checkpoint_every", "log_every", "validate_every", "time_budget_minutes",
                                 "probe_min_iterations", "compile_min_iterations", "probe_steps",
                                 "probe_max_memory_ratio"))
    bench = getattr(params, benchmark)
    return {"seed": params.seed, "benchmark": benchmark, "algorithm": algorithm, "model": cell.model,
            "hidden": cell.hidden, "network": [cell.norm, cell.norm_eps, cell.init],
            "cell": to_dict(bench.settings[setting]), "train": train, "options": to_dict(cell.options)}


def data_hash(prepared: str | Path, episodes_dir: str | Path, split: str, cell) -> str:
    """The prepared images and the stored episodes of `split` that a run reads."""
    path = episode_path(episodes_dir, read_meta(prepared)["scheme"], split, cell.n_way, cell.k_shot, cell.n_query)
    return digest([content_hash(prepared), file_digest(path) if path.is_file() else None])


def checkpointer(params: Params, benchmark: str, algorithm: str, setting: str, run_dir: str | Path,
                 prepared: str | Path, episodes_dir: str | Path) -> Checkpointer:
    data = data_hash(prepared, episodes_dir, "val", getattr(params, benchmark).settings[setting])
    return Checkpointer(Path(run_dir) / "checkpoints",
                        identity(__name__, trajectory(params, benchmark, algorithm, setting), data))


def _episodes(params: Params, benchmark: str, setting: str, split_name: str, prepared: Path, episodes_dir: Path):
    cell = getattr(params, benchmark).settings[setting]
    split = load_split(prepared, split_name)
    path = episode_path(episodes_dir, split.scheme, split_name, cell.n_way, cell.k_shot, cell.n_query)
    return split, load_episodes(path, prepared)


def score(learner, split, episodes, n_episodes: int, inner_steps: int, inner_lr, device, chunk: int,
          bar: Progress | None = None) -> torch.Tensor:
    """Query accuracy of each stored episode after 0..inner_steps steps: (episodes, steps+1).

    In eval mode, so a variant whose layers read stored statistics at test time (MAML++'s per-step
    running statistics) does; MAML's BatchNorm uses each batch's statistics in either mode.
    """
    n = min(n_episodes, episodes["n_episodes"])
    was_training = learner.training
    learner.eval()
    rows = []
    try:
        for batch in materialize({**episodes, "n_episodes": n}, split, chunk=min(chunk, n), device=device):
            rows.append(learner.trajectory(*batch, inner_steps=inner_steps, metric=accuracy, inner_lr=inner_lr))
            if bar is not None:
                bar.update(min(sum(len(r) for r in rows), n))
    finally:
        learner.train(was_training)
    return torch.cat(rows)[:n]


def train(params: Params, benchmark: str, algorithm: str, setting: str, run_dir: str | Path, *,
          prepared: str | Path, episodes_dir: str | Path, resume_state: dict | None = None, log=None,
          extra: dict | None = None, progress: bool = True) -> LoopResult:
    """Meta-train one cell; writes model.pt (last), best.pt (best validation), curve.csv, train.json.

    Under torchrun each rank meta-trains on its slice of every meta-batch and the gradients are
    averaged (`mamlbench.distributed`); rank 0 validates and writes the files.
    """
    check_cell(params, benchmark, algorithm, setting)
    run_dir, prepared, episodes_dir = Path(run_dir), Path(prepared), Path(episodes_dir)
    resolved = fewshot_cell(params, benchmark, algorithm, setting)
    cfg, evaluate_cfg = resolved.train, resolved.evaluate
    batch_key = f"{benchmark}.train.meta_batch_size"  # named when it does not split over the processes
    main = distributed.is_main()
    cell = getattr(params, benchmark).settings[setting]
    device = resolve_device(cfg.device)
    train_split = load_split(prepared, "train")
    val_split, val_episodes = _episodes(params, benchmark, setting, "val", prepared, episodes_dir)
    sampler = EpisodeSampler.from_split(train_split, cell.n_way, cfg.k_shot or cell.k_shot, cfg.n_query,
                                        device=device)
    channels, size = train_split.images.shape[2], train_split.images.shape[3]
    learner = build_learner(params, benchmark, algorithm, setting, resolved, channels, size,
                            train_split.n_classes).to(device)
    global_classes = getattr(learner, "global_labels", False)  # the baseline: supervised on the split's classes
    sgd_outer = algorithm == "reptile" and learner.meta_optimizer == "sgd"
    optimizer = (torch.optim.SGD if sgd_outer else torch.optim.Adam)(learner.parameters(), lr=cfg.meta_lr)
    best = dict(resume_state["extra"].get("best", {})) if resume_state else {}

    def validate(done: int) -> dict[str, float]:
        acc = score(learner, val_split, val_episodes, cfg.n_val_episodes, evaluate_cfg.inner_steps,
                    evaluate_cfg.inner_lr, device, evaluate_cfg.chunk)[:, -1]
        # float32 summation order makes equal accuracies differ in the last bits; rounded, a tie is a
        # tie, so best.pt and the top-k keep the earlier checkpoint as documented
        val = round(acc.double().mean().item(), 6)
        if val > best.get("acc", -1.0):
            best.update(acc=val, iteration=done)
            state = _model_state(learner, params, benchmark, algorithm, setting, done)
            save_torch(run_dir / "best.pt", state)
            # and in the checkpoint folder, which DVC keeps (persist) when it reruns a finished stage
            save_torch(checkpoints.folder / BEST_KEPT, {**state, "fingerprint": checkpoints.run_fingerprint})
        if evaluate_cfg.ensemble > 1:  # MAML++ tests its top-k validation checkpoints
            ensemble.keep_top_k(run_dir, evaluate_cfg.ensemble, val, done,
                                lambda: _model_state(learner, params, benchmark, algorithm, setting, done))
        extra_state["best"] = dict(best)
        return {"meta_val/query_acc": val, "meta_val/best_acc": best["acc"]}

    def validated(done: int) -> bool:
        return done % cfg.validate_every == 0 or done == cfg.iterations

    def step(iteration: int) -> dict[str, float]:
        if hasattr(learner, "set_iteration"):
            learner.set_iteration(iteration)
        if hasattr(learner, "meta_lr"):
            for group in optimizer.param_groups:
                group["lr"] = learner.meta_lr(iteration, cfg.iterations, cfg.meta_lr)
        if hasattr(learner, "generator"):
            learner.generator = rng.generator(params.seed, f"{benchmark}-inner", iteration)
        sampler.generator.manual_seed(rng.derive_seed(params.seed, f"{benchmark}-{setting}-train", iteration))
        # every rank draws the whole meta-batch's indices and builds only its own slice of the tasks
        index = distributed.shard(sampler.indices(cfg.meta_batch_size), cfg.meta_batch_size, batch_key)
        batch = sampler.gather(index, global_classes)  # support_x (tasks, N*K, C, H, W), support_y, query_x, query_y
        out = meta_update(learner, optimizer, batch, cfg.grad_clip, after_backward=distributed.all_reduce_grads,
                          grad_clip_value=cfg.grad_clip_value)
        metrics = distributed.mean_metrics({  # the full meta-batch's means
            "meta_train/query_loss": out.loss.item(),
            "meta_train/query_acc": accuracy(out.query_outputs, batch.query_y).mean().item()})
        done = iteration + 1
        if main and validated(done):  # the others go on to wait
            metrics.update(validate(done))
        return metrics

    def on_budget_stop(done: int) -> dict[str, float]:  # the time budget ends the run: validate its last model
        return validate(done) if main and not validated(done) else {}

    extra_state = dict(extra or {})
    extra_state["strategy"] = pick_strategy(learner, sampler, params, benchmark, algorithm, setting, cfg, device,
                                            global_classes, resume_state)
    loop = LoopConfig(cfg.iterations, cfg.checkpoint_every, cfg.log_every, describe=f"{benchmark} {algorithm} {setting}",
                      setting=f"inner_lr={cfg.inner_lr}, meta_lr={cfg.meta_lr}, inner_steps={cfg.inner_steps}",
                      force_log=("meta_val/query_acc",), time_budget_minutes=cfg.time_budget_minutes)
    checkpoints = checkpointer(params, benchmark, algorithm, setting, run_dir, prepared, episodes_dir)
    result = run_loop(learner, optimizer, step, loop, checkpoints, resume_state=resume_state, log=log,
                      extra=extra_state, progress=progress, on_budget_stop=on_budget_stop)
    if not main:
        return result
    save_torch(run_dir / "model.pt", _model_state(learner, params, benchmark, algorithm, setting, result.iterations))
    _restore_best(run_dir, checkpoints)
    write_curve(run_dir / "curve.csv", result.history)
    write_clock(run_dir / "clock.csv", result.clock)
    final = result.last()
    write_json(run_dir / "train.json", {"iterations": result.iterations, "best_val_acc": best.get("acc"),
                                        "best_iteration": best.get("iteration"), "seconds": round(result.seconds, 1),
                                        "strategy": extra_state["strategy"],
                                        **final, "provenance": train_provenance(result, checkpoints, params, device)})
    return result


def pick_strategy(learner, sampler, params: Params, benchmark: str, algorithm: str, setting: str, cfg, device,
                  global_classes: bool, resume_state: dict | None) -> dict:
    """Set `learner.strategy` for the run and say how it was chosen: the checkpoint's choice on a resume (a
    resumed run stays bit-exact), a measured one (`autostrategy`) for a long enough `auto` run in one
    process (compiled among the candidates only where the run can repay compiling), else the configured
    value (`auto`: the rule)."""
    autostrategy.persistent_compile_cache()
    if resume_state is not None:   # a checkpoint from before the probe existed trained by the rule
        kept = resume_state["extra"].get("strategy", {"choice": learner.strategy, "how": "rule"})
        learner.strategy = kept["choice"]
        return kept
    if (cfg.strategy != "auto" or cfg.iterations < cfg.probe_min_iterations or distributed.world_size() > 1
            or not autostrategy.eligible(learner)):
        return {"choice": learner.strategy, "how": "configured" if cfg.strategy != "auto" else "rule"}
    generator_state = sampler.generator.get_state()
    sampler.generator.manual_seed(rng.derive_seed(params.seed, f"{benchmark}-{setting}-probe"))
    batch = sampler.gather(sampler.indices(cfg.meta_batch_size), global_classes)
    sampler.generator.set_state(generator_state)
    candidates = [s for s in autostrategy.CANDIDATES if s != "compiled" or cfg.iterations >= cfg.compile_min_iterations]
    found = autostrategy.choose(learner, batch, lambda lr, opt, b: meta_update(
        lr, opt, b, cfg.grad_clip, grad_clip_value=cfg.grad_clip_value), device, algorithm, steps=cfg.probe_steps,
        candidates=candidates, max_memory_ratio=cfg.probe_max_memory_ratio)
    learner.strategy = found["choice"]
    timings = ", ".join(f"{s} {r['step_s']:.3f} s/step" + (f" (first {r['warmup_s']:.1f} s)" if s == "compiled" else "")
                        if "error" not in r else f"{s}: {r['error']}" for s, r in found["timings"].items())
    print(f"strategy auto: {found['choice']} ({'cached: ' if found['cached'] else ''}{timings})", flush=True)
    return {"choice": found["choice"], "how": "cached probe" if found["cached"] else "probe", "timings": found["timings"]}


BEST_KEPT = "best.pt"  # beside the ckpt-*.pt files, untouched by their pruning


def _restore_best(run_dir: Path, checkpoints) -> None:
    """best.pt again when it is gone but this run's copy is kept: DVC deletes a stage's outputs before
    it reruns, and a finished run that resumes at its last iteration validates nothing anew."""
    kept = checkpoints.folder / BEST_KEPT
    if (run_dir / "best.pt").is_file() or not kept.is_file():
        return
    state = load_torch(kept)
    if state.pop("fingerprint", None) == checkpoints.run_fingerprint:
        save_torch(run_dir / "best.pt", state)


def _model_state(learner, params: Params, benchmark: str, algorithm: str, setting: str, iteration: int) -> dict:
    return {"learner": learner.state_dict(), "benchmark": benchmark, "algorithm": algorithm, "setting": setting,
            "iteration": iteration, "seed": params.seed}


def evaluate(params: Params, benchmark: str, algorithm: str, setting: str, run_dir: str | Path, out_dir: str | Path, *,
             prepared: str | Path, episodes_dir: str | Path) -> dict:
    """Accuracy mean and 95% CI after 0..S inner steps on the fixed test episodes (best checkpoint)."""
    check_cell(params, benchmark, algorithm, setting)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    resolved = fewshot_cell(params, benchmark, algorithm, setting)
    cfg, ev = resolved.train, resolved.evaluate
    device = resolve_device(cfg.device)
    split, episodes = _episodes(params, benchmark, setting, ev.split, Path(prepared), Path(episodes_dir))
    best = run_dir / "best.pt"
    source = best if ev.checkpoint == "best" and best.is_file() else run_dir / "model.pt"
    if not source.is_file():
        raise ValueError(f"{source}: no trained model; run `mamlbench train {benchmark} --algorithm {algorithm} "
                         f"--setting {setting}` first")
    state = guards.load_model_file(source, f"retrain with `mamlbench train {benchmark}`, or restore the file")
    guards.check_model_identity(state, source, benchmark=benchmark, algorithm=algorithm, setting=setting,
                                seed=params.seed)
    n_classes = train_classes(prepared)
    learner = build_learner(params, benchmark, algorithm, setting, resolved, split.images.shape[2],
                            split.images.shape[3], n_classes)
    learner.load_state_dict(state["learner"])
    if ev.ensemble > 1:  # the mean logits of the top-k validation checkpoints (MAML++)
        learner = ensemble.from_top_k(run_dir, ev.ensemble, lambda: build_learner(
            params, benchmark, algorithm, setting, resolved, split.images.shape[2], split.images.shape[3], n_classes))
    learner.to(device)
    n = min(ev.n_episodes, episodes["n_episodes"])
    with Progress(f"evaluate {benchmark} {algorithm} {setting}", n) as bar:
        acc = score(learner, split, episodes, n, ev.inner_steps, ev.inner_lr, device, ev.chunk, bar)  # (E, S+1)
    per_step = {f"step{s}": dict(zip(("acc", "ci95"), mean_ci95(acc[:, s].cpu().numpy()))) for s in range(acc.shape[1])}
    mean, ci = mean_ci95(acc[:, -1].cpu().numpy())
    cell = getattr(params, benchmark).settings[setting]
    protocol = identity(__name__, {"evaluate": to_dict(ev), "cell": to_dict(cell)},
                        data_hash(prepared, episodes_dir, ev.split, cell))
    metrics = {"acc": mean, "ci95": ci, "n_episodes": acc.shape[0], "inner_steps": ev.inner_steps,
               "checkpoint": source.name, "checkpoint_iteration": state["iteration"], "per_step": per_step,
               "episodes": guards.episode_set_id(episodes, acc.shape[0]),
               "ensemble_iterations": learner.iterations if ev.ensemble > 1 else None,
               "provenance": record(protocol, params.profile, device, model=source.name)}
    write_json(out_dir / "metrics.json", metrics)
    rows = ["episode,inner_steps,acc"] + [f"{e},{s},{acc[e, s].item():.6g}" for e in range(acc.shape[0])
                                          for s in range(acc.shape[1])]
    write_text(out_dir / "per_episode.csv", "\n".join(rows) + "\n")
    write_text(out_dir / "steps.csv", "inner_steps,acc,ci95\n" + "".join(
        f"{s},{v['acc']:.6g},{v['ci95']:.6g}\n" for s, v in enumerate(per_step.values())))
    return metrics


def plot_run(run_dir: str | Path, path: str | Path, steps: str | Path | None = None) -> None:
    """One run's figure for its MLflow row: the validation and training curves, and, once evaluated,
    test accuracy against inner steps (the report overlays the variants; this is the single run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    run_dir = Path(run_dir)
    curve = pd.read_csv(run_dir / "curve.csv")
    steps = Path(steps) if steps is not None else run_dir / "no-steps"
    fig, axes = plt.subplots(1, 2 if steps.is_file() else 1, figsize=(9 if steps.is_file() else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    for column, label, style in (("meta_train/query_acc", "meta-training query", "-"),
                                 ("meta_val/query_acc", "validation", "o-")):
        if column in curve:
            rows = curve.dropna(subset=[column])   # validation rows only: no gaps drawn as zeros
            ax.plot(rows["iteration"], 100 * rows[column], style, ms=3, label=label)
    ax.set(xlabel="meta-update", ylabel="accuracy %", title=run_dir.name)
    ax.legend(fontsize=8)
    if steps.is_file():
        s = pd.read_csv(steps)
        axes[0][1].errorbar(s["inner_steps"], 100 * s["acc"], yerr=100 * s["ci95"], fmt="o-", ms=3, capsize=2)
        axes[0][1].set(xlabel="inner steps at test time", ylabel="test accuracy % (95% CI)", title="test")
    fig.tight_layout()
    from mamlbench.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def dataset_info(prepared: str | Path) -> dict:
    return read_meta(prepared)
