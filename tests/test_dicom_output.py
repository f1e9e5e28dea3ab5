"""``--mask-format dicom-seg`` through the commands: a mixed cohort (a DICOM MR series of the sample
brain1 beside the NRRD breast1) gets a valid SEG and RTSTRUCT for the DICOM case that hold the NIfTI
mask's voxels and name the task's segment, a warning and NIfTI alone for the other; a cohort with no DICOM case is a
usage error before any model loads."""

from __future__ import annotations

import shutil

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import SimpleITK as sitk
from click.testing import CliRunner
from dicom_series import rasterise_rtstruct, write_mr_series
from test_dicom_seg import _on_grid, dciodvfy

from medclipsam.cli import main
from medclipsam.domain.images import dicom_series_files, read_image, read_mask, write_mask
from medclipsam.prompts.csv_prompts import oracle_boxes_csv


def test_a_mixed_cohort_gets_a_seg_for_its_dicom_case_and_a_warning_for_the_other(tmp_path, samples_root):
    images, labels = tmp_path / "images", tmp_path / "labels"
    labels.mkdir(parents=True)
    write_mr_series(sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd")), images / "brain1")
    series = read_image(str(images / "brain1"))
    truth = _on_grid(sitk.ReadImage(str(samples_root / "labels" / "brain1.nrrd")), series)
    write_mask(truth, series, str(labels / "brain1.nii.gz"))  # the truth on the series' own grid
    for kind, folder in (("images", images), ("labels", labels)):
        shutil.copy(samples_root / kind / "breast1.nrrd", folder / "breast1.nrrd")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(oracle_boxes_csv(str(labels), margin=2.0))

    run = CliRunner().invoke(main, ["segment", "--input", str(images), "--boxes", str(boxes), "--gt", str(labels),
                                    "--config", "brain_tumor_mri", "--mask-format", "nifti,dicom-seg,rtstruct",
                                    "--output", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    rows = {r["case_id"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert (rows["brain1"]["mask_formats"], rows["breast1"]["mask_formats"]) == ("nifti,dicom-seg,rtstruct", "nifti")
    assert rows["breast1"]["warnings"] == ("not DICOM: no dicom-seg, rtstruct, since the source (.nrrd) is not a "
                                           "DICOM series or file")
    assert "warning: 1 case(s) with a not DICOM warning (breast1)" in run.output
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [
        "brain1.nii.gz", "brain1.rtstruct.dcm", "brain1.seg.dcm", "breast1.nii.gz"]
    assert rows["brain1"]["dsc"] > 0.8  # the boxes are the truth's: the run itself is sound

    seg_path = tmp_path / "out" / "masks" / "brain1.seg.dcm"
    report = dciodvfy(seg_path)
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
    seg = hd.seg.segread(seg_path)
    order = [pydicom.dcmread(n, stop_before_pixels=True).SOPInstanceUID
             for n in dicom_series_files(str(images / "brain1"), "brain1")]
    voxels = seg.get_pixels_by_source_instance(order, segment_numbers=[1], combine_segments=True,
                                               assert_missing_frames_are_empty=True) > 0
    nifti = read_mask(rows["brain1"]["mask_uri"]).array
    assert rows["brain1"]["mask_uri"].endswith("masks/brain1.nii.gz") and nifti.sum() > 500
    np.testing.assert_array_equal(voxels, nifti)
    described = seg.SegmentSequence[0]
    assert described.SegmentLabel == "brain tumour"  # from the task config
    assert described.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    assert seg.SeriesDescription == "medclipsam brain_tumor_mri: files prompts"

    rtstruct = tmp_path / "out" / "masks" / "brain1.rtstruct.dcm"
    assert not [line for line in dciodvfy(rtstruct).splitlines() if line.startswith("Error")]
    filled, _ = rasterise_rtstruct(rtstruct, images / "brain1")
    np.testing.assert_array_equal(filled, nifti)
    assert pydicom.dcmread(rtstruct).StructureSetROISequence[0].ROIName == "brain tumour"


def test_dicom_seg_for_a_cohort_without_dicom_is_a_usage_error_before_any_model(tmp_path, samples_root):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("case_id,slice,x0,y0,x1,y1\nbrain1,12,100,100,140,140\n")
    runner = CliRunner()
    run = runner.invoke(main, ["segment", "--input", str(samples_root / "images"), "--boxes", str(boxes),
                               "--mask-format", "dicom-seg", "--output", str(tmp_path / "out")])
    assert run.exit_code == 2 and "Traceback" not in run.output
    assert ("--mask-format dicom-seg writes masks over their DICOM source, and none of the 5 case(s) is a DICOM "
            "series folder or .dcm file (e.g. ") in run.output
    assert not (tmp_path / "out").exists()
    weak = runner.invoke(main, ["weak", "predict", "--model", str(tmp_path / "no-ensemble"), "--input",
                                str(samples_root / "images"), "--mask-format", "dicom-seg", "--local",
                                "--output", str(tmp_path / "weak")])
    assert weak.exit_code == 2 and "none of the 5 case(s) is a DICOM series folder" in weak.output
    for formats, words in (("nifti,png", "nifti, png: give one of auto, nifti, png"),
                           ("nifti,rtss",
                            "unknown mask format rtss; choose from auto, nifti, png, dicom-seg, rtstruct, "
                            "fractional-seg")):
        bad = runner.invoke(main, ["segment", "--input", str(samples_root / "images"), "--boxes", str(boxes),
                                   "--mask-format", formats, "--output", str(tmp_path / "out")])
        assert bad.exit_code == 2 and f"output.mask_format: {words}" in bad.output, bad.output
    fractional = runner.invoke(main, ["pseudolabel", "--input", str(samples_root / "images"), "--prompt", "a tumour",
                                      "--mask-format", "dicom-seg,fractional-seg", "--output", str(tmp_path / "pl")])
    assert fractional.exit_code == 2 and "Traceback" not in fractional.output
    assert ("--mask-format fractional-seg writes the probabilities of weak predict's ensemble, and SAM's masks "
            "(segment, pseudolabel) have none") in fractional.output
    assert not (tmp_path / "pl").exists()
