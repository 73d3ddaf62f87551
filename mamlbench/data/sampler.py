"""Episode sampler for meta-training: the whole split on the device, episodes gathered by index.

A few-shot episode (Vinyals et al. 2016) is N classes, K support and Q query images per class,
labelled 0..N-1 in the order the classes were drawn. Python-per-image pipelines (ImageFolder +
DataLoader) spend their time decoding and collating; here the split is one uint8 tensor
(classes, per_class, C, H, W) already on the training device, so a batch of tasks is:

    indices = sampler.indices(tasks)   # classes, rotations, support and query picks: a few rand calls
    episode = sampler.gather(indices)  # one advanced-indexing gather + one gather that rotates

Rotations (the Omniglot class augmentation of Santoro et al. 2016 and MAML) are applied on the
tensor: each of the four quarter turns is a fixed permutation of the H*W pixels, and every
(task, class) picks its permutation by index.

Example:
    split = load_split("data/prepared/omniglot", "train")
    sampler = EpisodeSampler.from_split(split, n_way=5, k_shot=1, n_query=15, device="cuda", seed=0)
    support_x, support_y, query_x, query_y = sampler.sample(tasks=32)
    # support_x (32, 5*1, 1, 28, 28) float in [0, 1]; support_y (32, 5) long in 0..4
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mamlbench.data.errors import DataError
from mamlbench.data.prepared import SplitData


class Episode(NamedTuple):
    """A batch of tasks; images are float in [0, 1], labels 0..N-1, class-major within a task."""
    support_x: torch.Tensor  # (tasks, N*K, C, H, W)
    support_y: torch.Tensor  # (tasks, N*K) long
    query_x: torch.Tensor    # (tasks, N*Q, C, H, W)
    query_y: torch.Tensor    # (tasks, N*Q) long


class EpisodeIndex(NamedTuple):
    """Which images make a batch of episodes: everything needed to rebuild it exactly."""
    classes: torch.Tensor    # (tasks, N) long: class index in the split
    rotations: torch.Tensor  # (tasks, N) long: quarter turns 0..3
    support: torch.Tensor    # (tasks, N, K) long: sample index within the class
    query: torch.Tensor      # (tasks, N, Q) long


def check_setting(n_classes: int, per_class: int, n_way: int, k_shot: int, n_query: int, where: str = "") -> None:
    """Raise `DataError` when an (N, K, Q) episode cannot be drawn from the split."""
    if n_way > n_classes:
        raise DataError(f"{where}n_way = {n_way}: more than the {n_classes} classes of the split")
    if k_shot + n_query > per_class:
        raise DataError(f"{where}k_shot + n_query = {k_shot + n_query}: more than the {per_class} images per class")
    if n_way < 1 or k_shot < 1 or n_query < 0:
        raise DataError(f"{where}n_way, k_shot, n_query = {n_way}, {k_shot}, {n_query}: must be positive")


def sample_indices(n_chars: int, per_class: int, n_way: int, k_shot: int, n_query: int, tasks: int, *,
                   rotations: tuple[int, ...] = (0,), rotations_as_classes: bool = False,
                   generator: torch.Generator, device: torch.device | str = "cpu") -> EpisodeIndex:
    """Draw `tasks` episodes: N distinct classes, K + Q distinct images of each, one rotation per class.

    With `rotations_as_classes` (Vinyals), the N classes are distinct (character, rotation) pairs;
    otherwise (MAML) they are N distinct characters, each shown at a random rotation.
    """
    pool = n_chars * len(rotations) if rotations_as_classes else n_chars
    check_setting(pool, per_class, n_way, k_shot, n_query)
    # k distinct of n without replacement, batched: the top-k of uniform noise is a uniform k-subset
    picks = torch.rand(tasks, pool, generator=generator, device=device).topk(n_way, dim=1).indices  # (T, N)
    rot_table = torch.tensor(rotations, device=device)
    if rotations_as_classes:
        classes, rot = picks // len(rotations), rot_table[picks % len(rotations)]
    else:
        classes = picks
        rot = rot_table[torch.randint(len(rotations), (tasks, n_way), generator=generator, device=device)]
    samples = torch.rand(tasks, n_way, per_class, generator=generator, device=device)
    samples = samples.topk(k_shot + n_query, dim=2).indices  # (T, N, K+Q)
    return EpisodeIndex(classes, rot, samples[..., :k_shot], samples[..., k_shot:])


def _rotation_perms(h: int, w: int, device) -> torch.Tensor:
    """(4, H*W): pixel order of each quarter turn, so rotating is a gather (square images only)."""
    grid = torch.arange(h * w, device=device).view(h, w)
    return torch.stack([torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)])


def gather(images: torch.Tensor, index: EpisodeIndex, perms: torch.Tensor | None = None) -> Episode:
    """Build the 4 episode tensors from a uint8 split `images` (classes, per_class, C, H, W)."""
    tasks, n_way, k_shot = index.support.shape
    n_query = index.query.shape[2]
    c, h, w = images.shape[2:]
    picks = torch.cat([index.support, index.query], dim=2)          # (T, N, K+Q)
    x = images[index.classes[:, :, None], picks]                    # (T, N, K+Q, C, H, W) uint8
    if bool((index.rotations != 0).any()):
        if h != w:
            raise DataError(f"rotations need square images, got {h}x{w}")
        perms = _rotation_perms(h, w, images.device) if perms is None else perms
        order = perms[index.rotations]                               # (T, N, H*W)
        order = order[:, :, None, None, :].expand(tasks, n_way, k_shot + n_query, c, h * w)
        x = x.reshape(tasks, n_way, k_shot + n_query, c, h * w).gather(-1, order).view(x.shape)
    x = x.float().div_(255)
    labels = torch.arange(n_way, device=images.device)
    support_x = x[:, :, :k_shot].reshape(tasks, n_way * k_shot, c, h, w)
    query_x = x[:, :, k_shot:].reshape(tasks, n_way * n_query, c, h, w)
    support_y = labels.repeat_interleave(k_shot).expand(tasks, -1)   # (T, N*K)
    query_y = labels.repeat_interleave(n_query).expand(tasks, -1)    # (T, N*Q)
    return Episode(support_x, support_y.contiguous(), query_x, query_y.contiguous())


def global_labels(episode: Episode, index: EpisodeIndex, rotations: tuple[int, ...] = (0,),
                  rotations_as_classes: bool = False) -> Episode:
    """`episode` with each image labelled by its class in the split instead of 0..N-1.

    A class is a split class, or a (class, rotation) pair when rotations make classes: class * R + the
    rotation's position in `rotations`. The supervised baseline trains on these labels.
    """
    classes = index.classes
    if rotations_as_classes:
        table = torch.tensor(rotations, device=classes.device)
        position = (index.rotations[..., None] == table).long().argmax(-1)     # (tasks, N)
        classes = classes * len(rotations) + position
    return episode._replace(support_y=classes.gather(1, episode.support_y), query_y=classes.gather(1, episode.query_y))


class EpisodeSampler:
    """Random N-way K-shot episodes from one split held on `device`, seeded by a torch.Generator.

    Args:
        images: uint8 (classes, per_class, C, H, W), moved to `device` once.
        n_way, k_shot, n_query: classes per task, support and query images per class.
        rotations: quarter turns that augment classes; (0,) for none.
        rotations_as_classes: (class, rotation) pairs are classes (Vinyals) instead of a random
            rotation per distinct class (MAML).
        device: where the split lives and episodes are built (the training device).
        seed: seeds the sampler's own generator; two samplers with one seed give the same episodes.
    """

    def __init__(self, images: torch.Tensor, n_way: int, k_shot: int, n_query: int, *,
                 rotations: tuple[int, ...] = (0,), rotations_as_classes: bool = False,
                 device: torch.device | str = "cpu", seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 5:
            raise DataError(f"images must be uint8 (classes, per_class, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.to(device)
        self.device = self.images.device
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.rotations, self.rotations_as_classes = tuple(rotations), rotations_as_classes
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        h, w = images.shape[-2:]
        self._perms = _rotation_perms(h, w, self.device) if h == w else None
        pool = images.shape[0] * (len(self.rotations) if rotations_as_classes else 1)
        check_setting(pool, images.shape[1], n_way, k_shot, n_query)

    @classmethod
    def from_split(cls, split: SplitData, n_way: int, k_shot: int, n_query: int, *,
                   device: torch.device | str = "cpu", seed: int = 0) -> "EpisodeSampler":
        """A sampler over a `load_split` result, with that split's rotation scheme."""
        return cls(split.images, n_way, k_shot, n_query, rotations=split.rotations,
                   rotations_as_classes=split.rotations_as_classes, device=device, seed=seed)

    def indices(self, tasks: int) -> EpisodeIndex:
        return sample_indices(self.images.shape[0], self.images.shape[1], self.n_way, self.k_shot, self.n_query,
                              tasks, rotations=self.rotations, rotations_as_classes=self.rotations_as_classes,
                              generator=self.generator, device=self.device)

    def gather(self, index: EpisodeIndex, global_classes: bool = False) -> Episode:
        """The episodes of `index`; with `global_classes`, labelled by class in the split (`global_labels`)."""
        episode = gather(self.images, index, self._perms)
        if global_classes:
            episode = global_labels(episode, index, self.rotations, self.rotations_as_classes)
        return episode

    def sample(self, tasks: int) -> Episode:
        """`tasks` fresh episodes: support_x (tasks, N*K, C, H, W), support_y (tasks, N*K), query alike."""
        return self.gather(self.indices(tasks))
