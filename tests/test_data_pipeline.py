"""The data stages end to end: on a made-up mirror (fast) and on the real Omniglot archives (slow)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import write_params
from data_fakes import ROOT, SHARED, make_mirror
from mamlbench.data.episodes import load_episodes, materialize
from mamlbench.data.prepared import load_split, split_counts

REAL = SHARED / "omniglot"


def stage(name: str, *args, cwd, mirror, check=True):
    env = {**os.environ, "MAMLBENCH_DATA_MIRROR": str(mirror), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)], cwd=cwd,
                         capture_output=True, text=True, env=env, timeout=600)
    if check and out.returncode:
        raise AssertionError(f"stage {name} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def run_stages(tmp_path, mirror, overrides=None):
    write_params(tmp_path / "params.yaml", overrides or {})
    stage("download", "omniglot", "data/raw/omniglot", cwd=tmp_path, mirror=mirror)
    stage("prepare", "omniglot", "data/raw/omniglot", "data/prepared/omniglot", cwd=tmp_path, mirror=mirror)
    stage("episodize", "omniglot", "data/prepared/omniglot", "data/episodes/omniglot", cwd=tmp_path, mirror=mirror)
    return tmp_path / "data"


def test_stages_on_a_made_up_mirror(tmp_path):
    mirror = make_mirror(tmp_path)
    small = {"data": {"omniglot": {"maml_split": [5, 2], "episodes": [{"n_way": 2, "k_shot": 1, "n_query": 2}]},
                      "episodes": {"n_test": 5, "n_val": 3}}}
    write_params(tmp_path / "params.yaml", small)
    stage("download", "omniglot", "raw", cwd=tmp_path, mirror=mirror)
    failed = stage("prepare", "omniglot", "raw", "prep", cwd=tmp_path, mirror=mirror, check=False)
    # the made-up mirror is not the full Omniglot: one line, exit 2, nothing written
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert "expected 964 characters, found 6" in failed.stderr and not (tmp_path / "prep").exists()
    bad = stage("episodize", "omniglot", "prep", "ep", cwd=tmp_path, mirror=mirror, check=False)
    assert bad.returncode == 2 and "no prepared data" in bad.stderr


@pytest.mark.slow
def test_real_omniglot_download_prepare_episodize(tmp_path):
    if not all((REAL / f"{a}.zip").is_file() for a in ("images_background", "images_evaluation")):
        pytest.skip(f"real Omniglot archives absent from {REAL} (the shared data mirror beside this checkout)")
    data = run_stages(tmp_path, SHARED)
    prep = data / "prepared" / "omniglot"
    counts = split_counts(prep)
    assert {k: counts[k] for k in ("maml", "vinyals")} == {"maml": {"train": 1100, "val": 100, "test": 423},
                                                          "vinyals": {"train": 1028, "val": 172, "test": 423}}
    # Lake et al.: the 659 evaluation characters test; 5 whole background alphabets validate
    assert counts["lake"]["test"] == 659 and counts["lake"]["train"] + counts["lake"]["val"] == 964
    val = load_split(prep, "val", "lake").classes
    assert len({c["alphabet"] for c in val}) == 5 and all(c["archive"] == "images_background" for c in val)
    test = load_split(prep, "test")
    assert test.images.shape == (423, 20, 1, 28, 28)
    # strokes are the foreground: a character covers a minority of the 28x28 pixels
    ink = (test.images > 127).float().mean()
    assert 0.03 < float(ink) < 0.3
    path = data / "episodes" / "omniglot" / "maml" / "test-5way-1shot-15query.pt"
    episodes = load_episodes(path, prep)
    assert episodes["n_episodes"] == 600
    sx, sy, qx, qy = next(materialize(episodes, test, chunk=600))
    assert sx.shape == (600, 5, 1, 28, 28) and qx.shape == (600, 75, 1, 28, 28)
    # the episode grid command writes a PNG people can look at
    png = tmp_path / "episode.png"
    out = subprocess.run([sys.executable, "-m", "mamlbench.cli", "data", "show", str(prep), str(png)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    with Image.open(png) as im:
        assert im.size[0] > 5 * 28 and im.size[1] > 5 * 28
