"""The review report in a real headless Chromium, with no network: it loads every picture and runs its
script without an error, its table sorts and filters, its lightbox pages through a case's slices, and
the oracle banner shows on a labels-prompted run and on no other."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from browser import console_errors, images_loaded, open_page
from PIL import Image
from pipeline_cohort import make_cohort
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from medclipsam.config import TaskConfig
from medclipsam.pipeline.job import SOURCE_FILES, Job
from medclipsam.pipeline.run import run_job
from medclipsam.prompts.csv_prompts import oracle_boxes_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, samples_root):
    """A labels-prompted run and a box-prompted one (the oracle's boxes as a CSV) of a four-case cohort."""
    root = tmp_path_factory.mktemp("report_browser")
    cohort = make_cohort(samples_root, root / "cohort")
    (cohort / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")  # fails as its own case
    images, labels = str(cohort / "images"), str(cohort / "labels")
    config = TaskConfig(task="browser")
    labelled = run_job(Job(config, images, str(root / "labels"), "labels", labels), "local", resume=False,
                       track=False)
    boxes = root / "boxes.csv"
    boxes.write_text(oracle_boxes_csv(labels, margin=config.oracle.box_margin))
    boxed = run_job(Job(config, images, str(root / "boxes"), SOURCE_FILES, labels, boxes_csv=str(boxes)), "local",
                    resume=False, track=False)
    return {"labels": labelled, "boxes": boxed, "boxes_csv": boxes}


def _column(driver, name: str) -> list[str]:
    index = driver.execute_script(
        "return Array.from(document.querySelectorAll('#cases thead th')).findIndex("
        "th => th.textContent.trim().startsWith(arguments[0]));", name)
    assert index >= 0, f"no column {name}"
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#cases tbody tr')).filter(r => !r.hidden)"
        ".map(r => r.cells[arguments[0]].getAttribute('data-value'));", index)


def _header(driver, name: str):
    return next(th for th in driver.find_elements(By.CSS_SELECTOR, "#cases thead th")
                if th.text.strip().startswith(name))


def test_report_loads_sorts_filters_and_pages_through_slices(runs, tmp_path):
    result = runs["labels"]
    assert result.report_uri.endswith("report.html")
    records = {r.case_id: r for r in result.records}
    assert {c: r.status for c, r in records.items()} == {"brain1": "ok", "breast1": "ok", "brain2": "ok",
                                                         "lung2": "ok", "broken": "error"}
    with open_page(Path(result.report_uri)) as driver:
        pictures = images_loaded(driver)
        assert len(pictures) >= 4 + 8 and all(width > 0 for _, width in pictures), pictures  # no broken picture
        assert console_errors(driver) == []
        banner = driver.find_elements(By.ID, "oracle-banner")
        assert len(banner) == 1 and banner[0].is_displayed() and "ground-truth" in banner[0].text

        dsc = {c: r.dsc for c, r in records.items() if r.status == "ok"}
        _header(driver, "dsc").click()
        assert _column(driver, "dsc") == [repr(v) for v in sorted(dsc.values())] + [""]  # no score: last
        assert _header(driver, "dsc").get_attribute("aria-sort") == "ascending"
        _header(driver, "dsc").click()
        assert _column(driver, "dsc") == [repr(v) for v in sorted(dsc.values(), reverse=True)] + [""]
        assert _column(driver, "case_id") == [*sorted(dsc, key=dsc.get, reverse=True), "broken"]
        assert _header(driver, "dsc").get_attribute("aria-sort") == "descending"
        _header(driver, "case_id").click()
        assert _column(driver, "case_id") == sorted(records)

        for status, shown in (("error", ["broken"]), ("ok", sorted(dsc)), ("", sorted(records))):
            Select(driver.find_element(By.ID, "status-filter")).select_by_value(status)
            assert _column(driver, "case_id") == shown

        prompted = records["brain1"].n_prompted_slices
        thumbs = driver.find_elements(By.CSS_SELECTOR, "img.thumb[data-case='brain1']")
        assert len(thumbs) == prompted and 1 < prompted <= 8  # under pipeline.strip_slices: all prompted slices
        thumbs[0].click()
        box = driver.find_element(By.ID, "lightbox")
        caption = box.find_element(By.TAG_NAME, "p")
        assert box.is_displayed() and f"1 of {prompted}" in caption.text
        first = box.find_element(By.TAG_NAME, "img").get_attribute("src")
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
        assert f"2 of {prompted}" in caption.text and box.find_element(By.TAG_NAME, "img").get_attribute("src") != first
        assert caption.text.startswith(thumbs[1].get_attribute("data-caption"))
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        assert not box.is_displayed()
        assert console_errors(driver) == []

        shot = tmp_path / "report.png"
        shot.write_bytes(base64.b64decode(driver.get_screenshot_as_base64()))
        picture = Image.open(io.BytesIO(shot.read_bytes()))
        assert picture.format == "PNG" and picture.size[0] >= 1000 and len(picture.getcolors(1 << 24)) > 50


def test_box_prompted_run_has_no_oracle_banner(runs):
    result = runs["boxes"]
    with open_page(Path(result.report_uri)) as driver:
        assert driver.find_elements(By.ID, "oracle-banner") == []
        assert all(width > 0 for _, width in images_loaded(driver)) and console_errors(driver) == []
        scored = [float(v) for v in _column(driver, "dsc") if v]
        assert sorted(scored) == sorted(r.dsc for r in result.records if r.status == "ok")  # the box run is scored too
        about = driver.find_element(By.CSS_SELECTOR, "table.about").text
        assert f"from CSV files: boxes {runs['boxes_csv']}" in about
