"""Hostile and quirky input files: each either reads correctly or is one clear error naming the file
and the physical line; nothing is written outside the output folder or onto an existing folder."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from medclipsam import storage
from medclipsam.domain.cohort import parse_prompt, read_cohort, read_cohort_manifest
from medclipsam.domain.images import write_sitk
from medclipsam.domain.records import CaseRecord, write_manifest, write_record
from medclipsam.errors import InputError, PromptError
from medclipsam.prompts.csv_prompts import check_case_ids, read_box_rows, read_point_rows
from medclipsam.storage import outputs

BOX_HEADER = "case_id,slice,x0,y0,x1,y1"


def write(tmp_path, name: str, data: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def leftovers(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


# --- the atomic write --------------------------------------------------------------------------


def test_atomic_write_refuses_an_existing_folder_and_leaves_no_temporary(tmp_path):
    folder = tmp_path / "out" / "masks" / "a.png"
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"masks/a\.png is a folder; "):
        storage.write_bytes_atomic(str(folder), b"png")
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_mask_and_manifest_writers_refuse_a_folder(tmp_path):
    """The writers a run calls go through the atomic write, so a folder in the way fails the write."""
    (tmp_path / "masks" / "a.png").mkdir(parents=True)
    (tmp_path / "manifest.parquet").mkdir()
    with pytest.raises(InputError, match=r"masks/a\.png is a folder; "):
        write_sitk(sitk.GetImageFromArray(np.zeros((4, 4), np.uint8)), str(tmp_path / "masks" / "a.png"))
    with pytest.raises(InputError, match=r"manifest\.parquet is a folder; "):
        write_manifest([CaseRecord("a", "a.png")], str(tmp_path / "manifest.parquet"))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_atomic_write_refuses_a_file_where_its_folder_should_be(tmp_path):
    (tmp_path / "masks").write_text("not a folder")
    with pytest.raises(InputError, match=r"masks is a file; "):
        storage.write_bytes_atomic(str(tmp_path / "masks" / "a.png"), b"png")
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_a_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "manifest.parquet"
    target.write_bytes(b"old")
    storage.write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []


def test_atomic_write_refuses_an_existing_prefix_on_s3(s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    fs.pipe(f"{s3_bucket}/out/manifest.parquet/inner.txt", b"mine")
    with pytest.raises(InputError, match=r"out/manifest\.parquet is a folder; "):
        storage.write_bytes_atomic(f"{s3_bucket}/out/manifest.parquet", b"parquet")
    assert [p.rsplit("/", 1)[-1] for p in fs.find(f"{s3_bucket}/out")] == ["inner.txt"]
    storage.write_bytes_atomic(f"{s3_bucket}/out/ok.txt", b"ok")  # an ordinary write still works
    assert storage.read_bytes(f"{s3_bucket}/out/ok.txt") == b"ok"
    assert not [p for p in fs.find(f"{s3_bucket}/out") if ".tmp-" in p]


# --- output paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["../evil", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "..", ".", ""])
def test_output_paths_cannot_leave_the_output_folder(tmp_path, case_id):
    output = str(tmp_path / "run")
    with pytest.raises(InputError, match="case_id"):
        outputs.case_file(output, outputs.MASKS, case_id, ".png")
    with pytest.raises(InputError, match="case_id"):
        write_record(CaseRecord(case_id, "x.png"), output)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_output_paths_of_a_plain_case_id(tmp_path):
    assert outputs.case_file("s3://b/run/", outputs.MASKS, "case-1", ".nii.gz") == "s3://b/run/masks/case-1.nii.gz"
    assert outputs.record_uri(str(tmp_path), "a b..c") == f"{tmp_path}/records/a b..c.json"


# --- cohort manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["../evil", "/etc/passwd", "a/b", "..\\..\\evil", "..", ".hidden"])
def test_manifest_case_ids_that_are_not_plain_names_are_refused(tmp_path, case_id):
    path = write(tmp_path, "manifest.csv", f"uri,case_id\n\nx.png,{case_id}\n")
    with pytest.raises(InputError, match=r"manifest\.csv line 3: case_id .* is not a plain name"):
        read_cohort(path)


def test_case_id_taken_from_a_file_name_is_checked_too(tmp_path):
    path = write(tmp_path, "manifest.csv", "uri\nscans/..\n")
    with pytest.raises(InputError, match=r"manifest\.csv line 2: case_id '\.\.' is not a plain name"):
        read_cohort(path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a\\b.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"a\\b\.png: case_id 'a\\b' is not a plain name"):
        read_cohort(str(tmp_path / "images"))


def test_duplicate_case_ids_name_both_physical_lines(tmp_path):
    path = write(tmp_path, "manifest.csv", "uri,case_id\n\nx.png,a\n\n\ny.png,a\n")
    with pytest.raises(InputError, match=r"manifest\.csv line 6: case_id 'a' appears twice \(lines 3 and 6"):
        read_cohort(path)


def test_manifest_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "manifest.csv", "uri,prompt\n\nok.png,fine\n\n\nx.png,\"[1, 2]\"\n")
    with pytest.raises(InputError, match=r"manifest\.csv line 6: prompt must be a sentence"):
        read_cohort(path)


MANIFEST_TEXT = "uri,case_id,prompt\nx.png,a,tumeur du foie à gauche\n"


@pytest.mark.parametrize("data", [
    MANIFEST_TEXT.encode("utf-8"),
    MANIFEST_TEXT.encode("utf-8-sig"),
    MANIFEST_TEXT.encode("utf-16"),  # with its byte-order mark
    MANIFEST_TEXT.encode("latin-1"),
    MANIFEST_TEXT.replace("\n", ",\n").encode(),  # a trailing comma on every line, as spreadsheets write
    MANIFEST_TEXT.replace("\n", ",\n").replace(",\n", "\n", 1).encode(),  # trailing commas on the rows only
    MANIFEST_TEXT.replace("\n", "\r\n").encode(),
    MANIFEST_TEXT.replace("\n", "\n,,\n").encode(),  # rows of only commas
])
def test_manifest_encodings_and_trailing_commas_are_read(tmp_path, data):
    cases = read_cohort(write(tmp_path, "manifest.csv", data))
    assert [(c.case_id, c.uri, c.prompts) for c in cases] == [("a", f"{tmp_path}/x.png", ("tumeur du foie à gauche",))]


@pytest.mark.parametrize(("data", "message"), [
    ("uri,prompt\nx.png,a\ny.png,b,extra\n", r"manifest\.csv line 3: 3 values, but the header has 2 columns"),
    (b"uri\x00,prompt\nx.png,a\n", r"manifest\.csv: not a text file"),
    (b"\xff\xfeu\x00r", r"manifest\.csv: not valid UTF-16"),
    ("uri,uri\nx.png,y.png\n", r"manifest\.csv line 1: column 'uri' appears twice in the header"),
    ("", r"manifest\.csv: manifest needs a column named one of uri"),
])
def test_malformed_manifests_are_one_error(tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        read_cohort(write(tmp_path, "manifest.csv", data))


def test_a_folder_given_as_a_manifest(tmp_path):
    (tmp_path / "cases.csv").mkdir()
    with pytest.raises(InputError, match=r"cases\.csv is a folder; "):
        read_cohort(str(tmp_path / "cases.csv"))


def test_parquet_manifest_rows_are_numbered_and_checked(tmp_path):
    path = str(tmp_path / "manifest.parquet")
    pq.write_table(pa.table({"uri": ["x.png", "y.png"], "case_id": ["a", "../b"]}), path)
    with pytest.raises(InputError, match=r"manifest\.parquet row 2: case_id '\.\./b' is not a plain name"):
        read_cohort(path)


def test_empty_and_very_long_prompts(tmp_path):
    """An empty cell (or ``[]``) means "no sentence of its own": the case takes the config's prompts, and
    the plan refuses a text-mode case with neither. A long sentence is kept whole; BiomedCLIP's tokenizer
    truncates it to its context length."""
    long = "a hypoechoic mass " * 556  # 10,008 characters
    assert parse_prompt("", "w") == () and parse_prompt("   ", "w") == () and parse_prompt("[]", "w") == ()
    assert parse_prompt(long, "w") == (long.strip(),)
    path = write(tmp_path, "manifest.csv", f"uri,prompt\nempty.png,\nlong.png,{long}\nspaces.png,\"  \"\n")
    cases = {c.case_id: c.prompts for c in read_cohort_manifest(path)}
    assert cases == {"empty": (), "long": (long.strip(),), "spaces": ()}


# --- box and point prompt CSVs ----------------------------------------------------------------------


BOX_ROWS = "tête,3,1,2,10,20\nimg,,0,0,4,4\n"


@pytest.mark.parametrize("data", [
    f"{BOX_HEADER}\n{BOX_ROWS}".encode("utf-16"),
    f"{BOX_HEADER}\n{BOX_ROWS}".encode("utf-8-sig"),
    f"{BOX_HEADER}\n{BOX_ROWS}".encode("latin-1"),
    f"{BOX_HEADER},\n{BOX_ROWS}".replace("\n", ",\n", 2).encode(),  # trailing commas (header and rows)
    f"{BOX_HEADER}\n{BOX_ROWS}".replace("\n", ",\n").encode(),  # trailing commas on every line
    f"{BOX_HEADER}\n{BOX_ROWS.replace(chr(10), ',' + chr(10))}".encode(),  # trailing commas on the rows only
    f"{BOX_HEADER}\r\n\r\n{BOX_ROWS}".replace("\n", "\r\n").replace("\r\r", "\r").encode(),
])
def test_box_csv_encodings_and_trailing_commas_are_read(tmp_path, data):
    rows = read_box_rows(write(tmp_path, "b.csv", data))
    assert [(r.case_id, r.slice_index, r.values) for r in rows] == [
        ("tête", 3, (1.0, 2.0, 10.0, 20.0)), ("img", None, (0.0, 0.0, 4.0, 4.0))]


def test_prompt_csv_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "b.csv", f"{BOX_HEADER}\n\nvol,1,1,1,5,5\n\n\nvol,1,10,2,10,20\n")
    with pytest.raises(PromptError, match=r"b\.csv line 6: box needs x1 > x0"):
        read_box_rows(path)
    rows = read_box_rows(write(tmp_path, "c.csv", f"{BOX_HEADER}\n\nvol,1,1,1,5,5\n\nbrian,1,1,1,5,5\n"))
    with pytest.raises(PromptError, match=r"c\.csv line 5: case_id 'brian'"):
        check_case_ids(rows, [], {"vol"})


@pytest.mark.parametrize(("data", "message"), [
    (f"{BOX_HEADER}\nvol,1,1,1,5,5,9\n", r"b\.csv line 2: 7 values, but the header has 6 columns"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"b\.csv: not a text file"),
    (f"{BOX_HEADER}\nvol,1,1,1,5,\"5\nvol,2,1,1,5,5\n", r"b\.csv line 2: a quoted value is not closed"),
])
def test_malformed_prompt_csvs_are_one_error(tmp_path, data, message):
    with pytest.raises(PromptError, match=message):
        read_box_rows(write(tmp_path, "b.csv", data))


def test_a_folder_given_as_a_prompt_csv(tmp_path):
    (tmp_path / "points").mkdir()
    with pytest.raises(PromptError, match=r"points is a folder; "):
        read_point_rows(str(tmp_path / "points"))


def test_a_prefix_given_as_a_csv_on_s3(s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    fs.pipe(f"{s3_bucket}/in/boxes.csv/part-0.csv", f"{BOX_HEADER}\n".encode())
    with pytest.raises(PromptError, match=r"in/boxes\.csv is a folder; "):
        read_box_rows(f"{s3_bucket}/in/boxes.csv")
    with pytest.raises(InputError, match=r"in/boxes\.csv is a folder; "):
        read_cohort(f"{s3_bucket}/in/boxes.csv")
    with pytest.raises(InputError, match=r"in/none\.csv: manifest not found"):
        read_cohort(f"{s3_bucket}/in/none.csv")
