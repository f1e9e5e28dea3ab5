"""The preprocessed dataset shipped to training workers on other nodes (weak.shipping)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medclipsam.errors import ModelError
from medclipsam.weak.nnunet_env import folders
from medclipsam.weak.shipping import pack, unpack

DATASET = "Dataset513_ship"


def _prepared(work: Path, files: dict[str, bytes]) -> Path:
    source = Path(folders(work)["nnUNet_preprocessed"]) / DATASET
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    (work / "prepared.json").write_text(json.dumps({"key": "k", "cases": [], "skipped": {}}))
    return source


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


FILES = {"dataset.json": b'{"labels": {}}', "nnUNetPlans.json": b"{}",
         "nnUNetPlans_2d/case_000.b2nd": os.urandom(5000), "nnUNetPlans_2d/case_000.pkl": b"\x80\x04N.",
         "gt_segmentations/case_000.nii.gz": os.urandom(300)}


def test_a_node_unpacks_the_same_tree_once(tmp_path):
    source = _prepared(tmp_path / "work", FILES)
    shipped = pack(tmp_path / "work", DATASET, str(tmp_path / "output"))
    assert Path(shipped.uri) == tmp_path / "output" / "preprocessed" / f"{shipped.sha256}.tar"
    node = unpack(shipped, tmp_path / "node")
    unpacked = Path(folders(node)["nnUNet_preprocessed"]) / DATASET
    assert _tree(unpacked) == _tree(source) == FILES
    # a second worker of the node finds it unpacked (a file changed there is not replaced)
    (unpacked / "dataset.json").write_bytes(b"changed")
    unpack(shipped, tmp_path / "node")
    assert (unpacked / "dataset.json").read_bytes() == b"changed"


def test_the_tar_is_the_same_for_the_same_files_and_packed_once(tmp_path):
    for name in ("a", "b"):
        source = _prepared(tmp_path / name, FILES)
        os.utime(source / "dataset.json", (1, 1 if name == "a" else 10**9))  # times do not count
    first = pack(tmp_path / "a", DATASET, str(tmp_path / "output"))
    second = pack(tmp_path / "b", DATASET, str(tmp_path / "output"))
    assert first == second
    os.utime(first.uri, (5, 5))
    assert pack(tmp_path / "a", DATASET, str(tmp_path / "output")) == first  # the same preparation
    assert os.stat(first.uri).st_mtime == 5  # not packed or uploaded again
    (tmp_path / "a" / "prepared.json").write_text("{}")  # prepared again, with other files
    (Path(folders(tmp_path / "a")["nnUNet_preprocessed"]) / DATASET / "extra.json").write_bytes(b"1")
    assert pack(tmp_path / "a", DATASET, str(tmp_path / "output")).sha256 != first.sha256


def test_a_changed_tar_is_refused_and_nothing_is_unpacked(tmp_path):
    _prepared(tmp_path / "work", FILES)
    shipped = pack(tmp_path / "work", DATASET, str(tmp_path / "output"))
    data = bytearray(Path(shipped.uri).read_bytes())
    data[600] ^= 1  # a byte of the first file's contents
    Path(shipped.uri).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"preprocessed nnU-Net dataset .*SHA-256"):
        unpack(shipped, tmp_path / "node")
    assert not (Path(folders(tmp_path / "node")["nnUNet_preprocessed"]) / DATASET).exists()
