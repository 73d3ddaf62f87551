"""`mamlbench data ...` commands: the data stages by hand, plus looking at what they made.

    mamlbench data download omniglot data/raw/omniglot
    mamlbench data prepare omniglot data/raw/omniglot data/prepared/omniglot
    mamlbench data episodize omniglot data/prepared/omniglot data/episodes/omniglot
    mamlbench data info data/prepared/omniglot
    mamlbench data show data/prepared/omniglot episode.png --n-way 5 --k-shot 1
"""
from __future__ import annotations

from pathlib import Path

import typer

from mamlbench.config import load_params

app = typer.Typer(help="Download, prepare and episodize the few-shot datasets.", no_args_is_help=True)

PARAMS = typer.Option("params.yaml", "--params", help="The params file to read the `data` section from.")


@app.command()
def download(dataset: str, out: Path, params: Path = PARAMS):
    """Fetch, verify and extract DATASET's archives into OUT (omniglot, mini-imagenet: locate your copy,
    imagefolder: locate data.imagefolder.source, or fetch and extract it when it is an archive)."""
    from mamlbench.data.pipeline import run_download
    run_download(dataset, out, load_params(params).data)


@app.command()
def prepare(dataset: str, raw: Path, out: Path, params: Path = PARAMS):
    """Decode RAW into OUT/images.npy (uint8) and OUT/meta.json; print classes per split."""
    from mamlbench.data.pipeline import run_prepare
    from mamlbench.guards import check_writable_dir
    check_writable_dir(out, "prepare's OUT")  # a file in the way fails now, not after decoding
    run_prepare(dataset, raw, out, load_params(params).data)
    info(out)


@app.command()
def episodize(dataset: str, prepared: Path, out: Path, params: Path = PARAMS):
    """Write the fixed evaluation episodes of every setting in params (kept when current)."""
    from mamlbench.data.pipeline import run_episodize
    for path in run_episodize(dataset, prepared, out, load_params(params).data):
        typer.echo(path)


@app.command()
def info(prepared: Path):
    """Classes per split, for each split scheme of a prepared dataset."""
    from mamlbench.data.prepared import read_meta, split_counts
    meta = read_meta(prepared)
    typer.echo(f"{meta['dataset']}: images {tuple(meta['shape'])}, default scheme {meta['scheme']}")
    for scheme, counts in split_counts(prepared).items():
        rot = len(meta["rotations"]) if meta["rotations_as_classes"][scheme] else 1
        line = ", ".join(f"{s} {counts[s]}" + (f" (x{rot} rotations = {counts[s] * rot} classes)" if rot > 1 else "")
                         for s in ("train", "val", "test"))
        typer.echo(f"  {scheme}: {line}")


@app.command()
def show(prepared: Path, out: Path, split: str = "train", scheme: str = typer.Option(None, help="maml or vinyals"),
         n_way: int = 5, k_shot: int = 1, n_query: int = 5, seed: int = 0):
    """Write a PNG grid of one sampled episode: a row per class, support then query."""
    from mamlbench.data.grid import save_episode_grid
    from mamlbench.data.prepared import load_split
    from mamlbench.data.sampler import EpisodeSampler
    from mamlbench.guards import check_new_file
    check_new_file(out, "show's OUT")
    sampler = EpisodeSampler.from_split(load_split(prepared, split, scheme), n_way, k_shot, n_query, seed=seed)
    save_episode_grid(sampler.sample(1), out)
    typer.echo(out)
