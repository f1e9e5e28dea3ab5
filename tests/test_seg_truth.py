"""DICOM SEG as ground truth: a SEG built with highdicom directly (not the project's writer) from a
known mask over the sample brain1 written as an MR series scores DSC 1 against that mask through
``evaluate`` and gives the mask's voxels on the series' grid; a segment is chosen by number or label;
a SEG of another series or frame of reference is a sentence; a run scored against a SEG gets the
scores its NIfTI truth gives."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from dicom_series import write_mr_series
from pydicom.sr.codedict import codes
from test_dicom_seg import _on_grid

from medclipsam.cli import main
from medclipsam.domain.images import dicom_series_files, read_image, read_mask, write_mask
from medclipsam.domain.inputs import list_cases
from medclipsam.errors import InputError
from medclipsam.eval.evaluation import evaluate
from medclipsam.prompts.csv_prompts import oracle_boxes_csv


def _other_seg(series_folder, masks: dict[str, np.ndarray], path) -> None:
    """A SEG as another tool writes it: highdicom straight from the slices, sorted by highdicom."""
    sources = [pydicom.dcmread(name) for name in dicom_series_files(str(series_folder), "series")]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, label in enumerate(masks, start=1)]
    stacked = np.stack(list(masks.values()), axis=-1).astype(np.uint8)  # frames x rows x columns x segments
    order = np.random.default_rng(7).permutation(len(sources))  # the frames in no particular order
    seg = hd.seg.Segmentation(
        source_images=[sources[i] for i in order], pixel_array=stacked[order],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="another tool", manufacturer_model_name="x", software_versions="1",
        device_serial_number="1")
    seg.save_as(path)


@pytest.fixture(scope="module")
def brain(samples_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("seg-truth")
    folder = base / "images" / "brain1"
    write_mr_series(sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd")), folder)
    image = read_image(str(folder))
    tumour = _on_grid(sitk.ReadImage(str(samples_root / "labels" / "brain1.nrrd")), image)
    square = np.zeros_like(tumour)
    square[2:5, 30:60, 40:90] = True
    (base / "truth").mkdir()
    _other_seg(folder, {"tumour": tumour, "square": square}, base / "truth" / "brain1.seg.dcm")
    return base, folder, image, tumour, square


def test_a_seg_of_another_tool_gives_its_voxels_and_scores_dsc_1(brain, tmp_path):
    base, _, image, tumour, square = brain
    seg = base / "truth" / "brain1.seg.dcm"
    np.testing.assert_array_equal(read_mask(str(seg), like=image, segment="tumour").array, tumour)
    np.testing.assert_array_equal(read_mask(str(seg), like=image, segment=2).array, square)
    pred = tmp_path / "pred"
    write_mask(tumour, image, str(pred / "brain1.nii.gz"))
    rows, _ = evaluate(str(pred), str(base / "truth"))
    assert rows[0].status == "error" and rows[0].error == (
        f"{seg}: the SEG holds 2 segments (1 'tumour', 2 'square'); choose one by number or label "
        "with --gt-segment")
    run = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(base / "truth"),
                                    "--gt-segment", "Tumour"])
    assert run.exit_code == 0, run.output
    assert run.output.splitlines()[1].split() == ["brain1", "1.0000", "1.0000", "0.00", "ok"], run.output
    rows, _ = evaluate(str(pred), str(base / "truth"), gt_segment="1")
    assert (rows[0].status, rows[0].dsc, rows[0].nsd, rows[0].hd95) == ("ok", 1.0, 1.0, 0.0)
    rows, _ = evaluate(str(pred), str(base / "truth"), gt_segment="square")
    assert rows[0].dsc == 0.0  # the other segment, laid where it is
    rows, _ = evaluate(str(pred), str(base / "truth"), gt_segment="edema")
    assert rows[0].error == f"{seg}: no segment 'edema' in the SEG (it holds 1 'tumour', 2 'square')"


def test_a_folder_of_segs_lists_its_cases_and_a_run_folder_keeps_its_mask_files(brain, tmp_path):
    base = brain[0]
    assert list_cases(str(base / "truth")) == {"brain1": str(base / "truth" / "brain1.seg.dcm")}
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("brain1.nii.gz", "brain1.seg.dcm", "breast1.nii.gz"):
        (masks / name).write_bytes(b"x")
    assert list_cases(str(masks)) == {"brain1": str(masks / "brain1.nii.gz"), "breast1": str(masks / "breast1.nii.gz")}


def test_a_seg_of_another_series_or_frame_of_reference_or_with_no_image_is_a_sentence(brain, samples_root,
                                                                                       tmp_path):
    base, folder, image, tumour, _ = brain
    other = tmp_path / "other"
    write_mr_series(sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd")), other, seed=3)  # new UIDs
    _other_seg(other, {"tumour": tumour}, tmp_path / "other.seg.dcm")
    with pytest.raises(InputError, match=r"other.seg.dcm: the SEG references series [\d.]+, not the series of "
                                         rf"{folder} \([\d.]+\), so it labels another scan"):
        read_mask(str(tmp_path / "other.seg.dcm"), like=image)
    moved = pydicom.dcmread(base / "truth" / "brain1.seg.dcm")
    moved.FrameOfReferenceUID = pydicom.uid.generate_uid()
    moved.save_as(tmp_path / "moved.seg.dcm")
    with pytest.raises(InputError, match=r"moved.seg.dcm: the SEG's frame of reference [\d.]+ is not that of"):
        read_mask(str(tmp_path / "moved.seg.dcm"), like=image, segment=1)
    with pytest.raises(InputError, match=r"brain1.seg.dcm: a DICOM SEG is read onto the image it labels, and "
                                         "there is none here; give the truth as NIfTI, NRRD or PNG"):
        read_mask(str(base / "truth" / "brain1.seg.dcm"))
    (tmp_path / "fake.seg.dcm").write_bytes(b"no DICOM here")
    with pytest.raises(InputError, match=r"fake.seg.dcm: not a DICOM SEG \("):
        read_mask(str(tmp_path / "fake.seg.dcm"), like=image)


def test_a_run_scored_against_a_seg_gets_the_scores_of_its_nifti_truth(brain, tmp_path):
    """``segment --gt-segment tumour`` against the two-segment SEG: the tumour scores, as its NIfTI does,
    and the manifest's gt_uri says which segment it was."""
    base, folder, image, tumour, _ = brain
    labels = tmp_path / "labels"
    write_mask(tumour, image, str(labels / "brain1.nii.gz"))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(oracle_boxes_csv(str(labels), margin=2.0))
    seg = base / "truth" / "brain1.seg.dcm"  # segments 1 'tumour' and 2 'square'
    runner = CliRunner()
    with pytest.raises(InputError, match=r"no segment '3' in the SEG \(it holds 1 'tumour', 2 'square'\)"):
        read_mask(f"{seg}#segment=3", like=image)  # what a run's case records as its error (its mask stands)
    np.testing.assert_array_equal(read_mask(f"{seg}#segment=square", like=image).array, brain[4])
    not_seg = runner.invoke(main, ["segment", "--input", str(folder), "--boxes", str(boxes), "--gt", str(labels),
                                   "--gt-segment", "tumour", "--output", str(tmp_path / "none")])
    assert not_seg.exit_code == 2 and "--gt-segment tumour picks a segment of DICOM SEG truths" in not_seg.output
    run = runner.invoke(main, ["segment", "--input", str(folder), "--boxes", str(boxes), "--gt", str(seg),
                               "--gt-segment", "TUMOUR", "--output", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    row = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()[0]
    assert row["gt_uri"] == f"{seg}#segment=TUMOUR"
    assert row["status"] == "ok" and not row["error"] and row["dsc"] > 0.8
    by_nifti, _ = evaluate(str(tmp_path / "out" / "masks"), str(labels))
    assert (row["dsc"], row["nsd"]) == pytest.approx((by_nifti[0].dsc, by_nifti[0].nsd), abs=1e-9)
