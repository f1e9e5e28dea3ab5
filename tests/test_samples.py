"""Sample data extraction from the pyradiomics-bhklab source archive, and its cache."""

import io
import tarfile

import pytest

from medclipsam.storage import samples
from medclipsam.storage.samples import extract_pairs, fetch_samples

CASES = ["brain1", "brain2", "breast1", "lung1", "lung2"]


def write_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def snapshot(root):
    """Every file under ``root``: relative path -> (bytes, mtime_ns, inode)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_extract_pairs_takes_only_image_label_nrrds(tmp_path):
    archive = write_archive(tmp_path / "pkg.tar.gz", [
        ("pkg-1/data/brain1_image.nrrd", b"I"), ("pkg-1/data/brain1_label.nrrd", b"L"),
        ("pkg-1/data/baseline/brain1_glcm.npy", b"x"), ("pkg-1/data/README.md", b"r"),
    ])
    assert extract_pairs(archive, tmp_path / "out") == ["brain1"]
    assert (tmp_path / "out" / "images" / "brain1.nrrd").read_bytes() == b"I"
    assert (tmp_path / "out" / "labels" / "brain1.nrrd").read_bytes() == b"L"
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["brain1.nrrd", "brain1.nrrd"]


def test_fetch_is_cached(samples_root, monkeypatch):
    # The real cohort is in place (the fixture fetched it through pip, or found it): a second call
    # must neither download nor rewrite anything.
    before = snapshot(samples_root)
    assert sorted(p.stem for p in (samples_root / "labels").glob("*.nrrd")) == CASES
    assert sorted(p.stem for p in (samples_root / "images").glob("*.nrrd")) == CASES

    calls = []

    def no_download(target):
        calls.append(target)
        raise AssertionError("fetch_samples downloaded again although the samples are cached")

    monkeypatch.setattr(samples, "_download_sdist", no_download)
    assert fetch_samples() == samples_root
    assert calls == []
    assert snapshot(samples_root) == before


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    # A stand-in for pip: counts calls and drops a small sdist into the folder it is given.
    calls = []

    def fake_download(target):
        calls.append(target)
        version = len(calls)
        return write_archive(target / f"pyradiomics_bhklab-{samples.VERSION}.tar.gz", [
            (f"pkg/data/{case}_{kind}.nrrd", f"{case}-{kind}-v{version}".encode())
            for case in ("brain1", "lung1") for kind in ("image", "label")
        ])

    monkeypatch.setattr(samples, "_download_sdist", fake_download)
    cache = tmp_path / "cache"
    root = fetch_samples(cache)
    assert root == cache / "samples" and len(calls) == 1
    assert (root / "images" / "lung1.nrrd").read_bytes() == b"lung1-image-v1"
    first = snapshot(root)
    assert sorted(first) == ["images/brain1.nrrd", "images/lung1.nrrd", "labels/brain1.nrrd", "labels/lung1.nrrd"]

    # Second call: nothing downloaded, nothing rewritten.
    assert fetch_samples(cache) == root
    assert len(calls) == 1
    assert snapshot(root) == first

    # force=True fetches again and replaces the files.
    fetch_samples(cache, force=True)
    assert len(calls) == 2
    assert (root / "labels" / "brain1.nrrd").read_bytes() == b"brain1-label-v2"

    # An incomplete cache (an image without its label) is fetched again, not trusted.
    (root / "labels" / "lung1.nrrd").unlink()
    fetch_samples(cache)
    assert len(calls) == 3
    assert (root / "labels" / "lung1.nrrd").read_bytes() == b"lung1-label-v3"


def test_fetch_reports_an_archive_without_pairs(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "_download_sdist", lambda target: write_archive(
        target / "empty.tar.gz", [("pkg/data/README.md", b"r")]))
    with pytest.raises(samples.InputError, match="archive holds no image/label pairs"):
        fetch_samples(tmp_path / "cache")
