"""Episode sampler: shapes, labels, class consistency, rotations on the tensor, seeding."""
from __future__ import annotations

import pytest
import torch

from mamlbench.data.errors import DataError
from mamlbench.data.sampler import EpisodeSampler, gather, sample_indices


def coded_images(n_classes=12, per_class=20, size=6) -> torch.Tensor:
    """uint8 (classes, per_class, 1, size, size): pixel (0, 0) = class, (0, 1) = sample; the rest 0."""
    x = torch.zeros(n_classes, per_class, 1, size, size, dtype=torch.uint8)
    x[:, :, 0, 0, 0] = torch.arange(n_classes)[:, None]
    x[:, :, 0, 0, 1] = torch.arange(per_class)[None, :]
    return x


def test_shapes_labels_and_classes():
    images = coded_images()
    sampler = EpisodeSampler(images, n_way=5, k_shot=2, n_query=3, seed=0)
    sx, sy, qx, qy = sampler.sample(tasks=4)
    assert sx.shape == (4, 10, 1, 6, 6) and qx.shape == (4, 15, 1, 6, 6)
    assert sx.dtype == torch.float32 and sy.dtype == torch.long
    assert sy[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and qy.shape == (4, 15)
    for t in range(4):
        s_class = (sx[t, :, 0, 0, 0] * 255).round().long()
        q_class = (qx[t, :, 0, 0, 0] * 255).round().long()
        for label in range(5):  # one source class per label, shared by support and query
            assert len(set(s_class[sy[t] == label].tolist() + q_class[qy[t] == label].tolist())) == 1
        assert len(set(s_class.tolist())) == 5  # N distinct classes
        samples = [(int(c), int(s)) for c, s in zip(torch.cat([s_class, q_class]),
                                                    (torch.cat([sx[t], qx[t]])[:, 0, 0, 1] * 255).round())]
        assert len(set(samples)) == 25  # support and query never share an image


def test_seeded_and_reproducible():
    images = coded_images()
    a = EpisodeSampler(images, 5, 1, 2, seed=7).sample(3)
    b = EpisodeSampler(images, 5, 1, 2, seed=7).sample(3)
    c = EpisodeSampler(images, 5, 1, 2, seed=8).sample(3)
    torch.testing.assert_close(a.support_x, b.support_x)
    assert not torch.equal(a.support_x, c.support_x)


def test_rotation_matches_rot90():
    images = torch.randint(0, 256, (4, 5, 2, 7, 7), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    index = sample_indices(4, 5, 3, 1, 1, 6, rotations=(0, 1, 2, 3), generator=g)
    episode = gather(images, index)
    for t in range(6):
        for n in range(3):
            raw = images[index.classes[t, n], index.support[t, n, 0]].float() / 255
            expected = torch.rot90(raw, int(index.rotations[t, n]), dims=(-2, -1))
            torch.testing.assert_close(episode.support_x[t, n], expected)
    assert set(index.rotations.flatten().tolist()) == {0, 1, 2, 3}


def test_rotations_as_classes_draws_distinct_pairs():
    g = torch.Generator().manual_seed(1)
    index = sample_indices(2, 20, 8, 1, 1, 50, rotations=(0, 1, 2, 3), rotations_as_classes=True, generator=g)
    pairs = index.classes * 4 + index.rotations
    assert all(len(set(row.tolist())) == 8 for row in pairs)     # 8 of the 2 x 4 (character, rotation) classes
    with pytest.raises(DataError, match="more than the 8 classes"):
        sample_indices(2, 20, 9, 1, 1, 1, rotations=(0, 1, 2, 3), rotations_as_classes=True, generator=g)


def test_bad_settings():
    images = coded_images(n_classes=4)
    with pytest.raises(DataError, match="n_way = 5: more than the 4 classes"):
        EpisodeSampler(images, 5, 1, 1)
    with pytest.raises(DataError, match="k_shot \\+ n_query = 21: more than the 20 images per class"):
        EpisodeSampler(images, 2, 1, 20)
    with pytest.raises(DataError, match="uint8"):
        EpisodeSampler(images.float(), 2, 1, 1)


def test_uniform_class_use():
    """Every class is drawn about equally often (the top-k-of-noise trick is unbiased)."""
    sampler = EpisodeSampler(coded_images(n_classes=10), 5, 1, 1, seed=0)
    counts = torch.bincount(sampler.indices(4000).classes.flatten(), minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05
