"""The review report of a run: one self-contained HTML page a reviewer can work through offline.

It says first what the scores mean (where the prompts came from, and in large letters when they
came from the labels: an oracle upper bound, not a zero-shot result), which models and settings
made the masks, then the summary, a table that sorts by any column and filters by status, and per
drawn case a strip of its prompted slices (mask, truth and prompts drawn; click to enlarge, arrow
keys page through the case). The pictures are embedded and the script is the page's own, so the
file can be mailed or archived and opened with no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..domain.records import column_floats, manifest_about, read_manifest, status_counts, table_counts
from ..errors import InputError
from ..storage.outputs import MANIFEST, OVERLAYS, RUN_FILE, STRIPS
from .overlays import BACKGROUND_POINT_COLOUR, MASK_COLOUR, PROMPT_COLOUR, TRUTH_COLOUR

COLUMNS = ("case_id", "status", "warnings", "n_slices", "n_prompted_slices", "dsc", "nsd", "hd95", "seconds",
           "error")
NUMERIC = {"n_slices", "n_prompted_slices", "dsc", "nsd", "hd95", "seconds"}
SCORE_FILES = ("scores.csv", "scores.parquet")  # `medclipsam evaluate --output` next to the run, merged


def _seconds(row: dict) -> float:
    return sum(float(row.get(k) or 0.0) for k in
               ("seconds_read", "seconds_saliency", "seconds_embed", "seconds_decode", "seconds_write"))


PAGE_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child"
              "{text-align:left}.error{color:#b00}figure{display:inline-block;margin:6px}"
              "img{max-width:320px}")

REPORT_STYLE = (
    ".banner{background:#b00;color:#fff;font-size:1.3em;font-weight:bold;padding:.8em 1em;margin:1em 0;"
    "border-radius:4px}.note{background:#eef;padding:.5em 1em;border-radius:4px}"
    "table.about td,table.about th{text-align:left}"
    "th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:' \\2195';color:#999}"
    "th[aria-sort=ascending]:after{content:' \\25B2';color:#000}"
    "th[aria-sort=descending]:after{content:' \\25BC';color:#000}"
    "td.text{text-align:left;max-width:28em}tr.warned td.warn{color:#8a5a00}"
    ".strip{display:flex;flex-wrap:wrap;gap:6px}.strip figure{margin:0}"
    "img.thumb{height:180px;width:auto;max-width:none;cursor:zoom-in;border:1px solid #ccc}"
    "figcaption{font-size:.85em;text-align:center}.swatch{display:inline-block;width:1em;height:1em;"
    "vertical-align:middle;margin:0 .3em 0 1em;border:1px solid #555}"
    "#lightbox{display:none;position:fixed;inset:0;background:rgba(0,0,0,.88);z-index:10;text-align:center;"
    "color:#fff}#lightbox.open{display:block}#lightbox img{max-width:95vw;max-height:85vh;margin-top:3vh;"
    "image-rendering:pixelated}#lightbox p{margin:.5em}"
)

# The page's own script (no library): sort the table by a header, filter it by status, and the
# lightbox that pages through one case's slices.
REPORT_SCRIPT = """
(function () {
  var table = document.getElementById('cases');
  var body = table.tBodies[0];
  function key(cell, numeric) {
    var v = cell.getAttribute('data-value');
    if (!numeric) return v.toLowerCase();
    var n = parseFloat(v);
    return isNaN(n) ? null : n;
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
    th.addEventListener('click', function () {
      var numeric = th.getAttribute('data-type') === 'number';
      var ascending = th.getAttribute('aria-sort') !== 'ascending';
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (other) {
        other.removeAttribute('aria-sort');
      });
      th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a.cells[column], numeric), y = key(b.cells[column], numeric);
        if (x === y) return 0;
        if (x === null) return 1;  /* no value: last, either way */
        if (y === null) return -1;
        return (x < y ? -1 : 1) * (ascending ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  var filter = document.getElementById('status-filter');
  filter.addEventListener('change', function () {
    Array.prototype.forEach.call(body.rows, function (row) {
      row.hidden = filter.value !== '' && row.getAttribute('data-status') !== filter.value;
    });
  });
  var box = document.getElementById('lightbox'), big = box.querySelector('img'), caption = box.querySelector('p');
  var group = [], at = 0;
  function show(i) {
    at = (i + group.length) % group.length;
    big.src = group[at].src;
    caption.textContent = group[at].getAttribute('data-caption') + '  (' + (at + 1) + ' of ' + group.length +
      '; arrow keys: previous and next, Esc: close)';
  }
  document.querySelectorAll('img.thumb').forEach(function (img) {
    img.addEventListener('click', function () {
      group = Array.prototype.slice.call(document.querySelectorAll('img.thumb[data-case="' +
        img.getAttribute('data-case') + '"]'));
      show(group.indexOf(img));
      box.classList.add('open');
    });
  });
  box.addEventListener('click', function () { box.classList.remove('open'); });
  document.addEventListener('keydown', function (event) {
    if (!box.classList.contains('open')) return;
    if (event.key === 'Escape') box.classList.remove('open');
    if (event.key === 'ArrowRight') show(at + 1);
    if (event.key === 'ArrowLeft') show(at - 1);
  });
})();
"""


def html_page(title: str, body: list[str], extra_style: str = "", script: str = "") -> str:
    """A self-contained page (the run report, the tuner's trials): head, style, ``body`` one part a line."""
    tail = [f"<script>{script}</script>"] if script else []
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                      f"<style>{PAGE_STYLE}{extra_style}</style></head><body>", *body, *tail, "</body></html>"])


def html_row(cells: list[str], css: str = "", heads: int = 0) -> str:
    """One table row of already-escaped cells, the first ``heads`` of them header cells."""
    attribute = f" class='{css}'" if css else ""
    return (f"<tr{attribute}>" + "".join(f"<th>{c}</th>" if i < heads else f"<td>{c}</td>"
                                         for i, c in enumerate(cells)) + "</tr>")


def html_table(headers: list[str], rows: list[str]) -> str:
    """A table: a header row of ``headers`` (none if empty), then ``rows`` (``html_row``), one a line."""
    head = html_row([html.escape(h) for h in headers], heads=len(headers)) if headers else ""
    return "<table>" + head + "".join("\n" + row for row in rows) + "\n</table>"


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return html.escape(str(value))


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class Picture:
    caption: str  # "slice 12", or "image" for a 2D one
    png: bytes


# -- provenance ------------------------------------------------------------------------------------


def _short(digest: str) -> str:
    return f"<code title='{html.escape(digest)}'>{html.escape(digest[:12])}</code>" if digest else "-"


def _distinct(rows: list[dict], column: str) -> list[str]:
    return sorted({str(r.get(column) or "") for r in rows} - {""})


def _source(rows: list[dict], about: dict) -> str:
    sources = _distinct(rows, "prompt_source")
    return about.get("source") or (sources[0] if len(sources) == 1 else ", ".join(sources))


def _prompts_line(source: str, about: dict, rows: list[dict]) -> str:
    if source == "labels":
        margin = ""
        parameters = _distinct(rows, "parameters")
        if parameters:
            margin = json.loads(parameters[0]).get("labels", {}).get("box_margin", "")
        return (f"boxes from the ground-truth labels ({html.escape(about.get('gt', '') or 'gt_uri')}), "
                f"margin {html.escape(str(margin))} px")
    if source == "files":
        given = [f"{kind} {html.escape(about[kind])}" for kind in ("boxes", "points") if about.get(kind)]
        return "from CSV files: " + ("; ".join(given) or "-")
    sentences = about.get("text_prompts") or sorted({s for r in rows for s in json.loads(r.get("text_prompt") or "[]")})
    quoted = "; ".join(f"&ldquo;{html.escape(s)}&rdquo;" for s in sentences)
    return f"text, through CLIP saliency (zero-shot): {quoted}" if sentences else "text (zero-shot)"


def _about(rows: list[dict], about: dict, run_file: dict | None, written: str) -> list[str]:
    source = _source(rows, about)
    parts = []
    if source == "labels":
        parts.append("<div id='oracle-banner' class='banner' role='alert'>Oracle upper bound, not a zero-shot "
                     "result: SAM was prompted with boxes taken from the ground-truth labels. These scores "
                     "measure the SAM backend given near-perfect boxes, not the text-driven pipeline.</div>")
    items = [("prompts", _prompts_line(source, about, rows))]
    backends = sorted({(r.get("backend") or "", r.get("checkpoint") or "", r.get("checkpoint_sha256") or "")
                       for r in rows if r.get("backend")})
    for backend, checkpoint, digest in backends:
        items.append(("SAM", f"{html.escape(backend)}: {html.escape(checkpoint)}, sha256 {_short(digest)}"))
    clips = sorted({(r.get("clip_model") or "", r.get("clip_sha256") or "") for r in rows if r.get("clip_model")})
    for model, digest in clips:
        items.append(("CLIP", f"{html.escape(model)}, sha256 {_short(digest)}"))
    if about.get("task"):
        items.append(("config", f"task {html.escape(about['task'])}, sha256 {_short(about.get('config_sha256', ''))}"
                                f"; settings that decide the masks: sha256 {_short(about.get('settings_sha256', ''))}"))
    for key, words in (("input", "input"), ("gt", "ground truth")):
        if about.get(key):
            items.append((words, html.escape(about[key])))
    if run_file and run_file.get("mlflow_run_id"):
        items.append(("MLflow run", f"{html.escape(run_file['mlflow_run_id'])} in "
                                    f"{html.escape(run_file.get('tracking_uri', ''))}"))
    items.append(("written", html.escape(about.get("written") or "-") + f" (this report: {html.escape(written)})"))
    versions = about.get("versions") or {}
    if versions:
        items.append(("versions", html.escape(", ".join(f"{k} {v}" for k, v in versions.items()))))
    parts.append("<table class='about'>" + "".join(html_row([html.escape(k), v], heads=1) for k, v in items)
                 + "</table>")
    return parts


# -- summary and table -----------------------------------------------------------------------------


def _units(n_slices: np.ndarray) -> tuple[str, str]:
    """HD95's unit and NSD's tolerance words: pixels for 2D images, millimetres for volumes."""
    kinds = set((np.maximum(n_slices, 1) > 1).tolist())
    if kinds == {True}:
        return "mm", "mm"
    if kinds == {False}:
        return "px", "px"
    return "mm for volumes, px for 2D images", "mm (volumes) or px (2D)"


def _warned(table: pa.Table) -> np.ndarray:
    """Which rows have warnings."""
    return pc.not_equal(table.column("warnings").cast(pa.string()), "").to_numpy(zero_copy_only=False)


def _summary(table: pa.Table, about: dict, merged: str) -> str:
    dsc = column_floats(table, "dsc")
    scored = np.isfinite(dsc)
    distance, tolerance = _units(column_floats(table, "n_slices"))
    nsd_tolerance = about.get("nsd_tolerance", 2.0)
    items = [("cases", str(table.num_rows)), *((f"status {k}", str(v)) for k, v in table_counts(table).items()),
             ("cases with warnings", str(int(_warned(table).sum())))]
    if scored.any():
        items += [("scored cases", str(int(scored.sum())) + merged),
                  ("mean DSC (0 to 1)", f"{_mean(dsc[scored].tolist()):.4f}"),
                  (f"mean NSD (0 to 1, tolerance {nsd_tolerance:g} {tolerance})",
                   f"{_mean(column_floats(table, 'nsd')[scored].tolist()):.4f}"),
                  (f"mean HD95 ({distance}; finite values)",
                   _cell(_mean(column_floats(table, "hd95")[scored].tolist())))]
    else:
        items.append(("scores", "none: give --gt (or a gt_uri column), or run medclipsam evaluate into scores.csv"))
    return "<table id='summary'>" + "".join(html_row([html.escape(k), v], heads=1) for k, v in items) + "</table>"


REPORT_CASES = 1000  # cases the report's table lists (every one up to this); the manifest has them all


def _listed(table: pa.Table, drawn: set[str]) -> np.ndarray:
    """The rows the case table lists, in manifest order: all of them, or for a larger run the
    failed ones first, then those with warnings, the drawn ones and the lowest DSC."""
    if table.num_rows <= REPORT_CASES:
        return np.arange(table.num_rows)
    status = table.column("status").cast(pa.string()).to_numpy(zero_copy_only=False)
    warned = _warned(table)
    pictured = pc.is_in(table.column("case_id"), value_set=pa.array(sorted(drawn), pa.string())).to_numpy(
        zero_copy_only=False)
    dsc = column_floats(table, "dsc")
    rank = np.where(status == "error", 0, np.where(warned, 1, np.where(pictured, 2, 3)))
    order = np.lexsort((np.where(np.isfinite(dsc), dsc, np.inf), rank))  # by rank, then lowest DSC
    return np.sort(order[:REPORT_CASES])


def _distinct_rows(table: pa.Table) -> list[dict]:
    """The different provenance values of the run (its models, sources, settings): a few rows."""
    columns = ["prompt_source", "parameters", "text_prompt", "backend", "checkpoint", "checkpoint_sha256",
               "clip_model", "clip_sha256"]
    return table.select(columns).group_by(columns, use_threads=False).aggregate([]).to_pylist()


def _case_table(rows: list[dict], drawn: set[str], columns: tuple[str, ...], table: pa.Table) -> str:
    heads = "".join(f"<th class='sortable' data-type='{'number' if c in NUMERIC else 'text'}'>{html.escape(c)}</th>"
                    for c in columns)
    lines = []
    for row in rows:
        cells = []
        for column in columns:
            value = _seconds(row) if column == "seconds" else row.get(column, "")
            sort_value = "" if isinstance(value, float) and math.isnan(value) else str(value)
            text = _cell(value)
            if column == "case_id" and row["case_id"] in drawn:
                text = f"<a href='#case-{html.escape(row['case_id'])}'>{text}</a>"
            css = " class='text'" if column in ("warnings", "error") else ""
            cells.append(f"<td data-value='{html.escape(sort_value)}'{css}>{text}</td>")
        css = "error" if row["status"] == "error" else ("warned" if row.get("warnings") else "")
        lines.append(f"<tr data-status='{html.escape(row['status'])}' class='{css}'>" + "".join(cells) + "</tr>")
    options = "".join(f"<option value='{html.escape(s)}'>{html.escape(s)} ({n})</option>"
                      for s, n in status_counts(rows).items())
    note = ""
    if len(rows) < table.num_rows:
        note = (f"<p id='listed' class='note'>{len(rows):,} of {table.num_rows:,} cases are listed: the failed ones "
                "first, then those with warnings, the drawn ones and the lowest DSC. The manifest "
                "(<code>manifest.parquet</code>) has every one; the summary above counts them all.</p>")
    return (f"{note}<p><label>status <select id='status-filter'><option value=''>all ({len(rows)})</option>{options}"
            "</select></label> &middot; click a header to sort</p>"
            f"<table id='cases'><thead><tr>{heads}</tr></thead><tbody>\n" + "\n".join(lines) + "\n</tbody></table>")


def _attribution(rows: list[dict], table: pa.Table) -> str:
    """Stage attribution (``pseudolabel --attribution``): where each case loses its accuracy (the
    listed cases; the means over all of them)."""
    attributed = [r for r in rows if _finite(r.get("dsc_oracle"))]
    if not attributed:
        return ""
    header = ["case_id", "coarse mask", "SAM from saliency", "SAM from truth boxes"]
    lines = [html_row([_cell(row.get(c, "")) for c in ("case_id", "dsc_coarse", "dsc", "dsc_oracle")])
             for row in attributed]
    every = np.isfinite(column_floats(table, "dsc_oracle"))
    means = [float(np.mean(column_floats(table, c)[every])) for c in ("dsc_coarse", "dsc", "dsc_oracle")]
    lines.append(html_row(["mean", *(f"{m:.4f}" for m in means)], heads=4))
    return ("<h2>Stage attribution (DSC)</h2><p>coarse mask: the saliency map's k-means or "
            "threshold mask; SAM from saliency: the run's masks; SAM from truth boxes: SAM prompted with "
            "the ground truth's boxes (an upper bound for the prompts). A low first column points at "
            "saliency, a gap between the second and third at prompting, a low third at SAM.</p>"
            + html_table(header, lines))


# -- pictures --------------------------------------------------------------------------------------


def _swatch(colour: tuple[int, int, int], words: str) -> str:
    return f"<span class='swatch' style='background:rgb{colour}'></span>{html.escape(words)}"


def _strips(rows: list[dict], pictures: dict[str, list[Picture]]) -> list[str]:
    if not pictures:
        return ["<h2>Pictures</h2><p>No case was drawn (<code>pipeline.overlays: 0</code>).</p>"]
    legend = (_swatch(MASK_COLOUR, "mask") + _swatch(TRUTH_COLOUR, "ground truth") + _swatch(PROMPT_COLOUR, "prompt")
              + _swatch(BACKGROUND_POINT_COLOUR, "background point"))
    parts = [f"<h2>Pictures</h2><p>{legend}</p><p class='note'>The first cases by case_id "
             "(<code>pipeline.overlays</code>); for a volume, its prompted slices (all of them, or "
             "<code>pipeline.strip_slices</code> evenly spaced). Click a picture to enlarge it.</p>"]
    by_case = {r["case_id"]: r for r in rows}
    for case_id, strip in sorted(pictures.items()):
        row = by_case.get(case_id, {})
        score = f" &middot; DSC {_cell(row['dsc'])}" if _finite(row.get("dsc")) else ""
        warned = f" &middot; <span class='warn'>{html.escape(row['warnings'])}</span>" if row.get("warnings") else ""
        figures = []
        for picture in strip:
            data = base64.b64encode(picture.png).decode()
            label = f"{case_id}, {picture.caption}"
            figures.append(f"<figure><img class='thumb' src='data:image/png;base64,{data}' alt='{html.escape(label)}' "
                           f"data-case='{html.escape(case_id)}' data-caption='{html.escape(label)}'>"
                           f"<figcaption>{html.escape(picture.caption)}</figcaption></figure>")
        parts.append(f"<section id='case-{html.escape(case_id)}'><h3>{html.escape(case_id)}{score}{warned}</h3>"
                     f"<div class='strip'>{''.join(figures)}</div></section>")
    return parts


def merge_scores(rows: list[dict], scores: list[dict]) -> tuple[list[dict], int]:
    """Rows with ``evaluate``'s scores where the run has none (``scored_by``: run or evaluate); how many."""
    by_case = {s["case_id"]: s for s in scores if s.get("status", "ok") == "ok"}
    merged, taken = [], 0
    for original in rows:
        row = dict(original)
        if _finite(row.get("dsc")):
            row["scored_by"] = "run"
        elif row["case_id"] in by_case:
            found = by_case[row["case_id"]]
            row.update({k: float(found[k]) for k in ("dsc", "nsd", "hd95")}, scored_by="evaluate")
            taken += 1
        else:
            row["scored_by"] = ""
        merged.append(row)
    return merged, taken


def _with_scores(table: pa.Table, scores: list[dict]) -> tuple[pa.Table, int]:
    """``table`` with ``evaluate``'s scores where the run has none, and the ``scored_by`` column."""
    rows = table.select(["case_id", "dsc", "nsd", "hd95"]).to_pylist()
    merged, taken = merge_scores(rows, scores)
    for name in ("dsc", "nsd", "hd95"):
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array([r[name] for r in merged], pa.float64()))
    return table.append_column("scored_by", pa.array([r["scored_by"] for r in merged], pa.string())), taken


def render_report(table: pa.Table, pictures: dict[str, list[Picture]], title: str, *, about: dict | None = None,
                  run_file: dict | None = None, scores: list[dict] | None = None, scores_uri: str = "",
                  written: str = "") -> str:
    """The HTML text of a run's manifest ``table``, its pictures by case and, when given, its metadata
    (``about``), ``run.json`` and ``evaluate``'s per-case scores.

    The figures are computed over the columns; only the listed cases (``REPORT_CASES`` at most)
    become rows, so a report of a large cohort costs what one of a thousand cases does."""
    about = about if about is not None else manifest_about(table)
    columns = COLUMNS
    merged = ""
    if scores:
        table, taken = _with_scores(table, scores)
        columns = (*COLUMNS[:8], "scored_by", *COLUMNS[8:])
        merged = f" ({taken} from {html.escape(scores_uri or 'evaluate')})" if taken else ""
    rows = table.take(pa.array(_listed(table, set(pictures)), pa.int64())).to_pylist()
    body = [f"<h1>{html.escape(title)}</h1>", *_about(_distinct_rows(table), about, run_file, written),
            "<h2>Summary</h2>", _summary(table, about, merged), "<h2>Cases</h2>",
            _case_table(rows, set(pictures), columns, table), _attribution(rows, table), *_strips(rows, pictures),
            "<div id='lightbox' role='dialog' aria-label='enlarged picture'><img alt='enlarged picture'><p></p></div>"]
    return html_page(title, body, REPORT_STYLE, REPORT_SCRIPT)


# -- reading a run ---------------------------------------------------------------------------------


def run_pictures(run_output: str, case_ids: list[str]) -> dict[str, list[Picture]]:
    """Each drawn case's pictures: a volume's strip (``strips/``), else its one overlay, in slice order."""
    found: dict[str, list[Picture]] = {}
    for folder in (OVERLAYS, STRIPS):
        uri = storage.join(run_output, folder)
        if not storage.exists(uri):
            continue
        files = {storage.basename(u): u for u in storage.list_files(uri) if u.endswith(".png")}
        for case_id in case_ids:
            if folder == OVERLAYS and f"{case_id}.png" in files:
                found[case_id] = [Picture("image", storage.read_bytes(files[f"{case_id}.png"]))]
                continue
            pattern = re.compile(re.escape(case_id) + r"\.slice(\d+)\.png")
            strip = sorted((int(m.group(1)), name) for name in files if (m := pattern.fullmatch(name)))
            if strip:
                found[case_id] = [Picture(f"slice {k}", storage.read_bytes(files[name])) for k, name in strip]
    return found


def read_scores(uri: str) -> list[dict]:
    """``medclipsam evaluate --output`` rows (CSV or Parquet): case_id, dsc, nsd, hd95, status."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = io.BytesIO(storage.read_bytes(uri))
    try:
        table = pq.read_table(data) if uri.endswith(".parquet") else pacsv.read_csv(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: cannot read the scores table ({exc})") from exc
    missing = [c for c in ("case_id", "dsc", "nsd", "hd95") if c not in table.column_names]
    if missing:
        raise InputError(f"{uri}: not a table of medclipsam evaluate (no column {', '.join(missing)})")
    return table.to_pylist()


def write_report(run_output: str, destination: str | None = None, scores_uri: str | None = None) -> str:
    """Write ``<run_output>/report.html`` (or ``destination``); returns where it went.

    ``scores_uri`` (else ``scores.csv``/``scores.parquet`` in the run folder, when there) is an
    ``evaluate`` table merged into the cases that have no scores of their own."""
    from datetime import UTC, datetime

    manifest = storage.join(run_output, MANIFEST)
    if not storage.exists(manifest):
        raise InputError(f"{manifest}: no manifest; is {run_output} the output of a segment or pseudolabel run?")
    table = read_manifest(manifest, compact=True)  # the repeated strings as dictionaries
    if scores_uri is None:
        scores_uri = next((u for u in (storage.join(run_output, n) for n in SCORE_FILES) if storage.exists(u)), "")
    elif not storage.exists(scores_uri):
        raise InputError(f"{scores_uri}: no such scores table")
    run_json = storage.join(run_output, RUN_FILE)
    run_file = json.loads(storage.read_bytes(run_json)) if storage.exists(run_json) else None
    pictures = run_pictures(run_output, table.column("case_id").to_pylist())
    page = render_report(table, pictures, f"medclipsam run {storage.basename(run_output)}", run_file=run_file,
                         scores=read_scores(scores_uri) if scores_uri else None, scores_uri=scores_uri,
                         written=datetime.now(UTC).isoformat(timespec="seconds"))
    destination = destination or storage.join(run_output, "report.html")
    storage.write_bytes_atomic(destination, page.encode())
    return destination
