"""Sample data extraction from the pyradiomics-bhklab source archive."""

import io
import tarfile

from medclipsam.samples import extract_pairs, fetch_samples


def test_extract_pairs_takes_only_image_label_nrrds(tmp_path):
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [
            ("pkg-1/data/brain1_image.nrrd", b"I"), ("pkg-1/data/brain1_label.nrrd", b"L"),
            ("pkg-1/data/baseline/brain1_glcm.npy", b"x"), ("pkg-1/data/README.md", b"r"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert extract_pairs(archive, tmp_path / "out") == ["brain1"]
    assert (tmp_path / "out" / "images" / "brain1.nrrd").read_bytes() == b"I"
    assert (tmp_path / "out" / "labels" / "brain1.nrrd").read_bytes() == b"L"
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["brain1.nrrd", "brain1.nrrd"]


def test_fetch_is_cached(samples_root):
    # A second call finds the extracted pairs and does not fetch again.
    assert fetch_samples() == samples_root
    assert sorted(p.stem for p in (samples_root / "labels").glob("*.nrrd")) == [
        "brain1", "brain2", "breast1", "lung1", "lung2"]
