"""A PNG grid of one episode, for people to check what the sampler feeds the learner.

One row per class (label 0..N-1): its K support images, a gap, then its Q query images.
"""
from __future__ import annotations

import os

from PIL import Image, ImageDraw

from mamlbench.data.sampler import Episode
from mamlbench.io import atomic_path


def episode_grid(episode: Episode, task: int = 0, scale: int = 3, pad: int = 2) -> Image.Image:
    support_x, support_y, query_x, query_y = (t[task].cpu() for t in episode)
    n_way = int(support_y.max()) + 1
    k_shot, n_query = len(support_y) // n_way, len(query_y) // n_way
    c, h, w = support_x.shape[1:]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    left, top, gap = 28, 16, 16
    width = left + (k_shot + n_query) * cell_w + gap
    canvas = Image.new("RGB", (width, top + n_way * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 2), "support", fill="black")
    draw.text((left + k_shot * cell_w + gap, 2), "query", fill="black")

    def paste(x, row, col, shift):
        array = (x.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()  # (H, W, C)
        image = Image.fromarray(array[..., 0] if c == 1 else array).convert("RGB")
        canvas.paste(image.resize((w * scale, h * scale), Image.Resampling.NEAREST),
                     (left + shift + col * cell_w, top + row * cell_h))

    for label in range(n_way):
        draw.text((4, top + label * cell_h + cell_h // 2 - 6), str(label), fill="black")
        for col, x in enumerate(support_x[support_y == label]):
            paste(x, label, col, 0)
        for col, x in enumerate(query_x[query_y == label]):
            paste(x, label, k_shot + col, gap)
    return canvas


def save_episode_grid(episode: Episode, path: str | os.PathLike, task: int = 0) -> None:
    with atomic_path(path) as tmp:
        episode_grid(episode, task).save(tmp, format="PNG")
