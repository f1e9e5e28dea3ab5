"""DICOM in the cohort: a folder tree of series (patient/study/series) lists one case per series,
a folder holding several series (loose files, or a series folder given directly) keeps every one
of them as its own case, read back with its own voxels and slices, and ``--case-id-tag`` names
DICOM cases by a header value. Small synthetic volumes written as MR series, no models."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from dicom_series import write_mr_series

from medclipsam import storage
from medclipsam.cli import main
from medclipsam.domain.cohort import read_cohort
from medclipsam.domain.dicom_seg import Segment, write_dicom_seg
from medclipsam.domain.dicom_sources import source_datasets
from medclipsam.domain.images import (
    case_id_from_uri,
    dicom_series_files,
    read_header,
    read_image,
    series_uri,
    split_series_uri,
)
from medclipsam.domain.inputs import MAX_DEPTH, list_cases
from medclipsam.domain.mask_files import is_dicom_source
from medclipsam.errors import InputError


def _volume(seed: int, slices: int = 4) -> sitk.Image:
    pixels = np.random.default_rng(seed).integers(0, 3000, (slices, 12, 10)).astype(np.int16)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing((0.9, 0.8, 2.5))
    image.SetOrigin((seed * 1.0, -5.0, 10.0))
    return image


class Series:
    """A series written for a test: its UID, the SOP instance UIDs in slice order, the voxels."""

    def __init__(self, folder: Path, seed: int, number: int | None = 3, prefix: str = "", slices: int = 4,
                 **header: str) -> None:
        volume = _volume(seed, slices)
        scratch = folder.parent / f".scratch-{folder.name}-{seed}"
        self.sop_uids = write_mr_series(volume, scratch, seed=seed)
        self.array = np.clip(sitk.GetArrayFromImage(volume), 0, 32767).astype(np.uint16)
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        for path in sorted(scratch.iterdir()):
            ds = pydicom.dcmread(path)
            if number is None:
                del ds.SeriesNumber
            else:
                ds.SeriesNumber = number
            for keyword, value in header.items():
                setattr(ds, keyword, value)
            self.uid = str(ds.SeriesInstanceUID)
            target = folder / f"{prefix}{path.name}"
            ds.save_as(target, enforce_file_format=True)
            self.files.append(target)
        shutil.rmtree(scratch)


def _tree(root: Path) -> dict[str, Series]:
    """patient/study/series folders, a study folder holding two series, a series one level down, an
    image file at the top, and what is no case: a hidden series, an image file in a sub-folder."""
    written = {
        "ct": Series(root / "p1" / "study1" / "ct", 1),
        "mr": Series(root / "p1" / "study1" / "mr", 2),
        "t1": Series(root / "p2" / "study" / "mixed", 3, number=3, prefix="a"),
        "t2": Series(root / "p2" / "study" / "mixed", 4, number=7, prefix="b"),
        "flat": Series(root / "flat", 5),
        "hidden": Series(root / ".trash" / "old", 6),
    }
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5)), str(root / "top.nii.gz"))
    (root / "p1" / "notes").mkdir()
    png = sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    sitk.WriteImage(png, str(root / "p1" / "notes" / "x.png"))
    return written


def _sop_uids(datasets) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]


def test_a_tree_of_series_is_one_case_per_series(tmp_path):
    root = tmp_path / "cohort"
    written = _tree(root)
    mixed = root / "p2" / "study" / "mixed"
    assert list_cases(str(root)) == {
        "flat": str(root / "flat"),
        "p1_study1_ct": str(root / "p1" / "study1" / "ct"),
        "p1_study1_mr": str(root / "p1" / "study1" / "mr"),
        "p2_study_mixed_series3": f"{mixed}#series={written['t1'].uid}",
        "p2_study_mixed_series7": f"{mixed}#series={written['t2'].uid}",
        "top": str(root / "top.nii.gz"),
    }
    assert [c.case_id for c in read_cohort(str(root))] == sorted(list_cases(str(root)))


def test_each_series_of_a_folder_reads_back_its_own_voxels_and_slices(tmp_path):
    folder = tmp_path / "study"
    first, second = Series(folder, 11, number=3, prefix="a"), Series(folder, 12, number=7, prefix="b", slices=5)
    cases = list_cases(str(folder))  # given directly: every series, not only the longest
    assert cases == {"study_series3": series_uri(str(folder), first.uid),
                     "study_series7": series_uri(str(folder), second.uid)}
    for series, uri in ((first, cases["study_series3"]), (second, cases["study_series7"])):
        assert split_series_uri(uri) == (str(folder), series.uid)
        assert is_dicom_source(uri) and case_id_from_uri(uri) == f"study_{series.uid}"
        image = read_image(uri)
        np.testing.assert_array_equal(image.array, series.array)
        assert image.series_uid == series.uid and image.is_volume
        assert read_header(uri).shape == series.array.shape
        files = dicom_series_files(uri, uri)
        assert sorted(files) == sorted(str(f) for f in series.files)
        assert _sop_uids(pydicom.dcmread(f, stop_before_pixels=True) for f in files) == series.sop_uids
        with storage.local_copy(uri) as local:
            assert _sop_uids(source_datasets(local, uri)) == series.sop_uids  # exactly its slices, in z order
    with pytest.raises(InputError, match=r"#series=1\.2\.3: the folder holds no DICOM series 1\.2\.3 \(it holds "):
        read_image(series_uri(str(folder), "1.2.3"))
    with pytest.raises(InputError, match=r"names a series of .*aIM0000\.dcm, which is not a folder"):
        read_header(series_uri(str(folder / "aIM0000.dcm"), first.uid))


def test_a_seg_over_one_series_of_a_folder_references_that_series_only(tmp_path):
    folder = tmp_path / "study"
    Series(folder, 21, number=3, prefix="a")
    wanted = Series(folder, 22, number=9, prefix="b", slices=3)
    uri = list_cases(str(folder))["study_series9"]
    mask = np.zeros(wanted.array.shape, bool)
    mask[1, 2:6, 3:7] = True
    write_dicom_seg(mask, uri, str(tmp_path / "m.seg.dcm"), Segment("target"), "test")
    seg = hd.seg.segread(tmp_path / "m.seg.dcm")
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == wanted.uid
    assert [i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence] == wanted.sop_uids
    by_source = seg.get_pixels_by_source_instance(wanted.sop_uids, segment_numbers=[1], combine_segments=True,
                                                  assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_source > 0, mask)


def test_loose_files_beside_series_folders_keep_every_series(tmp_path, caplog):
    root = tmp_path / "export"
    loose = Series(root, 31, number=4, prefix="loose")
    single = Series(root / "tmp", 32, slices=1)  # a one-slice series, moved beside the others
    (root / "xray.dcm").write_bytes(single.files[0].read_bytes())
    shutil.rmtree(root / "tmp")
    sub = Series(root / "series2", 33)
    (root / "SR.dcm").write_bytes(b"not dicom at all")
    with caplog.at_level(logging.WARNING, logger="medclipsam.domain.inputs"):
        cases = list_cases(str(root))
    assert cases == {"export_series4": series_uri(str(root), loose.uid), "series2": str(root / "series2"),
                     "xray": str(root / "xray.dcm")}
    assert f"{root / 'SR.dcm'} (not a DICOM file)" in caplog.text
    np.testing.assert_array_equal(read_image(cases["export_series4"]).array, loose.array)
    xray = read_image(cases["xray"])
    assert not xray.is_volume and xray.series_uid == single.uid
    np.testing.assert_array_equal(xray.array, single.array[0])
    np.testing.assert_array_equal(read_image(cases["series2"]).array, sub.array)


def test_a_single_series_folder_is_unchanged(tmp_path):
    folder = tmp_path / "cohort" / "brain"
    series = Series(folder, 41)
    assert list_cases(str(tmp_path / "cohort")) == {"brain": str(folder)}
    assert list_cases(str(folder)) == {"brain": str(folder)}
    image = read_image(str(folder))
    np.testing.assert_array_equal(image.array, series.array)
    assert image.series_uid == series.uid
    assert split_series_uri(str(folder)) == (str(folder), "")


def test_series_without_distinct_numbers_are_told_apart_by_their_uids(tmp_path):
    folder = tmp_path / "s"
    first, second = Series(folder, 51, number=2, prefix="a"), Series(folder, 52, number=2, prefix="b")
    assert set(list_cases(str(folder))) == {f"s_{first.uid}", f"s_{second.uid}"}


def test_case_id_tag_names_dicom_cases_by_their_header(tmp_path):
    root = tmp_path / "cohort"
    written = _tree(root)
    cases = list_cases(str(root), case_id_tag="SeriesInstanceUID")
    mixed = root / "p2" / "study" / "mixed"
    assert cases == {written["flat"].uid: str(root / "flat"), written["ct"].uid: str(root / "p1" / "study1" / "ct"),
                     written["mr"].uid: str(root / "p1" / "study1" / "mr"),
                     written["t1"].uid: series_uri(str(mixed), written["t1"].uid),
                     written["t2"].uid: series_uri(str(mixed), written["t2"].uid), "top": str(root / "top.nii.gz")}
    cohort = read_cohort(str(root), case_id_tag="SeriesInstanceUID")
    assert {c.case_id for c in cohort} == set(cases)
    one = Series(tmp_path / "named", 61, PatientName="Doe^Jane", AccessionNumber="A/17 x")
    assert list_cases(str(tmp_path / "named"), "PatientName") == {"Doe_Jane": str(tmp_path / "named")}
    assert list_cases(str(one.files[0]), "AccessionNumber") == {"A_17_x": str(one.files[0])}


def test_case_id_tag_problems_are_one_sentence(tmp_path):
    root = tmp_path / "cohort"
    _tree(root)
    with pytest.raises(InputError, match=r"^case id tag 'SeriesUID' is not a DICOM keyword"):
        list_cases(str(root), "SeriesUID")
    with pytest.raises(InputError, match="is a sequence"):
        list_cases(str(root), "ReferencedSeriesSequence")
    with pytest.raises(InputError, match=r"\.dcm: its DICOM header has no InstitutionName value"):
        list_cases(str(root), "InstitutionName")
    with pytest.raises(InputError, match="two inputs share case_id 'TEST0001'"):  # every series: one patient
        list_cases(str(root), "PatientID")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"uri\n{root / 'flat'}\n")
    with pytest.raises(InputError, match="a manifest names its cases"):
        read_cohort(str(manifest), case_id_tag="PatientID")


def test_case_id_tag_on_the_command_line(tmp_path):
    root = tmp_path / "cohort"
    _tree(root)
    (tmp_path / "boxes.csv").write_text("case_id,slice,x0,y0,x1,y1\nflat,0,1,1,5,5\n")
    result = CliRunner().invoke(main, ["segment", "--input", str(root), "--output", str(tmp_path / "out"),
                                       "--boxes", str(tmp_path / "boxes.csv"), "--case-id-tag", "NoSuchKeyword"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: case id tag 'NoSuchKeyword' is not a DICOM keyword")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_tag_is_part_of_the_settings_a_resume_checks(tmp_path):
    from medclipsam.config import load_config
    from medclipsam.pipeline.job import Job

    config = load_config("breast_ultrasound")
    plain = Job(config, str(tmp_path), str(tmp_path / "out"))
    tagged = Job(config, str(tmp_path), str(tmp_path / "out"), case_id_tag="SeriesInstanceUID")
    assert "case_id_tag" not in plain.settings_record()  # earlier outputs resume as they were
    assert tagged.settings_record()["case_id_tag"] == "SeriesInstanceUID"
    assert tagged.parameters() != plain.parameters()


def test_links_back_up_the_tree_and_depth_are_bounded(tmp_path, caplog):
    root = tmp_path / "cohort"
    Series(root / "a" / "series", 71)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    deep = root.joinpath(*[f"d{i}" for i in range(MAX_DEPTH + 1)])
    Series(deep, 72)
    with caplog.at_level(logging.WARNING, logger="medclipsam.domain.inputs"):
        cases = list_cases(str(root))
    assert cases == {"a_series": str(root / "a" / "series")}
    assert f"{root / 'a' / 'loop'} (a link to a folder above it)" in caplog.text
    assert "more than 8 folders deep" in caplog.text


def test_one_series_of_a_folder_on_s3(tmp_path, s3_bucket):
    folder = tmp_path / "study"
    Series(folder, 81, number=3, prefix="a")
    wanted = Series(folder, 82, number=5, prefix="b", slices=3)
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(folder), f"{s3_bucket}/cohort/study", recursive=True)
    cases = list_cases(f"{s3_bucket}/cohort/")
    assert cases["study_series5"] == f"{s3_bucket}/cohort/study#series={wanted.uid}"
    np.testing.assert_array_equal(read_image(cases["study_series5"]).array, wanted.array)
    with storage.local_copy(cases["study_series5"]) as local:
        assert _sop_uids(source_datasets(local, cases["study_series5"])) == wanted.sop_uids


def test_an_evaluation_set_hashes_one_series_of_a_folder(tmp_path):
    from medclipsam.registry.evalset import content_sha256

    folder = tmp_path / "study"
    Series(folder, 91, number=3, prefix="a")
    Series(folder, 92, number=5, prefix="b")
    truth = tmp_path / "truth.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 12, 10), np.uint8)), str(truth))
    cohort = [replace(case, gt_uri=str(truth)) for case in read_cohort(str(folder))]
    digest = content_sha256(cohort)
    assert len(digest) == 64 and digest == content_sha256(cohort)
    (folder / "bIM0000.dcm").write_bytes(b"changed")
    assert content_sha256(cohort) != digest
