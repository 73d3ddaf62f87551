"""Episodes per second: `EpisodeSampler` against a torchvision ImageFolder + DataLoader pipeline.

Both draw 5-way 1-shot 15-query Omniglot episodes with a random quarter turn per class, from the
same prepared split, in this one process, in meta-batches of `--tasks`. The baseline is the usual
episodic pipeline: the split written out as one PNG per image (class folders), a batch sampler
yielding one episode's indices, PIL decoding + ToTensor per image, rotation and relabelling in
`collate_fn`.

    python benchmarks/sampler.py data/prepared/omniglot [--split test] [--workers 0] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mamlbench.data.prepared import load_split
from mamlbench.data.sampler import EpisodeSampler


class EpisodeBatches:
    """Batch sampler: each batch is the dataset indices of one N-way episode, class-major."""

    def __init__(self, targets, n_way, shots, episodes, seed):
        self.by_class = {}
        for i, t in enumerate(targets):
            self.by_class.setdefault(t, []).append(i)
        self.classes = sorted(self.by_class)
        self.n_way, self.shots, self.episodes = n_way, shots, episodes
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.episodes

    def __iter__(self):
        for _ in range(self.episodes):
            picks = torch.randperm(len(self.classes), generator=self.g)[:self.n_way].tolist()
            batch = []
            for c in picks:
                members = self.by_class[self.classes[c]]
                batch += [members[j] for j in torch.randperm(len(members), generator=self.g)[:self.shots].tolist()]
            yield batch


def make_collate(n_way, k_shot, n_query):
    def collate(items):
        x = torch.stack([img for img, _ in items]).view(n_way, k_shot + n_query, *items[0][0].shape)
        x = torch.stack([torch.rot90(x[n], int(torch.randint(4, ())), dims=(-2, -1)) for n in range(n_way)])
        labels = torch.arange(n_way)[:, None]
        return (x[:, :k_shot].flatten(0, 1), labels.expand(n_way, k_shot).flatten(),
                x[:, k_shot:].flatten(0, 1), labels.expand(n_way, n_query).flatten())
    return collate


def write_image_folder(images: torch.Tensor, root: Path) -> None:
    for c in range(images.shape[0]):
        folder = root / f"{c:04d}"
        folder.mkdir(parents=True)
        for s in range(images.shape[1]):
            Image.fromarray(images[c, s, 0].numpy()).save(folder / f"{s:02d}.png")


def time_it(step, batches: int, repeats: int, tasks: int) -> list[float]:
    step()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            step()
        rates.append(batches * tasks / (time.perf_counter() - start))
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prepared", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n_way, k_shot, n_query = 5, 1, 15
    split = load_split(args.prepared, args.split)
    torch.set_num_threads(1)  # a fair, quiet comparison on a shared machine

    sampler = EpisodeSampler(split.images, n_way, k_shot, n_query, rotations=(0, 1, 2, 3), seed=0)
    ours = time_it(lambda: sampler.sample(args.tasks), batches=20, repeats=args.repeats, tasks=args.tasks)

    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder(split.images, Path(tmp))
        folder = datasets.ImageFolder(tmp, transform=transforms.ToTensor(), loader=lambda p: Image.open(p).convert("L"))
        loader = DataLoader(folder, batch_sampler=EpisodeBatches(folder.targets, n_way, k_shot + n_query, 10 ** 9, 0),
                            collate_fn=make_collate(n_way, k_shot, n_query), num_workers=args.workers)
        stream = iter(loader)

        def baseline_step():
            episodes = [next(stream) for _ in range(args.tasks)]
            return tuple(torch.stack(parts) for parts in zip(*episodes))  # (tasks, N*K, C, H, W), ...

        theirs = time_it(baseline_step, batches=2, repeats=args.repeats, tasks=args.tasks)

    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"split {split.dataset}/{split.scheme}/{split.split}: {tuple(split.images.shape)}, "
          f"{n_way}-way {k_shot}-shot {n_query}-query, {args.tasks} tasks per batch, 1 thread, "
          f"{args.workers} DataLoader workers")
    print(f"EpisodeSampler:           median {a:9.1f} episodes/s  (runs: {', '.join(f'{r:.0f}' for r in ours)})")
    print(f"ImageFolder + DataLoader: median {b:9.1f} episodes/s  (runs: {', '.join(f'{r:.0f}' for r in theirs)})")
    print(f"ratio: {a / b:.1f}x")


if __name__ == "__main__":
    main()
