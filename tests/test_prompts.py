"""Prompt CSV parsing and validation, and prompts derived from masks."""

import numpy as np
import pytest

from medclipsam.errors import PromptError
from medclipsam.prompts.csv_prompts import (
    check_case_ids,
    group_by_case,
    prompts_for_case,
    read_box_rows,
    read_point_rows,
)
from medclipsam.prompts.from_mask import bounding_box


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_boxes_and_points_grouped_per_slice(tmp_path):
    boxes = write(tmp_path, "b.csv", "case_id,slice,x0,y0,x1,y1\nvol,3,1,2,10,20\nvol,3,5,5,8,9\nimg,,0,0,4,4\n")
    points = write(tmp_path, "p.csv", "case_id,slice,x,y,label\nvol,3,4,4,1\nvol,7,2,2,0\n")
    box_rows, point_rows = read_box_rows(boxes), read_point_rows(points)
    check_case_ids(box_rows, point_rows, {"vol", "img"})
    grouped = group_by_case(box_rows, point_rows)
    vol = prompts_for_case(*grouped["vol"], image_shape=(10, 30, 40), is_volume=True, axis=0)
    np.testing.assert_array_equal(vol[3].boxes, [[1, 2, 10, 20], [5, 5, 8, 9]])
    np.testing.assert_array_equal(vol[3].points, [[4, 4]])
    np.testing.assert_array_equal(vol[7].labels, [0])
    assert len(vol[7].boxes) == 0
    img = prompts_for_case(*grouped["img"], image_shape=(5, 5, 3), is_volume=False, axis=0)
    np.testing.assert_array_equal(img[None].boxes, [[0, 0, 4, 4]])


def test_slice_plane_depends_on_axis(tmp_path):
    boxes = write(tmp_path, "b.csv", "case_id,slice,x0,y0,x1,y1\nvol,2,1,1,30,8\n")
    grouped = group_by_case(read_box_rows(boxes), [])
    # axis 1 of a 10 x 5 x 40 volume: slices are 10 rows x 40 columns
    prompts_for_case(*grouped["vol"], image_shape=(10, 5, 40), is_volume=True, axis=1)
    with pytest.raises(PromptError, match="outside the image"):  # axis 0: 5 rows x 40 columns
        prompts_for_case(*grouped["vol"], image_shape=(10, 5, 40), is_volume=True, axis=0)


@pytest.mark.parametrize(
    "row,message",
    [
        ("vol,1,10,2,10,20", r"b\.csv line 2: box needs x1 > x0"),
        ("vol,1,10,20,15,5", "box needs x1 > x0 and y1 > y0"),
        ("vol,x,1,2,3,4", "slice 'x' is not an integer"),
        ("vol,-1,1,2,3,4", "slice -1 is negative"),
        ("vol,1,a,2,3,4", "x0 'a' is not a number"),
        (",1,1,2,3,4", "empty case_id"),
    ],
)
def test_bad_box_rows(tmp_path, row, message):
    path = write(tmp_path, "b.csv", f"case_id,slice,x0,y0,x1,y1\n{row}\n")
    with pytest.raises(PromptError, match=message):
        read_box_rows(path)


def test_box_outside_image_names_row(tmp_path):
    path = write(tmp_path, "b.csv", "case_id,slice,x0,y0,x1,y1\nvol,0,1,1,5,5\nvol,1,1,1,50,5\n")
    grouped = group_by_case(read_box_rows(path), [])
    with pytest.raises(PromptError, match=r"b\.csv line 3: prompt \(1.0, 1.0, 50.0, 5.0\) lies outside the image"):
        prompts_for_case(*grouped["vol"], image_shape=(4, 20, 40), is_volume=True, axis=0)


def test_slice_out_of_range_and_missing_slice(tmp_path):
    path = write(tmp_path, "b.csv", "case_id,slice,x0,y0,x1,y1\nvol,9,1,1,5,5\n")
    grouped = group_by_case(read_box_rows(path), [])
    with pytest.raises(PromptError, match=r"slice 9 outside 0\.\.3"):
        prompts_for_case(*grouped["vol"], image_shape=(4, 20, 40), is_volume=True, axis=0)
    path = write(tmp_path, "c.csv", "case_id,slice,x0,y0,x1,y1\nvol,,1,1,5,5\n")
    grouped = group_by_case(read_box_rows(path), [])
    with pytest.raises(PromptError, match="is a volume; give the slice index"):
        prompts_for_case(*grouped["vol"], image_shape=(4, 20, 40), is_volume=True, axis=0)
    with pytest.raises(PromptError, match="is a 2D image; leave slice empty"):
        rows = read_box_rows(write(tmp_path, "d.csv", "case_id,slice,x0,y0,x1,y1\nimg,0,1,1,5,5\n"))
        grouped = group_by_case(rows, [])
        prompts_for_case(*grouped["img"], image_shape=(20, 40), is_volume=False, axis=0)


def test_missing_column_and_bad_label(tmp_path):
    with pytest.raises(PromptError, match="missing column"):
        read_box_rows(write(tmp_path, "b.csv", "case_id,x0,y0,x1,y1\nvol,1,1,5,5\n"))
    with pytest.raises(PromptError, match="label must be 1"):
        read_point_rows(write(tmp_path, "p.csv", "case_id,slice,x,y,label\nvol,1,1,5,2\n"))
    with pytest.raises(PromptError, match="prompt file not found"):
        read_box_rows(str(tmp_path / "none.csv"))


def test_unknown_case_id_names_row(tmp_path):
    rows = read_box_rows(write(tmp_path, "b.csv", "case_id,slice,x0,y0,x1,y1\nbrain1,1,1,1,5,5\nbrian2,1,1,1,5,5\n"))
    with pytest.raises(PromptError, match=r"b\.csv line 3: case_id 'brian2'"):
        check_case_ids(rows, [], {"brain1", "brain2"})


def test_bounding_box_exact():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    mask[7, 1] = True
    np.testing.assert_array_equal(bounding_box(mask), [1, 2, 8, 7])
    np.testing.assert_array_equal(bounding_box(mask, margin=2), [0, 0, 10, 9])
    assert bounding_box(np.zeros((3, 3), bool)) is None
