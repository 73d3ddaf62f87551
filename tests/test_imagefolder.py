"""Any folder of class folders as a few-shot dataset: real PNG/JPEG files written here, located or
extracted from an archive, decoded, split by lists or fractions, episodized, trained and evaluated,
through the CLI and through `dvc repro`."""
from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT
from mamlbench.data.errors import DataError
from mamlbench.data.imagefolder import locate_imagefolder, prepare_imagefolder
from mamlbench.schema import ConfigError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (128, 64, 32), (10, 200, 90), (250, 250, 250), (0, 0, 0), (90, 10, 160), (200, 120, 0)]


def write_folder(root: Path, n_classes: int = 12, per_class=lambda c: 6) -> Path:
    """Class c: solid COLOURS[c] images of varying size, PNG and JPEG alternating, one greyscale PNG."""
    for c in range(n_classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class(c)):
            im = Image.new("RGB", (20 + i, 30 - i), COLOURS[c])
            im.save(folder / f"{i:03d}.png") if i % 2 else im.save(folder / f"{i:03d}.jpg", quality=100)
        (folder / "notes.txt").write_text("not an image")
    return root


def _prepare(tmp_path, source, **kw):
    args = dict(image_size=8, channels=3, per_class=None, class_lists={}, fractions=[0.5, 0.25], split_seed=0)
    return prepare_imagefolder(source, tmp_path / "prepared", **{**args, **kw})


def test_prepare_decodes_every_class_at_size_and_splits_by_seeded_fractions(tmp_path):
    root = write_folder(tmp_path / "cls", per_class=lambda c: 6 + c % 3)   # 6, 7 or 8 images
    found = locate_imagefolder(tmp_path / "raw", str(root), None, None, None)
    assert found["kind"] == "folder" and found["path"] == str(root.resolve())
    meta = _prepare(tmp_path, found)
    images = np.load(tmp_path / "prepared" / "images.npy")
    assert images.shape == (12, 6, 3, 8, 8) and meta["per_class"] == 6   # the smallest class's count
    sizes = {s: len(v) for s, v in meta["splits"]["folder"].items()}
    assert sizes == {"train": 6, "val": 3, "test": 3}
    for row, cls in enumerate(meta["classes"]):   # a solid colour stays that colour through resize and JPEG
        colour = np.array(COLOURS[int(cls["name"].split("_")[1])])
        assert np.abs(images[row].astype(int) - colour[None, :, None, None]).max() <= 2, cls
    def names(m):
        return {s: sorted(m["classes"][i]["name"] for i in idx) for s, idx in m["splits"]["folder"].items()}
    assert sorted(sum(names(meta).values(), [])) == [f"class_{c:02d}" for c in range(12)]
    assert names(_prepare(tmp_path, found, split_seed=0)) == names(meta)
    assert names(_prepare(tmp_path, found, split_seed=1)) != names(meta)


def test_prepare_greyscale_and_class_lists(tmp_path):
    root = write_folder(tmp_path / "cls", n_classes=6)
    lists = {}
    for split, names in (("train", [0, 1, 2]), ("val", [3]), ("test", [4, 5])):
        lists[split] = str(tmp_path / f"{split}.txt")
        Path(lists[split]).write_text("# header\n" + "".join(f"class_{c:02d}\n" for c in names))
    meta = _prepare(tmp_path, {"kind": "folder", "path": str(root)}, channels=1, class_lists=lists, per_class=4)
    images = np.load(tmp_path / "prepared" / "images.npy")
    assert images.shape == (6, 4, 1, 8, 8)
    assert [meta["classes"][i]["name"] for i in meta["splits"]["folder"]["test"]] == ["class_04", "class_05"]
    r, g, b = COLOURS[0]   # ITU-R 601-2 luma, PIL's "L" conversion: L = R*299/1000 + G*587/1000 + B*114/1000
    assert abs(int(images[0, 0, 0, 4, 4]) - round(r * 0.299 + g * 0.587 + b * 0.114)) <= 2


def test_bad_folders_and_lists_name_what_is_wrong(tmp_path):
    root = write_folder(tmp_path / "cls", n_classes=6, per_class=lambda c: 2 if c == 3 else 5)
    source = {"kind": "folder", "path": str(root)}
    with pytest.raises(DataError, match=r"fewer than data.imagefolder.per_class = 4 images: class_03 \(2\)"):
        _prepare(tmp_path, source, per_class=4)
    (root / "class_01" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"class_01/0000.png: unreadable image"):
        _prepare(tmp_path, source)
    (root / "class_01" / "0000.png").unlink()
    lists = {s: str(tmp_path / f"{s}.txt") for s in ("train", "val", "test")}
    for s, text in (("train", "class_00\nclass_01\n"), ("val", "class_02\n"), ("test", "class_09\n")):
        Path(lists[s]).write_text(text)
    with pytest.raises(DataError, match=r"test.txt: 1 class not in the folder: class_09"):
        _prepare(tmp_path, source, class_lists=lists)
    Path(lists["test"]).write_text("class_01\n")
    with pytest.raises(DataError, match=r"'class_01' is in both the train and the test list"):
        _prepare(tmp_path, source, class_lists=lists)
    with pytest.raises(DataError, match="the val split holds no classes"):
        _prepare(tmp_path, source, fractions=[0.9, 0.05])
    with pytest.raises(DataError, match="no such folder"):
        locate_imagefolder(tmp_path / "raw", str(tmp_path / "nowhere"), None, None, None)
    with pytest.raises(DataError, match="source is null"):
        locate_imagefolder(tmp_path / "raw", None, None, None, None)


def _zip_of(root: Path, path: Path, top: str = "mydata") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                zf.write(file, f"{top}/{file.relative_to(root)}")
    return path


def test_archives_are_verified_extracted_and_their_single_top_folder_entered(tmp_path):
    root = write_folder(tmp_path / "cls", n_classes=5)
    archive = _zip_of(root, tmp_path / "mydata.zip")
    from mamlbench.io import file_digest
    md5 = file_digest(archive, "md5")
    found = locate_imagefolder(tmp_path / "raw", str(archive), md5, None, None)
    assert found["kind"] == "archive" and found["md5"] == md5
    assert Path(found["path"]) == (tmp_path / "raw" / "extracted" / "mydata").resolve()
    assert json.loads((tmp_path / "raw" / "source.json").read_text()) == found
    assert sorted(p.name for p in Path(found["path"]).iterdir()) == [f"class_{c:02d}" for c in range(5)]
    with pytest.raises(DataError, match="md5 mismatch"):
        locate_imagefolder(tmp_path / "raw2", str(archive), "0" * 32, None, None)
    assert not (tmp_path / "raw2" / "mydata.zip").exists()
    # a tar.gz with the class folders two levels down, named by subfolder
    tgz = tmp_path / "deep.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(root, arcname="CUB/images")
        tf.add(tmp_path / "mydata.zip", arcname="CUB/other.zip")
    found = locate_imagefolder(tmp_path / "raw3", str(tgz), None, "CUB/images", None)
    assert Path(found["path"]).name == "images" and len(list(Path(found["path"]).iterdir())) == 5
    with pytest.raises(DataError, match="subfolder = 'CUB/nope'"):
        locate_imagefolder(tmp_path / "raw4", str(tgz), None, "CUB/nope", None)


def test_archives_with_members_outside_the_target_are_refused(tmp_path):
    evil_tar = tmp_path / "evil.tar"
    with tarfile.open(evil_tar, "w") as tf:
        data = b"x"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="refusing member"):
        locate_imagefolder(tmp_path / "raw", str(evil_tar), None, None, None)
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("../../escaped.txt", "x")
    with pytest.raises(DataError, match="refusing member"):
        locate_imagefolder(tmp_path / "raw2", str(evil_zip), None, None, None)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not (tmp_path / "raw" / "extracted").exists()


def _params(tmp_path: Path, source: Path, algorithms=("maml",)) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["opt_in"] = ["imagefolder"]
    params["data"]["imagefolder"].update(source=str(source), image_size=16, fractions=[0.5, 0.25])
    params["data"]["imagefolder"]["episodes"] = [{"n_way": 3, "k_shot": 1, "n_query": 2}]
    params["data"]["episodes"].update(n_test=12, n_val=6)
    params["imagefolder"]["hidden"] = 4
    params["imagefolder"]["settings"] = {"3w1s": {"n_way": 3, "k_shot": 1, "n_query": 2}}
    params["imagefolder"]["run"] = {"algorithms": list(algorithms), "settings": ["3w1s"]}
    params["imagefolder"]["train"].update(iterations=4, n_query=2, validate_every=2, n_val_episodes=6,
                                          meta_batch_size=2, log_every=2, checkpoint_every=2)
    params["imagefolder"]["evaluate"].update(n_episodes=12, inner_steps=2, chunk=12)
    return params


def test_imagefolder_cells_need_the_data_opted_in(tmp_path):
    from mamlbench.config import load_params
    params = _params(tmp_path, tmp_path)
    params["data"]["opt_in"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="data.opt_in lacks imagefolder"):
        load_params(tmp_path / "params.yaml")
    params["data"]["opt_in"] = ["imagefolder"]
    params["data"]["imagefolder"]["fractions"] = [0.7, 0.4]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"data.imagefolder.fractions = \[0.7, 0.4\]"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.slow
def test_dvc_repro_trains_evaluates_and_reports_an_imagefolder_dataset(tmp_path):
    from test_pipeline import _clone, _dvc
    source = write_folder(tmp_path / "my_classes", n_classes=12)
    repo = _clone(tmp_path)
    params = _params(tmp_path, source, algorithms=("maml", "protonet"))
    params["profiles"]["quick"]["variants.protonet.train.iterations"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = _dvc(repo, "repro", "imagefolder-evaluate")
    log += _dvc(repo, "repro", "--single-item", "report")   # the report of what ran, not the whole pipeline
    for stage in ("download@imagefolder", "prepare@imagefolder", "episodize@imagefolder",
                  "imagefolder-train@maml-3w1s-0", "imagefolder-evaluate@protonet-3w1s-0", "report"):
        assert f"Running stage '{stage}'" in log, stage
    assert "omniglot" not in " ".join(re.findall(r"Running stage '([^']+)'", log))
    for algorithm in ("maml", "protonet"):
        metrics = json.loads((repo / f"runs/imagefolder/{algorithm}-3w1s-seed0/eval/metrics.json").read_text())
        assert metrics["n_episodes"] == 12 and 0 <= metrics["acc"] <= 1
        headline = json.loads((repo / f"reports/metrics/imagefolder/{algorithm}-3w1s-seed0.json").read_text())
        assert headline["meta_test/acc"] == pytest.approx(metrics["acc"], abs=1e-6)
    report = (repo / "reports/README.md").read_text()
    assert "## Your ImageFolder dataset" in report and "protonet" in report.split("## Your ImageFolder dataset")[1]

    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mamlbench-imagefolder")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert {"imagefolder-maml-3w1s-seed0", "imagefolder-protonet-3w1s-seed0-evaluate"} <= names

    again = re.findall(r"Running stage '([^']+)'", _dvc(repo, "repro", "imagefolder-evaluate"))
    assert again == ["download@imagefolder"]   # it only looks again: the same folder, the same source.json
    (source / "class_00" / "000.jpg").unlink()   # the folder changed under the same params
    changed = re.findall(r"Running stage '([^']+)'", _dvc(repo, "repro", "imagefolder-evaluate"))
    assert {"prepare@imagefolder", "imagefolder-train@maml-3w1s-0", "imagefolder-evaluate@maml-3w1s-0"} <= set(changed)
