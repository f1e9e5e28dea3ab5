"""The preprocessed nnU-Net dataset, shipped to the training workers of other nodes.

nnU-Net reads its preprocessed dataset from the local disk of the process that trains. On a
cluster of more than one node a Ray Train worker may start on a node that never saw it (a GPU node
when the driver is on the head), or start again there after its node was lost. So the driver packs
the dataset once into one tar under ``<output>/preprocessed/``, named by its SHA-256, and a worker
on another node fetches it and unpacks it into a folder of its own node; the tar is used only if
its hash is the one the driver recorded, because nnU-Net unpickles the case properties it holds.
The tar is deterministic (sorted names, no times or owners), so a rerun on the same preprocessed
data finds the one it uploaded before.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import storage
from ..storage.fetch import fetch_file, sha256_of
from .nnunet_env import folders

PACKED_DIR = "preprocessed"  # under the training output
SHIPPED_FILE = "shipped.json"  # in the work folder: what was packed, for which preparation
UNPACKED_FILE = "unpacked.json"  # in a node's folder: the SHA-256 of the tar unpacked there


@dataclass(frozen=True)
class Shipped:
    """Where the packed dataset is, its SHA-256, and the dataset folder it holds."""

    uri: str
    sha256: str
    dataset: str

    def to_dict(self) -> dict:
        return asdict(self)


def _pack(source: Path, target: Path) -> str:
    """``source`` (a dataset folder) as an uncompressed tar at ``target``: its SHA-256."""
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(f"{source.name}/{path.relative_to(source).as_posix()}")
            info.size, info.mode = path.stat().st_size, 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return sha256_of(target)


def pack(work: Path, dataset: str, output: str) -> Shipped:
    """Pack ``work``'s preprocessed ``dataset`` and upload it under ``output`` (once per preparation)."""
    work = Path(work)
    prepared = (work / "prepared.json").read_text()  # written by weak.training.prepare
    note = work / SHIPPED_FILE
    if note.exists():
        before = json.loads(note.read_text())
        shipped = Shipped(**before["shipped"])
        if before["prepared"] == prepared and shipped.dataset == dataset and storage.exists(shipped.uri):
            return shipped
    source = Path(folders(work)["nnUNet_preprocessed"]) / dataset
    with tempfile.TemporaryDirectory(dir=work) as folder:
        local = Path(folder) / f"{dataset}.tar"
        sha256 = _pack(source, local)
        uri = storage.join(output, PACKED_DIR, f"{sha256}.tar")
        if not storage.exists(uri):
            storage.upload_file_atomic(local, uri)
    shipped = Shipped(uri, sha256, dataset)
    note.write_text(json.dumps({"prepared": prepared, "shipped": shipped.to_dict()}))
    return shipped


def unpack(shipped: Shipped, folder: Path) -> Path:
    """A work folder on this node holding the shipped dataset: ``folder``, unpacked once per tar.

    The tar is fetched into this node's cache and refused unless its SHA-256 is ``shipped.sha256``
    (a ``ModelError`` naming it). Workers of one node unpack it one at a time (a file lock), into a
    temporary folder renamed into place, so a worker never sees half a dataset.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = Path(folders(folder)["nnUNet_preprocessed"]) / shipped.dataset
    marker = folder / UNPACKED_FILE
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == shipped.sha256 and target.is_dir():
            return folder
        local = fetch_file(f"{shipped.uri}#sha256={shipped.sha256}", "preprocessed nnU-Net dataset")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as partial:
            with tarfile.open(local) as tar:
                tar.extractall(partial, filter="data")  # no links, devices or paths outside
            shutil.rmtree(target, ignore_errors=True)
            os.replace(Path(partial) / shipped.dataset, target)
        marker.write_text(shipped.sha256)
    return folder
