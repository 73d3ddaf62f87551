"""Episodize stage: fixed evaluation episodes, stored as index arrays.

Every model is evaluated on the very same episodes, so comparisons between variants are paired
(the per-episode accuracy differences have far less variance than two independent samples). An
episode file holds only indices (classes, rotations, support and query picks, as
`sampler.EpisodeIndex`), the seed they were drawn with, the setting, and `content_hash` of the
prepared data: if the prepared data changes, the indices may point at other images, so such a file
is stale; `load_episodes` refuses it and `ensure_episodes` rebuilds it.

Layout: `<out>/<scheme>/<split>-<N>way-<K>shot-<Q>query.pt`, e.g.
`data/episodes/omniglot/maml/test-5way-1shot-15query.pt`.

Example:
    split = load_split("data/prepared/omniglot", "test")
    fixed = load_episodes("data/episodes/omniglot/maml/test-5way-1shot-15query.pt", "data/prepared/omniglot")
    for support_x, support_y, query_x, query_y in materialize(fixed, split, chunk=100, device="cuda"):
        ...  # support_x (<=100, 5, 1, 28, 28)
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterator

import torch

from mamlbench.data.errors import DataError
from mamlbench.data.prepared import SplitData, content_hash, load_split
from mamlbench.data.sampler import Episode, EpisodeIndex, check_setting, gather, sample_indices
from mamlbench.io import load_torch, save_torch

FORMAT = 1


class StaleEpisodesError(DataError):
    """The episode file was drawn from other prepared data (or other settings)."""


def episode_path(out_dir: str | os.PathLike, scheme: str, split: str, n_way: int, k_shot: int, n_query: int) -> Path:
    return Path(out_dir) / scheme / f"{split}-{n_way}way-{k_shot}shot-{n_query}query.pt"


def derive_seed(seed: int, dataset: str, scheme: str, split: str, n_way: int, k_shot: int, n_query: int) -> int:
    """One seed per episode file, so that settings do not share random streams."""
    key = f"{dataset}/{scheme}/{split}/{n_way}/{k_shot}/{n_query}".encode()
    return (seed * 1_000_003 + zlib.crc32(key)) % (2 ** 63)


def make_episodes(split: SplitData, n_way: int, k_shot: int, n_query: int, n_episodes: int, seed: int,
                  prepared_hash: str) -> dict:
    """Draw `n_episodes` fixed episodes on the CPU (the same draws on any machine)."""
    derived = derive_seed(seed, split.dataset, split.scheme, split.split, n_way, k_shot, n_query)
    index = sample_indices(len(split.classes), split.images.shape[1], n_way, k_shot, n_query, n_episodes,
                           rotations=split.rotations, rotations_as_classes=split.rotations_as_classes,
                           generator=torch.Generator().manual_seed(derived))
    small = dict(classes=index.classes.int(), rotations=index.rotations.to(torch.int8),
                 support=index.support.short(), query=index.query.short())
    return dict(format=FORMAT, dataset=split.dataset, scheme=split.scheme, split=split.split, n_way=n_way,
                k_shot=k_shot, n_query=n_query, n_episodes=n_episodes, seed=seed, derived_seed=derived,
                prepared_hash=prepared_hash, **small)


def load_episodes(path: str | os.PathLike, prepared_dir: str | os.PathLike) -> dict:
    """Load a fixed episode file; raise `StaleEpisodesError` when the prepared data has changed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such episode file (run the episodize stage)")
    episodes = load_torch(path)
    if episodes.get("format") != FORMAT or episodes.get("prepared_hash") != content_hash(prepared_dir):
        raise StaleEpisodesError(f"{path}: stale, drawn from other prepared data than {prepared_dir}")
    return episodes


def ensure_episodes(path: str | os.PathLike, prepared_dir: str | os.PathLike, split: SplitData, n_way: int,
                    k_shot: int, n_query: int, n_episodes: int, seed: int) -> tuple[dict, bool]:
    """Load the episode file if it is current and matches the request, else (re)build it.

    Returns (episodes, rebuilt).
    """
    try:
        episodes = load_episodes(path, prepared_dir)
        wanted = dict(scheme=split.scheme, split=split.split, n_way=n_way, k_shot=k_shot, n_query=n_query,
                      n_episodes=n_episodes, seed=seed)
        if all(episodes.get(k) == v for k, v in wanted.items()):
            return episodes, False
    except DataError:
        pass
    episodes = make_episodes(split, n_way, k_shot, n_query, n_episodes, seed, content_hash(prepared_dir))
    save_torch(path, episodes)
    return episodes, True


def episode_index(episodes: dict, start: int = 0, stop: int | None = None) -> EpisodeIndex:
    """Episodes [start:stop] of a stored file as an `EpisodeIndex` of long tensors."""
    part = slice(start, stop)
    return EpisodeIndex(*(episodes[k][part].long() for k in ("classes", "rotations", "support", "query")))


def materialize(episodes: dict, split: SplitData, *, chunk: int = 100,
                device: torch.device | str = "cpu") -> Iterator[Episode]:
    """Yield the stored episodes as `Episode` tensors, `chunk` tasks at a time, on `device`.

    The split is moved to `device` once; each chunk is one gather, as in training.
    """
    if (split.dataset, split.scheme, split.split) != (episodes["dataset"], episodes["scheme"], episodes["split"]):
        raise DataError(f"episodes of {episodes['dataset']}/{episodes['scheme']}/{episodes['split']} "
                        f"do not belong to split {split.dataset}/{split.scheme}/{split.split}")
    images = split.images.to(device)
    for start in range(0, episodes["n_episodes"], chunk):
        index = episode_index(episodes, start, start + chunk)
        yield gather(images, EpisodeIndex(*(t.to(images.device) for t in index)))


def episodize(prepared_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: list, *,
              splits: list[str], n_val: int, n_test: int, seed: int, scheme: str | None = None) -> list[Path]:
    """Build (or keep, when current) the fixed episodes of every (split, setting) pair.

    Args:
        settings: objects with n_way, k_shot, n_query (e.g. `EpisodeSetting`).
        splits: which splits get episodes; val gets `n_val` episodes, test `n_test`.
        scheme: class split scheme; None: the prepared data's default.
    Returns the episode files, in order.
    """
    loaded = [load_split(prepared_dir, name, scheme) for name in splits]
    for split in loaded:  # check every setting before writing any file
        for s in settings:
            where = f"{split.dataset}/{split.scheme}/{split.split}: "
            check_setting(split.n_classes, split.images.shape[1], s.n_way, s.k_shot, s.n_query, where)
    paths = []
    for split in loaded:
        n = n_test if split.split == "test" else n_val
        for s in settings:
            path = episode_path(out_dir, split.scheme, split.split, s.n_way, s.k_shot, s.n_query)
            ensure_episodes(path, prepared_dir, split, s.n_way, s.k_shot, s.n_query, n, seed)
            paths.append(path)
    return paths
