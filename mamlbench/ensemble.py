"""Top-k validation checkpoints and their ensemble at test time.

MAML++ reports the test accuracy of an ensemble: its 5 best epochs by validation accuracy, each
adapted to the test task on its own, their query logits averaged before the argmax
(experiment_builder.py `evaluated_test_set_using_the_best_models`). Training keeps the k best
checkpoints in `<run>/topk/` (one file per validated iteration, ranked by `index.json`); evaluation
wraps the members in `Ensemble`, which answers `trajectory` like one learner.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mamlbench.io import load_torch, save_torch, write_json

TOPK_DIR = "topk"


def _index_path(run_dir: Path) -> Path:
    return Path(run_dir) / TOPK_DIR / "index.json"


def read_top_k(run_dir: str | Path) -> list[dict]:
    """The kept checkpoints, best first: [{"acc", "iteration", "file"}]; [] when none was kept."""
    path = _index_path(Path(run_dir))
    return json.loads(path.read_text()) if path.is_file() else []


def keep_top_k(run_dir: str | Path, k: int, acc: float, iteration: int, state: Callable[[], dict]) -> bool:
    """Keep the checkpoint of `iteration` if its validation `acc` is among the k best so far.

    `state()` is called only when it is kept. Ties keep the earlier checkpoint ahead. Entries from
    `iteration` on are dropped first: a resumed run validates them again. Returns whether it was kept.
    """
    run_dir = Path(run_dir)
    kept = [e for e in read_top_k(run_dir) if e["iteration"] < iteration]
    ranked = sorted(kept + [{"acc": float(acc), "iteration": int(iteration), "file": f"iter-{iteration:08d}.pt"}],
                    key=lambda e: (-round(e["acc"], 6), e["iteration"]))  # float noise is a tie
    top = ranked[:k]
    entered = any(e["iteration"] == iteration for e in top)
    folder = run_dir / TOPK_DIR
    if entered:
        save_torch(folder / f"iter-{iteration:08d}.pt", state())
    write_json(_index_path(run_dir), top)  # the index moves before any file goes
    for path in folder.glob("iter-*.pt"):
        if path.name not in {e["file"] for e in top}:
            path.unlink(missing_ok=True)
    return entered


def load_top_k(run_dir: str | Path, k: int) -> list[dict]:
    """The states of the k best kept checkpoints, best first; ValueError when fewer were kept."""
    entries = read_top_k(run_dir)[:k]
    if len(entries) < k:
        raise ValueError(f"{Path(run_dir) / TOPK_DIR}: {len(entries)} checkpoint(s) kept, the ensemble needs {k} "
                         f"(train with the same evaluate.ensemble, validating at least {k} times)")
    return [load_torch(Path(run_dir) / TOPK_DIR / e["file"]) for e in entries]


def from_top_k(run_dir: str | Path, k: int, build: Callable[[], nn.Module]) -> "Ensemble":
    """The ensemble of the k best kept checkpoints; `build()` makes one fresh learner to load each into."""
    states = load_top_k(run_dir, k)
    members = [build() for _ in states]
    for member, state in zip(members, states):
        member.load_state_dict(state["learner"])
    return Ensemble(members, [s["iteration"] for s in states])


def _outputs(outputs: Tensor, labels: Tensor) -> Tensor:
    return outputs


class Ensemble(nn.Module):
    """Members adapted to each task independently; `trajectory` scores their mean query logits."""

    def __init__(self, members: Sequence[nn.Module], iterations: Sequence[int] = ()):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.iterations = list(iterations)  # of the members' checkpoints, when known

    @torch.no_grad()
    def trajectory(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                   inner_steps: int, metric: Callable[[Tensor, Tensor], Tensor] | None = None,
                   inner_lr=None) -> Tensor:
        """As `MAML.trajectory`: metric of each task after 0..inner_steps steps, (tasks, steps+1)."""
        logits = torch.stack([m.trajectory(support_x, support_y, query_x, query_y, inner_steps=inner_steps,
                                           metric=_outputs, inner_lr=inner_lr) for m in self.members]).mean(0)
        metric = metric or self.members[0].loss_fn
        return torch.stack([torch.stack([metric(step, labels) for step in task]) for task, labels in zip(logits, query_y)])
