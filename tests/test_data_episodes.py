"""Fixed evaluation episodes: stored indices, stale detection, materialising, bad settings."""
from __future__ import annotations

import pytest
import torch

from data_fakes import COUNTS, ROOT, TREE, make_tree
from mamlbench.config import load_params
from mamlbench.data.episodes import (StaleEpisodesError, episode_index, episodize, ensure_episodes,
                                     load_episodes, materialize)
from mamlbench.data.errors import DataError
from mamlbench.data.omniglot import prepare_omniglot
from mamlbench.data.params import DataParams, EpisodeSetting
from mamlbench.data.prepared import load_split
from mamlbench.data.sampler import gather
from mamlbench.schema import ConfigError, build


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    raw = make_tree(tmp / "raw")
    prepare_omniglot(raw, tmp / "prep", archives=list(TREE), maml_sizes=(5, 2), expected=COUNTS)
    return tmp / "prep"


def _episodize(prepared, out, settings, **kw):
    kw = dict(splits=["val", "test"], n_val=7, n_test=11, seed=3) | kw
    return episodize(prepared, out, settings, **kw)


def test_episodize_writes_and_keeps(prepared, tmp_path):
    paths = _episodize(prepared, tmp_path / "ep", [EpisodeSetting(2, 1, 3)])
    assert [p.relative_to(tmp_path / "ep").as_posix() for p in paths] == [
        "maml/val-2way-1shot-3query.pt", "maml/test-2way-1shot-3query.pt"]
    episodes = load_episodes(paths[1], prepared)
    assert episodes["n_episodes"] == 11 and episodes["classes"].shape == (11, 2)
    assert episodes["support"].shape == (11, 2, 1) and episodes["query"].shape == (11, 2, 3)
    assert episodes["seed"] == 3 and len(episodes["prepared_hash"]) == 64
    mtime = paths[1].stat().st_mtime_ns
    _episodize(prepared, tmp_path / "ep", [EpisodeSetting(2, 1, 3)])  # current: kept as is
    assert paths[1].stat().st_mtime_ns == mtime
    again = _episodize(prepared, tmp_path / "ep2", [EpisodeSetting(2, 1, 3)])  # same draws anywhere
    assert torch.equal(load_episodes(again[1], prepared)["support"], episodes["support"])


def test_materialize_in_chunks_matches_one_gather(prepared, tmp_path):
    (path,) = _episodize(prepared, tmp_path / "ep", [EpisodeSetting(3, 2, 2)], splits=["test"])
    episodes = load_episodes(path, prepared)
    split = load_split(prepared, "test")
    chunks = list(materialize(episodes, split, chunk=4))
    assert [c.support_x.shape[0] for c in chunks] == [4, 4, 3]
    whole = gather(split.images, episode_index(episodes))
    for got, want in zip(zip(*chunks), whole):
        torch.testing.assert_close(torch.cat(got), want)
    assert chunks[0].support_x.shape[1:] == (6, 1, 28, 28) and chunks[0].query_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="do not belong"):
        next(materialize(episodes, load_split(prepared, "val")))


def test_stale_episodes_detected_and_rebuilt(tmp_path):
    raw = make_tree(tmp_path / "raw")
    prep = tmp_path / "prep"
    prepare_omniglot(raw, prep, archives=list(TREE), maml_sizes=(5, 2), expected=COUNTS)
    (path,) = _episodize(prep, tmp_path / "ep", [EpisodeSetting(2, 1, 1)], splits=["test"])
    old = load_episodes(path, prep)
    # the prepared data changes (other split seed: other test characters)
    prepare_omniglot(raw, prep, archives=list(TREE), maml_sizes=(5, 2), split_seed=9, expected=COUNTS)
    with pytest.raises(StaleEpisodesError, match="stale"):
        load_episodes(path, prep)
    episodes, rebuilt = ensure_episodes(path, prep, load_split(prep, "test"), 2, 1, 1, 11, 3)
    assert rebuilt and episodes["prepared_hash"] != old["prepared_hash"]
    assert load_episodes(path, prep)["prepared_hash"] == episodes["prepared_hash"]


def test_bad_setting_writes_nothing(prepared, tmp_path):
    out = tmp_path / "ep"
    with pytest.raises(DataError, match="n_way = 3: more than the 2 classes"):  # val has 2 characters
        _episodize(prepared, out, [EpisodeSetting(2, 1, 1), EpisodeSetting(3, 1, 1)])
    with pytest.raises(DataError, match="k_shot \\+ n_query = 21"):
        _episodize(prepared, out, [EpisodeSetting(2, 1, 1), EpisodeSetting(2, 6, 15)])
    assert not out.exists()


@pytest.mark.parametrize("data, message", [
    ({"omniglot": {"episodes": [{"n_way": 101, "k_shot": 1, "n_query": 1}]}},
     "data.omniglot.episodes[0].n_way = 101: more than the 100 classes of split 'val'"),
    ({"omniglot": {"episodes": [{"n_way": 5, "k_shot": 6, "n_query": 15}]}},
     "data.omniglot.episodes[0]: k_shot + n_query = 21 > 20 images per class"),
    ({"mini_imagenet": {"episodes": [{"n_way": 17, "k_shot": 1, "n_query": 1}]}},
     "data.mini_imagenet.episodes[0].n_way = 17: more than the 16 classes of split 'val'"),
    ({"omniglot": {"scheme": "ravi"}}, "data.omniglot.scheme = 'ravi': must be one of 'maml', 'vinyals'"),
    ({"opt_in": ["imagenet"]}, "data.opt_in[0] = 'imagenet': must be one of 'mini-imagenet'"),
    ({"episodes": {"splits": ["dev"]}}, "data.episodes.splits = 'dev': must be one of 'train', 'val', 'test'"),
    ({"omniglot": {"maml_split": [1500, 200]}}, "data.omniglot.maml_split = [1500, 200]: leaves no meta-test"),
])
def test_params_reject_bad_settings(data, message):
    with pytest.raises(ConfigError) as err:
        build(DataParams, data, "data")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_vinyals_counts_rotations_as_classes():
    sizes = build(DataParams, {"omniglot": {"scheme": "vinyals"}}, "data").omniglot.split_sizes()
    assert sizes == {"train": 4112, "val": 688, "test": 1692}
    build(DataParams, {"omniglot": {"scheme": "vinyals", "episodes": [{"n_way": 150, "k_shot": 1, "n_query": 1}]}}, "data")


def test_repo_params_load():
    data = load_params(ROOT / "params.yaml").data
    assert data.opt_in == [] and data.omniglot.scheme == "maml" and data.episodes.n_test == 600


def test_lake_scheme_needs_the_evaluation_archive():
    with pytest.raises(ConfigError, match="add images_evaluation to data.omniglot.archives"):
        build(DataParams, {"omniglot": {"scheme": "lake", "archives": ["images_background"]}}, "data")
    sizes = build(DataParams, {"omniglot": {"scheme": "lake", "lake_val_alphabets": 2}}, "data").omniglot.split_sizes()
    assert sizes == {"train": 964 - 2 * 55, "val": 2 * 14, "test": 659}   # the smallest case, for size checks
