"""A static HTML page of a pseudo-labelling run: summary, per-case table, overlay pictures.

The page embeds the pictures, so it is one self-contained file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import math

import pyarrow as pa

from .. import storage
from ..domain.records import read_manifest, status_counts
from ..errors import InputError
from ..storage.outputs import MANIFEST, OVERLAYS

COLUMNS = ("case_id", "status", "n_slices", "n_prompted_slices", "dsc", "nsd", "hd95", "seconds", "error")


def _seconds(row: dict) -> float:
    return sum(float(row.get(k) or 0.0) for k in
               ("seconds_read", "seconds_saliency", "seconds_embed", "seconds_decode", "seconds_write"))


PAGE_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child"
              "{text-align:left}.error{color:#b00}figure{display:inline-block;margin:6px}"
              "img{max-width:320px}")


def html_page(title: str, body: list[str], extra_style: str = "") -> str:
    """A self-contained page (the run report, the tuner's trials): head, style, ``body`` one part a line."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                      f"<style>{PAGE_STYLE}{extra_style}</style></head><body>", *body, "</body></html>"])


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


def _summary(rows: list[dict]) -> list[tuple[str, str]]:
    counts = status_counts(rows)
    scored = [r for r in rows if isinstance(r.get("dsc"), float) and math.isfinite(r["dsc"])]
    items = [("cases", str(len(rows))), *((f"status {k}", str(v)) for k, v in counts.items())]
    if scored:
        items += [("mean DSC", f"{sum(r['dsc'] for r in scored) / len(scored):.4f}"),
                  ("mean NSD", f"{sum(r['nsd'] for r in scored) / len(scored):.4f}"),
                  ("scored cases", str(len(scored)))]
    return items


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _attribution(rows: list[dict]) -> str:
    """Stage attribution (``pseudolabel --attribution``): where each case loses its accuracy."""
    attributed = [r for r in rows if _finite(r.get("dsc_oracle"))]
    if not attributed:
        return ""
    header = ["case_id", "coarse mask", "SAM from saliency", "SAM from truth boxes"]
    lines = [html_row([_cell(row.get(c, "")) for c in ("case_id", "dsc_coarse", "dsc", "dsc_oracle")])
             for row in attributed]
    means = [sum(r[c] for r in attributed) / len(attributed) for c in ("dsc_coarse", "dsc", "dsc_oracle")]
    lines.append(html_row(["mean", *(f"{m:.4f}" for m in means)], heads=4))
    return ("<h2>Stage attribution (DSC)</h2><p>coarse mask: the saliency map's k-means or "
            "threshold mask; SAM from saliency: the run's masks; SAM from truth boxes: SAM prompted with "
            "the ground truth's boxes (an upper bound for the prompts). A low first column points at "
            "saliency, a gap between the second and third at prompting, a low third at SAM.</p>"
            + html_table(header, lines))


def render_report(table: pa.Table, pictures: dict[str, bytes], title: str) -> str:
    """The HTML text for a manifest table and ``{case_id: png}`` overlays."""
    rows = table.to_pylist()
    summary = [html_row([html.escape(k), html.escape(v)], heads=1) for k, v in _summary(rows)]
    cases = [html_row([_cell({**row, "seconds": _seconds(row)}.get(c, "")) for c in COLUMNS],
                      "error" if row["status"] == "error" else "") for row in rows]
    body = [f"<h1>{html.escape(title)}</h1>" + html_table([], summary) + "<h2>Cases</h2>"
            + html_table(list(COLUMNS), cases) + _attribution(rows)
            + "<h2>Overlays</h2><p>red: mask; green: ground truth (when given)</p>"]
    for case_id, png in sorted(pictures.items()):
        data = base64.b64encode(png).decode()
        body.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(case_id)}'>"
                    f"<figcaption>{html.escape(case_id)}</figcaption></figure>")
    return html_page(title, body)


def write_report(run_output: str, destination: str | None = None) -> str:
    """Write ``<run_output>/report.html`` (or ``destination``); returns where it went."""
    manifest = storage.join(run_output, MANIFEST)
    if not storage.exists(manifest):
        raise InputError(f"{manifest}: no manifest; is {run_output} the output of a pseudolabel run?")
    table = read_manifest(manifest)
    folder = storage.join(run_output, OVERLAYS)
    uris = [u for u in storage.list_files(folder) if u.endswith(".png")] if storage.exists(folder) else []
    pictures = {storage.basename(u)[: -len(".png")]: data for u, data in storage.read_many(uris).items()}
    destination = destination or storage.join(run_output, "report.html")
    page = render_report(table, pictures, f"medclipsam run {storage.basename(run_output)}")
    storage.write_bytes_atomic(destination, page.encode())
    return destination
